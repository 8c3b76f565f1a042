// Unpacking a repacked weight block: the eight 64-byte vectors U[t] of a 16-row tile's 32 inputs
// and its per-row scales and offsets (see quant_gemm.cpp and quant/gguf_pack.py), per GGUF type.
// Part of quant_gemm.cpp's translation unit: included there only, in order.
#pragma once

#include "quant_vec.h"

namespace {

#if defined(TM_AVX512) || defined(TM_AVX2)

// One unpacked 32-input block of a 16-row tile: U[8] (see quant_gemm.cpp's header), scales and
// offsets per row. Split types (Q2_K, Q3_K, Q6_K) have (s0, o0) for inputs 0..15 and (s1, o1)
// for 16..31.
struct alignas(64) Block {
  uint8_t u[8][64];
  float s0[16], o0[16], s1[16], o1[16];
};

// The codebook types: a weight is its block's scale times the type's codebook value at its 4-bit
// index: IQ4_NL / IQ4_XS (ggml's kvalues_iq4nl), and the lattice types, repacked (gguf_pack.py:
// a grid magnitude i at index h + i, its negative at h - 1 - i; h = 4 for the 6-value types,
// whose 3-bit indices are laid out as Q3_K's bits), whose scale is d * kFactor * sc.
template <int64_t Q>
constexpr bool kCodebookType = Q == IQ4_NL || Q == IQ4_XS || lattice(Q);
template <int64_t Q>
struct Codebook {
  int8_t v[16];
  constexpr Codebook() : v() {
    constexpr int8_t iq4[16] = {-127, -104, -83, -65, -49, -35, -22, -10,
                                1,    13,   25,  38,  53,  69,  89,  113};
    constexpr int8_t iq1[3] = {1, 7, 9}, iq2[3] = {8, 25, 43};
    constexpr int8_t iq3xxs[8] = {4, 12, 20, 28, 36, 44, 52, 62};
    constexpr int8_t iq3s[8] = {1, 3, 5, 7, 9, 11, 13, 15};
    const int8_t* mag = Q == IQ1_S || Q == IQ1_M ? iq1
                        : Q == IQ3_XXS           ? iq3xxs
                        : Q == IQ3_S             ? iq3s
                                                 : iq2;
    const int levels = lattice3(Q) ? 3 : 8, h = lattice3(Q) ? 4 : 8;
    for (int i = 0; i < 16; ++i) v[i] = lattice(Q) ? 0 : iq4[i];
    if (lattice(Q))
      for (int i = 0; i < levels; ++i) {
        v[h + i] = mag[i];
        v[h - 1 - i] = static_cast<int8_t>(-mag[i]);
      }
  }
};
template <int64_t Q>
constexpr Codebook<Q> kCodebook;
// The power of two in a lattice type's scale d * kFactor * sc (1 for the others).
template <int64_t Q>
constexpr float kFactor = Q == IQ3_XXS                ? 0.25f
                          : Q == IQ3_S || !lattice(Q) ? 1.f
                                                      : 0.125f;

// Whether U holds signed bytes (AVX2 Q8_0 and codebook types: sign trick instead of an offset;
// with `vpdpbusd` the offset of 128 costs less than two sign operations per step).
template <int64_t Q>
constexpr bool kSignedU =
#if defined(TM_AVX512) || defined(TM_AVXVNNI)
    false;
#else
    Q == Q8_0 || kCodebookType<Q>;
#endif

// On AVX-512, types whose offset is an integer multiple of the scale (w = s * (u - c)) start each
// token's integer sum at -c * sum(q) (its chain start) instead of paying a float FMA for the
// offset: the exact integer sum of (u - c) * q, on every path. AVX2 applies every offset in float.
#ifdef TM_AVX512
constexpr bool kChainStarts = true;
#else
constexpr bool kChainStarts = false;
#endif

// The integer offset c of a symmetric type's unsigned weights (0: the offset is a float min, or
// the weights are signed bytes).
template <int64_t Q>
constexpr int32_t kIntOffset = kSignedU<Q>                     ? 0
                               : Q == Q8_0 || kCodebookType<Q> ? 128
                               : Q == Q4_0                     ? 8
                               : Q == Q5_0                     ? 16
                               : Q == Q3_K                     ? 4
                               : Q == Q6_K                     ? 32
                                                               : 0;

// U of a codebook type: the codebook, signed (AVX2) or + 128 as unsigned bytes (offset 128).
template <int64_t Q>
struct CodebookBytes {
  alignas(16) int8_t v[16];
  constexpr CodebookBytes() : v() {
    for (int i = 0; i < 16; ++i)
      v[i] = static_cast<int8_t>(kSignedU<Q> ? kCodebook<Q>.v[i] : kCodebook<Q>.v[i] ^ -128);
  }
};
template <int64_t Q>
constexpr CodebookBytes<Q> kCodebookBytes;
template <int64_t Q>
constexpr bool kSplit = Q == Q2_K || Q == Q3_K || Q == Q6_K || lattice_split(Q);

// Block b's scales and offsets per row, in registers (see Block): s(part), o(part).
struct Scales {
  F16 s0, o0, s1, o1;
  F16 s(int part) const { return part ? s1 : s0; }
  F16 o(int part) const { return part ? o1 : o0; }
};

// Where block b (0..7 for K types, 0 for legacy) of unit `src` keeps its low 4 bits (256
// bytes: byte c * 64 + r * 4 + i holds inputs 4c + i (low nibble) and 4c + 16 + i (high) of row
// r) and its fifth bits (Q5 types: eight 64-bit masks, bit r * 4 + i of mask t = input 4t + i).
template <int64_t Q>
inline const uint8_t* nibble_base(const uint8_t* src, int b) {
  if constexpr (Q == Q4_0 || Q == IQ4_NL) return src + 32;
  if constexpr (Q == IQ4_XS || Q == IQ3_XXS || Q == IQ3_S) return src + 160 + b * 256;
  if constexpr (Q == Q4_1) return src + 64;
  if constexpr (Q == Q5_0) return src + 96;
  if constexpr (Q == Q5_1) return src + 128;
  if constexpr (Q == Q4_K) return src + 320 + b * 256;
  if constexpr (Q == Q5_K) return src + 832 + b * 256;
  if constexpr (Q == Q6_K) return src + 288 + b * 256;
  return nullptr;
}
template <int64_t Q>
inline const uint8_t* high_bit_base(const uint8_t* src, int b) {
  if constexpr (Q == Q5_0) return src + 32;
  if constexpr (Q == Q5_1) return src + 64;
  if constexpr (Q == Q5_K) return src + 320 + b * 64;
  if constexpr (Q == Q3_K) return src + 1312 + b * 64;  // H3: masks of bit 2
  if constexpr (lattice3(Q)) return src + (lattice_split(Q) ? 1312 : 1184) + b * 64;
  return nullptr;
}
// Where block b of a Q2_K / Q3_K unit keeps its bit pairs (L2, 128 bytes) and of a Q6_K unit its
// 5th-6th bits (H6): byte x of vector h, bits 2i..2i+1 = those bits of U[4h + i][x].
template <int64_t Q>
inline const uint8_t* pair_base(const uint8_t* src, int b) {
  if constexpr (Q == Q2_K) return src + 320 + b * 128;
  if constexpr (Q == Q3_K) return src + 288 + b * 128;
  if constexpr (lattice3(Q)) return src + (lattice_split(Q) ? 288 : 160) + b * 128;
  if constexpr (Q == Q6_K) return src + 2336 + b * 128;
  return nullptr;
}

template <int64_t Q>
inline Scales block_scales(const uint8_t* src, int b) {
  if constexpr (lattice_split(Q)) {
    // per 16 inputs d * kFactor * sc; offsets -128 * s for U + 128
    const F16 d = F16::half(src) * F16::set1(kFactor<Q>);
    const F16 s0 = d * F16::i8(reinterpret_cast<const int8_t*>(src + 32 + 2 * b * 16));
    const F16 s1 = d * F16::i8(reinterpret_cast<const int8_t*>(src + 32 + (2 * b + 1) * 16));
    const F16 c = F16::set1(kSignedU<Q> ? 0.f : -128.f);
    return {s0, s0 * c, s1, s1 * c};
  } else if constexpr (kCodebookType<Q>) {
    // per 32 inputs d (IQ4_NL) or d (times kFactor) times an int8 scale (IQ4_XS, lattice
    // types); offset -128 * s for U + 128
    const F16 d = kFactor<Q> == 1.f ? F16::half(src) : F16::half(src) * F16::set1(kFactor<Q>);
    const F16 s = Q == IQ4_NL ? d : d * F16::i8(reinterpret_cast<const int8_t*>(src + 32 + b * 16));
    return {s, kSignedU<Q> ? F16::zero() : s * F16::set1(-128.f), F16::zero(), F16::zero()};
  } else if constexpr (Q == Q4_0 || Q == Q4_1 || Q == Q5_0 || Q == Q5_1) {
    const F16 d = F16::half(src);
    const bool has_m = Q == Q4_1 || Q == Q5_1;
    return {d, has_m ? F16::half(src + 32) : d * F16::set1(Q == Q4_0 ? -8.f : -16.f), F16::zero(),
            F16::zero()};
  } else if constexpr (Q == Q8_0) {
    const F16 d = F16::half(src);
    return {d, kSignedU<Q> ? F16::zero() : d * F16::set1(-128.f), F16::zero(), F16::zero()};
  } else if constexpr (Q == Q2_K) {
    // per 16 inputs a byte: the scale in its low nibble, the min in its high one
    const F16 d = F16::half(src), ndmin = F16::half(src + 32) * F16::set1(-1.f);
    const uint8_t* sm = src + 64 + 2 * b * 16;
    return {d * F16::u4(sm, 0), ndmin * F16::u4(sm, 4), d * F16::u4(sm + 16, 0),
            ndmin * F16::u4(sm + 16, 4)};
  } else if constexpr (Q == Q4_K || Q == Q5_K) {
    const F16 d = F16::half(src), dmin = F16::half(src + 32);
    return {d * F16::u8(src + 64 + b * 16), dmin * F16::u8(src + 192 + b * 16) * F16::set1(-1.f),
            F16::zero(), F16::zero()};
  } else {
    static_assert(kSplit<Q>, "unknown type");
    const F16 d = F16::half(src), c = F16::set1(-static_cast<float>(Q == Q3_K ? 4 : 32));
    const F16 s0 = d * F16::i8(reinterpret_cast<const int8_t*>(src + 32 + 2 * b * 16));
    const F16 s1 = d * F16::i8(reinterpret_cast<const int8_t*>(src + 32 + (2 * b + 1) * 16));
    return {s0, s0 * c, s1, s1 * c};
  }
}

// Unpacks block b of unit `src` into `out`.
template <int64_t Q>
inline void unpack_block(const uint8_t* src, int b, Block& out) {
  const Scales sc = block_scales<Q>(src, b);
  sc.s0.store(out.s0);
  sc.o0.store(out.o0);
  if constexpr (kSplit<Q>) {
    sc.s1.store(out.s1);
    sc.o1.store(out.o1);
  }
  if constexpr (Q == Q8_0) {
    if constexpr (kSignedU<Q>) {
      std::memcpy(out.u, src + 32, 512);
    } else {
      const V64 flip = V64::set1(0x80);
      for (int t = 0; t < 8; ++t) (V64::load(src + 32 + t * 64) ^ flip).store(out.u[t]);
    }
    return;
  }
  if constexpr (Q == Q2_K || Q == Q3_K || lattice3(Q)) {
    const V64 lo2 = V64::set1(0x03);
    [[maybe_unused]] const V64 table = V64::table16(kCodebookBytes<Q>.v);  // lattice types
    const uint8_t* P = pair_base<Q>(src, b);
    for (int h = 0; h < 2; ++h) {
      const V64 p = V64::load(P + h * 64);
      for (int i = 0; i < 4; ++i) {
        V64 u = (i ? p.srl16(2 * i) : p) & lo2;
        if constexpr (Q != Q2_K) {
          uint64_t m;
          std::memcpy(&m, high_bit_base<Q>(src, b) + (4 * h + i) * 8, 8);
          u = u | V64::from_bits(m, 0x04);
        }
        if constexpr (kCodebookType<Q>) u = u.lookup(table);
        u.store(out.u[4 * h + i]);
      }
    }
    return;
  }
  const V64 lo4 = V64::set1(0x0F);
  const uint8_t* L = nibble_base<Q>(src, b);
  if constexpr (kCodebookType<Q>) {
    const V64 table = V64::table16(kCodebookBytes<Q>.v);
    for (int c = 0; c < 4; ++c) {
      const V64 p = V64::load(L + c * 64);
      (p & lo4).lookup(table).store(out.u[c]);
      (p.srl16(4) & lo4).lookup(table).store(out.u[c + 4]);
    }
    return;
  }
  for (int c = 0; c < 4; ++c) {
    const V64 p = V64::load(L + c * 64);
    (p & lo4).store(out.u[c]);
    (p.srl16(4) & lo4).store(out.u[c + 4]);
  }
  if constexpr (Q == Q5_0 || Q == Q5_1 || Q == Q5_K) {
    const uint8_t* H = high_bit_base<Q>(src, b);
    for (int t = 0; t < 8; ++t) {
      uint64_t m;
      std::memcpy(&m, H + t * 8, 8);
      (V64::load(out.u[t]) | V64::from_bits(m, 0x10)).store(out.u[t]);
    }
  } else if constexpr (Q == Q6_K) {
    const V64 two = V64::set1(0x30);
    for (int h = 0; h < 2; ++h) {
      const V64 hb = V64::load(pair_base<Q>(src, b) + h * 64);
      for (int i = 0; i < 4; ++i) {
        const V64 hi = (i < 2 ? hb.sll16(4 - 2 * i) : hb.srl16(2 * i - 4)) & two;
        (V64::load(out.u[h * 4 + i]) | hi).store(out.u[h * 4 + i]);
      }
    }
  }
}

#ifndef TM_AVX512
// A codebook type's weight bytes for 32 indices (0..15).
template <int64_t Q>
inline __m256i codebook_lookup(__m256i idx) {
  const __m128i table = _mm_load_si128(reinterpret_cast<const __m128i*>(kCodebookBytes<Q>.v));
  return _mm256_shuffle_epi8(_mm256_broadcastsi128_si256(table), idx);
}

// Rows 8h..8h+7 of U[t] of block b of unit `src` (what unpack_block stores to u[t] + 32 h),
// computed in registers: the streaming path's weights never round-trip through memory.
template <int64_t Q>
inline __m256i u_half(const uint8_t* src, int b, int t, int h) {
  if constexpr (Q == Q8_0) {
    const __m256i w =
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + 32 + t * 64 + h * 32));
    return kSignedU<Q> ? w : _mm256_xor_si256(w, _mm256_set1_epi8(static_cast<char>(0x80)));
  } else if constexpr (Q == Q2_K || Q == Q3_K || lattice3(Q)) {
    const __m256i p = _mm256_loadu_si256(
        reinterpret_cast<const __m256i*>(pair_base<Q>(src, b) + (t / 4) * 64 + h * 32));
    const __m256i u = _mm256_and_si256(_mm256_srli_epi16(p, 2 * (t & 3)), _mm256_set1_epi8(3));
    if constexpr (Q == Q2_K) return u;
    uint32_t m;
    std::memcpy(&m, high_bit_base<Q>(src, b) + t * 8 + h * 4, 4);
    const __m256i u3 = _mm256_or_si256(u, V64::bits32(m, 0x04));
    if constexpr (!kCodebookType<Q>) return u3;
    return codebook_lookup<Q>(u3);
  } else {
    const __m256i lo4 = _mm256_set1_epi8(0x0F);
    const __m256i p = _mm256_loadu_si256(
        reinterpret_cast<const __m256i*>(nibble_base<Q>(src, b) + (t & 3) * 64 + h * 32));
    __m256i u = _mm256_and_si256(t < 4 ? p : _mm256_srli_epi16(p, 4), lo4);
    if constexpr (kCodebookType<Q>) {
      u = codebook_lookup<Q>(u);
    } else if constexpr (Q == Q5_0 || Q == Q5_1 || Q == Q5_K) {
      uint32_t m;
      std::memcpy(&m, high_bit_base<Q>(src, b) + t * 8 + h * 4, 4);
      u = _mm256_or_si256(u, V64::bits32(m, 0x10));
    } else if constexpr (Q == Q6_K) {
      const __m256i hb = _mm256_loadu_si256(
          reinterpret_cast<const __m256i*>(pair_base<Q>(src, b) + (t / 4) * 64 + h * 32));
      const int i = t & 3;
      const __m256i hi =
          i < 2 ? _mm256_slli_epi16(hb, 4 - 2 * i) : _mm256_srli_epi16(hb, 2 * i - 4);
      u = _mm256_or_si256(u, _mm256_and_si256(hi, _mm256_set1_epi8(0x30)));
    }
    return u;
  }
}
#endif

#endif  // TM_AVX512 || TM_AVX2

}  // namespace
