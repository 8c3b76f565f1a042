"""Tool-call parsers: recorded outputs of each format parsed whole and streamed (split at every
character boundary, and one character at a time), malformed calls left as content, and the
parser detection from chat templates."""

from __future__ import annotations

import json

import pytest

from tokenmill.engine.tool_parsers import (
    PARSERS,
    ToolCall,
    ToolParser,
    detect_tool_parser,
    get_tool_parser,
)
from tokenmill.engine.tool_streamers import ToolCallDelta

NESTED_ARGS = (
    '{"query": {"and": [{"title": "a}b"}, {"tags": ["{[", "]}"]}]}, "matrix": [[1, 2], []], '
    '"note": "say \\"hi\\" {not a brace} \\\\ back\\\\slash\\n", "empty": {}, "none": null, '
    '"n": -1.5e3, "ok": true}'
)
UNICODE_ARGS = '{"text": "日本語 😀 é", "escaped": "\\u00e9\\ud83d\\ude00", "path": "C:\\\\tmp"}'

# (parser, recorded output, content, [(name, arguments text)])
WELL_FORMED: list[tuple[str, str, str, list[tuple[str, str]]]] = [
    (
        "hermes",
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}'
        "\n</tool_call>",
        "",
        [("get_weather", '{"city": "Paris", "unit": "celsius"}')],
    ),
    (
        "hermes",
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_time", "arguments": {"tz": "Europe/Paris"}}\n</tool_call>',
        "",
        [("get_weather", '{"city": "Paris"}'), ("get_time", '{"tz": "Europe/Paris"}')],
    ),
    (
        "hermes",
        'Let me look that up.\n\n<tool_call>\n{"name": "search", "arguments": {"q": "x"}}\n'
        "</tool_call>",
        "Let me look that up.",
        [("search", '{"q": "x"}')],
    ),
    (
        "hermes",
        ' First. <tool_call>{"name":"a","arguments":{}}</tool_call> Then  <tool_call>'
        '{"name":"b","arguments":{"k":[1]}}</tool_call> done.\n',
        "First.  Then   done.",
        [("a", "{}"), ("b", '{"k":[1]}')],
    ),
    (
        "hermes",
        f'<tool_call>\n{{"name": "query_db", "arguments": {NESTED_ARGS}}}\n</tool_call>',
        "",
        [("query_db", NESTED_ARGS)],
    ),
    (
        "hermes",
        f'<tool_call>{{"name": "translate", "arguments": {UNICODE_ARGS}}}</tool_call>',
        "",
        [("translate", UNICODE_ARGS)],
    ),
    (
        "hermes",  # arguments before the name, an extra key, arguments spread over lines
        '<tool_call>\n{"arguments": {\n  "a": 1,\n  "b": "</tool_call>"\n}, "id": "c1", '
        '"name": "f"}\n</tool_call>',
        "",
        [("f", '{\n  "a": 1,\n  "b": "</tool_call>"\n}')],
    ),
    (
        "hermes",  # unterminated final call: generation stopped after its JSON
        'Calling.\n<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n',
        "Calling.",
        [("f", '{"x": 1}')],
    ),
    (
        "hermes",  # ... or in the middle of its closing tag
        '<tool_call>{"name": "f", "arguments": {"x": "y"}}</tool_',
        "",
        [("f", '{"x": "y"}')],
    ),
    ("hermes", '<tool_call>{"name": "now"}</tool_call>', "", [("now", "{}")]),
    ("hermes", "no calls: a < b, <tool or <tool_cal>", "no calls: a < b, <tool or <tool_cal>", []),
    ("hermes", "  \n ", "", []),
    (
        "llama3_json",
        '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}',
        "",
        [("get_weather", '{"city": "Paris", "unit": "celsius"}')],
    ),
    (
        "llama3_json",
        '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}',
        "",
        [("get_weather", '{"city": "Paris"}')],
    ),
    (
        "llama3_json",
        '\n\n  {"name": "a", "parameters": {"x": 1}}; {"name": "b", "arguments": {}};'
        '{"parameters": {"y": [true]}, "name": "c"}',
        "",
        [("a", '{"x": 1}'), ("b", "{}"), ("c", '{"y": [true]}')],
    ),
    (
        "llama3_json",
        f'{{"name": "query_db", "parameters": {NESTED_ARGS}}}',
        "",
        [("query_db", NESTED_ARGS)],
    ),
    (
        "llama3_json",
        f'<|python_tag|> {{"name": "translate", "parameters": {UNICODE_ARGS}}}',
        "",
        [("translate", UNICODE_ARGS)],
    ),
    (
        "llama3_json",  # text after the calls is content
        '{"name": "f", "parameters": {}}\n\nI have called the function.',
        "I have called the function.",
        [("f", "{}")],
    ),
    (
        "llama3_json",
        'The JSON is {"name": "f", "parameters": {}}.',
        'The JSON is {"name": "f", "parameters": {}}.',
        [],
    ),
    ("llama3_json", "<|python", "<|python", []),
    (
        "mistral",
        '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}]',
        "",
        [("get_weather", '{"city": "Paris", "unit": "celsius"}')],
    ),
    (
        "mistral",
        'Sure.[TOOL_CALLS] [ {"name": "a", "arguments": {"x": 1}, "id": "abc123XYZ"},\n'
        ' {"name": "b", "arguments": {"s": "]}"}} ] ',
        "Sure.",
        [("a", '{"x": 1}'), ("b", '{"s": "]}"}')],
    ),
    (
        "mistral",
        f'[TOOL_CALLS][{{"name": "query_db", "arguments": {NESTED_ARGS}}}]',
        "",
        [("query_db", NESTED_ARGS)],
    ),
    (
        "mistral",
        '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}',
        "",
        [("get_weather", '{"city": "Paris"}')],
    ),
    (
        "mistral",
        f"Two calls:[TOOL_CALLS]translate[ARGS]{UNICODE_ARGS}[TOOL_CALLS]get.time-2[ARGS] {{}}",
        "Two calls:",
        [("translate", UNICODE_ARGS), ("get.time-2", "{}")],
    ),
    (
        "mistral",  # an array cut short after a complete call
        '[TOOL_CALLS][{"name": "f", "arguments": {"x": [1, {"y": 2}]}}',
        "",
        [("f", '{"x": [1, {"y": 2}]}')],
    ),
    ("mistral", "Use [brackets] and [TOOL", "Use [brackets] and [TOOL", []),
]

# (parser, output with no well-formed call): everything is content
MALFORMED: list[tuple[str, str]] = [
    ("hermes", '<tool_call>\n{"name": "f", "arguments": {"x": }}\n</tool_call>'),
    ("hermes", '<tool_call>{"arguments": {"x": 1}}</tool_call>'),
    ("hermes", '<tool_call>{"name": "f", "arguments": "{\\"x\\": 1}"}</tool_call>'),
    ("hermes", '<tool_call>{"name": "f", "arguments": [1, 2]}</tool_call>'),
    ("hermes", '<tool_call>{"name": "f", "arguments": {"x": "unfinished'),
    ("hermes", '<tool_call>{"name": "f", "arguments": {"x": 1}</tool_call>'),
    ("hermes", "<tool_call>not json at all</tool_call>"),
    ("hermes", '<tool_call>{"name": "", "arguments": {}}</tool_call>'),
    ("hermes", '<tool_call>{"name": null, "arguments": {}}</tool_call>'),
    ("hermes", '<tool_call>{"name": "f", "arguments": {}} trailing</tool_call>'),
    ("hermes", '<tool_call>{"name": "f", "name": "g", "arguments": {}}</tool_call>'),
    ("hermes", '<tool_call>{"name": "f", "arguments": {}, "arguments": {}}</tool_call>'),
    ("hermes", '<tool_call>{"name": "f" "arguments": {}}</tool_call>'),
    ("hermes", '<tool_call>{"name": "f", "arguments": {}, "x": tru}</tool_call>'),
    ("hermes", "<tool_call>"),
    ("hermes", "<tool_call>\n"),
    ("llama3_json", '{"name": "f", "parameters": {"x": }}'),
    ("llama3_json", '{"parameters": {"x": 1}}'),
    ("llama3_json", '{"name": "f", "parameters": "x"}'),
    ("llama3_json", '{"name": "f", "parameters": {"x": 1'),
    ("llama3_json", '{"name": "f", "parameters": {}, "arguments": {}}'),
    ("llama3_json", '<|python_tag|>brave_search.call(query="tokenmill")'),
    ("llama3_json", "{"),
    ("mistral", '[TOOL_CALLS][{"name": "f", "arguments": {"x": }}]'),
    ("mistral", '[TOOL_CALLS]{"name": "f", "arguments": {}}'),
    ("mistral", "[TOOL_CALLS][]"),
    ("mistral", "[TOOL_CALLS]f[ARGS]not json"),
    ("mistral", '[TOOL_CALLS]f[ARGS]{"x": 1'),
    ("mistral", "[TOOL_CALLS]bad name[ARGS]{}"),
    ("mistral", "[TOOL_CALLS][ARGS]{}"),
    ("mistral", '[TOOL_CALLS][{"arguments": {}}]'),
    ("mistral", "[TOOL_CALLS]"),
    ("mistral", "[TOOL_CALLS]get_wea"),
]


def _stream(parser: ToolParser, pieces: list[str]) -> tuple[str, list[ToolCall]]:
    """Feed `pieces`, check the deltas' shape, and reassemble (content, calls by index)."""
    streamer = parser.streamer()
    content: list[str] = []
    deltas: list[ToolCallDelta] = []
    for piece in pieces:
        text, more = streamer.feed(piece)
        content.append(text)
        deltas += more
    text, more = streamer.finish()
    content.append(text)
    deltas += more
    names: dict[int, str] = {}
    arguments: dict[int, str] = {}
    for d in deltas:
        if d.index not in names:
            assert d.index == len(names), "a new call takes the next index"
            assert d.name, "the first delta of a call carries its name"
            names[d.index] = d.name
            arguments[d.index] = ""
        else:
            assert d.name is None, "only the first delta of a call carries its name"
        arguments[d.index] += d.arguments
    return "".join(content), [ToolCall(names[i], arguments[i]) for i in sorted(names)]


def _splits(text: str) -> list[list[str]]:
    return [[text[:i], text[i:]] for i in range(len(text) + 1)] + [list(text)]


@pytest.mark.parametrize(("parser", "text", "content", "calls"), WELL_FORMED)
def test_extract(parser: str, text: str, content: str, calls: list[tuple[str, str]]) -> None:
    got_content, got_calls = get_tool_parser(parser).extract(text)
    assert got_content == content
    assert got_calls == [ToolCall(name, arguments) for name, arguments in calls]
    for call in got_calls:
        assert isinstance(json.loads(call.arguments), dict)


@pytest.mark.parametrize(("parser", "text", "content", "calls"), WELL_FORMED)
def test_streaming_matches_extract(
    parser: str, text: str, content: str, calls: list[tuple[str, str]]
) -> None:
    p = get_tool_parser(parser)
    expected = p.extract(text)
    for pieces in _splits(text):
        assert _stream(p, pieces) == expected, pieces


@pytest.mark.parametrize(("parser", "text"), MALFORMED)
def test_malformed_calls_are_content(parser: str, text: str) -> None:
    p = get_tool_parser(parser)
    assert p.extract(text) == (text.strip(), [])
    for pieces in _splits(text):
        # the content always matches; deltas of a call found malformed late may have been sent
        assert _stream(p, pieces)[0] == text.strip(), pieces


def test_malformed_calls_among_good_ones() -> None:
    bad = '<tool_call>{"name": "g", "arguments": {"x": }}</tool_call>'
    good = '<tool_call>{"name": "f", "arguments": {}}</tool_call>'
    text = f'A{good}{bad}B<tool_call>{{"name": "h"}}'
    assert PARSERS["hermes"].extract(text) == (
        f"A{bad}B",
        [ToolCall("f", "{}"), ToolCall("h", "{}")],
    )

    text = '{"name": "f", "parameters": {"a": 1}}; {"name": "g", "parameters": {"x": }}'
    assert PARSERS["llama3_json"].extract(text) == (
        '; {"name": "g", "parameters": {"x": }}',
        [ToolCall("f", '{"a": 1}')],
    )

    text = '[TOOL_CALLS][{"name": "f", "arguments": {}}, {"name": 3}] [TOOL_CALLS]g[ARGS]{}'
    assert PARSERS["mistral"].extract(text) == (
        ', {"name": 3}] [TOOL_CALLS]g[ARGS]{}',
        [ToolCall("f", "{}")],
    )


def test_deltas_sent_before_a_call_turns_out_malformed_stand() -> None:
    streamer = PARSERS["hermes"].streamer()
    assert streamer.feed('<tool_call>{"name": "f", "arguments": {"x": 1') == (
        "",
        [ToolCallDelta(0, "f", '{"x": 1')],
    )
    assert streamer.feed(", oops}}</tool_call> after") == (
        '<tool_call>{"name": "f", "arguments": {"x": 1, oops}}</tool_call> after',
        [],
    )
    assert streamer.finish() == ("", [])


def test_name_is_sent_as_soon_as_known_and_arguments_as_they_arrive() -> None:
    streamer = PARSERS["hermes"].streamer()
    assert streamer.feed("Checking <tool") == ("Checking", [])  # the possible tag is held
    assert streamer.feed('_call>\n{"name": "get_wea') == ("", [])
    assert streamer.feed('ther", "arguments": ') == ("", [ToolCallDelta(0, "get_weather", "")])
    assert streamer.feed('{"city": "Par') == ("", [ToolCallDelta(0, None, '{"city": "Par')])
    # never past the end of the arguments object
    # whitespace is held until more content follows (here the space after "Checking" too)
    assert streamer.feed('is"}}\n</tool_call>\nMore') == (
        " \nMore",
        [ToolCallDelta(0, None, 'is"}')],
    )
    assert streamer.feed(" text ") == (" text", [])
    assert streamer.finish() == ("", [])


def test_held_back_text_that_is_not_a_marker_is_content() -> None:
    streamer = PARSERS["hermes"].streamer()
    assert streamer.feed("a <tool") == ("a", [])
    assert streamer.feed("s") == (" <tools", [])
    assert streamer.feed(" <tool_c") == ("", [])
    assert streamer.finish() == (" <tool_c", [])

    streamer = PARSERS["mistral"].streamer()
    assert streamer.feed("x [TOOL_") == ("x", [])
    assert streamer.finish() == (" [TOOL_", [])

    streamer = PARSERS["llama3_json"].streamer()
    assert streamer.feed("  <|python") == ("", [])
    assert streamer.feed("_tag|>  ") == ("", [])
    assert streamer.feed("plain") == ("<|python_tag|>  plain", [])


def test_streamer_is_single_use() -> None:
    streamer = PARSERS["hermes"].streamer()
    streamer.finish()
    with pytest.raises(RuntimeError):
        streamer.feed("x")
    with pytest.raises(RuntimeError):
        streamer.finish()


def test_registry() -> None:
    assert set(PARSERS) == {"hermes", "llama3_json", "mistral"}
    for name, parser in PARSERS.items():
        assert parser.name == name
        assert get_tool_parser(name) is parser
    with pytest.raises(ValueError, match="hermes, llama3_json, mistral"):
        get_tool_parser("nope")


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        (None, None),
        ("", None),
        ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}{% endfor %}", None),
        (
            "{% if tools %}<tools>{{ tools | tojson }}</tools>For each call return "
            '<tool_call>\n{"name": <function-name>, "arguments": <args>}\n</tool_call>{% endif %}',
            "hermes",
        ),
        (
            "{% if message.tool_calls %}[TOOL_CALLS]{{ message.tool_calls | tojson }}{% endif %}",
            "mistral",
        ),
        ("{%- if builtin_tools is defined %}<|python_tag|>{{ x }}{% endif %}", "llama3_json"),
        (
            "Respond in the format "
            '{"name": function name, "parameters": dictionary of argument name and its value}.',
            "llama3_json",
        ),
    ],
)
def test_detect_tool_parser(template: str | None, expected: str | None) -> None:
    parser = detect_tool_parser(template)
    assert (parser.name if parser else None) == expected
