"""GGUF blocks -> *fields* and fields -> float weights (PyTorch ops, the documented reference).

A GGUF weight [n, k] is parsed (`parse`) into fields: the unsigned integer of every weight (`u`,
0..2^bits - 1; Q8_0 keeps its signed bytes) plus the block metadata (fp16 scales and mins,
K-quant sub-block scales); `dequantize_fields` turns them into the weights gguf's own
dequantization gives. `gguf_pack` writes the fields into the integer kernels' row-interleaved
layout, and documents what each field holds per type (the lattice types' codebooks included).
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


def unit_k(qtype: int) -> int:
    return 256 if qtype in SUPER_BLOCK_TYPES else 32


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
    if qtype == IQ4_XS:
        return _parse_iq4_xs(b, n, nb, k)
    if qtype in (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, IQ4_NL):
        return _parse_block32(b, qtype, n, k)
    if qtype in (Q4_K, Q5_K):
        return _parse_q4_k_q5_k(b, qtype, n, nb, k)
    if qtype == Q2_K:
        return _parse_q2_k(b, n, nb, k)
    if qtype == Q3_K:
        return _parse_q3_k(b, n, nb, k)
    return _parse_q6_k(b, n, nb, k)


def _parse_iq4_xs(b: torch.Tensor, n: int, nb: int, k: int) -> dict[str, torch.Tensor]:
    """IQ4_XS blocks [n, nb, 136] -> fields: d, sc (int8 bytes, a 6-bit scale per 32 less 32),
    u (codebook indices)."""
    f: dict[str, torch.Tensor] = {"d": b[..., 0:2]}
    h = b[..., 2].to(torch.int32) | (b[..., 3].to(torch.int32) << 8)
    low = torch.stack([b[..., 4:8] & 0xF, b[..., 4:8] >> 4], dim=-1).reshape(n, nb, 8)
    high = (h[..., None] >> (2 * torch.arange(8))) & 3
    f["sc"] = ((low.to(torch.int32) | (high << 4)) - 32).to(torch.int8).view(torch.uint8)
    qs = b[..., 8:136].reshape(n, nb, 8, 16)
    f["u"] = torch.cat([qs & 0xF, qs >> 4], dim=-1).reshape(n, k)
    return f


def _parse_block32(b: torch.Tensor, qtype: int, n: int, k: int) -> dict[str, torch.Tensor]:
    """Blocks of 32 inputs (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, IQ4_NL) [n, nb, bytes] -> fields: d,
    m (Q4_1 / Q5_1), u."""
    f: dict[str, torch.Tensor] = {"d": b[..., 0:2]}
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


def _parse_q4_k_q5_k(
    b: torch.Tensor, qtype: int, n: int, nb: int, k: int
) -> dict[str, torch.Tensor]:
    """Q4_K / Q5_K blocks [n, nb, 144 or 176] -> fields: d, dmin, sc and mn (6 bits per 32), u."""
    f: dict[str, torch.Tensor] = {"d": b[..., 0:2], "dmin": b[..., 2:4]}
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


def _parse_q2_k(b: torch.Tensor, n: int, nb: int, k: int) -> dict[str, torch.Tensor]:
    """Q2_K blocks [n, nb, 84] -> fields: d, dmin, sc and mn (4 bits per 16), u."""
    s, qs = b[..., 0:16], b[..., 16:80]
    f: dict[str, torch.Tensor] = {"d": b[..., 80:82], "dmin": b[..., 82:84]}
    f["sc"], f["mn"] = s & 0xF, s >> 4  # per 16 inputs
    f["u"] = _two_bit_values(qs, n, nb).reshape(n, k)
    return f


def _parse_q3_k(b: torch.Tensor, n: int, nb: int, k: int) -> dict[str, torch.Tensor]:
    """Q3_K blocks [n, nb, 110] -> fields: d, sc (int8 bytes, a 6-bit scale per 16 less 32),
    u."""
    hm, qs, s = b[..., 0:32], b[..., 32:96], b[..., 96:108]
    f: dict[str, torch.Tensor] = {"d": b[..., 108:110]}
    low = torch.stack([s[..., :8] & 0xF, s[..., :8] >> 4], dim=-2).reshape(n, nb, 16)
    h = s[..., 8:12]
    high = torch.stack([(h >> sh) & 3 for sh in (0, 2, 4, 6)], dim=-2).reshape(n, nb, 16)
    f["sc"] = ((low | (high << 4)).to(torch.int8) - 32).view(torch.uint8)
    # input 128 h + 32 j + l: its 3rd bit at bit 4h + j of hm[l]
    u = _two_bit_values(qs, n, nb)
    bits = (hm[:, :, None, :] >> torch.arange(8, dtype=torch.uint8)[:, None]) & 1
    f["u"] = (u | (bits.reshape(n, nb, 2, 4, 32) << 2)).reshape(n, k)
    return f


def _parse_q6_k(b: torch.Tensor, n: int, nb: int, k: int) -> dict[str, torch.Tensor]:
    """Q6_K blocks [n, nb, 210] -> fields: sc (int8 bytes, per 16), d, u."""
    ql, qh = b[..., 0:128].reshape(n, nb, 2, 64), b[..., 128:192].reshape(n, nb, 2, 32)
    f: dict[str, torch.Tensor] = {"sc": b[..., 192:208], "d": b[..., 208:210]}
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
