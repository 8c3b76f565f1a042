"""The body of POST /v1/responses (OpenAI's Responses API): its input items, function tools,
tool choice and text format, the checks of what is served here, and its translation to the chat
request that serves it (responses.py)."""

from __future__ import annotations

import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tokenmill.server.chat_protocol import (
    ChatCompletionRequest,
    FunctionDefinition,
    ReasoningEffort,
)
from tokenmill.server.protocol import (
    MAX_LOGPROBS,
    RequestBody,
    RequestLimits,
    UnsupportedParameter,
    check_metadata,
    reject_kinds,
)

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
ITEM_TYPES = ("message", "function_call", "function_call_output", "reasoning")
PART_TYPES = ("input_text", "output_text")


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


class ReasoningText(BaseModel):
    model_config = _STRICT
    type: Literal["reasoning_text", "summary_text"]
    text: str


class ReasoningItem(BaseModel):
    """An earlier reply's reasoning sent back: its text becomes the next assistant turn's
    reasoning for the template (encrypted content, which only its issuer reads, is dropped)."""

    model_config = _STRICT
    type: Literal["reasoning"]
    summary: list[ReasoningText] = []
    content: list[ReasoningText] | None = None
    encrypted_content: str | None = None
    id: str | None = None
    status: Literal["in_progress", "completed", "incomplete"] | None = None

    def text(self) -> str:
        return "".join(part.text for part in self.content or [])


InputItem = Annotated[
    MessageItem | FunctionCallItem | FunctionCallOutputItem | ReasoningItem,
    Field(discriminator="type"),
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
    """`effort` is the chat request's `reasoning_effort` (template variables); no summary is
    written (the reasoning item carries the reasoning itself), so `summary` changes nothing."""

    model_config = _STRICT
    effort: ReasoningEffort | None = None
    summary: Literal["auto", "concise", "detailed"] | None = None
    generate_summary: Literal["auto", "concise", "detailed"] | None = None


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
        prefixes = {
            "message": "msg",
            "function_call": "fc",
            "function_call_output": "fco",
            "reasoning": "rs",
        }
        items = []
        for item in given:
            data = item.model_dump(exclude_none=True)
            if isinstance(item, MessageItem) and isinstance(item.content, str):
                kind = "output_text" if item.role == "assistant" else "input_text"
                data["content"] = [{"type": kind, "text": item.content}]
            data.setdefault("id", new_id(prefixes[item.type]))
            data.setdefault("status", "completed")
            items.append(data)
        return items

    def messages(self, history: list[dict[str, Any]] = ()) -> list[dict[str, Any]]:
        """The input items as chat messages: function calls join the assistant message before
        them (one turn), a call's output becomes a `tool` message naming its function (called
        in the input or in the `history` it follows), a reasoning item's text the reasoning of
        the assistant turn after it."""
        if isinstance(self.input, str):
            return [{"role": "user", "content": self.input}]
        messages: list[dict[str, Any]] = []
        names = {  # call_id -> function name
            c["id"]: c["function"]["name"] for m in history for c in m.get("tool_calls") or []
        }
        reasoning = None  # a reasoning item's text, for the assistant turn after it
        for item in self.input:
            if isinstance(item, ReasoningItem):
                reasoning = item.text()
                continue
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
            if reasoning is not None and messages[-1]["role"] == "assistant":
                messages[-1]["reasoning_content"], reasoning = reasoning, None
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
            "reasoning_effort": self.reasoning.effort if self.reasoning is not None else None,
        }
        try:
            return ChatCompletionRequest.model_validate(body)
        except ValidationError as e:  # a stored conversation or item the chat path refuses
            err = e.errors()[0]
            raise UnsupportedParameter("input", f"input: {err['msg']}") from None


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"
