// The 64-byte vector of a 16-row tile (V64: one zmm on AVX-512, two ymm on AVX2) and its 16
// floats (F16): the types every quantized kernel computes in.
// Part of quant_gemm.cpp's translation unit: included there only, in order.
#pragma once

#include "quant_common.h"

namespace {

#if defined(TM_AVX512) || defined(TM_AVX2)

#ifdef TM_AVX512
struct V64 {
  __m512i v;
  static V64 load(const void* p) { return {_mm512_loadu_si512(p)}; }
  void store(void* p) const { _mm512_storeu_si512(p, v); }
  static V64 set1(uint8_t c) { return {_mm512_set1_epi8(static_cast<char>(c))}; }
  V64 operator&(V64 o) const { return {_mm512_and_si512(v, o.v)}; }
  V64 operator|(V64 o) const { return {_mm512_or_si512(v, o.v)}; }
  V64 operator^(V64 o) const { return {_mm512_xor_si512(v, o.v)}; }
  V64 srl16(int n) const { return {_mm512_srli_epi16(v, n)}; }
  V64 sll16(int n) const { return {_mm512_slli_epi16(v, n)}; }
  // byte i = table[byte i & 15] (bytes 0..15)
  V64 lookup(const V64& table) const { return {_mm512_shuffle_epi8(table.v, v)}; }
  static V64 table16(const int8_t* t) {
    return {_mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(t)))};
  }
  // byte i = val where bit i of bits is set, else 0
  static V64 from_bits(uint64_t bits, uint8_t val) {
    return {_mm512_maskz_mov_epi8(bits, _mm512_set1_epi8(static_cast<char>(val)))};
  }
};
struct F16 {  // 16 floats, one per row of a tile
  __m512 v;
  static F16 load(const float* p) { return {_mm512_loadu_ps(p)}; }
  static F16 half(const void* p) {
    return {_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)))};
  }
  static F16 u8(const uint8_t* p) {
    return {_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)p)))};
  }
  // the low (shift 0) or high (shift 4) nibbles of 16 bytes
  static F16 u4(const uint8_t* p, int shift) {
    const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)p));
    return {
        _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srli_epi32(b, shift), _mm512_set1_epi32(0xF)))};
  }
  static F16 i8(const int8_t* p) {
    return {_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)))};
  }
  static F16 set1(float f) { return {_mm512_set1_ps(f)}; }
  static F16 zero() { return {_mm512_setzero_ps()}; }
  void store(float* p) const { _mm512_storeu_ps(p, v); }
  F16 operator*(F16 o) const { return {_mm512_mul_ps(v, o.v)}; }
  F16 operator+(F16 o) const { return {_mm512_add_ps(v, o.v)}; }
  static F16 fma(F16 a, F16 b, F16 c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }
};
#else
struct V64 {
  __m256i a, b;
  static V64 load(const void* p) {
    auto q = reinterpret_cast<const __m256i*>(p);
    return {_mm256_loadu_si256(q), _mm256_loadu_si256(q + 1)};
  }
  void store(void* p) const {
    auto q = reinterpret_cast<__m256i*>(p);
    _mm256_storeu_si256(q, a);
    _mm256_storeu_si256(q + 1, b);
  }
  static V64 set1(uint8_t c) {
    const __m256i v = _mm256_set1_epi8(static_cast<char>(c));
    return {v, v};
  }
  V64 operator&(V64 o) const { return {_mm256_and_si256(a, o.a), _mm256_and_si256(b, o.b)}; }
  V64 operator|(V64 o) const { return {_mm256_or_si256(a, o.a), _mm256_or_si256(b, o.b)}; }
  V64 operator^(V64 o) const { return {_mm256_xor_si256(a, o.a), _mm256_xor_si256(b, o.b)}; }
  V64 srl16(int n) const { return {_mm256_srli_epi16(a, n), _mm256_srli_epi16(b, n)}; }
  V64 sll16(int n) const { return {_mm256_slli_epi16(a, n), _mm256_slli_epi16(b, n)}; }
  V64 lookup(const V64& table) const {
    return {_mm256_shuffle_epi8(table.a, a), _mm256_shuffle_epi8(table.b, b)};
  }
  static V64 table16(const int8_t* t) {
    const __m256i v =
        _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(t)));
    return {v, v};
  }
  static __m256i bits32(uint32_t bits, uint8_t val) {
    // byte i takes bit i: spread byte i/8 of `bits` over 8 lanes, test one bit per lane.
    const __m256i spread = _mm256_shuffle_epi8(
        _mm256_set1_epi32(static_cast<int>(bits)),
        _mm256_setr_epi64x(0, 0x0101010101010101LL, 0x0202020202020202LL, 0x0303030303030303LL));
    const __m256i bit = _mm256_set1_epi64x(static_cast<long long>(0x8040201008040201ULL));
    const __m256i on = _mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit);
    return _mm256_and_si256(on, _mm256_set1_epi8(static_cast<char>(val)));
  }
  static V64 from_bits(uint64_t bits, uint8_t val) {
    return {bits32(static_cast<uint32_t>(bits), val),
            bits32(static_cast<uint32_t>(bits >> 32), val)};
  }
};
struct F16 {
  __m256 a, b;
  static F16 load(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
  static F16 half(const void* p) {
    auto q = reinterpret_cast<const __m128i*>(p);
    return {_mm256_cvtph_ps(_mm_loadu_si128(q)), _mm256_cvtph_ps(_mm_loadu_si128(q + 1))};
  }
  static F16 u8(const uint8_t* p) {
    return {_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)p))),
            _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(p + 8))))};
  }
  static F16 u4(const uint8_t* p, int shift) {
    const __m256i m = _mm256_set1_epi32(0xF);
    const auto half = [&](const uint8_t* q) {
      const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)q));
      return _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(b, shift), m));
    };
    return {half(p), half(p + 8)};
  }
  static F16 i8(const int8_t* p) {
    return {_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p))),
            _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(p + 8))))};
  }
  static F16 set1(float f) { return {_mm256_set1_ps(f), _mm256_set1_ps(f)}; }
  static F16 zero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
  void store(float* p) const {
    _mm256_storeu_ps(p, a);
    _mm256_storeu_ps(p + 8, b);
  }
  F16 operator*(F16 o) const { return {_mm256_mul_ps(a, o.a), _mm256_mul_ps(b, o.b)}; }
  F16 operator+(F16 o) const { return {_mm256_add_ps(a, o.a), _mm256_add_ps(b, o.b)}; }
  static F16 fma(F16 x, F16 y, F16 z) {
    return {_mm256_fmadd_ps(x.a, y.a, z.a), _mm256_fmadd_ps(x.b, y.b, z.b)};
  }
};
#endif

#endif  // TM_AVX512 || TM_AVX2

}  // namespace
