"""What a step computes from the hidden states of prompt positions rather than by sampling: the
prompt logprobs a request asked for (`prompt_logprobs`) and an embedding request's pooled sums
(`pool`)."""

from __future__ import annotations

import numpy as np
import torch

from tokenmill.core.outputs import PooledChunk, PromptLogprobsChunk, SchedulerOutput
from tokenmill.models.base import CausalLM
from tokenmill.sample.sampler import compute_logprobs

# Prompt logprobs are computed over at most this many logits at once ([rows, vocab] float32),
# so a long prefill chunk does not materialise its whole logits matrix.
PROMPT_LOGPROBS_SLICE_ELEMENTS = 1 << 24


def prompt_logprobs(
    model: CausalLM, sched: SchedulerOutput, order: list[int], hidden: torch.Tensor
) -> dict[str, PromptLogprobsChunk]:
    """Logprobs of the prompt tokens that this step's chunks predict (log_softmax of the
    float32 logits, no sampling transforms), in slices of rows to bound memory."""
    rows: list[np.ndarray] = []
    targets: list[int] = []
    wanted: list[tuple[str, int, int, int]] = []  # (request id, first position, rows, k)
    start = 0
    for i in order:  # flat-batch order: row offsets follow it
        s = sched.scheduled[i]
        span = s.prompt_logprob_positions
        if span:  # span starts at the chunk's first token
            rows.append(np.arange(start, start + len(span)))
            targets.extend(s.request.prompt_token_ids[span.start + 1 : span.stop + 1])
            wanted.append(
                (s.request_id, span.start, len(span), s.request.sampling_params.prompt_logprobs)
            )
        start += s.num_scheduled_tokens
    k = max(w[3] for w in wanted)
    row_index = torch.from_numpy(np.concatenate(rows)).to(hidden.device)
    target_ids = torch.tensor(targets, dtype=torch.int64, device=hidden.device)
    step = max(1, PROMPT_LOGPROBS_SLICE_ELEMENTS // model.cfg.vocab_size)
    lps, ids, ranks = [], [], []
    for lo in range(0, len(targets), step):
        logits = model.compute_logits(hidden[row_index[lo : lo + step]])  # float32
        lp, tid, rank = compute_logprobs(
            torch.log_softmax(logits, dim=-1), target_ids[lo : lo + step], k
        )
        lps.append(lp)
        ids.append(tid)
        ranks.append(rank)
    all_lps = torch.cat(lps).tolist()
    all_ids = torch.cat(ids).tolist()
    all_ranks = torch.cat(ranks).tolist()
    result: dict[str, PromptLogprobsChunk] = {}
    pos = 0
    for rid, first_position, n, kr in wanted:
        result[rid] = PromptLogprobsChunk(
            first_position,
            [r[: 1 + kr] for r in all_ids[pos : pos + n]],
            [r[: 1 + kr] for r in all_lps[pos : pos + n]],
            all_ranks[pos : pos + n],
        )
        pos += n
    return result


def pool(sched: SchedulerOutput, order: list[int], hidden: torch.Tensor) -> dict[str, PooledChunk]:
    """For each embedding request, the float32 sum of the hidden states of the positions
    it pools in this step (`ScheduledRequest.pool_positions`), copied to the CPU at once."""
    spans: list[tuple[str, int, int, int]] = []  # (request id, first position, row, rows)
    start = 0
    for i in order:  # flat-batch order: row offsets follow it
        s = sched.scheduled[i]
        span = s.pool_positions
        if span:
            row = start + span.start - s.num_computed_tokens
            spans.append((s.request_id, span.start, row, len(span)))
        start += s.num_scheduled_tokens
    totals = torch.stack([hidden[row : row + n].float().sum(0) for _, _, row, n in spans])
    totals = totals.cpu()
    return {rid: PooledChunk(first, n, totals[j]) for j, (rid, first, _, n) in enumerate(spans)}
