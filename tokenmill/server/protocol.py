"""OpenAI request models (pydantic) and their translation to SamplingParams.

Every documented OpenAI field is declared, so a field we cannot honour yet gets a 400 naming it
instead of being ignored; undeclared fields are rejected too (extra="forbid"). Numbers must be
finite (no NaN / Infinity), strings and keys valid Unicode (no unpaired surrogates, which JSON
escapes can carry), and the per-request work is capped by `RequestLimits`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from tokenmill.engine.chat_template import RESERVED_VARIABLES
from tokenmill.sampling_params import SamplingParams, StructuredOutputsParams


class UnsupportedParameter(ValueError):
    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class RequestLimits:
    """Caps on one request's work (each a `serve` flag)."""

    max_n: int = 16
    max_stop_strings: int = 16
    max_stop_length: int = 256  # characters per stop string
    max_stop_token_ids: int = 64
    max_messages: int = 1024
    max_prompts: int = 256  # prompts in one completions request, inputs in one embeddings one
    max_tools: int = 128  # tools in one chat request
    max_logit_bias: int = 300  # logit_bias entries (OpenAI's limit)
    max_allowed_token_ids: int = 4096  # the mask is rebuilt every step from these
    max_request_tokens: int = 1 << 17  # n x max_tokens (x prompts) one request may ask for


MAX_LOGPROBS = 20
_STRICT = ConfigDict(extra="forbid", allow_inf_nan=False)


def _surrogate_path(value: Any) -> str | None:
    """Where the first unpaired surrogate in a JSON value sits ('messages.0.content'), or None.
    Iterative, so deep nesting cannot exhaust the stack."""
    stack: list[tuple[str, Any]] = [("", value)]
    while stack:
        path, v = stack.pop()
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                return path or "(value)"
        elif isinstance(v, dict):
            for k, item in v.items():
                key = k.encode("utf-8", "backslashreplace").decode() if isinstance(k, str) else k
                if isinstance(k, str) and key != k:
                    return f"{path}.{key}".lstrip(".") + " (key)"
                stack.append((f"{path}.{key}".lstrip("."), item))
        elif isinstance(v, list):
            stack.extend((f"{path}.{i}".lstrip("."), item) for i, item in enumerate(v))
    return None


def check_metadata(meta: dict[str, str] | None) -> None:
    """OpenAI's limits on a request's `metadata`: 16 pairs, keys of 64, values of 512 chars."""
    meta = meta or {}
    if len(meta) > 16 or any(len(k) > 64 or len(v) > 512 for k, v in meta.items()):
        raise UnsupportedParameter(
            "metadata", "metadata holds at most 16 pairs, keys of 64 and values of 512 chars"
        )


def reject_kinds(values: Any, allowed: tuple[str, ...], where: str, what: str) -> None:
    """A ValueError naming the first object of the list `values` whose "type" is a string not
    in `allowed` (an input the endpoint does not serve, such as an image), as "where.i"."""
    for i, value in enumerate(values if isinstance(values, list) else []):
        kind = value.get("type") if isinstance(value, dict) else None
        if isinstance(kind, str) and kind not in allowed:
            raise ValueError(
                f"{where}.{i}: {what} of type {kind!r} are not supported (only "
                f"{', '.join(allowed)})"
            )


class RequestBody(BaseModel):
    """A top-level request body: rejects invalid Unicode anywhere in it before validation."""

    model_config = _STRICT

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        where = _surrogate_path(data)
        if where is not None:
            raise ValueError(f"invalid Unicode (an unpaired surrogate) in {where}")
        return data


class StreamOptions(BaseModel):
    model_config = _STRICT
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
    model_config = _STRICT
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


def _constraint(param: str, **kw: Any) -> StructuredOutputsParams:
    try:
        return StructuredOutputsParams(**kw)
    except ValueError as e:
        raise UnsupportedParameter(param, str(e)) from None


def _check_truncation(keep: int | None) -> None:
    """vLLM's truncate_prompt_tokens: keep the last k >= 1 tokens, or -1 (the context)."""
    if keep == 0:
        raise UnsupportedParameter(
            "truncate_prompt_tokens", "truncate_prompt_tokens must be >= 1 (or -1)"
        )


def _count_prompts(value: str | list) -> int:
    """How many prompts a `prompt` / `input` field holds: a text or one token-id list is one."""
    return len(value) if isinstance(value, list) and value and not isinstance(value[0], int) else 1


def _as_prompts(value: str | list) -> list[str | list[int]]:
    """A `prompt` / `input` field as its prompts, each a text or token ids ([] when empty)."""
    if isinstance(value, str):
        return [value]
    if value and all(isinstance(x, int) for x in value):
        return [list(value)]
    return list(value)


class _Common(RequestBody):
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
        _check_truncation(self.truncate_prompt_tokens)
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
        self, max_tokens: int | None, logprobs: int | None, prompt_logprobs: int | None = None
    ) -> SamplingParams:
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
        kw.update({k: v for k, v in optional.items() if v is not None})
        return SamplingParams(**kw)


class CompletionRequest(_Common):
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
        return _count_prompts(self.prompt)

    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.suffix:
            raise UnsupportedParameter("suffix", "suffix (insertion) is not supported")
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
        prompts = _as_prompts(self.prompt)
        if not prompts:
            raise ValueError("prompt is empty")
        return prompts


class TextPart(BaseModel):
    model_config = _STRICT
    type: Literal["text"]
    text: str


class FunctionCall(BaseModel):
    model_config = _STRICT
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCallMessage(BaseModel):
    model_config = _STRICT
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = _STRICT
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallMessage] | None = None  # assistant messages
    tool_call_id: str | None = None  # tool messages

    def as_template_message(self) -> dict[str, Any]:
        content = self.content
        if isinstance(content, list):
            content = "\n".join(part.text for part in content)
        role = "system" if self.role == "developer" else self.role
        msg: dict[str, Any] = {"role": role, "content": content or ""}
        if self.tool_calls:
            msg["tool_calls"] = [c.model_dump() for c in self.tool_calls]
            msg["content"] = content  # null next to tool calls stays null for templates
        if self.tool_call_id is not None:
            msg["tool_call_id"] = self.tool_call_id
        if self.name is not None and role == "tool":
            msg["name"] = self.name
        return msg


class FunctionDefinition(BaseModel):
    model_config = _STRICT
    name: str = Field(pattern=r"^[A-Za-z0-9_.\-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None  # the parameters are always enforced under required / named


class ToolDefinition(BaseModel):
    model_config = _STRICT
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(BaseModel):
    model_config = _STRICT
    name: str


class NamedToolChoice(BaseModel):
    model_config = _STRICT
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[ToolDefinition] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None
    add_generation_prompt: bool = True
    # vLLM's: leave the last message open and continue it (needs add_generation_prompt false);
    # the chat template's own variables (e.g. enable_thinking)
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    # Accepted for the clients that send them, with no effect here: a local server stores no
    # completions and has one service tier; the cache key, the end-user id and the metadata
    # (OpenAI's limits checked) change nothing; the only output modality is text.
    store: bool | None = None
    metadata: dict[str, str] | None = None
    service_tier: Literal["auto", "default", "flex", "scale", "priority"] | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    modalities: list[str] | None = None

    def check_limits(self, limits: RequestLimits) -> None:
        super().check_limits(limits)
        if len(self.messages) > limits.max_messages:
            raise UnsupportedParameter("messages", f"at most {limits.max_messages} messages")
        if len(self.tools or []) > limits.max_tools:
            raise UnsupportedParameter("tools", f"at most {limits.max_tools} tools")

    def check_supported(self) -> None:
        super().check_supported()
        taken = sorted(RESERVED_VARIABLES.intersection(self.chat_template_kwargs or {}))
        if taken:
            raise UnsupportedParameter(
                "chat_template_kwargs", f"chat_template_kwargs may not set {', '.join(taken)}"
            )
        if self.continue_final_message and self.add_generation_prompt:
            raise UnsupportedParameter(
                "continue_final_message",
                "continue_final_message needs add_generation_prompt false",
            )
        if any(m != "text" for m in self.modalities or []):
            raise UnsupportedParameter("modalities", 'only the "text" modality is supported')
        check_metadata(self.metadata)
        for name in ("functions", "function_call"):
            if getattr(self, name):
                raise UnsupportedParameter(
                    name, f"{name} is deprecated and not supported; use tools and tool_choice"
                )
        names = [t.function.name for t in self.tools or []]
        if len(set(names)) != len(names):
            raise UnsupportedParameter("tools", "tool function names must be unique")
        choice = self.tool_choice
        if choice not in (None, "none") and not names:
            raise UnsupportedParameter("tool_choice", "tool_choice needs tools")
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            raise UnsupportedParameter(
                "tool_choice", f"tool_choice names {choice.function.name!r}, which is not in tools"
            )
        if (
            choice == "required" or isinstance(choice, NamedToolChoice)
        ) and self.structured_spec() is not None:
            raise UnsupportedParameter(
                "tool_choice",
                "tool_choice required or named cannot be combined with another output constraint",
            )
        if self.top_logprobs is not None:
            if not self.logprobs:
                raise UnsupportedParameter("top_logprobs", "top_logprobs requires logprobs=true")
            if not 0 <= self.top_logprobs <= MAX_LOGPROBS:
                raise UnsupportedParameter(
                    "top_logprobs", f"top_logprobs must be in [0, {MAX_LOGPROBS}]"
                )

    def requested_tokens(self) -> int | None:
        return self.effective_max_tokens()

    def effective_max_tokens(self) -> int | None:
        return (
            self.max_completion_tokens
            if self.max_completion_tokens is not None
            else self.max_tokens
        )

    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class LoadLoRAAdapterRequest(RequestBody):
    """POST /v1/load_lora_adapter (vLLM's runtime LoRA loading)."""

    lora_name: str = Field(min_length=1, max_length=256)
    lora_path: str = Field(min_length=1, max_length=4096)


class UnloadLoRAAdapterRequest(RequestBody):
    """POST /v1/unload_lora_adapter."""

    lora_name: str = Field(min_length=1, max_length=256)


class TokenizeRequest(RequestBody):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None


class DetokenizeRequest(RequestBody):
    model: str | None = None
    tokens: list[int]


class EmbeddingRequest(RequestBody):
    """OpenAI's /v1/embeddings body, with vLLM's extras (`truncate_prompt_tokens`,
    `add_special_tokens`, `normalize`)."""

    model: str | None = None
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None
    truncate_prompt_tokens: int | None = Field(default=None, ge=-1)  # keep the last k; -1: context
    add_special_tokens: bool = True
    normalize: bool = True  # unit L2 norm (dot products are cosine similarities)

    @property
    def stream(self) -> bool:
        """Embeddings are never streamed (the server's shared response path asks)."""
        return False

    def check_limits(self, limits: RequestLimits) -> None:
        if _count_prompts(self.input) > limits.max_prompts:
            raise UnsupportedParameter("input", f"at most {limits.max_prompts} inputs per request")
        _check_truncation(self.truncate_prompt_tokens)

    def check_supported(self, hidden_size: int) -> None:
        """`dimensions` (a Matryoshka cut) only as the model's own size: a shorter prefix of
        the vector means something only for models trained for it, which no checkpoint says."""
        if self.dimensions is not None and self.dimensions != hidden_size:
            raise UnsupportedParameter(
                "dimensions",
                f"this model's embeddings have {hidden_size} dimensions; other sizes "
                "(Matryoshka truncation) are not supported",
            )

    def inputs(self) -> list[str | list[int]]:
        """Each input as a text or token ids (an empty list or text is an error)."""
        inputs = _as_prompts(self.input)
        if not inputs:
            raise UnsupportedParameter("input", "input is empty")
        return inputs
