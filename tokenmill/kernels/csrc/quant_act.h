// Activation quantization: each token's inputs to 8-bit blocks of 32 with their scales and
// half sums (ActMeta), the layout every quantized kernel reads.
// Part of quant_gemm.cpp's translation unit: included there only, in order.
#pragma once

#include "quant_common.h"

namespace {

// Per block of 32: amax = max |x|, d = amax * (1 / 127), q = round-to-nearest-even(x * (127 /
// amax)) (0 for an all-zero block), and the sums of q over each half, in 8-float vectors (every
// kernel level has AVX2), with the float operations in that order: the bytes of
// tests/test_quant_kernels.py's scalar reference.
inline int32_t hsum_epi32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  return _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1)));
}

// Quantizes one token's K inputs: put(b, bytes, meta, lo, hi) for each block b, with its 32
// bytes, metadata and the integer sums of its halves. Where zmask (one word per block, or null)
// has bit j of word b set, input b * 32 + j reads as 0.
template <typename T, typename Put>
inline void quantize_blocks(const T* x, int64_t K, const uint32_t* zmask, Put&& put) {
  for (int64_t b = 0; b < K / 32; ++b) {
    __m256 v[4];
    for (int i = 0; i < 4; ++i) v[i] = vec_math::load8(x + b * 32 + i * 8);
    if (zmask && zmask[b]) {  // the block's channels read as 0: input b * 32 + j where bit j is set
      const __m256i lane = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
      for (int i = 0; i < 4; ++i) {
        const __m256i bits = _mm256_set1_epi32(static_cast<int>((zmask[b] >> (8 * i)) & 0xFF));
        const __m256i hit = _mm256_cmpeq_epi32(_mm256_and_si256(bits, lane), lane);
        v[i] = _mm256_andnot_ps(_mm256_castsi256_ps(hit), v[i]);
      }
    }
    const __m256 sign = _mm256_set1_ps(-0.f);
    const __m256 m01 = _mm256_max_ps(_mm256_andnot_ps(sign, v[0]), _mm256_andnot_ps(sign, v[1]));
    const __m256 m23 = _mm256_max_ps(_mm256_andnot_ps(sign, v[2]), _mm256_andnot_ps(sign, v[3]));
    const float amax = vec_math::hmax8(_mm256_max_ps(m01, m23));
    const float d = amax * (1.f / 127.f);  // a product: -ffast-math cannot reorder it
    const float id = amax > 0.f ? 127.f / amax : 0.f;
    __m256i qi[4];  // the products rounded to nearest even (the default MXCSR mode)
    for (int i = 0; i < 4; ++i) qi[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], _mm256_set1_ps(id)));
    // two packs keep 128-bit lanes apart: dwords come out as q0[0:4] q1[0:4] q2[0:4] q3[0:4]
    // q0[4:8] q1[4:8] q2[4:8] q3[4:8]
    const __m256i p =
        _mm256_packs_epi16(_mm256_packs_epi32(qi[0], qi[1]), _mm256_packs_epi32(qi[2], qi[3]));
    const int slo = hsum_epi32(_mm256_add_epi32(qi[0], qi[1]));
    const int shi = hsum_epi32(_mm256_add_epi32(qi[2], qi[3]));
    put(b, _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)),
        ActMeta{d, d * static_cast<float>(slo + shi), d * static_cast<float>(slo),
                d * static_cast<float>(shi)},
        slo, shi);
  }
}

// Quantizes the M tokens of x [M, K], threads over tokens (at least `grain` each), with input
// channels `zero` (sorted, distinct) read as 0: put(m, b, bytes, meta, lo, hi) for each block.
template <typename T, typename Put>
void quantize_tokens(const T* x, int64_t M, int64_t K, const std::vector<int64_t>& zero,
                     int64_t grain, Put&& put) {
  std::vector<uint32_t> zmask(zero.empty() ? 0 : K / 32, 0u);
  for (int64_t c : zero) zmask[c / 32] |= 1u << (c % 32);
  at::parallel_for(0, M, grain, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m)
      quantize_blocks(x + m * K, K, zmask.empty() ? nullptr : zmask.data(),
                      [&](int64_t b, __m256i bytes, const ActMeta& mt, int lo, int hi) {
                        put(m, b, bytes, mt, lo, hi);
                      });
  });
}

}  // namespace
