"""Chat templates: Hugging Face's jinja2 templates rendered in a sandbox.

Every failure (syntax error, `raise_exception()`, a sandbox violation, bad messages) is a
ChatTemplateError with a message meant for the user.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from functools import lru_cache
from typing import Any, ClassVar, NoReturn

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment

from tokenmill.errors import ChatTemplateError


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


@lru_cache(maxsize=1)
def _jinja_env() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
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


def validate_messages(messages: Any) -> list[dict[str, Any]]:
    """Check chat messages and return copies whose content is a plain string (or None)."""
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
        out.append({**msg, "content": _message_content(msg.get("content"), i)})
    return out


def render_chat_template(
    template: str | None, messages: Any, add_generation_prompt: bool = True, /, **variables: Any
) -> str:
    """Render a chat template in a sandbox with `messages`, `add_generation_prompt` and any
    extra `variables` (bos_token, tools, ...); every failure is a ChatTemplateError."""
    if not template:
        raise ChatTemplateError("this model has no chat template; send a plain prompt instead")
    compiled = _compile_template(template)
    # HF always passes tools/documents (as None when absent); `tools is not none` depends on it
    context = {
        "tools": None,
        "documents": None,
        **variables,
        "messages": validate_messages(messages),
        "add_generation_prompt": add_generation_prompt,
    }
    try:
        return compiled.render(**context)
    except jinja2.TemplateError as e:  # raise_exception() and sandbox violations land here
        raise ChatTemplateError(f"chat template error: {e}") from None
    except Exception as e:  # noqa: BLE001  (a template is code: any error means it is broken)
        raise ChatTemplateError(
            f"chat template failed while rendering: {type(e).__name__}: {e}"
        ) from None
