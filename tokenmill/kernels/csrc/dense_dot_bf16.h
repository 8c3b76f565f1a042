// bfloat16 steps by AVX512-BF16 dot products on W and x as they lie (gemm_dot_bf16).
// Part of dense_gemm.cpp's translation unit: included there only.
#pragma once

#include "dense_stream.h"

namespace {

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

}  // namespace
