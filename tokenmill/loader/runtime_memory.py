"""What an engine holds beside its weights and KV cache, for `estimate_memory`: the runtime (the
resident size of a fresh engine process, the first steps' one-time allocations on the CPU, the
CUDA context on a GPU) and the peak of a step's intermediate tensors (`step_peak_bytes`).
"""

from __future__ import annotations

import functools
import subprocess
import sys

from tokenmill.config import GiB
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


__all__ = [
    "CPU_FIRST_STEPS_BYTES",
    "CUDA_CONTEXT_BYTES",
    "fresh_process_bytes",
    "step_peak_bytes",
]
