"""Rotary position embeddings (Hugging Face "rotate half" layout) with rope scaling variants."""

from __future__ import annotations

import math
from typing import Any

import torch

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def rope_inv_freq(
    rotary_dim: int,
    base: float,
    scaling: dict[str, Any] | None,
    freq_factors: torch.Tensor | None = None,
) -> torch.Tensor:
    """Inverse frequencies [rotary_dim // 2] (float32), scaled as the config asks."""
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim
    inv_freq = 1.0 / (base**exponents)
    if freq_factors is not None:  # GGUF files carry llama3 scaling precomputed as factors
        return inv_freq / freq_factors.float()
    rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return inv_freq / float(scaling["factor"])
    if rope_type == "llama3":
        factor = float(scaling["factor"])
        low = float(scaling.get("low_freq_factor", 1.0))
        high = float(scaling.get("high_freq_factor", 4.0))
        old_len = float(scaling["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(is_medium, smoothed, scaled)
    raise ValueError(
        f"rope scaling type {rope_type!r} is not supported (supported: {SUPPORTED_ROPE_TYPES})"
    )


class RotaryEmbedding(torch.nn.Module):
    """Precomputed cos/sin tables; `cos_sin(positions)` is computed once per forward pass."""

    def __init__(
        self,
        rotary_dim: int,
        max_positions: int,
        base: float,
        scaling: dict[str, Any] | None = None,
        freq_factors: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.rotary_dim = rotary_dim
        inv_freq = rope_inv_freq(rotary_dim, base, scaling, freq_factors)
        t = torch.arange(max_positions, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)
        # [max_positions, rotary_dim]; the sine carries rotate_half's sign: rotate_half(x) * sin
        # == roll(x, rotary_dim / 2) * signed_sin, which saves a cat and a neg per call.
        cos = torch.cat([freqs, freqs], dim=-1).cos()
        sin = freqs.sin()
        self.register_buffer("cos_cached", cos, persistent=False)
        self.register_buffer("sin_cached", torch.cat([-sin, sin], dim=-1), persistent=False)

    def cos_sin(
        self, positions: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # [num_tokens, 1, rotary_dim], broadcast over heads
        return (
            self.cos_cached[positions].to(dtype)[:, None, :],
            self.sin_cached[positions].to(dtype)[:, None, :],
        )


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x: [num_tokens, num_heads, head_dim]; rotates the first rotary_dim channels
    (Hugging Face rotate-half layout): x * cos + rotate_half(x) * sin."""
    rot = cos.shape[-1]
    if rot < x.shape[-1]:
        x_rot, x_pass = x[..., :rot], x[..., rot:]
        return torch.cat([apply_rotary(x_rot, cos, signed_sin), x_pass], dim=-1)
    return torch.addcmul(x * cos, torch.roll(x, rot // 2, dims=-1), signed_sin)
