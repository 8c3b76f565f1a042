// Scalar and vector helpers shared by the fused-op kernels (cpu_ops.cpp) and the prefill
// attention (prefill_attention.cpp): bfloat16 and float16 <-> float, loads and stores of each as
// 8- (16-, AVX-512 builds) float vectors, exp for softmax, and SiLU * mul. Every kernel build has
// AVX2 + FMA + F16C (AVX-512 builds too); float16 is a KV cache's type only (`--kv-cache-dtype`).
#pragma once
#include <ATen/core/Tensor.h>
#include <immintrin.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace vec_math {

// Conversions through plain bit operations so the compiler can vectorize them (c10's BFloat16
// conversions are branchy). Stores round to nearest even, like c10.
inline float tf(float x) { return x; }
inline float tf(at::BFloat16 x) {
  uint32_t bits = static_cast<uint32_t>(x.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}
#if defined(__F16C__)
// float16 through F16C, rounding to nearest even (as torch's conversion).
inline float tf(at::Half x) { return _cvtsh_ss(x.x); }
#endif
template <typename T>
inline T from_f(float f);
template <>
inline float from_f<float>(float f) {
  return f;
}
template <>
inline at::BFloat16 from_f<at::BFloat16>(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  bits += 0x7FFFu + ((bits >> 16) & 1u);
  return at::BFloat16(static_cast<uint16_t>(bits >> 16), at::BFloat16::from_bits());
}
#if defined(__F16C__)
template <>
inline at::Half from_f<at::Half>(float f) {
  return at::Half(_cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT), at::Half::from_bits());
}
#endif

#if defined(__AVX2__) && defined(__FMA__)
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const at::BFloat16* p) {
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
}
inline __m256 load8(const at::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline void store8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
inline void store8(at::Half* p, __m256 v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
}
inline void store8(at::BFloat16* p, __m256 v) {  // from_f's rounding, 8 at a time
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i r = _mm256_srli_epi32(
      _mm256_add_epi32(bits, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF))), 16);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                   _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1)));
}

// exp(x) for x <= 0: x = n ln2 + r with |r| <= ln2 / 2, a degree-7 Taylor polynomial in r
// (relative error ~1e-7), times 2^n built in the exponent bits. Inputs below -87 give
// exp(-87) ~ 2e-38 instead of a smaller number or 0, nothing next to a softmax's max term of 1.
inline __m256 exp256(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145751953125f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428606765330187045e-06f), r);
  __m256 p = _mm256_set1_ps(1.f / 5040);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 720));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 120));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 24));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 6));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
  const __m256i e =
      _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

inline float hmax8(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}
#endif

#if defined(__AVX512F__)
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const at::BFloat16* p) {
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}
inline __m512 load16(const at::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
inline void store16(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
inline void store16(at::Half* p, __m512 v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
}
inline void store16(at::BFloat16* p, __m512 v) {
  // Round to nearest even, as from_f<BFloat16> does.
  __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  bits = _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                      _mm512_cvtepi32_epi16(_mm512_srli_epi32(bits, 16)));
}

// exp(x) for x <= 0 (softmax inputs after subtracting the max): range reduction to
// r in [-ln2/2, ln2/2] and a degree-7 Taylor polynomial (relative error ~1e-7).
inline __m512 exp512(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-104.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187045e-06f), r);
  __m512 p = _mm512_set1_ps(1.f / 5040);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 720));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}
#endif

// ---- SiLU * mul: out = T(T(silu(g)) * u), what a SiLU then a product in T would give ----
// silu(x) = x * sigmoid(x), with e = exp(-|x|) (the exp kernels' range, so no overflow: the
// scalar x / (1 + exp(-x)) that GCC vectorized before under -ffast-math gave NaN for x <= -89)
// and sigmoid = 1 / (1 + e) for x >= 0, e / (1 + e) below; 1 / (1 + e) is the reciprocal
// estimate refined by one Newton step (relative error ~1e-7 from AVX-512's 14-bit estimate,
// ~1e-6 from AVX2's 12-bit one). A division ran at 0.5x the old loop's speed; this at 1.09x on
// float32 and 1.0x on bfloat16 ([32, 8192] outputs, avx512 level).
#if defined(__AVX512F__)
// The SiLU's vector: 16 floats on AVX-512 builds, 8 on AVX2 ones.
using VecF = __m512;
constexpr int kSiluLanes = 16;
template <typename T>
inline VecF loadv(const T* p) {
  return load16(p);
}
template <typename T>
inline void storev(T* p, VecF v) {
  store16(p, v);
}
// v rounded to T's values (bfloat16: nearest even, as store16 rounds), as floats.
template <typename T>
inline VecF round_to(VecF v) {
  if constexpr (std::is_same_v<T, float>) return v;
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  return _mm512_castsi512_ps(
      _mm512_and_si512(_mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF))),
                       _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
}
// silu(g) rounded to T, times u (g and u: values of T), before the store's rounding to T.
template <typename T>
inline VecF silu_mul_value(VecF g, VecF u) {
  const __m512 one = _mm512_set1_ps(1.f);
  const __m512 e = exp512(_mm512_castsi512_ps(  // exp(-|g|)
      _mm512_or_si512(_mm512_castps_si512(g), _mm512_set1_epi32(static_cast<int>(0x80000000u)))));
  const __m512 d = _mm512_add_ps(one, e);
  __m512 r = _mm512_rcp14_ps(d);
  r = _mm512_fmadd_ps(r, _mm512_fnmadd_ps(d, r, one), r);
  const __mmask16 neg = _mm512_cmp_ps_mask(g, _mm512_setzero_ps(), _CMP_LT_OQ);
  const __m512 s = _mm512_mul_ps(g, _mm512_mul_ps(_mm512_mask_blend_ps(neg, one, e), r));
  return _mm512_mul_ps(round_to<T>(s), u);
}
#elif defined(__AVX2__) && defined(__FMA__)
using VecF = __m256;
constexpr int kSiluLanes = 8;
template <typename T>
inline VecF loadv(const T* p) {
  return load8(p);
}
template <typename T>
inline void storev(T* p, VecF v) {
  store8(p, v);
}
template <typename T>
inline VecF round_to(VecF v) {
  if constexpr (std::is_same_v<T, float>) return v;
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  return _mm256_castsi256_ps(
      _mm256_and_si256(_mm256_add_epi32(bits, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF))),
                       _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
}
template <typename T>
inline VecF silu_mul_value(VecF g, VecF u) {
  const __m256 one = _mm256_set1_ps(1.f);
  const __m256 e = exp256(_mm256_or_ps(g, _mm256_set1_ps(-0.f)));  // exp(-|g|)
  const __m256 d = _mm256_add_ps(one, e);
  __m256 r = _mm256_rcp_ps(d);
  r = _mm256_fmadd_ps(r, _mm256_fnmadd_ps(d, r, one), r);
  const __m256 s = _mm256_mul_ps(g, _mm256_mul_ps(_mm256_blendv_ps(one, e, g), r));
  return _mm256_mul_ps(round_to<T>(s), u);
}
#endif

#if defined(__AVX2__) && defined(__FMA__)
// out[0:n] = T(T(silu(g)) * u), kSiluLanes at a time; a last partial group goes through a padded
// copy, so every value takes the same operations wherever it sits.
template <typename T>
inline void silu_mul_row(const T* g, const T* u, T* out, int64_t n) {
  int64_t i = 0;
  for (; i + kSiluLanes <= n; i += kSiluLanes)
    storev(out + i, silu_mul_value<T>(loadv(g + i), loadv(u + i)));
  if (i == n) return;
  T gp[kSiluLanes] = {}, up[kSiluLanes] = {}, op[kSiluLanes];
  std::memcpy(gp, g + i, (n - i) * sizeof(T));
  std::memcpy(up, u + i, (n - i) * sizeof(T));
  storev(op, silu_mul_value<T>(loadv(gp), loadv(up)));
  std::memcpy(out + i, op, (n - i) * sizeof(T));
}
#endif

}  // namespace vec_math
