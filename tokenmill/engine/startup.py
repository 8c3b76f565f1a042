"""The engine's start-up steps that load and report: the target model (and its tensor-parallel
ranks), the speculative draft model, the exact-channel calibration, and the log lines that say
what was built, and the executors (scheduler, draft proposer, model runner) built from them.
`LLMEngine.__init__` calls them in order and keeps the objects they return."""

from __future__ import annotations

import logging
import os
import time

import torch

from tokenmill.config import (
    CacheConfig,
    EngineArgs,
    EngineConfig,
    GiB,
    ModelConfig,
    SpeculativeConfig,
)
from tokenmill.core.kv_cache_manager import KVCacheManager
from tokenmill.core.scheduler import Scheduler
from tokenmill.engine.tensor_parallel import TensorParallelWorkers, profile_budget, start_ranks
from tokenmill.layers.lora import LoRASlots
from tokenmill.loader.load import ModelInfo, load_model
from tokenmill.loader.resolve import ModelSource, resolve_model
from tokenmill.models.base import CausalLM
from tokenmill.quant.gguf import calibrate_exact_channels
from tokenmill.worker.draft import DraftProposer
from tokenmill.worker.model_runner import ModelRunner
from tokenmill.worker.profile import profile_forward

logger = logging.getLogger(__name__)

_first_engine = [True]


def seconds_since_process_start() -> float | None:
    """For the first engine of a process: the wall time since the process started (Linux
    /proc), i.e. what the imports and argument handling before the engine took. None for later
    engines and elsewhere."""
    if not _first_engine[0]:
        return None
    _first_engine[0] = False
    try:
        start_ticks = int(open("/proc/self/stat").read().rsplit(")", 1)[1].split()[19])
        uptime = float(open("/proc/uptime").read().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None


def _weights_phrase(info: ModelInfo, dtype: torch.dtype) -> str:
    """How the weights run, for the load log lines."""
    if info.native_weights:
        return f"native quantized kernels: {info.native_weights}"
    return f"weights in {str(dtype).removeprefix('torch.')}"


def load_target(
    args: EngineArgs, source: ModelSource, device: torch.device, dtype: torch.dtype
) -> tuple[TensorParallelWorkers | None, CausalLM, ModelInfo]:
    """Start the tensor-parallel ranks (if any), load the model on every rank and log what was
    loaded. A load error is passed to the ranks (so they stop) and raised."""
    t0 = time.perf_counter()
    workers = start_ranks(args, source, device, dtype)
    try:
        model, info = load_model(
            source,
            dtype,
            args.max_model_len,
            device,
            quantization=args.quantization,
            load_format=args.load_format,
            seed=args.seed,
            tp=workers.tp if workers else None,
            lora=LoRASlots(args.max_loras, args.max_lora_rank) if args.lora_enabled else None,
        )
    except Exception as e:
        if workers is not None:
            workers.loaded(f"{type(e).__name__}: {e}")
        raise
    if workers is not None:
        workers.loaded(None)
    logger.info(
        "loaded %s (%s, %s) in %.1fs (weights at %.2f GB/s); weights %.3f GB in memory "
        "(file %.3f GB), %s; %s; attention and fused ops: %s",
        source.name,
        info.arch.architecture,
        info.weight_format,
        time.perf_counter() - t0,
        info.load_throughput_gbs(),
        model.weight_memory_bytes() / 1e9,
        info.checkpoint_bytes / 1e9,
        _weights_phrase(info, dtype),
        info.quant_reason,
        info.backend,
    )
    return workers, model, info


def load_draft(
    args: EngineArgs, dtype: torch.dtype, device: torch.device, target_vocab: int
) -> tuple[CausalLM, ModelInfo] | None:
    """The draft model of speculative decoding's draft_model method and its ModelInfo,
    loaded like the target (dtype, device; quantization unless the speculative config
    names its own); None without one."""
    if args.speculative_config is None:
        return None
    spec = SpeculativeConfig.parse(args.speculative_config)
    if spec.model is None:
        return None
    model, info = load_model(
        resolve_model(spec.model),
        dtype,
        args.max_model_len,
        device,
        quantization=spec.quantization or args.quantization,
        seed=args.seed,
    )
    if info.arch.vocab_size != target_vocab:
        logger.warning(
            "the draft model's vocabulary has %d entries, the target's %d: guesses are "
            "limited to ids below %d",
            info.arch.vocab_size,
            target_vocab,
            min(target_vocab, info.arch.vocab_size),
        )
    logger.info(
        "draft model %s (%s, %s); weights %.3f GB in memory; %s",
        info.source.name,
        info.arch.architecture,
        info.weight_format,
        model.weight_memory_bytes() / 1e9,
        _weights_phrase(info, dtype),
    )
    return model, info


def calibrate(
    model: CausalLM,
    cache: CacheConfig,
    device: torch.device,
    max_model_len: int,
    exact_channels: int,
) -> float | None:
    """Pick each quantized layer's exact input channels (`calibrate_exact_channels`) with a
    scratch forward and log them; the seconds it took, or None when no layer has any."""
    t0 = time.perf_counter()
    exact = calibrate_exact_channels(
        model,
        lambda ids: profile_forward(
            model,
            len(ids),
            0,
            cache.block_size,
            cache.torch_dtype(),
            device,
            max_model_len,
            ids,
        ),
        exact_channels,
    )
    if exact is None:
        return None
    seconds = time.perf_counter() - t0
    logger.info(
        "exact channels: the %d largest input channels of each of %d quantized layers "
        "skip the 8-bit activation rounding (float32 columns, %.1f MB; found by a "
        "%d-token calibration forward in %.2f s)",
        exact.per_layer,
        exact.layers,
        exact.table_bytes / 1e6,
        exact.calibration_tokens,
        exact.seconds,
    )
    return seconds


def cuda_kv_budget(
    args: EngineArgs,
    model: CausalLM,
    device: torch.device,
    workers: TensorParallelWorkers | None,
    model_config: ModelConfig,
) -> float:
    """The KV budget on a GPU (`EngineArgs.create_engine_config`), with the peak of the
    largest step measured by a profile forward of the loaded model (on every
    tensor-parallel rank: the smallest rank's budget)."""
    profile = (
        args.max_num_batched_tokens,
        args.max_num_seqs,
        args.block_size,
        getattr(torch, args.kv_cache_dtype_for(model_config.device, model_config.dtype)),
        model_config.max_model_len,
        args.gpu_memory_utilization,
    )
    if workers is not None:
        workers.profile(*profile)
    budget = profile_budget(model, device, *profile)
    return budget if workers is None else workers.min_over_ranks(budget)


def build_executors(
    config: EngineConfig,
    model: CausalLM,
    vocab_size: int,
    device: torch.device,
    workers: TensorParallelWorkers | None,
    draft: tuple[CausalLM, ModelInfo] | None,
    startup: dict[str, float | None],
) -> tuple[Scheduler, DraftProposer | None, ModelRunner]:
    """The scheduler with its KV block manager, the draft proposer (None without a draft
    model) and the model runner (its KV pool and CUDA graphs, timed into `startup`); logs the
    speculative decoding and KV cache lines."""
    cache, max_len = config.cache, config.model.max_model_len
    scheduler = Scheduler(
        config.scheduler,
        KVCacheManager(cache.num_blocks, cache.block_size, cache.enable_prefix_caching),
    )
    if config.scheduler.speculative is not None:
        log_speculative(config.scheduler.speculative, None if draft is None else draft[1])
    # the draft model's pool mirrors the target's blocks (worker/draft.py)
    drafter = (
        None
        if draft is None
        else DraftProposer(
            draft[0],
            cache.num_blocks,
            cache.block_size,
            cache.torch_dtype(),
            device,
            min(draft[1].arch.max_position_embeddings, max_len),
            vocab_size,
        )
    )
    t1 = time.perf_counter()
    runner = ModelRunner(
        model,
        cache.num_blocks,
        cache.block_size,
        cache.torch_dtype(),
        device,
        max_len,
        config.scheduler.max_num_seqs,
        graphs=config.cuda_graphs,
        workers=workers,
    )
    graphs = runner.graphs
    startup["KV pool"] = time.perf_counter() - t1 - (graphs.capture_seconds if graphs else 0)
    if graphs is not None:
        startup["graph capture"] = graphs.capture_seconds
    log_kv_cache(cache, runner, max_len)
    return scheduler, drafter, runner


def log_speculative(spec: SpeculativeConfig, draft_info: ModelInfo | None) -> None:
    """The speculative decoding line of the start-up log."""
    logger.info(
        "speculative decoding: %s, up to %d draft tokens per decode (%s)%s",
        spec.method,
        spec.num_speculative_tokens,
        f"n-grams of {spec.prompt_lookup_min}-{spec.prompt_lookup_max} tokens"
        if draft_info is None
        else f"greedy guesses of {draft_info.source.name}",
        ""
        if spec.disable_by_batch_size is None
        else f", none above {spec.disable_by_batch_size} running sequences",
    )


def log_kv_cache(cache: CacheConfig, runner: ModelRunner, max_model_len: int) -> None:
    """The KV cache line of the start-up log: its size, what is resident, the concurrency."""
    logger.info(
        "KV cache: %d blocks x %d tokens = %d tokens (%.2f GiB reserved, %.2f GiB resident: "
        "pages are committed as blocks are written; keys and values in %s); max "
        "concurrency at full context (%d tokens): %.1f",
        cache.num_blocks,
        cache.block_size,
        cache.capacity_tokens,
        cache.reserved_bytes / GiB,
        runner.kv_pool.resident_bytes() / GiB,
        cache.dtype,
        max_model_len,
        cache.capacity_tokens / max_model_len,
    )


def log_startup(startup: dict[str, float | None]) -> dict[str, float]:
    """Log the start-up breakdown (debug level); returns it without the phases not measured."""
    measured = {k: v for k, v in startup.items() if v is not None}
    logger.debug(
        "start-up breakdown: %s; total %.2f s",
        ", ".join(f"{k} {v:.2f} s" for k, v in measured.items()),
        sum(measured.values()),
    )
    return measured
