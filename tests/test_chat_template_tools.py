"""Tools in chat templates: OpenAI tool-call and tool-result messages rendered by a tools-aware
template, and by a tools-unaware (ChatML, SmolLM2-like) one through the hermes fallback; the
hermes parser reads back the calls the fallback writes; bad tool messages are errors."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from tokenmill.engine.chat_template import (
    apply_tool_fallback,
    render_chat_template,
    template_supports_tools,
    tools_system_prompt,
    validate_messages,
)
from tokenmill.engine.tool_parsers import PARSERS, ToolCall
from tokenmill.errors import ChatTemplateError

CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# A small tools-aware template in the style of Qwen2.5's: tools in the system turn, calls
# written from the parsed arguments dict, results in `tool` turns.
TOOLS_AWARE = """\
{%- if tools %}<|im_start|>system
{% if messages[0].role == 'system' %}{{ messages[0].content }}

{% endif %}Functions:
{% for tool in tools %}{{ tool.function.name }}: {{ tool.function.parameters | tojson }}
{% endfor %}<|im_end|>
{% elif messages[0].role == 'system' %}<|im_start|>system
{{ messages[0].content }}<|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == 'system' %}{% continue %}{% endif %}
{%- if message.tool_calls %}<|im_start|>assistant
{% if message.content %}{{ message.content }}
{% endif %}{% for call in message.tool_calls %}\
CALL {{ call.function.name }} city={{ call.function.arguments.city }} \
{{ call.function.arguments | tojson }}
{% endfor %}<|im_end|>
{% elif message.role == 'tool' %}<|im_start|>tool {{ message.tool_call_id }}
{{ message.content }}<|im_end|>
{% else %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city.",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]

CONVERSATION: list[dict[str, Any]] = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris and Zürich?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            },
            {
                "id": "call_2",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Zürich"}'},
            },
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 18}'},
    {"role": "tool", "tool_call_id": "call_2", "content": '{"temp_c": 12}'},
]

PARAMETERS = json.dumps(TOOLS[0]["function"]["parameters"])


def test_template_supports_tools() -> None:
    assert template_supports_tools(TOOLS_AWARE)
    assert template_supports_tools("{% if tools is not none %}{{ tools | tojson }}{% endif %}")
    assert not template_supports_tools(CHATML)
    assert not template_supports_tools(None)
    assert not template_supports_tools("")
    assert not template_supports_tools("{% set tools = [] %}{{ tools }}")  # its own variable
    assert not template_supports_tools("{% if tools %}")  # does not compile


def test_tools_aware_template_renders_the_round_trip() -> None:
    original = copy.deepcopy(CONVERSATION)
    rendered = render_chat_template(TOOLS_AWARE, CONVERSATION, True, tools=TOOLS)
    assert rendered == (
        "<|im_start|>system\nBe brief.\n\nFunctions:\n"
        f"get_weather: {PARAMETERS}\n<|im_end|>\n"
        "<|im_start|>user\nWeather in Paris and Zürich?<|im_end|>\n"
        "<|im_start|>assistant\n"
        'CALL get_weather city=Paris {"city": "Paris"}\n'
        'CALL get_weather city=Zürich {"city": "Zürich"}\n'
        "<|im_end|>\n"
        '<|im_start|>tool call_1\n{"temp_c": 18}<|im_end|>\n'
        '<|im_start|>tool call_2\n{"temp_c": 12}<|im_end|>\n'
        "<|im_start|>assistant\n"
    )
    assert CONVERSATION == original  # the caller's messages are untouched


def test_fallback_renders_the_round_trip_through_a_tools_unaware_template() -> None:
    original = copy.deepcopy(CONVERSATION)
    messages = apply_tool_fallback(CONVERSATION, TOOLS)
    assert CONVERSATION == original
    rendered = render_chat_template(CHATML, messages, True)
    calls = (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Zürich"}}\n</tool_call>'
    )
    assert rendered == (
        f"<|im_start|>system\nBe brief.\n\n{tools_system_prompt(TOOLS)}<|im_end|>\n"
        "<|im_start|>user\nWeather in Paris and Zürich?<|im_end|>\n"
        f"<|im_start|>assistant\n{calls}<|im_end|>\n"
        '<|im_start|>user\n<tool_response>\n{"temp_c": 18}\n</tool_response>\n'
        '<tool_response>\n{"temp_c": 12}\n</tool_response><|im_end|>\n'
        "<|im_start|>assistant\n"
    )
    # the hermes parser reads the calls the fallback writes
    assert PARSERS["hermes"].extract(calls) == (
        "",
        [
            ToolCall("get_weather", '{"city": "Paris"}'),
            ToolCall("get_weather", '{"city": "Zürich"}'),
        ],
    )


def test_tools_system_prompt() -> None:
    prompt = tools_system_prompt(TOOLS)
    assert f"<tools>\n{json.dumps(TOOLS[0], ensure_ascii=False)}\n</tools>" in prompt
    assert '<tool_call>\n{"name": <function name>, "arguments": ' in prompt
    bare = tools_system_prompt([TOOLS[0]["function"]])  # a bare function dict is wrapped
    assert bare == prompt
    for bad in ("x", [{"type": "function"}], [{"type": "function", "function": {}}], [3]):
        with pytest.raises(ChatTemplateError):
            tools_system_prompt(bad)  # type: ignore[arg-type]


def test_fallback_without_a_system_message_or_tools() -> None:
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "Checking.", "tool_calls": CONVERSATION[2]["tool_calls"]},
        {"role": "tool", "content": "ok"},
        {"role": "user", "content": "thanks"},
    ]
    out = apply_tool_fallback(messages, TOOLS, tool_role="observation")
    assert out[0] == {"role": "system", "content": tools_system_prompt(TOOLS)}
    assert out[2]["content"].startswith("Checking.\n<tool_call>\n")
    assert "tool_calls" not in out[2]
    assert out[3] == {"role": "observation", "content": "<tool_response>\nok\n</tool_response>"}
    assert out[4] == {"role": "user", "content": "thanks"}
    # no tools this turn: no system prompt, the history is still rewritten
    assert [m["role"] for m in apply_tool_fallback(messages, None)] == [
        "user",
        "assistant",
        "user",
        "user",
    ]


def test_templates_get_arguments_as_a_dict() -> None:
    messages = validate_messages(CONVERSATION)
    assert messages[2]["tool_calls"][0] == {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
    }
    assert messages[2]["content"] is None
    # arguments already a dict (HF style) and content absent are accepted too
    hf_style = [
        {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": {"a": 1}}}]}
    ]
    assert validate_messages(hf_style)[0]["tool_calls"][0]["function"]["arguments"] == {"a": 1}
    # tool_calls: null is dropped, so `message.tool_calls is defined` stays false
    assert (
        "tool_calls"
        not in validate_messages([{"role": "assistant", "content": "x", "tool_calls": None}])[0]
    )


def _call(arguments: Any) -> dict[str, Any]:
    return {"id": "c", "type": "function", "function": {"name": "f", "arguments": arguments}}


@pytest.mark.parametrize(
    ("message", "match"),
    [
        ({"role": "assistant", "tool_calls": [_call('{"city": "Par')]}, "not valid JSON"),
        ({"role": "assistant", "tool_calls": [_call("[1, 2]")]}, "JSON object"),
        ({"role": "assistant", "tool_calls": [_call(None)]}, "JSON object"),
        ({"role": "assistant", "tool_calls": "f()"}, "must be a list"),
        ({"role": "assistant", "tool_calls": [{"name": "f"}]}, "'function'"),
        ({"role": "assistant", "tool_calls": [{"function": {"arguments": "{}"}}]}, "no 'name'"),
        ({"role": "assistant", "tool_calls": [{**_call("{}"), "type": "custom"}]}, "custom"),
        ({"role": "tool", "tool_call_id": "c", "content": None}, "tool result"),
        ({"role": "tool", "tool_call_id": 7, "content": "ok"}, "tool_call_id"),
    ],
)
def test_bad_tool_messages_are_chat_template_errors(message: dict[str, Any], match: str) -> None:
    messages = [{"role": "user", "content": "hi"}, message]
    with pytest.raises(ChatTemplateError, match=match):
        render_chat_template(TOOLS_AWARE, messages, True, tools=TOOLS)
    with pytest.raises(ChatTemplateError, match=match):
        apply_tool_fallback(messages, TOOLS)


def test_roles_are_not_restricted() -> None:
    messages = [{"role": "narrator", "content": "Once upon a time."}]
    assert render_chat_template(CHATML, messages, False) == (
        "<|im_start|>narrator\nOnce upon a time.<|im_end|>\n"
    )
