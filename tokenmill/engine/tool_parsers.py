"""Tool calls written as text by a model: parsed after the fact and incrementally for streaming.

Three formats, one parser each (`PARSERS`):

* ``hermes`` (Hermes, Qwen2.5, SmolLM2):
  ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, any number of them, with text
  around them. The closing tag of the last call may be missing
  (or cut short) when generation ended right after its JSON.
* ``llama3_json`` (Llama 3.1-3.3): the whole output, after optional whitespace and an optional
  ``<|python_tag|>``, is ``{"name": ..., "parameters": {...}}`` ("arguments" is accepted too),
  several separated by ``;``. Output that does not start that way is plain content.
* ``mistral``: ``[TOOL_CALLS]`` then a JSON array ``[{"name": ..., "arguments": {...}}, ...]``, or
  the newer ``[TOOL_CALLS]name[ARGS]{...}`` (repeated for parallel calls).

A call is well formed when its JSON is valid, its name is a non-empty string and its arguments
are a JSON object; missing arguments count as ``{}``. A call's `ToolCall.arguments` is the text of
the arguments object exactly as the model wrote it. Malformed calls are never an error:

* hermes: the malformed ``<tool_call>`` segment, through the first ``</tool_call>`` after its
  opening tag (or to the end of the text), is content; parsing goes on after it.
* llama3_json and mistral: everything after the last well-formed call (or from the start, or
  from the ``[TOOL_CALLS]`` marker, when none came before) is content; no further calls are
  looked for.

`ToolParser.extract` runs the same incremental machine as `ToolParser.streamer` over the whole
text, so for any text and any split of it into pieces, the streamed output matches `extract`:

* the concatenated content deltas equal extract()'s content exactly (content is the text outside
  well-formed calls with the whole's surrounding whitespace removed: leading whitespace is never
  emitted and trailing whitespace is held until more content follows);
* for every call extract() returns, at the same position in its list, the stream has a call with
  that index, the same name (on its first delta) and argument fragments concatenating to its
  `arguments`.

The one difference: a call found malformed after its name was streamed (bad JSON further on,
junk before ``</tool_call>``, a truncated output) keeps its index and the deltas already sent,
and its text is then streamed as content; extract() leaves it out of the calls. Indices of later
calls then run one past their position in extract()'s list.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from tokenmill.engine.tool_streamers import (
    HermesStreamer,
    Llama3JsonStreamer,
    MistralStreamer,
    ToolStreamer,
)


@dataclass(frozen=True)
class ToolCall:
    """One tool call: the function's name and its arguments object's JSON text as written."""

    name: str
    arguments: str


class ToolParser:
    """One tool-call format. Stateless (`PARSERS` holds shared instances); per-response state
    lives in the `ToolStreamer` that `streamer()` returns."""

    name: str
    _streamer_class: type[ToolStreamer]

    def extract(self, text: str) -> tuple[str, list[ToolCall]]:
        """(content: the text outside tool calls, stripped; the well-formed calls in order).
        Malformed calls (bad JSON, missing name, arguments not an object) are left in the
        content, never raised."""
        streamer = self.streamer()
        content, deltas = streamer.feed(text)
        tail, more = streamer.finish()
        names: dict[int, str] = {}
        arguments: dict[int, list[str]] = {}
        for d in deltas + more:
            if d.name is not None:
                names[d.index] = d.name
            arguments.setdefault(d.index, []).append(d.arguments)
        calls = [ToolCall(names[i], "".join(arguments[i])) for i in streamer.ok_calls]
        return content + tail, calls

    def streamer(self) -> ToolStreamer:
        """A fresh incremental parser for one response."""
        return self._streamer_class()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"


class HermesToolParser(ToolParser):
    """``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` (Hermes, Qwen2.5, SmolLM2)."""

    name = "hermes"
    _streamer_class = HermesStreamer


class Llama3JsonToolParser(ToolParser):
    """``{"name": ..., "parameters": {...}}``; ... as the whole output (Llama 3.1-3.3)."""

    name = "llama3_json"
    _streamer_class = Llama3JsonStreamer


class MistralToolParser(ToolParser):
    """``[TOOL_CALLS][{...}, ...]`` or ``[TOOL_CALLS]name[ARGS]{...}`` (Mistral)."""

    name = "mistral"
    _streamer_class = MistralStreamer


PARSERS: dict[str, ToolParser] = {
    p.name: p for p in (HermesToolParser(), Llama3JsonToolParser(), MistralToolParser())
}

# Llama 3's templates describe the call format as {"name": function name, "parameters": ...}
_LLAMA3_STYLE = re.compile(r'"name"\s*:[^,{}]*,\s*"parameters"\s*:')


def detect_tool_parser(chat_template: str | None) -> ToolParser | None:
    """The parser matching a chat template's text: hermes if it mentions ``<tool_call>``,
    mistral if ``[TOOL_CALLS]``, llama3_json if ``<|python_tag|>`` or a Llama-3 style
    ``"name": ..., "parameters":`` description; None otherwise (or without a template)."""
    if not chat_template:
        return None
    if "<tool_call>" in chat_template:
        return PARSERS["hermes"]
    if "[TOOL_CALLS]" in chat_template:
        return PARSERS["mistral"]
    if "<|python_tag|>" in chat_template or _LLAMA3_STYLE.search(chat_template):
        return PARSERS["llama3_json"]
    return None


def get_tool_parser(name: str) -> ToolParser:
    """The parser registered as `name`; a ValueError naming the valid choices otherwise."""
    try:
        return PARSERS[name]
    except KeyError:
        raise ValueError(
            f"unknown tool parser {name!r}; choose one of: {', '.join(sorted(PARSERS))}"
        ) from None
