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

import json
import re
from dataclasses import dataclass
from typing import Any

_WS = " \t\n\r"  # JSON's whitespace
_STRING_SPECIAL = re.compile(r'["\\]')
_CONTAINER_SPECIAL = re.compile(r'["{}\[\]]')
_BARE_END = re.compile(r"[,}\] \t\n\r]")


@dataclass(frozen=True)
class ToolCall:
    """One tool call: the function's name and its arguments object's JSON text as written."""

    name: str
    arguments: str


@dataclass(frozen=True)
class ToolCallDelta:
    """A streamed piece of the call numbered `index` (0, 1, ... within one response): `name` is
    set on its first delta only; `arguments` is the next fragment of the arguments text."""

    index: int
    name: str | None
    arguments: str


def _skip_ws(text: str, i: int) -> int:
    n = len(text)
    while i < n and text[i] in _WS:
        i += 1
    return i


def _partial_marker(text: str, start: int, marker: str) -> int:
    """Length of the longest suffix of text[start:] that is a proper prefix of `marker`."""
    for k in range(min(len(marker) - 1, len(text) - start), 0, -1):
        if text.endswith(marker[:k]):
            return k
    return 0


def _loads(raw: str) -> tuple[bool, Any]:
    try:
        return True, json.loads(raw)
    except ValueError:
        return False, None


class _ValueScanner:
    """Where one JSON value starting at `start` ends, found incrementally by tracking string,
    escape and nesting state. It does not validate the value (json.loads does, once it ends);
    `pos` never passes the end."""

    def __init__(self, start: int) -> None:
        self.start = self.pos = start
        self.end: int | None = None
        self._depth = 0
        self._in_string = False
        self._escape = False
        self._bare = False  # a number or literal: ends at a delimiter

    def advance(self, text: str, final: bool) -> None:
        i, n = self.pos, len(text)
        while i < n and self.end is None:
            if self._escape:
                self._escape = False
                i += 1
            elif self._in_string:
                m = _STRING_SPECIAL.search(text, i)
                if m is None:
                    i = n
                elif m.group() == "\\":
                    self._escape = True
                    i = m.end()
                else:
                    self._in_string = False
                    i = m.end()
                    if self._depth == 0:
                        self.end = i
            elif self._bare:
                m = _BARE_END.search(text, i)
                if m is None:
                    i = n
                else:
                    i = self.end = m.start()
            elif i == self.start:
                c = text[i]
                if c == '"':
                    self._in_string = True
                    i += 1
                elif c in "{[":
                    self._depth = 1
                    i += 1
                else:
                    self._bare = True
            else:
                m = _CONTAINER_SPECIAL.search(text, i)
                if m is None:
                    i = n
                    continue
                c, i = m.group(), m.end()
                if c == '"':
                    self._in_string = True
                elif c in "{[":
                    self._depth += 1
                else:
                    self._depth -= 1
                    if self._depth == 0:
                        self.end = i
        self.pos = i
        if final and self.end is None and self._bare:
            self.end = n


class _Call:
    """Progress of one call being parsed: a name once known and the span of arguments text seen
    so far (`args_start`..`args_pos`, None before the arguments begin)."""

    def __init__(self) -> None:
        self.name: str | None = None
        self.args_start: int | None = None
        self.args_pos = 0
        self.done = False  # parsed and well formed; `end` is where its text ends
        self.failed = False
        self.end = 0

    def advance(self, text: str, final: bool) -> None:
        raise NotImplementedError


class _CallObject(_Call):
    """An object ``{"name": "...", "<args key>": {...}, ...}`` starting at `start` (after any
    whitespace). Other keys are allowed and ignored; a repeated name or arguments key fails."""

    def __init__(self, start: int, arg_keys: tuple[str, ...]) -> None:
        super().__init__()
        self._arg_keys = arg_keys
        self._pos = start
        self._state = "open"
        self._key = ""
        self._is_args = False  # the current key is one of `arg_keys`
        self._scanner: _ValueScanner | None = None

    def advance(self, text: str, final: bool) -> None:
        while not (self.done or self.failed):
            if self._state in ("key_string", "value"):
                scanner = self._scanner
                assert scanner is not None
                scanner.advance(text, final)
                if self._state == "value" and self._is_args:
                    self.args_pos = scanner.pos
                if scanner.end is None:
                    if final:
                        self.failed = True
                    return
                self._pos = scanner.end
                self._value_done(text[scanner.start : scanner.end])
                continue
            i = _skip_ws(text, self._pos)
            if i >= len(text):
                self._pos = i
                self.failed = final
                return
            self._step(text[i], i)

    def _step(self, c: str, i: int) -> None:
        state = self._state
        if state == "open" and c == "{":
            self._state = "key_or_close"
        elif state in ("key_or_close", "key") and c == '"':
            self._scanner = _ValueScanner(i)
            self._state = "key_string"
            return
        elif state == "colon" and c == ":":
            self._state = "value_start"
        elif state == "value_start":
            self._start_value(c, i)
            return
        elif state == "after_value" and c == ",":
            self._state = "key"
        elif state in ("key_or_close", "after_value") and c == "}":
            self.end = i + 1
            self.done = self.name is not None
            self.failed = not self.done
        else:
            self.failed = True
        self._pos = i + 1

    def _start_value(self, c: str, i: int) -> None:
        if self._is_args:
            if c != "{" or self.args_start is not None:
                self.failed = True
                return
            self.args_start = self.args_pos = i
        elif self._key == "name":
            if c != '"' or self.name is not None:
                self.failed = True
                return
        self._scanner = _ValueScanner(i)
        self._state = "value"

    def _value_done(self, raw: str) -> None:
        ok, value = _loads(raw)
        if not ok:
            self.failed = True
        elif self._state == "key_string":
            self._key, self._is_args = value, value in self._arg_keys
            self._state = "colon"
        else:
            if self._key == "name":
                if not value:
                    self.failed = True
                    return
                self.name = value
            self._state = "after_value"


class _BareArguments(_Call):
    """An arguments object alone (mistral's ``name[ARGS]{...}``), the name already known."""

    def __init__(self, name: str, start: int) -> None:
        super().__init__()
        self.name = name
        self._pos = start
        self._scanner: _ValueScanner | None = None

    def advance(self, text: str, final: bool) -> None:
        if self._scanner is None:
            i = _skip_ws(text, self._pos)
            if i >= len(text):
                self._pos = i
                self.failed = final
                return
            if text[i] != "{":
                self.failed = True
                return
            self._scanner = _ValueScanner(i)
            self.args_start = i
        scanner = self._scanner
        scanner.advance(text, final)
        self.args_pos = scanner.pos
        if scanner.end is None:
            self.failed = final
            return
        self.end = scanner.end
        self.done = _loads(text[scanner.start : scanner.end])[0]
        self.failed = not self.done


class ToolStreamer:
    """Incremental tool-call parsing of one response's text (see the module docstring for what
    the stream guarantees against `ToolParser.extract`). Feed it text pieces in order, then call
    `finish` once."""

    def __init__(self) -> None:
        self._text = ""
        self._pos = 0  # text before it is decided (emitted as content or part of a call)
        self._state = "content"
        self._content: list[str] = []
        self._deltas: list[ToolCallDelta] = []
        self._content_started = False
        self._pending_ws = ""
        self._next_index = 0
        self._call: _Call | None = None
        self._call_index: int | None = None
        self._call_sent = 0  # where the current call's arguments text has been sent up to
        self._ok: list[int] = []  # indices of the calls that turned out well formed
        self._finished = False

    def feed(self, delta: str) -> tuple[str, list[ToolCallDelta]]:
        """Content text safe to emit now, and tool-call deltas. Text that might be the start of
        a tool-call marker is held back until it is decided."""
        if self._finished:
            raise RuntimeError("feed() after finish()")
        self._text += delta
        self._run(final=False)
        return self._drain()

    def finish(self) -> tuple[str, list[ToolCallDelta]]:
        """Flush at the end of generation: held-back text that turned out not to be a call is
        content; a call left incomplete is malformed (see the module docstring)."""
        if self._finished:
            raise RuntimeError("finish() called twice")
        self._finished = True
        self._run(final=True)
        return self._drain()

    def _run(self, final: bool) -> None:
        raise NotImplementedError

    def _drain(self) -> tuple[str, list[ToolCallDelta]]:
        merged: list[ToolCallDelta] = []
        for d in self._deltas:
            if merged and merged[-1].index == d.index and d.name is None:
                last = merged.pop()
                d = ToolCallDelta(last.index, last.name, last.arguments + d.arguments)
            merged.append(d)
        content = "".join(self._content)
        self._content.clear()
        self._deltas.clear()
        return content, merged

    def _emit(self, text: str) -> None:
        """Content: leading whitespace of the whole is dropped, trailing whitespace held."""
        if not self._content_started:
            text = text.lstrip()
            if not text:
                return
            self._content_started = True
        text = self._pending_ws + text
        kept = text.rstrip()
        self._pending_ws = text[len(kept) :]
        if kept:
            self._content.append(kept)

    def _begin_call(self, call: _Call) -> None:
        self._call, self._call_index, self._call_sent = call, None, 0

    def _advance_call(self, final: bool) -> _Call:
        """Parse the current call further and send what became known: its name (with the
        arguments text seen so far) and then argument fragments; "{}" when it had none."""
        call = self._call
        assert call is not None
        call.advance(self._text, final)
        if call.name is not None and not call.failed:
            name = None
            if self._call_index is None:
                self._call_index, self._next_index = self._next_index, self._next_index + 1
                name = call.name
            if call.args_start is None:
                fragment = "{}" if call.done else ""
            else:
                fragment = self._text[max(self._call_sent, call.args_start) : call.args_pos]
                self._call_sent = call.args_pos
            if name is not None or fragment:
                self._deltas.append(ToolCallDelta(self._call_index, name, fragment))
        return call

    def _accept_call(self) -> None:
        if self._call_index is not None:
            self._ok.append(self._call_index)
        self._call = None

    def _content_until(self, marker: str, final: bool) -> int | None:
        """Emit content up to `marker` and return its position; without it, emit all but a
        possible start of the marker and return None."""
        i = self._text.find(marker, self._pos)
        if i >= 0:
            self._emit(self._text[self._pos : i])
            self._pos = i
            return i
        keep = 0 if final else _partial_marker(self._text, self._pos, marker)
        end = len(self._text) - keep
        self._emit(self._text[self._pos : end])
        self._pos = end
        return None

    def _rest_is_content(self, start: int) -> None:
        self._call = None
        self._pos = start
        self._state = "all_content"
        self._emit(self._text[start:])
        self._pos = len(self._text)


class _HermesStreamer(ToolStreamer):
    OPEN, CLOSE = "<tool_call>", "</tool_call>"

    def __init__(self) -> None:
        super().__init__()
        self._segment = 0  # where the current <tool_call> starts

    def _run(self, final: bool) -> None:
        text = self._text
        while True:
            state = self._state
            if state == "content":
                i = self._content_until(self.OPEN, final)
                if i is None:
                    return
                self._segment = i
                self._begin_call(_CallObject(i + len(self.OPEN), ("arguments",)))
                self._state = "call"
            elif state == "call":
                call = self._advance_call(final)
                if call.failed:
                    self._state = "malformed"
                elif call.done:
                    self._pos, self._state = call.end, "after_call"
                else:
                    return
            elif state == "after_call":
                i = _skip_ws(text, self._pos)
                if text.startswith(self.CLOSE, i):
                    self._accept_call()
                    self._pos, self._state = i + len(self.CLOSE), "content"
                elif self.CLOSE.startswith(text[i:]):  # nothing yet, or a cut-short close tag
                    if final:
                        self._accept_call()
                        self._pos = len(text)
                    return
                else:
                    self._state = "malformed"
            else:  # "malformed": the segment through the first closing tag is content
                self._call = None
                i = text.find(self.CLOSE, self._segment + len(self.OPEN))
                if i < 0 and not final:
                    return
                end = len(text) if i < 0 else i + len(self.CLOSE)
                self._emit(text[self._segment : end])
                self._pos, self._state = end, "content"


class _Llama3JsonStreamer(ToolStreamer):
    TAG = "<|python_tag|>"
    ARG_KEYS = ("parameters", "arguments")

    def __init__(self) -> None:
        super().__init__()
        self._state = "start"
        self._good_end = 0  # where the last well-formed call ends

    def _run(self, final: bool) -> None:
        text = self._text
        while True:
            state = self._state
            if state == "start":
                i = _skip_ws(text, 0)
                if text.startswith(self.TAG, i):
                    i = _skip_ws(text, i + len(self.TAG))
                elif self.TAG.startswith(text[i:]):  # undecided: empty or a partial tag
                    if final:
                        self._rest_is_content(0)
                    return
                if i >= len(text):
                    if final:
                        self._rest_is_content(0)
                    return
                if text[i] != "{":
                    self._rest_is_content(0)
                    return
                self._begin_call(_CallObject(i, self.ARG_KEYS))
                self._state = "call"
            elif state == "call":
                call = self._advance_call(final)
                if call.failed:
                    self._rest_is_content(self._good_end)
                    return
                if not call.done:
                    return
                self._accept_call()
                self._pos = self._good_end = call.end
                self._state = "after_call"
            elif state == "after_call":  # `;` and the next call, or the end
                i = _skip_ws(text, self._pos)
                if i < len(text) and text[i] == ";":
                    i = _skip_ws(text, i + 1)
                    if i >= len(text):
                        return
                    if text[i] == "{":
                        self._begin_call(_CallObject(i, self.ARG_KEYS))
                        self._state = "call"
                        continue
                if i < len(text):
                    self._rest_is_content(self._good_end)
                return
            else:  # "all_content"
                self._emit(text[self._pos :])
                self._pos = len(text)
                return


class _MistralStreamer(ToolStreamer):
    MARKER, ARGS = "[TOOL_CALLS]", "[ARGS]"
    NAME = re.compile(r"[A-Za-z0-9_.\-]+")

    def __init__(self) -> None:
        super().__init__()
        self._segment = 0  # where the current [TOOL_CALLS] starts
        self._good_end: int | None = None  # end of this segment's last well-formed call

    def _malformed(self) -> None:
        start = self._segment if self._good_end is None else self._good_end
        self._rest_is_content(start)

    def _run(self, final: bool) -> None:
        text = self._text
        while True:
            state = self._state
            if state == "content":
                i = self._content_until(self.MARKER, final)
                if i is None:
                    return
                self._segment, self._good_end = i, None
                self._pos, self._state = i + len(self.MARKER), "after_marker"
            elif state == "after_marker":
                i = _skip_ws(text, self._pos)
                if i >= len(text):
                    if final:
                        self._malformed()
                    return
                if text[i] == "[":
                    self._pos, self._state = i + 1, "element"
                else:
                    self._pos, self._state = i, "name"
            elif state == "name":
                j = text.find(self.ARGS, self._pos)
                name = text[self._pos : j if j >= 0 else len(text)]
                if j < 0:
                    name = name[: len(name) - _partial_marker(text, self._pos, self.ARGS)]
                if (name and not self.NAME.fullmatch(name)) or (j >= 0 and not name):
                    self._malformed()
                    return
                if j < 0:
                    if final:
                        self._malformed()
                    return
                self._begin_call(_BareArguments(name, j + len(self.ARGS)))
                self._state = "bare_call"
            elif state in ("bare_call", "call"):
                call = self._advance_call(final)
                if call.failed:
                    self._malformed()
                    return
                if not call.done:
                    return
                self._accept_call()
                self._pos = self._good_end = call.end
                self._state = "content" if state == "bare_call" else "after_element"
            elif state == "element":
                i = _skip_ws(text, self._pos)
                if i >= len(text):
                    if final:
                        self._malformed()
                    return
                if text[i] != "{":
                    self._malformed()
                    return
                self._begin_call(_CallObject(i, ("arguments",)))
                self._state = "call"
            elif state == "after_element":
                i = _skip_ws(text, self._pos)
                if i >= len(text):
                    return  # an array cut short after a complete call still has its calls
                if text[i] == ",":
                    self._pos, self._state = i + 1, "element"
                elif text[i] == "]":
                    self._pos, self._state = i + 1, "content"
                else:
                    self._malformed()
                    return
            else:  # "all_content"
                self._emit(text[self._pos :])
                self._pos = len(text)
                return


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
        calls = [ToolCall(names[i], "".join(arguments[i])) for i in streamer._ok]
        return content + tail, calls

    def streamer(self) -> ToolStreamer:
        """A fresh incremental parser for one response."""
        return self._streamer_class()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"


class HermesToolParser(ToolParser):
    """``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` (Hermes, Qwen2.5, SmolLM2)."""

    name = "hermes"
    _streamer_class = _HermesStreamer


class Llama3JsonToolParser(ToolParser):
    """``{"name": ..., "parameters": {...}}``; ... as the whole output (Llama 3.1-3.3)."""

    name = "llama3_json"
    _streamer_class = _Llama3JsonStreamer


class MistralToolParser(ToolParser):
    """``[TOOL_CALLS][{...}, ...]`` or ``[TOOL_CALLS]name[ARGS]{...}`` (Mistral)."""

    name = "mistral"
    _streamer_class = _MistralStreamer


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
