"""One step's flat batch: planned on the host from the schedule (`plan_batch`, `plan_rows`), sent
to the device in one copy (`HostBatch.to_device` -> `ModelInputs`), and results brought back in
one copy (`to_host`)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from tokenmill.core.outputs import SchedulerOutput
from tokenmill.layers.attention import AttentionBackend, AttentionMetadata


@dataclass(frozen=True, slots=True)
class ModelInputs:
    input_ids: torch.Tensor  # [num_tokens] int64
    positions: torch.Tensor  # [num_tokens] int64
    attn: AttentionMetadata
    # [num_sampled] int64: rows of the hidden states to sample (a request with drafts: 1 + k)
    logits_indices: torch.Tensor
    sample_rows: list[int]  # indices into scheduler_output.scheduled of the sampling requests
    order: list[int]  # scheduler_output.scheduled indices in flat-batch order


@dataclass(frozen=True, slots=True)
class HostBatch:
    """One step's flat batch on the host (`plan_batch`): every index array in one int64
    buffer, and the sizes the attention metadata needs. Tensor-parallel ranks receive this
    (it pickles small) and each turns it into device tensors (`to_device`)."""

    # token ids, positions, slots, query starts, seq lens, block tables, logits rows
    flat: np.ndarray
    parts: tuple[int, ...]  # the length of each array in `flat`
    max_blocks: int
    max_query_len: int
    max_seq_len: int
    num_decode_tokens: int
    block_size: int
    query_lens: list[int]  # per attention row
    seq_lens: list[int]
    block_tables: list[list[int]]
    sample_rows: list[int]
    order: list[int]
    lora_rows: dict[int, list[int]]  # LoRA adapter id -> its requests' rows

    @property
    def num_tokens(self) -> int:
        return self.parts[0]

    def to_device(self, device: torch.device, backend: AttentionBackend) -> ModelInputs:
        """The step's tensors on `device` (one non-blocking copy) with `backend`'s metadata."""
        views = iter(_to_device(self.flat, device).split(list(self.parts)))
        input_ids, positions, slots, starts, seq_lens, tables, logits_rows = views
        common = AttentionMetadata(
            num_tokens=self.num_tokens,
            slot_mapping=slots,
            query_start_loc=starts.to(torch.int32),
            seq_lens=seq_lens.to(torch.int32),
            block_tables=tables.view(len(self.seq_lens), self.max_blocks).to(torch.int32),
            max_query_len=self.max_query_len,
            max_seq_len=self.max_seq_len,
            num_decode_tokens=self.num_decode_tokens,
            block_size=self.block_size,
            query_lens_host=self.query_lens,
            seq_lens_host=self.seq_lens,
            block_tables_host=self.block_tables,
        )
        return ModelInputs(
            input_ids=input_ids,
            positions=positions,
            attn=backend.build_metadata(common, device),
            logits_indices=logits_rows,
            sample_rows=self.sample_rows,
            order=self.order,
        )


def plan_batch(sched: SchedulerOutput, block_size: int) -> HostBatch:
    """The flat, unpadded batch of one step on the host (a pure function of the schedule).

    Single-query requests (decodes) are laid out first, then the multi-token chunks, so the
    attention backend can treat the two groups separately. A decode with draft tokens is laid
    out as one single-query row per token, each seeing the context up to itself (its block
    table repeated): the step stays a decode batch for every backend (and the CPU's C++ layer
    loop), and a draft attends to the drafts before it, whose K/V the step writes first. A
    sampling request has logits at its chunk's last position, and at the positions before it
    that verify its drafts.
    """
    order = sorted(
        range(len(sched.scheduled)),
        key=lambda i: (
            sched.scheduled[i].num_scheduled_tokens > 1 and not sched.scheduled[i].spec_token_ids
        ),
    )
    token_ids: list[int] = []
    # per attention row (a request, or one token of a decode with drafts)
    query_lens, seq_lens, block_tables = [], [], []
    sample_rows, logits_rows = [], []
    lora_rows: dict[int, list[int]] = {}
    for i in order:
        s = sched.scheduled[i]
        if s.request.lora_id is not None:
            first = len(token_ids)
            rows = range(first, first + s.num_scheduled_tokens)
            lora_rows.setdefault(s.request.lora_id, []).extend(rows)
        token_ids.extend(s.token_ids)
        table = list(s.block_ids)
        if s.spec_token_ids:
            query_lens.extend([1] * s.num_scheduled_tokens)
            seq_lens.extend(
                range(s.num_computed_tokens + 1, s.num_computed_tokens + s.num_scheduled_tokens + 1)
            )
            block_tables.extend([table] * s.num_scheduled_tokens)
        else:
            query_lens.append(s.num_scheduled_tokens)
            seq_lens.append(s.num_computed_tokens + s.num_scheduled_tokens)
            block_tables.append(table)
        if s.samples:
            sample_rows.append(i)
            logits_rows.extend(range(len(token_ids) - 1 - len(s.spec_token_ids), len(token_ids)))
    return plan_rows(
        token_ids,
        query_lens,
        seq_lens,
        block_tables,
        logits_rows,
        block_size,
        sample_rows,
        order,
        lora_rows,
    )


def plan_rows(
    token_ids: list[int],
    query_lens: list[int],
    seq_lens: list[int],
    block_tables: list[list[int]],
    logits_rows: list[int],
    block_size: int,
    sample_rows: list[int] | None = None,
    order: list[int] | None = None,
    lora_rows: dict[int, list[int]] | None = None,
) -> HostBatch:
    """A flat batch from its attention rows: row i computes the last `query_lens[i]` of its
    first `seq_lens[i]` positions (block table `block_tables[i]`), its tokens next in
    `token_ids`; single-query rows come first. `logits_rows` are the flat positions whose
    hidden states are sampled; the rest (`plan_batch`'s bookkeeping) is carried as given."""
    q = np.asarray(query_lens, dtype=np.int64)
    sl = np.asarray(seq_lens, dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(q)])
    # position of every new token: (seq_len - query_len) + offset within its chunk
    req_of_token = np.repeat(np.arange(len(q)), q)
    positions = (sl - q)[req_of_token] + (np.arange(starts[-1]) - starts[:-1][req_of_token])
    max_blocks = max(len(bt) for bt in block_tables)
    bt = np.zeros((len(q), max_blocks), dtype=np.int64)
    for i, row in enumerate(block_tables):
        bt[i, : len(row)] = row
    slot_mapping = bt[req_of_token, positions // block_size] * block_size + positions % block_size
    logits_indices = np.asarray(logits_rows, dtype=np.int64)
    parts = [
        np.asarray(token_ids, dtype=np.int64),
        positions,
        slot_mapping,
        starts,
        sl,
        bt.ravel(),
        logits_indices,
    ]
    return HostBatch(
        flat=np.concatenate(parts),
        parts=tuple(len(x) for x in parts),
        max_blocks=max_blocks,
        max_query_len=int(q.max()),
        max_seq_len=int(sl.max()),
        num_decode_tokens=int((q == 1).sum()),
        block_size=block_size,
        query_lens=query_lens,
        seq_lens=seq_lens,
        block_tables=block_tables,
        sample_rows=sample_rows or [],
        order=order or [],
        lora_rows=lora_rows or {},
    )


def prepare_inputs(
    sched: SchedulerOutput, block_size: int, device: torch.device, backend: AttentionBackend
) -> ModelInputs:
    """The step's inputs on `device` (`plan_batch`, then `HostBatch.to_device`): the common
    attention metadata, turned into `backend`'s own by its `build_metadata`."""
    return plan_batch(sched, block_size).to_device(device, backend)


def _to_device(host: np.ndarray, device: torch.device) -> torch.Tensor:
    """int64 host array -> a tensor on `device`: no copy on the CPU; on CUDA through pinned
    memory with a non-blocking copy (no host synchronisation)."""
    t = torch.from_numpy(host)
    if device.type != "cuda":
        return t
    return t.pin_memory().to(device, non_blocking=True)


def to_host(*tensors: torch.Tensor) -> list[list]:
    """The tensors as Python lists. On CUDA: non-blocking copies into pinned memory and one
    wait on an event (the step's only synchronisation; `tolist()` on device tensors would
    synchronise the stream once per tensor)."""
    if not tensors or tensors[0].device.type != "cuda":
        return [t.tolist() for t in tensors]
    pinned = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
    for dst, src in zip(pinned, tensors):
        dst.copy_(src, non_blocking=True)
    done = torch.cuda.Event()
    done.record()
    done.synchronize()
    return [p.tolist() for p in pinned]
