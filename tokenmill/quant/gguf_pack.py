"""GGUF blocks <-> the integer kernels' row-interleaved layout (lossless, PyTorch ops).

A GGUF weight [n, k] is parsed into *fields* (`gguf_fields.parse`): the unsigned integer of every
weight (`u`, 0..2^bits - 1; Q8_0 keeps its signed bytes) plus the block metadata (fp16 scales and
mins, K-quant sub-block scales). `pack` writes the fields into tiles of 16 output rows, one
*unit* after another along k (32 inputs for the legacy types and IQ4_NL, a super-block of 256 for
the others):

    Q4_0  d[16] | L                      Q4_K  d[16] | dmin[16] | sc[8][16] | m[8][16] | L x 8
    Q4_1  d[16] | m[16] | L              Q5_K  as Q4_K, with H x 8 before the L x 8
    Q5_0  d[16] | H | L                  Q6_K  d[16] | sc[16][16] (int8) | L x 8 | H6 x 8
    Q5_1  d[16] | m[16] | H | L          Q3_K  d[16] | sc[16][16] (int8) | L2 x 8 | H3 x 8
    Q8_0  d[16] | U[8] (int8)            Q2_K  d[16] | dmin[16] | sm[16][16] | L2 x 8
    IQ4_NL  as Q4_0                      IQ4_XS  d[16] | sc[8][16] (int8) | L x 8

d / dmin / m are fp16, sc / m of the K types are the 6-bit values in bytes, one per row (Q3_K: its
6-bit scale less 32, Q6_K: its own, as int8; Q2_K: the file's byte, a 4-bit scale and a 4-bit min
above it; the three types scale each 16 inputs apart). Each 32-input block of the 16 rows is eight
64-byte vectors U[t], byte 4r + j of U[t] = input 4t + j of row r (the layout `vpdpbusd` reads with
a broadcast activation); L[c] (c < 4, 64 bytes each) holds U[c] in its low and U[c + 4] in its high
nibble; H is eight little-endian 64-bit masks (bit 4r + j of mask t = bit 4 of that weight); H6 is
two 64-byte vectors, bits 2i..2i+1 of byte b of vector h = bits 4..5 of byte b of U[4h + i]; L2 the
same for bits 0..1 and H3 the masks of bit 2 (Q3_K's u = its 3-bit value + 4, 0..7; Q2_K's u = its
2 bits; IQ4_NL's and IQ4_XS's u = the index of their codebook value, CODEBOOK, and IQ4_XS's sc its
6-bit scale less 32). Sizes per weight equal the file's, except Q4_K / Q5_K, whose scales take 4
bytes more per 256 inputs, and Q3_K and IQ4_XS, 4 and 2 bytes more (their scales in whole bytes).
`unpack` inverts `pack` exactly.

The lattice types (ggml's i-quants with a grid: IQ1_S, IQ1_M, IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS,
IQ3_S) are repacked losslessly into a codebook layout: each weight is one of at most 16 values of
its type (a grid value times a sign; IQ1's grid value plus a delta of +-1/8), so `u` is that
value's index in the type's signed codebook (CODEBOOKS: magnitude i at index h + i, its negative
at h - 1 - i) and `sc` the block scale's integer factor (2 s + 1, IQ3_S 1 + 2 s), one per 32
inputs (IQ1_M, IQ2_XS and IQ2_S: per 16; IQ1_M's d is the float16 its scales' top nibbles make).
The IQ3 types (8 magnitudes, h = 8) are laid out as IQ4_XS; the IQ1 and IQ2 types (3 magnitudes,
h = 4: u takes 3 bits) as Q3_K, d[16] | sc[8 or 16][16] | L2 x 8 | H3 x 8. A weight is d * FACTOR
* sc * CODEBOOKS[u], the product gguf computes, exactly. In memory they take 3.3-3.6 (IQ1, IQ2)
and 4.3 (IQ3) bits per weight, where the file has 1.6-2.6 and 3.1-3.4: the price of running
them on the kernels' 3- and 4-bit unpacking, against 16 bits dequantized.
"""

from __future__ import annotations

import torch

from tokenmill.quant.gguf_fields import (
    IQ1_M,
    IQ1_S,
    IQ2_S,
    IQ2_XS,
    IQ2_XXS,
    IQ3_S,
    IQ3_XXS,
    IQ4_NL,
    IQ4_XS,
    LATTICE_3BIT_TYPES,
    LATTICE_SPLIT_TYPES,
    LATTICE_TYPES,
    NAMES,
    Q2_K,
    Q3_K,
    Q4_0,
    Q4_1,
    Q4_K,
    Q5_0,
    Q5_1,
    Q5_K,
    Q6_K,
    Q8_0,
    SUPER_BLOCK_TYPES,
    unit_k,
)

UNIT_BYTES = {
    Q4_0: 288,
    Q4_1: 320,
    Q5_0: 352,
    Q5_1: 384,
    Q8_0: 544,
    Q2_K: 1344,
    Q3_K: 1824,
    Q4_K: 2368,
    Q5_K: 2880,
    Q6_K: 3360,
    IQ4_NL: 288,
    IQ4_XS: 2208,
    IQ1_S: 1696,
    IQ1_M: 1824,
    IQ2_XXS: 1696,
    IQ2_XS: 1824,
    IQ2_S: 1824,
    IQ3_XXS: 2208,
    IQ3_S: 2208,
}


def can_pack(qtype: int, n: int, k: int) -> bool:
    """Whether a [n, k] weight of this type has a kernel layout (whole units along k)."""
    return qtype in NAMES and n > 0 and k % unit_k(qtype) == 0


def padded_rows(n: int) -> int:
    """Rows rounded up to whole 16-row tiles (the padding rows are all-zero blocks)."""
    return -(-n // 16) * 16


def packed_bytes(qtype: int, n: int, k: int) -> int:
    return padded_rows(n) // 16 * (k // unit_k(qtype)) * UNIT_BYTES[qtype]


def _tile_u(u: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """u [n, k] -> [nt, kb, t=8, 64] (byte 4r + j of U[t] = input 4t + j of row r)."""
    return (
        u.reshape(n // 16, 16, k // 32, 8, 4)
        .permute(0, 2, 3, 1, 4)
        .reshape(n // 16, k // 32, 8, 64)
    )


def _untile_u(t: torch.Tensor, n: int, k: int) -> torch.Tensor:
    return t.reshape(n // 16, k // 32, 8, 16, 4).permute(0, 3, 1, 2, 4).reshape(n, k)


def _per_row(x: torch.Tensor, n: int, units: int, width: int) -> torch.Tensor:
    """[n, units, width bytes] -> [nt, units, width * 16] with rows innermost per byte group."""
    return (
        x.reshape(n // 16, 16, units, -1, width).permute(0, 2, 3, 1, 4).reshape(n // 16, units, -1)
    )


def _from_rows(x: torch.Tensor, n: int, units: int, width: int) -> torch.Tensor:
    return x.reshape(n // 16, units, -1, 16, width).permute(0, 3, 1, 2, 4).reshape(n, units, -1)


def _nibbles(ut: torch.Tensor) -> torch.Tensor:
    """[..., 8, 64] -> L [..., 256]."""
    return ((ut[..., :4, :] & 0xF) | ((ut[..., 4:, :] & 0xF) << 4)).flatten(-2)


def _bit_pairs(ut: torch.Tensor, shift: int) -> torch.Tensor:
    """[..., 8, 64] -> H6 / L2 [..., 128]: bits 2i..2i+1 of byte x of vector h = bits
    shift..shift + 1 of U[4h + i][x]."""
    pairs = ((ut >> shift) & 3).reshape(*ut.shape[:-2], 2, 4, 64)
    shifts = (2 * torch.arange(4, dtype=torch.uint8))[:, None]
    return (pairs << shifts).sum(-2, dtype=torch.uint8).flatten(-2)


def _bit_masks(ut: torch.Tensor, bit: int) -> torch.Tensor:
    """[..., 8, 64] -> H [..., 64]: one little-endian 64-bit mask per U[t]."""
    bits = ((ut >> bit) & 1).reshape(*ut.shape[:-1], 8, 8)
    return (bits << torch.arange(8, dtype=torch.uint8)).sum(-1, dtype=torch.uint8).flatten(-2)


def pack(f: dict[str, torch.Tensor], qtype: int, n: int, k: int) -> torch.Tensor:
    """Fields -> packed uint8 (flat); see the module docstring. Rows are padded with zeros to
    whole tiles."""
    if n % 16:
        pad = padded_rows(n) - n
        f = {key: torch.cat([v, v.new_zeros(pad, *v.shape[1:])]) for key, v in f.items()}
        n += pad
    nt, kb = n // 16, k // 32
    ut = _tile_u(f["u"], n, k)  # [nt, kb, 8, 64]
    if qtype in SUPER_BLOCK_TYPES:
        units = k // 256
        ut = ut.reshape(nt, units, 8, 8, 64)
        parts = [_per_row(f["d"], n, units, 2)]
        if qtype in LATTICE_3BIT_TYPES:
            parts.append(_per_row(f["sc"], n, units, 1))  # [nt, units, 8 or 16 sub x 16 rows]
            parts.append(_bit_pairs(ut, 0).flatten(-2))
            parts.append(_bit_masks(ut, 2).flatten(-2))
        elif qtype == IQ4_XS or qtype in LATTICE_TYPES:
            parts.append(_per_row(f["sc"], n, units, 1))  # [nt, units, 8 sub x 16 rows]
            parts.append(_nibbles(ut).flatten(-2))
        elif qtype == Q6_K:
            parts.append(_per_row(f["sc"], n, units, 1))  # [nt, units, 16 sub x 16 rows]
            parts.append(_nibbles(ut).flatten(-2))
            parts.append(_bit_pairs(ut, 4).flatten(-2))
        elif qtype == Q3_K:
            parts.append(_per_row(f["sc"], n, units, 1))
            parts.append(_bit_pairs(ut, 0).flatten(-2))
            parts.append(_bit_masks(ut, 2).flatten(-2))
        elif qtype == Q2_K:
            parts.append(_per_row(f["dmin"], n, units, 2))
            parts.append(_per_row(f["sc"] | (f["mn"] << 4), n, units, 1))
            parts.append(_bit_pairs(ut, 0).flatten(-2))
        else:
            parts += [
                _per_row(f["dmin"], n, units, 2),
                _per_row(f["sc"], n, units, 1),
                _per_row(f["mn"], n, units, 1),
            ]
            if qtype == Q5_K:
                parts.append(_bit_masks(ut, 4).flatten(-2))
            parts.append(_nibbles(ut).flatten(-2))
        return torch.cat(parts, dim=-1).contiguous().flatten()
    parts = [_per_row(f["d"], n, kb, 2)]
    if qtype in (Q4_1, Q5_1):
        parts.append(_per_row(f["m"], n, kb, 2))
    if qtype == Q8_0:
        parts.append(ut.flatten(-2))
    else:
        if qtype in (Q5_0, Q5_1):
            parts.append(_bit_masks(ut, 4))
        parts.append(_nibbles(ut))
    return torch.cat(parts, dim=-1).contiguous().flatten()


def unpack(packed: torch.Tensor, qtype: int, n: int, k: int) -> dict[str, torch.Tensor]:
    """Packed uint8 -> the fields `pack` was given (exact inverse)."""
    rows, n = n, padded_rows(n)
    f = _unpack_tiles(packed, qtype, n, k)
    return {key: v[:rows] for key, v in f.items()}


def _unpack_tiles(packed: torch.Tensor, qtype: int, n: int, k: int) -> dict[str, torch.Tensor]:
    nt = n // 16
    units = k // unit_k(qtype)
    t = packed.view(torch.uint8).reshape(nt, units, UNIT_BYTES[qtype])
    f: dict[str, torch.Tensor] = {}

    def take(width: int) -> torch.Tensor:
        nonlocal t
        head, t = t[..., :width], t[..., width:]
        return head

    def from_nibbles(L: torch.Tensor) -> torch.Tensor:  # [..., 256] -> [..., 8, 64]
        L = L.reshape(*L.shape[:-1], 4, 64)
        return torch.cat([L & 0xF, L >> 4], dim=-2)

    def from_masks(H: torch.Tensor, bit: int = 4) -> torch.Tensor:  # [..., 64] -> [..., 8, 64]
        bits = (H.reshape(*H.shape[:-1], 8, 8, 1) >> torch.arange(8, dtype=torch.uint8)) & 1
        return bits.reshape(*H.shape[:-1], 8, 64) << bit

    def from_pairs(P: torch.Tensor) -> torch.Tensor:  # [..., 128] -> 2 bits of [..., 8, 64]
        P = P.reshape(*P.shape[:-1], 2, 1, 64)
        pairs = (P >> (2 * torch.arange(4, dtype=torch.uint8))[:, None]) & 3
        return pairs.reshape(*P.shape[:-3], 8, 64)

    f["d"] = _from_rows(take(32), n, units, 2)
    if qtype in SUPER_BLOCK_TYPES:
        if qtype in LATTICE_3BIT_TYPES:
            f["sc"] = _from_rows(take(256 if qtype in LATTICE_SPLIT_TYPES else 128), n, units, 1)
            ut = from_pairs(take(1024).reshape(nt, units, 8, 128))
            ut = ut | from_masks(take(512).reshape(nt, units, 8, 64), bit=2)
        elif qtype == IQ4_XS or qtype in LATTICE_TYPES:
            f["sc"] = _from_rows(take(128), n, units, 1)
            ut = from_nibbles(take(2048).reshape(nt, units, 8, 256))
        elif qtype == Q6_K:
            f["sc"] = _from_rows(take(256), n, units, 1)
            ut = from_nibbles(take(2048).reshape(nt, units, 8, 256))
            ut = ut | (from_pairs(take(1024).reshape(nt, units, 8, 128)) << 4)
        elif qtype == Q3_K:
            f["sc"] = _from_rows(take(256), n, units, 1)
            ut = from_pairs(take(1024).reshape(nt, units, 8, 128))
            ut = ut | from_masks(take(512).reshape(nt, units, 8, 64), bit=2)
        elif qtype == Q2_K:
            f["dmin"] = _from_rows(take(32), n, units, 2)
            sm = _from_rows(take(256), n, units, 1)
            f["sc"], f["mn"] = sm & 0xF, sm >> 4
            ut = from_pairs(take(1024).reshape(nt, units, 8, 128))
        else:
            f["dmin"] = _from_rows(take(32), n, units, 2)
            f["sc"] = _from_rows(take(128), n, units, 1)
            f["mn"] = _from_rows(take(128), n, units, 1)
            high = from_masks(take(512).reshape(nt, units, 8, 64)) if qtype == Q5_K else 0
            ut = from_nibbles(take(2048).reshape(nt, units, 8, 256)) | high
        f["u"] = _untile_u(ut.reshape(nt, units * 8, 8, 64), n, k)
        return f
    if qtype in (Q4_1, Q5_1):
        f["m"] = _from_rows(take(32), n, units, 2)
    if qtype == Q8_0:
        ut = take(512).reshape(nt, units, 8, 64)
    else:
        high = from_masks(take(64)) if qtype in (Q5_0, Q5_1) else 0
        ut = from_nibbles(take(256)) | high
    f["u"] = _untile_u(ut, n, k)
    return f
