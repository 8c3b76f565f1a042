"""Verification of draft tokens (speculative decoding) by rejection sampling.

A request with k draft tokens has k + 1 rows of logits in one step: at its last known token
and at each draft. Draft j is accepted with probability min(1, p_j(d_j) / q_j(d_j)), where
p_j is the target distribution at its position (after temperature, top-k, top-p, min-p) and q_j
the proposer's. At the first rejected draft the step's own token is drawn from the residual
max(0, p_j - q_j), renormalised; when every draft is accepted, from p_k (the "bonus" token).
The tokens then follow p exactly, whatever the drafts were (Leviathan et al., 2023; Chen et
al., 2023). Prompt-lookup drafts are certain (q_j is one-hot at d_j), so the acceptance
probability is p_j(d_j) and the residual is p_j with d_j removed. Greedy rows accept a draft
exactly when it is the argmax, which makes the output token for token that of plain greedy
decoding.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch

from tokenmill.sample.metadata import SamplingMetadata
from tokenmill.sample.sampler import apply_filters

_NEG_INF = float("-inf")


def accept_greedy(targets: Sequence[int], drafts: Sequence[Sequence[int]]) -> list[list[int]]:
    """Per request, the tokens a greedy step emits: `targets` holds the argmax of each of its
    rows (1 + len(drafts[r]) of them, requests in order); the drafts are kept while each equals
    the argmax before it, then the argmax after the last kept draft follows."""
    out, pos = [], 0
    for d in drafts:
        row = targets[pos : pos + 1 + len(d)]
        n = 0
        while n < len(d) and row[n] == d[n]:
            n += 1
        out.append(list(row[: n + 1]))
        pos += 1 + len(d)
    return out


def _expand(md: SamplingMetadata, index: torch.Tensor) -> SamplingMetadata:
    """The metadata with row i of the result taken from row index[i] (filters only)."""

    def pick(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t[index]

    return dataclasses.replace(
        md,
        temperature=md.temperature[index],
        top_k=pick(md.top_k),
        top_p=pick(md.top_p),
        min_p=pick(md.min_p),
        generators={},
    )


def rejection_sample(
    logits: torch.Tensor, drafts: Sequence[Sequence[int]], md: SamplingMetadata, ops: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """Verify the drafts of R requests in one batch, with no host synchronisation.

    `logits` [sum(1 + k_r), V] float32 holds request r's rows in order (its last known token,
    then each of its k_r >= 1 drafts); `md` has one row per request, with no penalties, logit
    bias, masks or logprobs (requests that use them get no drafts). Randomness comes from each
    request's generator where it has one (`md.generators`), else the global RNG; `ops` draws
    the final tokens (`layers.ops`).

    Returns (num_accepted [R] int64, final [R] int64): request r emits
    drafts[r][:num_accepted[r]], then final[r].
    """
    assert md.repetition_penalty is None and md.presence_penalty is None
    assert md.frequency_penalty is None and md.forbidden_mask is None and md.logit_bias is None
    device = logits.device
    num_drafts = torch.tensor([len(d) for d in drafts], dtype=torch.int64)
    num_rows, max_k = len(drafts), int(num_drafts.max())
    counts = num_drafts + 1
    starts = torch.cumsum(counts, 0) - counts
    padded = torch.zeros(num_rows, max_k, dtype=torch.int64)
    for r, d in enumerate(drafts):
        padded[r, : len(d)] = torch.tensor(d, dtype=torch.int64)
    cols = torch.arange(max_k)
    valid = cols[None] < num_drafts[:, None]
    # the row that verifies draft j of request r (padding points at the request's first row)
    rows = starts[:, None] + torch.where(valid, cols[None], 0)
    num_drafts, starts, padded, valid, rows = (
        t.to(device) for t in (num_drafts, starts, padded, valid, rows)
    )
    request_of_row = torch.repeat_interleave(
        torch.arange(num_rows, device=device), counts.to(device)
    )

    filtered = apply_filters(logits, _expand(md, request_of_row))  # tempered; greedy rows unchanged
    greedy = (md.temperature == 0)[:, None]
    argmax_ok = ops.argmax(filtered)[rows] == padded
    p_draft = filtered.softmax(dim=1)[rows, padded]  # [R, max_k]
    p_accept = torch.where(greedy, argmax_ok.to(p_draft.dtype), p_draft)
    u = torch.rand(num_rows, max_k, device=device)
    for r, generator in md.generators.items():  # k_r draws: the same in any batch
        u[r, : len(drafts[r])].uniform_(generator=generator)
    accepted = (u < p_accept) & valid
    num_accepted = accepted.to(torch.int64).cumprod(dim=1).sum(dim=1)

    final_logits = filtered[starts + num_accepted]  # [R, V], a copy
    rejected = num_accepted < num_drafts
    rejected_draft = padded.gather(1, num_accepted.clamp(max=max_k - 1)[:, None])
    # the residual of a certain draft: p without the rejected token
    mask = torch.zeros_like(final_logits, dtype=torch.bool)
    mask.scatter_(1, rejected_draft, rejected[:, None])
    final_logits.masked_fill_(mask, _NEG_INF)
    unit = (md.temperature > 0).to(torch.float32)  # the rows are tempered already
    return num_accepted, ops.sample(final_logits, unit, md.generators)
