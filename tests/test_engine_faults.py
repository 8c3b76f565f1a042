"""The supervised engine loop (AsyncEngine): a step that raises fails only its requests, a
cancelled add never disturbs the loop, a fatal error fails every waiter at once and marks the
engine dead. Checked on the embedded model, with the KV pool back to empty after each fault.
Starting the loop hands the calling thread's OpenMP workers back."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import time

import pytest
import torch

from tokenmill.config import EngineArgs
from tokenmill.engine.async_engine import AsyncEngine, EngineDeadError
from tokenmill.engine.llm_engine import LLMEngine
from tokenmill.engine.request_stream import RequestStream
from tokenmill.sampling_params import SamplingParams

PARAMS = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)


@pytest.fixture(scope="module")
def engine():
    return LLMEngine(EngineArgs(max_model_len=256, kv_cache_memory_gib=0.05))


def _all_blocks_free(engine: LLMEngine) -> bool:
    return engine.scheduler.kv.usage == 0


async def _collect(aengine: AsyncEngine, rid: str, prompt: str = "Hello there"):
    ids = aengine.engine.tokenizer.encode(prompt)
    stream = await aengine.add_request(prompt, ids, PARAMS, rid)
    return [o async for o in stream.outputs()]


def test_cancelled_add_does_not_disturb_the_loop(engine):
    """The caller's future is cancelled before the engine thread gets to it."""
    aengine = AsyncEngine(engine)  # not started: the test plays the engine thread

    async def main():
        fut: concurrent.futures.Future = concurrent.futures.Future()
        aengine._streams["gone"] = RequestStream(aengine, "gone", asyncio.get_running_loop())
        aengine._pending_adds += 1
        aengine._submit(("add", "gone", "hi", engine.tokenizer.encode("hi"), PARAMS, None, fut))
        fut.cancel()
        aengine._apply_commands()  # must neither raise nor queue the request

    asyncio.run(main())
    assert not engine.has_unfinished_requests() and aengine._pending_adds == 0


def test_step_that_raises_fails_its_requests_and_the_loop_goes_on(engine, monkeypatch):
    real_step, calls = engine.step, []

    def flaky_step():
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("injected fault")
        return real_step()

    monkeypatch.setattr(engine, "step", flaky_step)
    aengine = AsyncEngine(engine)
    aengine.start()

    async def main():
        with pytest.raises(RuntimeError, match="injected fault"):
            await _collect(aengine, "victim")
        return await _collect(aengine, "after")

    try:
        outs = asyncio.run(main())
        assert outs[-1].finished and len(outs[-1].outputs[0].token_ids) == 4
        assert aengine.is_running and _all_blocks_free(engine)
    finally:
        aengine.shutdown()


def test_fatal_error_fails_every_waiter_and_marks_dead(engine, monkeypatch):
    aengine = AsyncEngine(engine)

    def broken(*_):
        raise MemoryError("injected fatal fault")

    monkeypatch.setattr(aengine, "_apply_commands", broken)
    aengine.start()

    async def main():
        with pytest.raises(EngineDeadError):
            await _collect(aengine, "waiter")

    asyncio.run(asyncio.wait_for(main(), 30))
    aengine._thread.join(10)
    assert not aengine.is_running and isinstance(aengine.dead, MemoryError)


class _FakeEngine:
    """What a RequestStream calls on its AsyncEngine: abort and detach, recorded."""

    def __init__(self) -> None:
        self.aborted: list[str] = []
        self.detached: list[str] = []

    def abort(self, rid: str) -> None:
        self.aborted.append(rid)

    def detach(self, rid: str) -> None:
        self.detached.append(rid)


def _output(text: str, ids: list[int], delta: str, finished: bool = False):
    """A one-sample output whose last token brought `delta` (the end of `text`)."""
    from tokenmill.outputs import CompletionOutput, RequestOutput

    o = CompletionOutput(
        0,
        text,
        list(ids),
        None,
        None,
        "length" if finished else None,
        delta_text=delta,
        delta_token_ids=ids[-1:],
    )
    return RequestOutput("r", None, [1], [o], finished)


def test_slow_reader_gets_merged_deltas_in_one_slot():
    """100 steps arrive before the reader looks: one merged output is held (O(output)), whose
    delta is every step's delta joined, then the final one."""

    async def main():
        fake = _FakeEngine()
        stream = RequestStream(fake, "r", asyncio.get_running_loop(), stall_timeout=1e9)
        text, ids = "", []
        for step in range(100):
            text, ids = text + f"w{step} ", ids + [step]
            stream.push(_output(text, ids, f"w{step} "))
        assert stream._pending.outputs[0].delta_token_ids == list(range(100))
        got = []
        reader = stream.outputs()
        got.append(await reader.__anext__())
        stream.push(_output(text + "end", ids + [100], "end", finished=True))
        got += [o async for o in reader]
        return fake, got, text

    fake, got, text = asyncio.run(main())
    assert [len(g.outputs[0].delta_token_ids) for g in got] == [100, 1]
    assert got[0].outputs[0].delta_text == text and got[-1].finished
    assert fake.aborted == [] and fake.detached == ["r"]  # finished: detached, not aborted


def test_stalled_reader_is_aborted():
    async def main():
        fake = _FakeEngine()
        stream = RequestStream(fake, "r", asyncio.get_running_loop(), stall_timeout=0.05)
        stream.push(_output("a", [1], "a"))
        await asyncio.sleep(0.1)
        stream.push(_output("ab", [1, 2], "b"))  # the first is still untaken: given up on
        with pytest.raises(RuntimeError, match="did not read"):
            async for _ in stream.outputs():
                pass
        return fake

    fake = asyncio.run(main())
    assert fake.aborted == ["r"] and fake.detached == ["r"]


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


@pytest.mark.skipif(
    not os.path.isdir("/proc/self/task") or torch.get_num_threads() < 2,
    reason="needs Linux's /proc and an OpenMP pool of 2+ threads",
)
def test_starting_the_loop_hands_back_this_threads_openmp_workers(engine):
    """AsyncEngine.start frees the calling thread's OpenMP workers (release_openmp_threads).
    Kept, they count against the CPUs beside the engine thread's own, and libgomp then cuts
    every worker's spin-wait between parallel regions short: the engine thread decoded at
    batch 1 at ~0.65x the calling thread's speed on 2 cores."""
    x = torch.ones(1 << 21)
    torch.add(x, x)  # a parallel region on this thread: its pool's workers exist now
    before, workers = _threads(), torch.get_num_threads() - 1
    aengine = AsyncEngine(engine)
    aengine.start()  # one thread more (the idle loop), this thread's workers gone
    try:
        deadline = time.monotonic() + 5
        while _threads() != before + 1 - workers and time.monotonic() < deadline:
            time.sleep(0.01)
        assert _threads() == before + 1 - workers
    finally:
        aengine.shutdown()
