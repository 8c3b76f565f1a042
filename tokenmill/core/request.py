"""Request: one sequence's state as the scheduler sees it (pure Python, no torch)."""

from __future__ import annotations

import enum
from typing import Any

from tokenmill.sampling_params import SamplingParams


class RequestStatus(enum.IntEnum):
    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2
    FINISHED_STOPPED = 3
    FINISHED_LENGTH_CAPPED = 4
    FINISHED_ABORTED = 5

    @property
    def finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED


FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH_CAPPED: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
}


class Request:
    """A sequence being generated.

    `num_computed_tokens` is the only progress counter: tokens [0, num_computed_tokens) have their
    KV in the cache; the scheduler gives each step some of the rest. Prefill, chunked prefill,
    decode and recompute after preemption are all just "catch up with num_tokens".
    """

    __slots__ = (
        "request_id",
        "prompt_token_ids",
        "output_token_ids",
        "sampling_params",
        "eos_token_ids",
        "max_tokens",
        "status",
        "num_computed_tokens",
        "stop_reason",
        "arrival_time",
        "num_preemptions",
        "block_hashes",
        "num_cached_tokens",
        "bad_words_token_ids",
        "pooling",
        "lora_id",
        "extra",
    )

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams,
        eos_token_ids: frozenset[int] | set[int],
        max_tokens: int,
        arrival_time: float = 0.0,
        bad_words_token_ids: tuple[tuple[int, ...], ...] = (),
        pooling: str | None = None,
        lora_id: int | None = None,
    ) -> None:
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.output_token_ids: list[int] = []
        self.sampling_params = sampling_params
        self.eos_token_ids = frozenset(eos_token_ids)
        self.max_tokens = max_tokens
        # sampling_params.bad_words as token sequences (the engine's tokenizer made them)
        self.bad_words_token_ids = bad_words_token_ids
        # an embedding request: its pooling type (config.POOLING_TYPES); it generates
        # nothing (max_tokens 0) and is done once its prompt is computed
        self.pooling = pooling
        # the LoRA adapter it runs with (LoRARequest.lora_int_id), None for the base model
        self.lora_id = lora_id
        self.status = RequestStatus.WAITING
        self.num_computed_tokens = 0
        self.stop_reason: int | str | None = None
        self.arrival_time = arrival_time
        self.num_preemptions = 0
        self.block_hashes: list = []  # BlockHash of each full block of all_token_ids, in order
        self.num_cached_tokens = 0  # prompt tokens found in the prefix cache when first scheduled
        self.extra: dict[str, Any] = {}

    @property
    def needs_every_position(self) -> bool:
        """True when the hidden states of the first prompt positions are wanted (prompt
        logprobs, mean or first-token pooling), so no prefix of the prompt may come from the
        prefix cache."""
        return self.sampling_params.prompt_logprobs is not None or self.pooling in ("mean", "cls")

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    def token_ids_slice(self, start: int, end: int) -> list[int]:
        n = len(self.prompt_token_ids)
        if end <= n:
            return self.prompt_token_ids[start:end]
        if start >= n:
            return self.output_token_ids[start - n : end - n]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - n]

    @property
    def is_finished(self) -> bool:
        return self.status.finished

    @property
    def finish_reason(self) -> str | None:
        return FINISH_REASONS.get(self.status)

    def __repr__(self) -> str:
        return (
            f"Request({self.request_id!r}, status={self.status.name}, "
            f"computed={self.num_computed_tokens}/{self.num_tokens})"
        )
