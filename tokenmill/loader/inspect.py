"""describe_model: what `tokenmill info` prints, read from checkpoint headers (no weights)."""

from __future__ import annotations

import math
import re
from typing import Any

import torch

from tokenmill.config import EngineArgs
from tokenmill.loader.load import quant_config_for, read_model_info
from tokenmill.loader.resolve import resolve_model
from tokenmill.loader.weights import safetensors_files
from tokenmill.quant import gguf_pack as gp
from tokenmill.quant.gguf import GGUFQuantConfig

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
    quant, why = (
        quant_config_for(source, reader, arch, dtype, device, args.quantization)
        if reader is not None
        else (None, "dense checkpoint")
    )
    weights, stored = params * elt, "dequantized to the compute dtype"
    if isinstance(quant, GGUFQuantConfig):
        weights = estimate_native_bytes(reader, arch.tie_word_embeddings, elt)
        stored = "quantized blocks kept, the rest dequantized"
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
        "weights in memory": f"{weights / GiB:.3f} GiB ({stored}; file "
        f"{info.checkpoint_bytes / GiB:.3f} GiB)",
        "quantized kernels": why,
        "KV cache per token": f"{kv_per_token / 1024:.1f} KiB",
        "KV capacity": f"{kv_tokens} tokens ({kv_tokens * kv_per_token / GiB:.2f} GiB)",
        "max concurrency at full ctx": f"{kv_tokens / max_len:.1f} x {max_len} tokens",
        "memory needed (weights+KV)": f"{(weights + kv_tokens * kv_per_token) / GiB:.2f} GiB",
    }


_LINEAR = re.compile(
    r"^blk\.\d+\.(attn_q|attn_k|attn_v|attn_output|ffn_gate|ffn_up|ffn_down)"
    r"\.weight$|^output\.weight$"
)


def estimate_native_bytes(reader: Any, tie_word_embeddings: bool, element_size: int) -> int:
    """Weight memory when the native path runs (no loading): linear weights with a kernel
    layout are packed (`gguf_pack.packed_bytes`), a quantized embedding keeps its rows, a tied
    output head adds a packed copy of them, and the rest is dequantized."""
    total = 0
    for t in reader.tensors:
        shape = tuple(int(x) for x in reversed(t.shape))
        qtype = int(t.tensor_type)
        packable = len(shape) == 2 and gp.can_pack(qtype, *shape)
        if packable and _LINEAR.match(t.name):
            total += gp.packed_bytes(qtype, *shape)
        elif t.name == "token_embd.weight" and qtype not in (0, 1, 30):  # not F32/F16/BF16
            total += int(t.n_bytes)
            if tie_word_embeddings and packable:
                total += gp.packed_bytes(qtype, *shape)
        else:
            total += int(t.n_elements) * element_size
    return total
