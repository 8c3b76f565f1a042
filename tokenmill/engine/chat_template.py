"""Chat templates: Hugging Face's jinja2 templates rendered in a sandbox.

Every failure (syntax error, `raise_exception()`, a sandbox violation, bad messages) is a
ChatTemplateError with a message meant for the user.

Tool use: messages may be OpenAI-shaped assistant messages with `tool_calls` and `tool` results;
templates see each call's `function.arguments` parsed into a dict (as HF templates expect). A
template that does not read `tools` (`template_supports_tools`) can still render such a
conversation after `apply_tool_fallback`, which describes the tools in the system prompt and
writes calls and results as text in the hermes format (`tool_parsers` reads the replies).
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Mapping
from datetime import datetime
from functools import lru_cache
from typing import Any, ClassVar, NoReturn

import jinja2
from jinja2 import meta, nodes
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment

from tokenmill.errors import ChatTemplateError

RENDER_TIMEOUT_S = 5.0  # default wall-clock limit on rendering one conversation


def _raise_exception(message: str) -> NoReturn:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # jinja's own tojson HTML-escapes; templates expect plain JSON
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _GenerationTag(Extension):
    """`{% generation %}...{% endgeneration %}` (marks assistant text in HF templates): a no-op."""

    tags: ClassVar[set[str]] = {"generation"}

    def parse(self, parser: Any) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


_render_deadline = threading.local()  # .at: time.monotonic() deadline of this thread's render


class _TimedSandbox(ImmutableSandboxedEnvironment):
    """The sandbox, plus a wall-clock limit: every attribute or item access and every call a
    template makes checks this thread's render deadline, so no loop runs past it."""

    @staticmethod
    def _check_deadline() -> None:
        at = getattr(_render_deadline, "at", None)
        if at is not None and time.monotonic() > at:
            raise jinja2.exceptions.TemplateError("rendering took longer than its time limit")

    def getattr(self, obj: Any, attribute: str) -> Any:
        self._check_deadline()
        return super().getattr(obj, attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        self._check_deadline()
        return super().getitem(obj, argument)

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        __self._check_deadline()
        return super().call(__context, __obj, *args, **kwargs)


@lru_cache(maxsize=1)
def _jinja_env() -> ImmutableSandboxedEnvironment:
    env = _TimedSandbox(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols", _GenerationTag]
    )
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now)
    return env


@lru_cache(maxsize=16)
def _compile_template(source: str) -> jinja2.Template:
    try:
        return _jinja_env().from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(
            f"chat template has a syntax error (line {e.lineno}): {e.message}"
        ) from None
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"chat template cannot be compiled: {e}") from None


def check_chat_template(source: str) -> None:
    """ChatTemplateError (naming the line) when `source` does not compile."""
    _compile_template(source)


def read_chat_template(value: str) -> str:
    """A chat template option's template: the file it names, or the value itself."""
    if os.path.isfile(value):
        with open(value, encoding="utf-8") as f:
            return f.read()
    return value


def _message_content(content: Any, index: int) -> str | None:
    """A message's content as a string: text parts ({"type": "text", "text": ...}) joined by \\n."""
    if content is None or isinstance(content, str):
        return content
    if not isinstance(content, (list, tuple)):
        raise ChatTemplateError(f"messages[{index}]['content'] must be a string or a list of parts")
    texts = []
    for part in content:
        if not isinstance(part, Mapping) or part.get("type") != "text":
            kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
            raise ChatTemplateError(f"messages[{index}] has an unsupported content part: {kind!r}")
        if not isinstance(part.get("text"), str):
            raise ChatTemplateError(f"messages[{index}] has a text part without a 'text' string")
        texts.append(part["text"])
    return "\n".join(texts)


def _tool_call(call: Any, where: str) -> dict[str, Any]:
    """An OpenAI tool call ({"id", "type": "function", "function": {"name", "arguments"}}) copied
    with its arguments (a JSON object's text, or already a dict) parsed into a dict."""
    if not isinstance(call, Mapping) or not isinstance(call.get("function"), Mapping):
        raise ChatTemplateError(
            f"{where} must be {{'type': 'function', 'function': {{'name': ..., 'arguments': ...}}}}"
        )
    if call.get("type", "function") != "function":
        raise ChatTemplateError(f"{where} has type {call['type']!r}; only 'function' is supported")
    function = call["function"]
    if not isinstance(function.get("name"), str) or not function["name"]:
        raise ChatTemplateError(f"{where}['function'] has no 'name' string")
    arguments = function.get("arguments")
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError as e:
            raise ChatTemplateError(
                f"{where}['function']['arguments'] is not valid JSON: {e}"
            ) from None
    if not isinstance(arguments, Mapping):
        raise ChatTemplateError(
            f"{where}['function']['arguments'] must be a JSON object (as a string)"
        )
    return {**call, "function": {**function, "arguments": dict(arguments)}}


def validate_messages(messages: Any) -> list[dict[str, Any]]:
    """Check chat messages and return copies whose content is a plain string (or None).

    Any non-empty role is accepted. An assistant message may carry OpenAI `tool_calls` (its
    content may then be null or absent); the copies' calls have `function.arguments` parsed
    into a dict, and arguments that are not a JSON object's text are a ChatTemplateError. A
    `tool` message (a call's result) needs content; its `tool_call_id`, if any, is a string.
    A `tool_calls` of None is dropped."""
    if not isinstance(messages, (list, tuple)):
        raise ChatTemplateError("messages must be a list of {'role': ..., 'content': ...} dicts")
    out = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, Mapping):
            raise ChatTemplateError(f"messages[{i}] must be a dict, got {type(msg).__name__}")
        if not isinstance(msg.get("role"), str) or not msg["role"]:
            raise ChatTemplateError(f"messages[{i}] has no 'role' string")
        if "content" not in msg and "tool_calls" not in msg:
            raise ChatTemplateError(f"messages[{i}] has no 'content'")
        copy = {**msg, "content": _message_content(msg.get("content"), i)}
        tool_calls = copy.pop("tool_calls", None)
        if tool_calls is not None:
            if not isinstance(tool_calls, (list, tuple)):
                raise ChatTemplateError(f"messages[{i}]['tool_calls'] must be a list")
            where = f"messages[{i}]['tool_calls']"
            copy["tool_calls"] = [_tool_call(c, f"{where}[{j}]") for j, c in enumerate(tool_calls)]
        if copy["role"] == "tool":
            if copy["content"] is None:
                raise ChatTemplateError(f"messages[{i}] (a tool result) has no 'content'")
            if not isinstance(copy.get("tool_call_id", ""), str):
                raise ChatTemplateError(f"messages[{i}]['tool_call_id'] must be a string")
        out.append(copy)
    return out


@lru_cache(maxsize=16)
def template_supports_tools(template: str | None) -> bool:
    """Whether a chat template reads the `tools` variable (and so renders the tools itself).
    False without a template and for one that does not compile (rendering it reports why)."""
    if not template:
        return False
    try:
        ast = _jinja_env().parse(template)
    except jinja2.TemplateSyntaxError:
        return False
    return "tools" in meta.find_undeclared_variables(ast)


def _function_schema(tool: Any, index: int) -> dict[str, Any]:
    """A tool as {"type": "function", "function": {...}}; a bare function dict is wrapped."""
    if isinstance(tool, Mapping) and isinstance(tool.get("function"), Mapping):
        function = tool["function"]
    elif isinstance(tool, Mapping) and "type" not in tool:
        function = tool
    else:
        raise ChatTemplateError(
            f"tools[{index}] must be {{'type': 'function', 'function': {{'name': ..., ...}}}}"
        )
    if not isinstance(function.get("name"), str) or not function["name"]:
        raise ChatTemplateError(f"tools[{index}] has no function 'name' string")
    return {"type": "function", "function": dict(function)}


def tools_system_prompt(tools: list[dict[str, Any]]) -> str:
    """The system-prompt text used when a chat template cannot render tools itself: each
    function's JSON schema, one per line inside <tools></tools>, and the instruction to call
    them in the hermes format, ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``.
    `tools` are OpenAI tools ({"type": "function", "function": {...}}) or bare function dicts;
    anything else is a ChatTemplateError."""
    if not isinstance(tools, (list, tuple)):
        raise ChatTemplateError("tools must be a list of {'type': 'function', ...} dicts")
    schemas = "\n".join(
        json.dumps(_function_schema(tool, i), ensure_ascii=False) for i, tool in enumerate(tools)
    )
    return (
        "# Tools\n\n"
        "You may call functions to help with the request. Their JSON schemas follow, one per "
        "line, between <tools> and </tools>:\n"
        f"<tools>\n{schemas}\n</tools>\n\n"
        "To call a function, answer with a <tool_call></tool_call> block holding a JSON object "
        "with the function's name and its arguments; use one block per call:\n"
        '<tool_call>\n{"name": <function name>, "arguments": <arguments as a JSON object>}\n'
        "</tool_call>"
    )


def _hermes_calls(tool_calls: list[dict[str, Any]]) -> str:
    return "\n".join(
        "<tool_call>\n"
        + json.dumps(
            {"name": c["function"]["name"], "arguments": c["function"]["arguments"]},
            ensure_ascii=False,
        )
        + "\n</tool_call>"
        for c in tool_calls
    )


def apply_tool_fallback(
    messages: Any, tools: list[dict[str, Any]] | None, tool_role: str = "user"
) -> list[dict[str, Any]]:
    """Messages that a template without tool support can render: `tools_system_prompt(tools)`
    merged into the first system message (after its text) or prepended as one (none when
    `tools` is empty or None); assistant `tool_calls` rewritten as hermes ``<tool_call>``
    blocks after the message's text; each `tool` result as ``<tool_response>...
    </tool_response>`` text in a `tool_role` message, consecutive results joined in one.
    Returns validated copies (see `validate_messages`); the input is not modified."""
    out: list[dict[str, Any]] = []
    previous_was_tool = False
    for msg in validate_messages(messages):
        is_tool = msg["role"] == "tool"
        if is_tool:
            text = f"<tool_response>\n{msg['content']}\n</tool_response>"
            if previous_was_tool:
                out[-1]["content"] += "\n" + text
            else:
                out.append({"role": tool_role, "content": text})
        elif "tool_calls" in msg:
            calls = msg.pop("tool_calls")
            msg["content"] = "\n".join(t for t in (msg["content"], _hermes_calls(calls)) if t)
            out.append(msg)
        else:
            out.append(msg)
        previous_was_tool = is_tool
    if tools:
        prompt = tools_system_prompt(tools)
        if out and out[0]["role"] == "system":
            system = out[0]["content"]
            out[0] = {**out[0], "content": f"{system}\n\n{prompt}" if system else prompt}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out


# What a template's caller sets itself: `chat_template_kwargs` may not replace these.
RESERVED_VARIABLES = frozenset(
    {"messages", "add_generation_prompt", "tools", "documents", "bos_token", "eos_token"}
)


def template_variables(kwargs: Mapping[str, Any] | None) -> dict[str, Any]:
    """A caller's `chat_template_kwargs` as template variables; a reserved name (messages,
    tools, ...: set by the caller's own arguments) is a ChatTemplateError."""
    taken = sorted(RESERVED_VARIABLES.intersection(kwargs or {}))
    if taken:
        raise ChatTemplateError(
            f"chat_template_kwargs may not set {', '.join(taken)} (set by the request itself)"
        )
    return dict(kwargs or {})


def render_chat_template(
    template: str | None,
    messages: Any,
    add_generation_prompt: bool = True,
    /,
    *,
    continue_final_message: bool = False,
    timeout: float = RENDER_TIMEOUT_S,
    **variables: Any,
) -> str:
    """Render a chat template in a sandbox with `messages`, `add_generation_prompt` and any
    extra `variables` (bos_token, tools, ...), within `timeout` seconds of wall time; every
    failure (the time limit included) is a ChatTemplateError.

    `continue_final_message` (vLLM's and transformers' meaning) leaves the last message open:
    the text ends right after its content, without the template's end-of-turn, so the model
    continues it (an assistant "prefill"). It excludes `add_generation_prompt`."""
    if not template:
        raise ChatTemplateError("this model has no chat template; send a plain prompt instead")
    if continue_final_message:
        if add_generation_prompt:
            raise ChatTemplateError(
                "continue_final_message and add_generation_prompt cannot both be set"
            )
        text = render_chat_template(template, messages, False, timeout=timeout, **variables)
        final = validate_messages(messages)[-1]["content"] if messages else None
        if not final:
            raise ChatTemplateError("continue_final_message needs a last message with content")
        for piece in (final, final.strip()):
            end = text.rfind(piece)
            if piece and end >= 0:
                return text[: end + len(piece)]
        raise ChatTemplateError(
            "continue_final_message: the chat template does not render the last message's "
            "content as it is, so it cannot be left open"
        )
    compiled = _compile_template(template)
    # HF always passes tools/documents (as None when absent); `tools is not none` depends on it
    context = {
        "tools": None,
        "documents": None,
        **variables,
        "messages": validate_messages(messages),
        "add_generation_prompt": add_generation_prompt,
    }
    _render_deadline.at = time.monotonic() + timeout
    try:
        return compiled.render(**context)
    except jinja2.TemplateError as e:  # raise_exception() and sandbox violations land here
        if "time limit" in str(e) and time.monotonic() > _render_deadline.at:
            raise ChatTemplateError(
                f"rendering the chat template took longer than {timeout:g} s"
            ) from None
        raise ChatTemplateError(f"chat template error: {e}") from None
    except Exception as e:  # noqa: BLE001  (a template is code: any error means it is broken)
        raise ChatTemplateError(
            f"chat template failed while rendering: {type(e).__name__}: {e}"
        ) from None
    finally:
        _render_deadline.at = None
