"""OpenAI request models (pydantic): the base every request body builds on, and the bodies of
the endpoints that do not generate (LoRA loading, embeddings).

Every documented OpenAI field is declared, so a field we cannot honour yet gets a 400 naming it
instead of being ignored; undeclared fields are rejected too (extra="forbid"). Numbers must be
finite (no NaN / Infinity), strings and keys valid Unicode (no unpaired surrogates, which JSON
escapes can carry), and the per-request work is capped by `RequestLimits`. The completions and
chat bodies are in completions_protocol.py and chat_protocol.py, the Responses API's in
responses_protocol.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


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
STRICT = ConfigDict(extra="forbid", allow_inf_nan=False)


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

    model_config = STRICT

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        where = _surrogate_path(data)
        if where is not None:
            raise ValueError(f"invalid Unicode (an unpaired surrogate) in {where}")
        return data


def check_truncation(keep: int | None) -> None:
    """vLLM's truncate_prompt_tokens: keep the last k >= 1 tokens, or -1 (the context)."""
    if keep == 0:
        raise UnsupportedParameter(
            "truncate_prompt_tokens", "truncate_prompt_tokens must be >= 1 (or -1)"
        )


def count_prompts(value: str | list) -> int:
    """How many prompts a `prompt` / `input` field holds: a text or one token-id list is one."""
    return len(value) if isinstance(value, list) and value and not isinstance(value[0], int) else 1


def as_prompts(value: str | list) -> list[str | list[int]]:
    """A `prompt` / `input` field as its prompts, each a text or token ids ([] when empty)."""
    if isinstance(value, str):
        return [value]
    if value and all(isinstance(x, int) for x in value):
        return [list(value)]
    return list(value)


class LoadLoRAAdapterRequest(RequestBody):
    """POST /v1/load_lora_adapter (vLLM's runtime LoRA loading)."""

    lora_name: str = Field(min_length=1, max_length=256)
    lora_path: str = Field(min_length=1, max_length=4096)


class UnloadLoRAAdapterRequest(RequestBody):
    """POST /v1/unload_lora_adapter."""

    lora_name: str = Field(min_length=1, max_length=256)


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
        if count_prompts(self.input) > limits.max_prompts:
            raise UnsupportedParameter("input", f"at most {limits.max_prompts} inputs per request")
        check_truncation(self.truncate_prompt_tokens)

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
        inputs = as_prompts(self.input)
        if not inputs:
            raise UnsupportedParameter("input", "input is empty")
        return inputs
