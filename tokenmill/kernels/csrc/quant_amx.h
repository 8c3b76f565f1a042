// The AMX paths: int8 tiles for mid-sized batches, bfloat16 tiles (weights dequantized once per
// pass) for prefill chunks and large decode batches.
// Part of quant_gemm.cpp's translation unit: included there only, in order.
#pragma once

#include "quant_batched.h"

namespace {

#if defined(TM_AVX512) || defined(TM_AVX2)

#if defined(__AMX_INT8__) && defined(__AMX_TILE__)
#define TM_AMX 1
using amx::TileConfig;
inline bool amx_permitted() { return amx::permitted(); }

// Tiles: 0, 3, 4, 5 = C (16 tokens x 16 rows, int32; one per group of 16 tokens, so the groups'
// products overlap), 1 = A (16 tokens x 32 inputs, int8), 2 = B (one block: U[0..7], 8 x 64
// bytes).
void configure_amx() {
  TileConfig cfg;
  for (int c : {0, 3, 4, 5}) {
    cfg.rows[c] = 16;
    cfg.colsb[c] = 64;
  }
  cfg.rows[1] = 16;
  cfg.colsb[1] = 32;
  cfg.rows[2] = 8;
  cfg.colsb[2] = 64;
  // The intrinsic tells the compiler it reads one byte: without this, the stores above are
  // dead and the tiles end up unconfigured.
  __asm__ volatile("" : : "r"(&cfg) : "memory");
  _tile_loadconfig(&cfg);
}

// Group g's block sums: C tile 0, 3, 4 or 5 (tile numbers are immediates).
inline void amx_group(int g, const int8_t* x, int64_t stride, int32_t* out) {
  _tile_loadd(1, x, stride);
  switch (g) {
    case 0:
      _tile_zero(0);
      _tile_dpbsud(0, 1, 2);
      _tile_stored(0, out, 64);
      break;
    case 1:
      _tile_zero(3);
      _tile_dpbsud(3, 1, 2);
      _tile_stored(3, out, 64);
      break;
    case 2:
      _tile_zero(4);
      _tile_dpbsud(4, 1, 2);
      _tile_stored(4, out, 64);
      break;
    default:
      _tile_zero(5);
      _tile_dpbsud(5, 1, 2);
      _tile_stored(5, out, 64);
      break;
  }
}

// Block kb's contribution for tokens [m_begin, M) into their L1 accumulators (16 floats each).
template <int64_t Q>
inline void accumulate_rows(const Block& blk, const Acts& acts, int64_t m_begin, int64_t M,
                            int64_t kb, float* accbuf) {
  int64_t m0 = m_begin;
  for (; m0 + 4 <= M; m0 += 4) {
    F16 acc[4];
    for (int m = 0; m < 4; ++m) acc[m] = F16::load(accbuf + (m0 + m) * 16);
    accumulate<Q, 4>(blk, acts.from(m0), kb, acc);
    for (int m = 0; m < 4; ++m) acc[m].store(accbuf + (m0 + m) * 16);
  }
  for (; m0 < M; ++m0) {
    F16 acc[1] = {F16::load(accbuf + m0 * 16)};
    accumulate<Q, 1>(blk, acts.from(m0), kb, acc);
    acc[0].store(accbuf + m0 * 16);
  }
}

// A 16-row tile for a batch of 16 to 64 tokens on the tile unit: per block, 16 tokens at a
// time, one `tdpbsud` (int8 activations x the unpacked unsigned weights, exactly the U layout)
// gives the int32 block sums, which are then scaled into float accumulators in L1 like the VNNI
// path. The scaling runs one block behind the tile products, so it reads sums whose stores
// have long completed instead of waiting on them. Tokens past the last multiple of 16 take the
// VNNI path on the same unpacked block.
template <int64_t Q, typename TY>
void tile_amx(const uint8_t* w, const Acts& acts, int64_t M, int64_t K, const Epilogue& ep, TY* y,
              int64_t ldy, int rows, float* accbuf) {
  static_assert(!kSplit<Q>, "blocks with two scales take the VNNI path");
  epilogue_fill(ep, M, accbuf, 16);
  alignas(64) int32_t sums[2][4][16 * 16];  // [block parity][token group]
  const int64_t groups = M / 16;
  F16 s_prev = F16::zero(), o_prev = F16::zero();
  int64_t kb_prev = -1;
  auto rescale = [&](int64_t kb, F16 s0, F16 o0) {
    for (int64_t g = 0; g < groups; ++g)
      for (int i = 0; i < 16; ++i) {
        const int64_t m = g * 16 + i;
        const ActMeta& a = acts.meta_at(m, kb);
        float* acc_p = accbuf + m * 16;
        F16 acc = F16::load(acc_p);
        const F16 v = {_mm512_cvtepi32_ps(_mm512_load_si512(sums[kb & 1][g] + i * 16))};
        acc = F16::fma(v, s0 * F16::set1(a.d), acc);
        acc = F16::fma(o0, F16::set1(a.dsum), acc);
        acc.store(acc_p);
      }
  };
  Block blk;
  for_each_block<Q>(w, K, [&](const uint8_t* src, int b, int64_t kb) {
    unpack_block<Q>(src, b, blk);
    _tile_loadd(2, blk.u[0], 64);
    for (int64_t g = 0; g < groups; ++g)
      amx_group(static_cast<int>(g), acts.at(g * 16, kb), acts.xs, sums[kb & 1][g]);
    if (kb_prev >= 0) rescale(kb_prev, s_prev, o_prev);
    s_prev = F16::load(blk.s0);
    o_prev = F16::load(blk.o0);
    kb_prev = kb;
    accumulate_rows<Q>(blk, acts, groups * 16, M, kb, accbuf);
  });
  rescale(kb_prev, s_prev, o_prev);
  for (int64_t m = 0; m < M; ++m) store_row(F16::load(accbuf + m * 16), y + m * ldy, rows);
}
#endif  // AMX

#ifdef TM_AMX
// From this many tokens on (prefill chunks, decode batches of 64+), a QuantLinear on the AMX
// level runs bfloat16 tiles (gemm_amx_bf16) instead of the 8-bit activation path.
constexpr int64_t kAmxBf16MinM = 64;

// Tiles of the bfloat16 path: 0..3 = C (token group g, weight tile n at g * 2 + n: 16 tokens x
// 16 rows, float32), 4, 5 = A (token group 0 / 1: 16 tokens x 32 inputs, bfloat16), 6, 7 = B
// (weight tile 0 / 1: 16 input pairs x 16 rows, bfloat16 pairs).
void configure_amx_bf16() {
  TileConfig cfg;
  for (int c = 0; c < 8; ++c) {
    cfg.rows[c] = 16;
    cfg.colsb[c] = 64;
  }
  __asm__ volatile("" : : "r"(&cfg) : "memory");
  _tile_loadconfig(&cfg);
}

// Shuffles of block_to_bf16: pick[h][j] moves byte 2h + j of every 32-bit lane to its low byte
// (the rest zero); perm takes words 0..15 (one input of each row) and 16..31 (the next input)
// to (word r, word 16 + r) in lane r.
struct Bf16Masks {
  alignas(64) uint8_t pick[2][2][64];
  alignas(64) uint16_t perm[32];
  constexpr Bf16Masks() : pick(), perm() {
    for (int h = 0; h < 2; ++h)
      for (int j = 0; j < 2; ++j)
        for (int i = 0; i < 64; ++i)
          pick[h][j][i] = i % 4 == 0 ? static_cast<uint8_t>(i % 16 + 2 * h + j) : 0x80;
    for (int r = 0; r < 16; ++r) {
      perm[2 * r] = static_cast<uint16_t>(r);
      perm[2 * r + 1] = static_cast<uint16_t>(16 + r);
    }
  }
};
alignas(64) constexpr Bf16Masks kBf16Masks;

// An unpacked block as a B tile of bfloat16 weights: out[kp * 32 + 2 r + j] = bf16(s * u + o)
// of input 2 kp + j of row r (s, o: the scale and offset of the input's half for split types).
template <int64_t Q>
inline void block_to_bf16(const Block& blk, uint16_t* out) {
  __m512i pick[2][2];
  for (int h = 0; h < 2; ++h)
    for (int j = 0; j < 2; ++j) pick[h][j] = _mm512_load_si512(kBf16Masks.pick[h][j]);
  const __m512i perm = _mm512_load_si512(kBf16Masks.perm);
  for (int kp = 0; kp < 16; ++kp) {
    const int t = kp / 2, h = kp % 2;
    const bool second = kSplit<Q> && kp >= 8;
    const __m512 sc = _mm512_load_ps(second ? blk.s1 : blk.s0);
    const __m512 of = _mm512_load_ps(second ? blk.o1 : blk.o0);
    const __m512i x = _mm512_load_si512(blk.u[t]);
    const __m512 wa =
        _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_shuffle_epi8(x, pick[h][0])), sc, of);
    const __m512 wb =
        _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_shuffle_epi8(x, pick[h][1])), sc, of);
    const __m512i pk = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(wb, wa));
    _mm512_storeu_si512(out + kp * 32, _mm512_permutexvar_epi16(perm, pk));
  }
}

// Blocks per chunk of gemm_amx_bf16: a pair of tiles' chunk of bfloat16 weights is 16 KiB, and
// stays in L1 while every token group multiplies it.
constexpr int64_t kBf16ChunkBlocks = 8;

// y = x W^T (+ bias) with bfloat16 weights and activations on the tile unit, for x block-major
// ([K / 32][Mp][32] bfloat16, Mp = M rounded up to 16, padding rows zero: block_major_bf16).
// Pairs of weight tiles are split over the threads. Each pair's row is taken in chunks of
// kBf16ChunkBlocks blocks: the chunk is dequantized (1 KiB per block and tile) and every 32
// tokens add its products to four C tiles (2 token groups x 2 weight tiles), kept in the tiles
// from chunk to chunk when one pass of 32 covers the batch, else saved to float32 sums in
// between (the weights in L1, the activations read from L2 once per chunk).
template <int64_t Q, typename TY>
void gemm_amx_bf16(const uint8_t* w, const uint16_t* xb, int64_t M, int64_t Mp, int64_t N,
                   int64_t K, const float* bias, TY* y, int64_t ldy) {
  const int64_t n_tiles = (N + 15) / 16, tile_bytes = K / unit_k(Q) * unit_bytes(Q), KB = K / 32;
  const int64_t uk = unit_k(Q), ub = unit_bytes(Q), bpu = uk / 32;
  const int64_t passes = (Mp + 31) / 32;
  at::parallel_for(0, (n_tiles + 1) / 2, 1, [&](int64_t begin, int64_t end) {
    configure_amx_bf16();
    alignas(64) uint16_t wb[2][kBf16ChunkBlocks][512] = {};  // a lone last tile: zeros beside it
    std::vector<float> sums(passes * 4 * 256);               // per pass: C tiles 0..3
    for (int64_t p = begin; p < end; ++p) {
      const int nt = static_cast<int>(std::min<int64_t>(2, n_tiles - 2 * p));
      for (int64_t k0 = 0; k0 < KB; k0 += kBf16ChunkBlocks) {
        const int64_t k1 = std::min(KB, k0 + kBf16ChunkBlocks);
        for (int i = 0; i < nt; ++i) {
          const uint8_t* wt = w + (2 * p + i) * tile_bytes;
          Block blk;
          for (int64_t kb = k0; kb < k1; ++kb) {
            const uint8_t* src = wt + kb / bpu * ub;
            if (kb % bpu == 0)
              for (int64_t line = 0; line < ub; line += 64)
                _mm_prefetch(reinterpret_cast<const char*>(src + ub + line), _MM_HINT_T0);
            unpack_block<Q>(src, static_cast<int>(kb % bpu), blk);
            block_to_bf16<Q>(blk, wb[i][kb - k0]);
          }
        }
        for (int64_t pass = 0; pass < passes; ++pass) {
          const int64_t m0 = pass * 32;
          const bool two = m0 + 16 < Mp;
          float* sp = sums.data() + pass * 4 * 256;
          if (k0 == 0) {
            _tile_zero(0);
            _tile_zero(1);
            _tile_zero(2);
            _tile_zero(3);
          } else if (passes > 1) {
            _tile_loadd(0, sp, 64);
            _tile_loadd(1, sp + 256, 64);
            _tile_loadd(2, sp + 512, 64);
            _tile_loadd(3, sp + 768, 64);
          }
          for (int64_t kb = k0; kb < k1; ++kb) {
            const uint16_t* xk = xb + (kb * Mp + m0) * 32;
            _tile_loadd(6, wb[0][kb - k0], 64);
            _tile_loadd(7, wb[1][kb - k0], 64);
            _tile_loadd(4, xk, 64);
            _tile_dpbf16ps(0, 4, 6);
            _tile_dpbf16ps(1, 4, 7);
            if (two) {
              _tile_loadd(5, xk + 16 * 32, 64);
              _tile_dpbf16ps(2, 5, 6);
              _tile_dpbf16ps(3, 5, 7);
            }
          }
          if (passes > 1 || k1 == KB) {
            _tile_stored(0, sp, 64);
            _tile_stored(1, sp + 256, 64);
            _tile_stored(2, sp + 512, 64);
            _tile_stored(3, sp + 768, 64);
          }
        }
      }
      for (int64_t pass = 0; pass < passes; ++pass) {
        const int64_t m0 = pass * 32;
        const float* sp = sums.data() + pass * 4 * 256;
        for (int g = 0; g < 2 && m0 + g * 16 < M; ++g)
          for (int n = 0; n < nt; ++n) {
            const int64_t col = (2 * p + n) * 16;
            const int rows = static_cast<int>(std::min<int64_t>(16, N - col));
            const F16 bv = bias ? F16::load(bias + col) : F16::zero();
            for (int i = 0; i < 16 && m0 + g * 16 + i < M; ++i)
              store_row(F16::load(sp + (g * 2 + n) * 256 + i * 16) + bv,
                        y + (m0 + g * 16 + i) * ldy + col, rows);
          }
      }
    }
    _tile_release();
  });
}

// x [M, K] (float32 / bfloat16) as bfloat16, block-major with zero padding rows (gemm_amx_bf16).
template <typename T>
std::vector<uint16_t> block_major_bf16(const T* x, int64_t M, int64_t Mp, int64_t K) {
  const int64_t KB = K / 32;
  std::vector<uint16_t> xb(KB * Mp * 32, 0);
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m)
      for (int64_t kb = 0; kb < KB; ++kb) {
        uint16_t* dst = xb.data() + (kb * Mp + m) * 32;
        if constexpr (std::is_same_v<T, float>) {
          const __m512i pk = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(
              _mm512_loadu_ps(x + m * K + kb * 32 + 16), _mm512_loadu_ps(x + m * K + kb * 32)));
          _mm512_storeu_si512(dst, pk);
        } else {
          std::memcpy(dst, x + m * K + kb * 32, 64);
        }
      }
  });
  return xb;
}
#endif

#ifdef TM_AMX
// Decode batches of this many tokens up to kAmxMaxM take the AMX tiles (see gemm_typed).
constexpr int64_t kAmxMinM = 48, kAmxMaxM = kAmxBf16MinM - 1;

// y = the quantized GEMM on the tile unit, one 16-row tile at a time (tile_amx).
template <int64_t Q, typename TY>
void gemm_amx(const uint8_t* w, const BatchActs& batch, int64_t N, int64_t K, const Epilogue& ep,
              TY* y, int64_t ldy) {
  const int64_t M = batch.M, n_tiles = (N + 15) / 16, tile_bytes = K / unit_k(Q) * unit_bytes(Q);
  // every weight tile reads the activations block by block: block-major
  const Acts acts = {batch.x.data(), batch.meta.data(), 32, M * 32, 1, M, batch.starts<Q>()};
  at::parallel_for(0, n_tiles, 1, [&](int64_t begin, int64_t end) {
    configure_amx();
    std::vector<float> accbuf(M * 16);
    for (int64_t nt = begin; nt < end; ++nt)
      tile_amx<Q>(w + nt * tile_bytes, acts, M, K, ep.at(nt * 16, 0), y + nt * 16, ldy,
                  static_cast<int>(std::min<int64_t>(16, N - nt * 16)), accbuf.data());
    _tile_release();
  });
}
#endif

#endif  // TM_AVX512 || TM_AVX2

}  // namespace
