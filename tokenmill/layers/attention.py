"""Attention over a paged KV cache.

The cache of one layer is two tensors `[num_blocks * block_size, num_kv_heads, head_dim]`; token
`i` of a request lives in slot `block_table[i // block_size] * block_size + i % block_size`.
`AttentionMetadata` describes the flat batch once per step and is passed explicitly to every
layer. `TorchPagedAttention` is the reference backend (pure torch, any device): it gathers each
request's context into a padded tensor and runs scaled_dot_product_attention with a mask. Faster
backends (Triton, vectorized CPU) implement the same `forward` signature.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True, slots=True)
class AttentionMetadata:
    """Flat-batch description shared by all layers in one forward pass."""

    num_tokens: int
    slot_mapping: torch.Tensor  # [num_tokens] int64: cache slot written by each new token
    query_start_loc: torch.Tensor  # [num_reqs + 1] int32: offsets of each request's queries
    seq_lens: torch.Tensor  # [num_reqs] int32: context length after this step
    block_tables: torch.Tensor  # [num_reqs, max_blocks] int32
    max_query_len: int
    max_seq_len: int
    # Reference-backend layout (padded): built once per step by the runner.
    query_pad_index: torch.Tensor | None  # [num_tokens] int64: row in [num_reqs * max_query_len]
    context_slots: torch.Tensor  # [num_reqs * max_seq_len] int64: slot of each context position
    attn_mask: torch.Tensor | None  # [num_reqs, 1, max_query_len, max_seq_len] bool, True=attend
    is_causal: bool = False  # one request computing its whole context: plain causal, no mask


def build_padded_layout(
    query_lens: list[int], seq_lens: list[int], block_tables: list[list[int]], block_size: int,
    device: torch.device,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """Index tensors for the padded reference layout (pure function of the batch shape).

    Returns (query_pad_index, context_slots (flattened), attn_mask). Query j of request r (0-based within
    its chunk) sits at absolute position seq_len - query_len + j and may see context positions
    <= that one. Padding rows see position 0 only, so they never produce NaN.
    """
    num_reqs = len(query_lens)
    max_q, max_s = max(query_lens), max(seq_lens)
    q_lens = torch.tensor(query_lens, dtype=torch.int64)
    s_lens = torch.tensor(seq_lens, dtype=torch.int64)

    pos = torch.arange(max_s, dtype=torch.int64)
    max_blocks = max(len(bt) for bt in block_tables)
    bt = torch.zeros(num_reqs, max_blocks, dtype=torch.int64)
    for i, row in enumerate(block_tables):
        bt[i, : len(row)] = torch.tensor(row, dtype=torch.int64)
    block_idx = (pos // block_size).clamp(max=max_blocks - 1)
    slots = bt[:, block_idx] * block_size + pos % block_size  # [num_reqs, max_s]
    slots = torch.where(pos[None, :] < s_lens[:, None], slots, slots[:, :1])

    if max_q == 1:
        # Pure decode: one query per request, sees its whole context.
        mask = None if min(seq_lens) == max_s else (pos[None, :] < s_lens[:, None])[:, None, None]
        return None, slots.flatten().to(device), None if mask is None else mask.to(device)

    q_pos = torch.arange(max_q, dtype=torch.int64)
    abs_q = (s_lens - q_lens)[:, None] + q_pos[None, :]  # [num_reqs, max_q]
    mask = pos[None, None, :] <= abs_q[:, :, None]  # causal within the context
    valid_q = q_pos[None, :] < q_lens[:, None]
    mask = mask & valid_q[:, :, None]
    mask[:, :, 0] |= ~valid_q
    pad_index = (torch.arange(num_reqs)[:, None] * max_q + q_pos[None, :])[valid_q]
    return pad_index.to(device), slots.flatten().to(device), mask[:, None].to(device)


class TorchPagedAttention:
    """Reference paged attention: write new K/V, gather context, masked SDPA."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float) -> None:
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale

    def forward(
        self,
        q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        v: torch.Tensor,
        kv_cache: tuple[torch.Tensor, torch.Tensor],  # 2 x [num_slots, num_kv_heads, head_dim]
        meta: AttentionMetadata,
    ) -> torch.Tensor:  # [num_tokens, num_heads * head_dim]
        k_cache, v_cache = kv_cache
        k_cache.index_copy_(0, meta.slot_mapping, k)
        v_cache.index_copy_(0, meta.slot_mapping, v)

        num_reqs, max_q = meta.seq_lens.shape[0], meta.max_query_len
        max_s = meta.context_slots.shape[0] // num_reqs
        # index_select on rows is much faster than advanced indexing on CPU.
        # [num_reqs, num_kv_heads, max_s, head_dim]
        keys = torch.index_select(k_cache, 0, meta.context_slots).view(
            num_reqs, max_s, self.num_kv_heads, self.head_dim).transpose(1, 2)
        values = torch.index_select(v_cache, 0, meta.context_slots).view(
            num_reqs, max_s, self.num_kv_heads, self.head_dim).transpose(1, 2)
        rep = self.num_heads // self.num_kv_heads
        if max_q == 1 and rep > 1:
            # Decode: treat the q heads sharing a kv head as that head's queries. SDPA then
            # needs no GQA expansion (3x faster on CPU than enable_gqa for one query).
            out = F.scaled_dot_product_attention(
                q.view(num_reqs, self.num_kv_heads, rep, self.head_dim), keys, values,
                attn_mask=meta.attn_mask, scale=self.scale)
            return out.reshape(num_reqs, self.num_heads * self.head_dim)
        if meta.query_pad_index is None:
            qp = q.view(num_reqs, max_q, self.num_heads, self.head_dim)
        else:
            qp = q.new_zeros(num_reqs * max_q, self.num_heads, self.head_dim)
            qp[meta.query_pad_index] = q
            qp = qp.view(num_reqs, max_q, self.num_heads, self.head_dim)
        out = F.scaled_dot_product_attention(
            qp.transpose(1, 2), keys, values, attn_mask=meta.attn_mask, scale=self.scale,
            is_causal=meta.is_causal, enable_gqa=rep > 1,
        )  # [num_reqs, num_heads, max_q, head_dim]
        out = out.transpose(1, 2).reshape(num_reqs * max_q, self.num_heads * self.head_dim)
        if meta.query_pad_index is not None:
            out = out[meta.query_pad_index]
        return out
