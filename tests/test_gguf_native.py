"""GGUF Q4_1 / Q8_0 weights run natively: packing against gguf's own dequantization, the AMX
kernel against a float32 GEMM, and the whole model against the dequantized bfloat16 path."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT
from gguf.quants import dequantize, quantize

from tests.helpers import paged_logits
from tokenmill.layers.gguf_quant import (
    GGUFLinearMethod,
    dequantize_packed,
    native_gguf_available,
    pack_gguf_blocks,
)
from tokenmill.worker.model_runner import ModelRunner

TYPES = [QT.Q4_1, QT.Q8_0]
needs_kernel = pytest.mark.skipif(not native_gguf_available(torch.bfloat16, "cpu"),
                                  reason="the native GGUF kernel needs a CPU with AMX-BF16")


def _quantized(qtype, n: int, k: int, seed: int = 0) -> tuple[np.ndarray, torch.Tensor]:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n, k)).astype(np.float32) * rng.uniform(0.01, 2.0, (n, 1))
    raw = quantize(w, qtype)
    return raw, torch.from_numpy(dequantize(raw, qtype)).reshape(n, k)


@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("n,k", [(16, 32), (48, 64), (96, 160)])
def test_packing_keeps_every_weight(qtype, n, k):
    raw, ref = _quantized(qtype, n, k)
    packed = pack_gguf_blocks(raw, int(qtype), n, k)
    assert packed.dtype == torch.uint8
    assert packed.numel() == raw.size  # the same bytes, reordered
    assert torch.equal(dequantize_packed(packed, int(qtype), n, k), ref)


def test_packing_rejects_unsupported_shapes():
    raw, _ = _quantized(QT.Q4_1, 16, 64)
    with pytest.raises(ValueError):
        pack_gguf_blocks(raw[:8], int(QT.Q4_1), 8, 64)  # rows must come in tiles of 16
    with pytest.raises(ValueError):
        pack_gguf_blocks(raw, int(QT.Q4_0), 16, 64)


@needs_kernel
@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("m", [1, 5, 16, 17, 32, 33, 70])
@pytest.mark.parametrize("n,k", [(48, 64), (64, 96)])
def test_native_linear_matches_float32_gemm(qtype, m, n, k):
    from tokenmill.kernels.cpu_ops import get_ops

    raw, w = _quantized(qtype, n, k, seed=m)
    packed = pack_gguf_blocks(raw, int(qtype), n, k)
    g = torch.Generator().manual_seed(m)
    x = torch.randn(m, k, generator=g).bfloat16()
    bias = torch.randn(n, generator=g).bfloat16()
    for b in (None, bias):
        y = get_ops().gguf_linear(x, packed, int(qtype), n, b)
        assert y.dtype == torch.bfloat16 and y.shape == (m, n)
        # The weights the kernel uses are the file's values rounded to bfloat16.
        ref = x.float() @ w.bfloat16().float().T + (0 if b is None else b.float())
        # float32 accumulation in another order, then one rounding to bfloat16 (2^-9 relative)
        torch.testing.assert_close(y.float(), ref, rtol=2**-8, atol=1e-4 * ref.abs().max().item())


@needs_kernel
def test_native_linear_checks_its_inputs():
    from tokenmill.kernels.cpu_ops import get_ops

    raw, _ = _quantized(QT.Q4_1, 16, 64)
    packed = pack_gguf_blocks(raw, int(QT.Q4_1), 16, 64)
    with pytest.raises(RuntimeError, match="bfloat16"):
        get_ops().gguf_linear(torch.randn(2, 64), packed, int(QT.Q4_1), 16, None)
    with pytest.raises(RuntimeError, match="do not match"):
        get_ops().gguf_linear(torch.randn(2, 64).bfloat16(), packed, int(QT.Q4_1), 32, None)


@pytest.fixture(scope="module")
def native_and_dense():
    from tokenmill import LLM

    if not native_gguf_available(torch.bfloat16, "cpu"):
        pytest.skip("the native GGUF kernel needs a CPU with AMX-BF16")
    native = LLM(dtype="bfloat16", max_model_len=512)
    dense = LLM(dtype="bfloat16", max_model_len=512, quantization="none")
    return native, dense


def test_default_model_runs_its_quantized_blocks(native_and_dense):
    native, dense = native_and_dense
    assert native.engine.model_info.native_weights == "Q4_1 x120, Q8_0 output"
    assert dense.engine.model_info.native_weights == ""
    layer = native.engine.model.model.layers[0]
    for lin in (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj,
                layer.mlp.down_proj):
        assert isinstance(lin.quant_method, GGUFLinearMethod)
        assert lin.weight is None and lin.packed_weight is None  # no dense copy kept
    assert layer.self_attn.qkv_proj.quant_method.name == "Q4_1"
    assert native.engine.model.native_head.quant_method.name == "Q8_0"


def test_native_logits_match_dequantized_bfloat16(native_and_dense):
    tok = native_and_dense[0].engine.tokenizer
    prompts = [tok.encode(p) for p in ("The capital of France is", "def fibonacci(n):",
                                       "Once upon a time, in a small village, there lived")]
    chunks = [[3, len(p) - 3] for p in prompts]  # a prefill chunk, then the rest
    results = []
    for llm in native_and_dense:
        runner = ModelRunner(llm.engine.model, num_blocks=32, block_size=16,
                             kv_dtype=torch.bfloat16, device=torch.device("cpu"))
        results.append(paged_logits(runner, prompts, chunks))
    for got, ref in zip(*results):
        got, ref = got.float(), ref.float()
        torch.testing.assert_close(got, ref, atol=0.25, rtol=0.02)
        top2 = ref.topk(2, dim=-1).values
        clear = (top2[:, 0] - top2[:, 1]) > 0.25
        assert torch.equal(got.argmax(-1)[clear], ref.argmax(-1)[clear])
