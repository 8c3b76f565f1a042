// Dense steps in float32 FMAs: rows of W streamed once, several side by side, against every
// row of x (rows_dot), the passes and row groups every dense kernel shares, and 16-bit
// weights widened in L2 blocks for the library's GEMM (gemm_widened).
// Part of dense_gemm.cpp's translation unit: included there only.
#pragma once

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

}  // namespace
