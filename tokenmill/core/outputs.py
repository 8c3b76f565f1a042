"""Contracts between the scheduler and the model runner (pure Python)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from tokenmill.core.request import Request

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True, slots=True)
class ScheduledRequest:
    """One request's share of a step: compute tokens [num_computed_tokens, +num_tokens).

    With speculative decoding, a decode's last `len(spec_token_ids)` scheduled tokens are draft
    tokens, past the known ones: the step samples at the last known token and at every draft,
    and keeps the drafts up to the first one the target model rejects
    (`ModelRunnerOutput.sampled`: the kept drafts, then one token of its own)."""

    request: Request
    num_computed_tokens: int
    num_scheduled_tokens: int
    block_ids: tuple[int, ...]
    spec_token_ids: tuple[int, ...] = ()

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def token_ids(self) -> list[int]:
        start = self.num_computed_tokens
        end = start + self.num_scheduled_tokens - len(self.spec_token_ids)
        return self.request.token_ids_slice(start, end) + list(self.spec_token_ids)

    @property
    def samples(self) -> bool:
        """True when this chunk reaches the end of the known tokens, so a new token is sampled
        (never for a request with max_tokens 0, which only scores its prompt)."""
        known_end = self.num_computed_tokens + self.num_scheduled_tokens - len(self.spec_token_ids)
        return known_end == self.request.num_tokens and self.request.max_tokens > 0

    @property
    def prompt_logprob_positions(self) -> range:
        """Positions of this chunk whose logits give prompt logprobs: position p predicts prompt
        token p + 1. Empty unless the request asked for prompt logprobs; once it has output
        tokens its prompt was fully scored already (a recompute after preemption)."""
        req = self.request
        if req.sampling_params.prompt_logprobs is None or req.output_token_ids:
            return range(0)
        start = self.num_computed_tokens
        return range(start, min(start + self.num_scheduled_tokens, req.num_prompt_tokens - 1))

    @property
    def pool_positions(self) -> range:
        """Positions of this chunk whose hidden states an embedding request pools: the last
        prompt token ("last"), every one ("mean"), the first ("cls"); empty for other
        requests."""
        req = self.request
        start = self.num_computed_tokens
        end = start + self.num_scheduled_tokens
        if req.pooling == "mean":
            return range(start, end)
        if req.pooling == "last" and end == req.num_tokens:
            return range(end - 1, end)
        if req.pooling == "cls" and start == 0:
            return range(0, 1)
        return range(0)


@dataclass(frozen=True, slots=True)
class DraftJob:
    """One request's share of a draft model's work after a step (`Scheduler.draft_jobs`):
    compute the keys and values of its tokens up to `end` (exclusive) that the draft has not
    computed yet, then guess `num_drafts` tokens to follow them (0: catch up only).

    `block_ids` is its block table, with room for the guesses' keys and values past `end`.
    `chunk_start` is where this step's chunk began: for a request the draft has not seen, the
    tokens before it are in blocks the draft computed already (prefix-cache hits), or none."""

    request: Request
    block_ids: tuple[int, ...]
    chunk_start: int
    end: int
    num_drafts: int

    @property
    def request_id(self) -> str:
        return self.request.request_id


@dataclass(frozen=True, slots=True)
class SchedulerOutput:
    scheduled: tuple[ScheduledRequest, ...]
    total_num_scheduled_tokens: int
    # Requests finished or aborted since the previous step: the runner drops their state.
    finished_req_ids: frozenset[str] = frozenset()
    preempted_req_ids: frozenset[str] = frozenset()
    # > 1: a multi-step round (Scheduler._schedule_multi_step). Every request decodes one token
    # (num_scheduled_tokens 1), then num_steps - 1 more whose inputs are its own sampled
    # tokens, fed back on the device; it holds KV slots for all of them.
    num_steps: int = 1

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


@dataclass(slots=True)
class SampleLogprobs:
    """Log-probabilities at one position: the sampled token, then the top-k alternatives."""

    token_ids: list[int]
    logprobs: list[float]
    sampled_rank: int | None = None


@dataclass(slots=True)
class PromptLogprobsChunk:
    """Log-probabilities of prompt tokens first_position + 1 ... (one row per position of the
    step's chunk): in each row the prompt token, then the top-k alternatives."""

    first_position: int
    token_ids: list[list[int]]
    logprobs: list[list[float]]
    ranks: list[int]  # rank of the prompt token (1 = the most likely)


@dataclass(slots=True)
class PooledChunk:
    """An embedding request's share of one step: the sum (float32, on the CPU) of the hidden
    states of `num_positions` positions from `first_position` on (`pool_positions`)."""

    first_position: int
    num_positions: int
    total: torch.Tensor


@dataclass(slots=True)
class ModelRunnerOutput:
    """For each request that sampled this step, its new tokens in order (one, num_steps in a
    multi-step round, or its accepted drafts and one more) and optionally logprobs (single
    steps without drafts); for each request with prompt
    logprobs whose chunk covered prompt positions, those logprobs; for each embedding request
    whose chunk held positions it pools, their sum."""

    sampled: dict[str, list[int]] = field(default_factory=dict)
    logprobs: dict[str, SampleLogprobs] = field(default_factory=dict)
    prompt_logprobs: dict[str, PromptLogprobsChunk] = field(default_factory=dict)
    pooled: dict[str, PooledChunk] = field(default_factory=dict)
