"""/v1/chat/completions' body: messages, function tools and the tool choice; and the bodies of
/tokenize (a prompt or chat messages) and /detokenize."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator

from tokenmill.engine.chat_template import RESERVED_VARIABLES
from tokenmill.server.completions_protocol import SamplingRequest
from tokenmill.server.protocol import (
    MAX_LOGPROBS,
    STRICT,
    RequestBody,
    RequestLimits,
    UnsupportedParameter,
    check_metadata,
    reject_kinds,
)

ReasoningEffort = Literal["none", "minimal", "low", "medium", "high"]


class TextPart(BaseModel):
    model_config = STRICT
    type: Literal["text"]
    text: str


class FunctionCall(BaseModel):
    model_config = STRICT
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCallMessage(BaseModel):
    model_config = STRICT
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = STRICT
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallMessage] | None = None  # assistant messages
    tool_call_id: str | None = None  # tool messages
    # an earlier reply's reasoning, as clients send it back (vLLM's name and its older one);
    # given to the template as `reasoning_content`, which Qwen3's and DeepSeek-R1's read
    reasoning: str | None = None
    reasoning_content: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts_only(cls, content: Any) -> Any:
        """Parts of a kind this server does not take (images, audio, files) are named in the
        error instead of failing the text-or-parts union."""
        reject_kinds(content, ("text",), "content", "parts")
        return content

    def as_template_message(self) -> dict[str, Any]:
        content = self.content
        if isinstance(content, list):
            content = "\n".join(part.text for part in content)
        role = "system" if self.role == "developer" else self.role
        msg: dict[str, Any] = {"role": role, "content": content or ""}
        if self.tool_calls:
            msg["tool_calls"] = [c.model_dump() for c in self.tool_calls]
            msg["content"] = content  # null next to tool calls stays null for templates
        if self.tool_call_id is not None:
            msg["tool_call_id"] = self.tool_call_id
        if self.name is not None and role == "tool":
            msg["name"] = self.name
        reasoning = self.reasoning_content if self.reasoning is None else self.reasoning
        if reasoning is not None:
            msg["reasoning_content"] = reasoning
        return msg


class FunctionDefinition(BaseModel):
    model_config = STRICT
    name: str = Field(pattern=r"^[A-Za-z0-9_.\-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None  # the parameters are always enforced under required / named


class ToolDefinition(BaseModel):
    model_config = STRICT
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(BaseModel):
    model_config = STRICT
    name: str


class NamedToolChoice(BaseModel):
    model_config = STRICT
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[ToolDefinition] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None
    add_generation_prompt: bool = True
    # vLLM's: leave the last message open and continue it (needs add_generation_prompt false);
    # the chat template's own variables (e.g. enable_thinking)
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    # vLLM's: with a reasoning parser, false leaves the reasoning out of the reply
    include_reasoning: bool = True
    # OpenAI's: given to the template (`reasoning_variables`)
    reasoning_effort: ReasoningEffort | None = None
    # Accepted for the clients that send them, with no effect here: a local server stores no
    # completions and has one service tier; the cache key, the end-user id and the metadata
    # (OpenAI's limits checked) change nothing; the only output modality is text.
    store: bool | None = None
    metadata: dict[str, str] | None = None
    service_tier: Literal["auto", "default", "flex", "scale", "priority"] | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    modalities: list[str] | None = None

    def check_limits(self, limits: RequestLimits) -> None:
        super().check_limits(limits)
        if len(self.messages) > limits.max_messages:
            raise UnsupportedParameter("messages", f"at most {limits.max_messages} messages")
        if len(self.tools or []) > limits.max_tools:
            raise UnsupportedParameter("tools", f"at most {limits.max_tools} tools")

    def check_supported(self) -> None:
        super().check_supported()
        taken = sorted(RESERVED_VARIABLES.intersection(self.chat_template_kwargs or {}))
        if taken:
            raise UnsupportedParameter(
                "chat_template_kwargs", f"chat_template_kwargs may not set {', '.join(taken)}"
            )
        if self.continue_final_message and self.add_generation_prompt:
            raise UnsupportedParameter(
                "continue_final_message",
                "continue_final_message needs add_generation_prompt false",
            )
        if any(m != "text" for m in self.modalities or []):
            raise UnsupportedParameter("modalities", 'only the "text" modality is supported')
        check_metadata(self.metadata)
        for name in ("functions", "function_call"):
            if getattr(self, name):
                raise UnsupportedParameter(
                    name, f"{name} is deprecated and not supported; use tools and tool_choice"
                )
        names = [t.function.name for t in self.tools or []]
        if len(set(names)) != len(names):
            raise UnsupportedParameter("tools", "tool function names must be unique")
        choice = self.tool_choice
        if choice not in (None, "none") and not names:
            raise UnsupportedParameter("tool_choice", "tool_choice needs tools")
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            raise UnsupportedParameter(
                "tool_choice", f"tool_choice names {choice.function.name!r}, which is not in tools"
            )
        if (
            choice == "required" or isinstance(choice, NamedToolChoice)
        ) and self.structured_spec() is not None:
            raise UnsupportedParameter(
                "tool_choice",
                "tool_choice required or named cannot be combined with another output constraint",
            )
        if self.top_logprobs is not None:
            if not self.logprobs:
                raise UnsupportedParameter("top_logprobs", "top_logprobs requires logprobs=true")
            if not 0 <= self.top_logprobs <= MAX_LOGPROBS:
                raise UnsupportedParameter(
                    "top_logprobs", f"top_logprobs must be in [0, {MAX_LOGPROBS}]"
                )

    def reasoning_variables(self) -> dict[str, Any]:
        """The template variables `reasoning_effort` asks for: itself (vLLM passes it on so,
        for gpt-oss) and `enable_thinking` (Qwen3's), false for "none" and "minimal";
        `chat_template_kwargs` setting either wins."""
        effort = self.reasoning_effort
        if effort is None:
            return {}
        return {"reasoning_effort": effort, "enable_thinking": effort not in ("none", "minimal")}

    def requested_tokens(self) -> int | None:
        return self.effective_max_tokens()

    def effective_max_tokens(self) -> int | None:
        return (
            self.max_completion_tokens
            if self.max_completion_tokens is not None
            else self.max_tokens
        )

    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class TokenizeRequest(RequestBody):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None


class DetokenizeRequest(RequestBody):
    model: str | None = None
    tokens: list[int]
