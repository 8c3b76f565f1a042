"""RequestStream: the outputs of one AsyncEngine request, read by the caller's asyncio code. Unread
outputs wait in one slot, merged (`merge_outputs`); a reader that stops taking them is given up
on (`StalledReaderError`)."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from tokenmill.outputs import EmbeddingRequestOutput, RequestOutput

if TYPE_CHECKING:
    from tokenmill.engine.async_engine import AsyncEngine


def merge_outputs(old: RequestOutput, new: RequestOutput) -> RequestOutput:
    """One output standing for `old` then `new`: the newer cumulative fields, the deltas of
    both joined, samples absent from `new` kept from `old`."""
    by_index = {o.index: o for o in old.outputs}
    for o in new.outputs:
        prev = by_index.get(o.index)
        by_index[o.index] = (
            o
            if prev is None
            else dataclasses.replace(
                o,
                delta_text=prev.delta_text + o.delta_text,
                delta_token_ids=prev.delta_token_ids + o.delta_token_ids,
            )
        )
    return dataclasses.replace(
        new,
        outputs=[by_index[i] for i in sorted(by_index)],
        prompt_logprobs=new.prompt_logprobs
        if new.prompt_logprobs is not None
        else old.prompt_logprobs,
    )


class RequestStream:
    """The outputs of one request, as they are produced. Leaving early aborts the request.

    Outputs wait in one slot: one the reader has not taken yet is merged with the next
    (`merge_outputs`), so a slow reader gets merged deltas and the memory held stays
    O(output). A reader that leaves an output untaken for longer than `stall_timeout` seconds
    is given up on: the request is aborted (its KV freed) and the stream ends with an error.
    """

    def __init__(
        self,
        engine: AsyncEngine,
        request_id: str,
        loop: asyncio.AbstractEventLoop,
        stall_timeout: float = 60.0,
    ) -> None:
        self.engine = engine
        self.request_id = request_id
        self.loop = loop
        self.stall_timeout = stall_timeout
        # (an embedding request's one output is never merged: nothing follows it)
        self._pending: RequestOutput | EmbeddingRequestOutput | None = None
        self._error: BaseException | None = None
        self._ready = asyncio.Event()
        self._waiting_since: float | None = None  # when the untaken output arrived
        self.finished = False

    def push(self, item: RequestOutput | EmbeddingRequestOutput | BaseException) -> None:
        """Called on the stream's event loop for every engine output (or error)."""
        if isinstance(item, BaseException):
            self._error = item
        elif self._pending is None:
            self._pending = item
            self._waiting_since = self.loop.time()
        else:
            self._pending = merge_outputs(self._pending, item)
            if (
                not item.finished
                and self._error is None
                and self.loop.time() - self._waiting_since > self.stall_timeout
            ):
                self._error = StalledReaderError(
                    f"the client did not read for {self.stall_timeout:.0f} s; request aborted"
                )
                self.engine.abort(self.request_id)
        self._ready.set()

    async def outputs(self) -> AsyncIterator[RequestOutput | EmbeddingRequestOutput]:
        try:
            while not self.finished:
                await self._ready.wait()
                self._ready.clear()
                item, self._pending = self._pending, None
                if item is not None:
                    self.finished = item.finished
                    yield item
                if self._error is not None and not self.finished:
                    self.finished = True
                    raise self._error
        finally:
            self.close()

    def close(self) -> None:
        """Stop listening; aborts the request if it has not finished."""
        self.engine.detach(self.request_id)
        if not self.finished:
            self.finished = True
            self.engine.abort(self.request_id)


class StalledReaderError(RuntimeError):
    """The reader of a stream stopped taking outputs for too long."""
