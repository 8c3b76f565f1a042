"""Test support for the native GGUF kernels: quantizers, random valid blocks, a tiny Llama GGUF.

* `quantize(x, qtype)`: float32 [rows, cols] -> GGUF blocks, uint8 [rows, bytes_per_row], for
  Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 (through `gguf.quants.quantize`) and Q2_K, Q3_K, Q4_K, Q5_K, Q6_K
  (written here from the block layouts that `gguf.quants` dequantizes; a plain min/max or abs-max
  quantizer, not llama.cpp's, but its blocks are valid and its error is bounded, see
  `_min_max_grid`, `_quantize_q3_k` and `_quantize_q6_k`).
* `random_blocks(qtype, rows, cols, rng, extreme=False)`: random raw blocks of any of those types
  and of the lattice types (IQ1_S, IQ1_M, IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S, whose every
  byte pattern is a valid block once its float16 scale is finite), optionally covering edge cases
  (zero blocks and scales, saturated scales and quants, negative, tiny, subnormal and large fp16
  scales), all dequantizing to finite float32 values.
* `write_tiny_llama_gguf(path, qtype, ...)`: a small random Llama checkpoint with a byte-level BPE
  tokenizer that loads in transformers (`gguf_file=`) and in tokenmill (lattice types: random
  blocks scaled to the weights' RMS, `random_lattice_blocks`).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as QT
from gguf.constants import GGML_QUANT_SIZES, QK_K

LEGACY_TYPES = (QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q8_0)
K_TYPES = (QT.Q2_K, QT.Q3_K, QT.Q4_K, QT.Q5_K, QT.Q6_K)
IQ_TYPES = (QT.IQ4_NL, QT.IQ4_XS)
# ggml's i-quants with a grid: random blocks only (no quantizer here; any bytes are valid blocks)
LATTICE_TYPES = (QT.IQ1_S, QT.IQ1_M, QT.IQ2_XXS, QT.IQ2_XS, QT.IQ2_S, QT.IQ3_XXS, QT.IQ3_S)
QUANTIZER_TYPES = LEGACY_TYPES + K_TYPES + IQ_TYPES
FLOAT16_TYPES = (QT.F16, QT.BF16)  # dense 16-bit floats (gguf's own conversion)
ALL_TYPES = QUANTIZER_TYPES + LATTICE_TYPES
# ggml's kvalues_iq4nl: an IQ4 weight is its block's scale times one of these
IQ4_CODEBOOK = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113])


def bytes_per_row(qtype: QT, cols: int) -> int:
    block, size = GGML_QUANT_SIZES[qtype]
    if cols % block:
        raise ValueError(f"{qtype.name} rows must be a multiple of {block} values, got {cols}")
    return cols // block * size


# ---- quantizers ---------------------------------------------------------------------------
def _fp16_at_least(x: np.ndarray) -> np.ndarray:
    """The smallest float16 >= x, elementwise (x >= 0, float64)."""
    h = x.astype(np.float16)
    low = h.astype(np.float64) < x
    h[low] = np.nextafter(h[low], np.float16(np.inf))
    if not np.all(np.isfinite(h)):
        raise ValueError("values too large for float16 block scales")
    return h


def _pack_k_scales(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """Eight 6-bit scales and eight 6-bit mins (uint8 [n, 8] each) -> the 12 bytes of Q4_K/Q5_K.

    Bytes 0-3: scales 0-3 in bits 0-5, bits 4-5 of scales 4-7 in bits 6-7; bytes 4-7: the same for
    the mins; bytes 8-11: low nibble = bits 0-3 of scales 4-7, high nibble = bits 0-3 of mins 4-7.
    """
    sc, mn = sc.astype(np.uint8), mn.astype(np.uint8)
    lo = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    mid = mn[:, :4] | ((mn[:, 4:] >> 4) << 6)
    hi = (sc[:, 4:] & 0x0F) | ((mn[:, 4:] & 0x0F) << 4)
    return np.concatenate([lo, mid, hi], axis=1)


def _min_max_grid(sub: np.ndarray, qmax: int, smax: int):
    """The asymmetric K-quant grid of sub-blocks sub [n, subs, size] (float64): per sub-block
    x ~= d*sc_j*q - dmin*m_j with q in [0, qmax] and sc_j, m_j in [0, smax]. The offset
    off_j = dmin*m_j is rounded UP from -min(x_j, 0) and the step s_j = d*sc_j is rounded UP from
    (max(x_j) + off_j) / qmax (d and dmin are themselves rounded up to float16), so the grid
    -off_j + s_j*[0, qmax] covers the sub-block and rounding q to nearest leaves
        |x - dequant(x)| <= s_j / 2,  with  s_j <= (max_j - min(min_j, 0) + dmin) / qmax + d,
    d ~= max_j(s_j) / smax and dmin ~= max_j(-min_j) / smax (up to float16 rounding), plus
    float32 rounding of the dequantized value (the products d*sc*q and dmin*m are exact in
    float32). Returns d, dmin (float16 [n]), sc, m ([n, subs]) and q (uint8, like sub)."""
    offset = -np.minimum(sub.min(axis=2), 0.0)  # [n, subs], >= 0
    dmin = _fp16_at_least(offset.max(axis=1) / smax)
    dmin64 = dmin.astype(np.float64)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        m = np.where(dmin64 > 0, np.ceil(offset / dmin64), 0).clip(0, smax)
    off_q = dmin64 * m  # >= offset
    step = (sub.max(axis=2) + off_q) / qmax  # >= 0
    d = _fp16_at_least(step.max(axis=1) / smax)
    d64 = d.astype(np.float64)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.where(d64 > 0, np.ceil(step / d64), 0).clip(0, smax)
    s = (d64 * sc)[:, :, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(s > 0, np.rint((sub + off_q[:, :, None]) / s), 0)
    return d, dmin, sc, m, q.clip(0, qmax).astype(np.uint8)


def _quantize_k_min_max(x: np.ndarray, bits: int) -> np.ndarray:
    """Q4_K (bits=4) / Q5_K (bits=5) blocks of 256 values, x float64 [n, 256]: each sub-block j
    of 32 values dequantizes as d*sc_j*q - dmin*m_j, q in [0, 2^bits - 1], sc_j and m_j 6-bit
    (the grid and its error bound: `_min_max_grid`)."""
    n = x.shape[0]
    d, dmin, sc, m, q = _min_max_grid(x.reshape(n, 8, 32), (1 << bits) - 1, 63)

    # 32 bytes per pair of sub-blocks: low nibbles sub-block 2c, high nibbles sub-block 2c+1.
    qs = ((q[:, 0::2] & 0x0F) | ((q[:, 1::2] & 0x0F) << 4)).reshape(n, 128)
    parts = [
        d.view(np.uint8).reshape(n, 2),
        dmin.view(np.uint8).reshape(n, 2),
        _pack_k_scales(sc, m),
    ]
    if bits == 5:  # qh byte l, bit j: bit 4 of value l of sub-block j
        high = (q >> 4) & 1
        qh = np.zeros((n, 32), np.uint8)
        for j in range(8):
            qh |= high[:, j] << j
        parts.append(qh)
    parts.append(qs)
    return np.concatenate(parts, axis=1)


def _quantize_q2_k(x: np.ndarray) -> np.ndarray:
    """Q2_K blocks of 256 values, x float64 [n, 256]: each sub-block j of 16 values dequantizes
    as d*sc_j*q - dmin*m_j, q in [0, 3], sc_j and m_j 4-bit (`_min_max_grid`). Layout:
    scales[16] (sc_j in the low nibble, m_j in the high one) | qs[64] | d | dmin; value
    128 h + 32 j + l keeps its 2 bits at bits 2j..2j+1 of qs[32 h + l]."""
    n = x.shape[0]
    d, dmin, sc, m, q = _min_max_grid(x.reshape(n, 16, 16), 3, 15)
    scales = (sc.astype(np.uint8) | (m.astype(np.uint8) << 4)).reshape(n, 16)
    q = q.reshape(n, 2, 4, 32)
    qs = np.zeros((n, 2, 32), np.uint8)
    for j in range(4):
        qs |= q[:, :, j] << (2 * j)
    return np.concatenate(
        [
            scales,
            qs.reshape(n, 64),
            d.view(np.uint8).reshape(n, 2),
            dmin.view(np.uint8).reshape(n, 2),
        ],
        axis=1,
    )


def _abs_max_scales(sub: np.ndarray, qmax: int, smax: int) -> tuple[np.ndarray, ...]:
    """The symmetric grid of sub-blocks sub [n, subs, size] (float64): the step s_j = d*sc_j is
    rounded UP from max|x_j| / qmax, with d rounded up to float16 from max_j(step_j) / smax and
    sc_j in [0, smax], so x / s_j lies in [-qmax, qmax] and s_j <= max|x_j| / qmax + d. Returns d
    (float16 [n]), sc ([n, subs]) and s ([n, subs, 1])."""
    step = np.abs(sub).max(axis=2) / qmax
    d = _fp16_at_least(step.max(axis=1) / smax)
    d64 = d.astype(np.float64)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.where(d64 > 0, np.ceil(step / d64), 0).clip(0, smax)
    return d, sc, (d64 * sc)[:, :, None]


def _rint_steps(sub: np.ndarray, s: np.ndarray) -> np.ndarray:
    """sub / s rounded to the nearest integer (0 where s is 0)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(s > 0, np.rint(sub / s), 0)


def _quantize_q6_k(x: np.ndarray) -> np.ndarray:
    """Q6_K blocks of 256 values, x float64 [n, 256].

    Each sub-block j of 16 values dequantizes as d*sc_j*(q - 32), sc_j int8, q in [0, 63]. The
    step s_j = d*sc_j is rounded UP from max|x_j| / 31 (d rounded up to float16, d ~= max_j
    s_j / 127), so x / s_j lies in [-31, 31] and rounding to nearest leaves
        |x - dequant(x)| <= s_j / 2,  with  s_j <= max|x_j| / 31 + d.
    (d*sc*(q-32) is exact in float32.)
    """
    n = x.shape[0]
    sub = x.reshape(n, 16, 16)
    d, sc, s = _abs_max_scales(sub, 31, 127)
    q = (_rint_steps(sub, s).clip(-32, 31) + 32).astype(np.uint8).reshape(n, 2, 128)  # 2 halves

    # ql byte h*64 + b: low nibble = low 4 bits of value b of half h, high nibble = value 64 + b.
    ql = (q[:, :, :64] & 0x0F) | ((q[:, :, 64:] & 0x0F) << 4)
    # qh byte h*32 + l, bits 2k..2k+1: bits 4-5 of value 32k + l of half h.
    quarters = q.reshape(n, 2, 4, 32) >> 4
    qh = np.zeros((n, 2, 32), np.uint8)
    for k in range(4):
        qh |= (quarters[:, :, k] & 0x03) << (2 * k)
    return np.concatenate(
        [
            ql.reshape(n, 128),
            qh.reshape(n, 64),
            sc.astype(np.int8).view(np.uint8),
            d.view(np.uint8).reshape(n, 2),
        ],
        axis=1,
    )


def _quantize_q3_k(x: np.ndarray) -> np.ndarray:
    """Q3_K blocks of 256 values, x float64 [n, 256].

    Each sub-block j of 16 values dequantizes as d*(sc_j - 32)*q, sc_j 6-bit, q in [-4, 3]. Here
    only the symmetric part of the grid is used: the step s_j = d*(sc_j - 32) is rounded UP from
    max|x_j| / 3 (d rounded up to float16, d ~= max_j s_j / 31), so x / s_j lies in [-3, 3] and
    rounding to nearest leaves
        |x - dequant(x)| <= s_j / 2,  with  s_j <= max|x_j| / 3 + d.
    Layout: hmask[32] | qs[64] | scales[12] | d. Value 128 h + 32 j + l keeps bits 0-1 of q + 4 at
    bits 2j..2j+1 of qs[32 h + l] and bit 2 at bit 4h + j of hmask[l]; scale i keeps its low 4
    bits in byte i % 8 (nibble i // 8), its high 2 in byte 8 + i % 4 (bits 2 (i // 4)).
    """
    n = x.shape[0]
    sub = x.reshape(n, 16, 16)
    d, sc, s = _abs_max_scales(sub, 3, 31)
    u = (_rint_steps(sub, s).clip(-4, 3) + 4).astype(np.uint8).reshape(n, 2, 4, 32)  # [half, j, l]
    qs = np.zeros((n, 2, 32), np.uint8)
    hmask = np.zeros((n, 32), np.uint8)
    for h in range(2):
        for j in range(4):
            qs[:, h] |= (u[:, h, j] & 3) << (2 * j)
            hmask |= (u[:, h, j] >> 2) << (4 * h + j)
    sc6 = (sc + 32).astype(np.uint8)  # [n, 16]
    scales = np.zeros((n, 12), np.uint8)
    for i in range(16):
        scales[:, i % 8] |= (sc6[:, i] & 0xF) << (4 * (i // 8))
        scales[:, 8 + i % 4] |= (sc6[:, i] >> 4) << (2 * (i // 4))
    return np.concatenate(
        [hmask, qs.reshape(n, 64), scales, d.view(np.uint8).reshape(n, 2)], axis=1
    )


def _nearest_code(y: np.ndarray) -> np.ndarray:
    """The index of the IQ4 codebook value nearest to each y (float64, any shape)."""
    return np.abs(y[..., None] - IQ4_CODEBOOK).argmin(axis=-1).astype(np.uint8)


def _iq4_nibbles(q: np.ndarray) -> np.ndarray:
    """Indices [..., 32] -> 16 bytes per 32: value j in the low nibble of byte j, value 16 + j
    in its high nibble (as Q4_0)."""
    return q[..., :16] | (q[..., 16:] << 4)


def _quantize_iq4(x: np.ndarray, qtype: QT) -> np.ndarray:
    """IQ4_NL blocks of 32 / IQ4_XS super-blocks of 256 values, x float64 [n, 32 or 256].

    A weight is s * CODEBOOK[q]; s = d (IQ4_NL) or d*(ls - 32) per 32 values (IQ4_XS, ls
    6-bit). The step s is rounded UP from max|x| / 127 (the codebook spans [-127, 113], so
    every |x| <= 113 s/127 is inside it; beyond, the end value -127 s or 113 s is the nearest):
    q is the nearest codebook value, so |x - dequant(x)| is at most half the largest gap of the
    codebook (24 s / 2) inside and max|x| - 113 s <= 14 s at the top end.
    """
    n = x.shape[0]
    if qtype == QT.IQ4_NL:
        d = _fp16_at_least(np.abs(x).max(axis=1) / 127)
        d64 = d.astype(np.float64)[:, None]
        with np.errstate(divide="ignore", invalid="ignore"):
            q = _nearest_code(np.where(d64 > 0, x / d64, 0))
        return np.concatenate([d.view(np.uint8).reshape(n, 2), _iq4_nibbles(q)], axis=1)
    sub = x.reshape(n, 8, 32)
    d, ls, s = _abs_max_scales(sub, 127, 31)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = _nearest_code(np.where(s > 0, sub / s, 0))
    code = (ls + 32).astype(np.uint16)  # 6 bits: the low 4 in scales_l, the high 2 in scales_h
    high = ((code >> 4) << (2 * np.arange(8, dtype=np.uint16))).sum(axis=1, dtype=np.uint16)
    low = (code[:, 0::2] & 0xF) | ((code[:, 1::2] & 0xF) << 4)
    return np.concatenate(
        [
            d.view(np.uint8).reshape(n, 2),
            high.view(np.uint8).reshape(n, 2),
            low.astype(np.uint8),
            _iq4_nibbles(q).reshape(n, 128),
        ],
        axis=1,
    )


def quantize(x: np.ndarray, qtype: QT) -> np.ndarray:
    """float [rows, cols] -> GGUF blocks of `qtype`, uint8 [rows, bytes_per_row]."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"expected a 2-D array, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError("cannot quantize non-finite values")
    rows, cols = x.shape
    width = bytes_per_row(qtype, cols)
    if qtype in LEGACY_TYPES + FLOAT16_TYPES:
        from gguf.quants import quantize as gguf_quantize

        out = gguf_quantize(x, qtype).view(np.uint8)
    elif qtype in IQ_TYPES:
        size = 32 if qtype == QT.IQ4_NL else QK_K
        out = _quantize_iq4(x.astype(np.float64).reshape(-1, size), qtype)
    elif qtype in K_TYPES:
        blocks = x.astype(np.float64).reshape(-1, QK_K)
        if qtype == QT.Q6_K:
            out = _quantize_q6_k(blocks)
        elif qtype == QT.Q3_K:
            out = _quantize_q3_k(blocks)
        elif qtype == QT.Q2_K:
            out = _quantize_q2_k(blocks)
        else:
            out = _quantize_k_min_max(blocks, 4 if qtype == QT.Q4_K else 5)
    else:
        raise NotImplementedError(f"no quantizer for {qtype.name}")
    return np.ascontiguousarray(out, dtype=np.uint8).reshape(rows, width)


# ---- random raw blocks --------------------------------------------------------------------
# Byte offsets inside one block: the float16 scale d, the float16 second field (m for Q4_1/Q5_1,
# dmin for Q4_K/Q5_K), the sub-block scales, and the quantized values (low bits and high bits).
_LAYOUT = {
    QT.Q4_0: dict(d=0, m=None, scales=None, quants=(2, 18)),
    QT.Q4_1: dict(d=0, m=2, scales=None, quants=(4, 20)),
    QT.Q5_0: dict(d=0, m=None, scales=None, quants=(2, 22)),
    QT.Q5_1: dict(d=0, m=2, scales=None, quants=(4, 24)),
    QT.Q8_0: dict(d=0, m=None, scales=None, quants=(2, 34)),
    QT.Q2_K: dict(d=80, m=82, scales=(0, 16), quants=(16, 80)),
    QT.Q3_K: dict(d=108, m=None, scales=(96, 108), quants=(0, 96)),
    QT.Q4_K: dict(d=0, m=2, scales=(4, 16), quants=(16, 144)),
    QT.Q5_K: dict(d=0, m=2, scales=(4, 16), quants=(16, 176)),
    QT.Q6_K: dict(d=208, m=None, scales=(192, 208), quants=(0, 192)),
    QT.IQ4_NL: dict(d=0, m=None, scales=None, quants=(2, 18)),
    QT.IQ4_XS: dict(d=0, m=None, scales=(2, 8), quants=(8, 136)),
    # the lattice types' scales share bytes with their grid indices and signs (IQ2_XS, IQ2_S and
    # IQ3_S keep them apart, IQ2_XS's last 8 bytes, IQ2_S's last 8 and IQ3_S's last 4)
    QT.IQ1_S: dict(d=0, m=None, scales=None, quants=(2, 50)),
    # IQ1_M: d in the top nibbles of its four uint16 scale words (set_block_d), bytes 48-55
    QT.IQ1_M: dict(d="IQ1_M", m=None, scales=(48, 56), quants=(0, 48)),
    QT.IQ2_XXS: dict(d=0, m=None, scales=None, quants=(2, 66)),
    QT.IQ2_XS: dict(d=0, m=None, scales=(66, 74), quants=(2, 66)),
    QT.IQ2_S: dict(d=0, m=None, scales=(74, 82), quants=(2, 74)),
    QT.IQ3_XXS: dict(d=0, m=None, scales=None, quants=(2, 98)),
    QT.IQ3_S: dict(d=0, m=None, scales=(106, 110), quants=(2, 106)),
}
# Typical |d| per type, so that random blocks dequantize to values of order one.
_TYPICAL_D = {
    QT.Q4_0: 0.1,
    QT.Q4_1: 0.1,
    QT.Q5_0: 0.05,
    QT.Q5_1: 0.05,
    QT.Q8_0: 0.01,
    QT.Q2_K: 0.02,
    QT.Q3_K: 0.01,
    QT.Q4_K: 0.005,
    QT.Q5_K: 0.003,
    QT.Q6_K: 0.002,
    QT.IQ4_NL: 0.01,
    QT.IQ4_XS: 0.0005,
    QT.IQ1_S: 0.1,
    QT.IQ1_M: 0.1,
    QT.IQ2_XXS: 0.005,
    QT.IQ2_XS: 0.005,
    QT.IQ2_S: 0.005,
    QT.IQ3_XXS: 0.004,
    QT.IQ3_S: 0.004,
}

EXTREME_CASES = (
    "random",  # random bytes, random moderate positive d (and m/dmin)
    "zero_block",  # every byte 0 (d = 0, all quants 0)
    "zero_d",  # d = 0 (and m/dmin = 0), random quants and sub-block scales
    "zero_subscales",  # K types: 6-bit scales/mins or int8 scales 0 (Q3_K: -32); others: "random"
    "max_subscales",  # K types: 6-bit scales and mins all 63 (Q3_K: 31), Q6_K int8 scales -128/127
    "quants_min",  # every quant at its lowest code (Q8_0: -128)
    "quants_max",  # every quant at its highest code (Q8_0: 127)
    "q8_extremes",  # every quant at its lowest or highest code, mixed (Q8_0: -128 / 127)
    "negative_d",  # d < 0 (and m/dmin < 0)
    "tiny_d",  # d = 1e-4 (and m/dmin)
    "subnormal_d",  # d = 2^-20, a float16 subnormal (and m/dmin)
    "large_d",  # d = 8.0 (and m/dmin)
    "worst_magnitude",  # d = +-8, saturated sub-block scales and quants: the largest values
)


def _set_f16(blocks: np.ndarray, offset: int | str | None, values: np.ndarray) -> None:
    if offset == "IQ1_M":  # d's 4 nibbles, low first, atop the 4 scale words (bytes 49, 51, ...)
        bits = values.astype(np.float16).view(np.uint16).reshape(-1, 1)
        nibbles = ((bits >> (4 * np.arange(4, dtype=np.uint16))) & 0xF).astype(np.uint8)
        blocks[:, 49:56:2] = (blocks[:, 49:56:2] & 0x0F) | (nibbles << 4)
    elif offset is not None:
        blocks[:, offset : offset + 2] = values.astype(np.float16).view(np.uint8).reshape(-1, 2)


def set_block_d(blocks: np.ndarray, qtype: QT, d: np.ndarray) -> None:
    """Sets the float16 scale d of every block (uint8 [blocks, block bytes]) of `qtype`."""
    _set_f16(blocks, _LAYOUT[qtype]["d"], d)


def block_d(blocks: np.ndarray, qtype: QT) -> np.ndarray:
    """The float16 scale d of every block, as float64."""
    offset = _LAYOUT[qtype]["d"]
    if offset == "IQ1_M":
        nib = (blocks[:, 49:56:2] >> 4).astype(np.uint16)
        bits = (nib << (4 * np.arange(4, dtype=np.uint16))).sum(axis=1, dtype=np.uint16)
        return bits.view(np.float16).astype(np.float64)
    return blocks[:, offset : offset + 2].copy().view(np.float16).astype(np.float64).ravel()


def _quant_codes(qtype: QT, n: int, rng: np.random.Generator, mode: str) -> np.ndarray:
    """Quant bytes where every value is at its lowest ("min"), highest ("max") or either ("mix")
    code. For the bit-packed types all-zero / all-one bytes give the lowest / highest code."""
    lo, hi = _LAYOUT[qtype]["quants"]
    if qtype == QT.Q8_0:
        low, high = np.uint8(0x80), np.uint8(0x7F)
    else:
        low, high = np.uint8(0x00), np.uint8(0xFF)
    if mode == "min":
        return np.full((n, hi - lo), low, np.uint8)
    if mode == "max":
        return np.full((n, hi - lo), high, np.uint8)
    if qtype == QT.Q8_0:  # mixed per value
        return np.where(rng.random((n, hi - lo)) < 0.5, low, high).astype(np.uint8)
    return np.where(rng.random((n, 1)) < 0.5, low, high).repeat(hi - lo, axis=1).astype(np.uint8)


def random_blocks(
    qtype: QT, rows: int, cols: int, rng: np.random.Generator, extreme: bool = False
) -> np.ndarray:
    """Random valid blocks of `qtype`, uint8 [rows, bytes_per_row(qtype, cols)].

    Quantized values and sub-block scales are random bits; float16 scales are random moderate
    positive values (uniform in [0.5, 2] x a typical size; m of Q4_1/Q5_1 may be negative).
    With `extreme=True` the blocks cycle through EXTREME_CASES in random order (every case
    appears once there are at least len(EXTREME_CASES) blocks). float16 scales are never near
    float16's range limit, so every block dequantizes to finite float32 values (at most 32768 in
    magnitude) and float32 dot products over them stay finite.
    """
    if qtype not in _LAYOUT:
        raise NotImplementedError(f"no random blocks for {qtype.name}")
    width = bytes_per_row(qtype, cols)
    size = GGML_QUANT_SIZES[qtype][1]
    n = rows * (width // size)
    lay = _LAYOUT[qtype]
    base = _TYPICAL_D[qtype]
    blocks = rng.integers(0, 256, (n, size), dtype=np.uint8)
    d = base * rng.uniform(0.5, 2.0, n)
    if lay["m"] is None:
        m = np.zeros(n)
    elif qtype in (QT.Q4_1, QT.Q5_1):  # the block's minimum: any sign
        m = base * rng.uniform(-16.0, 16.0, n)
    else:  # dmin
        m = base * rng.uniform(0.5, 2.0, n)

    if extreme:
        cases = rng.permutation(np.arange(n) % len(EXTREME_CASES))
        q_lo, q_hi = lay["quants"]
        for idx, name in enumerate(EXTREME_CASES):
            sel = np.flatnonzero(cases == idx)
            k = len(sel)
            if k == 0 or name == "random":
                continue
            if name == "zero_block":
                blocks[sel] = 0
                d[sel] = m[sel] = 0.0
            elif name == "zero_d":
                d[sel] = m[sel] = 0.0
            elif name == "zero_subscales" and lay["scales"] is not None:
                blocks[sel, lay["scales"][0] : lay["scales"][1]] = 0
            elif name == "max_subscales" and lay["scales"] is not None:
                s0, s1 = lay["scales"]
                if qtype == QT.Q6_K:
                    blocks[sel, s0:s1] = np.where(rng.random((k, s1 - s0)) < 0.5, 0x80, 0x7F)
                else:
                    blocks[sel, s0:s1] = 0xFF
            elif name in ("quants_min", "quants_max", "q8_extremes"):
                mode = {"quants_min": "min", "quants_max": "max", "q8_extremes": "mix"}[name]
                blocks[sel, q_lo:q_hi] = _quant_codes(qtype, k, rng, mode)
            elif name == "negative_d":
                d[sel] = -np.abs(d[sel])
                m[sel] = -np.abs(m[sel])
            elif name == "tiny_d":
                d[sel] = 1e-4
                m[sel] = 1e-4 if lay["m"] is not None else 0.0
            elif name == "subnormal_d":
                d[sel] = 2.0**-20
                m[sel] = 2.0**-20 if lay["m"] is not None else 0.0
            elif name == "large_d":
                d[sel] = 8.0
                m[sel] = 8.0 if lay["m"] is not None else 0.0
            elif name == "worst_magnitude":
                d[sel] = np.where(rng.random(k) < 0.5, -8.0, 8.0)
                m[sel] = 8.0 if lay["m"] is not None else 0.0
                if lay["scales"] is not None:
                    s0, s1 = lay["scales"]
                    blocks[sel, s0:s1] = 0x80 if qtype == QT.Q6_K else 0xFF
                blocks[sel, q_lo:q_hi] = _quant_codes(qtype, k, rng, "mix")
    _set_f16(blocks, lay["d"], d)
    _set_f16(blocks, lay["m"], m)
    return blocks.reshape(rows, width)


def random_lattice_blocks(
    qtype: QT, rows: int, cols: int, rms: float, rng: np.random.Generator
) -> np.ndarray:
    """`random_blocks` of a lattice type whose float16 scales are rescaled so that the weights'
    RMS is about `rms` (the stand-in for quantizing random weights of that RMS)."""
    from gguf.quants import dequantize

    raw = random_blocks(qtype, rows, cols, rng)
    blocks = raw.reshape(-1, GGML_QUANT_SIZES[qtype][1])
    actual = float(np.sqrt(np.mean(dequantize(raw, qtype).astype(np.float64) ** 2)))
    set_block_d(blocks, qtype, block_d(blocks, qtype) * (rms / actual))
    return blocks.reshape(rows, -1)


# ---- a tiny Llama GGUF --------------------------------------------------------------------
_CORPUS = """\
The quick brown fox jumps over the lazy dog. Once upon a time, in a small village by the sea,
there lived an old fisherman and his wife. Every morning he went out in his boat, and every
evening he came back with the fish he had caught. The capital of France is Paris, the capital of
Italy is Rome, and the capital of Spain is Madrid. def fibonacci(n): return n if n < 2 else
fibonacci(n - 1) + fibonacci(n - 2). import numpy as np; x = np.zeros(10); print(x.sum()).
Water boils at one hundred degrees at sea level, and the three primary colors are red, yellow
and blue. Hello, world! This is a test of the tokenizer, with numbers 0123456789 and more text
so that there are enough pairs to merge into a vocabulary of a few hundred tokens in total.
"""
_FILE_TYPE = {
    QT.F16: 1,
    QT.BF16: 32,
    QT.Q4_0: 2,
    QT.Q4_1: 3,
    QT.Q8_0: 7,
    QT.Q5_0: 8,
    QT.Q5_1: 9,
    QT.Q2_K: 10,
    QT.Q3_K: 11,
    QT.Q4_K: 15,
    QT.Q5_K: 17,
    QT.Q6_K: 18,
    QT.IQ4_NL: 25,
    QT.IQ4_XS: 30,
    QT.IQ1_S: 24,
    QT.IQ1_M: 31,
    QT.IQ2_XXS: 19,
    QT.IQ2_XS: 20,
    QT.IQ2_S: 28,
    QT.IQ3_XXS: 23,
    QT.IQ3_S: 26,
}
EOS_TOKEN = "<|endoftext|>"


def _byte_level_bpe(n_merges: int) -> tuple[list[str], list[str]]:
    """(tokens, merges) of a byte-level BPE learned on _CORPUS: the 256 byte tokens (in byte
    order, spelled in GPT-2's byte alphabet), then up to `n_merges` merged tokens."""
    from tokenizers import pre_tokenizers

    from tokenmill.engine.gguf_tokenizer import byte_level_alphabet

    alphabet = byte_level_alphabet()
    tokens = [alphabet[b] for b in range(256)]
    split = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    counts: dict[tuple[str, ...], int] = {}
    for word, _ in split.pre_tokenize_str(_CORPUS):
        counts[tuple(word)] = counts.get(tuple(word), 0) + 1
    merges: list[str] = []
    known = set(tokens)
    while len(merges) < n_merges:
        pairs: dict[tuple[str, str], int] = {}
        for word, c in counts.items():
            for pair in zip(word, word[1:]):
                pairs[pair] = pairs.get(pair, 0) + c
        if not pairs:
            break
        best = max(pairs, key=lambda p: (pairs[p], p))  # deterministic tie-break
        joined = best[0] + best[1]
        merges.append(f"{best[0]} {best[1]}")
        if joined not in known:
            tokens.append(joined)
            known.add(joined)
        new_counts: dict[tuple[str, ...], int] = {}
        for word, c in counts.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(joined)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            new_counts[tuple(out)] = new_counts.get(tuple(out), 0) + c
        counts = new_counts
    return tokens, merges


def _permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter permutation of Q/K rows (rotate-half halves -> interleaved pairs);
    the inverse of `_unpermute_qk` in tokenmill/loader/weights.py."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_llama_gguf(
    path: str | os.PathLike,
    qtype: QT,
    *,
    hidden: int = 256,
    intermediate: int = 512,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    vocab: int = 384,
    seed: int = 0,
    tie_embeddings: bool = True,
    context_length: int = 2048,
    rope_theta: float = 10000.0,
    rms_eps: float = 1e-5,
    split_max_tensors: int = 0,
    extra_metadata: dict[str, float | int] | None = None,
) -> Path:
    """Write a random-weight Llama ("llama" architecture) GGUF to `path`; returns the path.
    `extra_metadata`: more keys, each a float32 (floats) or an int32 (ints).

    token_embd, output (unless `tie_embeddings`) and every attention / MLP weight are stored as
    `qtype`, the RMSNorm weights as F32. Q/K rows are permuted as llama.cpp's converter does, so
    transformers and tokenmill both undo it. The tokenizer is a byte-level ("gpt2") BPE learned on
    a short built-in text: 256 byte tokens, merges, unused filler tokens up to `vocab`, and
    "<|endoftext|>" (the last id) as BOS/EOS; no BOS is added when encoding.
    Row lengths (hidden, intermediate) must be multiples of the type's block size (256 for K
    types, 32 otherwise); vocab >= 258 (a multiple of 16 keeps tokenmill's packed head usable).
    `split_max_tensors` > 0 splits the file as llama.cpp's gguf-split does (gguf-py's writer:
    `STEM-00001-of-0000N.gguf` ..., at most that many tensors each); returns the first shard.
    """
    from gguf import GGUFWriter, TokenType

    if hidden % heads or heads % kv_heads or (hidden // heads) % 2:
        raise ValueError("hidden must split into an even head_dim, heads into kv_heads groups")
    bytes_per_row(qtype, hidden)
    bytes_per_row(qtype, intermediate)
    if vocab < 258:
        raise ValueError("vocab must hold the 256 byte tokens, a merge and <|endoftext|>")
    head_dim = hidden // heads
    rng = np.random.default_rng(seed)

    tokens, merges = _byte_level_bpe(vocab - 257)
    types = [int(TokenType.NORMAL)] * len(tokens)
    while len(tokens) < vocab - 1:
        tokens.append(f"<unused{len(tokens)}>")
        types.append(int(TokenType.UNUSED))
    tokens.append(EOS_TOKEN)
    types.append(int(TokenType.CONTROL))
    eos = len(tokens) - 1

    def weight(rows: int, cols: int, std: float) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) * std).astype(np.float32)

    def norm() -> np.ndarray:
        return rng.uniform(0.8, 1.2, hidden).astype(np.float32)

    path = Path(path)
    writer = GGUFWriter(str(path), "llama", split_max_tensors=split_max_tensors)
    writer.add_name(f"tiny-llama-{qtype.name}")
    writer.add_file_type(_FILE_TYPE[qtype])
    writer.add_context_length(context_length)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(intermediate)
    writer.add_rope_dimension_count(head_dim)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(rms_eps)
    writer.add_rope_freq_base(rope_theta)
    writer.add_vocab_size(vocab)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(eos)
    writer.add_eos_token_id(eos)
    writer.add_add_bos_token(False)
    for key, value in (extra_metadata or {}).items():
        if isinstance(value, float):
            writer.add_float32(key, value)
        else:
            writer.add_int32(key, value)

    def add(name: str, w: np.ndarray) -> None:
        if qtype in LATTICE_TYPES:  # random blocks with w's RMS in place of w
            raw = random_lattice_blocks(qtype, *w.shape, float(np.sqrt(np.mean(w**2))), rng)
        else:
            raw = quantize(w, qtype)
        writer.add_tensor(name, raw, raw_dtype=qtype)

    # Embedding rows of RMS ~0.25 give logits with a clear spread (std ~4 when tied).
    add("token_embd.weight", weight(vocab, hidden, 0.25))
    for i in range(layers):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", norm())
        add(
            f"blk.{i}.attn_q.weight",
            _permute_qk(weight(heads * head_dim, hidden, hidden**-0.5), heads),
        )
        add(
            f"blk.{i}.attn_k.weight",
            _permute_qk(weight(kv_heads * head_dim, hidden, hidden**-0.5), kv_heads),
        )
        add(f"blk.{i}.attn_v.weight", weight(kv_heads * head_dim, hidden, hidden**-0.5))
        add(f"blk.{i}.attn_output.weight", weight(hidden, heads * head_dim, hidden**-0.5))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", norm())
        add(f"blk.{i}.ffn_gate.weight", weight(intermediate, hidden, hidden**-0.5))
        add(f"blk.{i}.ffn_up.weight", weight(intermediate, hidden, hidden**-0.5))
        add(f"blk.{i}.ffn_down.weight", weight(hidden, intermediate, intermediate**-0.5))
    writer.add_tensor("output_norm.weight", norm())
    if not tie_embeddings:
        add("output.weight", weight(vocab, hidden, 0.25))

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    shards = writer.format_shard_names(path)
    return shards[0]
