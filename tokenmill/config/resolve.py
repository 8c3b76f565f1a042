"""The parts of `EngineArgs.create_engine_config`, the one place the options are resolved against
a model: the model as the engine runs it (device, dtype, maximum length), the KV cache (its dtype,
bytes per token and number of blocks) and the scheduler (its steps per round)."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from tokenmill.config.engine_config import (
    CacheConfig,
    ModelConfig,
    SchedulerConfig,
    SpeculativeConfig,
)
from tokenmill.config.memory import DEFAULT_CPU_KV_GIB, GiB, kv_cache_bytes_per_token

if TYPE_CHECKING:  # torch is imported where used: `tokenmill --help` and the CLI start fast
    import torch

    from tokenmill.config.engine_args import EngineArgs

logger = logging.getLogger(__name__)

# Decode steps per scheduling round with CUDA graphs (num_scheduler_steps): measured on an H200
# with Llama-3.2-1B shapes, batch 1 (benchmarks/gpu_bench.py, "scheduler_steps").
DEFAULT_CUDA_SCHEDULER_STEPS = 8


def model_config(args: EngineArgs, model_info: Any, device: torch.device) -> ModelConfig:
    """The model as the engine runs it, before the KV capacity caps its length."""
    source, arch = model_info.source, model_info.arch
    return ModelConfig(
        name=source.name,
        path=str(source.path),
        architecture=arch.architecture,
        max_position_embeddings=arch.max_position_embeddings,
        dtype=str(args.torch_dtype(device)).removeprefix("torch."),
        device=str(device),
        max_model_len=min(arch.max_position_embeddings, args.max_model_len or 1 << 62),
        quantization=args.quantization,
        load_format=args.load_format,
        pooling_type=args.pooling_type or arch.pooling_type or "last",
    )


def cache_config(
    args: EngineArgs,
    model: ModelConfig,
    arch: Any,
    draft_arch: Any,
    kv_budget_bytes: Callable[[ModelConfig], float] | None,
) -> CacheConfig:
    """The KV cache: its dtype, each rank's bytes per token (with a draft model, the draft's
    keys and values too) and its number of blocks."""
    tp = args.tensor_parallel_size
    if arch.num_kv_heads % tp:
        raise ValueError(
            f"tensor_parallel_size {tp} must divide the model's key/value heads "
            f"({arch.num_kv_heads})"
        )
    kv_dtype = args.kv_cache_dtype_for(model.device, model.dtype)
    bytes_per_token = kv_cache_bytes_per_token(  # on each rank: its share of the KV heads
        arch.num_layers, arch.num_kv_heads // tp, arch.head_dim, kv_dtype
    )
    if draft_arch is not None:
        bytes_per_token += kv_cache_bytes_per_token(
            draft_arch.num_layers, draft_arch.num_kv_heads, draft_arch.head_dim, kv_dtype
        )
    return CacheConfig(
        args.block_size,
        num_kv_blocks(args, model, bytes_per_token, kv_budget_bytes),
        bytes_per_token,
        args.enable_prefix_caching,
        kv_dtype,
    )


def reserved_kv_bytes(
    args: EngineArgs,
    device: str,
    bytes_per_token: int,
    profiled: Callable[[], float] | None = None,
) -> float:
    """The KV bytes to reserve on `device`: num_kv_blocks' worth, else kv_cache_memory_gib, else
    the CPU's default, else (on a GPU) the memory profile `profiled` measures."""
    if args.num_kv_blocks is not None:
        return args.num_kv_blocks * args.block_size * bytes_per_token
    if args.kv_cache_memory_gib is not None:
        return args.kv_cache_memory_gib * GiB
    if device == "cpu":
        return DEFAULT_CPU_KV_GIB * GiB
    if profiled is not None:
        return profiled()
    raise ValueError(
        f"the KV budget on {device} needs a memory profile: set kv_cache_memory_gib or "
        "num_kv_blocks"
    )


def num_kv_blocks(
    args: EngineArgs,
    model: ModelConfig,
    bytes_per_token: int,
    kv_budget: Callable[[ModelConfig], float] | None,
) -> int:
    """The number of KV blocks: the option, else as many as `reserved_kv_bytes` holds
    (see `EngineArgs.create_engine_config`)."""
    if args.num_kv_blocks is not None:
        return args.num_kv_blocks
    profiled = None if kv_budget is None else lambda: kv_budget(model)
    budget = reserved_kv_bytes(args, model.device, bytes_per_token, profiled)
    num_blocks = int(budget // (bytes_per_token * args.block_size))
    if num_blocks < 1:
        raise ValueError(
            f"KV cache budget of {budget / GiB:.3f} GiB holds no block "
            f"({bytes_per_token * args.block_size} bytes each)"
        )
    return num_blocks


def capped_to_cache(model: ModelConfig, cache: CacheConfig) -> ModelConfig:
    """The model with max_model_len capped by the KV capacity (with a warning)."""
    if model.max_model_len <= cache.capacity_tokens:
        return model
    logger.warning(
        "max_model_len %d exceeds the KV capacity; capping it to %d tokens",
        model.max_model_len,
        cache.capacity_tokens,
    )
    return dataclasses.replace(model, max_model_len=cache.capacity_tokens)


def scheduler_config(args: EngineArgs, max_model_len: int, cuda_graphs: bool) -> SchedulerConfig:
    """The scheduler: its limits, the decode steps per round (DEFAULT_CUDA_SCHEDULER_STEPS with
    CUDA graphs unless speculative decoding or tensor parallelism needs one), the draft, and
    the LoRA slots."""
    spec = args.speculative_config
    speculative = None if spec is None else SpeculativeConfig.parse(spec)
    steps = args.num_scheduler_steps
    if steps is None:
        single = speculative is not None or args.tensor_parallel_size > 1
        steps = DEFAULT_CUDA_SCHEDULER_STEPS if cuda_graphs and not single else 1
    elif steps > 1 and not cuda_graphs:
        raise ValueError(
            "num_scheduler_steps > 1 needs CUDA graphs (a CUDA device, an attention backend "
            "that can be captured, and no --enforce-eager)"
        )
    return SchedulerConfig(
        args.max_num_batched_tokens,
        args.max_num_seqs,
        max_model_len,
        args.enable_chunked_prefill,
        steps,
        speculative,
        args.max_loras if args.lora_enabled else 0,
    )
