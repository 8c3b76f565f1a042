"""Draft tokens for speculative decoding by prompt lookup (n-gram matching), on the host.

A sequence's last n tokens often occurred before, in its prompt or its own output (code being
edited, a document being summarised or quoted, a repeated structure): the tokens that followed
that earlier occurrence are a cheap guess at what comes next. The target model then checks
every guess of a step in one forward pass (`sample/rejection.py`), so a right guess costs a
row of a batched step instead of a step of its own.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


class NgramProposer:
    """Proposes up to k tokens: the ones that followed the latest earlier occurrence of the
    sequence's last n tokens, trying n from `max_n` down to `min_n` (the longest match wins)."""

    def __init__(self, min_n: int, max_n: int) -> None:
        if not 1 <= min_n <= max_n:
            raise ValueError(
                f"need 1 <= prompt_lookup_min <= prompt_lookup_max, got {min_n}, {max_n}"
            )
        self.min_n = min_n
        self.max_n = max_n

    def propose(self, token_ids: list[int], k: int) -> list[int]:
        """At most `k` draft tokens to follow `token_ids` (none when no n-gram matches)."""
        length = len(token_ids)
        if k <= 0 or length <= self.min_n:
            return []
        tokens = np.asarray(token_ids, dtype=np.int64)
        for n in range(min(self.max_n, length - 1), self.min_n - 1, -1):
            # windows starting at 0 .. length - n - 1: every earlier place of the last n tokens
            windows = sliding_window_view(tokens[:-1], n)
            hits = np.flatnonzero((windows == tokens[-n:]).all(axis=1))
            if len(hits):
                start = int(hits[-1]) + n
                return tokens[start : start + k].tolist()
        return []
