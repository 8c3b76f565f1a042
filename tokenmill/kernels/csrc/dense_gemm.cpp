// y = x W^T (+ b) for dense weights in float32, float16 or bfloat16: float32 activations, or
// bfloat16 ones on bfloat16 weights.
// Steps of a few rows (decode), where the library GEMM leaves bandwidth unused: each thread
// streams its share of W's rows once, several side by side, widening 16-bit weights as they load
// (F16C; bfloat16 by a shift), and multiplies every row of x against them with float32 FMAs
// (16 lanes on AVX-512 builds, 8 on AVX2 ones). Larger steps on 16-bit weights beside float32
// compute: blocks of rows widened in L2 and multiplied by the library's GEMM. bfloat16
// activations (bfloat16 weights) on W as it lies: AVX512-BF16 dot products (gemm_dot_bf16) up
// to 4 rows beside the AMX tiles (gemm_tiles) for more, or up to 64 on CPUs with those dot
// products but no tiles.
#include "dense_gemm.h"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/linear.h>
#include <ATen/ops/mm.h>
#include <c10/core/InferenceMode.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "amx.h"
#include "vec_math.h"

namespace {

using vec_math::VecF;
constexpr int64_t kLanes = sizeof(VecF) / sizeof(float);  // 16 on AVX-512 builds, 8 on AVX2

// The most rows of x the streaming path takes on 16-bit weights; more take the widened path.
constexpr int64_t kStreamMaxRows = 8;
// bfloat16 x of up to this many rows take the dot products (gemm_dot_bf16) where the CPU has
// them, else the float32 streaming path (x widened); more the AMX tiles where the build has
// them: at 8 rows, 16 layers of the 1B shape's weights, the tiles read 26.1 GB/s, the streaming
// 19.5 (at 4 rows 25.9 streaming). The default model's F16 file in bfloat16 compute, batch-1
// decode: 76.9 tok/s with the dot products at 1-4 rows, 62.9 with the float32 streaming.
constexpr int64_t kStreamMaxRowsBf16 = 4;
// The most rows of bfloat16 x the dot products take where the CPU has no tiles (gemm_dot_bf16).
constexpr int64_t kDotMaxRows = 64;
// The most rows of bfloat16 x the AMX tiles take (gemm_tiles); more take the library's GEMM.
constexpr int64_t kTilesMaxRows = 128;
// How far ahead of its reads each weight row is prefetched into L2, in bytes; past a row's end
// the prefetches run on into the same row of the next group (so a group's first lines are
// already on their way). Measured on Sapphire Rapids, 2 threads, 16 layers of the 1B shape's
// bfloat16 weights from DRAM (1.95 GB) and 30 of SmolLM2-135M's (0.21 GB, 576-wide rows): 1 KiB
// into L2 read 28.5 / 22.3 GB/s at 1 row of x, 512 B into L1 within the row 26.2 / 17.8, the
// next group's lines spread over this group's steps 25.6 / 22.1, no prefetch 24.0 / 15.3.
constexpr int64_t kPrefetchBytes = 1024;

inline VecF fma(VecF a, VecF b, VecF c) {
#if defined(__AVX512F__)
  return _mm512_fmadd_ps(a, b, c);
#else
  return _mm256_fmadd_ps(a, b, c);
#endif
}
inline VecF zero() {
#if defined(__AVX512F__)
  return _mm512_setzero_ps();
#else
  return _mm256_setzero_ps();
#endif
}
inline float reduce(VecF v) {
#if defined(__AVX512F__)
  return _mm512_reduce_add_ps(v);
#else
  return vec_math::hsum8(v);
#endif
}

// out[t * ldo + r] = x[t] . w[r] (+ bias[r]) for R consecutive weight rows w[r] = w + r * K and
// T rows of x (ldx apart): the R rows are read once, side by side, each step's T activation
// vectors reused for all R of them. Each (row, token) sum is one chain of lane-wise FMAs along
// K, then a fixed reduction and the K % kLanes remainder: the same operations for any R, T and
// number of rows of x, so a token's output does not depend on its batch.
template <typename W, int R, int T>
void rows_dot(const float* x, int64_t ldx, const W* w, int64_t K, float* out, int64_t ldo,
              const float* bias) {
  VecF acc[R][T];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) acc[r][t] = zero();
  const int64_t Kv = K / kLanes * kLanes;
  constexpr int64_t line = 64 / sizeof(W), ahead = kPrefetchBytes / sizeof(W);
  const auto base = reinterpret_cast<uintptr_t>(w);  // prefetch addresses may pass W's end
  for (int64_t k = 0; k < Kv; k += kLanes) {
    if (k % line == 0) {
      const int64_t a = k + ahead, at = a < K ? a : a - K + R * K;
      for (int r = 0; r < R; ++r)
        _mm_prefetch(reinterpret_cast<const char*>(base + (r * K + at) * sizeof(W)), _MM_HINT_T1);
    }
    VecF xv[T];
    for (int t = 0; t < T; ++t) xv[t] = vec_math::loadv(x + t * ldx + k);
    for (int r = 0; r < R; ++r) {
      const VecF wv = vec_math::loadv(w + r * K + k);
      for (int t = 0; t < T; ++t) acc[r][t] = fma(wv, xv[t], acc[r][t]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) {
      float s = reduce(acc[r][t]);
      for (int64_t k = Kv; k < K; ++k) s += static_cast<float>(w[r * K + k]) * x[t * ldx + k];
      out[t * ldo + r] = bias ? s + bias[r] : s;
    }
}

template <typename W>
using RowsDot = void (*)(const float*, int64_t, const W*, int64_t, float*, int64_t, const float*);

// rows_dot for R rows (1 for the rows left over) and T tokens.
template <typename W, int R>
RowsDot<W> rows_dot_for(int64_t T) {
  switch (T) {
    case 1:
      return &rows_dot<W, R, 1>;
    case 2:
      return &rows_dot<W, R, 2>;
    case 3:
      return &rows_dot<W, R, 3>;
    default:
      return &rows_dot<W, R, 4>;
  }
}

// Weight rows per group and the most tokens per pass over them, for M rows of x: as many
// accumulators (R x T) as the registers hold beside T activation vectors and one weight
// vector (32 on AVX-512, 16 on AVX2), and 8 or more FMA chains in flight where the rows of x
// allow. One row of x takes 8 weight rows at a time; more take 4 in passes of up to 4 tokens
// on AVX-512; on AVX2, 2 rows of x take 4 weight rows, 3 take 3, more take 2 in passes of up
// to 4 tokens. 1B-shape bfloat16 weights, avx512 level, 2 threads: 28.5 / 25.8 / 26.4 / 21.7 /
// 17.7 GB/s at 1 / 2 / 4 / 5 / 8 rows of x, where the row-at-a-time loop before read 18.2 /
// 14.4 / 12.2 / 11.8 / 9.1 (avx2 level, float16: 28.2 / 26.6 / 20.9 / 16.3 / 12.6 against
// 20.3 / 14.1 / 12.5 / 12.5 / 9.9).
struct Plan {
  int64_t rows, max_tokens;
};
inline Plan plan_for(int64_t M) {
  if (M == 1) return {8, 1};
  if (kLanes == 16) return {4, 4};
  return M == 2 ? Plan{4, 2} : M == 3 ? Plan{3, 3} : Plan{2, 4};
}

// The token counts of the passes over each group of weight rows for M rows of x: at most
// max_tokens each, as nearly equal as they can be (8 rows: 4 + 4; 5: 3 + 2).
inline std::vector<int64_t> token_passes(int64_t M, int64_t max_tokens) {
  std::vector<int64_t> tokens;
  for (int64_t left = M; left > 0;) {
    const int64_t passes = (left + max_tokens - 1) / max_tokens;
    tokens.push_back((left + passes - 1) / passes);
    left -= tokens.back();
  }
  return tokens;
}

// out [M, N] = x [M, K] W [N, K]^T (+ bias) by row kernels fn(x, ldx, w, K, out, ldo, bias) of
// the two kinds above (rows_dot, rows_dot_bf16): for the passes `tokens` (token_passes),
// grouped[i] takes `rows` weight rows and single[i] one (for the rows left over) against the
// i-th pass's tokens. A task is a run of groups, so each thread streams one contiguous stretch
// of W.
template <typename Fn, typename X, typename W, typename O>
void run_row_groups(const X* x, const W* w, int64_t N, int64_t K, const float* bias, O* out,
                    int64_t rows, const std::vector<int64_t>& tokens,
                    const std::vector<Fn>& grouped, const std::vector<Fn>& single) {
  auto run = [&](const std::vector<Fn>& fns, int64_t r) {
    const float* b = bias ? bias + r : nullptr;
    int64_t t = 0;
    for (size_t i = 0; i < tokens.size(); t += tokens[i], ++i)
      fns[i](x + t * K, K, w + r * K, K, out + t * N + r, N, b);
  };
  const int64_t groups = N / rows;
  at::parallel_for(0, groups, 8, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) run(grouped, g * rows);
  });
  for (int64_t r = groups * rows; r < N; ++r) run(single, r);
}

template <typename W>
void gemm(const float* x, int64_t M, const W* w, int64_t N, int64_t K, const float* bias,
          float* out) {
  const Plan plan = plan_for(M);
  const std::vector<int64_t> tokens = token_passes(M, plan.max_tokens);
  std::vector<RowsDot<W>> grouped, single;
  for (int64_t T : tokens) {
    grouped.push_back(plan.rows == 8   ? &rows_dot<W, 8, 1>  // one row of x
                      : plan.rows == 4 ? rows_dot_for<W, 4>(T)
                      : plan.rows == 3 ? rows_dot_for<W, 3>(T)
                                       : rows_dot_for<W, 2>(T));
    single.push_back(rows_dot_for<W, 1>(T));
  }
  run_row_groups(x, w, N, K, bias, out, plan.rows, tokens, grouped, single);
}

// Eight 16-bit weights widened to float32 and stored.
template <typename W>
inline void widen_row(const W* w, int64_t K, float* out) {
  const int64_t K8 = K / 8 * 8;
  for (int64_t k = 0; k < K8; k += 8) _mm256_storeu_ps(out + k, vec_math::load8(w + k));
  for (int64_t k = K8; k < K; ++k) out[k] = static_cast<float>(w[k]);
}

// Steps of more rows on 16-bit weights: blocks of W's rows widened to float32 and multiplied by
// the library's GEMM straight into their columns of out, so W's 16-bit bytes are all that comes
// from memory, where a float32 copy of the whole of W per call read and wrote three times as
// many (and faulted its pages in on every call: 2.1-7x slower from 9 to 64 rows on the 1B
// shape's linears, Sapphire Rapids, 2 threads).
//  * Up to kSharedMaxRows rows (batched decode): each thread widens its own blocks into an
//    L2-sized buffer (512 KiB, at least 64 rows) and multiplies them on one thread.
//  * More (prefill): 8 MiB blocks in turn, widened by every thread, then one GEMM on all of
//    them (the per-thread blocks' narrow products ran 0.55-0.8x of it at 128-512 rows).
constexpr int64_t kSharedMaxRows = 64;

template <typename W>
void gemm_widened(const at::Tensor& x, const W* w, int64_t N, int64_t K, at::Tensor& out) {
  const int64_t M = x.size(0);
  if (M <= kSharedMaxRows) {
    const int64_t rows = std::max<int64_t>(64, (int64_t{512} << 10) / (4 * K));
    const bool inference = c10::InferenceMode::is_enabled();  // thread-local: the caller's
    at::parallel_for(0, (N + rows - 1) / rows, 1, [&](int64_t begin, int64_t end) {
      c10::InferenceMode mode(inference);  // out may be an inference tensor
      at::Tensor buf = at::empty({rows, K}, x.options());
      float* bp = buf.data_ptr<float>();
      for (int64_t blk = begin; blk < end; ++blk) {
        const int64_t r0 = blk * rows, n = std::min(rows, N - r0);
        for (int64_t r = 0; r < n; ++r) widen_row(w + (r0 + r) * K, K, bp + r * K);
        at::Tensor y = out.narrow(1, r0, n);
        at::mm_out(y, x, buf.narrow(0, 0, n).t());
      }
    });
    return;
  }
  const int64_t rows = std::min(N, std::max<int64_t>(256, (int64_t{8} << 20) / (4 * K)));
  at::Tensor buf = at::empty({rows, K}, x.options());
  float* bp = buf.data_ptr<float>();
  for (int64_t r0 = 0; r0 < N; r0 += rows) {
    const int64_t n = std::min(rows, N - r0);
    at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) widen_row(w + (r0 + r) * K, K, bp + r * K);
    });
    at::Tensor y = out.narrow(1, r0, n);
    at::mm_out(y, x, buf.narrow(0, 0, n).t());
  }
}

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

#if defined(__AVX512F__)
#define TM_DENSE_DOT 1
// bfloat16 steps of up to kDotMaxRows rows on CPUs with AVX512-BF16 but without the tile unit
// (AMD Zen 4 and later, Intel Cooper Lake), up to kStreamMaxRowsBf16 beside it: `vdpbf16ps`
// multiplies 32 bfloat16 inputs of a weight row with 32 of a token and adds the products pairwise
// into 16 float32 lanes, so x is used as it lies (no widening) and W is read in place, as by the
// streaming path. Built into the AVX-512 levels with the instruction enabled for these functions
// alone, run only where CPUID reports it (dense_bf16_path).

// out[t * ldo + r] = bfloat16(x[t] . w[r] (+ bias[r])) for R consecutive weight rows w[r] = w + r
// * K and T rows of x (ldx apart), as rows_dot: the R rows read once side by side (prefetched
// kPrefetchBytes ahead into L2), one chain of `vdpbf16ps` per (row, token) along K (the last
// partial 32 inputs through zero-masked loads), then a fixed reduction: the same operations for
// any R, T and batch, so a token's output does not depend on its batch.
template <int R, int T>
__attribute__((target("avx512bf16"))) void rows_dot_bf16(const at::BFloat16* x, int64_t ldx,
                                                         const at::BFloat16* w, int64_t K,
                                                         at::BFloat16* out, int64_t ldo,
                                                         const float* bias) {
  __m512 acc[R][T];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) acc[r][t] = _mm512_setzero_ps();
  const int64_t Kv = K / 32 * 32;
  constexpr int64_t ahead = kPrefetchBytes / 2;
  const auto base = reinterpret_cast<uintptr_t>(w);  // prefetch addresses may pass W's end
  for (int64_t k = 0; k < Kv; k += 32) {             // one 64-byte line of each row per step
    const int64_t a = k + ahead, at = a < K ? a : a - K + R * K;
    for (int r = 0; r < R; ++r)
      _mm_prefetch(reinterpret_cast<const char*>(base + (r * K + at) * 2), _MM_HINT_T1);
    __m512i xv[T];
    for (int t = 0; t < T; ++t) xv[t] = _mm512_loadu_si512(x + t * ldx + k);
    for (int r = 0; r < R; ++r) {
      const __m512i wv = _mm512_loadu_si512(w + r * K + k);
      for (int t = 0; t < T; ++t)
        acc[r][t] = _mm512_dpbf16_ps(acc[r][t], (__m512bh)wv, (__m512bh)xv[t]);
    }
  }
  // The rest of K, zero-masked. Written out apart from the loop: masked loads in the loop (or
  // its steps in a helper taking the accumulators by reference) made GCC 12 store every
  // accumulator to the stack on every step.
  if (Kv < K) {
    const __mmask32 mask = _bzhi_u32(~0u, static_cast<unsigned>(K - Kv));
    for (int r = 0; r < R; ++r) {
      const __m512i wv = _mm512_maskz_loadu_epi16(mask, w + r * K + Kv);
      for (int t = 0; t < T; ++t) {
        const __m512i xv = _mm512_maskz_loadu_epi16(mask, x + t * ldx + Kv);
        acc[r][t] = _mm512_dpbf16_ps(acc[r][t], (__m512bh)wv, (__m512bh)xv);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) {
      const float s = _mm512_reduce_add_ps(acc[r][t]);
      out[t * ldo + r] = at::BFloat16(bias ? s + bias[r] : s);
    }
}

using RowsDotBf16 = void (*)(const at::BFloat16*, int64_t, const at::BFloat16*, int64_t,
                             at::BFloat16*, int64_t, const float*);

// rows_dot_bf16 for R rows and T (1..6) tokens.
template <int R>
RowsDotBf16 rows_dot_bf16_for(int64_t T) {
  switch (T) {
    case 1:
      return &rows_dot_bf16<R, 1>;
    case 2:
      return &rows_dot_bf16<R, 2>;
    case 3:
      return &rows_dot_bf16<R, 3>;
    case 4:
      return &rows_dot_bf16<R, 4>;
    case 5:
      return &rows_dot_bf16<R, 5>;
    default:
      return &rows_dot_bf16<R, 6>;
  }
}

// y [M, N] = x W^T (+ bias) for bfloat16 x [M, K] and W [N, K], M at most kDotMaxRows: groups
// of 8 weight rows for one row of x, else groups of 4 in passes of up to 6 tokens (24
// accumulators beside 6 token vectors and a weight vector), a group's later passes reading its
// rows from L1 / L2. Sapphire Rapids at the avx512 level (where `vdpbf16ps` zmm issues at a
// quarter of an FMA's rate, 1.7 G/s per core against 6.6-7.5: half the multiply-adds), 16 layers of
// the 1B shape's weights from DRAM, 2 threads, against oneDNN's packed product limited to
// AVX512-BF16 (ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16): 28.0 / 27.5 / 26.7 / 18.1 / 11.1 / 5.6 / 2.9
// / 1.4 GB/s at 1 / 2 / 4 / 8 / 16 / 32 / 64 / 128 rows against 24.1 / 20.0 / 25.8 / 16.3 / 10.5
// / 5.5 / 2.9 / 1.5 (the unpacked weight in the library's GEMM: 15.7 / 16.6 / 14.1 / 11.8 / 7.9
// / 4.7 / 2.7 / 1.5, which takes more rows here).
void gemm_dot_bf16(const at::BFloat16* x, int64_t M, const at::BFloat16* w, int64_t N, int64_t K,
                   const float* bias, at::BFloat16* out) {
  const int64_t rows = M == 1 ? 8 : 4;
  const std::vector<int64_t> tokens = token_passes(M, M == 1 ? 1 : 6);
  std::vector<RowsDotBf16> grouped, single;
  for (int64_t T : tokens) {
    grouped.push_back(M == 1 ? &rows_dot_bf16<8, 1> : rows_dot_bf16_for<4>(T));
    single.push_back(rows_dot_bf16_for<1>(T));
  }
  run_row_groups(x, w, N, K, bias, out, rows, tokens, grouped, single);
}
#endif

// Whether this build and CPU run gemm_dot_bf16.
bool dot_supported() {
#ifdef TM_DENSE_DOT
  static const bool ok = __builtin_cpu_supports("avx512bf16");
  return ok;
#else
  return false;
#endif
}

// How dense_gemm runs bfloat16 steps of a few rows here (dense_bf16_path).
enum class Bf16Path { kNone, kDot, kTiles };
Bf16Path bf16_path() {
#ifdef TM_DENSE_AMX
  if (amx::permitted()) return Bf16Path::kTiles;
#endif
  return dot_supported() ? Bf16Path::kDot : Bf16Path::kNone;
}

// dense_gemm for bfloat16 x and W: float32 sums, rounded once to bfloat16 with the bias added.
at::Tensor gemm_bf16(const at::Tensor& x, const at::Tensor& w,
                     const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(w.scalar_type() == at::kBFloat16, "dense_gemm: bfloat16 x takes bfloat16 weights");
  const int64_t M = x.size(0);
  const Bf16Path path = bf16_path();
  // the dot products up to kDotMaxRows rows, or where the tiles take the larger steps, up to
  // kStreamMaxRowsBf16
  const int64_t dot_rows = !dot_supported()         ? 0
                           : path == Bf16Path::kDot ? kDotMaxRows
                                                    : kStreamMaxRowsBf16;
  if (M > dot_rows && M <= kStreamMaxRowsBf16)
    return dense_gemm(x.to(at::kFloat), w, bias).to(at::kBFloat16);
#ifdef TM_DENSE_DOT  // every AVX-512 build, the amx one included
  const int64_t N = w.size(0), K = w.size(1);
  const bool dot = M <= dot_rows,
             tiles = path == Bf16Path::kTiles && M <= kTilesMaxRows && N % 16 == 0 && K % 32 == 0;
  if (dot || tiles) {
    at::Tensor bf;  // the bias in float32
    if (bias.has_value()) {
      bf = bias->to(at::kFloat).contiguous();
      TORCH_CHECK(bf.numel() == N, "dense_gemm: bias must have N elements");
    }
    const float* b = bf.defined() ? bf.data_ptr<float>() : nullptr;
    const at::Tensor xc = x.contiguous(), wc = w.contiguous();
    const at::BFloat16 *xp = xc.data_ptr<at::BFloat16>(), *wp = wc.data_ptr<at::BFloat16>();
    at::Tensor out = at::empty({M, N}, x.options());
    at::BFloat16* op = out.data_ptr<at::BFloat16>();
    if (dot && M > 0 && N > 0) gemm_dot_bf16(xp, M, wp, N, K, b, op);
#ifdef TM_DENSE_AMX
    if (!dot) gemm_tiles(wp, N, K, pairs_by_group(xp, M, K).data(), M, b, op);
#endif
    return out;
  }
#endif
  // More rows (prefill), and shapes the tiles do not take: the library's GEMM on the unpacked
  // weight, 0.8-1.0x of oneDNN's packed layout on the 1B shape's linears at 512 rows (blocks of
  // 4 MiB of W's rows ran 0.84-0.96x of this). The bias in x's dtype: the decode loop passes a
  // bfloat16 bias widened, the same values.
  return at::linear(
      x, w, bias.has_value() ? c10::optional<at::Tensor>(bias->to(x.scalar_type())) : c10::nullopt);
}
}  // namespace

std::string dense_bf16_path() {
  switch (bf16_path()) {
    case Bf16Path::kTiles:
      return "tiles";
    case Bf16Path::kDot:
      return "dot";
    default:
      return "";
  }
}

at::Tensor dense_gemm(at::Tensor x, at::Tensor w, c10::optional<at::Tensor> bias) {
  TORCH_CHECK(x.dim() == 2 && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "dense_gemm: x must be [M, K] float32 or bfloat16");
  TORCH_CHECK(w.dim() == 2 && w.size(1) == x.size(1), "dense_gemm: w must be [N, K]");
  if (x.scalar_type() == at::kBFloat16) return gemm_bf16(x, w, bias);
  x = x.contiguous();
  w = w.contiguous();
  const int64_t M = x.size(0), N = w.size(0), K = w.size(1);
  at::Tensor out = at::empty({M, N}, x.options());
  const float* b = nullptr;
  at::Tensor bf;
  if (bias.has_value()) {
    bf = bias->to(at::kFloat).contiguous();
    TORCH_CHECK(bf.numel() == N, "dense_gemm: bias must have N elements");
    b = bf.data_ptr<float>();
  }
  if (M == 0 || N == 0) return out;
  const float* xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();
  if (M > kStreamMaxRows && w.scalar_type() != at::kFloat) {
    if (w.scalar_type() == at::kHalf)
      gemm_widened(x, w.data_ptr<at::Half>(), N, K, out);
    else if (w.scalar_type() == at::kBFloat16)
      gemm_widened(x, w.data_ptr<at::BFloat16>(), N, K, out);
    else
      TORCH_CHECK(false, "dense_gemm: weights must be float32, float16 or bfloat16");
    if (b != nullptr) out.add_(bf);
    return out;
  }
  switch (w.scalar_type()) {
    case at::kFloat:
      gemm(xp, M, w.data_ptr<float>(), N, K, b, op);
      break;
    case at::kHalf:
      gemm(xp, M, w.data_ptr<at::Half>(), N, K, b, op);
      break;
    case at::kBFloat16:
      gemm(xp, M, w.data_ptr<at::BFloat16>(), N, K, b, op);
      break;
    default:
      TORCH_CHECK(false, "dense_gemm: weights must be float32, float16 or bfloat16");
  }
  return out;
}

DenseLinear::DenseLinear(at::Tensor weight, c10::optional<at::Tensor> bias)
    : weight_(std::move(weight)), bias_(std::move(bias)) {
  TORCH_CHECK(weight_.dim() == 2 && weight_.is_contiguous(), "DenseLinear: a contiguous [N, K]");
}

at::Tensor DenseLinear::forward(at::Tensor x) const {
  if (x.size(0) > kStreamMaxRows && weight_.scalar_type() == at::kFloat)
    return at::linear(x, weight_, bias_);
  return dense_gemm(x, weight_, bias_);
}
