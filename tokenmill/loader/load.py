"""load_model: a ModelSource -> an initialized model module, its config and its tokenizer."""

from __future__ import annotations

import ctypes
import dataclasses
import json
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from tokenmill.errors import ModelLoadError
from tokenmill.kernels.cpu_dense import dense_small_batch
from tokenmill.kernels.cpu_isa import select_isa
from tokenmill.kernels.cpu_ops import get_ops
from tokenmill.layers.attention import AttentionBackend
from tokenmill.layers.attention_backends import make_backend
from tokenmill.layers.lora import LoRASlots
from tokenmill.layers.parallel import TensorParallel
from tokenmill.loader.gguf_file import gguf_metadata, open_gguf
from tokenmill.loader.resolve import ModelSource
from tokenmill.loader.weights import (
    count_safetensors,
    gguf_rope_freq_factors,
    gguf_to_hf_name,
    iter_gguf,
    iter_safetensors,
    safetensors_16bit,
    safetensors_files,
)
from tokenmill.models.base import CausalLM
from tokenmill.models.config import ModelArchConfig, arch_config_from_gguf, arch_config_from_hf
from tokenmill.models.registry import get_model_class
from tokenmill.quant.base import QuantConfig
from tokenmill.quant.dense import DenseConfig, SmallBatchLinear
from tokenmill.quant.fp8 import Fp8Config, fp8_unsupported
from tokenmill.quant.gguf import GGUFQuantConfig, describe_counts

logger = logging.getLogger(__name__)


@dataclass
class ModelInfo:
    """What was found in the checkpoint (for logs, `tokenmill info` and the server banner)."""

    source: ModelSource
    arch: ModelArchConfig
    weight_format: str  # e.g. "GGUF Q4_1 (210 tensors), F32 (61), Q8_0 (1)" or "safetensors bf16"
    checkpoint_bytes: int
    metadata: dict[str, Any]
    native_weights: str = ""  # layers by the method they run, e.g. "Q4_1 x60, Q8_0 output"
    quant_reason: str = ""  # why the weights run natively or dequantized (kernel level chosen)
    backend: str = ""  # the attention / fused-ops backend and why, e.g. "cpu (C++ kernels ...)"
    # Seconds per load phase, in order: file mapping, kernel load, building the module, weights
    # (read + repack), post-processing (the start-up breakdown logged at debug level).
    load_seconds: dict[str, float] = field(default_factory=dict)

    def load_throughput_gbs(self) -> float:
        """Checkpoint bytes per second of the weights phase."""
        s = self.load_seconds.get("weights", 0.0)
        return self.checkpoint_bytes / s / 1e9 if s > 0 else float("inf")


# a sentence-transformers Pooling module's mode flags -> config.POOLING_TYPES
_ST_POOLING_MODES = {
    "pooling_mode_lasttoken": "last",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_cls_token": "cls",
}


def sentence_transformers_pooling(folder: Path) -> str | None:
    """The pooling a sentence-transformers model folder declares (its modules.json names a
    Pooling module, whose config.json sets one pooling_mode_* flag), or None: no such module, or
    a mode the engine does not have (a ModelLoadError names it)."""
    try:
        modules = json.loads((folder / "modules.json").read_text())
    except (OSError, ValueError):
        return None
    for module in modules if isinstance(modules, list) else ():
        if not isinstance(module, dict) or not str(module.get("type", "")).endswith(".Pooling"):
            continue
        path = folder / str(module.get("path", "")) / "config.json"
        try:
            cfg = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"{path} cannot be read as JSON: {e}") from None
        on = [mode for mode, flag in cfg.items() if mode.startswith("pooling_mode_") and flag]
        if len(on) != 1 or on[0] not in _ST_POOLING_MODES:
            raise ModelLoadError(
                f"{path}: pooling modes {on} are not supported (one of "
                f"{sorted(_ST_POOLING_MODES)} is)"
            )
        return _ST_POOLING_MODES[on[0]]
    return None


def read_model_info(source: ModelSource, load_format: str = "auto") -> tuple[ModelInfo, Any]:
    """Config and format facts without loading tensors; returns (info, gguf reader or None)."""
    if source.kind == "gguf":
        reader = open_gguf(source.path)
        meta = gguf_metadata(reader)
        arch = arch_config_from_gguf(meta, {t.name for t in reader.tensors})
        types = Counter(t.tensor_type.name for t in reader.tensors)
        fmt = "GGUF " + ", ".join(f"{k} x{v}" for k, v in types.most_common())
        size = sum(os.path.getsize(p) for p in reader.paths)  # every shard of a split model
        return ModelInfo(source, arch, fmt, size, meta), reader
    cfg_path = source.path / "config.json"
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{cfg_path} cannot be read as JSON: {e}") from None
    arch = arch_config_from_hf(cfg)
    pooling = sentence_transformers_pooling(source.path)
    if pooling is not None:
        arch = dataclasses.replace(arch, pooling_type=pooling)
    if load_format == "dummy":
        return ModelInfo(source, arch, "dummy (random weights)", 0, cfg), None
    files = safetensors_files(source.path)
    size = sum(f.stat().st_size for f in files)
    dtype = cfg.get("torch_dtype") or cfg.get("dtype") or "unknown dtype"
    fmt = f"safetensors {dtype} ({len(files)} file{'s' if len(files) > 1 else ''})"
    return ModelInfo(source, arch, fmt, size, cfg), None


def small_batch_linear(backend: str) -> SmallBatchLinear | None:
    """The dense linears' kernel for decode steps of a few rows under the attention / ops
    backend `backend`: Triton's skinny GEMM with the Triton backend (CUDA, or forced), unless
    TOKENMILL_SKINNY_GEMM=0 (cuBLAS for every row count: the benchmarks' baseline); the CPU's
    `dense_gemm` with the CPU backend (`kernels.cpu_dense.dense_small_batch`)."""
    if backend == "cpu":
        return dense_small_batch()
    if backend != "triton" or os.environ.get("TOKENMILL_SKINNY_GEMM", "1").strip() == "0":
        return None
    from tokenmill.kernels.triton_skinny import SkinnyLinear

    return SkinnyLinear()


def quant_config_for(
    source: ModelSource,
    reader: Any,
    arch: ModelArchConfig,
    dtype: torch.dtype,
    device: torch.device | str,
    quantization: str,
    small_batch: SmallBatchLinear | None = None,
) -> tuple[QuantConfig, str]:
    """The quantization config for this load, and why (logged, shown by `info`); dense layers
    get `small_batch` (`small_batch_linear`).

    `quantization="fp8"` quantizes the decoder's linear weights of any checkpoint at load
    (`quant/fp8.py`). A GGUF file's quantized tensors run natively when `quantization="auto"`,
    the model family takes a QuantConfig, the device is the CPU with an integer-dot kernel
    level (`kernels.cpu_isa.select_isa`) and the dtype is float32 or bfloat16; otherwise every
    weight is dequantized to `dtype`.
    """
    if quantization == "fp8":
        if not get_model_class(arch.architecture).supports_native_gguf:
            raise ModelLoadError(f"quantization='fp8' is not supported for {arch.architecture}")
        why_not = fp8_unsupported(torch.device(device), dtype)
        if why_not is not None:
            raise ModelLoadError(f"quantization='fp8': {why_not}")
        if torch.device(device).type == "cuda":
            from tokenmill.kernels.triton_ops import fp8_quantize_rows

            quant = Fp8Config(fp8_quantize_rows)
        else:
            quant = Fp8Config()
        return quant, (
            "fp8: decoder linear weights in float8 e4m3 with a scale per output channel, "
            "activations quantized per token; the output head and embedding dense"
        )
    dense = DenseConfig(small_batch)
    # F16 / BF16 tensors stay 16-bit beside float32 compute where a kernel widens them as it
    # loads them (half the bytes a decode step reads), in the families that take a QuantConfig
    takes_quant = get_model_class(arch.architecture).supports_native_gguf
    keep16 = dtype == torch.float32 and small_batch is not None and takes_quant
    if source.kind != "gguf":
        checkpoint = keep16 and any(Path(source.path).glob("*.safetensors"))
        stored = safetensors_16bit(safetensors_files(source.path)) if checkpoint else None
        if stored:
            return DenseConfig(small_batch, stored), (
                "dense checkpoint; its F16 / BF16 tensors kept in 16 bits beside float32 compute"
            )
        return dense, "dense checkpoint"
    if quantization != "auto":
        return dense, f"quantization={quantization!r}: dequantized to the compute dtype"
    if not takes_quant:
        return dense, f"no native GGUF path for {arch.architecture}: dequantized"
    if torch.device(device).type != "cpu" or dtype not in (torch.float32, torch.bfloat16):
        return dense, f"no quantized kernels for {dtype} on {device}: dequantized"
    choice = select_isa()
    ops = get_ops() if choice.quant else None
    if ops is None or not ops.quant_isa():
        why = choice.reason if not choice.quant else "the CPU kernels could not be built"
        return dense, f"{why}; dequantized"
    types = {}
    for t in reader.tensors:
        name = gguf_to_hf_name(arch.model_type, t.name)
        types[name] = (int(t.tensor_type), tuple(int(x) for x in reversed(t.shape)))
    quant = GGUFQuantConfig(types, ops, small_batch, keep16)
    return quant, f"{choice.build} kernels ({choice.reason})"


def rank_arch(arch: ModelArchConfig, tensor_parallel_size: int) -> ModelArchConfig:
    """What each of `tensor_parallel_size` ranks builds (`ModelArchConfig.shard`); raises
    ModelLoadError when the family or the model's dimensions do not allow it."""
    if not get_model_class(arch.architecture).supports_tensor_parallel:
        raise ModelLoadError(f"tensor parallelism is not supported for {arch.architecture}")
    return arch.shard(tensor_parallel_size)


def load_model(
    source: ModelSource,
    dtype: torch.dtype,
    max_model_len: int | None = None,
    device: torch.device | str = "cpu",
    progress: bool = True,
    quantization: str = "auto",
    load_format: str = "auto",
    seed: int = 0,
    tp: TensorParallel | None = None,
    lora: LoRASlots | None = None,
) -> tuple[CausalLM, ModelInfo]:
    """Build the model module for `source` and stream its weights in (strict names).

    Rotary tables cover min(the model's context length, max_model_len) positions.
    `quantization="auto"` keeps a GGUF file's quantized weights and runs them natively where a
    kernel exists for this device and dtype (`quant_config_for`); "none" dequantizes everything.
    `load_format="dummy"` (an HF folder's config.json) fills the weights with random values
    drawn from `seed` on the device instead: benchmarks of real shapes without a checkpoint.
    With `tp` (tensor parallelism), this rank's part of the model (`layers.parallel`): GGUF
    files are dequantized (the native kernels run whole matrices). With `lora`, the decoder's
    linear layers hold LoRA slots (`layers.lora`).
    """
    if load_format == "dummy" and source.kind != "hf":
        raise ModelLoadError("load_format='dummy' needs a folder with config.json")
    lap = _Laps()
    info, reader = read_model_info(source, load_format)
    info.load_seconds = lap.seconds
    lap("file mapping")
    model, quant = _build_module(
        source, info, reader, dtype, max_model_len, device, quantization, tp, lora, lap
    )
    _load_weights(model, info, source, reader, load_format, seed, progress)
    lap("weights")
    if isinstance(quant, GGUFQuantConfig):
        info.native_weights = describe_counts(quant.counts)
    model.process_weights_after_loading()
    model.eval()
    if load_format != "dummy":  # random weights leave no loader scratch behind
        _return_free_memory()
    lap("post-processing")
    return model, info


class _Laps:
    """Seconds per load phase (`ModelInfo.load_seconds`), each phase timed from the end of the
    one before; the first from the timer's creation."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def __call__(self, phase: str) -> None:
        now = time.perf_counter()
        self.seconds[phase] = now - self._last
        self._last = now


def _kernels(
    source: ModelSource,
    info: ModelInfo,
    reader: Any,
    local: ModelArchConfig,
    dtype: torch.dtype,
    device: torch.device | str,
    quantization: str,
    tp: TensorParallel | None,
) -> tuple[AttentionBackend, QuantConfig]:
    """The attention / fused-ops backend for this process's heads (`local`) and the
    quantization config (`quant_config_for`; with `tp`, "auto" dequantizes), each noted in
    `info` with why."""
    if tp is not None and quantization == "auto":
        quantization = "none"  # the native GGUF kernels run whole matrices
    backend, why = make_backend(device, dtype, local.num_heads, local.num_kv_heads, local.head_dim)
    info.backend = f"{backend.name} ({why})"
    quant, info.quant_reason = quant_config_for(
        source, reader, info.arch, dtype, device, quantization, small_batch_linear(backend.name)
    )
    if tp is not None:
        info.quant_reason += f"; rank {tp.rank} of {tp.size} (tensor parallel)"
    return backend, quant


def _build_module(
    source: ModelSource,
    info: ModelInfo,
    reader: Any,
    dtype: torch.dtype,
    max_model_len: int | None,
    device: torch.device | str,
    quantization: str,
    tp: TensorParallel | None,
    lora: LoRASlots | None,
    lap: _Laps,
) -> tuple[CausalLM, QuantConfig]:
    """The model module on `device`, its weights not read yet, and its quantization config:
    this process's share of the model (with `tp`), rotary tables of min(the context length,
    max_model_len) positions, the config where the family takes one. Times the kernel load and
    the module's construction (`lap`)."""
    arch = info.arch
    model_cls = get_model_class(arch.architecture)
    local = rank_arch(arch, tp.size) if tp is not None else arch  # what this process builds
    if lora is not None and not model_cls.supports_lora:
        raise ModelLoadError(f"LoRA adapters are not supported for {arch.architecture}")
    freq_factors = gguf_rope_freq_factors(reader) if reader is not None else None
    backend, quant = _kernels(source, info, reader, local, dtype, device, quantization, tp)
    lap("kernel load")
    kwargs: dict[str, Any] = {"backend": backend}
    if tp is not None:
        kwargs["tp"] = tp
    if lora is not None:
        kwargs["lora"] = lora
    if model_cls.supports_native_gguf:
        kwargs["quant"] = quant
    max_positions = min(arch.max_position_embeddings, max_model_len or 1 << 62)
    with torch.device(device):
        model = model_cls(local, dtype, max_positions, freq_factors, **kwargs)
    lap("module")
    return model, quant


def _load_weights(
    model: CausalLM,
    info: ModelInfo,
    source: ModelSource,
    reader: Any,
    load_format: str,
    seed: int,
    progress: bool,
) -> None:
    """Fill `model`'s weights: random ones drawn from `seed` under load_format="dummy" (the
    checkpoint's bytes are then the model's own), else the checkpoint's tensors, streamed in
    behind a progress bar."""
    if load_format == "dummy":
        _init_dummy(model, seed)
        info.checkpoint_bytes = model.weight_memory_bytes()
        return
    arch = info.arch
    if source.kind == "gguf":
        if arch.model_type == "gpt2":
            model.conv1d_layout = False
        total = len([t for t in reader.tensors if t.name != "rope_freqs.weight"])
        weights = iter_gguf(reader, arch.model_type, arch.num_heads, arch.num_kv_heads, raw=True)
    else:
        files = safetensors_files(source.path)
        total = count_safetensors(files)
        weights = iter_safetensors(files)
    bar = tqdm(
        weights,
        total=total,
        desc="Loading weights",
        unit="tensor",
        disable=not progress,
        leave=False,
    )
    model.load_weights(bar)


@torch.no_grad()
def _init_dummy(model: CausalLM, seed: int) -> None:
    """Random weights in place: matrices ~ N(0, 0.02), vectors (norms, biases) ~ 1 + N(0, 0.02)
    (a usable residual stream), the same for a given seed on a given device."""
    params = list(model.named_parameters())
    device = params[0][1].device if params else torch.device("cpu")
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    for name, p in params:
        p.normal_(0.0, 0.02, generator=g)
        if p.dim() == 1 and not name.endswith("bias"):
            p.add_(1.0)


def _return_free_memory() -> None:
    """Give the loader's freed scratch (dequantized and repacking copies) back to the OS:
    glibc keeps freed heap memory, so without this the process would stay that much larger."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
