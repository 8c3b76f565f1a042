"""Run a GGUF model's quantized linear weights natively instead of dequantized.

Called after the strict dense load (which validated every name and shape): each Linear whose
GGUF tensors all have a native kernel type gets those blocks, packed for the kernel, and drops
its dense copy. A tied output head gets a packed copy of the token embedding (the dense table
stays for the lookup). Layers with other types keep their dense weights.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from typing import Any

import torch

from tokenmill.layers.gguf_quant import GGUFLinearMethod, can_pack, pack_gguf_blocks
from tokenmill.layers.linear import Linear
from tokenmill.loader.weights import RawGGUFTensor, iter_gguf
from tokenmill.models.base import CausalLM
from tokenmill.models.config import ModelArchConfig


def _packable(raw: RawGGUFTensor) -> bool:
    return len(raw.shape) == 2 and can_pack(int(raw.ggml_type), *raw.shape)


def _attach(layer: Linear, parts: list[RawGGUFTensor]) -> str:
    """Give `layer` the packed blocks of its shards (one type); returns the type's name."""
    method = GGUFLinearMethod(int(parts[0].ggml_type))
    layer.quant_method = method
    method.set_packed(layer, torch.cat([pack_gguf_blocks(r.data, int(r.ggml_type), *r.shape)
                                        for r in parts]))
    return method.name


def use_native_gguf(model: CausalLM, reader: Any, arch: ModelArchConfig) -> Counter:
    """Swap in native GGUF weights where possible; returns a count of layers by type name
    (the output head counted as "<type> output")."""
    shards: dict[str, dict[str, RawGGUFTensor]] = defaultdict(dict)
    embedding: RawGGUFTensor | None = None
    for hf_name, raw in iter_gguf(reader, arch.model_type, arch.num_heads, arch.num_kv_heads,
                                  raw=True):
        if hf_name == "model.embed_tokens.weight":
            embedding = raw
        resolved = model.resolve_param(hf_name)
        if resolved is None or not resolved[1].endswith(".weight"):
            continue
        module_name, shard = resolved[1].rsplit(".", 1)[0], resolved[2]
        try:
            module = model.get_submodule(module_name)
        except AttributeError:
            continue
        if isinstance(module, Linear):
            shards[module_name][shard] = raw

    counts: Counter = Counter()
    for module_name, parts in shards.items():
        module = model.get_submodule(module_name)
        ordered = [parts.get(s) for s in module.output_sizes]
        if any(r is None or not _packable(r) for r in ordered):
            continue
        if len({int(r.ggml_type) for r in ordered}) == 1:
            counts[_attach(module, ordered)] += 1

    if arch.tie_word_embeddings and embedding is not None and _packable(embedding):
        vocab, hidden = embedding.shape
        with torch.device("meta"):  # no dense weight is ever allocated
            head = Linear(hidden, vocab)
        counts[f"{_attach(head, [embedding])} output"] += 1
        model.native_head = head
    return counts


_LINEAR_GGUF = re.compile(r"^blk\.\d+\.(attn_q|attn_k|attn_v|attn_output|ffn_gate|ffn_up|ffn_down)"
                          r"\.weight$")


def estimate_native_bytes(reader: Any, tie_word_embeddings: bool, element_size: int) -> int:
    """Estimated weight memory when the native path runs (`tokenmill info`, no loading): linear
    weights of native types keep their blocks, the rest is dequantized; a tied output head adds
    a packed copy of the embedding table."""
    total = 0
    for t in reader.tensors:
        shape = tuple(int(x) for x in reversed(t.shape))
        packable = len(shape) == 2 and can_pack(int(t.tensor_type), *shape)
        if packable and _LINEAR_GGUF.match(t.name):
            total += int(t.n_bytes)
            continue
        total += int(t.n_elements) * element_size
        if t.name == "token_embd.weight" and tie_word_embeddings and packable:
            total += int(t.n_bytes)
    return total


def describe_native(counts: Counter) -> str:
    """'Q4_1 x210, Q8_0 output' style summary (empty when nothing runs natively)."""
    return ", ".join(f"{name} x{n}" if not name.endswith("output") else name
                     for name, n in counts.most_common())
