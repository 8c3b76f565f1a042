"""/v1/responses: OpenAI's Responses API, served by the chat path.

A request's `instructions` and `input` items become a chat conversation (messages, assistant
function calls, their results), its function tools, `tool_choice` and `text.format` the chat
request's tools and response_format; `streams.start_chat` renders, constrains and queues it as
for /v1/chat/completions. The output is a list of items: the assistant's message (one
`output_text` part) and the function calls the tool parser found. Streamed, the same items
arrive as OpenAI's typed events, `response.created` to `response.completed` (or
`response.incomplete` when `max_output_tokens` cut the output, `response.failed` on an error).

With `store` (OpenAI's default) a finished response is kept in memory, in a store bounded in
count and bytes that drops the oldest: `previous_response_id` then continues its conversation
(its messages and output, without its `instructions`, as OpenAI does), and GET / DELETE
/v1/responses/{id} read and remove it. Nothing is kept across restarts.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Coroutine
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tokenmill.outputs import CompletionOutput, RequestOutput
from tokenmill.server.handlers import ContextLengthError, OpenAIServing, chat_logprobs
from tokenmill.server.protocol import (
    MAX_LOGPROBS,
    ChatCompletionRequest,
    FunctionDefinition,
    RequestBody,
    RequestLimits,
    UnsupportedParameter,
    check_metadata,
    reject_kinds,
)
from tokenmill.server.streams import ChatRun, new_pieces, start_chat
from tokenmill.server.tools import new_call_id

_STRICT = ConfigDict(extra="forbid", allow_inf_nan=False, populate_by_name=True)
LOGPROBS_INCLUDE = "message.output_text.logprobs"  # the one `include` value with a meaning here
# `include` values about items this server never produces (hosted tools' results, images,
# reasoning): accepted, and vacuously honoured (clients such as Codex send
# "reasoning.encrypted_content" whatever the model)
VACUOUS_INCLUDES = (
    "file_search_call.results",
    "web_search_call.results",
    "web_search_call.action.sources",
    "message.input_image.image_url",
    "computer_call_output.output.image_url",
    "code_interpreter_call.outputs",
    "reasoning.encrypted_content",
)
MAX_STORED_RESPONSES = 1024  # the store's bounds: responses, and bytes of their JSON
MAX_STORED_BYTES = 256 << 20
ITEM_TYPES = ("message", "function_call", "function_call_output")
PART_TYPES = ("input_text", "output_text")


# ---- the request ---------------------------------------------------------------------------
class TextPart(BaseModel):
    """A text part of an input message: `input_text`, or an earlier output's `output_text`
    sent back (its annotations and logprobs are accepted and ignored)."""

    model_config = _STRICT
    type: Literal["input_text", "output_text"]
    text: str
    annotations: list[Any] | None = None
    logprobs: list[Any] | None = None


class MessageItem(BaseModel):
    model_config = _STRICT
    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: str | list[TextPart]
    id: str | None = None
    status: Literal["in_progress", "completed", "incomplete"] | None = None
    phase: str | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class FunctionCallItem(BaseModel):
    model_config = _STRICT
    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str  # JSON text
    id: str | None = None
    status: Literal["in_progress", "completed", "incomplete"] | None = None


class FunctionCallOutputItem(BaseModel):
    model_config = _STRICT
    type: Literal["function_call_output"]
    call_id: str
    output: str | list[TextPart]
    id: str | None = None
    status: Literal["in_progress", "completed", "incomplete"] | None = None

    def text(self) -> str:
        if isinstance(self.output, str):
            return self.output
        return "".join(part.text for part in self.output)


InputItem = Annotated[
    MessageItem | FunctionCallItem | FunctionCallOutputItem, Field(discriminator="type")
]


class FunctionTool(BaseModel):
    """A function tool, in the Responses API's flat shape (hosted tools are not served)."""

    model_config = _STRICT
    type: Literal["function"]
    name: str = Field(pattern=r"^[A-Za-z0-9_.\-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    def as_chat_tool(self) -> dict[str, Any]:
        fields = self.model_dump(exclude={"type"}, exclude_none=True)
        return {"type": "function", "function": FunctionDefinition(**fields).model_dump()}


class FunctionToolChoice(BaseModel):
    model_config = _STRICT
    type: Literal["function"]
    name: str


class TextFormat(BaseModel):
    model_config = _STRICT
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    json_schema: dict[str, Any] | None = Field(None, alias="schema")
    description: str | None = None
    strict: bool | None = None  # the schema is always enforced


class TextConfig(BaseModel):
    model_config = _STRICT
    format: TextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = None


class Reasoning(BaseModel):
    model_config = _STRICT
    effort: str | None = None
    summary: str | None = None
    generate_summary: str | None = None


class ResponsesStreamOptions(BaseModel):
    model_config = _STRICT
    include_obfuscation: bool | None = None  # nothing is obfuscated here


class ResponsesRequest(RequestBody):
    """The body of POST /v1/responses. Fields that cannot be honoured here (hosted tools,
    reasoning, background runs, a verbosity other than the default) are a
    400 naming them; `store`, `metadata` and the like are kept or accepted."""

    model: str
    input: str | list[InputItem]
    instructions: str | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = None
    top_p: float | None = None
    stream: bool = False
    stream_options: ResponsesStreamOptions | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | FunctionToolChoice | None = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    include: list[str] | None = None
    store: bool | None = None  # None: OpenAI's default, true
    previous_response_id: str | None = None
    metadata: dict[str, str] | None = None
    truncation: Literal["auto", "disabled"] | None = None
    background: bool | None = None
    max_tool_calls: int | None = None
    reasoning: Reasoning | None = None
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    service_tier: Literal["auto", "default", "flex", "scale", "priority"] | None = None
    # tokenmill / vLLM sampling extensions, as in the chat endpoint
    seed: int | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None

    @model_validator(mode="before")
    @classmethod
    def _typed_items(cls, data: Any) -> Any:
        """An input item without a `type` is a message (the API's "easy" input message); an
        item or content part of a kind not served (images, files, hosted tools' items) is
        named in the error."""
        if not isinstance(data, dict) or not isinstance(data.get("input"), list):
            return data
        items = [
            {**item, "type": "message"}
            if isinstance(item, dict) and "type" not in item and "role" in item
            else item
            for item in data["input"]
        ]
        reject_kinds(items, ITEM_TYPES, "input", "items")
        for i, item in enumerate(items):
            if isinstance(item, dict) and item.get("type") == "message":
                reject_kinds(item.get("content"), PART_TYPES, f"input.{i}.content", "parts")
        return {**data, "input": items}

    @property
    def stores(self) -> bool:
        return self.store is not False

    @property
    def logprobs(self) -> bool:
        return LOGPROBS_INCLUDE in (self.include or []) or self.top_logprobs is not None

    def check_limits(self, limits: RequestLimits) -> None:
        """The request's own counts; the chat request it becomes is checked in full later."""
        items = 1 if isinstance(self.input, str) else len(self.input)
        if items > limits.max_messages:
            raise UnsupportedParameter("input", f"at most {limits.max_messages} input items")
        if len(self.tools or []) > limits.max_tools:
            raise UnsupportedParameter("tools", f"at most {limits.max_tools} tools")

    def check_supported(self) -> None:
        def reject(param: str, what: str) -> None:
            raise UnsupportedParameter(param, f"{what} is not supported")

        if self.background:
            reject("background", "background: true")
        if self.max_tool_calls is not None:
            reject("max_tool_calls", "max_tool_calls")
        if self.reasoning is not None and any(self.reasoning.model_dump().values()):
            reject("reasoning", "reasoning (this server runs no reasoning models)")
        if self.text is not None and self.text.verbosity not in (None, "medium"):
            reject("text", "text.verbosity other than medium")
        unknown = sorted(set(self.include or []) - {LOGPROBS_INCLUDE, *VACUOUS_INCLUDES})
        if unknown:
            raise UnsupportedParameter("include", f"include: unknown value(s) {unknown}")
        if self.stream_options is not None and not self.stream:
            raise UnsupportedParameter(
                "stream_options", "stream_options is only allowed when stream is true"
            )
        check_metadata(self.metadata)

    def input_items(self) -> list[dict[str, Any]]:
        """The input as OpenAI lists it back: typed items, each with an id (given, or new)."""
        given = (
            [MessageItem(role="user", content=self.input)]
            if isinstance(self.input, str)
            else self.input
        )
        prefixes = {"message": "msg", "function_call": "fc", "function_call_output": "fco"}
        items = []
        for item in given:
            data = item.model_dump(exclude_none=True)
            if isinstance(item, MessageItem) and isinstance(item.content, str):
                kind = "output_text" if item.role == "assistant" else "input_text"
                data["content"] = [{"type": kind, "text": item.content}]
            data.setdefault("id", _new_id(prefixes[item.type]))
            data.setdefault("status", "completed")
            items.append(data)
        return items

    def messages(self, history: list[dict[str, Any]] = ()) -> list[dict[str, Any]]:
        """The input items as chat messages: function calls join the assistant message before
        them (one turn), a call's output becomes a `tool` message naming its function (called
        in the input or in the `history` it follows)."""
        if isinstance(self.input, str):
            return [{"role": "user", "content": self.input}]
        messages: list[dict[str, Any]] = []
        names = {  # call_id -> function name
            c["id"]: c["function"]["name"] for m in history for c in m.get("tool_calls") or []
        }
        for item in self.input:
            if isinstance(item, MessageItem):
                messages.append({"role": item.role, "content": item.text()})
            elif isinstance(item, FunctionCallItem):
                names[item.call_id] = item.name
                call = {
                    "id": item.call_id,
                    "type": "function",
                    "function": {"name": item.name, "arguments": item.arguments},
                }
                last = messages[-1] if messages else None
                if last is not None and last["role"] == "assistant":
                    last.setdefault("tool_calls", []).append(call)
                    last["content"] = last["content"] or None
                else:
                    messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
            else:
                tool = {"role": "tool", "tool_call_id": item.call_id, "content": item.text()}
                if item.call_id in names:
                    tool["name"] = names[item.call_id]
                messages.append(tool)
        return messages

    def chat_request(self, history: list[dict[str, Any]]) -> ChatCompletionRequest:
        """The chat request this one is: `history` (a stored conversation) and the input,
        after the instructions as a system message."""
        messages = [{"role": "system", "content": self.instructions}] if self.instructions else []
        messages += history + self.messages(history)
        if not messages:
            raise UnsupportedParameter("input", "input is empty")
        choice: Any = self.tool_choice
        if isinstance(choice, FunctionToolChoice):
            choice = {"type": "function", "function": {"name": choice.name}}
        fmt = self.text.format if self.text is not None else None
        response_format: dict[str, Any] | None = None
        if fmt is not None and fmt.type == "json_object":
            response_format = {"type": "json_object"}
        elif fmt is not None and fmt.type == "json_schema":
            if fmt.json_schema is None:
                raise UnsupportedParameter("text", "text.format json_schema needs a schema")
            spec = {"name": fmt.name or "response", "schema": fmt.json_schema}
            response_format = {"type": "json_schema", "json_schema": spec}
        body: dict[str, Any] = {
            "model": self.model,
            "messages": messages,
            "max_completion_tokens": self.max_output_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "stream": self.stream,
            "tools": [t.as_chat_tool() for t in self.tools] if self.tools else None,
            "tool_choice": choice,
            "parallel_tool_calls": self.parallel_tool_calls,
            "response_format": response_format,
            "logprobs": self.logprobs,
            "top_logprobs": (self.top_logprobs or 0) if self.logprobs else None,
            "seed": self.seed,
            "top_k": self.top_k,
            "min_p": self.min_p,
            "repetition_penalty": self.repetition_penalty,
            "user": self.user,
        }
        try:
            return ChatCompletionRequest.model_validate(body)
        except ValidationError as e:  # a stored conversation or item the chat path refuses
            err = e.errors()[0]
            raise UnsupportedParameter("input", f"input: {err['msg']}") from None


def without_oldest_turn(chat: ChatCompletionRequest) -> ChatCompletionRequest | None:
    """`truncation: "auto"`: the conversation without its oldest turn (a user message and
    what follows it up to the next one; system messages stay), or None when only the last
    turn is left."""
    messages = chat.messages
    first = next((i for i, m in enumerate(messages) if m.role not in ("system", "developer")), None)
    if first is None:
        return None
    nxt = next((i for i in range(first + 1, len(messages)) if messages[i].role == "user"), None)
    if nxt is None:
        return None
    return chat.model_copy(update={"messages": messages[:first] + messages[nxt:]})


# Chat parameters named as the Responses API names them, in errors.
_PARAMS = {
    "messages": "input",
    "max_tokens": "max_output_tokens",
    "max_completion_tokens": "max_output_tokens",
    "response_format": "text",
}


def _renamed(e: UnsupportedParameter) -> UnsupportedParameter:
    return UnsupportedParameter(_PARAMS.get(e.param, e.param), str(e))


# ---- the store -----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class StoredResponse:
    response: dict[str, Any]  # the response object, as returned
    messages: list[dict[str, Any]]  # its conversation without instructions, output included
    input_items: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # with ids

    def size(self) -> int:
        """Its bytes as JSON, a measure of the memory it holds."""
        return len(json.dumps([self.response, self.messages, self.input_items]))

    def list_items(self, limit: int, order: str, after: str | None) -> dict[str, Any]:
        """OpenAI's list of the request's input items: `limit` of them in `order` (desc:
        newest first), after the item with id `after`."""
        items = self.input_items if order == "asc" else self.input_items[::-1]
        if after is not None:
            ids = [item["id"] for item in items]
            if after not in ids:
                raise UnsupportedParameter("after", f"no input item has id {after!r}")
            items = items[ids.index(after) + 1 :]
        page = items[:limit]
        return {
            "object": "list",
            "data": page,
            "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None,
            "has_more": len(items) > len(page),
        }


class ResponseStore:
    """Finished responses by id, in memory: at most `capacity` of them and `max_bytes` of
    their JSON (a long conversation is stored whole in each of its turns), the oldest dropped
    first. A response larger than `max_bytes` alone is not kept."""

    def __init__(
        self, capacity: int = MAX_STORED_RESPONSES, max_bytes: int = MAX_STORED_BYTES
    ) -> None:
        self.capacity = capacity
        self.max_bytes = max_bytes
        self._items: collections.OrderedDict[str, tuple[StoredResponse, int]] = (
            collections.OrderedDict()
        )
        self._bytes = 0
        self._lock = threading.Lock()

    def put(self, response_id: str, stored: StoredResponse) -> None:
        size = stored.size()
        if size > self.max_bytes:
            return
        with self._lock:
            self._items[response_id] = (stored, size)
            self._bytes += size
            while len(self._items) > self.capacity or self._bytes > self.max_bytes:
                _, (_, dropped) = self._items.popitem(last=False)
                self._bytes -= dropped

    def get(self, response_id: str) -> StoredResponse | None:
        with self._lock:
            entry = self._items.get(response_id)
        return None if entry is None else entry[0]

    def delete(self, response_id: str) -> bool:
        with self._lock:
            entry = self._items.pop(response_id, None)
            if entry is not None:
                self._bytes -= entry[1]
        return entry is not None


# ---- the response --------------------------------------------------------------------------
def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def _message_item(status: str) -> dict[str, Any]:
    return {
        "id": _new_id("msg"),
        "type": "message",
        "status": status,
        "role": "assistant",
        "content": [],
    }


def _text_part(text: str, logprobs: list | None) -> dict[str, Any]:
    part: dict[str, Any] = {"type": "output_text", "text": text, "annotations": []}
    if logprobs is not None:
        part["logprobs"] = logprobs
    return part


def _call_item(name: str, arguments: str, status: str) -> dict[str, Any]:
    return {
        "id": _new_id("fc"),
        "type": "function_call",
        "status": status,
        "call_id": new_call_id(),
        "name": name,
        "arguments": arguments,
    }


def _assistant_message(output: list[dict[str, Any]]) -> dict[str, Any]:
    """The output items as the chat message a later turn replays."""
    text = "".join(
        p["text"] for item in output if item["type"] == "message" for p in item["content"]
    )
    calls = [
        {
            "id": item["call_id"],
            "type": "function",
            "function": {"name": item["name"], "arguments": item["arguments"]},
        }
        for item in output
        if item["type"] == "function_call"
    ]
    message: dict[str, Any] = {"role": "assistant", "content": text or (None if calls else "")}
    if calls:
        message["tool_calls"] = calls
    return message


class _Events:
    """The SSE lines of a response stream: each event named in an `event:` line and typed in
    its data, numbered from 0."""

    def __init__(self) -> None:
        self.sequence = 0

    def __call__(self, type_: str, **fields: Any) -> str:
        data = {"type": type_, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return f"event: {type_}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


class _StreamedItems:
    """The output items of a streamed response, built from text and tool-call pieces in order:
    text opens a message item if the open item is not one, a named call piece opens a
    function_call item, and opening an item closes the one before. Each method returns the
    events it implies."""

    def __init__(self, events: _Events) -> None:
        self.events = events
        self.output: list[dict[str, Any]] = []
        self.open: dict[str, Any] | None = None

    def _add(self, item: dict[str, Any]) -> list[str]:
        lines = self.close("completed")
        self.output.append(item)
        self.open = item
        lines.append(
            self.events(
                "response.output_item.added", output_index=len(self.output) - 1, item=dict(item)
            )
        )
        return lines

    def _where(self) -> dict[str, Any]:
        assert self.open is not None
        return {"item_id": self.open["id"], "output_index": len(self.output) - 1}

    def text(self, delta: str, logprobs: list | None) -> list[str]:
        lines: list[str] = []
        if self.open is None or self.open["type"] != "message":
            lines += self._add(_message_item("in_progress"))
            part = _text_part("", [] if logprobs is not None else None)
            lines.append(
                self.events(
                    "response.content_part.added", **self._where(), content_index=0, part=part
                )
            )
            self.open["part"] = part
        part = self.open["part"]
        part["text"] += delta
        if logprobs is not None:
            part["logprobs"] += logprobs
        lines.append(
            self.events(
                "response.output_text.delta",
                **self._where(),
                content_index=0,
                delta=delta,
                logprobs=logprobs or [],
            )
        )
        return lines

    def call(self, name: str | None, arguments: str) -> list[str]:
        lines = self._add(_call_item(name, "", "in_progress")) if name is not None else []
        assert self.open is not None and self.open["type"] == "function_call"
        self.open["arguments"] += arguments
        if arguments:
            lines.append(
                self.events(
                    "response.function_call_arguments.delta", **self._where(), delta=arguments
                )
            )
        return lines

    def close(self, status: str) -> list[str]:
        """Finish the open item (if any) with `status`."""
        item, lines = self.open, []
        if item is None:
            return lines
        where = self._where()
        if item["type"] == "message":
            part = item.pop("part")
            lines.append(
                self.events(
                    "response.output_text.done",
                    **where,
                    content_index=0,
                    text=part["text"],
                    logprobs=part.get("logprobs") or [],
                )
            )
            lines.append(
                self.events("response.content_part.done", **where, content_index=0, part=part)
            )
            item["content"] = [part]
        else:
            lines.append(
                self.events(
                    "response.function_call_arguments.done",
                    **where,
                    name=item["name"],
                    arguments=item["arguments"],
                )
            )
        item["status"] = status
        lines.append(
            self.events("response.output_item.done", output_index=where["output_index"], item=item)
        )
        self.open = None
        return lines


async def responses_response(
    serving: OpenAIServing, body: ResponsesRequest, store: ResponseStore, limits: RequestLimits
) -> AsyncIterator[str] | Coroutine[Any, Any, dict]:
    """Validate and queue a Responses request (raising before any byte is sent), then return
    the coroutine of its response object or the async generator of its events."""
    body.check_supported()
    history: list[dict[str, Any]] = []
    if body.previous_response_id is not None:
        previous = store.get(body.previous_response_id)
        if previous is None:
            raise UnsupportedParameter(
                "previous_response_id",
                f"Previous response with id '{body.previous_response_id}' not found "
                f"(responses are kept in memory, the newest {store.capacity} up to "
                f"{store.max_bytes >> 20} MiB, and only with store: true).",
            )
        history = previous.messages
    try:
        chat = body.chat_request(history)
        chat.check_limits(limits)
        while True:
            try:
                run: ChatRun = await start_chat(serving, chat, "resp")
                break
            except ContextLengthError:
                shorter = without_oldest_turn(chat) if body.truncation == "auto" else None
                if shorter is None:
                    raise
                chat = shorter
    except UnsupportedParameter as e:
        raise _renamed(e) from None
    except ContextLengthError as e:
        raise ContextLengthError(str(e), "max_output_tokens") from None
    response_id = _new_id("resp")
    created = int(time.time())
    tok = serving.tokenizer
    k = body.top_logprobs or 0
    conversation = [m for m in chat.model_dump(exclude_none=True)["messages"]]
    if body.instructions:
        conversation = conversation[1:]

    def response_object(
        status: str,
        output: list[dict[str, Any]],
        final: RequestOutput | None,
        error: str | None = None,
    ) -> dict[str, Any]:
        n_out = sum(len(o.token_ids) for o in final.outputs) if final is not None else 0
        fmt = body.text.format if body.text is not None and body.text.format else None
        choice = body.tool_choice
        return {
            "id": response_id,
            "object": "response",
            "created_at": created,
            "status": status,
            "background": False,
            "error": None if error is None else {"code": "server_error", "message": error},
            "incomplete_details": {"reason": "max_output_tokens"}
            if status == "incomplete"
            else None,
            "instructions": body.instructions,
            "max_output_tokens": body.max_output_tokens,
            "max_tool_calls": None,
            "metadata": body.metadata or {},
            "model": body.model,
            "output": output,
            "parallel_tool_calls": body.parallel_tool_calls is not False,
            "previous_response_id": body.previous_response_id,
            "reasoning": {"effort": None, "summary": None},
            "service_tier": "default",
            "store": body.stores,
            "temperature": 1.0 if body.temperature is None else body.temperature,
            "text": {
                "format": fmt.model_dump(by_alias=True, exclude_none=True)
                if fmt
                else {"type": "text"}
            },
            "tool_choice": choice.model_dump()
            if isinstance(choice, FunctionToolChoice)
            else (choice or "auto"),
            "tools": [t.model_dump() for t in body.tools or []],
            "top_logprobs": body.top_logprobs,
            "top_p": 1.0 if body.top_p is None else body.top_p,
            "truncation": body.truncation or "disabled",
            "usage": None
            if final is None
            else {
                "input_tokens": run.tracker.prompt_tokens,
                "input_tokens_details": {"cached_tokens": final.num_cached_tokens},
                "output_tokens": n_out,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": run.tracker.prompt_tokens + n_out,
            },
            "user": body.user,
        }

    def finish(o: CompletionOutput, output: list[dict[str, Any]], final: RequestOutput) -> dict:
        """The final response object; stored when asked for."""
        status = "incomplete" if o.finish_reason == "length" else "completed"
        response = response_object(status, output, final)
        if body.stores:
            messages = conversation + [_assistant_message(output)]
            store.put(response_id, StoredResponse(response, messages, body.input_items()))
        return response

    def logprobs(o: CompletionOutput, start: int) -> list | None:
        lp = chat_logprobs(o, tok, k, start) if body.logprobs else None
        return None if lp is None else lp["content"]

    async def collect() -> dict:
        final, content, calls = await run.reply(serving)
        o = final.outputs[0]
        status = "incomplete" if o.finish_reason == "length" else "completed"
        output = []
        if content or not calls:
            message = _message_item(status)
            message["content"] = [_text_part(content, logprobs(o, 0))]
            output.append(message)
        output += [_call_item(c.name, c.arguments, "completed") for c in calls]
        return finish(o, output, final)

    async def stream() -> AsyncIterator[str]:
        events = _Events()
        items = _StreamedItems(events)
        streamer = run.plan.parser.streamer() if run.plan.parser is not None else None
        yield events("response.created", response=response_object("in_progress", [], None))
        yield events("response.in_progress", response=response_object("in_progress", [], None))
        try:
            async for _, out in serving.merged(run.streams, run.tracker):
                o = out.outputs[0]
                start = len(o.token_ids) - len(o.delta_token_ids)
                lp = logprobs(o, start)
                content, calls = new_pieces(streamer, o)
                if content or (lp and streamer is None):
                    for line in items.text(content, lp):
                        yield line
                for d in calls:
                    for line in items.call(d.name, d.arguments):
                        yield line
                if o.finished:
                    status = "incomplete" if o.finish_reason == "length" else "completed"
                    if not items.output:  # an empty reply is still a message
                        for line in items.text("", [] if lp is not None else None):
                            yield line
                    for line in items.close(status):
                        yield line
                    response = finish(o, items.output, out)
                    yield events(f"response.{response['status']}", response=response)
        except Exception as e:  # noqa: BLE001 - reported in-band, the status is already sent
            for line in items.close("incomplete"):
                yield line
            failed = response_object("failed", items.output, None, str(e) or type(e).__name__)
            yield events("response.failed", response=failed)

    return stream() if body.stream else collect()
