"""Streaming tensor iterators over safetensors folders and GGUF files (no pickle, ever)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tokenmill.errors import ModelLoadError


# ---- safetensors ------------------------------------------------------------------------
def safetensors_files(folder: Path) -> list[Path]:
    """The shards named by model.safetensors.index.json, or every *.safetensors file."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as e:
            raise ModelLoadError(f"{index} is not a valid safetensors index: {e}") from None
        files = [folder / f for f in sorted(set(weight_map.values()))]
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise ModelLoadError(f"shards listed in {index.name} are missing: {', '.join(absent)}")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"no *.safetensors files in {folder}")
    return files


def iter_safetensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    for path in files:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
        header_len = int.from_bytes(head, "little") if len(head) == 8 else -1
        if header_len < 2 or header_len + 8 > size:
            raise ModelLoadError(f"{path} is not a valid safetensors file (truncated or corrupt)")
        try:
            handle = safe_open(str(path), framework="pt")
        except Exception as e:
            raise ModelLoadError(f"{path} is not a valid safetensors file: {e}") from None
        with handle:
            for name in handle.keys():
                try:
                    tensor = handle.get_tensor(name)
                except Exception as e:
                    raise ModelLoadError(f"{path}: tensor {name!r} cannot be read: {e}") from None
                yield name, tensor


# safetensors' dtype names of the 16-bit floats a dense weight may keep (DenseConfig.stored)
_SAFETENSORS_16BIT = {"F16": torch.float16, "BF16": torch.bfloat16}


def safetensors_16bit(files: list[Path]) -> dict[str, torch.dtype]:
    """The F16 / BF16 tensors of a safetensors checkpoint and their dtypes, from the headers."""
    from safetensors import safe_open

    found = {}
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as h:
                for name in h.keys():
                    dtype = _SAFETENSORS_16BIT.get(h.get_slice(name).get_dtype())
                    if dtype is not None:
                        found[name] = dtype
        except Exception as e:
            raise ModelLoadError(f"{path} is not a valid safetensors file: {e}") from None
    return found


def count_safetensors(files: list[Path]) -> int:
    from safetensors import safe_open

    total = 0
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as h:
                total += len(list(h.keys()))
        except Exception as e:
            raise ModelLoadError(f"{path} is not a valid safetensors file: {e}") from None
    return total


# ---- GGUF -------------------------------------------------------------------------------
@dataclass(frozen=True)
class RawGGUFTensor:
    """A tensor exactly as stored: quantized blocks and their type, for native quant kernels."""

    name: str
    ggml_type: Any  # gguf.GGMLQuantizationType
    shape: tuple[int, ...]  # logical shape, PyTorch order ([out, in] for weights)
    data: np.ndarray  # memory-mapped bytes / values ([rows, row bytes] when quantized)

    def dequantize(self) -> torch.Tensor:
        """The dense tensor (float32, or F16 / BF16 as stored); errors name the tensor."""
        return _to_torch(self.name, self.ggml_type, self.shape, self.data)


_LLAMA_GGUF = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LLAMA_GGUF_LAYER = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GPT2_GGUF = {
    "token_embd.weight": "wte.weight",
    "position_embd.weight": "wpe.weight",
    "output_norm.weight": "ln_f.weight",
    "output_norm.bias": "ln_f.bias",
    "output.weight": "lm_head.weight",
}
_GPT2_GGUF_LAYER = {
    "attn_norm": "ln_1",
    "attn_qkv": "attn.c_attn",
    "attn_output": "attn.c_proj",
    "ffn_norm": "ln_2",
    "ffn_up": "mlp.c_fc",
    "ffn_down": "mlp.c_proj",
}
GGUF_NAME_TABLES = {
    "llama": (_LLAMA_GGUF, _LLAMA_GGUF_LAYER, "model.layers"),
    "qwen2": (_LLAMA_GGUF, _LLAMA_GGUF_LAYER, "model.layers"),
    "qwen3": (_LLAMA_GGUF, _LLAMA_GGUF_LAYER, "model.layers"),
    "gpt2": (_GPT2_GGUF, _GPT2_GGUF_LAYER, "h"),
}
_BLK = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")
# Tensors llama.cpp writes that are not module parameters.
GGUF_SPECIAL = ("rope_freqs.weight",)


def gguf_to_hf_name(arch: str, name: str) -> str:
    top, per_layer, prefix = GGUF_NAME_TABLES[arch]
    if name in top:
        return top[name]
    m = _BLK.match(name)
    if m and m.group(2) in per_layer:
        return f"{prefix}.{m.group(1)}.{per_layer[m.group(2)]}.{m.group(3)}"
    return name  # reported as unexpected by the strict loader


def _unpermute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row permutation (interleaved rotary pairs -> rotate-half halves)."""
    rows = w.shape[0]
    half = rows // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _to_torch(name: str, ggml_type: Any, shape: tuple[int, ...], data: np.ndarray) -> torch.Tensor:
    from gguf import GGMLQuantizationType as QT
    from gguf.quants import dequantize

    try:
        if ggml_type in (QT.F32, QT.F16):
            return torch.from_numpy(np.array(data)).reshape(shape)
        if ggml_type == QT.BF16:
            raw = np.array(data).view(np.int16)
            return torch.from_numpy(raw).view(torch.bfloat16).reshape(shape)
        arr = dequantize(data, ggml_type)
    except NotImplementedError:
        raise ModelLoadError(
            f"GGUF tensor {name!r} uses quantization type {ggml_type.name}, which the gguf "
            "package cannot dequantize"
        ) from None
    except (ValueError, IndexError, TypeError) as e:
        raise ModelLoadError(f"GGUF tensor {name!r} cannot be read: {e}") from None
    return torch.from_numpy(np.ascontiguousarray(arr)).reshape(shape)


def gguf_tensor_to_torch(t: Any) -> torch.Tensor:
    """Dequantize one GGUF tensor to a float tensor in PyTorch order ([out, in])."""
    return _to_torch(t.name, t.tensor_type, tuple(int(x) for x in reversed(t.shape)), t.data)


def iter_gguf(
    reader: Any, arch: str, num_heads: int, num_kv_heads: int, raw: bool = False
) -> Iterator[tuple[str, Any]]:
    """(HF name, tensor) pairs; `raw=True` yields RawGGUFTensor (blocks as stored, rows in the
    model's order) instead of dequantizing, so the layer's quant method decides."""
    for t in reader.tensors:
        if t.name in GGUF_SPECIAL:
            continue
        hf_name = gguf_to_hf_name(arch, t.name)
        shape = tuple(int(x) for x in reversed(t.shape))
        heads = _qk_heads(arch, hf_name, num_heads, num_kv_heads)
        if raw:
            data = t.data
            if heads:  # rows are output features: whole quantized rows move
                data = _unpermute_qk(torch.from_numpy(np.array(data)), heads).numpy()
            yield hf_name, RawGGUFTensor(t.name, t.tensor_type, shape, data)
            continue
        tensor = gguf_tensor_to_torch(t)
        yield hf_name, _unpermute_qk(tensor, heads) if heads else tensor


def _qk_heads(arch: str, hf_name: str, num_heads: int, num_kv_heads: int) -> int:
    """Head count whose row permutation llama.cpp applied to this tensor (0: none)."""
    if arch != "llama":
        return 0
    if hf_name.endswith(("q_proj.weight", "q_proj.bias")):
        return num_heads
    if hf_name.endswith(("k_proj.weight", "k_proj.bias")):
        return num_kv_heads
    return 0


def gguf_rope_freq_factors(reader: Any) -> torch.Tensor | None:
    for t in reader.tensors:
        if t.name == "rope_freqs.weight":
            return gguf_tensor_to_torch(t).float()
    return None
