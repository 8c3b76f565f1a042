"""Draft tokens for speculative decoding by prompt lookup (n-gram matching), on the host.

A sequence's last n tokens often occurred before, in its prompt or its own output (code being
edited, a document being summarised or quoted, a repeated structure): the tokens that followed
that earlier occurrence are a cheap guess at what comes next. The target model then checks
every guess of a step in one forward pass (`sample/rejection.py`), so a right guess costs a
row of a batched step instead of a step of its own.
"""

from __future__ import annotations

import numpy as np


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
        # every earlier place i of the last token, and how far back the match there reaches
        ends = np.flatnonzero(tokens[:-1] == tokens[-1])
        matched = np.ones(len(ends), dtype=np.int64)
        alive = np.ones(len(ends), dtype=bool)
        for j in range(1, min(self.max_n, length - 1)):
            back = ends - j
            alive &= back >= 0
            alive[alive] = tokens[back[alive]] == tokens[-1 - j]
            if not alive.any():
                break
            matched += alive
        if not len(ends) or matched.max() < self.min_n:
            return []
        # the longest match (up to max_n) wins; of those, the latest
        end = int(ends[np.flatnonzero(matched == matched.max())[-1]])
        return tokens[end + 1 : end + 1 + k].tolist()
