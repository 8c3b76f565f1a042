"""describe_model: what `tokenmill info` prints, read from checkpoint headers (no weights)."""

from __future__ import annotations

import math
from typing import Any

import torch

from tokenmill.config import EngineArgs
from tokenmill.layers.gguf_quant import native_gguf_available
from tokenmill.loader.gguf_native import estimate_native_bytes
from tokenmill.loader.load import read_model_info
from tokenmill.loader.resolve import resolve_model
from tokenmill.loader.weights import safetensors_files
from tokenmill.models.registry import get_model_class

GiB = 1 << 30


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


def describe_model(args: EngineArgs, default_kv_gib: float) -> dict[str, str]:
    source = resolve_model(args.model)
    info, reader = read_model_info(source)
    arch = info.arch
    device = args.torch_device()
    dtype = args.torch_dtype(device)
    elt = torch.empty((), dtype=dtype).element_size()
    params = count_parameters(info, reader)
    kv_per_token = 2 * arch.num_layers * arch.num_kv_heads * arch.head_dim * elt
    max_len = min(arch.max_position_embeddings, args.max_model_len or 1 << 62)
    if args.num_kv_blocks:
        kv_tokens = args.num_kv_blocks * args.block_size
    else:
        budget = (args.kv_cache_memory_gib or default_kv_gib) * GiB
        kv_tokens = int(budget // (kv_per_token * args.block_size)) * args.block_size
    weights, stored = params * elt, "dequantized to the compute dtype"
    if (reader is not None and args.quantization == "auto"
            and get_model_class(arch.architecture).supports_native_gguf
            and native_gguf_available(dtype, device)):
        weights = estimate_native_bytes(reader, arch.tie_word_embeddings, elt)
        stored = "Q4_1 / Q8_0 linear weights kept as blocks, the rest dequantized"
    return {
        "model": f"{source.name} ({source.path})",
        "architecture": f"{arch.architecture} ({arch.model_type})",
        "parameters": f"{params / 1e6:.1f}M",
        "weight format": info.weight_format,
        "checkpoint size": f"{info.checkpoint_bytes / GiB:.3f} GiB",
        "layers / hidden / heads": f"{arch.num_layers} / {arch.hidden_size} / "
                                   f"{arch.num_heads} q, {arch.num_kv_heads} kv x {arch.head_dim}",
        "vocabulary": str(arch.vocab_size),
        "context length": str(arch.max_position_embeddings),
        "compute dtype": f"{str(dtype).removeprefix('torch.')} on {device}",
        "weights in memory": f"{weights / GiB:.3f} GiB ({stored})",
        "KV cache per token": f"{kv_per_token / 1024:.1f} KiB",
        "KV capacity": f"{kv_tokens} tokens ({kv_tokens * kv_per_token / GiB:.2f} GiB)",
        "max concurrency at full ctx": f"{kv_tokens / max_len:.1f} x {max_len} tokens",
        "memory needed (weights+KV)": f"{(weights + kv_tokens * kv_per_token) / GiB:.2f} GiB",
    }
