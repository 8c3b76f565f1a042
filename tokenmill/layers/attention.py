"""Attention over a paged KV cache, behind one seam: the `AttentionBackend`.

The cache of one layer is two tensors of the backend's `kv_cache_shape`, in the KV cache's
dtype (`CacheConfig.dtype`: the compute dtype or another; every backend converts): token-major
`[num_blocks * block_size, num_kv_heads, head_dim]` (the torch and Triton backends), or
head-major `[num_blocks, num_kv_heads, block_size, head_dim]` (the CPU backend where its
kernels cover decodes and chunks: a decode task then reads one head's rows of a block as one
contiguous stream). Token `i` of a request lives in slot
`block_table[i // block_size] * block_size + i % block_size`; the C++ kernels read the layout
from the cache's shape.

Per step the runner builds the common flat-batch `AttentionMetadata` once (a pure function of
the schedule), the backend turns it into its own metadata (`build_metadata`), and every layer's
`Attention` passes it to the backend's `forward`. The backend is chosen once at load
(`attention_backends.make_backend`) and handed to the model; model files never name one.
Backends (the reference here, the others in `layers/attention_backends.py`):
  * `TorchAttentionBackend`: the reference (any device): gathers each request's context into a
    padded tensor (`PaddedGroup`, its own metadata) and runs masked SDPA. Single-query requests
    ("decodes", laid out first by the runner) and multi-token chunks are attended separately so
    a long prefill chunk never pads the decodes to its length.
  * `CpuAttentionBackend`: the C++ kernels read the paged cache directly, for decodes and for
    multi-token chunks (causal, over any cached context; the reference path where the build has
    no kernel for the model's heads).
  * `TritonAttentionBackend`: one Triton launch for the whole mixed batch
    (`kernels/triton_attention.paged_attention`), split-KV for small decode batches.
Each backend carries the fused-ops object of the same choice (`layers/ops.py`) as `.ops`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F

from tokenmill.layers.ops import Rope, TorchOps


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
    """The common flat-batch description of one step, shared by all layers (device tensors,
    plus the host-side lists a backend may build its own metadata from)."""

    num_tokens: int
    slot_mapping: torch.Tensor  # [num_tokens] int64: cache slot written by each new token
    query_start_loc: torch.Tensor  # [num_reqs + 1] int32: offsets of each request's queries
    seq_lens: torch.Tensor  # [num_reqs] int32: context length after this step
    block_tables: torch.Tensor  # [num_reqs, max_blocks] int32
    max_query_len: int
    max_seq_len: int
    num_decode_tokens: int  # the first tokens belong to single-query requests
    block_size: int
    query_lens_host: list[int]
    seq_lens_host: list[int]
    block_tables_host: list[list[int]]


def common_fields(meta: AttentionMetadata) -> dict[str, Any]:
    """The common metadata's fields, to build a backend's own metadata from."""
    return {f.name: getattr(meta, f.name) for f in fields(AttentionMetadata)}


@dataclass(frozen=True, slots=True)
class TorchAttentionMetadata(AttentionMetadata):
    """The reference backend's metadata: the padded layout of the decodes, and of the chunks in
    contiguous groups of similar shape (`partition_chunks`), with each group's token count."""

    decode: PaddedGroup | None = None  # None when there are no decodes or a kernel reads them
    prefill: tuple[tuple[int, PaddedGroup], ...] = ()


def partition_chunks(query_lens: list[int], seq_lens: list[int]) -> list[tuple[int, int]]:
    """Split consecutive chunks into [lo, hi) groups for padded attention, so that padding never
    adds more than half a group's attention work (sum of query_len x seq_len), plus 16 queries'
    worth: one 1,000-token prompt next to 31 cached-prefix requests of 16 new tokens makes two
    groups, not one padded to 32 x 1,000 queries."""
    groups: list[tuple[int, int]] = []
    lo = 0
    for i in range(1, len(query_lens) + 1):
        if i < len(query_lens):
            q, s = query_lens[lo : i + 1], seq_lens[lo : i + 1]
            padded = len(q) * max(q) * max(s)
            if padded <= 1.5 * sum(a * b for a, b in zip(q, s)) + 16 * max(s):
                continue
        groups.append((lo, i))
        lo = i
    return groups


def build_padded_group(
    query_lens: list[int],
    seq_lens: list[int],
    block_tables: list[list[int]],
    block_size: int,
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
        return PaddedGroup(
            num_reqs,
            1,
            max_s,
            slots.flatten().to(device),
            None if mask is None else mask.to(device),
            None,
        )
    q_pos = torch.arange(max_q, dtype=torch.int64)
    abs_q = (s_lens - q_lens)[:, None] + q_pos[None, :]  # [num_reqs, max_q]
    mask = pos[None, None, :] <= abs_q[:, :, None]  # causal within the context
    valid_q = q_pos[None, :] < q_lens[:, None]
    mask = mask & valid_q[:, :, None]
    mask[:, :, 0] |= ~valid_q
    pad_index = None
    if not bool(valid_q.all()):
        pad_index = (torch.arange(num_reqs)[:, None] * max_q + q_pos[None, :])[valid_q].to(device)
    return PaddedGroup(
        num_reqs, max_q, max_s, slots.flatten().to(device), mask[:, None].to(device), pad_index
    )


class Attention:
    """One layer's attention: its head geometry and the backend chosen at load."""

    def __init__(
        self,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        scale: float,
        backend: AttentionBackend,
    ) -> None:
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.backend = backend

    def forward(
        self,
        q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        v: torch.Tensor,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,  # as the backend built it
        rope: Rope | None = None,
    ) -> torch.Tensor:  # [num_tokens, num_heads * head_dim]
        """Write the new K/V into the cache, then attend each query to its request's context
        (causal). With `rope`, q and k come unrotated: the backend rotates them as it writes
        the cache (`ops.rope_write_kv`, one launch on the Triton backend)."""
        return self.backend.forward(self, q, k, v, kv_cache, meta, rope)


class TorchAttentionBackend:
    """Reference paged attention: write new K/V, gather context, masked SDPA."""

    name = "torch"
    padded_decode = True  # whether decodes use the padded layout (kernels read block tables)
    # Whether a decode step can be captured as a graph: attention reads only device tensors
    # (no host-sized shapes) and padding rows (slot -1, no queries) are skipped.
    supports_graphs = False

    def __init__(self, ops: TorchOps, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
        self.ops = ops
        # the model's head geometry (to size launch grids, to choose kernels)
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim

    def kv_cache_shape(
        self, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int
    ) -> tuple[int, ...]:
        """One layer's K (or V) cache: token-major, a slot's heads side by side."""
        return (num_blocks * block_size, num_kv_heads, head_dim)

    def build_metadata(
        self, common: AttentionMetadata, device: torch.device
    ) -> TorchAttentionMetadata:
        q_lens, s_lens = common.query_lens_host, common.seq_lens_host
        nd = sum(1 for q in q_lens if q == 1)
        lists = (q_lens, s_lens, common.block_tables_host)

        def group(lo: int, hi: int) -> PaddedGroup:
            return build_padded_group(*(x[lo:hi] for x in lists), common.block_size, device)

        decode = group(0, nd) if nd and self.padded_decode else None
        prefill = tuple(
            (sum(q_lens[nd + lo : nd + hi]), group(nd + lo, nd + hi))
            for lo, hi in partition_chunks(q_lens[nd:], s_lens[nd:])
        )
        return TorchAttentionMetadata(**common_fields(common), decode=decode, prefill=prefill)

    def forward(
        self,
        layer: Attention,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        meta: TorchAttentionMetadata,
        rope: Rope | None = None,
    ) -> torch.Tensor:
        k_cache, v_cache = kv_cache
        q = self.write_kv(q, k, v, k_cache, v_cache, meta, rope)
        nd = meta.num_decode_tokens
        if nd == meta.num_tokens:
            return self._decode(layer, q, k_cache, v_cache, meta)
        parts = [self._decode(layer, q[:nd], k_cache, v_cache, meta)] if nd else []
        start = nd
        for num_tokens, group in meta.prefill:
            end = start + num_tokens
            parts.append(self._prefill(layer, q[start:end], k_cache, v_cache, group))
            start = end
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def write_kv(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        rope: Rope | None,
    ) -> torch.Tensor:
        """The step's K/V into the cache, rotated first with `rope`; returns q (rotated)."""
        if rope is None:
            self.ops.write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
            return q
        return self.ops.rope_write_kv(q, k, v, rope, k_cache, v_cache, meta.slot_mapping)

    @staticmethod
    def _gather(
        layer: Attention, cache: torch.Tensor, g: PaddedGroup, dtype: torch.dtype
    ) -> torch.Tensor:
        """The group's context rows in `dtype` (the query's; a cache may hold another):
        [num_reqs, num_kv_heads, max_seq_len, head_dim]."""
        # index_select on rows is much faster than advanced indexing on CPU.
        return (
            torch.index_select(cache, 0, g.context_slots)
            .to(dtype)
            .view(g.num_reqs, g.max_seq_len, layer.num_kv_heads, layer.head_dim)
            .transpose(1, 2)
        )

    def _decode(
        self,
        layer: Attention,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: TorchAttentionMetadata,
    ) -> torch.Tensor:
        g = meta.decode
        # The q heads sharing a kv head become that head's queries, so SDPA needs no GQA
        # expansion (much faster on CPU than enable_gqa for a single query).
        rep = layer.num_heads // layer.num_kv_heads
        out = F.scaled_dot_product_attention(
            q.reshape(g.num_reqs, layer.num_kv_heads, rep, layer.head_dim),
            self._gather(layer, k_cache, g, q.dtype),
            self._gather(layer, v_cache, g, q.dtype),
            attn_mask=g.attn_mask,
            scale=layer.scale,
        )
        return out.reshape(g.num_reqs, layer.num_heads * layer.head_dim)

    def _prefill(
        self,
        layer: Attention,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        g: PaddedGroup,
    ) -> torch.Tensor:
        n, max_q, h, d = g.num_reqs, g.max_query_len, layer.num_heads, layer.head_dim
        if g.query_pad_index is None:
            qp = q.reshape(n, max_q, h, d)
        else:
            qp = q.new_zeros(n * max_q, h, d)
            qp[g.query_pad_index] = q
            qp = qp.view(n, max_q, h, d)
        out = F.scaled_dot_product_attention(
            qp.transpose(1, 2),
            self._gather(layer, k_cache, g, q.dtype),
            self._gather(layer, v_cache, g, q.dtype),
            attn_mask=g.attn_mask,
            scale=layer.scale,
            is_causal=g.is_causal,
            enable_gqa=h != layer.num_kv_heads,
        )  # [n, num_heads, max_q, head_dim]
        out = out.transpose(1, 2).reshape(n * max_q, h * d)
        return out if g.query_pad_index is None else out[g.query_pad_index]


AttentionBackend = TorchAttentionBackend  # the interface every backend implements
