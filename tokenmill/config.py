"""EngineArgs: every engine option in one place, shared by the Python API and the CLI."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
from dataclasses import dataclass, fields
from functools import lru_cache
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported where used: `tokenmill --help` and the CLI start fast
    import torch

logger = logging.getLogger(__name__)

DTYPES = ("float32", "bfloat16", "float16")  # names of torch dtypes
DEFAULT_CPU_KV_GIB = 2.0
QUANTIZATION_MODES = ("auto", "none")
LOAD_FORMATS = ("auto", "dummy")


@lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """True on CPUs with AVX512-BF16 or AMX-BF16, where bf16 GEMMs beat float32."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


@dataclass(frozen=True)
class EngineArgs:
    """Options of the engine. Field help strings become CLI flags (`--max-num-seqs` etc.)."""

    model: str | None = dataclasses.field(
        default=None, metadata={"help": "GGUF file, HF folder or Hub id (default: embedded)"}
    )
    dtype: str = dataclasses.field(
        default="auto",
        metadata={
            "help": "auto | float32 | bfloat16 | float16 (auto: bf16 where the hardware has it)"
        },
    )
    device: str = dataclasses.field(default="auto", metadata={"help": "auto | cpu | cuda"})
    quantization: str = dataclasses.field(
        default="auto",
        metadata={
            "help": "auto | none (auto: run a GGUF file's Q4_0/Q4_1/Q5_0/Q5_1/Q8_0/Q4_K/Q5_K/Q6_K "
            "weights natively on x86 CPUs with AVX2 or better; none: dequantize all "
            "weights to the compute dtype)"
        },
    )
    load_format: str = dataclasses.field(
        default="auto",
        metadata={
            "help": "auto | dummy (dummy: random weights from the folder's config.json, for "
            "benchmarks of real shapes without a checkpoint)"
        },
    )
    max_model_len: int | None = dataclasses.field(
        default=None, metadata={"help": "context length cap (default: the model's)"}
    )
    block_size: int = dataclasses.field(default=16, metadata={"help": "KV cache block size"})
    kv_cache_memory_gib: float | None = dataclasses.field(
        default=None,
        metadata={
            "help": f"KV cache budget in GiB (default: {DEFAULT_CPU_KV_GIB} on CPU; on CUDA "
            "90%% of the GPU less what is in use and the peak of a profiled largest step)"
        },
    )
    num_kv_blocks: int | None = dataclasses.field(
        default=None, metadata={"help": "exact number of KV blocks (overrides the budget)"}
    )
    max_num_seqs: int = dataclasses.field(
        default=256, metadata={"help": "max concurrent sequences per step"}
    )
    max_num_batched_tokens: int = dataclasses.field(
        default=2048, metadata={"help": "max tokens per forward pass (prefill chunk budget)"}
    )
    enable_chunked_prefill: bool = dataclasses.field(
        default=True, metadata={"help": "split long prompts across steps"}
    )
    enable_prefix_caching: bool = dataclasses.field(
        default=True,
        metadata={
            "help": "reuse the KV blocks of identical prompt prefixes (sha256 keys, verified "
            "on every hit); --no-enable-prefix-caching turns it off"
        },
    )
    enforce_eager: bool = dataclasses.field(
        default=False,
        metadata={
            "help": "never replay CUDA graphs (decode steps are captured on CUDA by default)"
        },
    )
    seed: int = dataclasses.field(default=0, metadata={"help": "global RNG seed"})
    num_threads: int | None = dataclasses.field(
        default=None, metadata={"help": "CPU threads for torch (default: all cores)"}
    )

    def __post_init__(self) -> None:
        if self.quantization not in QUANTIZATION_MODES:
            raise ValueError(
                f"quantization must be one of {QUANTIZATION_MODES}, got {self.quantization!r}"
            )
        if self.load_format not in LOAD_FORMATS:
            raise ValueError(f"load_format must be one of {LOAD_FORMATS}, got {self.load_format!r}")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"dtype must be auto or one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be auto, cpu or cuda[:N], got {self.device!r}")
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError("max_model_len must be >= 2")
        if self.kv_cache_memory_gib is not None and self.kv_cache_memory_gib <= 0:
            raise ValueError("kv_cache_memory_gib must be > 0")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError("num_kv_blocks must be >= 1")

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> EngineArgs:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(f"unknown engine option(s): {', '.join(unknown)}")
        return cls(**kwargs)

    def torch_device(self) -> torch.device:
        import torch

        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def torch_dtype(self, device: torch.device) -> torch.dtype:
        import torch

        if self.dtype != "auto":
            return getattr(torch, self.dtype)
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if cpu_has_native_bf16() else torch.float32

    def apply_threads(self) -> None:
        import torch

        if self.num_threads:
            torch.set_num_threads(self.num_threads)

    # ---- CLI ------------------------------------------------------------------------------
    @classmethod
    def add_cli_args(cls, parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
        for f in fields(cls):
            if f.name in skip:
                continue
            flag = "--" + f.name.replace("_", "-")
            help_ = f.metadata.get("help")
            if f.type in ("bool", bool):
                parser.add_argument(
                    flag, action=argparse.BooleanOptionalAction, default=f.default, help=help_
                )
                continue
            conv = {"int | None": int, "int": int, "float | None": float, "float": float}
            parser.add_argument(
                flag, type=conv.get(str(f.type), str), default=f.default, help=help_
            )

    @classmethod
    def from_cli(cls, ns: argparse.Namespace, skip: tuple[str, ...] = ()) -> EngineArgs:
        return cls(
            **{
                f.name: getattr(ns, f.name)
                for f in fields(cls)
                if hasattr(ns, f.name) and f.name not in skip
            }
        )


def default_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
