"""quantization="fp8" (quant/fp8.py): float8 e4m3 weights with a scale per output channel,
activations per token, through torch._scaled_mm (torch's CPU kernel here; cuBLASLt on GPUs,
checked by benchmarks/gpu_bench.py). Against a float64 reference of the same rounding, and the
model against its dense self within a stated bound."""

from __future__ import annotations

import pytest
import torch

from tokenmill import LLM, SamplingParams
from tokenmill.kernels import triton_ops as tk
from tokenmill.layers.linear import Linear
from tokenmill.quant.dense import UnquantizedLinearMethod
from tokenmill.quant.fp8 import FP8, Fp8Config, Fp8LinearMethod, quantize_rows

VOCAB = 160


def _fp8_round(x: torch.Tensor) -> torch.Tensor:
    """Rows scaled so that their largest magnitude is 448, rounded to e4m3, scaled back
    (float64; the rounding is torch's conversion, the rest written out here)."""
    scale = x.abs().amax(dim=-1, keepdim=True).double() / 448.0
    scale[scale == 0] = 1.0  # an all-zero row stays zero
    return (x.double() / scale).to(FP8).double() * scale


@pytest.mark.parametrize("bias", [False, True])
def test_fp8_linear_against_a_float64_reference(bias):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 64, generator=g)
    w[3] *= 100.0  # rows have their own scales
    w[7] = 0.0  # an all-zero row keeps a finite scale
    layer = Linear(64, {"a": 32, "b": 16}, bias=bias, quant_method=Fp8LinearMethod(quantize_rows))
    layer.quant_method.load_weight(layer, "a", w[:32], "a.weight")
    layer.quant_method.load_weight(layer, "b", w[32:], "b.weight")
    if bias:
        layer.bias.data.copy_(torch.randn(48, generator=g))
    layer.quant_method.process_weights_after_loading(layer)
    assert layer.weight is None and layer.weight_fp8.dtype == FP8  # no dense copy kept
    assert layer.quant_method.bytes_per_call(layer) == 48 * 64 + 4 * 48
    x = torch.randn(2, 5, 64, generator=g)
    x[1, 2, 9] = 300.0  # a token with an outlier gets its own scale
    y = layer(x)
    ref = _fp8_round(x) @ _fp8_round(w).T
    if bias:
        ref = ref + layer.bias.double()
    assert y.shape == (2, 5, 48) and y.dtype == torch.float32
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-4)
    assert torch.all(y[..., 7] == (layer.bias[7] if bias else 0.0))
    # and the rounding is real: e4m3 keeps 3 mantissa bits (2^-4 relative per entry)
    exact = x.double() @ w.double().T + (layer.bias.double() if bias else 0.0)
    rel = (y.double() - exact).norm() / exact.norm()
    assert 1e-3 < rel < 2**-4, rel


def test_fp8_activation_kernel_matches_the_torch_rows():
    """The one-launch Triton quantizer (the interpreter here) against `quantize_rows`: the same
    scales and layout. The interpreter's float32 -> e4m3 conversion is not the GPU's
    round-to-nearest-even (it maps a few values a binade off), so values are compared in bulk
    here and exactly by benchmarks/gpu_bench.py on the device."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 300, generator=g)
    x[2] = 0.0
    x[3, 17] = -900.0
    wide = torch.randn(5, 400, generator=g)
    for rows in (x, wide[:, :300]):  # contiguous, and strided rows
        q, scale = tk.fp8_quantize_rows(rows)
        q_ref, scale_ref = quantize_rows(rows)
        assert q.dtype == FP8 and scale.shape == (5, 1)
        torch.testing.assert_close(scale, scale_ref, rtol=1e-6, atol=0.0)
        assert (q.float() == q_ref.float()).float().mean() > 0.95
    assert torch.all(tk.fp8_quantize_rows(x)[0][2].float() == 0.0)  # the all-zero row


def test_fp8_config_keeps_the_head_and_odd_shapes_dense():
    cfg = Fp8Config()
    assert isinstance(cfg.linear_method({"": "x.weight"}, 64, {"": 48}), Fp8LinearMethod)
    assert isinstance(
        cfg.linear_method({"": "lm_head.weight"}, 64, {"": 160}), UnquantizedLinearMethod
    )
    assert isinstance(cfg.linear_method({"": "x.weight"}, 72, {"": 40}), UnquantizedLinearMethod)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A random Llama (matrices ~ N(0, 0.1), norms ~ 1 + N(0, 0.1)) with a char tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.test_prompt_logprobs import _char_tokenizer

    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (1.0 if p.dim() == 1 else 0.0))
    path = tmp_path_factory.mktemp("fp8-llama")
    model.save_pretrained(path)
    _char_tokenizer().save(str(path / "tokenizer.json"))
    return path


def test_fp8_model_error_is_that_of_four_fewer_mantissa_bits(llama):
    """Log-probabilities of 115 prompt tokens: float32 (the reference), bfloat16, and fp8
    weights and activations (float32 otherwise).

    The bound: e4m3 keeps 3 mantissa bits to bfloat16's 7, a unit roundoff 2^4 = 16 times
    larger, and both round every linear layer's weights and inputs; so fp8's mean shift from
    float32 is at most 16 times bfloat16's (bfloat16 also rounds the rest of the step, so the
    ratio comes out lower: 7-9 on random models of 2-4 layers and weight scales 0.02-0.3). It
    must also be well above bfloat16's (the layers are quantized)."""
    prompt = [list(range(5, 120))]
    params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0)
    variants = {
        "float32": dict(dtype="float32"),
        "bfloat16": dict(dtype="bfloat16"),
        "fp8": dict(dtype="float32", quantization="fp8"),
    }
    lps, memory = {}, {}
    for name, kw in variants.items():
        llm = LLM(str(llama), num_kv_blocks=64, block_size=4, **kw)
        out = llm.generate(prompt, params)[0]
        lps[name] = torch.tensor([next(iter(e.values())).logprob for e in out.prompt_logprobs[1:]])
        memory[name] = llm.engine.model.weight_memory_bytes()
    bf16 = (lps["bfloat16"] - lps["float32"]).abs().mean().item()
    fp8 = (lps["fp8"] - lps["float32"]).abs().mean().item()
    assert 2 * bf16 < fp8 <= 16 * bf16, (fp8, bf16)
    # decoder linears at 1 byte a weight (+ a float32 scale per row) instead of 4
    rows = 2 * (128 + 64 + 256 + 64)
    weights = 2 * (64 * 128 + 64 * 64 + 64 * 256 + 128 * 64)
    assert memory["float32"] - memory["fp8"] == 3 * weights - 4 * rows
