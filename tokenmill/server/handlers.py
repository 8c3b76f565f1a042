"""/v1/completions and /v1/chat/completions: requests -> engine streams -> OpenAI responses."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from tokenmill.engine.async_engine import AsyncEngine
from tokenmill.engine.reasoning import ReasoningParser
from tokenmill.engine.request_stream import RequestStream
from tokenmill.outputs import CompletionOutput, RequestOutput
from tokenmill.pooling_params import PoolingParams
from tokenmill.sampling_params import SamplingParams
from tokenmill.server.metrics import ServerMetrics
from tokenmill.server.protocol import UnsupportedParameter


class ContextLengthError(ValueError):
    """The prompt and the tokens asked for exceed the context; `param` names the request's
    token cap (max_tokens, or what the endpoint calls it)."""

    def __init__(self, message: str, param: str = "max_tokens") -> None:
        super().__init__(message)
        self.param = param


@dataclass
class _Tracker:
    """Per-request timing for metrics."""

    arrival: float
    first_token: float | None = None
    prompt_tokens: int = 0
    output_tokens: dict[int, int] = field(default_factory=dict)
    finish_reasons: dict[tuple[int, int], str | None] = field(default_factory=dict)


@dataclass
class PreparedPrompt:
    text: str | None
    token_ids: list[int]


class OpenAIServing:
    """Shared logic of the completion endpoints (the FastAPI layer only parses and routes)."""

    def __init__(
        self,
        engine: AsyncEngine,
        model_name: str,
        metrics: ServerMetrics,
        tool_call_parser: str = "auto",
        reasoning_parser: str | None = None,
    ) -> None:
        self.engine = engine
        self.tool_call_parser = tool_call_parser  # a tool_parsers.PARSERS name, or "auto"
        # how chat replies split reasoning from the answer (None: they do not)
        self.reasoning_parser = ReasoningParser(reasoning_parser) if reasoning_parser else None
        self.model_name = model_name
        self.metrics = metrics
        self.tokenizer = engine.engine.tokenizer
        # the model's recommended sampling settings, for requests that leave them out
        self.sampling_defaults = engine.engine.default_sampling
        self.max_model_len = engine.engine.max_model_len
        self.vocab_size = engine.engine.model_info.arch.vocab_size
        self.hidden_size = engine.engine.model_info.arch.hidden_size
        # the LoRA adapters served (--lora-modules): a request names one as its model
        self.loras = {r.lora_name: r for r in engine.engine.list_loras()}

    # ---- preparation ------------------------------------------------------------------------
    def fill_in_the_middle(self, prefix: str, suffix: str) -> list[int]:
        """A completion's fill-in-the-middle prompt (`suffix`): the model's prefix, suffix and
        middle tokens around the texts; a 400 for a model without them."""
        if self.tokenizer.fim_token_ids is None:
            raise UnsupportedParameter(
                "suffix", "this model has no fill-in-the-middle tokens, which suffix needs"
            )
        return self.tokenizer.fill_in_the_middle(prefix, suffix)

    def prepare(
        self,
        prompt: str | list[int],
        add_special_tokens: bool = True,
        truncate_prompt_tokens: int | None = None,
    ) -> PreparedPrompt:
        """A prompt's token ids (a text is encoded, ids are checked), cut to its last
        `truncate_prompt_tokens` (-1: the context length) if given; a cut prompt's text is
        None (it no longer spells the prompt)."""
        if not prompt:
            raise ValueError("prompt is empty")
        if isinstance(prompt, str):
            prepared = PreparedPrompt(prompt, self.tokenizer.encode(prompt, add_special_tokens))
        else:
            bad = [t for t in prompt if not 0 <= t < self.vocab_size]
            if bad:
                raise ValueError(f"prompt token ids out of range [0, {self.vocab_size}): {bad[:5]}")
            prepared = PreparedPrompt(None, list(prompt))
        keep = self.max_model_len if truncate_prompt_tokens == -1 else truncate_prompt_tokens
        if keep is not None and len(prepared.token_ids) > keep:
            prepared = PreparedPrompt(None, prepared.token_ids[-keep:])
        return prepared

    def check_length(self, num_prompt: int, max_tokens: int | None) -> None:
        requested = num_prompt + (max_tokens or 0)
        # a prompt-only request (max_tokens 0) may fill the whole context
        too_long = num_prompt > self.max_model_len or (
            num_prompt == self.max_model_len and max_tokens != 0
        )
        if too_long or requested > self.max_model_len:
            raise ContextLengthError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, "
                f"you requested {requested} tokens ({num_prompt} in the prompt, "
                f"{max_tokens or 0} for the completion). Please reduce the prompt or max_tokens."
            )

    async def start(
        self,
        prompts: list[PreparedPrompt],
        params: SamplingParams | PoolingParams,
        prefix: str,
        model: str | None = None,
    ) -> tuple[str, list[RequestStream], _Tracker]:
        """Queue every prompt (with the LoRA adapter `model` names, if it names one); if one
        fails, abort the others and re-raise."""
        lora = self.loras.get(model) if model is not None else None
        request_id = f"{prefix}-{uuid.uuid4().hex}"
        tracker = _Tracker(time.monotonic(), prompt_tokens=sum(len(p.token_ids) for p in prompts))
        streams: list[RequestStream] = []
        try:
            for i, p in enumerate(prompts):
                streams.append(
                    await self.engine.add_request(
                        p.text, p.token_ids, params, f"{request_id}-{i}", lora
                    )
                )
        except BaseException:
            for s in streams:
                s.close()
            raise
        return request_id, streams, tracker

    # ---- running ----------------------------------------------------------------------------
    async def merged(
        self, streams: list[RequestStream], tracker: _Tracker
    ) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Outputs of several streams as they come, tagged with the prompt index. Closing this
        iterator (e.g. on client disconnect) aborts every request still running. The queue is
        bounded, so a slow reader leaves outputs in the streams' slots, where they merge."""
        queue: asyncio.Queue = asyncio.Queue(maxsize=len(streams))

        async def pump(i: int, s: RequestStream) -> None:
            try:
                async for out in s.outputs():
                    await queue.put((i, out))
            except BaseException as e:  # noqa: BLE001 - forwarded to the consumer
                await queue.put((i, e))

        tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
        remaining = len(streams)
        status = "abort"
        try:
            while remaining:
                i, item = await queue.get()
                if isinstance(item, BaseException):
                    status = "error"
                    raise item
                self._observe(tracker, i, item)
                if item.finished:
                    remaining -= 1
                yield i, item
            status = "ok"
        finally:
            for t in tasks:
                t.cancel()
            for s in streams:
                s.close()
            self.record_finish(tracker, status)

    def _observe(self, tracker: _Tracker, i: int, out: RequestOutput) -> None:
        n = sum(len(o.token_ids) for o in out.outputs)
        if n and tracker.first_token is None:
            tracker.first_token = time.monotonic()
            self.metrics.ttft.observe(tracker.first_token - tracker.arrival)
        tracker.output_tokens[i] = n
        for o in out.outputs:
            tracker.finish_reasons[(i, o.index)] = o.finish_reason

    def record_finish(self, tracker: _Tracker, status: str) -> None:
        """A request's metrics, once it has ended: "ok" becomes its finish reason ("length" if
        a sample hit its cap, else "stop"); "abort" and "error" stay."""
        now = time.monotonic()
        n_out = sum(tracker.output_tokens.values())
        self.metrics.prompt_tokens.inc(tracker.prompt_tokens)
        self.metrics.generation_tokens.inc(n_out)
        self.metrics.e2e.observe(now - tracker.arrival)
        if tracker.first_token is not None and n_out > 1:
            self.metrics.tpot.observe((now - tracker.first_token) / (n_out - 1))
        if status == "ok":
            status = "length" if "length" in tracker.finish_reasons.values() else "stop"
        self.metrics.request_finished(status)


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


MIN_LOGPROB = -9999.0  # what JSON shows for log(0) (a token a grammar forbids), as vLLM does


def _json_logprob(value: float) -> float:
    """A logprob JSON can carry: -inf (impossible under a constraint) becomes MIN_LOGPROB."""
    return max(value, MIN_LOGPROB)


def _top(lp: dict, k: int) -> list[tuple[int, Any]]:
    """The top-k alternatives of one position, most likely first."""
    alts = [(t, v) for t, v in lp.items() if v.rank is not None and v.rank <= k]
    return sorted(alts, key=lambda tv: -tv[1].logprob)[:k]


def _name(token_id: int, text: str | None, as_ids: bool) -> str:
    """How a logprobs object names a token: its text, or with vLLM's
    `return_tokens_as_token_ids` "token_id:<id>" (exact, where texts can be U+FFFD or equal)."""
    return f"token_id:{token_id}" if as_ids else (text or "")


def _legacy_logprobs(
    token_ids: list[int],
    logprobs: list,
    tokenizer: Any,
    k: int,
    text_offset: int,
    as_ids: bool,
) -> dict[str, Any]:
    """The legacy completions logprobs object ({tokens, token_logprobs, top_logprobs,
    text_offset}) of tokens and their per-position logprobs; a None position (a prompt's first
    token, which nothing predicts) has a null logprob and null alternatives."""
    tokens, token_lps, tops, offsets = [], [], [], []
    offset = text_offset
    for tok, lp in zip(token_ids, logprobs):
        piece = tokenizer.decode([tok], skip_special_tokens=False)
        tokens.append(_name(tok, piece, as_ids))
        token_lps.append(None if lp is None else _json_logprob(lp[tok].logprob))
        tops.append(
            {_name(t, v.decoded_token, as_ids): _json_logprob(v.logprob) for t, v in _top(lp, k)}
            if k and lp is not None
            else None
        )
        offsets.append(offset)
        offset += len(piece)
    return {
        "tokens": tokens,
        "token_logprobs": token_lps,
        "top_logprobs": tops,
        "text_offset": offsets,
    }


def completion_logprobs(
    o: CompletionOutput,
    tokenizer: Any,
    k: int,
    start: int = 0,
    text_offset: int = 0,
    as_ids: bool = False,
) -> dict[str, Any] | None:
    """The legacy completions logprobs object for output tokens [start:] (`as_ids`: tokens
    named by id, see `_name`)."""
    if o.logprobs is None:
        return None
    return _legacy_logprobs(
        o.token_ids[start:], o.logprobs[start:], tokenizer, k, text_offset, as_ids
    )


def prompt_logprobs_object(
    token_ids: list[int],
    prompt_logprobs: list | None,
    tokenizer: Any,
    k: int,
    as_ids: bool = False,
) -> dict[str, Any]:
    """The legacy completions logprobs object of an echoed prompt (the first token's logprob
    and alternatives are null: nothing predicts it)."""
    return _legacy_logprobs(token_ids, prompt_logprobs or [], tokenizer, k, 0, as_ids)


def vllm_prompt_logprobs(
    token_ids: list[int], prompt_logprobs: list | None, k: int, as_ids: bool = False
) -> list[dict[str, Any] | None]:
    """vLLM's `prompt_logprobs` of a response: per prompt token, {token id: {logprob, rank,
    decoded_token}} for the token itself and its top-k alternatives (None for the first token,
    which nothing predicts)."""
    out: list[dict[str, Any] | None] = []
    for tok, lp in zip(token_ids, prompt_logprobs or []):
        if lp is None:
            out.append(None)
            continue
        entries = {tok: lp[tok], **dict(_top(lp, k))}
        out.append(
            {
                str(t): {
                    "logprob": _json_logprob(v.logprob),
                    "rank": v.rank,
                    "decoded_token": _name(t, v.decoded_token, as_ids),
                }
                for t, v in entries.items()
            }
        )
    return out


def join_logprobs(
    first: dict[str, Any] | None, second: dict[str, Any] | None
) -> dict[str, Any] | None:
    """Two legacy logprobs objects one after the other (either may be None)."""
    if first is None or second is None:
        return first if second is None else second
    return {key: first[key] + second[key] for key in first}


def chat_logprobs(
    o: CompletionOutput, tokenizer: Any, k: int, start: int = 0, as_ids: bool = False
) -> dict[str, Any] | None:
    """The chat logprobs object ({"content": [...]}) for output tokens [start:]. A token's
    "bytes" are its own (OpenAI's meaning: the pieces of a character split over tokens join
    into its UTF-8), while "token" is its text, U+FFFD for such a piece."""
    if o.logprobs is None:
        return None
    content = []
    for tok, lp in zip(o.token_ids[start:], o.logprobs[start:]):
        top = _top(lp, k)
        raw = tokenizer.token_bytes([tok, *(i for i, _ in top)])
        content.append(
            {
                "token": _name(tok, tokenizer.decode([tok], skip_special_tokens=False), as_ids),
                "logprob": _json_logprob(lp[tok].logprob),
                "bytes": list(raw[0]),
                "top_logprobs": [
                    {
                        "token": _name(t, v.decoded_token, as_ids),
                        "logprob": _json_logprob(v.logprob),
                        "bytes": list(b),
                    }
                    for (t, v), b in zip(top, raw[1:])
                ],
            }
        )
    return {"content": content}


def sse(data: dict[str, Any] | str) -> str:
    body = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {body}\n\n"
