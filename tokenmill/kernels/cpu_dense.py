"""The dense linears' small-batch kernel on the CPU: `CpuDenseLinear` (`dense_gemm` of the
compiled kernels) and `dense_small_batch`, which the loader gives the CPU backend's models.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from tokenmill.kernels.cpu_ops import get_ops


class CpuDenseLinear:
    """`quant.dense.SmallBatchLinear` on the CPU: `dense_gemm` on float32, float16 or bfloat16
    weights (the sums in float32). Steps of up to 8 rows stream each weight row once, several
    side by side, 16-bit weights widened as they load, where the library's matrix-vector product
    read DRAM at 11-19 GB/s of the 26 two cores can (AMD Zen 3, float32). 16-bit weights beside
    float32 compute take every row count (larger steps widen L2-sized blocks of rows for the
    library's GEMM, where a float32 copy of the whole weight per call ran 1.3-8x slower from 16
    rows on, Sapphire Rapids, 2 threads); so do bfloat16 weights in bfloat16 compute where the
    kernel multiplies them as they lie (`bf16_path`: the AMX tiles on the amx level, AVX512-BF16
    dot products on an AVX-512 level whose CPU has them), which elsewhere oneDNN takes at every
    row count. The GLU and add + RMSNorm entry points run the fused CPU op, then
    the kernel."""

    max_stream_rows = 8

    def __init__(self, kernels: Any) -> None:
        self.kernels = kernels
        # how bfloat16 steps run: "tiles", "dot" or "" (oneDNN's packed layout instead)
        self.bf16_path = kernels.dense_bf16_path()

    def applies(self, w: Any) -> bool:
        import torch

        return (
            w.device.type == "cpu"
            and w.dim() == 2
            and w.is_contiguous()
            and w.dtype in (torch.float32, torch.float16, torch.bfloat16)
        )

    def max_rows_for(self, w: Any, dtype: Any) -> int:
        import torch

        if dtype == torch.float32:
            return self.max_stream_rows if w.dtype == torch.float32 else sys.maxsize
        if dtype == w.dtype == torch.bfloat16 and self.bf16_path:
            return sys.maxsize
        return 0

    def __call__(self, x: Any, w: Any, bias: Any) -> Any:
        import torch

        if x.dtype == torch.float32 or x.dtype == w.dtype == torch.bfloat16:
            return self.kernels.dense_gemm(x, w, bias)
        return self.kernels.dense_gemm(x.float(), w, bias).to(x.dtype)

    def glu(self, gate_up: Any, w: Any, bias: Any) -> Any:
        return self(self.kernels.silu_mul(gate_up.contiguous()), w, bias)

    def add_norm(
        self, residual: Any, delta: Any, norm_weight: Any, eps: float, w: Any, bias: Any
    ) -> tuple[Any, Any]:
        residual = residual.contiguous()  # updated in place: residual + delta
        delta = None if delta is None else delta.contiguous()
        normed = self.kernels.add_rms_norm(residual, delta, norm_weight, eps)
        return residual, self(normed, w, bias)


def dense_small_batch() -> CpuDenseLinear | None:
    """The CPU's `SmallBatchLinear` (None without kernels, or under TOKENMILL_CPU_DENSE_GEMM=0:
    the library's GEMM for every row count, the benchmarks' baseline)."""
    if os.environ.get("TOKENMILL_CPU_DENSE_GEMM", "1").strip() == "0":
        return None
    kernels = get_ops()
    return None if kernels is None else CpuDenseLinear(kernels)
