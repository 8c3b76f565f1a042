"""Tool calling through the official `openai` SDK on the default model (SmolLM2-135M, whose
ChatML template cannot render tools: the documented system-prompt fallback applies, and the
hermes parser reads the output). `required` and named choices are grammar-enforced, so the
calls validate (`jsonschema`) even from a 135M model."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from tests.server_utils import ServerProcess
from tokenmill.engine.tokenizer import Tokenizer
from tokenmill.engine.tool_parsers import PARSERS
from tokenmill.server.tools import plan_tools

MODEL = "SmolLM2-135M-Instruct"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 30},
                "unit": {"enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "Current time in a time zone",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "string", "pattern": "^[A-Z][a-z]+/[A-Z][a-z]+$"}},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
}
TOOLS = [WEATHER, TIME]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ASK = [{"role": "user", "content": "What is the weather in Paris right now?"}]


@pytest.fixture(scope="module")
def server():
    srv = ServerProcess()
    yield srv
    assert srv.stop() == 0


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def _validate(call) -> None:
    assert call.type == "function" and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_required_gives_valid_calls(client, temperature):
    resp = client.chat.completions.create(
        model=MODEL,
        messages=ASK,
        tools=TOOLS,
        tool_choice="required",
        temperature=temperature,
        seed=3,
        max_tokens=150,
    )
    choice = resp.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.tool_calls
    for call in choice.message.tool_calls:
        _validate(call)


def test_named_choice_calls_that_function_once(client):
    resp = client.chat.completions.create(
        model=MODEL,
        messages=ASK,
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_time"}},
        max_tokens=100,
        temperature=0,
    )
    calls = resp.choices[0].message.tool_calls
    assert [c.function.name for c in calls] == ["get_time"]
    _validate(calls[0])
    assert resp.choices[0].finish_reason == "tool_calls"


def test_parallel_tool_calls_false_gives_one_call(client):
    resp = client.chat.completions.create(
        model=MODEL,
        messages=ASK,
        tools=TOOLS,
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=150,
        temperature=1.0,
        seed=5,
        n=3,
    )
    for choice in resp.choices:
        assert len(choice.message.tool_calls) == 1
        _validate(choice.message.tool_calls[0])


def test_streamed_deltas_reassemble_to_the_same_call(client):
    kw = dict(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=150)
    whole = client.chat.completions.create(temperature=0, **kw).choices[0]
    calls: dict[int, dict] = {}
    finish = None
    for chunk in client.chat.completions.create(temperature=0, stream=True, **kw):
        for c in chunk.choices:
            finish = c.finish_reason or finish
            for d in c.delta.tool_calls or []:
                if d.id is not None:  # the first delta of a call: id, type and name
                    assert d.index not in calls and d.function.name
                    calls[d.index] = {"id": d.id, "name": d.function.name, "arguments": ""}
                calls[d.index]["arguments"] += d.function.arguments or ""
    assert finish == "tool_calls"
    streamed = [(c["name"], c["arguments"]) for _, c in sorted(calls.items())]
    assert streamed == [(c.function.name, c.function.arguments) for c in whole.message.tool_calls]


def test_round_trip_with_a_tool_result(client):
    first = client.chat.completions.create(
        model=MODEL,
        messages=ASK,
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=100,
        temperature=0,
    )
    call = first.choices[0].message.tool_calls[0]
    history = [
        *ASK,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {"name": call.function.name, "arguments": call.function.arguments},
                }
            ],
        },
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21, "sky": "clear"}'},
    ]
    final = client.chat.completions.create(
        model=MODEL, messages=history, tools=TOOLS, max_tokens=40, temperature=0
    )
    choice = final.choices[0]
    assert choice.finish_reason in ("stop", "length", "tool_calls")
    if choice.message.tool_calls is None:
        assert choice.message.content
    # without tools offered, the same history still renders (tool messages via the fallback)
    plain = client.chat.completions.create(model=MODEL, messages=history, max_tokens=10)
    assert plain.choices[0].message.tool_calls is None


def test_auto_and_none(client):
    auto = client.chat.completions.create(
        model=MODEL, messages=ASK, tools=TOOLS, max_tokens=80, temperature=0
    ).choices[0]
    for call in auto.message.tool_calls or []:
        assert call.function.name in SCHEMAS
        json.loads(call.function.arguments)
    none = client.chat.completions.create(
        model=MODEL, messages=ASK, tools=TOOLS, tool_choice="none", max_tokens=20
    ).choices[0]
    assert none.message.tool_calls is None and none.finish_reason in ("stop", "length")


@pytest.mark.parametrize(
    "patch,param",
    [
        ({"tool_choice": "required"}, "tool_choice"),  # no tools
        (
            {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice",
        ),
        ({"tools": [WEATHER, WEATHER]}, "tools"),
        ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, None),
        ({"tools": TOOLS, "tool_choice": "sometimes"}, None),
        (
            {
                "tools": TOOLS,
                "tool_choice": "required",
                "response_format": {"type": "json_object"},
            },
            "tool_choice",
        ),
        (
            {
                "messages": [
                    *ASK,
                    {
                        "role": "assistant",
                        "tool_calls": [
                            {
                                "id": "c1",
                                "type": "function",
                                "function": {"name": "get_weather", "arguments": "{not json"},
                            }
                        ],
                    },
                ]
            },
            "messages",
        ),
    ],
)
def test_bad_tool_requests_are_400(client, server, patch, param):
    body = {"model": MODEL, "messages": ASK, "max_tokens": 5, **patch}
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(**body)
    if param:
        assert err.value.body["param"] == param
    server.wait_idle()


def test_plan_uses_the_template_when_it_renders_tools(default_gguf):
    """A tools-aware template renders the tools itself and picks the parser it mentions."""
    tok = Tokenizer.from_gguf(default_gguf)
    native = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if tools %}Call tools as <tool_call>{...}</tool_call>: {{ tools | tojson }}{% endif %}"
    )
    tok._templates = {"default": native}
    plan = plan_tools(ASK, TOOLS, "auto", None, tok)
    assert plan.template_tools == TOOLS and plan.parser is PARSERS["hermes"]
    assert plan.messages == ASK and plan.constraint is None
    text = tok.apply_chat_template(plan.messages, tools=plan.template_tools)
    assert '"get_weather"' in text


def test_streamed_samples_finish_once(client):
    """n samples that end at different steps: each gets exactly one finish_reason, no error."""
    finishes: dict[int, list[str]] = {}
    stream = client.chat.completions.create(
        model=MODEL,
        messages=ASK,
        tools=TOOLS,
        tool_choice="required",
        n=3,
        temperature=1.0,
        seed=2,
        max_tokens=60,
        stream=True,
    )
    for chunk in stream:
        for c in chunk.choices:
            if c.finish_reason:
                finishes.setdefault(c.index, []).append(c.finish_reason)
    assert sorted(finishes) == [0, 1, 2]
    assert all(len(v) == 1 and v[0] in ("tool_calls", "length") for v in finishes.values())


def test_arguments_take_no_keys_the_parameters_do_not_list(llm_f32):
    """Parameters that list properties without a word on other keys: the grammar closes them
    (as for response_format), so a call cannot invent arguments."""
    from tokenmill.sampling_params import StructuredOutputsParams
    from tokenmill.server.tools import tool_call_grammar

    open_params = dict(WEATHER["function"]["parameters"])
    del open_params["additionalProperties"]
    grammar = tool_call_grammar([{**WEATHER["function"], "parameters": open_params}], False)
    manager = llm_f32.engine.structured_outputs
    compiled = manager.compile(StructuredOutputsParams(grammar=grammar))
    tok = llm_f32.get_tokenizer()

    def accepts(arguments: dict) -> bool:
        call = {"name": "get_weather", "arguments": arguments}
        text = f"<tool_call>\n{json.dumps(call)}\n</tool_call>"
        matcher = manager.new_matcher(compiled)
        ids = tok.encode(text, add_special_tokens=False)
        return all(matcher.accept(t) for t in ids) and matcher.is_terminated

    assert accepts({"city": "Paris", "unit": "celsius"})
    assert not accepts({"city": "Paris", "unit": "celsius", "country": "FR"})
