"""The body of /v1/messages (Anthropic's Messages API: messages and their content blocks, tools,
tool_choice, output format) and of /v1/messages/count_tokens, and their translation to the chat
request that serves them (`MessagesRequest.chat_request`)."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tokenmill.server.chat_protocol import ChatCompletionRequest
from tokenmill.server.protocol import (
    RequestBody,
    RequestLimits,
    UnsupportedParameter,
    reject_kinds,
)

_STRICT = ConfigDict(extra="forbid", allow_inf_nan=False)
BLOCK_TYPES = ("text", "tool_use", "tool_result", "thinking", "redacted_thinking")


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


class ThinkingBlock(BaseModel):
    """An earlier reply's reasoning sent back (its signature is not checked; a redacted one
    carries none readable and is dropped)."""

    model_config = _STRICT
    type: Literal["thinking", "redacted_thinking"]
    thinking: str | None = None
    signature: str | None = None
    data: str | None = None  # redacted_thinking's
    cache_control: dict[str, Any] | None = None


Block = Annotated[
    TextBlock | ToolUseBlock | ToolResultBlock | ThinkingBlock, Field(discriminator="type")
]


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
    """Whether the model thinks: given to the chat template as `enable_thinking` (Qwen3's
    templates read it; models that always or never think ignore it). The budget is not
    enforced: thinking counts against max_tokens as a whole."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)
    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: int | None = None


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
        """Content blocks of a kind not served (images, documents, server tools)
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
                thinking = [b.thinking for b in blocks if isinstance(b, ThinkingBlock)]
                if any(t is not None for t in thinking):
                    message["reasoning_content"] = "".join(t for t in thinking if t)
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
        disable_parallel_tool_use -> parallel_tool_calls false), `thinking` as the template's
        `enable_thinking`, and the sampling options."""
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
        if self.thinking is not None:
            body["chat_template_kwargs"] = {"enable_thinking": self.thinking.type != "disabled"}
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
