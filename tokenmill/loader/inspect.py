"""describe_model: what `tokenmill info` prints, read from checkpoint headers (no weights)."""

from __future__ import annotations

import math
import re
from typing import Any, NamedTuple

from tokenmill.config import (
    DTYPE_SIZES,
    EngineArgs,
    EngineConfig,
    GiB,
    ModelConfig,
    SpeculativeConfig,
    cuda_kv_budget,
)
from tokenmill.loader.load import (
    ModelInfo,
    quant_config_for,
    rank_arch,
    read_model_info,
    small_batch_linear,
)
from tokenmill.loader.resolve import resolve_model
from tokenmill.loader.weights import safetensors_files
from tokenmill.quant import gguf_pack as gp
from tokenmill.quant.gguf import DENSE16_TYPES, GGUFQuantConfig


def count_parameters(info: Any, reader: Any) -> int:
    """Exact parameter count from tensor headers (tied embeddings counted once)."""
    if reader is not None:
        return sum(int(t.n_elements) for t in reader.tensors)
    from safetensors import safe_open

    total = 0
    for path in safetensors_files(info.source.path):
        with safe_open(str(path), framework="pt") as h:
            for name in h.keys():
                total += math.prod(h.get_slice(name).get_shape())
    return total


def arch_parameters(arch: Any) -> int:
    """The parameter count of a decoder from its config alone (a folder with only config.json).
    Llama family: embedding, untied head, per layer q/k/v/o (and their biases where the model
    has them), gate/up/down, the norms. GPT-2: token and position embeddings, per layer the
    fused qkv and output projections, the two MLP matrices, their biases and two LayerNorms,
    the final LayerNorm (the head is tied)."""
    h, i, d = arch.hidden_size, arch.intermediate_size, arch.head_dim
    if arch.model_type == "gpt2":
        layer = (3 * h * h + 3 * h) + (h * h + h) + (2 * h * i + i + h) + 4 * h
        return (
            (arch.vocab_size + arch.max_position_embeddings) * h + arch.num_layers * layer + 2 * h
        )
    q, kv = arch.num_heads * d, arch.num_kv_heads * d
    layer = h * (q + 2 * kv) + q * h + 3 * h * i + 2 * h
    if arch.attention_bias:
        layer += q + 2 * kv
    if arch.qk_norm:
        layer += 2 * d
    head = 0 if arch.tie_word_embeddings else arch.vocab_size * h
    return arch.vocab_size * h + head + arch.num_layers * layer + h


def describe_model(args: EngineArgs) -> dict[str, str]:
    """What `tokenmill info` prints: the checkpoint's facts and the engine's configuration for
    `args` (`EngineArgs.create_engine_config`, as the engine resolves it), without loading the
    weights. On a GPU without an explicit KV budget, the budget is an estimate: the weights'
    size stands in for the engine's profiled peak, so activations are not counted."""
    source = resolve_model(args.model)
    info, reader = read_model_info(source)
    arch = info.arch
    params = count_parameters(info, reader)

    tp = args.tensor_parallel_size
    if tp > 1:
        rank_arch(arch, tp)  # the size must split the model

    def weights_in_memory(model: ModelConfig) -> WeightMemory:
        return weight_memory(source, reader, arch, params, model.device, model.dtype, args)

    def gpu_kv_budget(model: ModelConfig) -> float:
        """The GPU's KV budget with the weights in place of the engine's profiled peak."""
        return cuda_kv_budget(
            model.device,
            weights_in_memory(model)[0],
            "an estimate (no profile)",
            "for the weights, not loaded yet; activations not counted",
            args.gpu_memory_utilization,
        )

    spec, draft = _speculative(args)
    config = args.create_engine_config(
        info, gpu_kv_budget, draft_arch=None if draft is None else draft.arch
    )
    weights = weights_in_memory(config.model)
    return _checkpoint_facts(info, params) | _engine_facts(args, info, config, weights, spec, draft)


def _speculative(args: EngineArgs) -> tuple[SpeculativeConfig | None, ModelInfo | None]:
    """The speculative config, and a draft model's ModelInfo (its keys and values share the
    target's blocks); None for each that is not given."""
    if args.speculative_config is None:
        return None, None
    spec = SpeculativeConfig.parse(args.speculative_config)
    if spec.model is None:
        return spec, None
    draft, _ = read_model_info(resolve_model(spec.model))
    return spec, draft


def _checkpoint_facts(info: ModelInfo, params: int) -> dict[str, str]:
    """The checkpoint's own facts: name, architecture, size, format and shape."""
    arch = info.arch
    return {
        "model": f"{info.source.name} ({info.source.path})",
        "architecture": f"{arch.architecture} ({arch.model_type})",
        "parameters": f"{params / 1e6:.1f}M",
        "weight format": info.weight_format,
        "checkpoint size": f"{info.checkpoint_bytes / GiB:.3f} GiB",
        "layers / hidden / heads": f"{arch.num_layers} / {arch.hidden_size} / "
        f"{arch.num_heads} q, {arch.num_kv_heads} kv x {arch.head_dim}",
        "vocabulary": str(arch.vocab_size),
        "context length": str(arch.max_position_embeddings),
    }


def _engine_facts(
    args: EngineArgs,
    info: ModelInfo,
    config: EngineConfig,
    memory: WeightMemory,
    spec: SpeculativeConfig | None,
    draft: ModelInfo | None,
) -> dict[str, str]:
    """What the engine runs under `args` (`config`): lengths, dtypes, the weights in memory
    (`memory`), parallelism, speculative decoding and the KV cache."""
    model, cache = config.model, config.cache
    weights, stored, why, _ = memory
    tp = args.tensor_parallel_size
    max_len = model.max_model_len
    return {
        "max model length": f"{max_len} tokens",
        "embedding pooling": f"{model.pooling_type} ({_pooling_source(args, info.arch)})",
        "compute dtype": f"{model.dtype} on {model.device}",
        "weights in memory": f"{weights / GiB:.3f} GiB ({stored}; file "
        f"{info.checkpoint_bytes / GiB:.3f} GiB)",
        "quantized kernels": why,
        "tensor parallel": f"{tp} ranks (processes; one GPU each on CUDA)" if tp > 1 else "off",
        "speculative decoding": _speculative_note(spec, draft),
        "KV cache per token": f"{cache.bytes_per_token / 1024:.1f} KiB in {cache.dtype}"
        + (" per rank" if tp > 1 else ""),
        "KV capacity": f"{cache.capacity_tokens} tokens ({cache.reserved_bytes / GiB:.2f} GiB)",
        "max concurrency at full ctx": f"{cache.capacity_tokens / max_len:.1f} x {max_len} tokens",
        "memory needed (weights+KV)": f"{(weights + cache.reserved_bytes) / GiB:.2f} GiB",
    }


def _pooling_source(args: EngineArgs, arch: Any) -> str:
    """Where the embedding pooling comes from."""
    if args.pooling_type:
        return "--pooling-type"
    if arch.pooling_type:
        return "the checkpoint's"
    return "the default: the checkpoint declares none"


def _speculative_note(spec: SpeculativeConfig | None, draft: ModelInfo | None) -> str:
    """Speculative decoding's method and drafts, and the draft model where there is one."""
    if spec is None:
        return "off"
    note = f"{spec.method}, {spec.num_speculative_tokens} drafts per decode"
    if draft is None:
        return note
    return (
        f"{note} from {draft.source.name} ({draft.arch.num_layers} layers, "
        f"{draft.checkpoint_bytes / GiB:.3f} GiB file; its KV in the same blocks)"
    )


class WeightMemory(NamedTuple):
    """The weights in memory: their bytes, how they are stored, the quantization decision, and
    whether the native GGUF kernels run them."""

    bytes: int
    stored: str
    why: str
    native: bool = False


def weight_memory(
    source: Any, reader: Any, arch: Any, params: int, device: str, dtype: str, args: EngineArgs
) -> WeightMemory:
    """The weights in memory on `device` in `dtype` under `args` (its quantization and
    tensor_parallel_size: on each rank), from the headers: `params` parameters, GGUF `reader`
    or None."""
    import torch

    tp = args.tensor_parallel_size
    size = DTYPE_SIZES[dtype]
    if args.quantization == "fp8":  # 1 byte per parameter but the embedding and head's
        why = "fp8 (quantization='fp8')"
        if torch.device(device).type == "cpu" or torch.cuda.is_available():  # raises where fp8
            why = quant_config_for(source, reader, arch, getattr(torch, dtype), device, "fp8")[1]
        dense = arch.vocab_size * arch.hidden_size * (1 if arch.tie_word_embeddings else 2)
        stored = "decoder linear weights in fp8, the rest in the compute dtype (estimate)"
        return WeightMemory(params - dense + dense * size, stored, why)
    if tp > 1:
        layer = arch.hidden_size * arch.head_dim * 2 * (arch.num_heads + arch.num_kv_heads)
        layer += 3 * arch.hidden_size * arch.intermediate_size
        split = arch.num_layers * layer  # the decoder's linear weights
        per_rank = (params - split + split // tp) * size
        stored = (
            f"per rank: 1/{tp} of the decoder's linear weights, embedding, norms and head "
            "whole, in the compute dtype"
        )
        return WeightMemory(per_rank, stored, f"tensor parallel over {tp} ranks: dense weights")
    small_batch = small_batch_linear("cpu") if torch.device(device).type == "cpu" else None
    quant, why = quant_config_for(
        source, reader, arch, getattr(torch, dtype), device, args.quantization, small_batch
    )
    if isinstance(quant, GGUFQuantConfig):
        weights = estimate_native_bytes(reader, arch.tie_word_embeddings, size, quant.dense16)
        return WeightMemory(weights, "quantized blocks kept, the rest dequantized", why, True)
    if quant.stored:  # a safetensors checkpoint's 16-bit matrices kept as stored
        kept = stored_matrix_elements(source, quant.stored)
        stored = "F16 / BF16 matrices kept in 16 bits, the rest in the compute dtype"
        return WeightMemory(params * size - kept * (size - 2), stored, why)
    return WeightMemory(params * size, "dequantized to the compute dtype", why)


def stored_matrix_elements(source: Any, stored: dict[str, Any]) -> int:
    """The elements of a safetensors checkpoint's matrices named in `stored` (the dense layers'
    weights kept in 16 bits; its vectors, norms and biases, take the compute dtype)."""
    from safetensors import safe_open

    total = 0
    for path in safetensors_files(source.path):
        with safe_open(str(path), framework="pt") as h:
            for name in h.keys():
                shape = h.get_slice(name).get_shape()
                if name in stored and len(shape) == 2:
                    total += math.prod(shape)
    return total


_LINEAR = re.compile(
    r"^blk\.\d+\.(attn_q|attn_k|attn_v|attn_output|ffn_gate|ffn_up|ffn_down)"
    r"\.weight$|^output\.weight$"
)


def estimate_native_bytes(
    reader: Any, tie_word_embeddings: bool, element_size: int, dense16: bool = False
) -> int:
    """Weight memory when the native path runs (no loading): linear weights with a kernel
    layout are packed (`gguf_pack.packed_bytes`), a quantized embedding keeps its rows, a tied
    output head adds a packed copy of them, F16 / BF16 linear weights and embedding stay in
    their 16 bits beside float32 compute (`GGUFQuantConfig.dense16`), and the rest is
    dequantized."""
    total = 0
    for t in reader.tensors:
        shape = tuple(int(x) for x in reversed(t.shape))
        qtype = int(t.tensor_type)
        packable = len(shape) == 2 and gp.can_pack(qtype, *shape)
        kept16 = dense16 and qtype in DENSE16_TYPES
        if kept16 and (_LINEAR.match(t.name) or t.name == "token_embd.weight"):
            total += int(t.n_elements) * 2
        elif packable and _LINEAR.match(t.name):
            total += gp.packed_bytes(qtype, *shape)
        elif t.name == "token_embd.weight" and qtype not in (0, 1, 30):  # not F32/F16/BF16
            total += int(t.n_bytes)
            if tie_word_embeddings and packable:
                total += gp.packed_bytes(qtype, *shape)
        else:
            total += int(t.n_elements) * element_size
    return total
