"""The JSON of a tool call, scanned incrementally: where a JSON value ends (`_ValueScanner`), and
the progress of one call's object (`CallObject`: ``{"name": ..., "arguments": {...}}``) or of a
bare arguments object (`BareArguments`) as text arrives. The streamers in `tool_streamers`
drive them."""

from __future__ import annotations

import json
import re
from typing import Any

_WS = " \t\n\r"  # JSON's whitespace
_STRING_SPECIAL = re.compile(r'["\\]')
_CONTAINER_SPECIAL = re.compile(r'["{}\[\]]')
_BARE_END = re.compile(r"[,}\] \t\n\r]")


def skip_ws(text: str, i: int) -> int:
    n = len(text)
    while i < n and text[i] in _WS:
        i += 1
    return i


def partial_marker(text: str, start: int, marker: str) -> int:
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


class ScannedCall:
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


class CallObject(ScannedCall):
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
            i = skip_ws(text, self._pos)
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


class BareArguments(ScannedCall):
    """An arguments object alone (mistral's ``name[ARGS]{...}``), the name already known."""

    def __init__(self, name: str, start: int) -> None:
        super().__init__()
        self.name = name
        self._pos = start
        self._scanner: _ValueScanner | None = None

    def advance(self, text: str, final: bool) -> None:
        if self._scanner is None:
            i = skip_ws(text, self._pos)
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
