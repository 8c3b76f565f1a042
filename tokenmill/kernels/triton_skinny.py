"""The skinny GEMM on the GPU path (Triton): the dense linears' kernel for decode steps of a few
rows, and `SkinnyLinear`, the Triton backend's `quant.dense.SmallBatchLinear`.

- `skinny_linear`: x W^T for decode steps of a few rows (the dense linears' kernel on CUDA up
  to SKINNY_MAX_M rows, where cuBLAS left bandwidth unused; a GEMV for one row);
  `skinny_glu_linear` and `skinny_add_norm_linear` take SiLU*mul, or the residual add and
  RMSNorm, into its loads.

The launch configurations SKINNY_CONFIG and SKINNY_GEMV_CONFIG are read from this module's
globals at each launch (benchmarks/gpu_bench.py swaps SKINNY_GEMV_CONFIG for one A/B run).
Tests run the kernel under TRITON_INTERPRET=1 on the CPU against the torch reference, in
float32 and float16.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

# What the skinny GEMM's x is made of (its prologue, applied to each K tile as it is loaded).
PLAIN, GLU, ADD_NORM = 0, 1, 2


@triton.jit
def _skinny_linear_kernel(
    x_ptr,
    delta_ptr,
    g_ptr,
    r_out_ptr,
    w_ptr,
    b_ptr,
    y_ptr,
    M,
    N,
    K,
    eps,
    stride_xm,
    stride_dm,
    stride_rm,
    stride_wn,
    stride_ym,
    PROLOGUE: tl.constexpr,  # PLAIN, GLU or ADD_NORM
    HAS_DELTA: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    EVEN_K: tl.constexpr,  # K % BLOCK_K == 0: no mask along K
    PRECISION: tl.constexpr,  # "ieee" for float32 (no TF32 rounding), else the default
    DOT: tl.constexpr,  # tl.dot on a BLOCK_M-row tile; else one row, products summed along K
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    row_ok = offs_m[:, None] < M
    col_ok = offs_n[:, None] < N
    rows64 = offs_m[:, None].to(tl.int64)
    x_rows = x_ptr + rows64 * stride_xm
    w_rows = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    sumsq = tl.zeros([BLOCK_M], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k[None, :]
        if EVEN_K:
            x_ok = row_ok
            w = tl.load(w_rows + kk, mask=col_ok, other=0.0)
        else:
            x_ok = row_ok & (kk < K)
            w = tl.load(w_rows + kk, mask=col_ok & (kk < K), other=0.0)
        if PROLOGUE == 1:  # x = silu(gate) * up, as silu_and_mul rounds it
            gate = tl.load(x_rows + kk, mask=x_ok, other=0.0).to(tl.float32)
            up = tl.load(x_rows + K + kk, mask=x_ok, other=0.0).to(tl.float32)
            x = (gate / (1.0 + tl.exp(-gate)) * up).to(w_ptr.dtype.element_ty)
        elif PROLOGUE == 2:  # x = residual (+ delta) * norm weight; the 1 / rms comes last
            r = tl.load(x_rows + kk, mask=x_ok, other=0.0)
            if HAS_DELTA:
                d = tl.load(delta_ptr + rows64 * stride_dm + kk, mask=x_ok, other=0.0)
                r = (r.to(tl.float32) + d.to(tl.float32)).to(x_ptr.dtype.element_ty)
                # the new residual stream, written once (by the first program)
                tl.store(r_out_ptr + rows64 * stride_rm + kk, r, mask=x_ok & (pid == 0))
            rf = r.to(tl.float32)
            sumsq += tl.sum(rf * rf, 1)
            g = tl.load(g_ptr + kk, mask=kk < K, other=0.0).to(tl.float32)
            x = (rf * g).to(w_ptr.dtype.element_ty)
        else:
            x = tl.load(x_rows + kk, mask=x_ok, other=0.0)
        if DOT:
            acc = tl.dot(x, tl.trans(w), acc, input_precision=PRECISION)
        else:
            acc += tl.sum(x.to(tl.float32) * w.to(tl.float32), 1)[None, :]
    if PROLOGUE == 2:  # rms_norm(r) W^T = (r * g) W^T / rms(r), row by row
        acc *= (1.0 / tl.sqrt(sumsq / K + eps))[:, None]
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    tl.store(
        y_ptr + rows64 * stride_ym + offs_n[None, :],
        acc.to(y_ptr.dtype.element_ty),
        mask=row_ok & (offs_n[None, :] < N),
    )


class SkinnyConfig(NamedTuple):
    """A launch configuration of the skinny GEMM: output rows per program, the K tile, warps,
    pipeline stages, and whether it multiplies with `tl.dot` on a 16-row tile of x (any M up to
    SKINNY_MAX_M) or is the one-row GEMV (dot=False: each K tile's products summed in float32,
    no tile of 16 rows to fill, so BLOCK_N may be below tl.dot's 16 and a small weight spreads
    over more programs)."""

    block_n: int
    block_k: int
    warps: int
    stages: int
    dot: bool = True


# The skinny GEMM's configurations: for 2-16 rows, and for one row. Guesses until
# benchmarks/gpu_profile.py's skinny sweep has run on a device (it times both kinds).
SKINNY_CONFIG = SkinnyConfig(16, 256, 4, 4)
SKINNY_GEMV_CONFIG = SkinnyConfig(8, 512, 4, 3, dot=False)
SKINNY_MAX_M = 16  # rows of x one launch takes (tl.dot's smallest M tile)


def _skinny_launch(
    prologue: int,
    x: torch.Tensor,
    k: int,
    w: torch.Tensor,
    bias: torch.Tensor | None,
    config: tuple | None,
    delta: torch.Tensor | None = None,
    norm_weight: torch.Tensor | None = None,
    residual_out: torch.Tensor | None = None,
    eps: float = 0.0,
) -> torch.Tensor:
    m = x.shape[0]
    n = w.shape[0]
    assert m <= SKINNY_MAX_M and w.shape[1] == k and x.stride(1) == 1 and w.stride(1) == 1
    if config is None:
        config = SKINNY_GEMV_CONFIG if m == 1 else SKINNY_CONFIG
    block_n, block_k, warps, stages, dot = SkinnyConfig(*config)
    assert dot or m == 1, "the GEMV configurations take one row"
    block_k = min(block_k, max(16, triton.next_power_of_2(k)))
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    _skinny_linear_kernel[(triton.cdiv(n, block_n),)](
        x,
        delta if delta is not None else x,
        norm_weight if norm_weight is not None else x,
        residual_out if residual_out is not None else x,
        w,
        bias if bias is not None else w,
        y,
        m,
        n,
        k,
        eps,
        x.stride(0),
        delta.stride(0) if delta is not None else 0,
        residual_out.stride(0) if residual_out is not None else 0,
        w.stride(0),
        y.stride(0),
        PROLOGUE=prologue,
        HAS_DELTA=delta is not None,
        HAS_BIAS=bias is not None,
        EVEN_K=k % block_k == 0,
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        DOT=dot,
        BLOCK_M=SKINNY_MAX_M if dot else 1,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        num_warps=warps,
        num_stages=stages,
    )
    return y


def skinny_linear(
    x: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor | None = None,
    config: tuple | None = None,
) -> torch.Tensor:
    """y = x W^T (+ b) for the few rows of a decode step, x [M <= SKINNY_MAX_M, K], W [N, K]
    (both with unit stride along K), in x's dtype: bound by reading W once, so each program
    streams BLOCK_N whole rows of W through a pipelined loop over K (`tl.dot` on a BLOCK_M = 16
    tile, padding rows of x reading nothing; or for one row the GEMV). `config` (a SkinnyConfig
    or its fields) defaults to SKINNY_GEMV_CONFIG for one row, else SKINNY_CONFIG. cuBLAS
    reached 45-74% of an H200's bandwidth on the small q/k/v and o projections of a batch-1 step
    (`benchmarks/gpu_profile.py` sweeps these configurations against it)."""
    return _skinny_launch(PLAIN, x, x.shape[1], w, bias, config)


def skinny_glu_linear(
    gate_up: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor | None = None,
    config: tuple | None = None,
) -> torch.Tensor:
    """`skinny_linear(silu_and_mul(gate_up), w, bias)` in one launch: gate_up [M, 2K] = [gate |
    up], each K tile of silu(gate) * up computed (and rounded to the dtype, as silu_and_mul
    does) as it is loaded."""
    return _skinny_launch(GLU, gate_up, gate_up.shape[1] // 2, w, bias, config)


def skinny_add_norm_linear(
    residual: torch.Tensor,
    delta: torch.Tensor | None,
    norm_weight: torch.Tensor,
    eps: float,
    w: torch.Tensor,
    bias: torch.Tensor | None = None,
    config: tuple | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`add_rms_norm` then `skinny_linear` in one launch: (r, rms_norm(r) * g W^T + b) with
    r = residual + delta (rounded to the dtype; a new tensor, written by the first program, as
    every program reads the old one; `residual` itself where delta is None). Each program
    accumulates sum(r^2) over the same loop that streams W and scales its sums by 1 / rms(r)
    at the end (the norm is linear in r given rms(r)), so the weights stream from the start;
    the only difference from the two launches is where r * g is rounded (before the 1 / rms
    here)."""
    k = residual.shape[1]
    r_out = torch.empty_like(residual) if delta is not None else None
    if delta is not None:
        assert delta.shape == residual.shape and delta.stride(1) == 1
    y = _skinny_launch(ADD_NORM, residual, k, w, bias, config, delta, norm_weight, r_out, eps)
    return (r_out if r_out is not None else residual), y


class SkinnyLinear:
    """`quant.dense.SmallBatchLinear` on the Triton backend: the skinny GEMM (and its GLU and
    add + RMSNorm prologues) for steps of up to SKINNY_MAX_M rows, on weights of at most
    `max_weight_bytes` (larger ones, a Llama-3-8B shape's gate/up and down, already ran at
    89-100% of the bandwidth on cuBLAS, as did the heads)."""

    max_weight_bytes = 64 << 20

    def applies(self, w: torch.Tensor) -> bool:
        return (
            w.dim() == 2
            and w.stride(1) == 1
            and w.dtype in (torch.float32, torch.float16, torch.bfloat16)
            and w.numel() * w.element_size() <= self.max_weight_bytes
        )

    def max_rows_for(self, w: torch.Tensor, dtype: torch.dtype) -> int:
        return SKINNY_MAX_M

    def __call__(self, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return skinny_linear(x if x.stride(1) == 1 else x.contiguous(), w, bias)

    def glu(
        self, gate_up: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        return skinny_glu_linear(gate_up.contiguous(), w, bias)

    def add_norm(
        self,
        residual: torch.Tensor,
        delta: torch.Tensor | None,
        norm_weight: torch.Tensor,
        eps: float,
        w: torch.Tensor,
        bias: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return skinny_add_norm_linear(
            residual.contiguous(),
            None if delta is None else delta.contiguous(),
            norm_weight,
            eps,
            w,
            bias,
        )
