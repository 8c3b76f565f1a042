"""Normalization layers (computed in float32 like the reference implementations)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tokenmill.layers.fused import add_rms_norm


class RMSNorm(torch.nn.Module):
    def __init__(self, hidden_size: int, eps: float, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=dtype), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # One fused kernel (accumulates in float32 for half inputs); in float32 it is
        # bit-identical to the reference x * rsqrt(mean(x^2) + eps) * weight.
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)

    def add_forward(self, residual: torch.Tensor,
                    delta: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(residual + delta, norm(residual + delta)); fused on CPU (updates residual in place)."""
        return add_rms_norm(residual, delta, self.weight, self.eps)
