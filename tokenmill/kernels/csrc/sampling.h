// A row's argmax, and sampling by the inverse CDF of softmax(row / T), vectorized.
// Part of cpu_ops.cpp's translation unit: included there only.
#pragma once

#include <ATen/core/Tensor.h>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#include <cmath>
#include <limits>

#include "vec_math.h"

namespace {

// The index of the first maximum of row[0:V] (torch.argmax's choice).
template <typename T>
int64_t argmax_row(const T* row, int64_t V) {
  int64_t v0 = 0;
  float best = -std::numeric_limits<float>::infinity();
  int64_t best_i = 0;
#if defined(__AVX512F__)
  if (V >= 16) {
    __m512 mx = load16(row);
    __m512i idx = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    __m512i cur = idx;
    const __m512i step = _mm512_set1_epi32(16);
    for (v0 = 16; v0 + 16 <= V; v0 += 16) {
      cur = _mm512_add_epi32(cur, step);
      const __m512 v = load16(row + v0);
      const __mmask16 gt = _mm512_cmp_ps_mask(v, mx, _CMP_GT_OQ);
      mx = _mm512_mask_mov_ps(mx, gt, v);
      idx = _mm512_mask_mov_epi32(idx, gt, cur);
    }
    alignas(64) float mv[16];
    alignas(64) int32_t iv[16];
    _mm512_store_ps(mv, mx);
    _mm512_store_si512(iv, idx);
    best = mv[0];
    best_i = iv[0];
    for (int l = 1; l < 16; ++l)
      if (mv[l] > best || (mv[l] == best && iv[l] < best_i)) {
        best = mv[l];
        best_i = iv[l];
      }
  }
#endif
  for (int64_t i = v0; i < V; ++i) {
    const float v = tf(row[i]);
    if (v > best || (i == 0)) {
      best = v;
      best_i = i;
    }
  }
  return best_i;
}

// Row-wise argmax (first index of the maximum, as torch.argmax) of x [R, V].
template <typename T>
void argmax_rows_kernel(const T* x, int64_t* out, int64_t R, int64_t V) {
  at::parallel_for(0, R, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) out[r] = argmax_row(x + r * V, V);
  });
}

// ---- Sampling: a row's argmax at temperature 0, else the inverse CDF of softmax(row / T) ----
// Two levels, as sampler.py's inverse_cdf: the masses of blocks of kCdfBlock tokens pick the
// block, then one block's float64 cumulative sum picks the token. The terms exp(x / T - max) are
// not normalized (the target is u x their total) and those with an exponent below kExpFloor are
// 0: a masked (-inf) token exactly, any other below float's normal range (< 1.2e-38 of the most
// likely token's probability).
constexpr int64_t kCdfBlock = 256;
constexpr float kExpFloor = -87.f;

#if defined(__AVX512F__)
constexpr int kSampleLanes = 16;
using SampleVec = __m512;
inline SampleVec sample_set1(float v) { return _mm512_set1_ps(v); }
inline SampleVec sample_load(const float* p) { return _mm512_loadu_ps(p); }
inline void sample_store(float* p, SampleVec v) { _mm512_storeu_ps(p, v); }
inline SampleVec sample_add(SampleVec a, SampleVec b) { return _mm512_add_ps(a, b); }
inline SampleVec sample_max(SampleVec a, SampleVec b) { return _mm512_max_ps(a, b); }
inline float sample_hsum(SampleVec v) { return _mm512_reduce_add_ps(v); }
inline float sample_hmax(SampleVec v) { return _mm512_reduce_max_ps(v); }
// exp(x / t - m) per lane, 0 where the exponent is below kExpFloor (or NaN)
inline SampleVec softmax_terms(SampleVec x, SampleVec t, SampleVec m) {
  const __m512 e = _mm512_sub_ps(_mm512_div_ps(x, t), m);
  const __mmask16 keep = _mm512_cmp_ps_mask(e, _mm512_set1_ps(kExpFloor), _CMP_GE_OQ);
  return _mm512_maskz_mov_ps(keep, vec_math::exp512(e));
}
#else
constexpr int kSampleLanes = 8;
using SampleVec = __m256;
inline SampleVec sample_set1(float v) { return _mm256_set1_ps(v); }
inline SampleVec sample_load(const float* p) { return _mm256_loadu_ps(p); }
inline void sample_store(float* p, SampleVec v) { _mm256_storeu_ps(p, v); }
inline SampleVec sample_add(SampleVec a, SampleVec b) { return _mm256_add_ps(a, b); }
inline SampleVec sample_max(SampleVec a, SampleVec b) { return _mm256_max_ps(a, b); }
inline float sample_hsum(SampleVec v) { return vec_math::hsum8(v); }
inline float sample_hmax(SampleVec v) { return vec_math::hmax8(v); }
inline SampleVec softmax_terms(SampleVec x, SampleVec t, SampleVec m) {
  const __m256 e = _mm256_sub_ps(_mm256_div_ps(x, t), m);
  const __m256 keep = _mm256_cmp_ps(e, _mm256_set1_ps(kExpFloor), _CMP_GE_OQ);
  return _mm256_and_ps(keep, vec_math::exp256(e));
}
#endif

// x[0:n] (n <= kSampleLanes) in a vector, padded with -inf (a term of 0, never a maximum).
inline SampleVec sample_load_tail(const float* x, int64_t n) {
  float pad[kSampleLanes];
  std::fill(pad, pad + kSampleLanes, -std::numeric_limits<float>::infinity());
  std::memcpy(pad, x, n * sizeof(float));
  return sample_load(pad);
}

inline float row_max(const float* x, int64_t V) {
  SampleVec mx = sample_set1(-std::numeric_limits<float>::infinity());
  int64_t i = 0;
  for (; i + kSampleLanes <= V; i += kSampleLanes) mx = sample_max(mx, sample_load(x + i));
  if (i < V) mx = sample_max(mx, sample_load_tail(x + i, V - i));
  return sample_hmax(mx);
}

// The terms of x[0:n] (n <= kCdfBlock) into p (when not null); returns their float sum.
inline float block_terms(const float* x, int64_t n, float t, float m, float* p) {
  const SampleVec tv = sample_set1(t), mv = sample_set1(m);
  SampleVec acc = sample_set1(0.f);
  int64_t i = 0;
  for (; i + kSampleLanes <= n; i += kSampleLanes) {
    const SampleVec e = softmax_terms(sample_load(x + i), tv, mv);
    if (p != nullptr) sample_store(p + i, e);
    acc = sample_add(acc, e);
  }
  if (i < n) {
    const SampleVec e = softmax_terms(sample_load_tail(x + i, n - i), tv, mv);
    if (p != nullptr) {
      float tail[kSampleLanes];
      sample_store(tail, e);
      std::memcpy(p + i, tail, (n - i) * sizeof(float));
    }
    acc = sample_add(acc, e);
  }
  return sample_hsum(acc);
}

// In a non-decreasing c[0:n], the first index whose value exceeds target, capped at the first
// index that holds the total (the last one that adds mass: rounding can put the target at or
// past the total).
inline int64_t first_above(const double* c, int64_t n, double target) {
  const int64_t first = std::upper_bound(c, c + n, target) - c;
  const int64_t last = std::lower_bound(c, c + n, c[n - 1]) - c;
  return std::min(first, last);
}

int64_t sample_row(const float* x, int64_t V, float t, double u) {
  if (!(t > 0.f)) return argmax_row(x, V);
  const float mx = row_max(x, V);
  // Every token masked: nothing to sample from. (A bit test: -ffast-math lets the compiler
  // assume a comparison with -inf false.)
  uint32_t mx_bits;
  std::memcpy(&mx_bits, &mx, sizeof(mx_bits));
  if (mx_bits == 0xFF800000u) return argmax_row(x, V);
  const float m = mx / t;  // = max(x / t): the division is monotonic and correctly rounded
  const int64_t nb = (V + kCdfBlock - 1) / kCdfBlock;
  std::vector<double> cdf(nb + 1, 0.0);  // cdf[b]: the mass of the blocks before block b
  for (int64_t b = 0; b < nb; ++b)
    cdf[b + 1] = cdf[b] + block_terms(x + b * kCdfBlock, std::min(kCdfBlock, V - b * kCdfBlock), t,
                                      m, nullptr);
  const double target = u * cdf[nb];
  const int64_t b = std::max<int64_t>(first_above(cdf.data(), nb + 1, target) - 1, 0);
  const int64_t n = std::min(kCdfBlock, V - b * kCdfBlock);
  float p[kCdfBlock];
  block_terms(x + b * kCdfBlock, n, t, m, p);
  double inner[kCdfBlock];
  double sum = 0.0;
  for (int64_t i = 0; i < n; ++i) inner[i] = sum += p[i];
  return b * kCdfBlock + first_above(inner, n, target - cdf[b]);
}

}  // namespace
