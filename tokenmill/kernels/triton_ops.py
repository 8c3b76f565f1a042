"""Triton kernels for the GPU path (written here; other GEMMs stay on cuBLAS through torch).

- `paged_attention`: one launch for a mixed batch (prefill chunks with cached context and
  decodes), straight from `query_start_loc` / `seq_lens` / `block_tables`. A program owns
  BLOCK_Q query tokens of one request and all the query heads of one KV head, packed into the
  M dimension of `tl.dot` so tensor cores work even at query length 1. With `num_splits > 1` the
  context is split into that many ranges per sequence (each sized from the sequence's own
  length, so the grid depends only on the batch's shape, as CUDA graphs need), and the partial
  results are merged by log-sum-exp.
- `write_kv`: new K/V rows into their cache slots; a slot < 0 (a padding row) writes nowhere.
- `add_rms_norm`: residual += delta, then RMSNorm of it (float32 math), one pass.
- `rotary_inplace`: rotate-half rotary on [tokens, heads, head_dim] from the cos / signed-sin
  tables of `layers/rotary.py`.
- `rope_write_kv`: the two above in one launch (q rotated in place, rotated K and V into the
  cache).
- `silu_and_mul`: [n, 2i] = [gate | up] -> silu(gate) * up.
- `skinny_linear`: x W^T for decode steps of a few rows (the dense linears' kernel on CUDA up
  to SKINNY_MAX_M rows, where cuBLAS left bandwidth unused; a GEMV for one row);
  `skinny_glu_linear` and `skinny_add_norm_linear` take SiLU*mul, or the residual add and
  RMSNorm, into its loads.

The KV cache layout is the engine's: [num_slots, num_kv_heads, head_dim], slot = block *
block_size + offset. Tests run every kernel under TRITON_INTERPRET=1 on the CPU against the torch
reference, in float32 and float16.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl


@triton.jit
def _attention_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    out_ptr,
    lse_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    qsl_ptr,
    scale,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_ot,
    stride_oh,
    stride_bt,
    QPKV: tl.constexpr,  # query heads per KV head
    BLOCK_Q: tl.constexpr,  # query tokens per program
    BLOCK_M: tl.constexpr,  # >= BLOCK_Q * QPKV, a power of two >= 16
    BLOCK_N: tl.constexpr,  # keys per iteration
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_P: tl.constexpr,  # head_dim rounded up to a power of two
    BLOCK_SIZE: tl.constexpr,  # KV-cache block size (tokens)
    NUM_SPLITS: tl.constexpr,
):
    req = tl.program_id(0)
    qb = tl.program_id(1)
    kvh = tl.program_id(2) // NUM_SPLITS
    split = tl.program_id(2) % NUM_SPLITS
    q_start = tl.load(qsl_ptr + req)
    q_len = tl.load(qsl_ptr + req + 1) - q_start
    if qb * BLOCK_Q >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + req)
    ctx_len = seq_len - q_len  # context tokens before this chunk

    offs_m = tl.arange(0, BLOCK_M)
    q_idx = qb * BLOCK_Q + offs_m // QPKV  # query token within the chunk
    head = kvh * QPKV + offs_m % QPKV
    valid_m = (offs_m < BLOCK_Q * QPKV) & (q_idx < q_len)
    offs_d = tl.arange(0, HEAD_DIM_P)
    valid_d = offs_d < HEAD_DIM
    q = tl.load(
        q_ptr
        + (q_start + q_idx)[:, None] * stride_qt
        + head[:, None] * stride_qh
        + offs_d[None, :],
        mask=valid_m[:, None] & valid_d[None, :],
        other=0.0,
    ).to(k_ptr.dtype.element_ty)  # the products in the KV cache's dtype (--kv-cache-dtype)

    # Keys this program may need: up to the last query's position (causal), within its split.
    last_q = tl.minimum((qb + 1) * BLOCK_Q, q_len) - 1
    kv_end = ctx_len + last_q + 1
    per_split = tl.cdiv(tl.cdiv(seq_len, NUM_SPLITS), BLOCK_N) * BLOCK_N
    kv_lo = split * per_split
    kv_hi = tl.minimum(kv_end, kv_lo + per_split)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_P], tl.float32)
    q_pos = ctx_len + q_idx
    for start in range(kv_lo, kv_hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        valid_n = offs_n < kv_hi
        block = tl.load(
            block_tables_ptr + req * stride_bt + offs_n // BLOCK_SIZE, mask=valid_n, other=0
        )
        slot = block.to(tl.int64) * BLOCK_SIZE + offs_n % BLOCK_SIZE
        kv_off = slot[:, None] * stride_kt + kvh * stride_kh + offs_d[None, :]
        kv_mask = valid_n[:, None] & valid_d[None, :]
        k = tl.load(k_ptr + kv_off, mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k)) * scale  # [BLOCK_M, BLOCK_N], float32
        visible = valid_n[None, :] & (offs_n[None, :] <= q_pos[:, None])
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that saw nothing yet
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + kv_off, mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    out_rows = (q_start + q_idx)[:, None] * stride_ot + head[:, None] * stride_oh
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    if NUM_SPLITS == 1:
        tl.store(
            out_ptr + out_rows + offs_d[None, :],
            (acc / l_safe[:, None]).to(out_ptr.dtype.element_ty),
            mask=valid_m[:, None] & valid_d[None, :],
        )
    else:
        # partials [tokens, heads, splits, head_dim] (float32) and their lse [tokens, heads,
        # splits]; an empty split has lse = -inf and weight 0 in the merge.
        # (the caller passes stride_ot = num_heads, stride_oh = 1: a dense (token, head) index)
        part = ((q_start + q_idx) * stride_ot + head * stride_oh) * NUM_SPLITS + split
        tl.store(
            out_ptr + part[:, None] * HEAD_DIM_P + offs_d[None, :],
            acc / l_safe[:, None],
            mask=valid_m[:, None] & valid_d[None, :],
        )
        lse = tl.where(l_i > 0, m_i + tl.log(l_safe), float("-inf"))
        tl.store(lse_ptr + part, lse, mask=valid_m)


@triton.jit
def _merge_kernel(
    part_ptr,
    lse_ptr,
    out_ptr,
    qsl_ptr,
    num_reqs,
    num_heads,
    stride_ot,
    stride_oh,
    NUM_SPLITS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_P: tl.constexpr,
):
    """out[t, h] = sum_s exp(lse_s - max lse) * part_s / sum_s exp(lse_s - max lse), for the
    tokens of the batch's requests; rows past them (padding) get zeros."""
    t = tl.program_id(0)
    h = tl.program_id(1)
    offs_s = tl.arange(0, NUM_SPLITS)
    offs_d = tl.arange(0, HEAD_DIM_P)
    if t >= tl.load(qsl_ptr + num_reqs):
        zero = tl.zeros([HEAD_DIM_P], tl.float32)
        tl.store(
            out_ptr + t * stride_ot + h * stride_oh + offs_d,
            zero.to(out_ptr.dtype.element_ty),
            mask=offs_d < HEAD_DIM,
        )
        return
    row = t * num_heads + h
    lse = tl.load(lse_ptr + row * NUM_SPLITS + offs_s)
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp(lse - m)
    part = tl.load(part_ptr + (row * NUM_SPLITS + offs_s)[:, None] * HEAD_DIM_P + offs_d[None, :])
    total = tl.sum(w, 0)
    out = tl.sum(part * w[:, None], 0) / tl.where(total > 0, total, 1.0)
    tl.store(
        out_ptr + t * stride_ot + h * stride_oh + offs_d,
        out.to(out_ptr.dtype.element_ty),
        mask=offs_d < HEAD_DIM,
    )


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    max_query_len: int,
    block_size: int,
    scale: float,
    num_splits: int = 1,
    block_q: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
) -> torch.Tensor:
    """Causal attention of q [num_tokens, num_heads, head_dim] over the paged cache.

    Request r's queries are q[query_start_loc[r]:query_start_loc[r + 1]], the last ones of its
    seq_lens[r] tokens (whose K/V are already in the cache). Requests with no queries (padding)
    are skipped: their rows of the output (padding rows of a captured graph) are zeros.
    `num_splits` (a power of two) > 1 runs the split-KV variant. `block_q`, `block_n` (keys per
    iteration) and `num_warps` override the launch configuration. A cache in another dtype than
    q's (--kv-cache-dtype) is multiplied in its own: q is converted to it as it is loaded.
    Returns a new tensor [num_tokens, num_heads, head_dim] in q's dtype.
    """
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[1]
    qpkv = num_heads // num_kv_heads
    if block_q is None:
        block_q = max(1, 16 // qpkv) if max_query_len == 1 else max(1, 64 // qpkv)
    block_q = min(block_q, triton.next_power_of_2(max(1, max_query_len)))
    block_m = max(16, triton.next_power_of_2(block_q * qpkv))
    head_dim_p = triton.next_power_of_2(head_dim)
    if block_n is None:  # measured on an H200 (benchmarks/gpu_profile.py, "sweep")
        if max_query_len > 1:
            block_n = 32 if head_dim_p > 64 else 64
        elif num_splits > 1 or head_dim_p > 128:
            block_n = 64  # a few keys per split: d64 5.9 -> 5.2 us, d128 7.4 -> 6.2 us
        else:
            block_n = 128  # a decode batch, whole contexts: d64 15.9 -> 13.2, d128 35.5 -> 27.2
    launch = {} if num_warps is None else {"num_warps": num_warps}
    num_reqs = seq_lens.shape[0]
    # the split variant's merge writes every row, padding included
    out = torch.zeros_like(q) if num_splits == 1 else torch.empty_like(q)
    grid = (num_reqs, triton.cdiv(max_query_len, block_q), num_kv_heads * num_splits)
    common = dict(
        QPKV=qpkv,
        BLOCK_Q=block_q,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        HEAD_DIM=head_dim,
        HEAD_DIM_P=head_dim_p,
        BLOCK_SIZE=block_size,
        NUM_SPLITS=num_splits,
    )
    if num_splits == 1:
        _attention_kernel[grid](
            q,
            k_cache,
            v_cache,
            out,
            out,
            block_tables,
            seq_lens,
            query_start_loc,
            scale,
            q.stride(0),
            q.stride(1),
            k_cache.stride(0),
            k_cache.stride(1),
            out.stride(0),
            out.stride(1),
            block_tables.stride(0),
            **common,
            **launch,
        )
        return out
    # Partials indexed by (token, head) as a dense [num_tokens, num_heads] grid.
    part = torch.empty(
        num_tokens, num_heads, num_splits, head_dim_p, dtype=torch.float32, device=q.device
    )
    # every split of every real row stores its lse (-inf when empty); padding rows are never read
    lse = torch.empty(num_tokens, num_heads, num_splits, dtype=torch.float32, device=q.device)
    _attention_kernel[grid](
        q,
        k_cache,
        v_cache,
        part,
        lse,
        block_tables,
        seq_lens,
        query_start_loc,
        scale,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        num_heads,
        1,
        block_tables.stride(0),
        **common,
        **launch,
    )
    _merge_kernel[(num_tokens, num_heads)](
        part,
        lse,
        out,
        query_start_loc,
        num_reqs,
        num_heads,
        out.stride(0),
        out.stride(1),
        NUM_SPLITS=num_splits,
        HEAD_DIM=head_dim,
        HEAD_DIM_P=head_dim_p,
    )
    return out


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
