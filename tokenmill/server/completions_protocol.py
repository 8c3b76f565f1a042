"""The sampling fields shared by /v1/completions and /v1/chat/completions (`SamplingRequest`:
their limits, output constraints and translation to SamplingParams) and the completions body."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from tokenmill.sampling_params import SamplingParams, StructuredOutputsParams
from tokenmill.server.protocol import (
    MAX_LOGPROBS,
    STRICT,
    RequestBody,
    RequestLimits,
    UnsupportedParameter,
    as_prompts,
    check_truncation,
    count_prompts,
)


class StreamOptions(BaseModel):
    model_config = STRICT
    include_usage: bool = False
    continuous_usage_stats: bool = False


class StructuredOutputsBody(BaseModel):
    """vLLM's `structured_outputs` request field: exactly one constraint."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, populate_by_name=True)
    json_schema: dict[str, Any] | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, populate_by_name=True)
    name: str
    description: str | None = None
    json_schema: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None  # the schema is always enforced


class ResponseFormat(BaseModel):
    model_config = STRICT
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


def _constraint(param: str, **kw: Any) -> StructuredOutputsParams:
    try:
        return StructuredOutputsParams(**kw)
    except ValueError as e:
        raise UnsupportedParameter(param, str(e)) from None


class SamplingRequest(RequestBody):
    """The fields, checks and SamplingParams common to completions and chat requests."""

    model: str
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    logit_bias: dict[str, float] | None = None
    # tokenmill / vLLM extensions
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None  # capped like stop strings
    # None: the endpoint's default (completions add BOS / EOS as the tokenizer does, chat does
    # not: the template writes them)
    add_special_tokens: bool | None = None
    truncate_prompt_tokens: int | None = Field(default=None, ge=-1)  # keep the last k; -1: context
    # vLLM's: each prompt token's logprob and top-k alternatives, in the response
    prompt_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    # vLLM's: logprobs name tokens "token_id:<id>" instead of by their text
    return_tokens_as_token_ids: bool = False
    # structured output: OpenAI's response_format, vLLM's structured_outputs and guided_*
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsBody | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    def structured_spec(self) -> StructuredOutputsParams | None:
        """The request's output constraint, from whichever field gives it (400 if several)."""
        found: list[tuple[str, StructuredOutputsParams]] = []
        rf = self.response_format
        if rf is not None and rf.type == "json_object":
            found.append(("response_format", _constraint("response_format", json_object=True)))
        elif rf is not None and rf.type == "json_schema":
            if rf.json_schema is None:
                raise UnsupportedParameter(
                    "response_format", "response_format json_schema needs a json_schema object"
                )
            schema = rf.json_schema.json_schema
            kw = {"json": schema} if schema is not None else {"json_object": True}
            found.append(("response_format", _constraint("response_format", **kw)))
        so = self.structured_outputs
        if so is not None:
            kw = so.model_dump(exclude_none=True)
            if "json_schema" in kw:
                kw["json"] = kw.pop("json_schema")
            found.append(("structured_outputs", _constraint("structured_outputs", **kw)))
        for name, key in (
            ("guided_json", "json"),
            ("guided_regex", "regex"),
            ("guided_choice", "choice"),
            ("guided_grammar", "grammar"),
        ):
            value = getattr(self, name)
            if value is not None:
                found.append((name, _constraint(name, **{key: value})))
        if len(found) > 1:
            raise UnsupportedParameter(
                found[1][0],
                f"only one output constraint per request (got {', '.join(n for n, _ in found)})",
            )
        return found[0][1] if found else None

    def check_limits(self, limits: RequestLimits) -> None:
        """400 (UnsupportedParameter) when the request asks for more work than allowed."""
        if not 1 <= self.n <= limits.max_n:
            raise UnsupportedParameter("n", f"n must be between 1 and {limits.max_n}")
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        if len(stops) > limits.max_stop_strings:
            raise UnsupportedParameter("stop", f"at most {limits.max_stop_strings} stop strings")
        if any(len(x) > limits.max_stop_length for x in stops):
            raise UnsupportedParameter(
                "stop", f"stop strings are limited to {limits.max_stop_length} characters"
            )
        words = self.bad_words or []
        if len(words) > limits.max_stop_strings or any(
            len(w) > limits.max_stop_length for w in words
        ):
            raise UnsupportedParameter(
                "bad_words",
                f"at most {limits.max_stop_strings} bad_words of {limits.max_stop_length} "
                "characters",
            )
        ids = self.stop_token_ids or []
        if len(ids) > limits.max_stop_token_ids:
            raise UnsupportedParameter(
                "stop_token_ids", f"at most {limits.max_stop_token_ids} stop_token_ids"
            )
        if any(i < 0 for i in ids):
            raise UnsupportedParameter("stop_token_ids", "stop_token_ids must be >= 0")
        check_truncation(self.truncate_prompt_tokens)
        if len(self.allowed_token_ids or []) > limits.max_allowed_token_ids:
            raise UnsupportedParameter(
                "allowed_token_ids", f"at most {limits.max_allowed_token_ids} allowed_token_ids"
            )
        if len(self.logit_bias or {}) > limits.max_logit_bias:
            raise UnsupportedParameter(
                "logit_bias", f"at most {limits.max_logit_bias} logit_bias entries"
            )
        budget = self.n * (self.requested_tokens() or 0) * self.num_prompts()
        if budget > limits.max_request_tokens:
            raise UnsupportedParameter(
                "max_tokens",
                f"n x max_tokens x prompts = {budget} exceeds the per-request "
                f"budget of {limits.max_request_tokens} tokens",
            )

    def token_logit_bias(self) -> dict[int, float] | None:
        """logit_bias with its keys (token ids as JSON strings) as integers; 400 for a key that
        is not one."""
        bias: dict[int, float] = {}
        for key, value in (self.logit_bias or {}).items():
            if not key.isascii() or not key.isdigit():
                raise UnsupportedParameter(
                    "logit_bias", f"logit_bias keys must be token ids, got {key!r}"
                )
            bias[int(key)] = value
        return bias or None

    def requested_tokens(self) -> int | None:
        """max_tokens as the request gives it (None: up to the context length)."""
        return None

    def num_prompts(self) -> int:
        return 1

    def check_supported(self) -> None:
        if self.stream_options is not None and not self.stream:
            raise UnsupportedParameter(
                "stream_options", "stream_options is only allowed when stream is true"
            )
        if self.prompt_logprobs is not None and self.stream:
            raise UnsupportedParameter(
                "prompt_logprobs", "prompt_logprobs is not returned when streaming"
            )

    def sampling_params(
        self,
        max_tokens: int | None,
        logprobs: int | None,
        prompt_logprobs: int | None = None,
        defaults: Mapping[str, float | int] | None = None,
    ) -> SamplingParams:
        """The request's SamplingParams; `defaults` (the model's recommended settings) stand
        in for the temperature, top_p, top_k, min_p and repetition_penalty it leaves out."""
        kw: dict[str, Any] = dict(
            n=self.n,
            seed=self.seed,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            stop=self.stop,
            max_tokens=max_tokens,
            min_tokens=self.min_tokens,
            ignore_eos=self.ignore_eos,
            stop_token_ids=self.stop_token_ids,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            skip_special_tokens=self.skip_special_tokens,
            include_stop_str_in_output=self.include_stop_str_in_output,
            structured_outputs=self.structured_spec(),
            logit_bias=self.token_logit_bias(),
            allowed_token_ids=self.allowed_token_ids,
            bad_words=self.bad_words,
        )
        optional = dict(
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            min_p=self.min_p,
            repetition_penalty=self.repetition_penalty,
        )
        kw.update(defaults or {})
        kw.update({k: v for k, v in optional.items() if v is not None})
        return SamplingParams(**kw)


class CompletionRequest(SamplingRequest):
    prompt: str | list[str] | list[int] | list[list[int]]

    def check_limits(self, limits: RequestLimits) -> None:
        if self.num_prompts() > limits.max_prompts:
            raise UnsupportedParameter(
                "prompt", f"at most {limits.max_prompts} prompts per request"
            )
        super().check_limits(limits)

    def requested_tokens(self) -> int | None:
        return self.max_tokens

    def num_prompts(self) -> int:
        return count_prompts(self.prompt)

    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    def check_supported(self) -> None:
        super().check_supported()
        texts = all(isinstance(p, str) for p in as_prompts(self.prompt))
        if self.suffix and (self.echo or not texts):
            raise UnsupportedParameter(
                "suffix", "suffix (fill-in-the-middle) needs text prompts and no echo"
            )
        if self.best_of is not None and self.best_of != self.n:
            raise UnsupportedParameter("best_of", "best_of other than n is not supported yet")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise UnsupportedParameter("logprobs", f"logprobs must be between 0 and {MAX_LOGPROBS}")
        if (
            self.max_tokens is not None
            and self.max_tokens < 1
            and not (self.echo and self.max_tokens == 0)
        ):
            raise UnsupportedParameter(
                "max_tokens",
                "max_tokens must be >= 1 (0 is allowed with echo: it only scores the prompt)",
            )

    def engine_prompt_logprobs(self) -> int | None:
        """What the engine must compute for the prompt: the echoed prompt's logprobs (with
        logprobs; max_tokens 0 runs the prompt alone, which needs them anyway) and the ones
        asked for by `prompt_logprobs`, or nothing."""
        wanted = [self.prompt_logprobs] if self.prompt_logprobs is not None else []
        if self.echo and (self.logprobs is not None or self.max_tokens == 0):
            wanted.append(self.logprobs or 0)
        return max(wanted) if wanted else None

    def prompts(self) -> list[str | list[int]]:
        prompts = as_prompts(self.prompt)
        if not prompts:
            raise ValueError("prompt is empty")
        return prompts
