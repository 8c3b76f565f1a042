// bfloat16 steps on AMX tiles, W's rows as the A operand loaded in place (gemm_tiles).
// Part of dense_gemm.cpp's translation unit: included there only.
#pragma once

#include "dense_stream.h"

namespace {

#if defined(__AMX_BF16__) && defined(__AMX_TILE__)
#define TM_DENSE_AMX 1
// bfloat16 steps of kStreamMaxRowsBf16 + 1 to kTilesMaxRows rows on the tile unit, weights read
// where they lie: W's rows are the A operand (a tile is 16 rows x 32 inputs, loaded at W's row
// stride), x the B operand (input pairs x tokens, rearranged once per call: pairs_by_group), so no
// weight is ever copied or repacked and the streaming path reads the same [N, K] tensor.
// Tiles: 0..3 = C (weight tile i, token group g at 2 g + i: 16 rows x 16 tokens, float32),
// 4, 5 = A (weight tiles 0 / 1), 6, 7 = B (token groups 0 / 1).
constexpr int64_t kTileAhead = 8;  // how many 32-input blocks ahead W's rows are prefetched

void configure_tiles() {
  amx::TileConfig cfg;
  for (int c = 0; c < 8; ++c) {
    cfg.rows[c] = 16;
    cfg.colsb[c] = 64;
  }
  __asm__ volatile("" : : "r"(&cfg) : "memory");  // the intrinsic would leave cfg unwritten
  _tile_loadconfig(&cfg);
}

// x [M, K] as B tiles: out[((kb * G + g) * 16 + kp) * 32 + 2 m + j] = x[16 g + m, 32 kb + 2 kp
// + j] for G = ceil(M / 16) token groups, zero for the tokens past M.
std::vector<uint16_t> pairs_by_group(const at::BFloat16* x, int64_t M, int64_t K) {
  const int64_t G = (M + 15) / 16, KB = K / 32;
  std::vector<uint16_t> out(KB * G * 512, 0);
  const auto* xs = reinterpret_cast<const uint32_t*>(x);  // input pairs
  at::parallel_for(0, KB, 16, [&](int64_t b0, int64_t b1) {
    for (int64_t kb = b0; kb < b1; ++kb)
      for (int64_t m = 0; m < M; ++m) {
        auto* dst = reinterpret_cast<uint32_t*>(out.data() + (kb * G + m / 16) * 512) + m % 16;
        for (int kp = 0; kp < 16; ++kp) dst[kp * 16] = xs[(m * K) / 2 + kb * 16 + kp];
      }
  });
  return out;
}

// y [M, N] = x W^T (+ bias) for bfloat16 x (as pairs_by_group) and W [N, K], N a multiple of
// 16 and K of 32. Pairs of weight tiles, in groups whose rows fill up to 1 MiB, are split over
// the threads. For each pass of 32 tokens every pair of the group runs the whole of K with its
// sums in the C tiles: the first pass reads the rows from DRAM (prefetched kTileAhead blocks
// ahead), the later ones from L2. Each C tile is then transposed into the output rows (16
// gathers), with the bias, rounded to bfloat16.
void gemm_tiles(const at::BFloat16* w, int64_t N, int64_t K, const uint16_t* xp, int64_t M,
                const float* bias, at::BFloat16* y) {
  const int64_t KB = K / 32, G = (M + 15) / 16, passes = (G + 1) / 2, n_tiles = N / 16;
  const int64_t pairs = (n_tiles + 1) / 2, stride = K * 2;  // bytes between W's rows
  // pairs of tiles per group: their rows (up to 1 MiB) stay in L2 while each pass's
  // activations multiply all of them, so those are read once per group, not per pair
  const int64_t per_group =
      std::max<int64_t>(1, std::min((int64_t{1} << 20) / (32 * stride),
                                    (pairs + at::get_num_threads() - 1) / at::get_num_threads()));
  at::parallel_for(0, (pairs + per_group - 1) / per_group, 1, [&](int64_t begin, int64_t end) {
    configure_tiles();
    alignas(64) float sums[4][256];
    const __m512i column =
        _mm512_mullo_epi32(_mm512_set1_epi32(16),
                           _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
    for (int64_t group = begin; group < end; ++group)
      for (int64_t pass = 0; pass < passes; ++pass)
        for (int64_t p = group * per_group; p < std::min(pairs, (group + 1) * per_group); ++p) {
          const bool two_tiles = 2 * p + 1 < n_tiles, two_groups = 2 * pass + 1 < G;
          const at::BFloat16* wp = w + 2 * p * 16 * K;
          _tile_zero(0);
          _tile_zero(1);
          _tile_zero(2);
          _tile_zero(3);
          for (int64_t kb = 0; kb < KB; ++kb) {
            if (pass == 0 && kb + kTileAhead < KB)  // a later line of each row, from DRAM
              for (int r = 0; r < (two_tiles ? 32 : 16); ++r)
                _mm_prefetch(reinterpret_cast<const char*>(wp + r * K + (kb + kTileAhead) * 32),
                             _MM_HINT_T0);
            const uint16_t* xk = xp + (kb * G + 2 * pass) * 512;
            _tile_loadd(4, wp + kb * 32, stride);
            _tile_loadd(6, xk, 64);
            _tile_dpbf16ps(0, 4, 6);
            if (two_tiles) {
              _tile_loadd(5, wp + 16 * K + kb * 32, stride);
              _tile_dpbf16ps(1, 5, 6);
            }
            if (two_groups) {
              _tile_loadd(7, xk + 512, 64);
              _tile_dpbf16ps(2, 4, 7);
              if (two_tiles) _tile_dpbf16ps(3, 5, 7);
            }
          }
          _tile_stored(0, sums[0], 64);
          _tile_stored(1, sums[1], 64);
          _tile_stored(2, sums[2], 64);
          _tile_stored(3, sums[3], 64);
          for (int g = 0; g < (two_groups ? 2 : 1); ++g)
            for (int i = 0; i < (two_tiles ? 2 : 1); ++i) {
              const int64_t n0 = (2 * p + i) * 16, m0 = (2 * pass + g) * 16;
              const __m512 b = bias ? _mm512_loadu_ps(bias + n0) : _mm512_setzero_ps();
              for (int64_t m = 0; m < 16 && m0 + m < M; ++m)  // column m of the tile: token m
                vec_math::store16(
                    y + (m0 + m) * N + n0,
                    _mm512_add_ps(_mm512_i32gather_ps(column, sums[2 * g + i] + m, 4), b));
            }
        }
    _tile_release();
  });
}
#endif

}  // namespace
