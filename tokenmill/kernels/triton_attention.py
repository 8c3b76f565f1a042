"""Paged attention on the GPU path (Triton): the attention kernel, the split-KV merge and their
launcher.

- `paged_attention`: one launch for a mixed batch (prefill chunks with cached context and
  decodes), straight from `query_start_loc` / `seq_lens` / `block_tables`. A program owns
  BLOCK_Q query tokens of one request and all the query heads of one KV head, packed into the
  M dimension of `tl.dot` so tensor cores work even at query length 1. With `num_splits > 1` the
  context is split into that many ranges per sequence (each sized from the sequence's own
  length, so the grid depends only on the batch's shape, as CUDA graphs need), and the partial
  results are merged by log-sum-exp.

The KV cache layout is the engine's: [num_slots, num_kv_heads, head_dim], slot = block *
block_size + offset (written by `triton_ops.write_kv` / `rope_write_kv`). Tests run the kernels
under TRITON_INTERPRET=1 on the CPU against the torch reference, in float32 and float16.
"""

from __future__ import annotations

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
    if num_splits == 1:  # the kernel writes the output rows directly
        dst, lse, dst_strides = out, out, (out.stride(0), out.stride(1))
    else:
        # Partials indexed by (token, head) as a dense [num_tokens, num_heads] grid.
        dst = torch.empty(
            num_tokens, num_heads, num_splits, head_dim_p, dtype=torch.float32, device=q.device
        )
        # every split of every real row stores its lse (-inf when empty); padding rows are
        # never read
        lse = torch.empty(num_tokens, num_heads, num_splits, dtype=torch.float32, device=q.device)
        dst_strides = (num_heads, 1)
    _attention_kernel[grid](
        q,
        k_cache,
        v_cache,
        dst,
        lse,
        block_tables,
        seq_lens,
        query_start_loc,
        scale,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        *dst_strides,
        block_tables.stride(0),
        **common,
        **launch,
    )
    if num_splits == 1:
        return out
    _merge_kernel[(num_tokens, num_heads)](
        dst,
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
