"""estimate_memory: what a model needs in memory under the engine's options and what fits in a
device's memory, from the checkpoint's headers alone (`tokenmill estimate`; no weights read).

The figures (per device: per rank under tensor parallelism):
  * weights: as `tokenmill info` gives them (`inspect.weight_memory`; within 2% of a loaded
    model);
  * runtime: on the CPU, the resident size of a fresh process once the engine is imported and
    the kernels are loaded (what an engine process holds before its model) and
    CPU_FIRST_STEPS_BYTES; on a GPU, CUDA_CONTEXT_BYTES;
  * loading (CPU): the checkpoint's pages, mapped while the weights are read, count in the
    resident size beside the weights already built (page cache: the OS may drop them, but they
    show in the process's peak);
  * activations: the peak of the largest step (max_num_batched_tokens tokens; `step_peak_bytes`);
  * KV cache: bytes per token x the tokens held at once (max_num_seqs sequences of
    max_model_len tokens at full use). On the CPU the cache's pages are committed as they are
    written, so resident memory follows the tokens actually cached; on a GPU the engine reserves
    its whole budget at start.
With a draft model (speculative_config's `model`), its weights count beside the target's, its
keys and values in every token's bytes (they share the target's blocks), and its largest step's
peak where larger than the target's (the two models' steps run one after the other).
A folder with only config.json is enough (decide before downloading): the parameters are
counted from the architecture. The memory to fit in is `memory_gib` if given, else on the CPU
what the OS reports available (MemAvailable), on a GPU `--gpu-memory-utilization` of the
device's memory (the share the engine fills).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from tokenmill.config import (
    DTYPE_SIZES,
    EngineArgs,
    GiB,
    SpeculativeConfig,
    kv_cache_bytes_per_token,
    reserved_kv_bytes,
)
from tokenmill.loader.inspect import (
    WeightMemory,
    arch_parameters,
    count_parameters,
    weight_memory,
)
from tokenmill.loader.load import rank_arch, read_model_info
from tokenmill.loader.resolve import resolve_model
from tokenmill.loader.runtime_memory import (
    CPU_FIRST_STEPS_BYTES,
    CUDA_CONTEXT_BYTES,
    fresh_process_bytes,
    step_peak_bytes,
)
from tokenmill.models.config import ModelArchConfig


def _dense_bf16_unpacked() -> bool:
    """Whether this CPU's dense kernel keeps bfloat16 weights unpacked (it multiplies them as they
    lie: `CpuDenseLinear.bf16_path`)."""
    from tokenmill.kernels.cpu_dense import dense_small_batch

    small = dense_small_batch()
    return small is not None and bool(small.bf16_path)


def _proc_bytes(path: str, key: str) -> int:
    """A "key: N kB" line of a /proc file, in bytes (0 where there is none)."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


@dataclass(frozen=True)
class MemoryEstimate:
    """What a model needs on one device (one rank's share under tensor parallelism), in bytes,
    and the memory it has to fit in."""

    device: str  # "cpu" or "cuda"
    dtype: str  # the compute dtype
    weights: int
    weights_stored: str  # how the weights are kept
    runtime: int  # before the model: imports and kernels (CPU), the CUDA context (GPU)
    runtime_source: str
    first_steps: int  # one-time allocations of the first steps (CPU_FIRST_STEPS_BYTES; GPU 0)
    checkpoint_bytes: int  # mapped while loading (CPU; 0 on a GPU, where it is host memory)
    activations: int  # the largest step's peak
    step_tokens: int  # that step's tokens (max_num_batched_tokens)
    kv_per_token: int
    kv_dtype: str  # the KV cache's dtype (EngineArgs.kv_cache_dtype_for)
    max_num_seqs: int
    max_model_len: int  # the option, else the model's context length
    memory: int  # the memory to fit in
    memory_source: str
    tensor_parallel_size: int = 1
    # the KV budget the engine reserves on the CPU (kv_cache_memory_gib, num_kv_blocks, else
    # DEFAULT_CPU_KV_GIB); None on a GPU, where it fills what the memory leaves
    kv_budget: int | None = None

    @property
    def fixed(self) -> int:
        """What does not depend on the tokens cached: weights, runtime and activations."""
        return self.weights + self.runtime + self.first_steps + self.activations

    def kv(self, sequences: int, tokens: int) -> int:
        """KV bytes of `sequences` sequences of `tokens` tokens."""
        return sequences * tokens * self.kv_per_token

    @property
    def loading_peak(self) -> int:
        """The resident peak while the weights are read: runtime, weights and the mapped file."""
        return self.runtime + self.weights + self.checkpoint_bytes

    @property
    def total(self) -> int:
        """The memory needed at full use: max_num_seqs sequences of max_model_len tokens."""
        return self.fixed + self.kv(self.max_num_seqs, self.max_model_len)

    def sequences_that_fit(self, tokens: int) -> int:
        """How many sequences of `tokens` tokens the memory holds at once (0: not one)."""
        room = self.memory - self.fixed
        return max(0, room // (tokens * self.kv_per_token)) if room > 0 else 0

    def longest_context(self, sequences: int) -> int:
        """The most tokens each of `sequences` sequences can hold at once (0: none)."""
        room = self.memory - self.fixed
        return max(0, room // (sequences * self.kv_per_token)) if room > 0 else 0


def estimate_memory(args: EngineArgs, memory_gib: float | None = None) -> MemoryEstimate:
    """The estimate for `args` (model, dtype, device, quantization, max_model_len, max_num_seqs,
    max_num_batched_tokens, tensor_parallel_size, speculative_config's draft model), from the
    checkpoints' headers; `memory_gib`
    is the memory to fit in (see the module docstring for the default). A GPU that is not here
    is named by `device="cuda"`: its compute dtype is then bfloat16 unless `dtype` says
    otherwise, and `memory_gib` is needed."""
    arch, checkpoint, weights_of = _checkpoint(args.model)
    tp = args.tensor_parallel_size
    rank = rank_arch(arch, tp) if tp > 1 else arch
    device, dtype, cuda_here = _device_and_dtype(args)
    weights = weights_of(device, dtype, args)
    unpacked = device == "cpu" and dtype == "bfloat16" and _dense_bf16_unpacked()
    draft = _draft(args, device, dtype)
    # the draft model's steps run after the target's; its keys and values share the target's blocks
    models = [(rank, weights)]
    if draft is not None:
        d_arch, _, d_weights = draft
        models.append((d_arch, d_weights))
    runtime, first_steps, runtime_source = _runtime(device)
    memory, memory_source = _memory_to_fit(
        device, cuda_here, memory_gib, tp, args.gpu_memory_utilization
    )
    kv_dtype = args.kv_cache_dtype_for(device, dtype)
    bytes_per_token = sum(
        kv_cache_bytes_per_token(a.num_layers, a.num_kv_heads, a.head_dim, kv_dtype)
        for a, _ in models
    )
    weight_bytes, stored, checkpoint = _with_draft(weights, checkpoint, draft)
    return MemoryEstimate(
        device=device,
        dtype=dtype,
        weights=weight_bytes,
        weights_stored=stored,
        runtime=runtime,
        runtime_source=runtime_source,
        first_steps=first_steps,
        checkpoint_bytes=checkpoint if device == "cpu" else 0,
        activations=max(_step_peak(args, a, dtype, w.native, unpacked) for a, w in models),
        step_tokens=args.max_num_batched_tokens,
        kv_per_token=bytes_per_token,
        kv_dtype=kv_dtype,
        max_num_seqs=args.max_num_seqs,
        max_model_len=min(arch.max_position_embeddings, args.max_model_len or 1 << 62),
        memory=memory,
        memory_source=memory_source,
        tensor_parallel_size=tp,
        kv_budget=int(reserved_kv_bytes(args, "cpu", bytes_per_token)) if device == "cpu" else None,
    )


def _device_and_dtype(args: EngineArgs) -> tuple[str, str, bool]:
    """The device ("cpu" or "cuda"), the compute dtype's name, and whether that GPU is here (one
    that is not computes in bfloat16 unless `args.dtype` says otherwise)."""
    import torch

    if args.device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    else:
        device = torch.device(args.device).type
    cuda_here = device == "cuda" and torch.cuda.is_available()
    if device == "cuda" and not cuda_here and args.dtype == "auto":
        return device, "bfloat16", cuda_here
    dtype = str(args.torch_dtype(torch.device(device))).removeprefix("torch.")
    return device, dtype, cuda_here


def _step_peak(
    args: EngineArgs, arch: ModelArchConfig, dtype: str, native: bool, unpacked: bool
) -> int:
    """The largest step's peak for a model of shape `arch` (the target's, or the draft's):
    max_num_batched_tokens tokens, and the logits of up to max_num_seqs rows."""
    step = args.max_num_batched_tokens
    rows = min(args.max_num_seqs, step)
    return step_peak_bytes(arch, step, rows, DTYPE_SIZES[dtype], native, unpacked=unpacked)


def _runtime(device: str) -> tuple[int, int, str]:
    """What a process holds before its model, the first steps' one-time allocations, and where
    the figures come from."""
    if device != "cpu":
        why = "the CUDA context and workspaces (an assumption, not measured here)"
        return CUDA_CONTEXT_BYTES, 0, why
    why = (
        "Python, torch and the kernels as resident in a fresh process, and "
        f"{CPU_FIRST_STEPS_BYTES >> 20} MiB for the first steps' threads and buffers"
    )
    return fresh_process_bytes(), CPU_FIRST_STEPS_BYTES, why


def _memory_to_fit(
    device: str, cuda_here: bool, memory_gib: float | None, tp: int, utilization: float
) -> tuple[int, str]:
    """The memory to fit in on one device and where the figure comes from: `memory_gib`, else
    what the CPU has available, else the engine's share (`utilization`) of this GPU
    (ValueError for a GPU that is not here). The CPU's ranks share its memory."""
    import torch

    if memory_gib is not None:
        memory, memory_source = int(memory_gib * GiB), "--memory-gib"
    elif device == "cpu":
        memory = _proc_bytes("/proc/meminfo", "MemAvailable")
        memory_source = "available now: MemAvailable"
    elif cuda_here:
        total = torch.cuda.mem_get_info()[1]
        memory = int(utilization * total)
        memory_source = (
            f"{100 * utilization:.0f}% of {torch.cuda.get_device_name()}'s {total / GiB:.1f} GiB"
        )
    else:
        raise ValueError("no GPU here: give the memory to fit in (memory_gib / --memory-gib)")
    if device == "cpu" and tp > 1:  # the ranks' processes share the machine's memory
        memory //= tp
        memory_source += f", shared by {tp} ranks"
    return memory, memory_source


def _with_draft(
    weights: WeightMemory,
    checkpoint: int,
    draft: tuple[ModelArchConfig, int, WeightMemory] | None,
) -> tuple[int, str, int]:
    """The weights' bytes, how they are kept, and the checkpoint bytes mapped at the loading
    peak: the target's, and with a draft model (`_draft`) both models'."""
    if draft is None:
        return weights.bytes, weights.stored, checkpoint
    _, d_checkpoint, d_weights = draft
    stored = (
        f"{weights.stored}; draft model {d_weights.bytes / GiB:.3f} GiB of it ({d_weights.stored})"
    )
    # the draft loads after the target, whose file is unmapped by then: the loading peak is
    # the larger of (target weights + its file) and (both models' weights + the draft's file)
    return weights.bytes + d_weights.bytes, stored, max(checkpoint - d_weights.bytes, d_checkpoint)


def _checkpoint(model: str | None) -> tuple[ModelArchConfig, int, Any]:
    """A checkpoint's architecture, its bytes, and weights(device, dtype, args): its
    `WeightMemory` under `args`; from the headers. A folder with only config.json: the
    parameters from the architecture, the file's size from its declared dtype (bfloat16 if
    none)."""
    source = resolve_model(model, allow_no_weights=True)
    config_only = source.kind != "gguf" and not any(Path(source.path).glob("*.safetensors"))
    info, reader = read_model_info(source, "dummy" if config_only else "auto")
    if config_only:
        params = arch_parameters(info.arch)
        declared = info.metadata.get("torch_dtype") or info.metadata.get("dtype")
        checkpoint = params * DTYPE_SIZES.get(str(declared), 2)
    else:
        params, checkpoint = count_parameters(info, reader), info.checkpoint_bytes

    def weights(device: str, dtype: str, args: EngineArgs) -> WeightMemory:
        return weight_memory(source, reader, info.arch, params, device, dtype, args)

    return info.arch, checkpoint, weights


def _draft(
    args: EngineArgs, device: str, dtype: str
) -> tuple[ModelArchConfig, int, WeightMemory] | None:
    """Speculative decoding's draft model (`SpeculativeConfig.model`): its architecture,
    checkpoint bytes and weights, loaded as the engine loads it (one rank; the speculative
    config's quantization, else the target's); None without one."""
    if args.speculative_config is None:
        return None
    spec = SpeculativeConfig.parse(args.speculative_config)
    if spec.model is None:
        return None
    arch, checkpoint, weights_of = _checkpoint(spec.model)
    as_loaded = replace(
        args,
        quantization=spec.quantization or args.quantization,
        tensor_parallel_size=1,
        speculative_config=None,
    )
    return arch, checkpoint, weights_of(device, dtype, as_loaded)


__all__ = [
    "MemoryEstimate",
    "estimate_memory",
]
