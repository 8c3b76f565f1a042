"""EngineArgs: every engine option in one place, shared by the Python API and the CLI, and the one
place they are resolved against a model into an EngineConfig (`EngineArgs.create_engine_config`)."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

from tokenmill.config import resolve
from tokenmill.config.engine_config import (
    LOAD_FORMATS,
    POOLING_TYPES,
    QUANTIZATION_MODES,
    EngineConfig,
    ModelConfig,
    SpeculativeConfig,
)
from tokenmill.config.memory import (
    CUDA_MEMORY_UTILIZATION,
    DEFAULT_CPU_KV_GIB,
    DTYPE_SIZES,
    cpu_has_native_bf16,
)
from tokenmill.config.resolve import DEFAULT_CUDA_SCHEDULER_STEPS

if TYPE_CHECKING:  # torch is imported where used: `tokenmill --help` and the CLI start fast
    import torch

logger = logging.getLogger(__name__)

MAX_EXACT_CHANNELS = 16  # QuantLinear::kMaxExactChannels (kernels/csrc/quant_gemm.h)


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
            "help": "auto | none | fp8 (auto: run a GGUF file's Q4_0/Q4_1/Q5_0/Q5_1/Q8_0/Q2_K/"
            "Q3_K/Q4_K/Q5_K/Q6_K/IQ4_NL/IQ4_XS weights natively on x86 CPUs with AVX2 or "
            "better; none: dequantize all weights to the compute dtype; fp8: quantize the "
            "decoder's linear weights at load to float8 e4m3 with a scale per output channel, "
            "activations per token (GPUs of compute capability 8.9+, bfloat16))"
        },
    )
    exact_channels: int = dataclasses.field(
        default=8,
        metadata={
            "help": "input channels per quantized layer that skip the 8-bit activation "
            "rounding (native GGUF kernels): the largest ones, found at start-up from a "
            "64-token calibration forward, multiply their weight columns in float32 (0: off)"
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
    kv_cache_dtype: str = dataclasses.field(
        default="auto",
        metadata={
            "help": "auto | float32 | bfloat16 | float16: the keys' and values' dtype (auto: "
            "the compute dtype, but float16 on a CPU where auto chose float32 compute for "
            "want of native bfloat16: llama.cpp's default, half the memory and half the bytes "
            "a decode step's attention reads)"
        },
    )
    gpu_memory_utilization: float = dataclasses.field(
        default=CUDA_MEMORY_UTILIZATION,
        metadata={
            "help": "share of a GPU's memory the engine may fill: weights, the largest "
            "step's peak and, in what is left, the KV cache (vLLM's option; CUDA only)"
        },
    )
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
    num_scheduler_steps: int | None = dataclasses.field(
        default=None,
        metadata={
            "help": "decode steps per scheduling round, replayed back to back with the sampled "
            "tokens fed back on the GPU and one copy to the host per round (needs CUDA graphs; "
            f"default {DEFAULT_CUDA_SCHEDULER_STEPS} with them, else 1)"
        },
    )
    enforce_eager: bool = dataclasses.field(
        default=False,
        metadata={
            "help": "never replay CUDA graphs (decode steps are captured on CUDA by default)"
        },
    )
    pooling_type: str | None = dataclasses.field(
        default=None,
        metadata={
            "help": "last | mean | cls: how /v1/embeddings pools the prompt's final hidden "
            "states (default: what the checkpoint declares, a GGUF pooling_type or a "
            "sentence-transformers 1_Pooling config, else last)"
        },
    )
    speculative_config: str | dict | None = dataclasses.field(
        default=None,
        metadata={
            "help": 'speculative decoding, as JSON (vLLM\'s form), e.g. \'{"method": "ngram", '
            '"num_speculative_tokens": 4, "prompt_lookup_max": 4}\' (drafts by prompt lookup) '
            'or \'{"model": "draft.gguf", "num_speculative_tokens": 4}\' (by a smaller model '
            "of the same vocabulary), checked in the same forward pass (same output "
            "distribution)"
        },
    )
    enable_lora: bool = dataclasses.field(
        default=False,
        metadata={
            "help": "serve LoRA adapters (PEFT folders) beside the base model: each request "
            "may name one (Llama family)"
        },
    )
    max_loras: int = dataclasses.field(
        default=4, metadata={"help": "distinct LoRA adapters in one step (with --enable-lora)"}
    )
    max_lora_rank: int = dataclasses.field(
        default=16, metadata={"help": "the largest LoRA rank an adapter may have"}
    )
    lora_modules: str | None = dataclasses.field(
        default=None,
        metadata={
            "help": "adapters to serve from the start, as NAME=PATH[,NAME=PATH...] (implies "
            "--enable-lora); a request picks one by its model name"
        },
    )
    tensor_parallel_size: int = dataclasses.field(
        default=1,
        metadata={
            "help": "ranks (processes; one GPU each on CUDA) that split every layer's heads "
            "and MLP width, summed by torch.distributed all-reduces (Llama family)"
        },
    )
    chat_template: str | None = dataclasses.field(
        default=None,
        metadata={
            "help": "a Jinja chat template, or a file holding one, to render conversations "
            "with instead of the model's own (vLLM's --chat-template)"
        },
    )
    generation_config: str = dataclasses.field(
        default="auto",
        metadata={
            "help": "where the sampling defaults of requests that leave them out come from "
            "(vLLM's option): auto (the model's generation_config.json, or a GGUF file's "
            "general.sampling keys), vllm (none: the API's defaults), or a folder holding a "
            "generation_config.json"
        },
    )
    seed: int = dataclasses.field(default=0, metadata={"help": "global RNG seed"})
    num_threads: int | None = dataclasses.field(
        default=None, metadata={"help": "CPU threads for torch (default: all cores)"}
    )

    def __post_init__(self) -> None:
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(
                f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}"
            )
        template = self.chat_template
        if template is not None and not _looks_like_template(template):
            raise ValueError(
                f"chat_template {template[:80]!r} is neither a file nor a Jinja template"
            )
        if self.quantization not in QUANTIZATION_MODES:
            raise ValueError(
                f"quantization must be one of {QUANTIZATION_MODES}, got {self.quantization!r}"
            )
        if not 0 <= self.exact_channels <= MAX_EXACT_CHANNELS:
            raise ValueError(
                f"exact_channels must be in [0, {MAX_EXACT_CHANNELS}], got {self.exact_channels}"
            )
        if self.load_format not in LOAD_FORMATS:
            raise ValueError(f"load_format must be one of {LOAD_FORMATS}, got {self.load_format!r}")
        for name in ("dtype", "kv_cache_dtype"):
            value = getattr(self, name)
            if value != "auto" and value not in DTYPE_SIZES:
                raise ValueError(
                    f"{name} must be auto or one of {sorted(DTYPE_SIZES)}, got {value!r}"
                )
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
        if self.num_scheduler_steps is not None and self.num_scheduler_steps < 1:
            raise ValueError("num_scheduler_steps must be >= 1")
        if self.tensor_parallel_size < 1:
            raise ValueError("tensor_parallel_size must be >= 1")
        if self.max_loras < 1 or self.max_lora_rank < 1:
            raise ValueError("max_loras and max_lora_rank must be >= 1")
        if self.lora_modules is not None:
            self.lora_module_paths()  # errors now, not at load
        if self.tensor_parallel_size > 1 and (self.num_scheduler_steps or 1) > 1:
            raise ValueError("num_scheduler_steps > 1 runs on one rank (tensor_parallel_size 1)")
        if self.speculative_config is not None:
            spec = SpeculativeConfig.parse(self.speculative_config)  # errors now, not at load
            if spec.model is not None and self.tensor_parallel_size > 1:
                raise ValueError("a draft model runs on one rank (tensor_parallel_size 1)")
        if self.pooling_type is not None and self.pooling_type not in POOLING_TYPES:
            raise ValueError(
                f"pooling_type must be one of {POOLING_TYPES}, got {self.pooling_type!r}"
            )

    @property
    def lora_enabled(self) -> bool:
        return self.enable_lora or self.lora_modules is not None

    def lora_module_paths(self) -> dict[str, str]:
        """`lora_modules` as {name: path}: a dict, or NAME=PATH pairs separated by commas."""
        if self.lora_modules is None:
            return {}
        if isinstance(self.lora_modules, dict):
            return dict(self.lora_modules)
        out = {}
        for item in self.lora_modules.split(","):
            name, sep, path = item.strip().partition("=")
            if not sep or not name.strip() or not path.strip():
                raise ValueError(f"lora_modules: expected NAME=PATH, got {item.strip()!r}")
            out[name.strip()] = path.strip()
        return out

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

    def kv_cache_dtype_for(self, device: str, dtype: str) -> str:
        """The KV cache's dtype (a DTYPE_SIZES name) on `device` ("cpu", "cuda[:N]") with
        compute dtype `dtype` as resolved: the option, or with auto the compute dtype, except
        float16 on a CPU whose compute dtype auto chose float32 (no native bfloat16). Keys and
        values then round to float16 (a relative error of at most 2^-11), as llama.cpp's cache
        does by default; an explicit `dtype` float32 keeps a float32 cache."""
        if self.kv_cache_dtype != "auto":
            return self.kv_cache_dtype
        if device == "cpu" and self.dtype == "auto" and dtype == "float32":
            return "float16"
        return dtype

    def create_engine_config(
        self,
        model_info: Any,
        kv_budget_bytes: Callable[[ModelConfig], float] | None = None,
        graphs_supported: bool = True,
        draft_arch: Any = None,
    ) -> EngineConfig:
        """Resolve the options against a model: the one place where the device, the dtypes (compute
        and KV cache), the number of KV blocks and the maximum length are decided.

        `model_info` is the loader's ModelInfo (its `source` and `arch` are read; no weights).
        The KV cache gets `num_kv_blocks` blocks if set, else as many as a budget holds:
        `kv_cache_memory_gib` if set, else DEFAULT_CPU_KV_GIB on the CPU, else on a GPU
        `kv_budget_bytes(model)` (the model's config before the KV cap), which measures the
        device: the engine profiles the loaded model (see `cuda_kv_budget`). Without it a GPU
        needs one of the two options. max_model_len is the model's context length, capped by
        the option and by the KV capacity (with a warning). CUDA graphs are on for a CUDA
        device unless enforce_eager or the attention backend cannot be captured
        (`graphs_supported`); multi-step decoding (num_scheduler_steps) needs them, and is off
        by default with speculative decoding (the two exclude each other) and with tensor
        parallelism (one rank feeds its tokens back). Under tensor parallelism the budget and
        the cache's bytes per token are each rank's (its share of the KV heads). With a draft
        model (`draft_arch`, its ModelArchConfig) every block also holds the draft's keys and
        values, so a token costs both models' bytes.
        """
        device = self.torch_device()
        model = resolve.model_config(self, model_info, device)
        cache = resolve.cache_config(self, model, model_info.arch, draft_arch, kv_budget_bytes)
        model = resolve.capped_to_cache(model, cache)
        cuda_graphs = device.type == "cuda" and not self.enforce_eager and graphs_supported
        scheduler = resolve.scheduler_config(self, model.max_model_len, cuda_graphs)
        return EngineConfig(model, cache, scheduler, cuda_graphs, self.tensor_parallel_size)

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


def _looks_like_template(value: str) -> bool:
    """A chat template option names a file, or is a template itself (it has Jinja tags)."""
    return os.path.isfile(value) or "{{" in value or "{%" in value
