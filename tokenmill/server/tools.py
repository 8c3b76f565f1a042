"""Tool calling for /v1/chat/completions: what to render, what to enforce, how to parse.

`plan_tools` turns a request's `tools` / `tool_choice` / `parallel_tool_calls` into a
`ToolPlan`:
- **Rendering.** A chat template that reads `tools` renders them (and assistant `tool_calls`,
  `tool` results) itself. Otherwise the documented fallback applies
  (`chat_template.apply_tool_fallback`): a system prompt listing the functions' JSON schemas
  and asking for hermes-style ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``
  blocks, with earlier calls and results rewritten as text.
- **Parsing.** `--tool-call-parser` names the output format; `auto` detects it from the chat
  template (hermes when the fallback is in use or nothing is recognised).
- **Enforcing.** `tool_choice` `required` or a named function constrains the output with a
  grammar: one (or, with parallel_tool_calls, one or more) hermes blocks whose JSON follows
  the functions' parameter schemas, the name fixed for a named choice. Even a small model then
  returns calls that validate. Such responses are parsed with the hermes parser.
- `tool_choice` `none` renders no tools and parses nothing.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

from tokenmill.engine.chat_template import apply_tool_fallback, template_supports_tools
from tokenmill.engine.structured_output import JSON_OPTIONS, GrammarError, close_objects
from tokenmill.engine.tokenizer import Tokenizer
from tokenmill.engine.tool_parsers import (
    PARSERS,
    ToolCall,
    ToolParser,
    detect_tool_parser,
    get_tool_parser,
)
from tokenmill.sampling_params import StructuredOutputsParams


@dataclass(frozen=True)
class ToolPlan:
    """How one chat request renders, constrains and parses tools."""

    messages: list[dict[str, Any]]  # what the template renders
    template_tools: list[dict[str, Any]] | None  # passed to the template as `tools`
    parser: ToolParser | None  # None: the output is plain content
    constraint: StructuredOutputsParams | None  # tool_choice required / named
    # Markers such as <|python_tag|> or [TOOL_CALLS] are special tokens: keep them in the text
    keep_special_tokens: bool


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def tool_calls_json(calls: list[ToolCall]) -> list[dict[str, Any]]:
    """OpenAI's `message.tool_calls` entries (arguments as JSON text)."""
    return [
        {
            "id": new_call_id(),
            "type": "function",
            "function": {"name": c.name, "arguments": c.arguments},
        }
        for c in calls
    ]


def _call_schema(function: dict[str, Any]) -> dict[str, Any]:
    parameters = function.get("parameters") or {"type": "object", "properties": {}}
    return {
        "type": "object",
        "properties": {"name": {"const": function["name"]}, "arguments": close_objects(parameters)},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


def tool_call_grammar(functions: list[dict[str, Any]], parallel: bool) -> str:
    """A Lark grammar (llguidance dialect) for hermes tool-call blocks over `functions`: one
    block, or one or more separated by newlines when `parallel`."""
    options = [_call_schema(f) for f in functions]
    schema = options[0] if len(options) == 1 else {"anyOf": options}
    schema = {**schema, "x-guidance": JSON_OPTIONS}
    repeat = ' ("\\n" call)*' if parallel else ""
    try:
        body = json.dumps(schema)
    except RecursionError:
        raise GrammarError("the tools' parameter schemas nest too deeply") from None
    return (
        f'start: call{repeat}\ncall: "<tool_call>\\n" body "\\n</tool_call>"\nbody: %json {body}\n'
    )


def plan_tools(
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None,
    tool_choice: str | dict[str, Any] | None,
    parallel_tool_calls: bool | None,
    tokenizer: Tokenizer,
    parser_name: str = "auto",
) -> ToolPlan:
    """Decide rendering, constraint and parser for one request. `tools` and `tool_choice`
    come validated by the protocol (tool_choice names a function present in tools)."""
    choice = tool_choice if tool_choice is not None else ("auto" if tools else "none")
    use_tools = bool(tools) and choice != "none"
    template = tokenizer.chat_template_for(tools=use_tools)
    native = template_supports_tools(template)
    has_tool_messages = any(m.get("tool_calls") or m.get("role") == "tool" for m in messages)
    if native:
        rendered, template_tools = messages, (tools if use_tools else None)
    elif use_tools or has_tool_messages:
        rendered, template_tools = apply_tool_fallback(messages, tools if use_tools else None), None
    else:
        rendered, template_tools = messages, None
    if not use_tools:
        return ToolPlan(rendered, template_tools, None, None, False)
    assert tools is not None
    functions = [t["function"] for t in tools]
    if choice == "required" or isinstance(choice, dict):
        parallel = parallel_tool_calls is not False
        if isinstance(choice, dict):  # a named function: exactly one call to it
            functions = [f for f in functions if f["name"] == choice["function"]["name"]]
            parallel = False
        constraint = StructuredOutputsParams(grammar=tool_call_grammar(functions, parallel))
        return ToolPlan(rendered, template_tools, PARSERS["hermes"], constraint, False)
    if parser_name != "auto":
        parser = get_tool_parser(parser_name)
    else:
        parser = (detect_tool_parser(template) if native else None) or PARSERS["hermes"]
    return ToolPlan(rendered, template_tools, parser, None, parser.name != "hermes")
