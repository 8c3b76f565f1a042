"""Incremental detokenization: new token ids -> releasable text deltas, with stop strings.

Two things make streaming text harder than decoding once at the end:

* One character can span several tokens (byte-level BPE pieces of a multi-byte UTF-8 character,
  sentencepiece `<0xNN>` byte-fallback tokens). We decode a small window of recent tokens twice,
  without and with the new ones (`prefix_offset` .. `read_offset` .. end), emit the difference, and
  wait while the result still ends in U+FFFD (an unfinished character). The window starts inside
  the prompt so that a first output token like "▁Hello" keeps its leading space.
* A stop string can span tokens. Text that could still be the start of a stop string is held
  back until it either completes the stop string (then it is cut, never emitted) or diverges.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from tokenmill.engine.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

# How many prompt tokens seed the decode window (enough to settle leading-space handling).
INITIAL_PROMPT_WINDOW = 5
_REPLACEMENT_CHAR = "\ufffd"
_MAX_DEAD_IDS = 256


class IncrementalDetokenizer:
    """Turns one request's output tokens into text deltas as they arrive.

    `add_tokens` returns the text that can be released now; `flush` releases what was held back
    when the request ends for a reason other than a stop string. `text` is everything released so
    far (so after `flush`, or once a stop string matched, the whole output text).

    `deferred` (no stop strings, and nobody reads the text before the end: an offline request
    whose output is returned once) makes `add_tokens` only collect the ids and `flush` decode
    them in one step of the same window algorithm: two tokenizer calls per request instead of
    two per token.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_token_ids: Sequence[int],
        skip_special_tokens: bool = True,
        stop: Sequence[str] | str | None = (),
        include_stop_str_in_output: bool = False,
        deferred: bool = False,
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.stop = [stop] if isinstance(stop, str) else [s for s in stop or () if s]
        self.include_stop_str_in_output = include_stop_str_in_output
        self.output_token_ids: list[int] = []
        self.stop_reason: str | None = None
        # Decode window over self._ids = prompt tail + output ids.
        self._ids: list[int] = list(prompt_token_ids[-INITIAL_PROMPT_WINDOW:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._released: list[str] = []
        self._pending = ""  # decoded text not yet released (possible start of a stop string)
        self._finished = False
        if deferred and self.stop:
            raise ValueError("a detokenizer with stop strings cannot defer decoding")
        self._deferred = deferred

    @property
    def text(self) -> str:
        """The output text released so far (cut at the stop string, if one matched)."""
        if len(self._released) > 1:
            self._released = ["".join(self._released)]
        return self._released[0] if self._released else ""

    @property
    def finished(self) -> bool:
        """True once a stop string matched or `flush` was called; later tokens are ignored."""
        return self._finished

    def add_tokens(self, new_token_ids: Sequence[int]) -> str:
        """Feed newly sampled token ids; return the newly releasable text (possibly "")."""
        if self._finished:
            if new_token_ids:
                logger.debug(
                    "ignoring %d tokens after the detokenizer finished", len(new_token_ids)
                )
            return ""
        self.output_token_ids.extend(new_token_ids)
        self._ids.extend(new_token_ids)
        if self._deferred:
            return ""
        decoded = self._decode_new()
        if not decoded:
            return ""
        return self._emit(decoded, final=False)

    def flush(self) -> str:
        """Release all held-back text (the request ended without a stop string) and finish."""
        if self._finished:
            return ""
        released = ""
        tail = self._decode_window(self._prefix_offset, len(self._ids))
        if self._deferred and tail.endswith(_REPLACEMENT_CHAR):
            # The output ends inside a character. Decoded at once, a run of byte-fallback
            # tokens that ends unfinished is all U+FFFD; streamed, its whole characters were
            # released as they completed: replay the stream's steps, as if it had not deferred.
            ids = self._ids[self._read_offset :]
            del self._ids[self._read_offset :]
            for token in ids:
                self._ids.append(token)
                decoded = self._decode_new()
                if decoded:
                    released += self._emit(decoded, final=False)
            tail = self._decode_window(self._prefix_offset, len(self._ids))
        # an unfinished character at the very end is released as U+FFFD, as decode() would
        head = self._decode_window(self._prefix_offset, self._read_offset)
        self._read_offset = len(self._ids)
        return released + self._emit(tail[len(head) :], final=True)

    # ------------------------------------------------------------------------------- internals
    def _decode_window(self, start: int, end: int) -> str:
        if start >= end:
            return ""
        return self.tokenizer.decode(self._ids[start:end], self.skip_special_tokens)

    def _decode_new(self) -> str:
        """Text the tokens after `read_offset` add, once it ends on a whole character."""
        prefix_text = self._decode_window(self._prefix_offset, self._read_offset)
        new_text = self._decode_window(self._prefix_offset, len(self._ids))
        if len(new_text) <= len(prefix_text) or new_text.endswith(_REPLACEMENT_CHAR):
            # nothing yet (skipped special token) or an unfinished multi-byte character
            return ""
        if not new_text.startswith(prefix_text):
            logger.debug("decode window changed its prefix: %r -> %r", prefix_text, new_text)
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        if self._prefix_offset > _MAX_DEAD_IDS:  # drop ids the window will never look at again
            del self._ids[: self._prefix_offset]
            self._read_offset -= self._prefix_offset
            self._prefix_offset = 0
        return new_text[len(prefix_text) :]

    def _emit(self, decoded: str, final: bool) -> str:
        """Append decoded text, cut at a stop string, and release what is safe to show."""
        self._pending += decoded
        hit = self._find_stop()
        if hit is not None:
            start, stop_str = hit
            self.stop_reason = stop_str
            self._finished = True
            return self._release(
                start + len(stop_str) if self.include_stop_str_in_output else start
            )
        if final:
            self._finished = True
            return self._release(len(self._pending))
        return self._release(len(self._pending) - self._held_back_length())

    def _find_stop(self) -> tuple[int, str] | None:
        """Earliest stop string in the pending text (longest first among equal starts).

        Released text never holds the start of a stop string, so searching `_pending` suffices.
        """
        best: tuple[int, str] | None = None
        for stop_str in self.stop:
            index = self._pending.find(stop_str)
            if index < 0:
                continue
            if (
                best is None
                or index < best[0]
                or (index == best[0] and len(stop_str) > len(best[1]))
            ):
                best = (index, stop_str)
        return best

    def _held_back_length(self) -> int:
        """Length of the longest suffix of the pending text that begins some stop string."""
        longest = 0
        for stop_str in self.stop:
            for n in range(min(len(stop_str) - 1, len(self._pending)), longest, -1):
                if self._pending.endswith(stop_str[:n]):
                    longest = n
                    break
        return longest

    def _release(self, end: int) -> str:
        delta, self._pending = self._pending[:end], self._pending[end:]
        if self._finished:
            self._pending = ""  # text after a stop string is dropped
        if delta:
            self._released.append(delta)
        return delta
