"""Fairness: abusive but valid requests (the most stop strings allowed, each as long as allowed;
n at its cap; long max_tokens) must not slow a plain greedy stream beyond 2x its time per token
alone. The stop-string scan costs O(new text) per step, and every running sequence gets a token
every step, so the abusers only add their share of a batched step."""

from __future__ import annotations

import statistics
import threading
import time

import httpx
import pytest

from tests.server_utils import ServerProcess

MODEL = "SmolLM2-135M-Instruct"
MAX_N = 4


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
    solo = min(_time_per_token(server.url) for _ in range(2))
    stop = [f"{i:03d}" + "never appears " * 18 for i in range(16)]  # 16 x 256 characters
    # one request abusing every valid knob at once (n at its cap, the most and longest stop
    # strings, a long max_tokens) and a second, seeded one with n at its cap
    abusers = [
        {"prompt": "Count to a thousand:", "n": MAX_N, "max_tokens": 700, "stop": stop},
        {"prompt": "List every country:", "n": MAX_N, "max_tokens": 700, "seed": 1},
    ]
    stop_event = threading.Event()

    def abuse(extra: dict) -> None:
        body = {"model": MODEL, "stream": True, "ignore_eos": True, **extra}
        with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=300) as r:
            assert r.status_code == 200, r.read()
            for _ in r.iter_lines():
                if stop_event.is_set():
                    return  # disconnect: the server aborts them

    threads = [threading.Thread(target=abuse, args=(a,)) for a in abusers]
    for t in threads:
        t.start()
    time.sleep(2.0)  # the abusers are decoding
    try:
        loaded = _time_per_token(server.url)
    finally:
        stop_event.set()
        for t in threads:
            t.join(120)
    print(f"time per token: {solo * 1e3:.1f} ms alone, {loaded * 1e3:.1f} ms with the abusers")
    assert loaded < 2 * solo, f"time per token {loaded * 1e3:.1f} ms vs {solo * 1e3:.1f} ms alone"
    server.wait_idle(60)
