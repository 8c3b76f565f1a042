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

#include "gguf_decode.h"
#include "gguf_types.h"

namespace {

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
