"""/v1/messages: Anthropic's Messages API, served by the chat path.

Clients written for Anthropic's API (its SDKs, and tools built on them) run unchanged against a
local model, as with llama.cpp's and vLLM's servers. A request's `system` and `messages` become a
chat conversation: text blocks are message content, an assistant's `tool_use` blocks its tool
calls, a user's `tool_result` blocks `tool` messages before its text; `tools` (name,
description, input_schema) and `tool_choice` (auto, any, tool, none) become the chat request's
function tools and choice, so rendering, grammars and parsing are the chat endpoint's
(`chat.start_chat`). The reply's content is a text block and the `tool_use` blocks the
parser found, after a `thinking` block where the server's reasoning parser found reasoning (a
`thinking` block sent back is that assistant turn's reasoning, for the template);
`stop_reason` is `end_turn`, `max_tokens`, `stop_sequence` (with the sequence) or `tool_use`.
Streamed, it arrives as Anthropic's events: message_start, content_block_start / delta / stop
per block (thinking_delta, text_delta, input_json_delta), message_delta with the stop reason and
usage, message_stop; an error after the start is an `error` event.

POST /v1/messages/count_tokens renders the same conversation and counts its tokens. Errors on
these paths take Anthropic's shape ({"type": "error", "error": {"type", "message"}}), by the
`AnthropicErrors` middleware of server/errors.py.

The request models and their translation to a chat request are in messages_protocol.py.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Coroutine
from typing import Any

from tokenmill.outputs import CompletionOutput
from tokenmill.server.chat import ChatRun, render_chat, start_chat
from tokenmill.server.handlers import ContextLengthError, OpenAIServing
from tokenmill.server.messages_protocol import CountTokensRequest, MessagesRequest
from tokenmill.server.protocol import RequestLimits, UnsupportedParameter

# Chat parameters named as Anthropic's API names them, in errors.
_PARAMS = {
    "max_completion_tokens": "max_tokens",
    "stop": "stop_sequences",
    "response_format": "output_config",
}


def _renamed(e: UnsupportedParameter) -> UnsupportedParameter:
    return UnsupportedParameter(_PARAMS.get(e.param, e.param), str(e))


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:24]}"


def _sse(event: str, data: dict[str, Any]) -> str:
    return f"event: {event}\ndata: {json.dumps({'type': event, **data}, separators=(',', ':'))}\n\n"


def _tool_input(arguments: str) -> dict[str, Any]:
    """A call's arguments (JSON text) as tool_use input: an object (the parser only reports
    calls whose arguments parse; anything else becomes {"arguments": text})."""
    try:
        value = json.loads(arguments) if arguments else {}
    except ValueError:
        return {"arguments": arguments}
    return value if isinstance(value, dict) else {"arguments": value}


def _stop(o: CompletionOutput, called: bool, stops: list[str]) -> tuple[str, str | None]:
    """Anthropic's stop_reason and stop_sequence of a finished sample."""
    if o.finish_reason == "length":
        return "max_tokens", None
    if called:
        return "tool_use", None
    if isinstance(o.stop_reason, str) and o.stop_reason in stops:
        return "stop_sequence", o.stop_reason
    return "end_turn", None


async def count_tokens_response(serving: OpenAIServing, body: CountTokensRequest) -> dict:
    """{"input_tokens": n}: the rendered conversation's length, tools included."""
    body.check_supported()
    try:
        _, prompt = await render_chat(serving, body.chat_request())
    except UnsupportedParameter as e:
        raise _renamed(e) from None
    return {"input_tokens": len(prompt.token_ids)}


async def messages_response(
    serving: OpenAIServing, body: MessagesRequest, limits: RequestLimits
) -> AsyncIterator[str] | Coroutine[Any, Any, dict]:
    """Validate and queue a Messages request (raising before any byte is sent), then return
    the coroutine of its message or the async generator of its events."""
    body.check_supported()
    try:
        chat = body.chat_request()
        chat.check_limits(limits)
        run = await start_chat(serving, chat, "msg")
    except UnsupportedParameter as e:
        raise _renamed(e) from None
    except ContextLengthError as e:
        raise ContextLengthError(str(e), "max_tokens") from None
    reply = _MessageReply(serving, body, run)
    return reply.stream() if body.stream else reply.collect()


class _Blocks:
    """The content blocks of a streamed message, as Anthropic's block events: a block starts
    when its content does and stops when the next one starts or the message ends."""

    def __init__(self) -> None:
        self.types: list[str] = []  # the type of each block started

    def start(self, block: dict[str, Any]) -> list[str]:
        """The events that stop the open block (if any) and start this one."""
        lines = [_sse("content_block_stop", {"index": len(self.types) - 1})] if self.types else []
        self.types.append(block["type"])
        lines.append(
            _sse("content_block_start", {"index": len(self.types) - 1, "content_block": block})
        )
        return lines

    def delta(self, delta: dict[str, Any]) -> str:
        """The event of a delta to the open block."""
        return _sse("content_block_delta", {"index": len(self.types) - 1, "delta": delta})

    def thinking(self, text: str) -> list[str]:
        """The events of new reasoning: a thinking block started unless one is open (its
        signature empty: nothing here verifies one), and its delta."""
        lines = (
            []
            if self.types and self.types[-1] == "thinking"
            else self.start({"type": "thinking", "thinking": "", "signature": ""})
        )
        return lines + [self.delta({"type": "thinking_delta", "thinking": text})]

    def text(self, text: str) -> list[str]:
        """The events of new text: a text block started unless one is open, and its delta."""
        lines = (
            []
            if self.types and self.types[-1] == "text"
            else self.start({"type": "text", "text": ""})
        )
        return lines + [self.delta({"type": "text_delta", "text": text})]

    def call(self, name: str | None, arguments: str) -> list[str]:
        """The events of a tool-call piece: a tool_use block started when the piece names the
        call, and an input_json_delta for its argument text."""
        lines = []
        if name is not None:
            lines = self.start(
                {"type": "tool_use", "id": _new_id("toolu"), "name": name, "input": {}}
            )
        if arguments:
            lines.append(self.delta({"type": "input_json_delta", "partial_json": arguments}))
        return lines

    def close(self) -> list[str]:
        """The events that end the content: an empty text block when no answer came (an
        empty reply is still a text block), and the last block's stop."""
        answered = any(kind != "thinking" for kind in self.types)
        lines = [] if answered else self.start({"type": "text", "text": ""})
        return lines + [_sse("content_block_stop", {"index": len(self.types) - 1})]


class _MessageReply:
    """The reply to a queued Messages request: the message (`collect`) or the stream of its
    events (`stream`), Anthropic's shapes."""

    def __init__(self, serving: OpenAIServing, body: MessagesRequest, run: ChatRun) -> None:
        self.serving, self.body, self.run = serving, body, run
        self.message_id = _new_id("msg")
        self.stops = list(body.stop_sequences or [])

    def message(self, content: list[dict], stop: tuple[str | None, str | None], out: Any) -> dict:
        """The message object with this content and stop reason (`out` None before any)."""
        n_out = sum(len(o.token_ids) for o in out.outputs) if out is not None else 0
        return {
            "id": self.message_id,
            "type": "message",
            "role": "assistant",
            "model": self.body.model,
            "content": content,
            "stop_reason": stop[0],
            "stop_sequence": stop[1],
            "usage": {
                "input_tokens": self.run.tracker.prompt_tokens,
                "output_tokens": n_out,
                "cache_read_input_tokens": out.num_cached_tokens if out is not None else 0,
                "cache_creation_input_tokens": 0,
            },
        }

    async def collect(self) -> dict:
        """The whole message, once the reply finished: a thinking block (with a reasoning
        parser, when the sample reasoned), a text block (unless the reply is only tool calls)
        and a tool_use block per call."""
        final, reasoning, text, calls = await self.run.reply(self.serving)
        o = final.outputs[0]
        content = []
        if reasoning is not None:
            content.append({"type": "thinking", "thinking": reasoning, "signature": ""})
        if text or not calls:
            content.append({"type": "text", "text": text})
        content += [
            {
                "type": "tool_use",
                "id": _new_id("toolu"),
                "name": c.name,
                "input": _tool_input(c.arguments),
            }
            for c in calls
        ]
        return self.message(content, _stop(o, bool(calls), self.stops), final)

    async def stream(self) -> AsyncIterator[str]:
        """The events: message_start, the blocks' events as the text comes, then
        message_delta (stop reason, usage) and message_stop; an error is an error event."""
        run = self.run
        splitter = run.splitter(self.serving)
        blocks = _Blocks()
        yield _sse("message_start", {"message": self.message([], (None, None), None)})
        try:
            async for _, out in self.serving.merged(run.streams, run.tracker):
                o = out.outputs[0]
                reasoning, text, calls = splitter.feed(o.delta_text, o.finished)
                lines = blocks.thinking(reasoning) if reasoning else []
                lines += blocks.text(text) if text else []
                for d in calls:
                    lines += blocks.call(d.name, d.arguments)
                if o.finished:
                    lines += blocks.close()
                    reason, sequence = _stop(o, "tool_use" in blocks.types, self.stops)
                    delta = {"stop_reason": reason, "stop_sequence": sequence}
                    usage = {"output_tokens": len(o.token_ids)}
                    lines += [_sse("message_delta", {"delta": delta, "usage": usage})]
                    lines += [_sse("message_stop", {})]
                for line in lines:
                    yield line
        except Exception as e:  # noqa: BLE001 - reported in-band, the status is already sent
            error = {"type": "api_error", "message": str(e) or type(e).__name__}
            yield _sse("error", {"error": error})
