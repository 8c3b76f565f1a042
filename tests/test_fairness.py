"""Fairness: an abusive but valid request (the most stop strings allowed, each as long as
allowed; n at its cap; a long max_tokens; its own seeded generator) must not slow a plain greedy
stream more than a plain request of the same shape does. The stop-string scan costs O(new text)
per step, and every running sequence gets a token every step, so the abuser only adds its share
of a batched step, like any request with as many samples.

The abuser is therefore compared with a plain request of the same n and max_tokens (no stop
strings, no seed), not with no load: what a larger batch costs is the hardware's, not the
abuse's. On 2 cores each row beyond the first adds ~25-35% to the default model's step (its
linears are compute-bound at a few rows, and a long-running sample's context adds attention),
so against no load even the plain request of the same shape sits near 2x, and a bound there
could not tell abuse from batch size (it failed CI runs at 2.1x). The step-counted test below
checks the scheduling side beside two n=8 abusers."""

from __future__ import annotations

import statistics
import threading
import time

import httpx
import pytest

from tests.server_utils import ServerProcess

MODEL = "SmolLM2-135M-Instruct"
MAX_N = 2


@pytest.fixture(scope="module")
def server():
    # the engine's defaults (native quantized kernels), as a user runs it
    srv = ServerProcess("--max-n", str(MAX_N), "--dtype", "auto", "--quantization", "auto")
    yield srv
    assert srv.stop() == 0


def _time_per_token(url: str) -> float:
    """Median gap between the streamed tokens of a greedy 48-token completion."""
    body = {
        "model": MODEL,
        "prompt": "The history of the printing press",
        "max_tokens": 48,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    stamps = []
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: {"):
                stamps.append(time.perf_counter())
    gaps = [b - a for a, b in zip(stamps[1:], stamps[2:])]  # after the first token
    return statistics.median(gaps)


@pytest.mark.slow
def test_abusive_requests_do_not_starve_a_stream(server):
    stop = [f"{i:03d}" + "never appears " * 18 for i in range(16)]  # 16 x 256 characters
    # one request abusing every valid knob at once: n at its cap, the most and longest stop
    # strings, a long max_tokens, its own seeded generator; and a plain one of the same shape
    plain = {"prompt": "Count to a thousand:", "n": MAX_N, "max_tokens": 700}
    abusive = {**plain, "stop": stop, "seed": 1}

    def loaded_time_per_token(load: dict) -> float:
        stop_event = threading.Event()

        def run_load() -> None:
            body = {"model": MODEL, "stream": True, "ignore_eos": True, **load}
            with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=300) as r:
                assert r.status_code == 200, r.read()
                # raw chunks: parsing every event here would take CPU from the server
                for _ in r.iter_raw(1 << 16):
                    if stop_event.is_set():
                        return  # disconnect: the server aborts it

        thread = threading.Thread(target=run_load)
        thread.start()
        time.sleep(2.0)  # the load is decoding
        try:
            return _time_per_token(server.url)
        finally:
            stop_event.set()
            thread.join(120)
            server.wait_idle(60)

    # Interleaved rounds, the best of each: a shared machine's slow spells only add time. They
    # can last several rounds and hit one side only, so rounds go on, up to 8, until the best of
    # each side is measured in a quiet stretch; abuse that really costs more fails every round.
    with_plain, with_abuser = [], []
    for _ in range(8):
        with_plain.append(loaded_time_per_token(plain))
        with_abuser.append(loaded_time_per_token(abusive))
        if len(with_plain) >= 2 and min(with_abuser) < 1.5 * min(with_plain):
            break
    print(
        f"time per token (ms): beside the plain request {[round(t * 1e3, 1) for t in with_plain]}, "
        f"beside the abuser {[round(t * 1e3, 1) for t in with_abuser]}"
    )
    assert min(with_abuser) < 1.5 * min(with_plain), (
        f"{min(with_abuser) * 1e3:.1f} ms vs {min(with_plain) * 1e3:.1f} ms"
    )


def test_every_running_sequence_gets_a_token_every_step(llm_f32):
    """The scheduling side of fairness, counted in steps: beside the same abusers (more
    samples than the server test, up to n=8), a greedy request gets exactly one token per step
    from its first to its last, and so does every abusive sample."""
    from tokenmill import SamplingParams

    engine = llm_f32.engine
    stop = [f"{i:03d}" + "never appears " * 18 for i in range(16)]
    abusers = {
        "a": SamplingParams(n=8, max_tokens=200, stop=stop, ignore_eos=True),
        "b": SamplingParams(n=8, max_tokens=200, seed=1, ignore_eos=True),
    }
    for rid, params in abusers.items():
        engine.add_request(rid, "Count to a thousand:", params)
    for _ in range(3):
        engine.step()  # the abusers are decoding
    engine.add_request(
        "victim",
        "The history of the printing press",
        SamplingParams(temperature=0, max_tokens=40, ignore_eos=True),
    )
    counts: dict[tuple[str, int], int] = {}
    steps = 0
    while not counts or counts.get(("victim", 0), 0) < 40:
        before = dict(counts)
        for out in engine.step():
            for o in out.outputs:
                counts[(out.request_id, o.index)] = len(o.token_ids)
        steps += 1
        assert steps <= 41, "the victim is not getting a token every step"
        if ("victim", 0) in before:  # after its prefill: every sequence advanced by one
            assert all(counts[k] == v + 1 for k, v in before.items()), (before, counts)
    assert len(counts) == 17
    engine.abort_request(list(abusers))
    while engine.has_unfinished_requests():
        engine.step()
