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
        """Advance the parser's state machine over the text so far. Each state has a handler,
        `_on_<state>(final)`, that returns True when it moved on (run the next state) and False
        when it needs more text (or, with `final`, has decided everything)."""
        while getattr(self, f"_on_{self._state}")(final):
            pass

    def _on_all_content(self, final: bool) -> bool:
        """After a malformed call whose rest cannot be a call: everything is content."""
        self._emit(self._text[self._pos :])
        self._pos = len(self._text)
        return False

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

    def _on_content(self, final: bool) -> bool:
        i = self._content_until(self.OPEN, final)
        if i is None:
            return False
        self._segment = i
        self._begin_call(CallObject(i + len(self.OPEN), ("arguments",)))
        self._state = "call"
        return True

    def _on_call(self, final: bool) -> bool:
        call = self._advance_call(final)
        if call.failed:
            self._state = "malformed"
        elif call.done:
            self._pos, self._state = call.end, "after_call"
        else:
            return False
        return True

    def _on_after_call(self, final: bool) -> bool:
        text = self._text
        i = skip_ws(text, self._pos)
        if text.startswith(self.CLOSE, i):
            self._accept_call()
            self._pos, self._state = i + len(self.CLOSE), "content"
            return True
        if self.CLOSE.startswith(text[i:]):  # nothing yet, or a cut-short close tag
            if final:
                self._accept_call()
                self._pos = len(text)
            return False
        self._state = "malformed"
        return True

    def _on_malformed(self, final: bool) -> bool:
        """The segment through the first closing tag is content."""
        self._call = None
        text = self._text
        i = text.find(self.CLOSE, self._segment + len(self.OPEN))
        if i < 0 and not final:
            return False
        end = len(text) if i < 0 else i + len(self.CLOSE)
        self._emit(text[self._segment : end])
        self._pos, self._state = end, "content"
        return True


class Llama3JsonStreamer(ToolStreamer):
    TAG = "<|python_tag|>"
    ARG_KEYS = ("parameters", "arguments")

    def __init__(self) -> None:
        super().__init__()
        self._state = "start"
        self._good_end = 0  # where the last well-formed call ends

    def _on_start(self, final: bool) -> bool:
        text = self._text
        i = skip_ws(text, 0)
        if text.startswith(self.TAG, i):
            i = skip_ws(text, i + len(self.TAG))
        elif self.TAG.startswith(text[i:]):  # undecided: empty or a partial tag
            if final:
                self._rest_is_content(0)
            return False
        if i >= len(text):
            if final:
                self._rest_is_content(0)
            return False
        if text[i] != "{":
            self._rest_is_content(0)
            return False
        self._begin_call(CallObject(i, self.ARG_KEYS))
        self._state = "call"
        return True

    def _on_call(self, final: bool) -> bool:
        call = self._advance_call(final)
        if call.failed:
            self._rest_is_content(self._good_end)
            return False
        if not call.done:
            return False
        self._accept_call()
        self._pos = self._good_end = call.end
        self._state = "after_call"
        return True

    def _on_after_call(self, final: bool) -> bool:
        """`;` and the next call, or the end."""
        text = self._text
        i = skip_ws(text, self._pos)
        if i < len(text) and text[i] == ";":
            i = skip_ws(text, i + 1)
            if i >= len(text):
                return False
            if text[i] == "{":
                self._begin_call(CallObject(i, self.ARG_KEYS))
                self._state = "call"
                return True
        if i < len(text):
            self._rest_is_content(self._good_end)
        return False


class MistralStreamer(ToolStreamer):
    MARKER, ARGS = "[TOOL_CALLS]", "[ARGS]"
    NAME = re.compile(r"[A-Za-z0-9_.\-]+")

    def __init__(self) -> None:
        super().__init__()
        self._segment = 0  # where the current [TOOL_CALLS] starts
        self._good_end: int | None = None  # end of this segment's last well-formed call

    def _malformed(self) -> bool:
        start = self._segment if self._good_end is None else self._good_end
        self._rest_is_content(start)
        return False

    def _on_content(self, final: bool) -> bool:
        i = self._content_until(self.MARKER, final)
        if i is None:
            return False
        self._segment, self._good_end = i, None
        self._pos, self._state = i + len(self.MARKER), "after_marker"
        return True

    def _on_after_marker(self, final: bool) -> bool:
        """A JSON array of calls, or a bare `name[ARGS]{...}` call."""
        i = skip_ws(self._text, self._pos)
        if i >= len(self._text):
            return self._malformed() if final else False
        if self._text[i] == "[":
            self._pos, self._state = i + 1, "element"
        else:
            self._pos, self._state = i, "name"
        return True

    def _on_name(self, final: bool) -> bool:
        text = self._text
        j = text.find(self.ARGS, self._pos)
        name = text[self._pos : j if j >= 0 else len(text)]
        if j < 0:
            name = name[: len(name) - partial_marker(text, self._pos, self.ARGS)]
        if (name and not self.NAME.fullmatch(name)) or (j >= 0 and not name):
            return self._malformed()
        if j < 0:
            return self._malformed() if final else False
        self._begin_call(BareArguments(name, j + len(self.ARGS)))
        self._state = "bare_call"
        return True

    def _on_bare_call(self, final: bool) -> bool:
        return self._finish_call(final, "content")

    def _on_call(self, final: bool) -> bool:
        return self._finish_call(final, "after_element")

    def _finish_call(self, final: bool, then: str) -> bool:
        """Parse the current call further; once it is done, go on in state `then`."""
        call = self._advance_call(final)
        if call.failed:
            return self._malformed()
        if not call.done:
            return False
        self._accept_call()
        self._pos = self._good_end = call.end
        self._state = then
        return True

    def _on_element(self, final: bool) -> bool:
        i = skip_ws(self._text, self._pos)
        if i >= len(self._text):
            return self._malformed() if final else False
        if self._text[i] != "{":
            return self._malformed()
        self._begin_call(CallObject(i, ("arguments",)))
        self._state = "call"
        return True

    def _on_after_element(self, final: bool) -> bool:
        i = skip_ws(self._text, self._pos)
        if i >= len(self._text):
            return False  # an array cut short after a complete call still has its calls
        if self._text[i] == ",":
            self._pos, self._state = i + 1, "element"
        elif self._text[i] == "]":
            self._pos, self._state = i + 1, "content"
        else:
            return self._malformed()
        return True
