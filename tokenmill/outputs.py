"""What the engine returns to callers (vLLM-shaped)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Logprob:
    logprob: float
    rank: int | None
    decoded_token: str | None = None


# One entry per generated token: {token_id: Logprob}, the sampled token first.
SampleLogprobList = list[dict[int, Logprob]]
# One entry per prompt token: None for the first (nothing predicts it), then {token_id: Logprob}
# with the prompt token itself first, then the top-k alternatives at that position.
PromptLogprobList = list[dict[int, Logprob] | None]


@dataclass(slots=True)
class CompletionOutput:
    """One of the n samples of a request. text/token_ids are cumulative; delta_* are new."""

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: SampleLogprobList | None
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None  # the stop string or stop token id that ended it
    delta_text: str = ""
    delta_token_ids: list[int] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0
    prompt_logprobs: PromptLogprobList | None = None  # when SamplingParams.prompt_logprobs is set
    error: str | None = None  # set (with finished) when the request failed, e.g. bad grammar


@dataclass(slots=True)
class EmbeddingOutput:
    embedding: list[float]  # the pooled hidden state (unit L2 norm when normalized)


@dataclass(slots=True)
class EmbeddingRequestOutput:
    """The result of an embedding request (`PoolingParams`), returned once, when finished."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: EmbeddingOutput
    finished: bool = True  # always: its one output (read like RequestOutput.finished, .error)
    error: str | None = None
