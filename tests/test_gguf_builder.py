"""The GGUF test builders: K-quant round trips within their derived error, random blocks that
dequantize to finite values, and the tiny Llama file's layout."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from gguf import GGUFReader
from gguf.constants import GGML_QUANT_SIZES
from gguf.quants import dequantize

from tests.gguf_builder import (
    ALL_TYPES,
    EXTREME_CASES,
    IQ_TYPES,
    K_TYPES,
    QUANTIZER_TYPES,
    bytes_per_row,
    quantize,
    random_blocks,
    write_tiny_llama_gguf,
)

F16_ULP = 2.0**-10  # relative spacing of normal float16 values
F16_TINY = 2.0**-24  # spacing of float16 subnormals


def _data(rows: int = 48, cols: int = 512, seed: int = 0) -> np.ndarray:
    """Weight-like rows of varied scale, plus awkward ones: zeros, one-signed, tiny, mixed
    magnitudes inside a block, a constant row."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, cols)) * rng.uniform(0.001, 4.0, (rows, 1))
    x[0] = 0.0
    x[1] = np.abs(x[1]) + 0.5  # all positive: zero offset
    x[2] = -np.abs(x[2]) - 0.5  # all negative: zero maximum
    x[3] = 1e-6 * rng.standard_normal(cols)  # scales in float16's subnormal range
    x[4, ::7] *= 1000.0  # a few outliers per sub-block
    x[5] = 0.3
    x[6, :32] = 0.0  # an all-zero sub-block next to normal ones
    return x.astype(np.float32)


def _k_error_bound(x: np.ndarray, qtype: QT) -> np.ndarray:
    """Per-element bound on |x - dequantize(quantize(x))| for the quantizers in gguf_builder.

    Q4_K / Q5_K (qmax = 15 / 31), per sub-block j of 32 values in a block of 256:
      R_j = max_j - min(min_j, 0); O = max_j(-min(min_j, 0))
      dmin <= O/63 (1 + 2^-10) + 2^-24                 (rounded up to float16)
      step_j = (max_j + dmin*m_j)/qmax <= (R_j + dmin)/qmax   (m_j rounded up)
      d <= max_j(step_j)/63 (1 + 2^-10) + 2^-24
      s_j = d*sc_j <= step_j + d                     (sc_j rounded up)
      |err| <= s_j/2                                 (the grid covers the sub-block)
    i.e. about R_j/(2 qmax) (1 + 1/63): 3.4% of the sub-block's range for Q4_K, 1.6% for Q5_K.
    Q6_K, per sub-block j of 16: A_j = max|x_j|, step_j = A_j/31,
      d <= max_j(step_j)/127 (1 + 2^-10) + 2^-24, s_j <= step_j + d, |err| <= s_j/2
    i.e. about A_j/62 (1 + 1/127).
    Q3_K, the same with step_j = A_j/3 and d <= max_j(step_j)/31 (1 + 2^-10) + 2^-24: about
    A_j/6 (1 + 1/31). Q2_K as Q4_K with qmax = 3, sub-blocks of 16 and 4-bit scales and mins
    (63 -> 15): about R_j/6 (1 + 1/15).
    """
    x = x.astype(np.float64).reshape(-1, 256)
    if qtype in (QT.Q3_K, QT.Q6_K):
        qmax, smax = (3, 31) if qtype == QT.Q3_K else (31, 127)
        sub = x.reshape(len(x), 16, 16)
        step = np.abs(sub).max(axis=2) / qmax
        d = step.max(axis=1, keepdims=True) / smax * (1 + F16_ULP) + F16_TINY
    else:
        qmax, smax = {QT.Q2_K: (3, 15), QT.Q4_K: (15, 63), QT.Q5_K: (31, 63)}[qtype]
        size = 16 if qtype == QT.Q2_K else 32
        sub = x.reshape(len(x), 256 // size, size)
        offset = -np.minimum(sub.min(axis=2), 0)
        dmin = offset.max(axis=1, keepdims=True) / smax * (1 + F16_ULP) + F16_TINY
        step = (sub.max(axis=2) + offset + dmin) / qmax
        d = step.max(axis=1, keepdims=True) / smax * (1 + F16_ULP) + F16_TINY
    bound = (step + d) / 2
    return np.broadcast_to(bound[:, :, None], sub.shape).reshape(-1)


@pytest.mark.parametrize("qtype", QUANTIZER_TYPES, ids=lambda t: t.name)
def test_quantize_shape_and_dtype(qtype):
    x = _data(rows=8, cols=512)
    raw = quantize(x, qtype)
    assert raw.dtype == np.uint8 and raw.shape == (8, bytes_per_row(qtype, 512))
    y = dequantize(raw, qtype)
    assert y.shape == x.shape and np.all(np.isfinite(y))
    assert np.array_equal(y[0], np.zeros(512, np.float32))


@pytest.mark.parametrize("qtype", K_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("seed", [0, 1])
def test_k_quantizers_round_trip_within_bound(qtype, seed):
    x = _data(seed=seed)
    y = dequantize(quantize(x, qtype), qtype)
    err = np.abs(y.astype(np.float64) - x).reshape(-1)
    # plus float32 rounding of the dequantized value (one rounding in d*sc*q - dmin*m)
    bound = _k_error_bound(x, qtype) * (1 + 1e-6) + 2.0**-23 * np.abs(x).reshape(-1)
    worst = np.argmax(err - bound)
    assert np.all(err <= bound), (worst, err[worst], bound[worst])
    # the bound is the quantizer's real precision, not a loose ceiling
    rel = np.abs(y - x).max(axis=1) / np.abs(x).max(axis=1).clip(1e-30)
    limit = {QT.Q2_K: 0.4, QT.Q3_K: 0.2, QT.Q4_K: 0.08, QT.Q5_K: 0.04, QT.Q6_K: 0.02}[qtype]
    assert rel[7:].max() < limit
    assert np.array_equal(y[5], y[5, :1].repeat(512))  # a constant row stays constant


@pytest.mark.parametrize("qtype", IQ_TYPES, ids=lambda t: t.name)
def test_iq4_quantizers_round_trip_within_bound(qtype):
    """|x - dequant(x)| <= 14 s per block of 32 (`_quantize_iq4`): s = d <= A/127 (1 + 2^-10) +
    2^-24 for IQ4_NL (A = the block's largest |x|); for IQ4_XS s = d*ls <= A/127 + d, with
    d <= A_max/(127*31) (1 + 2^-10) + 2^-24 (A_max: the largest of the super-block's 8 blocks)."""
    x = _data()
    y = dequantize(quantize(x, qtype), qtype)
    amax = np.abs(x.astype(np.float64)).reshape(-1, 8, 32).max(axis=2)  # [super-blocks, 8]
    if qtype == QT.IQ4_NL:
        step = amax / 127 * (1 + F16_ULP) + F16_TINY
    else:
        d = amax.max(axis=1, keepdims=True) / (127 * 31) * (1 + F16_ULP) + F16_TINY
        step = amax / 127 + d
    err = np.abs(y.astype(np.float64) - x).reshape(-1, 8, 32)
    assert np.all(err <= 14 * step[..., None] * (1 + 1e-6))
    rel = np.abs(y - x).max(axis=1) / np.abs(x).max(axis=1).clip(1e-30)
    assert rel[7:].max() < 0.15  # the bound is the writer's real precision
    assert np.array_equal(y[5], y[5, :1].repeat(512))  # a constant row stays constant


def test_k_quantizer_rejects_bad_input():
    with pytest.raises(ValueError):
        quantize(np.zeros((2, 128), np.float32), QT.Q4_K)  # not a multiple of 256
    with pytest.raises(ValueError):
        quantize(np.full((1, 256), np.nan, np.float32), QT.Q6_K)


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("extreme", [False, True])
def test_random_blocks_dequantize_to_finite_values(qtype, extreme):
    rng = np.random.default_rng(7)
    rows, cols = 16, 512  # >= 32 blocks: every extreme case appears
    raw = random_blocks(qtype, rows, cols, rng, extreme=extreme)
    assert raw.dtype == np.uint8 and raw.shape == (rows, bytes_per_row(qtype, cols))
    y = dequantize(raw, qtype)
    assert y.shape == (rows, cols) and np.all(np.isfinite(y))
    assert np.abs(y).max() <= 32768.0
    # float32 dot products with inputs of order one stay finite
    assert np.all(np.isfinite(y.astype(np.float32) @ np.ones(cols, np.float32)))
    blocks = y.reshape(-1, GGML_QUANT_SIZES[qtype][0])
    zero_blocks = np.all(blocks == 0, axis=1)
    if extreme:
        assert len(blocks) >= len(EXTREME_CASES)
        assert zero_blocks.any()
        assert np.abs(y).max() >= 64.0  # the large-scale cases are there
        assert np.abs(blocks[~zero_blocks]).max(axis=1).min() < 0.05  # and the tiny ones
    else:
        assert not zero_blocks.any() and np.abs(y).max() < 100.0


def test_random_blocks_edge_values():
    rng = np.random.default_rng(3)
    q8 = random_blocks(QT.Q8_0, 16, 512, rng, extreme=True).reshape(-1, 34)
    values = q8[:, 2:].view(np.int8)
    assert (values == -128).any() and (values == 127).any()
    d = q8[:, :2].copy().view(np.float16).ravel()
    assert (d < 0).any() and (d == 0).any() and (d == np.float16(1e-4)).any()
    assert (d == np.float16(8.0)).any() and (np.abs(d) < np.float16(2.0**-14)).any()
    q4k = random_blocks(QT.Q4_K, 16, 512, rng, extreme=True).reshape(-1, 144)
    assert np.all(q4k[:, 4:16] == 0xFF, axis=1).any()  # 6-bit scales and mins all at 63
    assert np.all(q4k[:, 4:16] == 0, axis=1).any()
    q6k = random_blocks(QT.Q6_K, 16, 512, rng, extreme=True).reshape(-1, 210)
    assert (q6k[:, 192:208].view(np.int8) == -128).any()
    again = random_blocks(QT.Q6_K, 16, 512, np.random.default_rng(3), extreme=True)
    assert np.array_equal(
        again, random_blocks(QT.Q6_K, 16, 512, np.random.default_rng(3), extreme=True)
    )


@pytest.mark.parametrize(
    "qtype,tie", [(QT.Q4_K, True), (QT.Q8_0, False)], ids=["Q4_K-tied", "Q8_0-untied"]
)
def test_tiny_llama_gguf_layout(tmp_path, qtype, tie):
    path = write_tiny_llama_gguf(tmp_path / "m.gguf", qtype, tie_embeddings=tie, layers=1)
    reader = GGUFReader(str(path))
    tensors = {t.name: t for t in reader.tensors}
    expected = {
        "token_embd.weight",
        "output_norm.weight",
        "blk.0.attn_norm.weight",
        "blk.0.ffn_norm.weight",
    } | {
        f"blk.0.{n}.weight"
        for n in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
    }
    assert set(tensors) == expected | ({"output.weight"} if not tie else set())
    for name, t in tensors.items():
        want = QT.F32 if name.endswith("norm.weight") else qtype
        assert t.tensor_type == want, name
    assert [int(x) for x in tensors["token_embd.weight"].shape] == [256, 384]  # ggml order
    assert [int(x) for x in tensors["blk.0.attn_k.weight"].shape] == [256, 128]
    assert [int(x) for x in tensors["blk.0.ffn_down.weight"].shape] == [512, 256]
    fields = reader.fields
    assert fields["general.architecture"].contents() == "llama"
    tokens = fields["tokenizer.ggml.tokens"].contents()
    assert len(tokens) == 384 and tokens[-1] == "<|endoftext|>"
    assert fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert len(fields["tokenizer.ggml.merges"].contents()) > 0
    assert fields["tokenizer.ggml.eos_token_id"].contents() == 383
