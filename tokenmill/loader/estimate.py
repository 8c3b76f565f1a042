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
what the OS reports available (MemAvailable), on a GPU CUDA_MEMORY_UTILIZATION of the device's
memory (the share the engine fills).
"""

from __future__ import annotations

import functools
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from tokenmill.config import (
    CUDA_MEMORY_UTILIZATION,
    DEFAULT_CPU_KV_GIB,
    DTYPE_SIZES,
    EngineArgs,
    GiB,
    SpeculativeConfig,
    kv_cache_bytes_per_token,
)
from tokenmill.loader.inspect import (
    WeightMemory,
    arch_parameters,
    count_parameters,
    weight_memory,
)
from tokenmill.loader.load import rank_arch, read_model_info
from tokenmill.loader.resolve import resolve_model
from tokenmill.models.config import ModelArchConfig

# The CUDA context and cuBLAS workspaces of a process, outside torch's allocator (an H100 with
# CUDA 12-13 and lazy module loading holds about this much before the first tensor).
CUDA_CONTEXT_BYTES = GiB // 2
# One-time allocations of an engine process's first steps on the CPU, beyond its imports: the
# worker threads' stacks and allocator arenas, the GEMM libraries' buffers (the first prefill
# step of a fresh process rose 22-43 MiB above a later one of the same size).
CPU_FIRST_STEPS_BYTES = 48 << 20
# Bytes per sampled row and vocabulary entry at the sampler's peak: float32 logits, their sorted
# copy and its int64 indices (top-p / top-k sorting; what the engine's profile forward runs).
SAMPLER_BYTES_PER_LOGIT = 4 + 4 + 8


def step_peak_bytes(
    arch: ModelArchConfig,
    tokens: int,
    rows: int,
    element_size: int,
    native: bool,
    unpacked: bool = False,
) -> int:
    """The peak of a step's intermediate tensors: `tokens` tokens through a layer, then the
    logits of `rows` sampled rows (an upper bound: the sum of the two peaks).

    Per token, the larger of the attention's and the MLP's live tensors, in the compute dtype
    (`element_size` bytes) unless said otherwise:
      * always: the residual stream, the layer's delta, the normed input and a projection's
        output (4 hidden vectors);
      * attention: q, k and v, and the attention output;
      * MLP on dense weights: gate and up, the activation and the product (4 intermediate
        vectors); in float32 a fifth, the copy of the product that the float32 GEMM packs, and
        so in 16 bits where the library multiplies the weights unpacked (`unpacked`: bfloat16
        weights kept as stored for the CPU kernel's tiles or dot products, whose prefill steps
        take the library's GEMM;
        the 512 / 2368 Llama below, bfloat16, 25.7-31.8 KiB per token against 22.3-27.7
        packed, 2026-12-07);
      * MLP on the native GGUF kernels (`native`): gate and up, the fused product (3), and its
        8-bit blocks with their scales and sums, twice (the row-major blocks and the batched
        path's block-major copy: 3 bytes per intermediate channel).
    Measured on the CPU (2 threads, fresh process, peak RSS of one prefill step less the KV
    pages it wrote; 1024-4096 tokens), KiB per token against this formula's:
      * the default model, native: 33.0-33.5 in float32 (32.3), 16.2-18.7 in bfloat16 (18.4);
      * a dense Llama of 512 hidden, 2816 intermediate: 54.4-56.5 in float32 (64.5), 23.3-25.0
        in bfloat16 (26.6); of 512 / 2368: 55.0-64.7 (55.5), 21.3 (23.0).
    The CPU's prefill attention keeps per-thread tiles only, so nothing grows with the square of
    the length; nor does the Triton kernel's.
    """
    h, i = arch.hidden_size, arch.intermediate_size
    q, kv = arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim
    attention = (q + 2 * kv + q) * element_size
    if native:
        mlp = 3 * i * element_size + 3 * i
    else:
        mlp = (5 if element_size == 4 or unpacked else 4) * i * element_size
    per_token = 4 * h * element_size + max(attention, mlp)
    return tokens * per_token + rows * arch.vocab_size * SAMPLER_BYTES_PER_LOGIT


def _dense_bf16_unpacked() -> bool:
    """Whether this CPU's dense kernel keeps bfloat16 weights unpacked (it multiplies them as they
    lie: `CpuDenseLinear.bf16_path`)."""
    from tokenmill.kernels.cpu_ops import dense_small_batch

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


# What an engine process holds before its model: its imports and the CPU kernels.
_FRESH_PROCESS = (
    "from tokenmill.kernels.cpu_ops import get_ops\n"
    "import tokenmill.engine.llm_engine\n"
    "get_ops()\n"
    "print(next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmRSS:')))\n"
)


@functools.lru_cache(maxsize=1)
def fresh_process_bytes() -> int:
    """The resident size of a fresh Python process that has imported the engine and loaded
    the CPU kernels (measured once per process, in a child: the caller's own size says nothing
    of an engine's)."""
    out = subprocess.run(
        [sys.executable, "-c", _FRESH_PROCESS], capture_output=True, text=True, timeout=300
    )
    if out.returncode != 0:
        raise RuntimeError(f"measuring a fresh process failed: {out.stderr[-2000:]}")
    return int(out.stdout.split()[-1]) * 1024


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
    import torch

    arch, checkpoint, weights_of = _checkpoint(args.model)
    tp = args.tensor_parallel_size
    rank = rank_arch(arch, tp) if tp > 1 else arch
    if args.device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    else:
        device = torch.device(args.device).type
    cuda_here = device == "cuda" and torch.cuda.is_available()
    if device == "cuda" and not cuda_here and args.dtype == "auto":
        dtype = "bfloat16"
    else:
        dtype = str(args.torch_dtype(torch.device(device))).removeprefix("torch.")
    weights = weights_of(device, dtype, args)
    max_len = min(arch.max_position_embeddings, args.max_model_len or 1 << 62)
    step = args.max_num_batched_tokens
    unpacked = device == "cpu" and dtype == "bfloat16" and _dense_bf16_unpacked()

    def peak(a: ModelArchConfig, native: bool) -> int:
        """The largest step's peak for a model of shape `a` (the target's, or the draft's)."""
        rows = min(args.max_num_seqs, step)
        return step_peak_bytes(a, step, rows, DTYPE_SIZES[dtype], native, unpacked=unpacked)

    activations = peak(rank, weights.native)
    draft = _draft(args, device, dtype)
    if draft is not None:  # its weights beside the target's; its steps' peaks after the target's
        d_arch, d_checkpoint, d_weights = draft
        activations = max(activations, peak(d_arch, d_weights.native))
    if device == "cpu":
        runtime, first_steps = fresh_process_bytes(), CPU_FIRST_STEPS_BYTES
        runtime_source = (
            "Python, torch and the kernels as resident in a fresh process, and "
            f"{first_steps >> 20} MiB for the first steps' threads and buffers"
        )
    else:
        runtime, first_steps = CUDA_CONTEXT_BYTES, 0
        runtime_source = "the CUDA context and workspaces (an assumption, not measured here)"
    if memory_gib is not None:
        memory, memory_source = int(memory_gib * GiB), "--memory-gib"
    elif device == "cpu":
        memory = _proc_bytes("/proc/meminfo", "MemAvailable")
        memory_source = "available now: MemAvailable"
    elif cuda_here:
        total = torch.cuda.mem_get_info()[1]
        memory = int(CUDA_MEMORY_UTILIZATION * total)
        memory_source = (
            f"{100 * CUDA_MEMORY_UTILIZATION:.0f}% of {torch.cuda.get_device_name()}'s "
            f"{total / GiB:.1f} GiB"
        )
    else:
        raise ValueError("no GPU here: give the memory to fit in (memory_gib / --memory-gib)")
    if device == "cpu" and tp > 1:  # the ranks' processes share the machine's memory
        memory //= tp
        memory_source += f", shared by {tp} ranks"
    kv_dtype = args.kv_cache_dtype_for(device, dtype)
    bytes_per_token = kv_cache_bytes_per_token(
        rank.num_layers, rank.num_kv_heads, rank.head_dim, kv_dtype
    )
    stored = weights.stored
    if draft is not None:  # the draft's keys and values sit in the target's blocks
        d_arch, d_checkpoint, d_weights = draft
        bytes_per_token += kv_cache_bytes_per_token(
            d_arch.num_layers, d_arch.num_kv_heads, d_arch.head_dim, kv_dtype
        )
        stored += f"; draft model {d_weights.bytes / GiB:.3f} GiB of it ({d_weights.stored})"
        weights = weights._replace(bytes=weights.bytes + d_weights.bytes)
        # the draft loads after the target, whose file is unmapped by then: the loading peak is
        # the larger of (target weights + its file) and (both models' weights + the draft's file)
        checkpoint = max(checkpoint - d_weights.bytes, d_checkpoint)
    return MemoryEstimate(
        device=device,
        dtype=dtype,
        weights=weights.bytes,
        weights_stored=stored,
        runtime=runtime,
        runtime_source=runtime_source,
        first_steps=first_steps,
        checkpoint_bytes=checkpoint if device == "cpu" else 0,
        activations=activations,
        step_tokens=step,
        kv_per_token=bytes_per_token,
        kv_dtype=kv_dtype,
        max_num_seqs=args.max_num_seqs,
        max_model_len=max_len,
        memory=memory,
        memory_source=memory_source,
        tensor_parallel_size=tp,
        kv_budget=_cpu_kv_budget(args, bytes_per_token) if device == "cpu" else None,
    )


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


def _cpu_kv_budget(args: EngineArgs, bytes_per_token: int) -> int:
    """The KV bytes the engine reserves on the CPU under `args` (`EngineArgs._num_kv_blocks`)."""
    if args.num_kv_blocks is not None:
        return args.num_kv_blocks * args.block_size * bytes_per_token
    gib = DEFAULT_CPU_KV_GIB if args.kv_cache_memory_gib is None else args.kv_cache_memory_gib
    return int(gib * GiB)


def context_lengths(max_len: int) -> list[int]:
    """Powers of two from 2,048 up to `max_len`, and `max_len` itself."""
    lengths = []
    n = 2048
    while n < max_len:
        lengths.append(n)
        n *= 2
    return [*lengths, max_len]


def describe_estimate(e: MemoryEstimate, model: str) -> list[str]:
    """The lines `tokenmill estimate` prints."""

    def gib(n: int) -> str:
        return f"{n / GiB:.2f} GiB"

    per = " per rank" if e.tensor_parallel_size > 1 else ""
    full = e.kv(e.max_num_seqs, e.max_model_len)
    room = e.memory - max(e.total, e.loading_peak)
    verdict = f"fits, {gib(room)} to spare" if room >= 0 else f"does not fit: {gib(-room)} over"
    kv_note = (
        "committed as tokens are cached"
        if e.device == "cpu"
        else "reserved at start: the engine fills what the memory leaves"
    )
    rows = [
        ("model", model),
        ("device", f"{e.device}, {e.dtype}" + (f", {e.tensor_parallel_size} ranks" if per else "")),
        ("memory", f"{gib(e.memory)}{per} ({e.memory_source})"),
        ("weights", f"{gib(e.weights)}{per} ({e.weights_stored})"),
        ("runtime", f"{gib(e.runtime + e.first_steps)} ({e.runtime_source})"),
        *(
            [
                (
                    "while loading",
                    f"{gib(e.loading_peak)} (runtime, weights and the checkpoint's "
                    f"{gib(e.checkpoint_bytes)} of mapped pages)",
                )
            ]
            if e.checkpoint_bytes
            else []
        ),
        (
            "activations",
            f"{gib(e.activations)} (the largest step: {e.step_tokens} tokens, and the logits of "
            f"{min(e.max_num_seqs, e.step_tokens)} rows)",
        ),
        (
            "KV cache per token",
            f"{e.kv_per_token / 1024:.1f} KiB{per} in {e.kv_dtype} ({kv_note})",
        ),
        (
            "KV cache at full use",
            f"{gib(full)} ({e.max_num_seqs} sequences x {e.max_model_len} tokens)",
        ),
        ("total at full use", f"{gib(e.total)}"),
        ("verdict", verdict),
    ]
    if e.kv_budget is not None and e.kv_budget < full:
        rows.append(
            (
                "KV budget",
                f"{gib(e.kv_budget)} holds {e.kv_budget // e.kv_per_token} tokens: "
                f"--kv-cache-memory-gib {-(-full * 100 // GiB) / 100:.2f} for full use",
            )
        )
    lines = [f"{k:<24}{v}" for k, v in rows]
    if room < 0:
        seqs = e.sequences_that_fit(e.max_model_len)
        ctx = e.longest_context(e.max_num_seqs)
        hint = []
        if seqs:
            hint.append(f"--max-num-seqs {seqs} (at {e.max_model_len} tokens)")
        if ctx:
            hint.append(f"--max-model-len {ctx} (at {e.max_num_seqs} sequences)")
        lines.append(f"{'fits with':<24}{' or '.join(hint) if hint else 'nothing: not even one'}")
    lines.append("")
    lines.append(f"{'context':>10}{'KV per sequence':>18}{'sequences that fit':>20}")
    for n in context_lengths(e.max_model_len):
        lines.append(f"{n:>10}{e.kv(1, n) / 2**20:>14.1f} MiB{e.sequences_that_fit(n):>20}")
    return lines


__all__ = [
    "CPU_FIRST_STEPS_BYTES",
    "CUDA_CONTEXT_BYTES",
    "MemoryEstimate",
    "describe_estimate",
    "estimate_memory",
    "fresh_process_bytes",
    "step_peak_bytes",
]
