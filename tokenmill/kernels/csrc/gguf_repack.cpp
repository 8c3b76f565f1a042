// GGUF blocks -> the integer kernels' row-interleaved layout, in one pass, threads over tiles.
// The layout is documented (and implemented with PyTorch ops, as the reference this must equal
// byte for byte) in tokenmill/quant/gguf_pack.py: tiles of 16 output rows, one unit after
// another along k (32 inputs for the legacy types, a 256-input super-block for the K types).
//
// Per tile and unit, each row's block is decoded into unsigned weights u[0..unit) plus its
// metadata bytes, then written out: per-row metadata interleaved by row, the eight 64-byte
// vectors U[t] of each 32-input block (byte 4r + j = input 4t + j of row r) as nibbles (L), the
// 5th bits as 64-bit masks (H) and Q6_K's 5th-6th bits in pairs (H6); Q2_K's and Q3_K's as pairs
// of their low 2 bits (L2), Q3_K's 3rd bit as masks (H3). The lattice types (IQ1_S ... IQ3_S)
// decode through their grid (gguf_pack.grid_levels) into indices of a signed codebook, written
// as IQ4_XS's nibbles (IQ3) or Q3_K's L2 and H3 (IQ1, IQ2). Rows past n are zeros.
#include "gguf_repack.h"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

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

// Writes the eight U vectors of 32-input block b of the tile: U[t][4r + j] = rows[r].u[32b + 4t +
// j].
inline void tile_block(const RowUnit* rows, int b, uint8_t (*U)[64]) {
  for (int t = 0; t < 8; ++t)
    for (int r = 0; r < 16; ++r) std::memcpy(&U[t][4 * r], rows[r].u + 32 * b + 4 * t, 4);
}

// L: 4 x 64 bytes, low nibble from U[c], high from U[c + 4].
inline uint8_t* put_nibbles(const uint8_t (*U)[64], uint8_t* out) {
  for (int c = 0; c < 4; ++c)
    for (int x = 0; x < 64; ++x) out[64 * c + x] = (U[c][x] & 0xF) | ((U[c + 4][x] & 0xF) << 4);
  return out + 256;
}

// H (bit 4) / H3 (bit 2): eight little-endian 64-bit masks, bit x of mask t = that bit of U[t][x].
inline uint8_t* put_masks(const uint8_t (*U)[64], int bit, uint8_t* out) {
  for (int t = 0; t < 8; ++t) {
    uint64_t mask = 0;
    for (int x = 0; x < 64; ++x) mask |= static_cast<uint64_t>((U[t][x] >> bit) & 1) << x;
    std::memcpy(out + 8 * t, &mask, 8);
  }
  return out + 64;
}

// H6 (shift 4) / L2 (shift 0): two 64-byte vectors, bits 2i..2i+1 of byte x of vector h = bits
// shift..shift + 1 of U[4h + i][x].
inline uint8_t* put_pairs(const uint8_t (*U)[64], int shift, uint8_t* out) {
  for (int h = 0; h < 2; ++h)
    for (int x = 0; x < 64; ++x) {
      uint8_t v = 0;
      for (int i = 0; i < 4; ++i) v |= ((U[4 * h + i][x] >> shift) & 3) << (2 * i);
      out[64 * h + x] = v;
    }
  return out + 128;
}

// Per-row metadata of `width` bytes at `field`, rows innermost: out[16 * width * g + width * r].
template <typename Get>
inline uint8_t* put_rows(const RowUnit* rows, int groups, int width, Get get, uint8_t* out) {
  for (int g = 0; g < groups; ++g)
    for (int r = 0; r < 16; ++r) std::memcpy(out + (16 * g + r) * width, get(rows[r], g), width);
  return out + groups * 16 * width;
}

void pack_unit(int64_t q, const RowUnit* rows, uint8_t* out) {
  uint8_t U[8][64];
  out = put_rows(rows, 1, 2, [](const RowUnit& r, int) { return r.d; }, out);
  if (!k_type(q)) {
    if (q == Q4_1 || q == Q5_1)
      out = put_rows(rows, 1, 2, [](const RowUnit& r, int) { return r.m; }, out);
    tile_block(rows, 0, U);
    if (q == Q8_0) {
      std::memcpy(out, U, 512);
      return;
    }
    if (q == Q5_0 || q == Q5_1) out = put_masks(U, 4, out);
    put_nibbles(U, out);
    return;
  }
  if (q == Q2_K) {
    out = put_rows(rows, 1, 2, [](const RowUnit& r, int) { return r.m; }, out);
    out = put_rows(rows, 16, 1, [](const RowUnit& r, int g) { return r.sc + g; }, out);
    for (int b = 0; b < 8; ++b) {
      tile_block(rows, b, U);
      out = put_pairs(U, 0, out);
    }
    return;
  }
  if (lattice3(q)) {  // as Q3_K: the sub-block scales, L2 x 8, H3 x 8
    out = put_rows(
        rows, lattice_split(q) ? 16 : 8, 1, [](const RowUnit& r, int g) { return r.sc + g; }, out);
    uint8_t* high = out + 1024;
    for (int b = 0; b < 8; ++b) {
      tile_block(rows, b, U);
      out = put_pairs(U, 0, out);
      high = put_masks(U, 2, high);
    }
    return;
  }
  if (q == IQ4_XS || lattice(q)) {
    out = put_rows(rows, 8, 1, [](const RowUnit& r, int g) { return r.sc + g; }, out);
    for (int b = 0; b < 8; ++b) {
      tile_block(rows, b, U);
      out = put_nibbles(U, out);
    }
    return;
  }
  if (q == Q3_K || q == Q6_K) {
    out = put_rows(rows, 16, 1, [](const RowUnit& r, int g) { return r.sc + g; }, out);
    uint8_t* high = out + (q == Q3_K ? 1024 : 2048);  // H3 after the L2s, H6 after the Ls
    for (int b = 0; b < 8; ++b) {
      tile_block(rows, b, U);
      if (q == Q3_K) {
        out = put_pairs(U, 0, out);
        high = put_masks(U, 2, high);
      } else {
        out = put_nibbles(U, out);
        high = put_pairs(U, 4, high);
      }
    }
    return;
  }
  out = put_rows(rows, 1, 2, [](const RowUnit& r, int) { return r.m; }, out);
  out = put_rows(rows, 8, 1, [](const RowUnit& r, int g) { return r.sc + g; }, out);
  out = put_rows(rows, 8, 1, [](const RowUnit& r, int g) { return r.mn + g; }, out);
  uint8_t* L = q == Q5_K ? out + 512 : out;
  for (int b = 0; b < 8; ++b) {
    tile_block(rows, b, U);
    if (q == Q5_K) out = put_masks(U, 4, out);
    L = put_nibbles(U, L);
  }
}

}  // namespace

at::Tensor gguf_repack(at::Tensor raw, int64_t qtype, int64_t n, int64_t k,
                       c10::optional<at::Tensor> grid) {
  const int64_t bb = block_bytes(qtype);
  TORCH_CHECK(bb > 0, "gguf_repack: no kernel layout for GGML type ", qtype);
  const uint8_t* levels = nullptr;
  if (lattice(qtype)) {
    const int64_t entries = qtype == IQ1_S || qtype == IQ1_M       ? 2048
                            : qtype == IQ2_XXS || qtype == IQ3_XXS ? 256
                            : qtype == IQ2_S                       ? 1024
                                                                   : 512;
    const int64_t group = qtype == IQ3_XXS || qtype == IQ3_S ? 4 : 8;
    TORCH_CHECK(grid.has_value() && grid->scalar_type() == at::kByte && grid->is_contiguous() &&
                    grid->numel() == entries * group,
                "gguf_repack: GGML type ", qtype, " needs its grid (gguf_pack.grid_levels)");
    levels = grid->data_ptr<uint8_t>();
    TORCH_CHECK(grid->max().item<int64_t>() < (group == 8 ? 3 : 8),
                "gguf_repack: grid levels out of range");
  }
  const int64_t uk = k_type(qtype) ? 256 : 32;
  TORCH_CHECK(n > 0 && k > 0 && k % uk == 0, "gguf_repack: k = ", k, " is not a multiple of ", uk);
  const int64_t row_bytes = k / uk * bb;
  TORCH_CHECK(raw.scalar_type() == at::kByte && raw.is_contiguous() && raw.numel() == n * row_bytes,
              "gguf_repack: raw must be ", n * row_bytes, " contiguous bytes, got ", raw.numel());
  const int64_t units = k / uk, tiles = (n + 15) / 16, ub = unit_bytes(qtype);
  auto packed = at::empty({tiles * units * ub}, at::kByte);
  const uint8_t* src = raw.data_ptr<uint8_t>();
  uint8_t* dst = packed.data_ptr<uint8_t>();
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    RowUnit rows[16];
    for (int64_t t = begin; t < end; ++t) {
      const int64_t valid = std::min<int64_t>(16, n - 16 * t);
      for (int64_t r = valid; r < 16; ++r) std::memset(&rows[r], 0, sizeof(RowUnit));
      for (int64_t c = 0; c < units; ++c) {
        for (int64_t r = 0; r < valid; ++r)
          decode(qtype, src + (16 * t + r) * row_bytes + c * bb, levels, rows[r]);
        pack_unit(qtype, rows, dst + (t * units + c) * ub);
      }
    }
  });
  return packed;
}
