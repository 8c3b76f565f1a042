"""Normalization layers (computed in float32 like the reference implementations)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tokenmill.layers.ops import TorchOps


class RMSNorm(torch.nn.Module):
    def __init__(
        self,
        hidden_size: int,
        eps: float,
        dtype: torch.dtype = torch.float32,
        ops: TorchOps | None = None,
    ) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=dtype), requires_grad=False)
        self.eps = eps
        self.ops = ops or TorchOps()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # One fused kernel (accumulates in float32 for half inputs); in float32 it is
        # bit-identical to the reference x * rsqrt(mean(x^2) + eps) * weight.
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)

    def add_forward(
        self, residual: torch.Tensor, delta: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(residual + delta, norm(residual + delta)), through the fused ops chosen at load
        (a kernel may update `residual` in place)."""
        return self.ops.add_rms_norm(residual, delta, self.weight, self.eps)
