"""The engine's structured-output bookkeeping: requests waiting outside the scheduler while their
grammar compiles (`GrammarQueue`), the token masks of a step's constrained rows, and feeding each
sample's accepted tokens to its grammar."""

from __future__ import annotations

import concurrent.futures
import logging

from tokenmill.core.outputs import SchedulerOutput
from tokenmill.core.request import RequestStatus
from tokenmill.engine.request_state import RequestState, SampleState
from tokenmill.engine.structured_output import StructuredOutputManager
from tokenmill.sample.metadata import TokenBitmasks

logger = logging.getLogger(__name__)


class GrammarQueue:
    """Requests whose grammar is still compiling, in arrival order. `admit` hands over those
    whose grammar is ready (each sample given its matcher) and those whose grammar failed."""

    def __init__(self, manager: StructuredOutputManager) -> None:
        self.manager = manager
        self._waiting: dict[str, RequestState] = {}  # request id -> request, in arrival order

    def __bool__(self) -> bool:
        return bool(self._waiting)

    def add(self, group: RequestState) -> None:
        """Queue a request whose `grammar` future was submitted."""
        assert group.grammar is not None
        self._waiting[group.request_id] = group

    def discard(self, request_id: str) -> None:
        """Forget a request (aborted); no-op when it is not waiting."""
        self._waiting.pop(request_id, None)

    @property
    def num_sequences(self) -> int:
        """Samples waiting here (each of a request's n counts)."""
        return sum(len(g.samples) for g in self._waiting.values())

    def admit(self) -> tuple[list[RequestState], list[RequestState]]:
        """The requests whose grammar is compiled now, their samples given matchers, and those
        whose grammar does not compile (their error set, their samples aborted). Never waits."""
        ready, failed = [], []
        for rid, group in list(self._waiting.items()):
            fut = group.grammar
            assert fut is not None
            if not fut.done():
                continue
            del self._waiting[rid]
            error = fut.exception()
            if error is not None:
                group.error = str(error)
                for s in group.samples:
                    s.request.status = RequestStatus.FINISHED_ABORTED
                failed.append(group)
                continue
            for s in group.samples:
                s.matcher = self.manager.new_matcher(fut.result())
                spec = s.request.sampling_params.structured_outputs
                s.grammar_after = spec.after_token_id if spec is not None else None
            ready.append(group)
        return ready, failed

    def wait(self, timeout: float) -> None:
        """Block until one of the grammars is compiled, or `timeout` seconds."""
        concurrent.futures.wait(
            [g.grammar for g in self._waiting.values()],
            timeout=timeout,
            return_when=concurrent.futures.FIRST_COMPLETED,
        )

    def token_bitmasks(
        self, sched: SchedulerOutput, samples: dict[str, SampleState]
    ) -> TokenBitmasks | None:
        """The masks of this step's sampling rows whose grammar applies (None if none does:
        a grammar waiting for its `grammar_after` token does not yet); `samples` maps core
        request ids to their samples."""
        rids, matchers = [], []
        for s in sched.scheduled:
            sample = samples.get(s.request_id) if s.samples else None
            if sample is not None and sample.matcher is not None and sample.grammar_after is None:
                rids.append(s.request_id)
                matchers.append(sample.matcher)
        if not matchers:
            return None
        return TokenBitmasks(rids, self.manager.fill_bitmask(matchers))


def advance_grammar(sample: SampleState, new_ids: list[int]) -> bool:
    """Feed accepted tokens to the sample's grammar (those after its `grammar_after` token,
    while it waits for one). True when the grammar is complete (or broken) while the request
    still runs: the caller ends the output (finish_reason "stop")."""
    req = sample.request
    matcher = sample.matcher
    assert matcher is not None
    if sample.grammar_after is not None:
        if sample.grammar_after not in new_ids:
            return False
        new_ids = new_ids[new_ids.index(sample.grammar_after) + 1 :]
        sample.grammar_after = None
    for token in new_ids:
        if token in req.eos_token_ids and req.is_finished:
            break  # the end of the output (the grammar allowed it)
        if not matcher.accept(token):
            logger.error(
                "%s: sampled token %d outside its grammar (%s); ending the request",
                req.request_id,
                token,
                matcher.error,
            )
            break
    return bool(matcher.is_terminated or matcher.error) and not req.is_finished
