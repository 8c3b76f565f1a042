"""Fused elementwise Triton kernels for the GPU path (written here; other GEMMs stay on cuBLAS
through torch). Paged attention lives in `triton_attention.py`, the skinny GEMM of the dense
linears in `triton_skinny.py`.

- `write_kv`: new K/V rows into their cache slots; a slot < 0 (a padding row) writes nowhere.
- `add_rms_norm`: residual += delta, then RMSNorm of it (float32 math), one pass.
- `rotary_inplace`: rotate-half rotary on [tokens, heads, head_dim] from the cos / signed-sin
  tables of `layers/rotary.py`.
- `rope_write_kv`: the two above in one launch (q rotated in place, rotated K and V into the
  cache).
- `silu_and_mul`: [n, 2i] = [gate | up] -> silu(gate) * up.
- `argmax_rows`: greedy tokens, each row's argmax in two launches (its chunks, then the best one).
- `fp8_quantize_rows`: rows to float8 e4m3 with a float32 scale each (the FP8 linears).

The KV cache layout is the engine's: [num_slots, num_kv_heads, head_dim], slot = block *
block_size + offset. Tests run every kernel under TRITON_INTERPRET=1 on the CPU against the torch
reference, in float32 and float16.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _write_kv_kernel(
    k_ptr,
    v_ptr,
    kc_ptr,
    vc_ptr,
    slot_ptr,
    stride_kt,
    stride_vt,
    stride_ct,
    WIDTH: tl.constexpr,
    WIDTH_P: tl.constexpr,
):
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot < 0:
        return
    offs = tl.arange(0, WIDTH_P)
    mask = offs < WIDTH
    tl.store(
        kc_ptr + slot * stride_ct + offs,
        tl.load(k_ptr + t * stride_kt + offs, mask=mask).to(kc_ptr.dtype.element_ty),
        mask=mask,
    )
    tl.store(
        vc_ptr + slot * stride_ct + offs,
        tl.load(v_ptr + t * stride_vt + offs, mask=mask).to(vc_ptr.dtype.element_ty),
        mask=mask,
    )


def write_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """k, v [num_tokens, num_kv_heads, head_dim] (heads contiguous within a token) into the
    caches [num_slots, num_kv_heads, head_dim] at slot_mapping, converted to the caches'
    dtype; negative slots are skipped."""
    width = k.shape[1] * k.shape[2]
    assert k.stride(2) == 1 and k.stride(1) == k.shape[2] and v.stride(1) == v.shape[2]
    _write_kv_kernel[(k.shape[0],)](
        k,
        v,
        k_cache,
        v_cache,
        slot_mapping,
        k.stride(0),
        v.stride(0),
        k_cache.stride(0),
        WIDTH=width,
        WIDTH_P=triton.next_power_of_2(width),
    )


@triton.jit
def _add_rms_norm_kernel(
    res_ptr,
    delta_ptr,
    w_ptr,
    out_ptr,
    eps,
    N: tl.constexpr,
    BLOCK: tl.constexpr,
    HAS_DELTA: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < N
    x = tl.load(res_ptr + row * N + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_DELTA:
        x += tl.load(delta_ptr + row * N + offs, mask=mask, other=0.0).to(tl.float32)
        x = x.to(res_ptr.dtype.element_ty)  # the residual stream keeps the model dtype
        tl.store(res_ptr + row * N + offs, x, mask=mask)
        x = x.to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(x * x, 0) / N + eps)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * N + offs, (x * inv * w).to(out_ptr.dtype.element_ty), mask=mask)


def add_rms_norm(
    residual: torch.Tensor,
    delta: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float,
    num_warps: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(residual += delta, rms_norm(residual) * weight) for contiguous [rows, hidden]."""
    rows, n = residual.shape
    out = torch.empty_like(residual)
    _add_rms_norm_kernel[(rows,)](
        residual,
        residual if delta is None else delta,
        weight,
        out,
        eps,
        N=n,
        BLOCK=triton.next_power_of_2(n),
        HAS_DELTA=delta is not None,
        num_warps=num_warps or (8 if n >= 2048 else 4),  # 8: 1.78 -> 1.66 us at 2048 (H200)
    )
    return residual, out


@triton.jit
def _rotate_half(src, dst, cos_row, sin_row, ROT: tl.constexpr, HALF_P: tl.constexpr):
    """dst[:ROT] = the rotate-half rotary of src[:ROT], from one position's rows of the cos /
    signed-sin tables (dst may be src)."""
    half = ROT // 2
    offs = tl.arange(0, HALF_P)
    mask = offs < half
    x1 = tl.load(src + offs, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + half + offs, mask=mask, other=0.0).to(tl.float32)
    c1 = tl.load(cos_row + offs, mask=mask, other=0.0)
    c2 = tl.load(cos_row + half + offs, mask=mask, other=0.0)
    s1 = tl.load(sin_row + offs, mask=mask, other=0.0)  # -sin
    s2 = tl.load(sin_row + half + offs, mask=mask, other=0.0)  # +sin
    tl.store(dst + offs, (x1 * c1 + x2 * s1).to(dst.dtype.element_ty), mask=mask)
    tl.store(dst + half + offs, (x2 * c2 + x1 * s2).to(dst.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_kernel(
    x_ptr,
    pos_ptr,
    cos_ptr,
    sin_ptr,
    stride_xt,
    stride_xh,
    stride_c,
    ROT: tl.constexpr,
    HALF_P: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    base = x_ptr + t * stride_xt + h * stride_xh
    _rotate_half(base, base, cos_ptr + pos * stride_c, sin_ptr + pos * stride_c, ROT, HALF_P)


def rotary_inplace(
    x: torch.Tensor, positions: torch.Tensor, cos_cached: torch.Tensor, sin_cached: torch.Tensor
) -> torch.Tensor:
    """Rotate the first rotary_dim channels of x [tokens, heads, head_dim] in place (x may be
    a strided view with contiguous channels). cos / signed sin: [max_positions, rotary_dim]."""
    rot = cos_cached.shape[1]
    assert x.stride(2) == 1
    _rotary_kernel[(x.shape[0], x.shape[1])](
        x,
        positions,
        cos_cached,
        sin_cached,
        x.stride(0),
        x.stride(1),
        cos_cached.stride(0),
        ROT=rot,
        HALF_P=triton.next_power_of_2(rot // 2),
    )
    return x


@triton.jit
def _rope_write_kv_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    kc_ptr,
    vc_ptr,
    pos_ptr,
    slot_ptr,
    cos_ptr,
    sin_ptr,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_ct,  # the caches' slot stride (heads are head_dim apart)
    stride_c,  # the tables' row stride
    NUM_Q_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_P: tl.constexpr,
    ROT: tl.constexpr,
    HALF_P: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    cos_row, sin_row = cos_ptr + pos * stride_c, sin_ptr + pos * stride_c
    if h < NUM_Q_HEADS:  # a query head, rotated in place
        base = q_ptr + t * stride_qt + h * stride_qh
        _rotate_half(base, base, cos_row, sin_row, ROT, HALF_P)
    else:  # KV head h - NUM_Q_HEADS: rotated K and V into the caches' slot
        slot = tl.load(slot_ptr + t).to(tl.int64)
        if slot >= 0:
            kvh = h - NUM_Q_HEADS
            src = k_ptr + t * stride_kt + kvh * stride_kh
            dst = kc_ptr + slot * stride_ct + kvh * HEAD_DIM
            _rotate_half(src, dst, cos_row, sin_row, ROT, HALF_P)
            if ROT < HEAD_DIM:  # channels past rotary_dim as they are
                rest = ROT + tl.arange(0, HEAD_P)
                keep = rest < HEAD_DIM
                tl.store(
                    dst + rest, tl.load(src + rest, mask=keep).to(dst.dtype.element_ty), mask=keep
                )
            d = tl.arange(0, HEAD_P)
            dm = d < HEAD_DIM
            v = tl.load(v_ptr + t * stride_vt + kvh * stride_vh + d, mask=dm)
            tl.store(
                vc_ptr + slot * stride_ct + kvh * HEAD_DIM + d,
                v.to(vc_ptr.dtype.element_ty),
                mask=dm,
            )


def rope_write_kv(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    positions: torch.Tensor,
    slot_mapping: torch.Tensor,
    cos_cached: torch.Tensor,
    sin_cached: torch.Tensor,
) -> torch.Tensor:
    """`rotary_inplace` on q and k, then `write_kv` of the rotated k and v, in one launch (a
    program per token and head): q [tokens, heads, head_dim] is rotated in place and returned,
    k [tokens, kv_heads, head_dim] is read only (its rotation goes to the cache). q, k, v may be
    strided views (of a fused qkv row) with contiguous channels; caches are token-major
    [num_slots, kv_heads, head_dim], of any float dtype (rows are converted); negative slots
    write nowhere."""
    tokens, heads, head_dim = q.shape
    kv_heads = k.shape[1]
    rot = cos_cached.shape[1]
    assert q.stride(2) == 1 and k.stride(2) == 1 and v.stride(2) == 1
    assert k_cache.stride(1) == head_dim and k_cache.stride(2) == 1
    assert v_cache.stride() == k_cache.stride()
    _rope_write_kv_kernel[(tokens, heads + kv_heads)](
        q,
        k,
        v,
        k_cache,
        v_cache,
        positions,
        slot_mapping,
        cos_cached,
        sin_cached,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        k_cache.stride(0),
        cos_cached.stride(0),
        NUM_Q_HEADS=heads,
        HEAD_DIM=head_dim,
        HEAD_P=triton.next_power_of_2(head_dim),
        ROT=rot,
        HALF_P=triton.next_power_of_2(rot // 2),
    )
    return q


@triton.jit
def _silu_mul_kernel(x_ptr, out_ptr, INTER: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < INTER
    g = tl.load(x_ptr + row * 2 * INTER + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(x_ptr + row * 2 * INTER + INTER + offs, mask=mask, other=0.0).to(tl.float32)
    y = g / (1.0 + tl.exp(-g)) * u
    tl.store(out_ptr + row * INTER + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[n, 2i] (contiguous) -> silu(gate) * up, [n, i]."""
    n, two_i = gate_up.shape
    i = two_i // 2
    out = gate_up.new_empty(n, i)
    block = min(1024, triton.next_power_of_2(i))
    _silu_mul_kernel[(n, triton.cdiv(i, block))](gate_up, out, INTER=i, BLOCK=block)
    return out


@triton.jit
def _argmax_partial_kernel(
    x_ptr, val_ptr, idx_ptr, stride_x, V, CHUNKS: tl.constexpr, BLOCK: tl.constexpr
):
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    offs = chunk * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + row * stride_x + offs, mask=offs < V, other=float("-inf"))
    x = x.to(tl.float32)
    best = tl.max(x, 0)
    # the first index holding the maximum (masked lanes are -inf, past every real index)
    first = tl.min(tl.where(x == best, offs, V), 0)
    tl.store(val_ptr + row * CHUNKS + chunk, best)
    tl.store(idx_ptr + row * CHUNKS + chunk, first)


@triton.jit
def _argmax_final_kernel(
    val_ptr, idx_ptr, out_ptr, V, CHUNKS: tl.constexpr, CHUNKS_P: tl.constexpr
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, CHUNKS_P)
    mask = offs < CHUNKS
    vals = tl.load(val_ptr + row * CHUNKS + offs, mask=mask, other=float("-inf"))
    idxs = tl.load(idx_ptr + row * CHUNKS + offs, mask=mask, other=V)
    best = tl.max(vals, 0)
    tl.store(out_ptr + row, tl.min(tl.where(vals == best, idxs, V), 0).to(tl.int64))


def argmax_rows(logits: torch.Tensor, block: int = 2048) -> torch.Tensor:
    """Row-wise argmax of [rows, vocab] (int64, the first index on ties), in two launches: each
    row's chunks of `block` in parallel, then the best chunk per row. torch's argmax reduces a
    row in one thread block: 37 us for a 128k vocabulary on an H200, against a few here."""
    rows, vocab = logits.shape
    assert logits.stride(1) == 1
    chunks = triton.cdiv(vocab, block)
    vals = torch.empty(rows, chunks, dtype=torch.float32, device=logits.device)
    idxs = torch.empty(rows, chunks, dtype=torch.int32, device=logits.device)
    out = torch.empty(rows, dtype=torch.int64, device=logits.device)
    _argmax_partial_kernel[(rows, chunks)](
        logits, vals, idxs, logits.stride(0), vocab, CHUNKS=chunks, BLOCK=block
    )
    _argmax_final_kernel[(rows,)](
        vals, idxs, out, vocab, CHUNKS=chunks, CHUNKS_P=triton.next_power_of_2(chunks)
    )
    return out


@triton.jit
def _fp8_quantize_rows_kernel(x_ptr, q_ptr, scale_ptr, stride_x, K, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < K
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    scale = tl.maximum(tl.max(tl.abs(x), 0) / 448.0, 1e-12)
    tl.store(q_ptr + row * K + offs, (x / scale).to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(scale_ptr + row, scale)


def fp8_quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`quant.fp8.quantize_rows` in one launch: x [rows, k] (rows may be strided) -> (float8
    e4m3 [rows, k], float32 scales [rows, 1]), each row's largest magnitude mapped to 448."""
    rows, k = x.shape
    assert x.stride(1) == 1
    q = torch.empty(rows, k, dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty(rows, 1, dtype=torch.float32, device=x.device)
    block = triton.next_power_of_2(k)
    _fp8_quantize_rows_kernel[(rows,)](
        x, q, scale, x.stride(0), k, BLOCK=block, num_warps=min(16, max(4, block // 1024))
    )
    return q, scale
