"""Fused elementwise steps with a PyTorch reference path and a C++ CPU kernel path.

The kernels (tokenmill/kernels/csrc/cpu_ops.cpp) are used for float32/bfloat16 tensors on the
CPU when they could be built; everything else takes the PyTorch path, which defines the math.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tokenmill.kernels.cpu_ops import get_ops

_KERNEL_DTYPES = (torch.float32, torch.bfloat16)


def cpu_kernels(x: torch.Tensor):
    """The compiled ops if they apply to `x`, else None."""
    if x.device.type != "cpu" or x.dtype not in _KERNEL_DTYPES:
        return None
    return get_ops()


def add_rms_norm(residual: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """residual + delta (the new residual stream) and its RMS-normalized, weighted copy."""
    ops = cpu_kernels(residual)
    if ops is not None and residual.is_contiguous() and residual.dim() == 2:
        out = ops.add_rms_norm(residual, delta, weight, eps)  # updates residual in place
        return residual, out
    if delta is not None:
        residual = residual + delta
    return residual, F.rms_norm(residual, weight.shape, weight, eps)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[n, 2i] = [gate | up] -> silu(gate) * up, [n, i]."""
    ops = cpu_kernels(gate_up)
    if ops is not None and gate_up.dim() == 2:
        return ops.silu_mul(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
