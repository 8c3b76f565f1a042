"""Response and stream bodies of /v1/completions (OpenAI's shapes), and the SSE helpers that
/v1/chat/completions (server/chat.py) shares: the error event, the chunker with its running
usage, and the stream's end.

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
from tokenmill.server.chat_protocol import ChatCompletionRequest
from tokenmill.server.completions_protocol import CompletionRequest
from tokenmill.server.handlers import (
    OpenAIServing,
    PreparedPrompt,
    completion_logprobs,
    join_logprobs,
    prompt_logprobs_object,
    sse,
    usage,
    vllm_prompt_logprobs,
)

logger = logging.getLogger(__name__)
DONE = "data: [DONE]\n\n"


def error_event(e: BaseException) -> str:
    """The SSE line of an error that ends a stream (its status is already sent), logged."""
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


def stream_end(
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


def chunker(
    body: CompletionRequest | ChatCompletionRequest, base: Any, tracker: Any, counts: dict[int, int]
) -> Any:
    """The SSE line of a chunk with these choices; with stream_options' include_usage and
    continuous_usage_stats (vLLM's), every chunk carries the usage so far: the prompt and the
    tokens generated until then over all choices."""
    options = body.stream_options
    running = bool(options and options.include_usage and options.continuous_usage_stats)

    def chunk(choices: list[dict]) -> str:
        data = base(choices)
        if running:
            data["usage"] = usage(tracker.prompt_tokens, sum(counts.values()))
        return sse(data)

    return chunk


async def completion_response(
    serving: OpenAIServing, body: CompletionRequest
) -> AsyncIterator[str] | Coroutine[Any, Any, dict]:
    body.check_supported()
    # tokenizing runs in a worker thread: a long prompt never blocks the event loop
    special = body.add_special_tokens is not False

    def prepare() -> list[PreparedPrompt]:
        return [serving.prepare(p, special, body.truncate_prompt_tokens) for p in body.prompts()]

    prompts = await asyncio.to_thread(prepare)
    for p in prompts:
        serving.check_length(len(p.token_ids), body.max_tokens)
    params = body.sampling_params(body.max_tokens, body.logprobs, body.engine_prompt_logprobs())
    rid, streams, tracker = await serving.start(prompts, params, "cmpl", body.model)
    created, n = int(time.time()), body.n
    tok = serving.tokenizer
    k = body.logprobs or 0
    as_ids = body.return_tokens_as_token_ids

    def echo_text(p: PreparedPrompt) -> str:
        return p.text if p.text is not None else tok.decode(p.token_ids)

    def echo_logprobs(i: int, out: RequestOutput) -> dict | None:
        """The echoed prompt's part of the logprobs object (None without logprobs)."""
        if body.logprobs is None:
            return None
        return prompt_logprobs_object(prompts[i].token_ids, out.prompt_logprobs, tok, k, as_ids)

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
                lp = completion_logprobs(o, tok, k, text_offset=len(prefix), as_ids=as_ids)
                if body.echo:
                    lp = join_logprobs(echo_logprobs(i, final[i]), lp)
                choice = {
                    "index": i * n + o.index,
                    "text": prefix + o.text,
                    "logprobs": lp,
                    "finish_reason": o.finish_reason,
                }
                if body.prompt_logprobs is not None:
                    choice["prompt_logprobs"] = vllm_prompt_logprobs(
                        prompts[i].token_ids, final[i].prompt_logprobs, body.prompt_logprobs, as_ids
                    )
                choices.append(choice)
        choices.sort(key=lambda c: c["index"])
        return base(choices) | {"usage": usage(tracker.prompt_tokens, n_out)}

    async def stream() -> AsyncIterator[str]:
        counts: dict[int, int] = {}
        chunk = chunker(body, base, tracker, counts)
        offsets: dict[int, int] = {}
        done: set[int] = set()  # choices whose finish_reason went out (outputs repeat them)
        try:
            async for i, out in serving.merged(streams, tracker):
                for o in out.outputs:
                    idx = i * n + o.index
                    if idx in done:
                        continue
                    if o.finished:
                        done.add(idx)
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
                        echo_lp, completion_logprobs(o, tok, k, start, offsets.get(idx, 0), as_ids)
                    )
                    offsets[idx] = offsets.get(idx, 0) + len(o.delta_text)
                    yield chunk(
                        [
                            {
                                "index": idx,
                                "text": echo + o.delta_text,
                                "logprobs": lp,
                                "finish_reason": o.finish_reason,
                            }
                        ]
                    )
            for line in stream_end(body, base([]), tracker.prompt_tokens, counts):
                yield line
        except Exception as e:  # noqa: BLE001 - reported in-band, the status is already sent
            yield error_event(e)

    return stream() if body.stream else collect()
