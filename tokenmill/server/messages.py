"""/v1/messages: Anthropic's Messages API, served by the chat path.

Clients written for Anthropic's API (its SDKs, and tools built on them) run unchanged against a
local model, as with llama.cpp's and vLLM's servers. A request's `system` and `messages` become a
chat conversation: text blocks are message content, an assistant's `tool_use` blocks its tool
calls, a user's `tool_result` blocks `tool` messages before its text; `tools` (name,
description, input_schema) and `tool_choice` (auto, any, tool, none) become the chat request's
function tools and choice, so rendering, grammars and parsing are the chat endpoint's
(`streams.start_chat`). The reply's content is a text block and the `tool_use` blocks the
parser found; `stop_reason` is `end_turn`, `max_tokens`, `stop_sequence` (with the sequence) or
`tool_use`. Streamed, it arrives as Anthropic's events: message_start, content_block_start /
delta / stop per block (text_delta, input_json_delta), message_delta with the stop reason and
usage, message_stop; an error after the start is an `error` event.

POST /v1/messages/count_tokens renders the same conversation and counts its tokens. Errors on
these paths take Anthropic's shape ({"type": "error", "error": {"type", "message"}}), by the
`AnthropicErrors` middleware of server/errors.py.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Coroutine
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tokenmill.outputs import CompletionOutput
from tokenmill.server.chat_protocol import ChatCompletionRequest
from tokenmill.server.handlers import ContextLengthError, OpenAIServing
from tokenmill.server.protocol import (
    RequestBody,
    RequestLimits,
    UnsupportedParameter,
    reject_kinds,
)
from tokenmill.server.streams import new_pieces, render_chat, start_chat

_STRICT = ConfigDict(extra="forbid", allow_inf_nan=False)
BLOCK_TYPES = ("text", "tool_use", "tool_result")


class TextBlock(BaseModel):
    model_config = _STRICT
    type: Literal["text"]
    text: str
    cache_control: dict[str, Any] | None = None  # prompt caching is automatic here
    citations: list[Any] | None = None


class ToolUseBlock(BaseModel):
    model_config = _STRICT
    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any]
    cache_control: dict[str, Any] | None = None


class ToolResultBlock(BaseModel):
    model_config = _STRICT
    type: Literal["tool_result"]
    tool_use_id: str
    content: str | list[TextBlock] | None = None
    is_error: bool | None = None
    cache_control: dict[str, Any] | None = None

    def text(self) -> str:
        text = (
            self.content
            if isinstance(self.content, str) or self.content is None
            else "".join(b.text for b in self.content)
        )
        return f"Error: {text or ''}" if self.is_error else text or ""


Block = Annotated[TextBlock | ToolUseBlock | ToolResultBlock, Field(discriminator="type")]


class Message(BaseModel):
    model_config = _STRICT
    role: Literal["user", "assistant"]
    content: str | list[Block]


class Tool(BaseModel):
    """A client tool (Anthropic's server tools, such as web search, are not served)."""

    model_config = _STRICT
    name: str = Field(pattern=r"^[A-Za-z0-9_.\-]{1,64}$")
    description: str | None = None
    input_schema: dict[str, Any]
    type: Literal["custom"] | None = None
    cache_control: dict[str, Any] | None = None


class ToolChoice(BaseModel):
    model_config = _STRICT
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool | None = None


class Thinking(BaseModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)
    type: str  # "disabled" is the only kind served


class JsonFormat(BaseModel):
    model_config = _STRICT
    type: Literal["json_schema"]
    json_schema: dict[str, Any] = Field(alias="schema")


class OutputConfig(BaseModel):
    model_config = _STRICT
    format: JsonFormat | None = None
    effort: str | None = None


class Metadata(BaseModel):
    model_config = _STRICT
    user_id: str | None = None


class MessagesRequest(RequestBody):
    """The body of POST /v1/messages (and, without max_tokens, of count_tokens). `temperature`,
    `top_p` and `top_k` are taken as the API's earlier versions (and llama.cpp, vLLM) take
    them."""

    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int = Field(ge=1)
    system: str | list[TextBlock] | None = None
    stop_sequences: list[str] | None = None
    stream: bool = False
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    thinking: Thinking | None = None
    output_config: OutputConfig | None = None  # format: structured output
    metadata: Metadata | None = None
    service_tier: Literal["auto", "standard_only"] | None = None
    speed: Literal["standard", "fast"] | None = None
    # Accepted with no effect on a local server: prompt caching is automatic, the data stays
    # here, diagnostics and the ids only label the request.
    cache_control: dict[str, Any] | None = None
    inference_geo: str | None = None
    diagnostics: dict[str, Any] | None = None
    user_profile_id: str | None = None
    workspace_id: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _known_blocks(cls, data: Any) -> Any:
        """Content blocks of a kind not served (images, documents, thinking, server tools)
        are named in the error."""
        messages = data.get("messages") if isinstance(data, dict) else None
        for i, message in enumerate(messages if isinstance(messages, list) else []):
            if isinstance(message, dict):
                reject_kinds(message.get("content"), BLOCK_TYPES, f"messages.{i}.content", "blocks")
        return data

    def check_limits(self, limits: RequestLimits) -> None:
        if len(self.messages) > limits.max_messages:
            raise UnsupportedParameter("messages", f"at most {limits.max_messages} messages")
        if len(self.tools or []) > limits.max_tools:
            raise UnsupportedParameter("tools", f"at most {limits.max_tools} tools")

    def check_supported(self) -> None:
        if self.thinking is not None and self.thinking.type != "disabled":
            raise UnsupportedParameter(
                "thinking", "extended thinking is not supported (no reasoning models here)"
            )
        if self.output_config is not None and self.output_config.effort is not None:
            raise UnsupportedParameter("output_config", "output_config.effort is not supported")
        if self.speed == "fast":
            raise UnsupportedParameter("speed", 'speed "fast" is not supported (one speed here)')
        choice = self.tool_choice
        if choice is not None and (choice.type == "tool") != (choice.name is not None):
            raise UnsupportedParameter(
                "tool_choice", 'tool_choice needs a name exactly when its type is "tool"'
            )

    def chat_messages(self) -> list[dict[str, Any]]:
        """The conversation as chat messages (see the module's docstring)."""
        system = self.system
        if isinstance(system, list):
            system = "".join(b.text for b in system)
        out: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
        names: dict[str, str] = {}  # tool_use id -> tool name
        for m in self.messages:
            blocks = (
                [TextBlock(type="text", text=m.content)]
                if isinstance(m.content, str)
                else list(m.content)
            )
            text = "".join(b.text for b in blocks if isinstance(b, TextBlock))
            if m.role == "assistant":
                calls = [
                    {
                        "id": b.id,
                        "type": "function",
                        "function": {"name": b.name, "arguments": json.dumps(b.input)},
                    }
                    for b in blocks
                    if isinstance(b, ToolUseBlock)
                ]
                names.update((c["id"], c["function"]["name"]) for c in calls)
                message: dict[str, Any] = {"role": "assistant", "content": text or None}
                if calls:
                    message["tool_calls"] = calls
                else:
                    message["content"] = text
                out.append(message)
                continue
            if any(isinstance(b, ToolUseBlock) for b in blocks):
                raise UnsupportedParameter("messages", "tool_use blocks belong to assistant turns")
            for b in blocks:
                if isinstance(b, ToolResultBlock):
                    tool = {"role": "tool", "tool_call_id": b.tool_use_id, "content": b.text()}
                    if b.tool_use_id in names:
                        tool["name"] = names[b.tool_use_id]
                    out.append(tool)
            if text or not any(isinstance(b, ToolResultBlock) for b in blocks):
                out.append({"role": "user", "content": text})
        return out

    def chat_request(self) -> ChatCompletionRequest:
        """The chat request this one means: its conversation (`chat_messages`), tools as
        functions, tool_choice as OpenAI's (any -> required, a named tool -> that function,
        disable_parallel_tool_use -> parallel_tool_calls false), and the sampling options."""
        choice: Any = None
        parallel = None
        if self.tool_choice is not None:
            kind = self.tool_choice.type
            choice = {"auto": "auto", "any": "required", "none": "none"}.get(kind) or {
                "type": "function",
                "function": {"name": self.tool_choice.name},
            }
            if self.tool_choice.disable_parallel_tool_use:
                parallel = False
        tools = [
            {
                "type": "function",
                "function": {
                    "name": t.name,
                    "description": t.description,
                    "parameters": t.input_schema,
                },
            }
            for t in self.tools or []
        ]
        body = {
            "model": self.model,
            "messages": self.chat_messages(),
            "max_completion_tokens": self.max_tokens,
            "stop": self.stop_sequences,
            "stream": self.stream,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "tools": tools or None,
            "tool_choice": choice,
            "parallel_tool_calls": parallel,
            "user": self.metadata.user_id if self.metadata else None,
        }
        fmt = self.output_config.format if self.output_config is not None else None
        if fmt is not None:
            spec = {"name": "output", "schema": fmt.json_schema}
            body["response_format"] = {"type": "json_schema", "json_schema": spec}
        try:
            return ChatCompletionRequest.model_validate(body)
        except ValidationError as e:
            err = e.errors()[0]
            where = ".".join(str(x) for x in err["loc"])
            raise UnsupportedParameter("messages", f"{where}: {err['msg']}") from None


class CountTokensRequest(MessagesRequest):
    """The body of POST /v1/messages/count_tokens: a Messages request without max_tokens."""

    max_tokens: int = 1  # type: ignore[assignment]


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
    message_id = _new_id("msg")
    stops = list(body.stop_sequences or [])

    def message(content: list[dict], stop: tuple[str | None, str | None], out: Any) -> dict:
        n_out = sum(len(o.token_ids) for o in out.outputs) if out is not None else 0
        return {
            "id": message_id,
            "type": "message",
            "role": "assistant",
            "model": body.model,
            "content": content,
            "stop_reason": stop[0],
            "stop_sequence": stop[1],
            "usage": {
                "input_tokens": run.tracker.prompt_tokens,
                "output_tokens": n_out,
                "cache_read_input_tokens": out.num_cached_tokens if out is not None else 0,
                "cache_creation_input_tokens": 0,
            },
        }

    async def collect() -> dict:
        final, text, calls = await run.reply(serving)
        o = final.outputs[0]
        content = [{"type": "text", "text": text}] if text or not calls else []
        content += [
            {
                "type": "tool_use",
                "id": _new_id("toolu"),
                "name": c.name,
                "input": _tool_input(c.arguments),
            }
            for c in calls
        ]
        return message(content, _stop(o, bool(calls), stops), final)

    async def stream() -> AsyncIterator[str]:
        streamer = run.plan.parser.streamer() if run.plan.parser is not None else None
        blocks: list[str] = []  # the type of each block started
        yield _sse("message_start", {"message": message([], (None, None), None)})
        try:
            async for _, out in serving.merged(run.streams, run.tracker):
                o = out.outputs[0]
                text, calls = new_pieces(streamer, o)
                lines = []
                if text:
                    if not blocks or blocks[-1] != "text":
                        if blocks:
                            lines.append(_sse("content_block_stop", {"index": len(blocks) - 1}))
                        blocks.append("text")
                        start = {"type": "text", "text": ""}
                        lines.append(
                            _sse(
                                "content_block_start",
                                {"index": len(blocks) - 1, "content_block": start},
                            )
                        )
                    delta = {"type": "text_delta", "text": text}
                    lines.append(
                        _sse("content_block_delta", {"index": len(blocks) - 1, "delta": delta})
                    )
                for d in calls:
                    if d.name is not None:
                        if blocks:
                            lines.append(_sse("content_block_stop", {"index": len(blocks) - 1}))
                        blocks.append("tool_use")
                        start = {"type": "tool_use", "id": _new_id("toolu"), "name": d.name}
                        start["input"] = {}
                        lines.append(
                            _sse(
                                "content_block_start",
                                {"index": len(blocks) - 1, "content_block": start},
                            )
                        )
                    if d.arguments:
                        delta = {"type": "input_json_delta", "partial_json": d.arguments}
                        lines.append(
                            _sse("content_block_delta", {"index": len(blocks) - 1, "delta": delta})
                        )
                for line in lines:
                    yield line
                if o.finished:
                    if not blocks:  # an empty reply is still a text block
                        blocks.append("text")
                        start = {"type": "text", "text": ""}
                        yield _sse("content_block_start", {"index": 0, "content_block": start})
                    yield _sse("content_block_stop", {"index": len(blocks) - 1})
                    reason, sequence = _stop(o, "tool_use" in blocks, stops)
                    yield _sse(
                        "message_delta",
                        {
                            "delta": {"stop_reason": reason, "stop_sequence": sequence},
                            "usage": {"output_tokens": len(o.token_ids)},
                        },
                    )
                    yield _sse("message_stop", {})
        except Exception as e:  # noqa: BLE001 - reported in-band, the status is already sent
            error = {"type": "api_error", "message": str(e) or type(e).__name__}
            yield _sse("error", {"error": error})

    return stream() if body.stream else collect()
