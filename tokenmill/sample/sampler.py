"""Batched sampler: penalties, temperature, top-k / top-p / min-p, seeded sampling, logprobs.

Order (vLLM's): the runner first restricts structured-output rows to the tokens their constraint
allows (`apply_token_bitmask_`, in place, before any path, greedy included); logprobs come from
those logits; then the min_tokens / allowed_token_ids mask, logit_bias, repetition penalty,
frequency / presence penalties; greedy rows take the argmax of the penalised logits; random
rows are divided by their temperature, filtered by top-k, top-p and min-p, and sampled by the
ops seam's `sample` (`random_sample`: the exponential race on CUDA, the inverse CDF on the CPU,
which the C++ kernels compute in one pass per row), seeded rows from their own generator so
that their tokens do not depend on the rest of the batch.
Everything runs in float32 whatever the logits' dtype, on the logits' device, with no host
synchronisation (shapes come from host-side metadata; the caller copies the tokens back once).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from tokenmill.sample.metadata import SamplingMetadata, build_sampling_metadata

__all__ = [
    "Sampler",
    "SamplerOutput",
    "SamplingMetadata",
    "apply_min_p",
    "apply_penalties",
    "apply_temperature",
    "apply_token_bitmask_",
    "apply_top_k_top_p",
    "build_sampling_metadata",
    "compute_logprobs",
    "draw_uniforms",
    "process_logits",
    "random_sample",
]

_NEG_INF = float("-inf")


@dataclass
class SamplerOutput:
    """What one sampling step returns, one row per sampled sequence."""

    sampled_token_ids: torch.Tensor  # [num_rows] int64
    logprobs: torch.Tensor | None = None  # [num_rows, 1 + k] float32: sampled first, then top-k
    logprob_token_ids: torch.Tensor | None = None  # [num_rows, 1 + k] int64
    sampled_rank: torch.Tensor | None = None  # [num_rows] int64, 1 = most likely raw token


def _token_mask(token_ids: torch.Tensor, num_rows: int, vocab_size: int) -> torch.Tensor:
    """[num_rows, vocab_size] bool: which ids occur in each row (padding id = vocab_size)."""
    mask = torch.zeros(num_rows, vocab_size + 1, dtype=torch.bool, device=token_ids.device)
    mask.scatter_(1, token_ids, True)
    return mask[:, :vocab_size]


def _token_counts(token_ids: torch.Tensor, num_rows: int, vocab_size: int) -> torch.Tensor:
    """[num_rows, vocab_size] float32: how often each id occurs in each row."""
    counts = torch.zeros(num_rows, vocab_size + 1, dtype=torch.float32, device=token_ids.device)
    ones = torch.ones(token_ids.shape, dtype=torch.float32, device=token_ids.device)
    counts.scatter_add_(1, token_ids, ones)
    return counts[:, :vocab_size]


_BIT_TABLES: dict[torch.device, torch.Tensor] = {}


def _bit_table(device: torch.device) -> torch.Tensor:
    """[256, 8] bool: the bits of every byte value, least significant first."""
    table = _BIT_TABLES.get(device)
    if table is None:
        values = torch.arange(256, dtype=torch.int32, device=device)
        table = (values[:, None] >> torch.arange(8, dtype=torch.int32, device=device)) & 1 > 0
        _BIT_TABLES[device] = table
    return table


def apply_token_bitmask_(
    logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor | None = None
) -> None:
    """In place: set to -inf, in rows `rows` [k] of `logits` [num_rows, vocab] (all rows when
    None), every token whose bit is clear in that row's `bitmask` [k, ceil(vocab / 32)] int32
    (token t: bit t % 32 of word t // 32). Other rows are untouched."""
    vocab_size = logits.shape[1]
    # little-endian int32 words -> bytes -> bits: token order
    allowed = _bit_table(logits.device)[bitmask.contiguous().view(torch.uint8).long()]
    allowed = allowed.view(bitmask.shape[0], -1)
    if allowed.shape[1] < vocab_size:  # ids past the bitmask are never allowed
        pad = allowed.new_zeros(allowed.shape[0], vocab_size - allowed.shape[1])
        allowed = torch.cat([allowed, pad], dim=1)
    forbidden = ~allowed[:, :vocab_size]
    if rows is None:
        logits.masked_fill_(forbidden, _NEG_INF)
    else:
        logits[rows] = logits[rows].masked_fill(forbidden, _NEG_INF)


def apply_penalties(logits: torch.Tensor, md: SamplingMetadata) -> torch.Tensor:
    """min_tokens / allowed_token_ids mask, then logit_bias, then CTRL repetition penalty, then
    OpenAI frequency / presence penalties (vLLM's order).

    logits: [num_rows, vocab] float32. Returns a new tensor; the input is not modified.
    """
    num_rows, vocab_size = logits.shape
    if md.forbidden_mask is not None:
        logits = logits.masked_fill(md.forbidden_mask, _NEG_INF)
    if md.logit_bias is not None:
        rows, ids, bias = md.logit_bias
        logits = logits.index_put((rows, ids), bias, accumulate=True)
    if md.repetition_penalty is not None:
        seen = torch.zeros(num_rows, vocab_size, dtype=torch.bool, device=logits.device)
        if md.prompt_token_ids is not None:
            seen |= _token_mask(md.prompt_token_ids, num_rows, vocab_size)
        if md.output_token_ids is not None:
            seen |= _token_mask(md.output_token_ids, num_rows, vocab_size)
        penalty = md.repetition_penalty.unsqueeze(1)  # [num_rows, 1]
        penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
        logits = torch.where(seen, penalised, logits)
    if md.output_token_ids is not None and (
        md.frequency_penalty is not None or md.presence_penalty is not None
    ):
        counts = _token_counts(md.output_token_ids, num_rows, vocab_size)
        if md.frequency_penalty is not None:
            logits = logits - md.frequency_penalty.unsqueeze(1) * counts
        if md.presence_penalty is not None:
            logits = logits - md.presence_penalty.unsqueeze(1) * (counts > 0).float()
    return logits


def apply_temperature(logits: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """Divide each row by its temperature; greedy rows (temperature 0) are left as they are."""
    safe = torch.where(temperature > 0, temperature, torch.ones_like(temperature))
    return logits / safe.unsqueeze(1)


def _kth_largest(values: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """[num_rows, 1]: each row's k-th largest value of a descending-sorted `values`; -inf if k=0."""
    kth = values.gather(1, (k - 1).clamp(min=0).unsqueeze(1))
    return torch.where(k.unsqueeze(1) > 0, kth, torch.full_like(kth, _NEG_INF))


def apply_top_k_top_p(
    logits: torch.Tensor,
    top_k: torch.Tensor | None,
    top_p: torch.Tensor | None,
    max_top_k: int = 0,
) -> torch.Tensor:
    """Set to -inf every token outside the row's top-k and outside its top-p nucleus.

    top-k keeps tokens whose logit is >= the k-th largest (ties at the threshold are kept).
    top-p keeps the smallest highest-probability set whose total probability reaches top_p
    (always at least the most likely token). Without top_p there is no full-vocabulary sort,
    only a top-`max_top_k` (the largest k of the batch, known on the host: no device sync).
    """
    if top_k is None and top_p is None:
        return logits
    vocab_size = logits.shape[1]
    if top_p is None:
        assert top_k is not None
        max_k = min(max_top_k, vocab_size)
        if max_k <= 0:
            return logits
        top_values = logits.topk(max_k, dim=1).values  # [num_rows, max_k], descending
        return logits.masked_fill(logits < _kth_largest(top_values, top_k), _NEG_INF)

    sorted_logits, order = logits.sort(dim=1, descending=True)  # [num_rows, vocab]
    if top_k is not None:
        kth = _kth_largest(sorted_logits, top_k)
        sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, _NEG_INF)
    probs = sorted_logits.softmax(dim=1)
    mass_before = probs.cumsum(dim=1) - probs  # probability of the strictly better tokens
    remove = (mass_before >= top_p.unsqueeze(1)) & (top_p.unsqueeze(1) < 1.0)
    remove[:, 0] = False
    sorted_logits = sorted_logits.masked_fill(remove, _NEG_INF)
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor | None) -> torch.Tensor:
    """Drop tokens with prob < min_p * max_prob, i.e. logit < max_logit + log(min_p)."""
    if min_p is None:
        return logits
    threshold = logits.amax(dim=1, keepdim=True) + min_p.unsqueeze(1).log()
    return logits.masked_fill(logits < threshold, _NEG_INF)


def process_logits(logits: torch.Tensor, md: SamplingMetadata) -> torch.Tensor:
    """The float32 logits random rows sample from: penalties, temperature, top-k/p, min-p."""
    logits = apply_penalties(logits.to(torch.float32), md)
    return apply_filters(logits, md)


def apply_filters(penalised: torch.Tensor, md: SamplingMetadata) -> torch.Tensor:
    """Temperature, then top-k / top-p, then min-p (greedy rows, temperature 0, unchanged)."""
    logits = apply_temperature(penalised, md.temperature)
    logits = apply_top_k_top_p(logits, md.top_k, md.top_p, md.max_top_k)
    return apply_min_p(logits, md.min_p)


def random_sample(
    probs: torch.Tensor, generators: dict[int, torch.Generator], method: str | None = None
) -> torch.Tensor:
    """[num_rows] int64 sampled from probs [num_rows, vocab]; no host synchronisation.

    Rows with a generator draw their randomness from it alone (independent of the batch); the
    other rows share one batched draw from the global RNG. On CUDA: the exponential race,
    argmax(probs / q) with q ~ Exp(1), one parallel draw per token. On the CPU, where drawing a
    vocabulary's worth of exponentials costs ~0.9 ms per row (49k tokens), the inverse CDF: one
    uniform u per row and the first token whose cumulative probability exceeds u x total. Both
    sample exactly from probs and never pick a token of probability 0. `method`
    ("exponential" | "inverse_cdf") overrides the choice by device (tests run both).
    """
    method = method or ("inverse_cdf" if probs.device.type == "cpu" else "exponential")
    if method == "inverse_cdf":
        return _inverse_cdf_sample(probs, generators)
    q = torch.empty_like(probs)
    if len(generators) < probs.shape[0]:
        q.exponential_()
    for row, generator in generators.items():
        q[row].exponential_(generator=generator)
    # Exp(1) may round to 0; a tiny floor keeps 0-probability tokens at 0 instead of NaN.
    q.clamp_(min=torch.finfo(torch.float32).tiny)
    return probs.div(q).argmax(dim=1)


def _inverse_cdf_sample(
    probs: torch.Tensor, generators: dict[int, torch.Generator]
) -> torch.Tensor:
    return inverse_cdf(probs, draw_uniforms(probs.shape[0], generators))


def draw_uniforms(num_rows: int, generators: dict[int, torch.Generator]) -> torch.Tensor:
    """[num_rows] float64 in [0, 1) on the CPU, the inverse CDF's one draw per row: rows in
    `generators` from their own generator, the others from one batched draw of the global RNG."""
    u = torch.empty(num_rows, dtype=torch.float64)
    if len(generators) < num_rows:
        u.uniform_()
    for row, generator in generators.items():
        u[row : row + 1].uniform_(generator=generator)
    return u


CDF_BLOCK = 256  # tokens per block of the two-level inverse CDF


def inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """[num_rows] int64: per row, the first token whose cumulative probability exceeds
    u x total (u: [num_rows] float64 in [0, 1)); never a token of probability 0.

    Two levels, because a cumulative sum over the vocabulary is sequential (~5 ns a token on
    the CPU, 0.2 ms per 49k-token row): the masses of blocks of CDF_BLOCK tokens pick the block,
    then one block's float64 cumulative sum picks the token. The same token as one float64
    cumulative sum over the row, except where u x total falls within the float32 rounding of
    a block's mass (~1e-7 relative) of a block boundary.
    """
    num_rows, vocab_size = probs.shape
    pad = -vocab_size % CDF_BLOCK
    blocks = (torch.nn.functional.pad(probs, (0, pad)) if pad else probs).view(
        num_rows, -1, CDF_BLOCK
    )
    mass = blocks.sum(dim=2).to(torch.float64)  # [num_rows, num_blocks]
    cdf = torch.nn.functional.pad(mass, (1, 0)).cumsum(dim=1)  # column 0: no block yet
    target = u * cdf[:, -1]
    block = (_first_above(cdf, target) - 1).clamp_(min=0)  # column 0 is never above
    mass_before = cdf.gather(1, block.unsqueeze(1)).squeeze(1)  # <= target: block is the first
    inner = blocks[torch.arange(num_rows), block].to(torch.float64).cumsum(dim=1)
    return block * CDF_BLOCK + _first_above(inner, target - mass_before)


def _first_above(cdf: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per row of a non-decreasing `cdf`, the first column above `target`, capped at the last
    column that adds mass (rounding can put the target at or past the row's total)."""
    first = torch.searchsorted(cdf, target.unsqueeze(1), right=True).squeeze(1)
    last = (cdf < cdf[:, -1:]).sum(dim=1)
    return torch.minimum(first, last)


def compute_logprobs(
    raw_logprobs: torch.Tensor, sampled: torch.Tensor, num_logprobs: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logprobs [num_rows, 1 + k], token ids [num_rows, 1 + k], sampled rank [num_rows]).

    Column 0 is the sampled token; columns 1..k are the k most likely tokens, best first.
    The rank counts tokens at least as likely as the sampled one (1 = the most likely).
    """
    ids = sampled.unsqueeze(1)  # [num_rows, 1]
    sampled_logprob = raw_logprobs.gather(1, ids)
    rank = (raw_logprobs >= sampled_logprob).sum(dim=1)
    k = min(num_logprobs, raw_logprobs.shape[1])
    if k == 0:
        return sampled_logprob, ids, rank
    top = raw_logprobs.topk(k, dim=1)
    logprobs = torch.cat([sampled_logprob, top.values], dim=1)
    token_ids = torch.cat([ids, top.indices], dim=1)
    return logprobs, token_ids, rank


class Sampler(torch.nn.Module):
    """Turns the logits of the rows to sample into next tokens (and logprobs when asked).

    `ops` (the fused-ops seam, `layers.ops`, chosen once at load) takes the argmax and the
    draw from the softmax: the PyTorch reference's `TorchOps`, or `CpuOps`, whose C++ kernels
    do the CPU's in one pass per row.
    """

    def __init__(self, ops: Any) -> None:
        super().__init__()
        self.ops = ops

    def forward(self, logits: torch.Tensor, metadata: SamplingMetadata) -> SamplerOutput:
        md = metadata
        if logits.dim() != 2 or logits.shape[0] != md.num_rows:
            raise ValueError(
                f"logits must be [num_rows={md.num_rows}, vocab], got {tuple(logits.shape)}"
            )
        logits = logits.to(torch.float32)  # [num_rows, vocab]; all later ops are out of place
        raw_logprobs = None
        if md.max_num_logprobs is not None:
            raw_logprobs = torch.log_softmax(logits, dim=1)

        penalised = apply_penalties(logits, md)
        if md.all_greedy:
            sampled = self.ops.argmax(penalised)
        elif md.top_k is None and md.top_p is None and md.min_p is None:
            sampled = self.ops.sample(penalised, md.temperature, md.generators)
        else:  # the filters act on the tempered logits, which are then sampled as they are
            unit = (md.temperature > 0).to(torch.float32)  # greedy rows keep temperature 0
            sampled = self.ops.sample(apply_filters(penalised, md), unit, md.generators)

        if raw_logprobs is None:
            return SamplerOutput(sampled_token_ids=sampled)
        assert md.max_num_logprobs is not None
        logprobs, token_ids, rank = compute_logprobs(raw_logprobs, sampled, md.max_num_logprobs)
        return SamplerOutput(sampled, logprobs, token_ids, rank)
