"""Attention over a paged KV cache.

The cache of one layer is two tensors `[num_blocks * block_size, num_kv_heads, head_dim]`; token
`i` of a request lives in slot `block_table[i // block_size] * block_size + i % block_size`.
`AttentionMetadata` describes the flat batch once per step and is passed explicitly to every
layer. `TorchPagedAttention` is the reference backend (pure torch, any device): it gathers each
request's context into a padded tensor and runs scaled_dot_product_attention with a mask. Faster
backends (Triton, vectorized CPU) implement the same `forward` signature.

The runner orders a step's requests with single-query ones ("decodes") first. The two groups are
attended separately so a long prefill chunk never pads the decodes to its length.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tokenmill.layers.fused import cpu_kernels


@dataclass(frozen=True, slots=True)
class PaddedGroup:
    """One group of requests in the padded reference layout."""

    num_reqs: int
    max_query_len: int
    max_seq_len: int
    context_slots: torch.Tensor  # [num_reqs * max_seq_len] int64: cache slot per context position
    attn_mask: torch.Tensor | None  # [num_reqs, 1, max_query_len, max_seq_len] bool, True=attend
    query_pad_index: torch.Tensor | None  # [num_tokens] int64: row in [num_reqs * max_query_len]
    is_causal: bool = False  # one request computing its whole context: causal SDPA, no mask


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
    num_decode_tokens: int  # the first tokens belong to single-query requests
    block_size: int
    decode: PaddedGroup | None  # None when there are no decodes or a kernel reads block tables
    prefill: PaddedGroup | None


def build_padded_group(
    query_lens: list[int], seq_lens: list[int], block_tables: list[list[int]], block_size: int,
    device: torch.device,
) -> PaddedGroup:
    """Index tensors for the padded reference layout (a pure function of the batch shape).

    Query j of request r (0-based within its chunk) sits at absolute position
    seq_len - query_len + j and may see context positions <= that one. Padding rows see
    position 0 only, so they never produce NaN.
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

    if num_reqs == 1 and max_q == max_s > 1:
        # One request computing its whole context: causal SDPA, no mask, no padding.
        return PaddedGroup(1, max_q, max_s, slots.flatten().to(device), None, None, True)
    if max_q == 1:
        # One query per request; it sees its whole context.
        mask = None if min(seq_lens) == max_s else (pos[None, :] < s_lens[:, None])[:, None, None]
        return PaddedGroup(num_reqs, 1, max_s, slots.flatten().to(device),
                           None if mask is None else mask.to(device), None)
    q_pos = torch.arange(max_q, dtype=torch.int64)
    abs_q = (s_lens - q_lens)[:, None] + q_pos[None, :]  # [num_reqs, max_q]
    mask = pos[None, None, :] <= abs_q[:, :, None]  # causal within the context
    valid_q = q_pos[None, :] < q_lens[:, None]
    mask = mask & valid_q[:, :, None]
    mask[:, :, 0] |= ~valid_q
    pad_index = None
    if not bool(valid_q.all()):
        pad_index = (torch.arange(num_reqs)[:, None] * max_q + q_pos[None, :])[valid_q].to(device)
    return PaddedGroup(num_reqs, max_q, max_s, slots.flatten().to(device),
                       mask[:, None].to(device), pad_index)


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
        ops = cpu_kernels(k_cache)
        if ops is not None and k.dtype == k_cache.dtype:
            ops.write_kv(k, v, k_cache, v_cache, meta.slot_mapping)  # reads strided views
        else:
            k_cache.index_copy_(0, meta.slot_mapping, k)
            v_cache.index_copy_(0, meta.slot_mapping, v)
        nd = meta.num_decode_tokens
        if nd == meta.num_tokens:
            return self._decode(q, k_cache, v_cache, meta)
        if nd == 0:
            return self._prefill(q, k_cache, v_cache, meta.prefill)
        return torch.cat([self._decode(q[:nd], k_cache, v_cache, meta),
                          self._prefill(q[nd:], k_cache, v_cache, meta.prefill)])

    def _gather(self, cache: torch.Tensor, g: PaddedGroup) -> torch.Tensor:
        # index_select on rows is much faster than advanced indexing on CPU.
        # -> [num_reqs, num_kv_heads, max_seq_len, head_dim]
        return torch.index_select(cache, 0, g.context_slots).view(
            g.num_reqs, g.max_seq_len, self.num_kv_heads, self.head_dim).transpose(1, 2)

    def _decode(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        g = meta.decode
        ops = cpu_kernels(q)
        if ops is not None:
            # Fused kernel: reads K/V straight from the paged cache (no gather copy).
            nd = meta.num_decode_tokens
            out = ops.paged_decode_attention(q, k_cache, v_cache, meta.block_tables[:nd],
                                             meta.seq_lens[:nd], meta.block_size, self.scale)
            return out.view(nd, self.num_heads * self.head_dim)
        # The q heads sharing a kv head become that head's queries, so SDPA needs no GQA
        # expansion (much faster on CPU than enable_gqa for a single query).
        assert g is not None, "decode group layout missing"
        rep = self.num_heads // self.num_kv_heads
        out = F.scaled_dot_product_attention(
            q.reshape(g.num_reqs, self.num_kv_heads, rep, self.head_dim),
            self._gather(k_cache, g), self._gather(v_cache, g),
            attn_mask=g.attn_mask, scale=self.scale)
        return out.reshape(g.num_reqs, self.num_heads * self.head_dim)

    def _prefill(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 g: PaddedGroup) -> torch.Tensor:
        n, max_q = g.num_reqs, g.max_query_len
        if g.query_pad_index is None:
            qp = q.reshape(n, max_q, self.num_heads, self.head_dim)
        else:
            qp = q.new_zeros(n * max_q, self.num_heads, self.head_dim)
            qp[g.query_pad_index] = q
            qp = qp.view(n, max_q, self.num_heads, self.head_dim)
        out = F.scaled_dot_product_attention(
            qp.transpose(1, 2), self._gather(k_cache, g), self._gather(v_cache, g),
            attn_mask=g.attn_mask, scale=self.scale, is_causal=g.is_causal,
            enable_gqa=self.num_heads != self.num_kv_heads,
        )  # [n, num_heads, max_q, head_dim]
        out = out.transpose(1, 2).reshape(n * max_q, self.num_heads * self.head_dim)
        return out if g.query_pad_index is None else out[g.query_pad_index]
