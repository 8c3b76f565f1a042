"""Logits of every supported architecture equal transformers' (tiny random checkpoints)."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import paged_logits
from tokenmill.config import EngineArgs
from tokenmill.loader.load import load_model
from tokenmill.loader.resolve import resolve_model
from tokenmill.worker.model_runner import ModelRunner

# float32 logits of these 2-layer models (up to a few units) against transformers': the two sum
# in different orders, and a run's order can change with torch's threads and kernel blocking.
# Typical differences are below 1e-5; one CI run of 2026-12-04 (the lowest-pins venv, gpt2, C++
# backend) had 3.0e-5 on one logit of 5,920, and 2e-5 failed it. A mix-up shows as 1e-2 or more.
ATOL = 5e-5


def _llama_like(cls_name: str, **extra):
    import transformers

    cfg_cls = getattr(transformers, cls_name.replace("ForCausalLM", "Config"))
    model_cls = getattr(transformers, cls_name)
    base = dict(
        vocab_size=160,
        hidden_size=64,
        intermediate_size=112,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    base.update(extra)
    return model_cls(cfg_cls(**base))


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(
        GPT2Config(vocab_size=160, n_embd=64, n_layer=2, n_head=4, n_positions=256)
    )


ARCHS = {
    "llama": lambda: _llama_like("LlamaForCausalLM", tie_word_embeddings=False),
    "llama3-rope": lambda: _llama_like(
        "LlamaForCausalLM",
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        },
    ),
    "mistral": lambda: _llama_like("MistralForCausalLM", head_dim=16),
    "qwen2": lambda: _llama_like("Qwen2ForCausalLM", tie_word_embeddings=True),
    "qwen3": lambda: _llama_like("Qwen3ForCausalLM", head_dim=32, tie_word_embeddings=True),
    "gpt2": _gpt2,
}


def _randomize(model: torch.nn.Module) -> None:
    # Default init leaves norms at 1 and biases at 0; perturb everything so a mix-up shows.
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


@pytest.fixture(scope="module", params=sorted(ARCHS))
def checkpoint(request, tmp_path_factory):
    torch.manual_seed(0)
    model = ARCHS[request.param]().eval()
    _randomize(model)
    path = tmp_path_factory.mktemp(request.param)
    # A small shard size exercises the sharded index path.
    model.save_pretrained(path, max_shard_size="200KB")
    return request.param, path, model


def _runner(path) -> ModelRunner:
    model, _ = load_model(resolve_model(str(path)), torch.float32, progress=False)
    return ModelRunner(
        model, num_blocks=64, block_size=4, kv_dtype=torch.float32, device=torch.device("cpu")
    )


def _reference_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def _force_backend(name: str, monkeypatch) -> str:
    from tokenmill.kernels import cpu_ops

    if name == "cpu" and cpu_ops.get_ops() is None:
        pytest.fail("the C++ kernels did not build")
    monkeypatch.setenv("TOKENMILL_BACKEND", name)
    return name


@pytest.fixture(params=["cpu", "torch", "triton"])
def kernel_mode(request, monkeypatch):
    """Run a test through each attention / fused-ops backend: the C++ kernels, the pure
    PyTorch reference, and the Triton kernels (in the interpreter on the CPU)."""
    return _force_backend(request.param, monkeypatch)


@pytest.fixture(params=["cpu", "torch"])
def bf16_mode(request, monkeypatch):
    """The backends that run bfloat16 here (Triton's interpreter mishandles it; the device
    script checks Triton in bf16)."""
    return _force_backend(request.param, monkeypatch)


def test_prefill_and_decode_match_transformers(checkpoint, kernel_mode):
    name, path, ref = checkpoint
    runner = _runner(path)
    # each backend's own cache layout (attention.py): the C++ kernels' head-major blocks
    # [blocks, kv_heads, block_size, head_dim], the others' token-major slots
    assert runner.kv_caches[0][0].dim() == (4 if kernel_mode == "cpu" else 3)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 160, (n,), generator=g).tolist() for n in (37, 5, 20)]
    expected = [_reference_logits(ref, p) for p in prompts]

    # Whole-prompt prefill, all three in one flat batch.
    got = paged_logits(runner, prompts, [[len(p)] for p in prompts])
    for e, o in zip(expected, got):
        torch.testing.assert_close(o, e, atol=ATOL, rtol=1e-4)

    # Token-by-token decoding for one (after a first chunk of 21: its 16 decodes cross four of
    # the 4-token blocks), uneven chunks for the others, in the same steps.
    runner2 = _runner(path)
    chunks = [[21] + [1] * 16, [2, 1, 2], [7, 7, 6]]
    got = paged_logits(runner2, prompts, chunks)
    for e, o in zip(expected, got):
        torch.testing.assert_close(o, e, atol=ATOL, rtol=1e-4)


def test_chunks_of_very_different_lengths_match_transformers(checkpoint, kernel_mode):
    """A long prompt beside short ones: the reference backend attends them in separate padded
    groups (`partition_chunks`), which must not change any logit."""
    from tokenmill.layers.attention import partition_chunks

    name, path, ref = checkpoint
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 160, (n,), generator=g).tolist() for n in (60, 2, 3, 45)]
    lens = [len(p) for p in prompts]
    assert len(partition_chunks(lens, lens)) > 1
    got = paged_logits(_runner(path), prompts, [[n] for n in lens])
    for p, o in zip(prompts, got):
        torch.testing.assert_close(o, _reference_logits(ref, p), atol=ATOL, rtol=1e-4)


def test_partition_bounds_padding():
    from tokenmill.layers.attention import partition_chunks

    # one 1,000-token prompt and 31 requests of 16 new tokens on a cached 1,008-token prefix
    assert partition_chunks([1008] + [16] * 31, [1008] + [1024] * 31) == [(0, 1), (1, 32)]
    assert partition_chunks([5, 6, 7], [5, 6, 7]) == [(0, 3)]  # alike: one group
    assert partition_chunks([], []) == []


def test_tied_checkpoint_has_no_lm_head(checkpoint):
    name, path, ref = checkpoint
    model, info = load_model(resolve_model(str(path)), torch.float32, progress=False)
    assert info.arch.tie_word_embeddings == ref.config.tie_word_embeddings
    if info.arch.tie_word_embeddings:  # no head weight of its own: the embedding's table
        head = getattr(model, "lm_head", None)
        assert head is None or head.weight is None
        assert all(not n.startswith("lm_head") for n, _ in model.named_parameters())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
def test_16bit_checkpoint_keeps_its_dtype_beside_float32_compute(checkpoint, dtype, tmp_path):
    """A BF16 / F16 safetensors checkpoint loaded in float32 on the CPU: the Llama family's
    linear weights and embedding stay as stored (half the bytes; `dense_gemm` widens them on
    decode steps, larger steps widen a copy per call), the norms and biases in float32. The
    float32 sums of the same weights are transformers' on the checkpoint widened to float32:
    the logits agree as the float32 checkpoints' do (ATOL), prefilled in one step and stepped
    token by token. GPT-2 (dense only) widens everything at load."""
    import copy

    from tokenmill.layers.linear import Linear
    from tokenmill.loader.inspect import weight_memory
    from tokenmill.loader.load import read_model_info

    name, _, ref = checkpoint
    ref16 = copy.deepcopy(ref)  # the checkpoint's values widened (the rotary buffers kept)
    with torch.no_grad():
        for p in ref16.parameters():
            p.copy_(p.to(dtype))
    stored = copy.deepcopy(ref).to(dtype)
    stored.save_pretrained(tmp_path, max_shard_size="200KB")
    model, _ = load_model(resolve_model(str(tmp_path)), torch.float32, progress=False)
    linears = [m for m in model.modules() if isinstance(m, Linear) and m.weight is not None]
    if name != "gpt2":
        assert model.input_embeddings().weight.dtype == dtype
        assert linears and all(m.weight.dtype == dtype and m.small_batch for m in linears)
        assert all(m.bias is None or m.bias.dtype == torch.float32 for m in linears)
    else:
        assert all(p.dtype == torch.float32 for p in model.parameters())
    # `tokenmill info` / `estimate` count the bytes the loaded model holds
    info, reader = read_model_info(resolve_model(str(tmp_path)))
    params = sum(p.numel() for p in ref.parameters())
    counted = weight_memory(
        info.source, reader, info.arch, params, "cpu", "float32", EngineArgs()
    ).bytes
    held = sum(p.numel() * p.element_size() for p in model.parameters())
    assert counted == held
    runner = ModelRunner(
        model, num_blocks=64, block_size=4, kv_dtype=torch.float32, device=torch.device("cpu")
    )
    g = torch.Generator().manual_seed(3)
    prompt = torch.randint(0, 160, (24,), generator=g).tolist()
    expected = _reference_logits(ref16, prompt)
    for chunks in ([24], [10, 1, 1, 12]):
        got = paged_logits(runner, [prompt], [chunks])[0]
        torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def test_bfloat16_path_close_to_float32(checkpoint, bf16_mode):
    """The bf16 path (packed oneDNN weights on CPU, fused norm) tracks the float32 one."""
    name, path, _ = checkpoint
    g = torch.Generator().manual_seed(2)
    prompt = torch.randint(0, 160, (24,), generator=g).tolist()
    ref = paged_logits(_runner(path), [prompt], [[24]])[0]
    model, _ = load_model(resolve_model(str(path)), torch.bfloat16, progress=False)
    runner = ModelRunner(
        model, num_blocks=64, block_size=4, kv_dtype=torch.bfloat16, device=torch.device("cpu")
    )
    got = paged_logits(runner, [prompt], [[10, 1, 13]])[0]
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, atol=0.05, rtol=0.05)


def test_packed_linear_equals_dense():
    from tokenmill.layers.linear import Linear
    from tokenmill.quant.dense import onednn_packable

    layer = Linear(64, {"a": 48, "b": 16}, bias=True, dtype=torch.bfloat16)
    with torch.no_grad():
        layer.weight.normal_()
        layer.bias.normal_()
    x = torch.randn(5, 64, dtype=torch.bfloat16)
    dense = torch.nn.functional.linear(x, layer.weight, layer.bias)
    # packed where oneDNN has bf16 kernels for this CPU (not on AVX2-only CPUs: the strided
    # weight stays, and loading must not fail)
    packable = onednn_packable(layer.weight)
    layer.quant_method.process_weights_after_loading(layer)
    if packable:
        assert layer.packed_weight is not None and layer.weight is None
    else:
        assert layer.packed_weight is None and layer.weight is not None
    torch.testing.assert_close(layer(x), dense, atol=0, rtol=0)
