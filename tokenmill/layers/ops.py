"""The fused-ops seam: one object per device and dtype, chosen once at load (`select_ops`).

Every implementation has the same methods; `TorchOps` defines the math (the always-correct
reference, any device), `CpuOps` runs the C++ kernels (kernels/csrc/cpu_ops.cpp) and
`TritonOps` the Triton ones (kernels/triton_ops.py). An implementation may hand a call it cannot
take (a layout its kernel does not read) to the reference: that is a property of the arguments'
shapes, never of the device or dtype, which were fixed when it was chosen.

`TOKENMILL_BACKEND=torch|cpu|triton` forces a choice (tests, benchmarks); "triton" on a machine
without CUDA needs TRITON_INTERPRET=1.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

BACKENDS = ("torch", "cpu", "triton")


@dataclass(frozen=True, slots=True)
class Rope:
    """Rotary embedding still to be applied to a layer's q and k: the step's positions, the
    model's `RotaryEmbedding` and what `rotary_tables` gathered for the step (or None)."""

    positions: torch.Tensor
    rotary: Any
    tables: tuple[torch.Tensor, torch.Tensor] | None


class TorchOps:
    """Reference implementations (PyTorch ops)."""

    name = "torch"

    def add_rms_norm(
        self, residual: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(residual + delta, rms_norm(residual + delta) * weight); the first may be `residual`
        updated in place."""
        if delta is not None:
            residual = residual + delta
        return residual, F.rms_norm(residual, weight.shape, weight, eps)

    def silu_and_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """[n, 2i] = [gate | up] -> silu(gate) * up, [n, i]."""
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up

    def rotary_tables(
        self, rotary: Any, positions: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """What `rotary` needs per forward pass, gathered once for all layers ((cos, sin) rows
        here; kernels that read the tables by position need nothing)."""
        return rotary.cos_sin(positions, dtype)

    def rotary(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        rotary: Any,
        tables: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> torch.Tensor:
        """x [tokens, heads, head_dim] rotated (in place where the kernel can)."""
        from tokenmill.layers.rotary import apply_rotary

        return apply_rotary(x, *(tables or rotary.cos_sin(positions, x.dtype)))

    def write_kv(
        self,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> None:
        """K/V rows [tokens, kv_heads, head_dim] into the caches at `slot_mapping`."""
        k_cache.index_copy_(0, slot_mapping, k.to(k_cache.dtype))
        v_cache.index_copy_(0, slot_mapping, v.to(v_cache.dtype))

    def rope_write_kv(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        rope: Rope,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> torch.Tensor:
        """`rotary` on q (returned, rotated in place where the kernel can) and on k, then
        `write_kv` of the rotated k and v."""
        q = self.rotary(q, rope.positions, rope.rotary, rope.tables)
        k = self.rotary(k, rope.positions, rope.rotary, rope.tables)
        self.write_kv(k, v, k_cache, v_cache, slot_mapping)
        return q

    def argmax(self, logits: torch.Tensor) -> torch.Tensor:
        """Row-wise argmax (int64), first index on ties."""
        return logits.argmax(dim=-1)

    def sample(
        self,
        logits: torch.Tensor,
        temperature: torch.Tensor,
        generators: dict[int, torch.Generator],
    ) -> torch.Tensor:
        """One token per row of float32 `logits` [R, V] (int64 [R]): the argmax (first on ties)
        where `temperature` [R] is 0, else a draw from softmax(row / temperature) by
        `sample.sampler.random_sample` (the rows in `generators` from their own generator)."""
        from tokenmill.sample.sampler import apply_temperature, random_sample

        probs = apply_temperature(logits, temperature).softmax(dim=1)
        return torch.where(temperature == 0, self.argmax(logits), random_sample(probs, generators))

    def apply_token_bitmask_(
        self, logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor | None = None
    ) -> None:
        """Structured output, in place: see `sample.sampler.apply_token_bitmask_`."""
        from tokenmill.sample.sampler import apply_token_bitmask_

        apply_token_bitmask_(logits, bitmask, rows)


class CpuOps(TorchOps):
    """The C++ kernels (float32 / bfloat16 on the CPU)."""

    name = "cpu"

    def __init__(self, kernels: Any) -> None:
        self.kernels = kernels

    def add_rms_norm(self, residual, delta, weight, eps):
        if residual.is_contiguous() and residual.dim() == 2:
            return residual, self.kernels.add_rms_norm(residual, delta, weight, eps)
        return super().add_rms_norm(residual, delta, weight, eps)

    def silu_and_mul(self, gate_up):
        if gate_up.dim() == 2:
            return self.kernels.silu_mul(gate_up)
        return super().silu_and_mul(gate_up)

    def rotary_tables(self, rotary, positions, dtype):
        return None

    def rotary(self, x, positions, rotary, tables):
        if rotary.rotary_dim == x.shape[-1] and x.stride(-1) == 1 and x.stride(1) == x.shape[-1]:
            self.kernels.rotary_inplace(x, positions, rotary.cos_cached, rotary.sin_cached)
            return x
        return super().rotary(x, positions, rotary, tables)

    def write_kv(self, k, v, k_cache, v_cache, slot_mapping):
        # the kernel reads strided views and either cache layout (attention.py), and converts
        # rows to the cache's dtype
        self.kernels.write_kv(k, v, k_cache, v_cache, slot_mapping)

    def argmax(self, logits):
        return self.kernels.argmax_rows(logits)

    def sample(self, logits, temperature, generators):
        # the inverse CDF's draws (the reference's on the CPU), sampled in one pass per row
        from tokenmill.sample.sampler import draw_uniforms

        u = draw_uniforms(logits.shape[0], generators)
        return self.kernels.sample_rows(logits, temperature, u)

    def apply_token_bitmask_(self, logits, bitmask, rows=None):
        if not logits.is_contiguous():
            return super().apply_token_bitmask_(logits, bitmask, rows)
        empty = torch.empty(0, dtype=torch.int64)
        self.kernels.apply_token_bitmask(logits, bitmask, empty if rows is None else rows)


class TritonOps(TorchOps):
    """The Triton kernels (CUDA; the interpreter on the CPU in tests)."""

    name = "triton"

    def __init__(self) -> None:
        from tokenmill.kernels import triton_ops

        self.kernels = triton_ops

    def add_rms_norm(self, residual, delta, weight, eps):
        if (
            residual.is_contiguous()
            and residual.dim() == 2
            and (delta is None or delta.is_contiguous())
        ):
            return self.kernels.add_rms_norm(residual, delta, weight, eps)
        return super().add_rms_norm(residual, delta, weight, eps)

    def silu_and_mul(self, gate_up):
        if gate_up.dim() == 2 and gate_up.is_contiguous():
            return self.kernels.silu_and_mul(gate_up)
        return super().silu_and_mul(gate_up)

    def argmax(self, logits):
        if logits.dim() == 2 and logits.stride(1) == 1 and logits.shape[0] > 0:
            return self.kernels.argmax_rows(logits)
        return super().argmax(logits)

    def rotary_tables(self, rotary, positions, dtype):
        return None

    def rotary(self, x, positions, rotary, tables):
        if x.stride(-1) == 1:
            return self.kernels.rotary_inplace(x, positions, rotary.cos_cached, rotary.sin_cached)
        return super().rotary(x, positions, rotary, tables)

    def rope_write_kv(self, q, k, v, rope, k_cache, v_cache, slot_mapping):
        if (
            q.stride(-1) == 1
            and k.stride(-1) == 1
            and v.stride(-1) == 1
            and k_cache.is_contiguous()
            and v_cache.is_contiguous()
        ):
            rot = rope.rotary
            return self.kernels.rope_write_kv(
                q,
                k,
                v,
                k_cache,
                v_cache,
                rope.positions,
                slot_mapping,
                rot.cos_cached,
                rot.sin_cached,
            )
        return super().rope_write_kv(q, k, v, rope, k_cache, v_cache, slot_mapping)

    def write_kv(self, k, v, k_cache, v_cache, slot_mapping):
        if (
            k.stride(2) == 1
            and k.stride(1) == k.shape[2]
            and v.stride(2) == 1
            and v.stride(1) == v.shape[2]
        ):
            self.kernels.write_kv(k, v, k_cache, v_cache, slot_mapping)
        else:
            super().write_kv(k, v, k_cache, v_cache, slot_mapping)


def backend_name(device: torch.device | str, dtype: torch.dtype) -> tuple[str, str]:
    """Which implementation runs on `device` in `dtype`, and why (for the log).

    CUDA -> triton when triton imports; CPU in float32 / bfloat16 -> cpu when the C++ kernels
    build; otherwise torch. `TOKENMILL_BACKEND` overrides.
    """
    forced = os.environ.get("TOKENMILL_BACKEND", "").strip().lower()
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"TOKENMILL_BACKEND={forced!r}: expected one of {BACKENDS}")
        return forced, "forced by TOKENMILL_BACKEND"
    device = torch.device(device)
    if device.type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            return "torch", "triton is not installed"
        return "triton", "CUDA device"
    if device.type == "cpu" and dtype in (torch.float32, torch.bfloat16):
        from tokenmill.kernels.cpu_ops import get_ops

        if get_ops() is not None:
            return "cpu", "C++ kernels built for this CPU"
        return "torch", "the C++ kernels are disabled or could not be built"
    return "torch", f"no kernels for {dtype} on {device.type}"


def make_ops(name: str) -> TorchOps:
    """The ops object for a backend name from `backend_name`."""
    if name == "cpu":
        from tokenmill.kernels.cpu_ops import get_ops

        kernels = get_ops()
        if kernels is None:
            raise RuntimeError("the C++ CPU kernels are not available (TOKENMILL_BACKEND=cpu)")
        return CpuOps(kernels)
    if name == "triton":
        return TritonOps()
    return TorchOps()
