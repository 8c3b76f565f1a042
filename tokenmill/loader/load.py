"""load_model: a ModelSource -> an initialized model module, its config and its tokenizer."""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from tokenmill.errors import ModelLoadError
from tokenmill.layers.gguf_quant import native_gguf_available
from tokenmill.loader.gguf_file import gguf_metadata, open_gguf
from tokenmill.loader.gguf_native import describe_native, use_native_gguf
from tokenmill.loader.resolve import ModelSource
from tokenmill.loader.weights import (
    count_safetensors,
    gguf_rope_freq_factors,
    iter_gguf,
    iter_safetensors,
    safetensors_files,
)
from tokenmill.models.base import CausalLM
from tokenmill.models.config import ModelArchConfig, arch_config_from_gguf, arch_config_from_hf
from tokenmill.models.registry import get_model_class

logger = logging.getLogger(__name__)


@dataclass
class ModelInfo:
    """What was found in the checkpoint (for logs, `tokenmill info` and the server banner)."""

    source: ModelSource
    arch: ModelArchConfig
    weight_format: str  # e.g. "GGUF Q4_1 (210 tensors), F32 (61), Q8_0 (1)" or "safetensors bf16"
    checkpoint_bytes: int
    metadata: dict[str, Any]
    native_weights: str = ""  # quantized types the kernels run directly, e.g. "Q4_1 x210"


def read_model_info(source: ModelSource) -> tuple[ModelInfo, Any]:
    """Config and format facts without loading tensors; returns (info, gguf reader or None)."""
    if source.kind == "gguf":
        reader = open_gguf(source.path)
        meta = gguf_metadata(reader)
        arch = arch_config_from_gguf(meta, {t.name for t in reader.tensors})
        types = Counter(t.tensor_type.name for t in reader.tensors)
        fmt = "GGUF " + ", ".join(f"{k} x{v}" for k, v in types.most_common())
        size = source.path.stat().st_size
        return ModelInfo(source, arch, fmt, size, meta), reader
    cfg_path = source.path / "config.json"
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{cfg_path} cannot be read as JSON: {e}") from None
    arch = arch_config_from_hf(cfg)
    files = safetensors_files(source.path)
    size = sum(f.stat().st_size for f in files)
    dtype = cfg.get("torch_dtype") or cfg.get("dtype") or "unknown dtype"
    fmt = f"safetensors {dtype} ({len(files)} file{'s' if len(files) > 1 else ''})"
    return ModelInfo(source, arch, fmt, size, cfg), None


def load_model(source: ModelSource, dtype: torch.dtype, max_model_len: int | None = None,
               device: torch.device | str = "cpu", progress: bool = True,
               quantization: str = "auto") -> tuple[CausalLM, ModelInfo]:
    """Build the model module for `source` and stream its weights in (strict names).

    Rotary tables cover min(the model's context length, max_model_len) positions.
    `quantization="auto"` keeps a GGUF file's quantized linear weights and runs them natively
    where a kernel exists for this device and dtype; "none" dequantizes everything to `dtype`.
    """
    info, reader = read_model_info(source)
    arch = info.arch
    max_positions = min(arch.max_position_embeddings, max_model_len or 1 << 62)
    model_cls = get_model_class(arch.architecture)
    freq_factors = gguf_rope_freq_factors(reader) if reader is not None else None
    with torch.device(device):
        model = model_cls(arch, dtype, max_positions, freq_factors)
    if source.kind == "gguf":
        if arch.model_type == "gpt2":
            model.conv1d_layout = False
        total = len([t for t in reader.tensors if t.name != "rope_freqs.weight"])
        weights = iter_gguf(reader, arch.model_type, arch.num_heads, arch.num_kv_heads)
    else:
        files = safetensors_files(source.path)
        total = count_safetensors(files)
        weights = iter_safetensors(files)
    bar = tqdm(weights, total=total, desc="Loading weights", unit="tensor", disable=not progress,
               leave=False)
    model.load_weights(bar)
    if (source.kind == "gguf" and quantization == "auto" and model.supports_native_gguf
            and native_gguf_available(dtype, device)):
        info.native_weights = describe_native(use_native_gguf(model, reader, arch))
    model.process_weights_after_loading()
    model.eval()
    return model, info


def load_tokenizer(info: ModelInfo) -> Any:
    from tokenmill.engine.tokenizer import Tokenizer

    if info.source.kind == "gguf":
        return Tokenizer.from_gguf_metadata(info.metadata)
    return Tokenizer.from_hf_dir(info.source.path)
