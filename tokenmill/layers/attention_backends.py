"""The attention backends beyond the torch reference (`layers/attention.py`, which describes
the seam): the CPU's C++ kernels and Triton, and `make_backend`, which chooses one at load."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from tokenmill.layers.attention import (
    AttentionBackend,
    AttentionMetadata,
    TorchAttentionBackend,
    TorchAttentionMetadata,
    common_fields,
)
from tokenmill.layers.ops import backend_name, make_ops


@dataclass(frozen=True, slots=True)
class CpuAttentionMetadata(AttentionMetadata):
    """The C++ kernels' metadata: the multi-token chunks' query offsets, counted from the first
    chunk token (the decodes come first, one token each)."""

    chunk_query_start_loc: torch.Tensor | None = None  # [num_chunks + 1] int32


class CpuAttentionBackend(TorchAttentionBackend):
    """The C++ kernels: decodes (`paged_decode_attention`) and multi-token chunks
    (`paged_prefill_attention`) read K/V straight from the paged cache: no gathered copy, no
    padded layout, no mask. Chunks take the reference path where the build has no prefill
    kernel for the model's heads."""

    name = "cpu"
    padded_decode = False

    def __init__(self, ops: Any, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
        super().__init__(ops, num_heads, num_kv_heads, head_dim)
        self.prefill_kernel = bool(
            ops.kernels.paged_prefill_attention_supported(num_heads, num_kv_heads, head_dim)
        )

    def kv_cache_shape(
        self, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int
    ) -> tuple[int, ...]:
        """Head-major where the C++ kernels read every step's attention (32 requests at context
        144 from DRAM: 1.2-1.3x over token-major); token-major where chunks take the reference
        path, which gathers slots."""
        if not self.prefill_kernel:
            return super().kv_cache_shape(num_blocks, block_size, num_kv_heads, head_dim)
        return (num_blocks, num_kv_heads, block_size, head_dim)

    def build_metadata(
        self, common: AttentionMetadata, device: torch.device
    ) -> CpuAttentionMetadata | TorchAttentionMetadata:
        if not self.prefill_kernel:
            return super().build_metadata(common, device)
        nd = common.num_decode_tokens
        chunks = None
        if nd < common.num_tokens:
            chunks = common.query_start_loc[nd:] - nd
        return CpuAttentionMetadata(**common_fields(common), chunk_query_start_loc=chunks)

    def forward(self, layer, q, k, v, kv_cache, meta, rope=None):
        if not self.prefill_kernel:
            return super().forward(layer, q, k, v, kv_cache, meta, rope)
        k_cache, v_cache = kv_cache
        q = self.write_kv(q, k, v, k_cache, v_cache, meta, rope)
        nd = meta.num_decode_tokens
        if nd == meta.num_tokens:
            return self._decode(layer, q, k_cache, v_cache, meta)
        out = self.ops.kernels.paged_prefill_attention(
            q[nd:],
            k_cache,
            v_cache,
            meta.block_tables[nd:],
            meta.seq_lens[nd:],
            meta.chunk_query_start_loc,
            meta.block_size,
            layer.scale,
        ).view(meta.num_tokens - nd, layer.num_heads * layer.head_dim)
        return torch.cat([self._decode(layer, q[:nd], k_cache, v_cache, meta), out]) if nd else out

    def _decode(self, layer, q, k_cache, v_cache, meta):
        nd = meta.num_decode_tokens
        out = self.ops.kernels.paged_decode_attention(
            q,
            k_cache,
            v_cache,
            meta.block_tables[:nd],
            meta.seq_lens[:nd],
            meta.block_size,
            layer.scale,
        )
        return out.view(nd, layer.num_heads * layer.head_dim)


@dataclass(frozen=True, slots=True)
class TritonAttentionMetadata(AttentionMetadata):
    num_splits: int = 1  # split-KV ranges per sequence (1: the unsplit kernel)


class TritonAttentionBackend(TorchAttentionBackend):
    """One Triton launch per layer for the whole mixed batch, straight from the common
    metadata; decode batches too small to fill the GPU split each context into ranges."""

    name = "triton"
    supports_graphs = True
    # split-KV when a decode batch has fewer (request, KV head) programs than this
    SPLIT_BELOW_PROGRAMS = 128
    MAX_SPLITS = 16
    MIN_SPLIT_TOKENS = 128  # of max_seq_len per split

    def build_metadata(
        self, common: AttentionMetadata, device: torch.device
    ) -> TritonAttentionMetadata:
        return TritonAttentionMetadata(**common_fields(common), num_splits=self._splits(common))

    def _splits(self, common: AttentionMetadata) -> int:
        programs = len(common.seq_lens_host) * self.num_kv_heads
        if common.max_query_len > 1 or programs >= self.SPLIT_BELOW_PROGRAMS:
            return 1
        splits = 1
        while (
            splits < self.MAX_SPLITS
            and programs * splits * 2 <= self.SPLIT_BELOW_PROGRAMS
            and common.max_seq_len >= self.MIN_SPLIT_TOKENS * splits * 2
        ):
            splits *= 2
        return splits

    def forward(self, layer, q, k, v, kv_cache, meta, rope=None):
        from tokenmill.kernels.triton_attention import paged_attention

        k_cache, v_cache = kv_cache
        q = self.write_kv(q, k, v, k_cache, v_cache, meta, rope)
        # the rows of a captured graph's padding (no request) come back as zeros: no garbage
        # (inf / NaN) goes through the rest of the step
        out = paged_attention(
            q,
            k_cache,
            v_cache,
            meta.block_tables,
            meta.seq_lens,
            meta.query_start_loc,
            meta.max_query_len,
            meta.block_size,
            layer.scale,
            num_splits=meta.num_splits,
        )
        return out.view(meta.num_tokens, layer.num_heads * layer.head_dim)


_BACKENDS = {
    "torch": TorchAttentionBackend,
    "cpu": CpuAttentionBackend,
    "triton": TritonAttentionBackend,
}


def make_backend(
    device: torch.device | str,
    dtype: torch.dtype,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
) -> tuple[AttentionBackend, str]:
    """The attention backend (with its ops) for `device` and `dtype`, and why it was chosen
    (`layers.ops.backend_name`: CUDA -> triton, CPU with built kernels -> cpu, else torch;
    TOKENMILL_BACKEND overrides)."""
    name, why = backend_name(device, dtype)
    return _BACKENDS[name](make_ops(name), num_heads, num_kv_heads, head_dim), why
