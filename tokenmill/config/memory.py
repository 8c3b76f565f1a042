"""Memory sizes and budgets: dtype sizes, the KV cache's bytes per token, the KV budget on a GPU
and whether the CPU computes bfloat16 natively."""

from __future__ import annotations

import logging
from functools import lru_cache

logger = logging.getLogger(__name__)

GiB = 1 << 30
DTYPE_SIZES = {"float32": 4, "bfloat16": 2, "float16": 2}  # torch dtype name -> bytes
DEFAULT_CPU_KV_GIB = 2.0  # KV budget on the CPU unless kv_cache_memory_gib says otherwise
CUDA_MEMORY_UTILIZATION = 0.9  # default share of the GPU the engine may fill (weights, peak, KV)


@lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """True on CPUs with AVX512-BF16 or AMX-BF16, where bf16 GEMMs beat float32."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def kv_cache_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: str) -> int:
    """KV cache bytes of one token: a key and a value vector per layer and KV head, in `dtype`
    (a name in DTYPE_SIZES)."""
    return 2 * num_layers * num_kv_heads * head_dim * DTYPE_SIZES[dtype]


def cuda_kv_budget(
    device: str,
    peak_bytes: int,
    source: str,
    peak: str,
    utilization: float = CUDA_MEMORY_UTILIZATION,
) -> float:
    """The KV budget on a GPU: `utilization` of its memory (`--gpu-memory-utilization`), less
    what is in use now (weights, the CUDA context, other processes) and `peak_bytes` more that
    the model claims at its peak. Logged with `source` (how the peak was found) and `peak`
    (what it is)."""
    import torch

    free, total = torch.cuda.mem_get_info(device)
    budget = utilization * total - (total - free) - peak_bytes
    logger.info(
        "KV budget from %s: %.2f GiB (%.0f%% of %.1f GiB, %.2f GiB in use, %.2f GiB %s)",
        source,
        budget / GiB,
        100 * utilization,
        total / GiB,
        (total - free) / GiB,
        peak_bytes / GiB,
        peak,
    )
    return budget
