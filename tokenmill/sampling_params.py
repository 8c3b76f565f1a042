"""SamplingParams: what a caller asks of one request's generation, validated on construction."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NoReturn

_GREEDY_EPS = 1e-5
MAX_PROMPT_LOGPROBS = 20
MAX_LOGIT_BIAS = 100.0  # OpenAI's range for a logit_bias value: [-100, 100]


def _bad(msg: str) -> NoReturn:
    """Reject a SamplingParams field (the validators' one way out)."""
    raise ValueError(msg)


@dataclass(frozen=True)
class StructuredOutputsParams:
    """A constraint on the generated text (vLLM's `StructuredOutputsParams`): exactly one of

    - `json`: a JSON schema (a dict, or its JSON text) the output must validate against;
    - `json_object`: True for any JSON object;
    - `regex`: a regular expression the whole output must match;
    - `choice`: the output is exactly one of these strings;
    - `grammar`: a context-free grammar, in Lark syntax or GBNF (llama.cpp's EBNF, `::=`).

    Generation stops (finish_reason "stop") when the constraint is complete. Whether the
    constraint compiles is checked by the engine (`StructuredOutputManager`), not here.

    `after_token_id`: the constraint applies from the token after this one, and the output up
    to it is free: a reasoning model's `</think>`, so that it reasons before it answers in
    the constrained form (vLLM starts the grammar where its reasoning parser sees the end).
    """

    json: dict | str | None = None
    regex: str | None = None
    choice: tuple[str, ...] | list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    after_token_id: int | None = None

    def __post_init__(self) -> None:
        given = [
            k
            for k in ("json", "regex", "choice", "grammar", "json_object")
            if getattr(self, k) not in (None, False)
        ]
        if len(given) != 1:
            raise ValueError(
                "structured outputs need exactly one of json, regex, choice, grammar or "
                f"json_object; got {given or 'none'}"
            )
        if self.json is not None and not isinstance(self.json, (dict, str)):
            raise ValueError("structured outputs: json must be a JSON schema (object or text)")
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"structured outputs: {name} must be a non-empty string")
        if self.choice is not None:
            if (
                not isinstance(self.choice, (list, tuple))
                or not self.choice
                or any(not isinstance(c, str) or not c for c in self.choice)
            ):
                raise ValueError("structured outputs: choice must be a list of non-empty strings")
            object.__setattr__(self, "choice", tuple(self.choice))
        if self.json_object is not None and not isinstance(self.json_object, bool):
            raise ValueError("structured outputs: json_object must be a boolean")
        after = self.after_token_id
        if after is not None and (type(after) is not int or after < 0):
            raise ValueError("structured outputs: after_token_id must be a token id (int >= 0)")


@dataclass
class SamplingParams:
    """Per-request sampling and stopping options (vLLM's names and meanings).

    temperature 0 means greedy. top_k <= 0 (or -1) disables top-k; top_p 1.0 and min_p 0.0
    disable those filters. Penalties follow the OpenAI (presence / frequency) and CTRL
    (repetition) definitions. `logprobs=k` returns the sampled token's log-probability and the
    top-k alternatives at each step (k = 0: only the sampled token). `prompt_logprobs=k` (at most
    20) returns, for every prompt token after the first, its log-probability under the model and
    the top-k alternatives at that position (raw model distribution: no temperature or
    penalties); such requests never reuse prefix-cached KV blocks, as the logits of the cached
    positions are needed. `max_tokens=0` is allowed with prompt_logprobs: score the prompt only.
    `logit_bias` maps token ids to a value in [-100, 100] added to that token's logit before
    the penalties and sampling (OpenAI's meaning: -100 bans a token, 100 all but forces it);
    like the penalties it shapes what is sampled, not the logprobs reported. `allowed_token_ids`
    (vLLM's) restricts sampling to those ids, the same way. `bad_words` (vLLM's) are texts the
    output may not contain as whole token sequences: the engine tokenizes each (as written and
    after a space), and a sequence's last token is banned whenever the output ends with the rest.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    structured_outputs: StructuredOutputsParams | None = None
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self._validate()
        self.logit_bias = {t: float(v) for t, v in (self.logit_bias or {}).items()} or None

    def _validate(self) -> None:
        """Raise ValueError naming the first invalid field."""
        self._validate_sampling()
        self._validate_lengths()
        self._validate_token_rules()

    def _validate_sampling(self) -> None:
        """n and the numbers that shape the distribution."""
        if not isinstance(self.n, int) or self.n < 1:
            _bad(f"n must be an integer >= 1, got {self.n!r}")
        for name in (
            "temperature",
            "top_p",
            "min_p",
            "repetition_penalty",
            "presence_penalty",
            "frequency_penalty",
        ):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not math.isfinite(value)
            ):
                _bad(f"{name} must be a finite number, got {value!r}")
        if self.temperature < 0:
            _bad(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            _bad(f"top_p must be in (0, 1], got {self.top_p}")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            _bad(f"top_k must be -1 or 0 (disabled) or a positive integer, got {self.top_k!r}")
        if not 0.0 <= self.min_p <= 1.0:
            _bad(f"min_p must be in [0, 1], got {self.min_p}")
        if self.repetition_penalty <= 0:
            _bad(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if not -2.0 <= self.presence_penalty <= 2.0:
            _bad(f"presence_penalty must be in [-2, 2], got {self.presence_penalty}")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            _bad(f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}")

    def _validate_lengths(self) -> None:
        """The token counts: prompt_logprobs, max_tokens, min_tokens, logprobs; and the seed."""
        if self.prompt_logprobs is not None and (
            not isinstance(self.prompt_logprobs, int)
            or not 0 <= self.prompt_logprobs <= MAX_PROMPT_LOGPROBS
        ):
            _bad(
                f"prompt_logprobs must be an integer in [0, {MAX_PROMPT_LOGPROBS}], "
                f"got {self.prompt_logprobs!r}"
            )
        if self.max_tokens is not None and (
            not isinstance(self.max_tokens, int) or self.max_tokens < 0
        ):
            _bad(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if self.max_tokens == 0 and self.prompt_logprobs is None:
            _bad("max_tokens must be >= 1 (0, scoring the prompt only, needs prompt_logprobs)")
        if not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            _bad(f"min_tokens must be an integer >= 0, got {self.min_tokens!r}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            _bad(f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})")
        if self.logprobs is not None and (not isinstance(self.logprobs, int) or self.logprobs < 0):
            _bad(f"logprobs must be an integer >= 0, got {self.logprobs!r}")
        if self.seed is not None and not isinstance(self.seed, int):
            _bad(f"seed must be an integer, got {self.seed!r}")

    def _validate_token_rules(self) -> None:
        """Stop strings and ids, logit bias, allowed and bad words, the structured output."""
        if any(not isinstance(s, str) or not s for s in self.stop):
            _bad("stop strings must be non-empty strings")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            _bad("stop_token_ids must be non-negative integers")
        if self.logit_bias is not None and not isinstance(self.logit_bias, dict):
            _bad("logit_bias must be a dict of token id -> bias")
        for t, v in (self.logit_bias or {}).items():
            if isinstance(t, bool) or not isinstance(t, int) or t < 0:
                _bad(f"logit_bias keys must be token ids (integers >= 0), got {t!r}")
            if (
                isinstance(v, bool)
                or not isinstance(v, (int, float))
                or not -MAX_LOGIT_BIAS <= v <= MAX_LOGIT_BIAS
            ):
                _bad(f"logit_bias values must be numbers in [-100, 100], got {v!r} for token {t}")
        if self.allowed_token_ids is not None and (
            not isinstance(self.allowed_token_ids, (list, tuple))
            or not self.allowed_token_ids
            or any(
                isinstance(t, bool) or not isinstance(t, int) or t < 0
                for t in self.allowed_token_ids
            )
        ):
            _bad("allowed_token_ids must be a non-empty list of token ids (integers >= 0)")
        if self.bad_words is not None and (
            not isinstance(self.bad_words, (list, tuple))
            or any(not isinstance(w, str) or not w.strip() for w in self.bad_words)
        ):
            _bad("bad_words must be a list of non-blank strings")
        if self.structured_outputs is not None and not isinstance(
            self.structured_outputs, StructuredOutputsParams
        ):
            _bad("structured_outputs must be a StructuredOutputsParams")

    @property
    def greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS

    @property
    def adjusts_logits(self) -> bool:
        """Whether the logits are changed before sampling (logit_bias, allowed_token_ids,
        bad_words or a penalty): such a
        request needs the full sampler, not a bare argmax or draw."""
        return bool(
            self.logit_bias
            or self.allowed_token_ids
            or self.bad_words
            or self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
        )

    def clone_for_child(self, index: int) -> SamplingParams:
        """The params of the index-th of n parallel samples: n=1, and a distinct seed if seeded."""
        seed = None if self.seed is None else self.seed + index
        fields = {k: getattr(self, k) for k in self.__dataclass_fields__}
        fields.update(n=1, seed=seed)
        return SamplingParams(**fields)
