"""`profile_forward`: the largest step the scheduler can send, run once on a scratch KV pool to
measure its peak memory (the KV budget on a GPU) or to feed chosen tokens through the model (the
calibration of exact channels)."""

from __future__ import annotations

import numpy as np
import torch

from tokenmill.layers.attention import AttentionMetadata
from tokenmill.models.base import CausalLM
from tokenmill.worker.kv_pool import KVPool


@torch.inference_mode()
def profile_forward(
    model: CausalLM,
    num_tokens: int,
    num_sampled: int,
    block_size: int,
    kv_dtype: torch.dtype,
    device: torch.device,
    max_model_len: int,
    input_ids: torch.Tensor | None = None,
) -> int:
    """Run the largest step the scheduler can send (`num_tokens` prompt tokens, as sequences of
    at most `max_model_len`, then the float32 logits of `num_sampled` rows and a sort of them,
    as top-p sampling does) on a scratch KV pool just big enough. Returns its peak memory
    beyond what was allocated before and the scratch pool (CUDA; 0 on other devices, where
    nothing is measured). The tokens are `input_ids` when given (the calibration of exact
    channels), else zeros."""
    backend = model.attn_backend
    cfg = model.cfg
    seq = min(num_tokens, max_model_len)
    # a shorter remainder first: a 1-token sequence is a decode, and decodes come first
    lens = ([num_tokens % seq] if num_tokens % seq else []) + [seq] * (num_tokens // seq)
    per_seq = -(-seq // block_size)  # blocks per sequence
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    pool = KVPool(
        cfg.num_layers,
        backend.kv_cache_shape(len(lens) * per_seq, block_size, cfg.num_kv_heads, cfg.head_dim),
        kv_dtype,
        device,
    )
    positions = np.concatenate([np.arange(n) for n in lens])
    seq_of = np.repeat(np.arange(len(lens)), lens)
    tables = [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(len(lens))]
    starts = np.concatenate([[0], np.cumsum(lens)])
    common = AttentionMetadata(
        num_tokens=num_tokens,
        slot_mapping=torch.from_numpy(seq_of * per_seq * block_size + positions).to(device),
        query_start_loc=torch.from_numpy(starts.astype(np.int32)).to(device),
        seq_lens=torch.tensor(lens, dtype=torch.int32, device=device),
        block_tables=torch.tensor(tables, dtype=torch.int32, device=device),
        max_query_len=seq,
        max_seq_len=seq,
        num_decode_tokens=sum(1 for n in lens if n == 1),
        block_size=block_size,
        query_lens_host=lens,
        seq_lens_host=lens,
        block_tables_host=tables,
    )
    if input_ids is None:
        ids = torch.zeros(num_tokens, dtype=torch.int64, device=device)
    else:
        ids = input_ids.to(device=device, dtype=torch.int64)
        assert ids.shape == (num_tokens,), (ids.shape, num_tokens)
    hidden = model(
        ids,
        torch.from_numpy(positions).to(device),
        pool.caches,
        backend.build_metadata(common, device),
    )
    rows = hidden[-1:].expand(min(num_sampled, num_tokens), -1)
    model.compute_logits(rows).sort(dim=-1, descending=True)
    if not cuda:
        return 0
    torch.cuda.synchronize(device)
    return max(0, torch.cuda.max_memory_allocated(device) - before - pool.reserved_bytes)
