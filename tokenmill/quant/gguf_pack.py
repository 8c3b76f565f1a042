"""GGUF blocks <-> the integer kernels' row-interleaved layout (lossless, PyTorch ops).

A GGUF weight [n, k] is parsed into *fields*: the unsigned integer of every weight (`u`, 0..2^bits
- 1; Q8_0 keeps its signed bytes) plus the block metadata (fp16 scales and mins, K-quant
sub-block scales). `pack` writes the fields into tiles of 16 output rows, one *unit* after
another along k (32 inputs for the legacy types and IQ4_NL, a super-block of 256 for the others):

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

from functools import cache

import numpy as np
import torch

Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K = 2, 3, 6, 7, 8, 10, 11, 12, 13, 14
IQ4_NL, IQ4_XS = 20, 23
IQ2_XXS, IQ2_XS, IQ3_XXS, IQ1_S, IQ3_S, IQ2_S, IQ1_M = 16, 17, 18, 19, 21, 22, 29
NAMES = {
    Q4_0: "Q4_0",
    Q4_1: "Q4_1",
    Q5_0: "Q5_0",
    Q5_1: "Q5_1",
    Q8_0: "Q8_0",
    Q2_K: "Q2_K",
    Q3_K: "Q3_K",
    Q4_K: "Q4_K",
    Q5_K: "Q5_K",
    Q6_K: "Q6_K",
    IQ4_NL: "IQ4_NL",
    IQ4_XS: "IQ4_XS",
    IQ1_S: "IQ1_S",
    IQ1_M: "IQ1_M",
    IQ2_XXS: "IQ2_XXS",
    IQ2_XS: "IQ2_XS",
    IQ2_S: "IQ2_S",
    IQ3_XXS: "IQ3_XXS",
    IQ3_S: "IQ3_S",
}
K_TYPES = (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K)
SPLIT_TYPES = (Q2_K, Q3_K, Q6_K)  # a scale per 16 inputs
LATTICE_TYPES = (IQ1_S, IQ1_M, IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S)
LATTICE_SPLIT_TYPES = (IQ1_M, IQ2_XS, IQ2_S)  # a scale per 16 inputs
LATTICE_3BIT_TYPES = (IQ1_S, IQ1_M, IQ2_XXS, IQ2_XS, IQ2_S)  # 6 values: 3-bit indices
SUPER_BLOCK_TYPES = K_TYPES + (IQ4_XS,) + LATTICE_TYPES  # units of 256 inputs
# IQ4_NL / IQ4_XS weights are d (times a scale per 32, IQ4_XS) * CODEBOOK[u] (ggml's kvalues_iq4nl)
CODEBOOK = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


def _signed_codebook(magnitudes: tuple[int, ...]) -> tuple[int, ...]:
    """16 values: magnitude i at index h + i, its negative at h - 1 - i (h = 4 for up to 4
    magnitudes, whose indices then fit 3 bits, else 8), 0 where unused."""
    h = 4 if len(magnitudes) <= 4 else 8
    book = [0] * 16
    for i, v in enumerate(magnitudes):
        book[h + i], book[h - 1 - i] = v, -v
    return tuple(book)


# The lattice types' grid values as integers (ggml's grids hold these magnitudes; IQ1_S's weights
# are 8 * (its grid value -1, 0 or 1) +- 1, its block's delta of 1/8 scaled by 8) and the power of
# two that, with d and sc, scales them.
_MAGNITUDES = {
    IQ1_S: (1, 7, 9),
    IQ1_M: (1, 7, 9),
    IQ2_XXS: (8, 25, 43),
    IQ2_XS: (8, 25, 43),
    IQ2_S: (8, 25, 43),
    IQ3_XXS: (4, 12, 20, 28, 36, 44, 52, 62),
    IQ3_S: (1, 3, 5, 7, 9, 11, 13, 15),
}
CODEBOOKS = {q: _signed_codebook(m) for q, m in _MAGNITUDES.items()}
FACTOR = {
    IQ1_S: 0.125,
    IQ1_M: 0.125,
    IQ2_XXS: 0.125,
    IQ2_XS: 0.125,
    IQ2_S: 0.125,
    IQ3_XXS: 0.25,
    IQ3_S: 1.0,
}
# GGUF bytes per block and inputs per block
BLOCK_BYTES = {
    Q4_0: 18,
    Q4_1: 20,
    Q5_0: 22,
    Q5_1: 24,
    Q8_0: 34,
    Q2_K: 84,
    Q3_K: 110,
    Q4_K: 144,
    Q5_K: 176,
    Q6_K: 210,
    IQ4_NL: 18,
    IQ4_XS: 136,
    IQ1_S: 50,
    IQ1_M: 56,
    IQ2_XXS: 66,
    IQ2_XS: 74,
    IQ2_S: 82,
    IQ3_XXS: 98,
    IQ3_S: 110,
}
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


def unit_k(qtype: int) -> int:
    return 256 if qtype in SUPER_BLOCK_TYPES else 32


def can_pack(qtype: int, n: int, k: int) -> bool:
    """Whether a [n, k] weight of this type has a kernel layout (whole units along k)."""
    return qtype in NAMES and n > 0 and k % unit_k(qtype) == 0


def padded_rows(n: int) -> int:
    """Rows rounded up to whole 16-row tiles (the padding rows are all-zero blocks)."""
    return -(-n // 16) * 16


def packed_bytes(qtype: int, n: int, k: int) -> int:
    return padded_rows(n) // 16 * (k // unit_k(qtype)) * UNIT_BYTES[qtype]


def _two_bit_values(qs: torch.Tensor, n: int, nb: int) -> torch.Tensor:
    """Q2_K / Q3_K qs [n, nb, 64] -> 2-bit values [n, nb, 2, 4, 32]: input 128 h + 32 j + l at
    bits 2j..2j+1 of qs[32 h + l]."""
    shifts = 2 * torch.arange(4, dtype=torch.uint8)[:, None]
    return (qs.reshape(n, nb, 2, 1, 32) >> shifts) & 3


@cache
def grid_levels(qtype: int) -> torch.Tensor:
    """A lattice type's grid (ggml's iq*_grid, from `gguf.quants`): uint8 [entries, 8 or 4],
    each value's index in the type's grid values (its magnitude's index; IQ1_S / IQ1_M: 0, 1,
    2 for -1, 0, 1). An empty tensor for the other types."""
    if qtype not in LATTICE_TYPES:
        return torch.empty(0, dtype=torch.uint8)
    from gguf import GGMLQuantizationType, quants

    cls = getattr(quants, GGMLQuantizationType(qtype).name)  # e.g. gguf.quants.IQ2_XXS
    cls.init_grid()
    grid = np.asarray(cls.grid).reshape(cls.grid_shape)
    levels = np.searchsorted(np.asarray(cls.grid_map, dtype=np.float32), grid)
    return torch.from_numpy(levels.astype(np.uint8))


def _sign_bytes(seven: torch.Tensor) -> torch.Tensor:
    """ggml's ksigns_iq2xs: 7 sign bits and an eighth that makes their count even."""
    parity = sum((seven >> i) & 1 for i in range(7)) & 1
    return (seven | (parity << 7)).to(torch.uint8)


def _bits(byte: torch.Tensor) -> torch.Tensor:
    """[..., g] bytes -> [..., g, 8] bits, bit j of each byte at j."""
    return (byte[..., None] >> torch.arange(8, dtype=torch.uint8)) & 1


def _le(b: torch.Tensor, width: int) -> torch.Tensor:
    """Little-endian unsigned integers of `width` bytes from b [..., m * width] -> [..., m]."""
    b = b.to(torch.int64).reshape(*b.shape[:-1], -1, width)
    return sum(b[..., i] << (8 * i) for i in range(width))


def _fp16_bytes(bits: torch.Tensor) -> torch.Tensor:
    """16-bit patterns [...] (int64) -> their two little-endian bytes [..., 2]."""
    return torch.stack([bits & 255, bits >> 8], -1).to(torch.uint8)


def _parse_lattice(b: torch.Tensor, qtype: int, n: int, nb: int) -> dict[str, torch.Tensor]:
    """Lattice blocks [n, nb, bytes] -> fields: u (codebook indices [n, nb * 256]), d, sc."""
    grid = grid_levels(qtype).long()
    f: dict[str, torch.Tensor] = {"d": b[..., 0:2]}
    if qtype in (IQ1_S, IQ1_M):
        if qtype == IQ1_S:  # qs[32] | qh[8] (uint16: 3 index bits per 8, scale, delta sign)
            qs, qh = b[..., 2:34], _le(b[..., 34:50], 2)  # qh [n, nb, 8]
            f["sc"] = (2 * ((qh >> 12) & 7) + 1).to(torch.uint8)
            high = (qh[..., None] >> (3 * torch.arange(4))) & 7
            minus = (qh >> 15)[..., None].expand(n, nb, 8, 4)
        else:  # qs[32] | qh[16] (a nibble per 8: 3 index bits, delta sign) | 4 uint16 scales
            qs = b[..., 0:32]
            nib = torch.stack([b[..., 32:48] & 0xF, b[..., 32:48] >> 4], -1).long()
            high, minus = (nib & 7).reshape(n, nb, 8, 4), (nib >> 3).reshape(n, nb, 8, 4)
            words = _le(b[..., 48:56], 2)  # 3-bit scales per 16; d in their top nibbles
            f["d"] = _fp16_bytes(sum((words[..., i] >> 12) << (4 * i) for i in range(4)))
            s = (words[..., None] >> (3 * torch.arange(4))) & 7
            f["sc"] = (2 * s + 1).reshape(n, nb, 16).to(torch.uint8)
        idx = qs.long().reshape(n, nb, 8, 4) | (high << 8)
        v = 8 * (grid[idx] - 1) + (1 - 2 * minus)[..., None]  # +-1, +-7, +-9
        level = torch.tensor([0, 0, 0, 0, 0, 0, 1, 0, 2])[v.abs() - 1]  # |v| = 1, 7, 9
        f["u"] = torch.where(v > 0, 4 + level, 3 - level).to(torch.uint8).reshape(n, -1)
        return f
    if qtype in (IQ2_XXS, IQ3_XXS):
        if qtype == IQ2_XXS:
            words = _le(b[..., 2:66], 4).reshape(n, nb, 8, 2)
            idx = (words[..., 0:1] >> (8 * torch.arange(4))) & 255  # 4 entries of 8
            aux = words[..., 1]
        else:
            idx = b[..., 2:66].long().reshape(n, nb, 8, 8)  # 8 entries of 4
            aux = _le(b[..., 66:98], 4)
        f["sc"] = (2 * (aux >> 28) + 1).to(torch.uint8)
        signs = _sign_bytes((aux[..., None] >> (7 * torch.arange(4))) & 127)  # [n, nb, 8, 4]
    elif qtype == IQ2_XS:
        qs = _le(b[..., 2:66], 2).reshape(n, nb, 8, 4)
        idx, signs = qs & 511, _sign_bytes(qs >> 9)
        s = b[..., 66:74]
    elif qtype == IQ2_S:
        qh = b[..., 66:74].long()
        idx = b[..., 2:34].long().reshape(n, nb, 8, 4)
        idx = idx | (((qh[..., None] >> (2 * torch.arange(4))) & 3) << 8)
        signs, s = b[..., 34:66].reshape(n, nb, 8, 4), b[..., 74:82]
    else:  # IQ3_S
        qh = b[..., 66:74].long()
        idx = b[..., 2:66].long().reshape(n, nb, 8, 8)
        idx = idx | (((qh[..., None] >> torch.arange(8)) & 1) << 8)
        signs = b[..., 74:106].reshape(n, nb, 8, 4)
        s = torch.stack([b[..., 106:110] & 0xF, b[..., 106:110] >> 4], -1).reshape(n, nb, 8)
        f["sc"] = 1 + 2 * s
    if qtype in LATTICE_SPLIT_TYPES:  # a 4-bit scale per 16 inputs, low nibble first
        f["sc"] = 2 * torch.stack([s & 0xF, s >> 4], -1).reshape(n, nb, 16) + 1
    level = grid[idx].reshape(n, nb, 8, 4, 8)
    negative = _bits(signs).reshape(n, nb, 8, 4, 8) == 1
    h = 4 if qtype in LATTICE_3BIT_TYPES else 8
    f["u"] = torch.where(negative, h - 1 - level, h + level).to(torch.uint8).reshape(n, -1)
    return f


def parse(raw: np.ndarray | torch.Tensor, qtype: int, n: int, k: int) -> dict[str, torch.Tensor]:
    """GGUF rows [n, k / block * block bytes] -> fields: `u` uint8 [n, k] and metadata."""
    if not isinstance(raw, torch.Tensor):
        raw = torch.from_numpy(np.array(raw))  # a copy: memory-mapped arrays are read-only
    nb = k // unit_k(qtype)
    b = raw.view(torch.uint8).reshape(n, nb, BLOCK_BYTES[qtype])
    if qtype in LATTICE_TYPES:
        return _parse_lattice(b, qtype, n, nb)
    f: dict[str, torch.Tensor] = {}
    if qtype == IQ4_XS:
        f["d"] = b[..., 0:2]
        h = b[..., 2].to(torch.int32) | (b[..., 3].to(torch.int32) << 8)
        low = torch.stack([b[..., 4:8] & 0xF, b[..., 4:8] >> 4], dim=-1).reshape(n, nb, 8)
        high = (h[..., None] >> (2 * torch.arange(8))) & 3
        f["sc"] = ((low.to(torch.int32) | (high << 4)) - 32).to(torch.int8).view(torch.uint8)
        qs = b[..., 8:136].reshape(n, nb, 8, 16)
        f["u"] = torch.cat([qs & 0xF, qs >> 4], dim=-1).reshape(n, k)
        return f
    if qtype in (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, IQ4_NL):
        f["d"] = b[..., 0:2]
        off = 2
        if qtype in (Q4_1, Q5_1):
            f["m"] = b[..., 2:4]
            off = 4
        if qtype == Q8_0:
            f["u"] = b[..., 2:34].reshape(n, k)
            return f
        if qtype in (Q5_0, Q5_1):
            qh = b[..., off : off + 4].to(torch.int64)
            bits = qh[..., 0] | qh[..., 1] << 8 | qh[..., 2] << 16 | qh[..., 3] << 24
            high = ((bits[..., None] >> torch.arange(32)) & 1).to(torch.uint8) << 4
            off += 4
        qs = b[..., off : off + 16]
        u = torch.cat([qs & 0xF, qs >> 4], dim=-1)
        if qtype in (Q5_0, Q5_1):
            u = u | high
        f["u"] = u.reshape(n, k)
        return f
    if qtype in (Q4_K, Q5_K):
        f["d"], f["dmin"] = b[..., 0:2], b[..., 2:4]
        s = b[..., 4:16]
        lo, mid, hi = s[..., 0:4], s[..., 4:8], s[..., 8:12]
        f["sc"] = torch.cat([lo & 63, (hi & 0xF) | ((lo >> 2) & 0x30)], dim=-1)  # [n, nb, 8]
        f["mn"] = torch.cat([mid & 63, (hi >> 4) | ((mid >> 2) & 0x30)], dim=-1)
        qs = b[..., -128:].reshape(n, nb, 4, 32)
        u = torch.stack([qs & 0xF, qs >> 4], dim=3).reshape(n, nb, 8, 32)
        if qtype == Q5_K:
            qh = b[..., 16:48]  # [n, nb, 32]: bit j of byte l = bit 4 of input 32j + l
            u = u | (((qh[:, :, None, :] >> torch.arange(8, dtype=torch.uint8)[:, None]) & 1) << 4)
        f["u"] = u.reshape(n, k)
        return f
    if qtype == Q2_K:
        s, qs = b[..., 0:16], b[..., 16:80]
        f["d"], f["dmin"] = b[..., 80:82], b[..., 82:84]
        f["sc"], f["mn"] = s & 0xF, s >> 4  # per 16 inputs
        f["u"] = _two_bit_values(qs, n, nb).reshape(n, k)
        return f
    if qtype == Q3_K:
        hm, qs, s = b[..., 0:32], b[..., 32:96], b[..., 96:108]
        f["d"] = b[..., 108:110]
        low = torch.stack([s[..., :8] & 0xF, s[..., :8] >> 4], dim=-2).reshape(n, nb, 16)
        h = s[..., 8:12]
        high = torch.stack([(h >> sh) & 3 for sh in (0, 2, 4, 6)], dim=-2).reshape(n, nb, 16)
        f["sc"] = ((low | (high << 4)).to(torch.int8) - 32).view(torch.uint8)
        # input 128 h + 32 j + l: its 3rd bit at bit 4h + j of hm[l]
        u = _two_bit_values(qs, n, nb)
        bits = (hm[:, :, None, :] >> torch.arange(8, dtype=torch.uint8)[:, None]) & 1
        f["u"] = (u | (bits.reshape(n, nb, 2, 4, 32) << 2)).reshape(n, k)
        return f
    # Q6_K
    ql, qh = b[..., 0:128].reshape(n, nb, 2, 64), b[..., 128:192].reshape(n, nb, 2, 32)
    f["sc"], f["d"] = b[..., 192:208], b[..., 208:210]
    low = torch.stack(
        [ql[..., :32] & 0xF, ql[..., 32:] & 0xF, ql[..., :32] >> 4, ql[..., 32:] >> 4], dim=3
    )  # [n, nb, half, 4, 32]
    high = torch.stack([(qh >> s) & 3 for s in (0, 2, 4, 6)], dim=3)
    f["u"] = (low | (high << 4)).reshape(n, k)
    return f


def dequantize_fields(f: dict[str, torch.Tensor], qtype: int, n: int, k: int) -> torch.Tensor:
    """float32 [n, k] weights from fields, with gguf's own float32 formulas."""

    def half(x: torch.Tensor) -> torch.Tensor:
        return x.contiguous().view(torch.float16).float()[..., 0]

    if qtype in LATTICE_TYPES:
        per = 16 if qtype in LATTICE_SPLIT_TYPES else 32
        w = torch.tensor(CODEBOOKS[qtype], dtype=torch.float32)[f["u"].long()].reshape(n, -1, per)
        s = half(f["d"])[..., None] * FACTOR[qtype] * f["sc"].float()
        return (s.reshape(n, -1, 1) * w).reshape(n, k)
    if qtype in (IQ4_NL, IQ4_XS):
        w = torch.tensor(CODEBOOK, dtype=torch.float32)[f["u"].long()].reshape(n, -1, 32)
        s = half(f["d"])
        if qtype == IQ4_XS:
            s = s[..., None] * f["sc"].view(torch.int8).float()
        return (s.reshape(n, -1, 1) * w).reshape(n, k)
    if qtype in K_TYPES:
        split = qtype in SPLIT_TYPES
        u = f["u"].reshape(n, -1, 16 if split else 8, 16 if split else 32).float()
        d = half(f["d"])[..., None, None]
        if qtype in (Q3_K, Q6_K):
            s = d * f["sc"].view(torch.int8).float()[..., None]
            return (s * (u - (32 if qtype == Q6_K else 4))).reshape(n, k)
        s = d * f["sc"].float()[..., None]
        m = half(f["dmin"])[..., None, None] * f["mn"].float()[..., None]
        return (s * u - m).reshape(n, k)
    u = f["u"].reshape(n, -1, 32)
    d = half(f["d"])[..., None]
    if qtype == Q8_0:
        return (d * u.view(torch.int8).float()).reshape(n, k)
    if qtype in (Q4_1, Q5_1):
        return (d * u.float() + half(f["m"])[..., None]).reshape(n, k)
    return (d * (u.float() - (8 if qtype == Q4_0 else 16))).reshape(n, k)


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
