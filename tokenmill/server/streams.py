"""Response and stream bodies of /v1/completions and /v1/chat/completions (OpenAI's shapes).

Each builder validates and queues the request (raising before any byte is sent), then returns
either a coroutine producing the JSON body or an async generator of SSE lines.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Coroutine
from typing import Any

from tokenmill.outputs import RequestOutput
from tokenmill.server.handlers import (
    OpenAIServing,
    PreparedPrompt,
    chat_logprobs,
    completion_logprobs,
    join_logprobs,
    prompt_logprobs_object,
    sse,
    usage,
)
from tokenmill.server.protocol import ChatCompletionRequest, CompletionRequest

logger = logging.getLogger(__name__)
DONE = "data: [DONE]\n\n"


def _error_event(e: BaseException) -> str:
    logger.warning("stream ended by error: %s", e)
    return sse(
        {
            "error": {
                "message": str(e) or type(e).__name__,
                "type": "server_error",
                "param": None,
                "code": None,
            }
        }
    )


def _stream_end(
    body: CompletionRequest | ChatCompletionRequest,
    empty_chunk: dict,
    prompt_tokens: int,
    counts: dict[int, int],
) -> list[str]:
    """The usage chunk (when stream_options.include_usage) and the [DONE] sentinel."""
    lines = []
    if body.stream_options and body.stream_options.include_usage:
        lines.append(sse(empty_chunk | {"usage": usage(prompt_tokens, sum(counts.values()))}))
    return lines + [DONE]


async def completion_response(
    serving: OpenAIServing, body: CompletionRequest
) -> AsyncIterator[str] | Coroutine[Any, Any, dict]:
    body.check_supported()
    # tokenizing runs in a worker thread: a long prompt never blocks the event loop
    prompts = await asyncio.to_thread(lambda: [serving.prepare(p) for p in body.prompts()])
    for p in prompts:
        serving.check_length(len(p.token_ids), body.max_tokens)
    params = body.sampling_params(body.max_tokens, body.logprobs, body.prompt_logprobs())
    rid, streams, tracker = await serving.start(prompts, params, "cmpl")
    created, n = int(time.time()), body.n
    tok = serving.tokenizer
    k = body.logprobs or 0

    def echo_text(p: PreparedPrompt) -> str:
        return p.text if p.text is not None else tok.decode(p.token_ids)

    def echo_logprobs(i: int, out: RequestOutput) -> dict | None:
        """The echoed prompt's part of the logprobs object (None without logprobs)."""
        if body.logprobs is None:
            return None
        return prompt_logprobs_object(prompts[i].token_ids, out.prompt_logprobs, tok, k)

    def base(choices: list[dict]) -> dict:
        return {
            "id": rid,
            "object": "text_completion",
            "created": created,
            "model": body.model,
            "choices": choices,
        }

    async def collect() -> dict:
        final = {}
        async for i, out in serving.merged(streams, tracker):
            final[i] = out
        choices, n_out = [], 0
        for i in sorted(final):
            prefix = echo_text(prompts[i]) if body.echo else ""
            for o in final[i].outputs:
                n_out += len(o.token_ids)
                lp = completion_logprobs(o, tok, k, text_offset=len(prefix))
                if body.echo:
                    lp = join_logprobs(echo_logprobs(i, final[i]), lp)
                choices.append(
                    {
                        "index": i * n + o.index,
                        "text": prefix + o.text,
                        "logprobs": lp,
                        "finish_reason": o.finish_reason,
                    }
                )
        choices.sort(key=lambda c: c["index"])
        return base(choices) | {"usage": usage(tracker.prompt_tokens, n_out)}

    async def stream() -> AsyncIterator[str]:
        counts: dict[int, int] = {}
        offsets: dict[int, int] = {}
        try:
            async for i, out in serving.merged(streams, tracker):
                for o in out.outputs:
                    idx = i * n + o.index
                    counts[idx] = len(o.token_ids)
                    echo, echo_lp = "", None
                    if body.echo and idx not in offsets:
                        # The choice's first chunk carries the prompt (and its logprobs, known
                        # once the prompt has run).
                        echo, echo_lp = echo_text(prompts[i]), echo_logprobs(i, out)
                        offsets[idx] = len(echo)
                    elif not (o.delta_text or o.delta_token_ids or o.finished):
                        continue
                    start = len(o.token_ids) - len(o.delta_token_ids)
                    lp = join_logprobs(
                        echo_lp, completion_logprobs(o, tok, k, start, offsets.get(idx, 0))
                    )
                    offsets[idx] = offsets.get(idx, 0) + len(o.delta_text)
                    yield sse(
                        base(
                            [
                                {
                                    "index": idx,
                                    "text": echo + o.delta_text,
                                    "logprobs": lp,
                                    "finish_reason": o.finish_reason,
                                }
                            ]
                        )
                    )
            for line in _stream_end(body, base([]), tracker.prompt_tokens, counts):
                yield line
        except Exception as e:  # noqa: BLE001 - reported in-band, the status is already sent
            yield _error_event(e)

    return stream() if body.stream else collect()


async def chat_response(
    serving: OpenAIServing, body: ChatCompletionRequest
) -> AsyncIterator[str] | Coroutine[Any, Any, dict]:
    body.check_supported()
    tok = serving.tokenizer

    def render() -> PreparedPrompt:
        text = tok.apply_chat_template(
            [m.as_template_message() for m in body.messages],
            add_generation_prompt=body.add_generation_prompt,
        )
        return PreparedPrompt(text, tok.encode(text, add_special_tokens=False))

    # rendering and tokenizing run in a worker thread, so the event loop keeps serving
    prompt = await asyncio.to_thread(render)
    max_tokens = body.effective_max_tokens()
    serving.check_length(len(prompt.token_ids), max_tokens)
    params = body.sampling_params(max_tokens, body.num_logprobs())
    rid, streams, tracker = await serving.start([prompt], params, "chatcmpl")
    created = int(time.time())
    k = body.top_logprobs or 0

    def base(choices: list[dict]) -> dict:
        return {
            "id": rid,
            "object": "chat.completion.chunk" if body.stream else "chat.completion",
            "created": created,
            "model": body.model,
            "system_fingerprint": None,
            "choices": choices,
        }

    async def collect() -> dict:
        final = None
        async for _, out in serving.merged(streams, tracker):
            final = out
        choices = [
            {
                "index": o.index,
                "message": {"role": "assistant", "content": o.text},
                "logprobs": chat_logprobs(o, tok, k),
                "finish_reason": o.finish_reason,
            }
            for o in final.outputs
        ]
        n_out = sum(len(o.token_ids) for o in final.outputs)
        return base(choices) | {"usage": usage(tracker.prompt_tokens, n_out)}

    async def stream() -> AsyncIterator[str]:
        counts: dict[int, int] = {}
        try:
            for j in range(body.n):
                yield sse(
                    base(
                        [
                            {
                                "index": j,
                                "delta": {"role": "assistant", "content": ""},
                                "logprobs": None,
                                "finish_reason": None,
                            }
                        ]
                    )
                )
            async for _, out in serving.merged(streams, tracker):
                for o in out.outputs:
                    counts[o.index] = len(o.token_ids)
                    start = len(o.token_ids) - len(o.delta_token_ids)
                    if o.delta_text or (o.delta_token_ids and body.logprobs):
                        yield sse(
                            base(
                                [
                                    {
                                        "index": o.index,
                                        "delta": {"content": o.delta_text},
                                        "logprobs": chat_logprobs(o, tok, k, start),
                                        "finish_reason": None,
                                    }
                                ]
                            )
                        )
                    if o.finished:
                        yield sse(
                            base(
                                [
                                    {
                                        "index": o.index,
                                        "delta": {},
                                        "logprobs": None,
                                        "finish_reason": o.finish_reason,
                                    }
                                ]
                            )
                        )
            for line in _stream_end(body, base([]), tracker.prompt_tokens, counts):
                yield line
        except Exception as e:  # noqa: BLE001 - reported in-band, the status is already sent
            yield _error_event(e)

    return stream() if body.stream else collect()
