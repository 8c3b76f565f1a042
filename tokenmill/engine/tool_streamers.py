"""`ToolStreamer`, the incremental tool-call parser of one response, and its subclass per format
(hermes, llama3_json, mistral). What the stream guarantees against `ToolParser.extract` is in
`tool_parsers`' module docstring."""

from __future__ import annotations

import re
from dataclasses import dataclass

from tokenmill.engine.tool_json import (
    BareArguments,
    CallObject,
    ScannedCall,
    partial_marker,
    skip_ws,
)


@dataclass(frozen=True)
class ToolCallDelta:
    """A streamed piece of the call numbered `index` (0, 1, ... within one response): `name` is
    set on its first delta only; `arguments` is the next fragment of the arguments text."""

    index: int
    name: str | None
    arguments: str


class ToolStreamer:
    """Incremental tool-call parsing of one response's text (see `tool_parsers`' module docstring
    for what the stream guarantees against `ToolParser.extract`). Feed it text pieces in order,
    then call `finish` once."""

    def __init__(self) -> None:
        self._text = ""
        self._pos = 0  # text before it is decided (emitted as content or part of a call)
        self._state = "content"
        self._content: list[str] = []
        self._deltas: list[ToolCallDelta] = []
        self._content_started = False
        self._pending_ws = ""
        self._next_index = 0
        self._call: ScannedCall | None = None
        self._call_index: int | None = None
        self._call_sent = 0  # where the current call's arguments text has been sent up to
        self.ok_calls: list[int] = []  # indices of the calls that turned out well formed
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
        content; a call left incomplete is malformed (see `tool_parsers`' module docstring)."""
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

    def _begin_call(self, call: ScannedCall) -> None:
        self._call, self._call_index, self._call_sent = call, None, 0

    def _advance_call(self, final: bool) -> ScannedCall:
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
            self.ok_calls.append(self._call_index)
        self._call = None

    def _content_until(self, marker: str, final: bool) -> int | None:
        """Emit content up to `marker` and return its position; without it, emit all but a
        possible start of the marker and return None."""
        i = self._text.find(marker, self._pos)
        if i >= 0:
            self._emit(self._text[self._pos : i])
            self._pos = i
            return i
        keep = 0 if final else partial_marker(self._text, self._pos, marker)
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


class HermesStreamer(ToolStreamer):
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
                self._begin_call(CallObject(i + len(self.OPEN), ("arguments",)))
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
                i = skip_ws(text, self._pos)
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


class Llama3JsonStreamer(ToolStreamer):
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
                i = skip_ws(text, 0)
                if text.startswith(self.TAG, i):
                    i = skip_ws(text, i + len(self.TAG))
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
                self._begin_call(CallObject(i, self.ARG_KEYS))
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
                i = skip_ws(text, self._pos)
                if i < len(text) and text[i] == ";":
                    i = skip_ws(text, i + 1)
                    if i >= len(text):
                        return
                    if text[i] == "{":
                        self._begin_call(CallObject(i, self.ARG_KEYS))
                        self._state = "call"
                        continue
                if i < len(text):
                    self._rest_is_content(self._good_end)
                return
            else:  # "all_content"
                self._emit(text[self._pos :])
                self._pos = len(text)
                return


class MistralStreamer(ToolStreamer):
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
                i = skip_ws(text, self._pos)
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
                    name = name[: len(name) - partial_marker(text, self._pos, self.ARGS)]
                if (name and not self.NAME.fullmatch(name)) or (j >= 0 and not name):
                    self._malformed()
                    return
                if j < 0:
                    if final:
                        self._malformed()
                    return
                self._begin_call(BareArguments(name, j + len(self.ARGS)))
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
                i = skip_ws(text, self._pos)
                if i >= len(text):
                    if final:
                        self._malformed()
                    return
                if text[i] != "{":
                    self._malformed()
                    return
                self._begin_call(CallObject(i, ("arguments",)))
                self._state = "call"
            elif state == "after_element":
                i = skip_ws(text, self._pos)
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
