"""Draft tokens from a smaller model: speculative decoding's "draft_model" method.

After each step, the draft model catches up on the tokens of the step's requests that it has
not computed yet (a prefill chunk; a decode's accepted drafts and the target's own next token)
in one mixed forward pass, and guesses each decoding request's next token from the last of
them; k - 1 single-token passes then extend the guesses greedily. The target checks them in
its next step (`sample/rejection.py`): a greedy guess is a draft distribution with all its mass
on one token, for which rejection sampling keeps the target's distribution exactly.

The draft's KV cache is a pool of its own with the target's block count and block size,
indexed by the target's block tables (`DraftJob.block_ids`), so the scheduler's allocation,
prefix caching and preemption hold for both models. A guess's keys and values go to the
lookahead slots past its request's last token: those computed from guesses the target accepts
are the accepted tokens' own and are kept; the others are written again later.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from tokenmill.core.outputs import DraftJob
from tokenmill.models.base import CausalLM
from tokenmill.worker.batch import HostBatch, plan_rows, to_host
from tokenmill.worker.kv_pool import KVPool


class DraftProposer:
    """Owns the draft model and its KV pool; `propose` runs its passes after a step.

    `max_len` is the last position + 1 the draft may compute (its context, capped by the
    engine's); requests past it get no guesses. Guesses are ids below `vocab_size` (the
    target's vocabulary: a draft's larger padded vocabulary is cut to it); a token past a
    smaller draft vocabulary is fed to the draft as id 0 (its guesses there are worse, never an
    error)."""

    def __init__(
        self,
        model: CausalLM,
        num_blocks: int,
        block_size: int,
        kv_dtype: torch.dtype,
        device: torch.device,
        max_len: int,
        vocab_size: int,
    ) -> None:
        cfg = model.cfg
        self.model = model
        self.backend = model.attn_backend
        self.device = device
        self.block_size = block_size
        self.max_len = max_len
        self.vocab_size = min(vocab_size, cfg.vocab_size)
        self.embeddable = cfg.vocab_size if cfg.vocab_size < vocab_size else None
        shape = self.backend.kv_cache_shape(num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)
        self.kv_pool = KVPool(cfg.num_layers, shape, kv_dtype, device)
        # per request: the positions whose keys and values the draft computed, from its
        # tokens, or from its guesses past them (its last token and any fed guesses)
        self.computed: dict[str, int] = {}

    def _start(self, job: DraftJob) -> int:
        """The first position of `job` to compute: past those the draft computed, and at most
        its last token's (always computed again when it guesses: the target's own token, where
        a rejected guess's keys and values may be). The guesses the target accepts are a
        prefix of the draft's (its step's drafts are they, perhaps cut short), so the positions
        before the last token hold the keys and values of its real tokens."""
        start = self.computed.get(job.request_id, job.chunk_start)
        return min(start, job.end - 1) if job.num_drafts else min(start, job.end)

    @torch.inference_mode()
    def propose(self, jobs: list[DraftJob], dropped: Iterable[str] = ()) -> dict[str, list[int]]:
        """The guesses for each job's request (empty for a job with num_drafts 0 or past
        `max_len`). `dropped`: requests finished or preempted (their blocks are gone)."""
        for rid in dropped:
            self.computed.pop(rid, None)
        guesses: dict[str, list[int]] = {job.request_id: [] for job in jobs}
        rows = []  # (job, first position to compute, number of guesses)
        for job in jobs:
            if job.end > self.max_len:
                continue
            start = self._start(job)
            # the k - 1 fed guesses sit at positions end .. end + k - 2
            k = min(job.num_drafts, self.max_len - job.end + 1)
            if start < job.end:
                rows.append((job, start, k))
        if not rows:
            return guesses
        rows.sort(key=lambda row: row[0].end - row[1] > 1)  # single-query rows first
        token_ids: list[int] = []
        logits_rows: list[int] = []
        guessing = []  # (job, k) in logits-row order
        for job, start, k in rows:
            token_ids.extend(job.request.token_ids_slice(start, job.end))
            if k > 0:
                logits_rows.append(len(token_ids) - 1)
                guessing.append((job, k))
        if self.embeddable is not None:
            token_ids = [t if t < self.embeddable else 0 for t in token_ids]
        first = self._argmax(
            plan_rows(
                token_ids,
                [job.end - start for job, start, _ in rows],
                [job.end for job, _, _ in rows],
                [list(job.block_ids) for job, _, _ in rows],
                logits_rows,
                self.block_size,
            )
        )
        for (job, _), token in zip(guessing, first):
            guesses[job.request_id].append(token)
        for step in range(1, max((k for _, k in guessing), default=0)):
            # feed guess `step` of each request that wants more, at position end + step - 1
            live = [(job, k) for job, k in guessing if k > step]
            tokens = self._argmax(
                plan_rows(
                    [guesses[job.request_id][-1] for job, _ in live],
                    [1] * len(live),
                    [job.end + step for job, _ in live],
                    [list(job.block_ids) for job, _ in live],
                    list(range(len(live))),
                    self.block_size,
                )
            )
            for (job, _), token in zip(live, tokens):
                guesses[job.request_id].append(token)
        for job, _, _ in rows:
            fed = len(guesses[job.request_id]) - 1  # the last guess is never an input
            self.computed[job.request_id] = job.end + max(fed, 0)
        return guesses

    def _argmax(self, batch: HostBatch) -> list[int]:
        """Run the draft over `batch`; the greedy token at each of its logits rows."""
        inputs = batch.to_device(self.device, self.backend)
        hidden = self.model(inputs.input_ids, inputs.positions, self.kv_pool.caches, inputs.attn)
        if not len(inputs.logits_indices):
            return []
        logits = self.model.compute_logits(hidden[inputs.logits_indices], float32=False)
        if logits.shape[-1] > self.vocab_size:
            logits = logits[:, : self.vocab_size].contiguous()
        (tokens,) = to_host(self.backend.ops.argmax(logits))
        return tokens
