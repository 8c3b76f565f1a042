// GGUF blocks decoded row by row for the repacking (gguf_repack.cpp): each row's unit (a 32-input
// block, or a 256-input super-block) into unsigned weights u plus the metadata bytes the layout
// keeps per row (RowUnit), for every type the kernels run, the lattice types through their grid.
// Part of gguf_repack.cpp's translation unit: included there only.
#pragma once

#include <cstdint>
#include <cstring>

#include "gguf_types.h"

namespace {

using namespace gguf_types;

// One row's unit, decoded: unsigned weights and the metadata bytes the layout keeps per row.
struct RowUnit {
  uint8_t u[256];
  uint8_t d[2], m[2];     // fp16 scale; fp16 min (Q4_1 / Q5_1) or dmin (Q2_K, Q4_K / Q5_K)
  uint8_t sc[16], mn[8];  // sub-block scales (Q3_K, Q6_K: 16 int8; IQ4_XS: 8; Q2_K: 16 bytes of a
                          // 4-bit scale and, above it, a 4-bit min; lattice types: 8 or 16
                          // integer factors) and mins
};

inline void nibbles(const uint8_t* qs, int n, uint8_t* lo, uint8_t* hi) {
  for (int i = 0; i < n; ++i) {
    lo[i] = qs[i] & 0xF;
    hi[i] = qs[i] >> 4;
  }
}

// The 2-bit values of a Q2_K / Q3_K super-block: input 128 n + 32 j + l at bit 2 j of
// qs[32 n + l].
inline void two_bit_values(const uint8_t* qs, uint8_t* u) {
  for (int n = 0; n < 2; ++n)
    for (int j = 0; j < 4; ++j)
      for (int l = 0; l < 32; ++l) u[128 * n + 32 * j + l] = (qs[32 * n + l] >> (2 * j)) & 3;
}

inline uint32_t le(const uint8_t* p, int width) {
  uint32_t v = 0;
  for (int i = 0; i < width; ++i) v |= static_cast<uint32_t>(p[i]) << (8 * i);
  return v;
}

// ggml's ksigns_iq2xs: 7 sign bits and an eighth that makes their count even.
inline uint8_t sign_byte(uint32_t seven) {
  return static_cast<uint8_t>(seven | ((__builtin_popcount(seven) & 1) << 7));
}

// The codebook index of a lattice weight: magnitude level L at h + L, its negative at h - 1 - L
// (h = 4 for the 6-value types, 8 for the IQ3 types).
inline uint8_t signed_index(int level, bool negative, int h) {
  return static_cast<uint8_t>(negative ? h - 1 - level : h + level);
}

// Grid entry e's `group` values (levels, `grid`: gguf_pack.grid_levels) with the sign bits of
// `signs` from bit `bit` on, into u: the IQ2 types' entries of 8 (3 magnitudes, h = 4) or the
// IQ3 types' of 4 (8 magnitudes, h = 8).
inline void put_entry(const uint8_t* grid, int group, uint32_t e, uint8_t signs, int bit,
                      uint8_t* u) {
  const int h = group == 8 ? 4 : 8;
  for (int j = 0; j < group; ++j)
    u[j] = signed_index(grid[e * group + j], (signs >> (bit + j)) & 1, h);
}

// An IQ1 group of 8: grid entry e's values (-1, 0, 1) times 8, plus the delta's +-1.
inline void put_iq1(const uint8_t* grid, uint32_t e, bool minus, uint8_t* u) {
  for (int j = 0; j < 8; ++j) {
    const int v = 8 * (grid[e * 8 + j] - 1) + (minus ? -1 : 1);  // +-1, +-7, +-9
    const int a = v < 0 ? -v : v;
    u[j] = signed_index(a == 1 ? 0 : a == 7 ? 1 : 2, v < 0, 4);
  }
}

// A lattice type's super-block (see gguf_pack.py): u = codebook indices, sc = the scales'
// integer factors (2 s + 1; IQ3_S 1 + 2 s), one per 32 inputs or, IQ1_M / IQ2_XS / IQ2_S, per
// 16.
void decode_lattice(int64_t q, const uint8_t* src, const uint8_t* grid, RowUnit& r) {
  if (q == IQ1_M) {  // qs[32] | qh[16] (a nibble per 8) | 4 uint16 scales (d in their top nibbles)
    uint32_t d = 0;
    for (int i = 0; i < 4; ++i) {
      const uint32_t w = le(src + 48 + 2 * i, 2);
      d |= (w >> 12) << (4 * i);
      for (int j = 0; j < 4; ++j)
        r.sc[4 * i + j] = static_cast<uint8_t>(2 * ((w >> (3 * j)) & 7) + 1);
    }
    r.d[0] = static_cast<uint8_t>(d & 255);
    r.d[1] = static_cast<uint8_t>(d >> 8);
    for (int g = 0; g < 32; ++g) {  // 3 index bits and the delta's sign per group of 8
      const uint32_t nib = (src[32 + g / 2] >> (4 * (g % 2))) & 0xF;
      put_iq1(grid, src[g] | ((nib & 7) << 8), nib >> 3, r.u + 8 * g);
    }
    return;
  }
  std::memcpy(r.d, src, 2);
  for (int ib = 0; ib < 8; ++ib) {
    uint8_t* u = r.u + 32 * ib;
    switch (q) {
      case IQ1_S: {  // qs[32] | qh[8] (uint16: 3 index bits per 8, a 3-bit scale, the delta's sign)
        const uint32_t qh = le(src + 34 + 2 * ib, 2);
        r.sc[ib] = static_cast<uint8_t>(2 * ((qh >> 12) & 7) + 1);
        for (int l = 0; l < 4; ++l)
          put_iq1(grid, src[2 + 4 * ib + l] | (((qh >> (3 * l)) & 7) << 8), qh >> 15, u + 8 * l);
        break;
      }
      case IQ2_XXS: {  // per 32: 4 grid bytes | a word of 4 x 7 sign bits and a 4-bit scale
        const uint8_t* blk = src + 2 + 8 * ib;
        const uint32_t aux = le(blk + 4, 4);
        r.sc[ib] = static_cast<uint8_t>(2 * (aux >> 28) + 1);
        for (int l = 0; l < 4; ++l)
          put_entry(grid, 8, blk[l], sign_byte((aux >> (7 * l)) & 127), 0, u + 8 * l);
        break;
      }
      case IQ3_XXS: {  // qs[64] (8 grid bytes per 32) | 8 words as IQ2_XXS's second
        const uint32_t aux = le(src + 66 + 4 * ib, 4);
        r.sc[ib] = static_cast<uint8_t>(2 * (aux >> 28) + 1);
        for (int l = 0; l < 4; ++l) {
          const uint8_t signs = sign_byte((aux >> (7 * l)) & 127);
          put_entry(grid, 4, src[2 + 8 * ib + 2 * l], signs, 0, u + 8 * l);
          put_entry(grid, 4, src[2 + 8 * ib + 2 * l + 1], signs, 4, u + 8 * l + 4);
        }
        break;
      }
      case IQ3_S: {  // qs[64] | qh[8] (a 9th index bit per entry) | signs[32] | scales[4]
        const uint8_t qh = src[66 + ib];
        r.sc[ib] = static_cast<uint8_t>(1 + 2 * ((src[106 + ib / 2] >> (4 * (ib % 2))) & 0xF));
        for (int e = 0; e < 8; ++e)
          put_entry(grid, 4, src[2 + 8 * ib + e] | (((qh >> e) & 1) << 8), src[74 + 4 * ib + e / 2],
                    4 * (e % 2), u + 4 * e);
        break;
      }
      case IQ2_XS:   // qs[32] (uint16: a 9-bit grid index, 7 sign bits) | scales[8]
      case IQ2_S: {  // qs[32] | signs[32] | qh[8] (2 index bits per entry) | scales[8]
        const uint8_t sc = src[q == IQ2_XS ? 66 + ib : 74 + ib];
        r.sc[2 * ib] = static_cast<uint8_t>(2 * (sc & 0xF) + 1);
        r.sc[2 * ib + 1] = static_cast<uint8_t>(2 * (sc >> 4) + 1);
        for (int l = 0; l < 4; ++l) {
          if (q == IQ2_XS) {
            const uint32_t v = le(src + 2 + 2 * (4 * ib + l), 2);
            put_entry(grid, 8, v & 511, sign_byte(v >> 9), 0, u + 8 * l);
          } else {
            const uint32_t e = src[2 + 4 * ib + l] | (((src[66 + ib] >> (2 * l)) & 3) << 8);
            put_entry(grid, 8, e, src[34 + 4 * ib + l], 0, u + 8 * l);
          }
        }
        break;
      }
    }
  }
}

// Decodes one row's GGUF block(s) for a unit (src: the unit's first block) into `r` (`grid`:
// the lattice types' grid levels).
void decode(int64_t q, const uint8_t* src, const uint8_t* grid, RowUnit& r) {
  if (lattice(q)) return decode_lattice(q, src, grid, r);
  switch (q) {
    case Q8_0:
      std::memcpy(r.d, src, 2);
      std::memcpy(r.u, src + 2, 32);
      return;
    case IQ4_XS: {
      // d | scales_h (16 bits: 2 high bits per 32 inputs) | scales_l[4] (a nibble per 32) |
      // qs[128] (per 32 inputs 16 bytes of nibbles, as Q4_0). u: the codebook index.
      std::memcpy(r.d, src, 2);
      const int h = src[2] | (src[3] << 8);
      for (int ib = 0; ib < 8; ++ib) {
        const int ls = ((src[4 + ib / 2] >> (4 * (ib % 2))) & 0xF) | (((h >> (2 * ib)) & 3) << 4);
        r.sc[ib] = static_cast<uint8_t>(static_cast<int8_t>(ls - 32));
        nibbles(src + 8 + 16 * ib, 16, r.u + 32 * ib, r.u + 32 * ib + 16);
      }
      return;
    }
    case Q4_0:
    case IQ4_NL:
    case Q4_1:
    case Q5_0:
    case Q5_1: {
      std::memcpy(r.d, src, 2);
      int off = 2;
      if (q == Q4_1 || q == Q5_1) {
        std::memcpy(r.m, src + 2, 2);
        off = 4;
      }
      uint32_t qh = 0;
      if (q == Q5_0 || q == Q5_1) {
        std::memcpy(&qh, src + off, 4);
        off += 4;
      }
      nibbles(src + off, 16, r.u, r.u + 16);
      if (qh)
        for (int i = 0; i < 32; ++i) r.u[i] |= ((qh >> i) & 1) << 4;
      return;
    }
    case Q4_K:
    case Q5_K: {
      std::memcpy(r.d, src, 2);
      std::memcpy(r.m, src + 2, 2);
      const uint8_t* s = src + 4;  // 12 bytes: lo[4], mid[4], hi[4]
      for (int j = 0; j < 4; ++j) {
        r.sc[j] = s[j] & 63;
        r.mn[j] = s[4 + j] & 63;
        r.sc[4 + j] = (s[8 + j] & 0xF) | ((s[j] >> 2) & 0x30);
        r.mn[4 + j] = (s[8 + j] >> 4) | ((s[4 + j] >> 2) & 0x30);
      }
      const uint8_t* qs = src + (q == Q5_K ? 48 : 16);
      for (int c = 0; c < 4; ++c) nibbles(qs + 32 * c, 32, r.u + 64 * c, r.u + 64 * c + 32);
      if (q == Q5_K) {
        const uint8_t* qh = src + 16;  // bit j of byte l = bit 4 of input 32j + l
        for (int j = 0; j < 8; ++j)
          for (int l = 0; l < 32; ++l) r.u[32 * j + l] |= ((qh[l] >> j) & 1) << 4;
      }
      return;
    }
    case Q2_K: {
      // scales[16] (a 4-bit scale, a 4-bit min above it) | qs[64] | d | dmin
      std::memcpy(r.sc, src, 16);
      std::memcpy(r.d, src + 80, 2);
      std::memcpy(r.m, src + 82, 2);
      two_bit_values(src + 16, r.u);
      return;
    }
    case Q3_K: {
      // hmask[32] | qs[64] | 12 bytes of 16 6-bit scales | d. Input 128 n + 32 j + l: 2 bits in
      // qs (two_bit_values), a 3rd (set: no -4) at bit 4 n + j of hmask[l]; scale i: low 4 bits
      // in byte i % 8 (nibble i / 8), high 2 in byte 8 + i % 4 (bits 2 (i / 4)), minus 32.
      const uint8_t* hm = src;
      const uint8_t* qs = src + 32;
      const uint8_t* s = src + 96;
      std::memcpy(r.d, src + 108, 2);
      for (int i = 0; i < 16; ++i) {
        const int v =
            ((s[i % 8] >> (4 * (i / 8))) & 0xF) | (((s[8 + i % 4] >> (2 * (i / 4))) & 3) << 4);
        r.sc[i] = static_cast<uint8_t>(static_cast<int8_t>(v - 32));
      }
      two_bit_values(qs, r.u);
      for (int n = 0; n < 2; ++n)
        for (int j = 0; j < 4; ++j)
          for (int l = 0; l < 32; ++l)
            r.u[128 * n + 32 * j + l] |= ((hm[l] >> (4 * n + j)) & 1) << 2;
      return;
    }
    case Q6_K: {
      const uint8_t* ql = src;
      const uint8_t* qh = src + 128;
      std::memcpy(r.sc, src + 192, 16);
      std::memcpy(r.d, src + 208, 2);
      for (int h = 0; h < 2; ++h) {
        const uint8_t* L = ql + 64 * h;
        const uint8_t* H = qh + 32 * h;
        uint8_t* u = r.u + 128 * h;
        for (int l = 0; l < 32; ++l) {
          u[l] = (L[l] & 0xF) | ((H[l] & 3) << 4);
          u[32 + l] = (L[32 + l] & 0xF) | (((H[l] >> 2) & 3) << 4);
          u[64 + l] = (L[l] >> 4) | (((H[l] >> 4) & 3) << 4);
          u[96 + l] = (L[32 + l] >> 4) | (((H[l] >> 6) & 3) << 4);
        }
      }
      return;
    }
  }
}

}  // namespace
