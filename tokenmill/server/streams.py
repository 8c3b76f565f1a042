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

from tokenmill.outputs import CompletionOutput, RequestOutput
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
    details: dict | None = None,
) -> list[str]:
    """The usage chunk (when stream_options.include_usage; with `details`, such as the
    reasoning tokens) and the [DONE] sentinel."""
    lines = []
    if body.stream_options and body.stream_options.include_usage:
        tokens = usage(prompt_tokens, sum(counts.values())) | (details or {})
        lines.append(sse(empty_chunk | {"usage": tokens}))
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
    """Validate, tokenize and queue a completion request (raising before any byte is sent),
    then return the coroutine of its response body or the async generator of its SSE chunks."""
    body.check_supported()
    # tokenizing runs in a worker thread: a long prompt never blocks the event loop
    special = body.add_special_tokens is not False

    def prepare() -> list[PreparedPrompt]:
        prompts = body.prompts()
        if body.suffix:  # fill-in-the-middle: the code before and after the gap (text prompts)
            prompts = [serving.fill_in_the_middle(str(p), body.suffix) for p in prompts]
        return [serving.prepare(p, special, body.truncate_prompt_tokens) for p in prompts]

    prompts = await asyncio.to_thread(prepare)
    for p in prompts:
        serving.check_length(len(p.token_ids), body.max_tokens)
    params = body.sampling_params(
        body.max_tokens, body.logprobs, body.engine_prompt_logprobs(), serving.sampling_defaults
    )
    rid, streams, tracker = await serving.start(prompts, params, "cmpl", body.model)
    reply = _CompletionReply(serving, body, prompts, rid, streams, tracker)
    return reply.stream() if body.stream else reply.collect()


class _CompletionReply:
    """The reply to a queued completion request: the response body (`collect`) or the stream
    of chunks (`stream`), OpenAI's shapes. Choice `i * n + j` is prompt i's sample j."""

    def __init__(
        self,
        serving: OpenAIServing,
        body: CompletionRequest,
        prompts: list[PreparedPrompt],
        request_id: str,
        streams: list,
        tracker: Any,
    ) -> None:
        self.serving, self.body, self.prompts = serving, body, prompts
        self.request_id, self.streams, self.tracker = request_id, streams, tracker
        self.created = int(time.time())
        self.tok = serving.tokenizer
        self.k = body.logprobs or 0
        self.as_ids = body.return_tokens_as_token_ids

    def base(self, choices: list[dict]) -> dict:
        """The fields every response body or chunk carries, with these choices."""
        return {
            "id": self.request_id,
            "object": "text_completion",
            "created": self.created,
            "model": self.body.model,
            "choices": choices,
        }

    def echo_text(self, i: int) -> str:
        """Prompt i as echoed: its text, or its tokens decoded when it came as ids."""
        p = self.prompts[i]
        return p.text if p.text is not None else self.tok.decode(p.token_ids)

    def echo_logprobs(self, i: int, out: RequestOutput) -> dict | None:
        """The echoed prompt's part of the logprobs object (None without logprobs)."""
        if self.body.logprobs is None:
            return None
        token_ids = self.prompts[i].token_ids
        return prompt_logprobs_object(token_ids, out.prompt_logprobs, self.tok, self.k, self.as_ids)

    def choice(self, i: int, o: CompletionOutput, out: RequestOutput) -> dict:
        """The response body's choice of prompt i's finished sample `o`."""
        body = self.body
        prefix = self.echo_text(i) if body.echo else ""
        lp = completion_logprobs(o, self.tok, self.k, text_offset=len(prefix), as_ids=self.as_ids)
        if body.echo:
            lp = join_logprobs(self.echo_logprobs(i, out), lp)
        choice = {
            "index": i * body.n + o.index,
            "text": prefix + o.text,
            "logprobs": lp,
            "finish_reason": o.finish_reason,
        }
        if body.prompt_logprobs is not None:
            choice["prompt_logprobs"] = vllm_prompt_logprobs(
                self.prompts[i].token_ids, out.prompt_logprobs, body.prompt_logprobs, self.as_ids
            )
        return choice

    async def collect(self) -> dict:
        """The whole response body, once every sample of every prompt finished."""
        final = {}
        async for i, out in self.serving.merged(self.streams, self.tracker):
            final[i] = out
        choices = [self.choice(i, o, final[i]) for i in sorted(final) for o in final[i].outputs]
        n_out = sum(len(o.token_ids) for out in final.values() for o in out.outputs)
        choices.sort(key=lambda c: c["index"])
        return self.base(choices) | {"usage": usage(self.tracker.prompt_tokens, n_out)}

    def chunk_choice(
        self, i: int, o: CompletionOutput, out: RequestOutput, offsets: dict[int, int]
    ) -> dict | None:
        """The chunk choice for prompt i's sample `o`'s new output (None when there is none);
        `offsets` holds each choice's text length so far, for the logprobs' text offsets."""
        idx = i * self.body.n + o.index
        echo, echo_lp = "", None
        if self.body.echo and idx not in offsets:
            # The choice's first chunk carries the prompt (and its logprobs, known once the
            # prompt has run).
            echo, echo_lp = self.echo_text(i), self.echo_logprobs(i, out)
            offsets[idx] = len(echo)
        elif not (o.delta_text or o.delta_token_ids or o.finished):
            return None
        start = len(o.token_ids) - len(o.delta_token_ids)
        lp = completion_logprobs(o, self.tok, self.k, start, offsets.get(idx, 0), self.as_ids)
        offsets[idx] = offsets.get(idx, 0) + len(o.delta_text)
        return {
            "index": idx,
            "text": echo + o.delta_text,
            "logprobs": join_logprobs(echo_lp, lp),
            "finish_reason": o.finish_reason,
        }

    async def stream(self) -> AsyncIterator[str]:
        """The SSE chunks, one per choice with new output, then the usage (when asked for)
        and [DONE]; an error after the start is an error event."""
        counts: dict[int, int] = {}
        chunk = chunker(self.body, self.base, self.tracker, counts)
        offsets: dict[int, int] = {}
        done: set[int] = set()  # choices whose finish_reason went out (outputs repeat them)
        try:
            async for i, out in self.serving.merged(self.streams, self.tracker):
                for o in out.outputs:
                    idx = i * self.body.n + o.index
                    if idx in done:
                        continue
                    if o.finished:
                        done.add(idx)
                    counts[idx] = len(o.token_ids)
                    choice = self.chunk_choice(i, o, out, offsets)
                    if choice is not None:
                        yield chunk([choice])
            for line in stream_end(self.body, self.base([]), self.tracker.prompt_tokens, counts):
                yield line
        except Exception as e:  # noqa: BLE001 - reported in-band, the status is already sent
            yield error_event(e)
