"""`bench serve` against a fake OpenAI-compatible streaming server with known delays.

The fake server (FastAPI under uvicorn, in a background thread on a free port) waits FIRST_DELAY
before the first text chunk and GAP between chunks, streams `max_tokens` chunks and a usage
chunk, can fail every k-th request with HTTP 500, and records how many requests it had open.
With `gather` set, every stream holds its first chunk until that many requests are open (or
GATHER_TIMEOUT passes), so a burst's concurrency is seen however slowly the machine accepts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from tokenmill.bench.client import build_payload, parse_sse_line
from tokenmill.bench.metrics import percentile
from tokenmill.bench.prompts import PromptSpec, synthetic_prompts
from tokenmill.bench.serve import add_bench_serve_args, main, run_bench_serve

FIRST_DELAY = 0.050  # s before the first text chunk
GAP = 0.010  # s between text chunks
GATHER_TIMEOUT = 3.0  # s a held stream waits for the rest of its burst


class FakeState:
    """What the fake server saw; touched only on the server's event loop while a run is on."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.num_requests = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.fail_every = 0
        self.bodies: list[dict[str, Any]] = []
        self.paths: list[str] = []
        self.auth: list[str | None] = []
        self.gather = 0
        self.gathered: asyncio.Event | None = None


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def make_app(state: FakeState) -> FastAPI:
    app = FastAPI()

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": "fake-model", "object": "model"}]}

    async def stream(body: dict[str, Any], chat: bool) -> AsyncIterator[str]:
        try:
            n = int(body["max_tokens"])
            prompt = body["messages"][-1]["content"] if chat else body["prompt"]
            yield ": keep-alive comment\n\n"
            if state.gathered is not None:
                try:
                    await asyncio.wait_for(state.gathered.wait(), GATHER_TIMEOUT)
                except TimeoutError:
                    pass  # the burst never filled: max_in_flight tells the test
            if chat:  # a role-only chunk carries no text: it must not count as the first token
                yield _sse({"choices": [{"index": 0, "delta": {"role": "assistant"}}]})
            for i in range(n):
                await asyncio.sleep(FIRST_DELAY if i == 0 else GAP)
                if "STREAMERR" in prompt and i == 2:
                    yield _sse({"error": {"message": "boom", "code": 500}})
                    return
                choice: dict[str, Any] = {
                    "index": 0,
                    "finish_reason": "length" if i == n - 1 else None,
                }
                if chat:
                    choice["delta"] = {"content": f" w{i}"}
                else:
                    choice["text"] = f" w{i}"
                yield _sse({"choices": [choice]})
            if body.get("model") != "nousage":
                usage = {"prompt_tokens": len(prompt.split()), "completion_tokens": n}
                yield _sse({"choices": [], "usage": usage})
            yield "data: [DONE]\n\n"
        finally:
            state.in_flight -= 1

    async def handle(request: Request, chat: bool) -> Any:
        body = await request.json()
        k = state.num_requests
        state.num_requests += 1
        state.bodies.append(body)
        state.paths.append(request.url.path)
        state.auth.append(request.headers.get("authorization"))
        if state.fail_every and k % state.fail_every == state.fail_every - 1:
            err = {"error": {"message": "injected failure", "type": "server_error"}}
            return JSONResponse(err, status_code=500)
        state.in_flight += 1
        state.max_in_flight = max(state.max_in_flight, state.in_flight)
        if state.gather:
            if state.gathered is None:
                state.gathered = asyncio.Event()
            if state.in_flight >= state.gather:
                state.gathered.set()
        return StreamingResponse(stream(body, chat), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        return await handle(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        return await handle(request, chat=True)

    return app


@pytest.fixture(scope="module")
def fake_server() -> Iterator[tuple[str, FakeState]]:
    state = FakeState()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(make_app(state), log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "fake server did not start"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}/v1", state
    server.should_exit = True
    thread.join(timeout=5)
    sock.close()


@pytest.fixture
def server(fake_server: tuple[str, FakeState]) -> tuple[str, FakeState]:
    fake_server[1].reset()
    return fake_server


def run_cli(*args: str) -> int:
    parser = argparse.ArgumentParser()
    add_bench_serve_args(parser)
    return run_bench_serve(parser.parse_args(list(args)))


def load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def test_sse_lines_and_payload() -> None:
    assert parse_sse_line('data: {"a": 1}') == '{"a": 1}'
    assert parse_sse_line("data:[DONE]") == "[DONE]"
    assert parse_sse_line(": ping") is None
    assert parse_sse_line("") is None
    assert parse_sse_line("event: message") is None
    spec = PromptSpec("hello there", output_len=7)
    body = build_payload("chat", "m", spec, 0.0, ignore_eos=True, extra_body={"top_k": 1})
    assert body["messages"] == [{"role": "user", "content": "hello there"}]
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["max_tokens"] == 7 and body["ignore_eos"] is True and body["top_k"] == 1
    body = build_payload("completions", "m", spec, 0.5, ignore_eos=False)
    assert body["prompt"] == "hello there" and "ignore_eos" not in body
    assert body["temperature"] == 0.5


def test_synthetic_prompts_lengths_and_seed() -> None:
    fixed = synthetic_prompts(5, 20, 8, "fixed", 0.0, seed=1)
    assert [len(s.prompt.split()) for s in fixed] == [20] * 5
    assert [s.output_len for s in fixed] == [8] * 5
    uni = synthetic_prompts(50, 100, 40, "uniform", 0.2, seed=1, salt="a")
    assert all(80 <= len(s.prompt.split()) == s.input_len <= 120 for s in uni)
    assert all(32 <= s.output_len <= 48 for s in uni)
    assert len({s.input_len for s in uni}) > 5
    again = synthetic_prompts(50, 100, 40, "uniform", 0.2, seed=1, salt="a")
    other = synthetic_prompts(50, 100, 40, "uniform", 0.2, seed=1, salt="b")
    assert again == uni
    assert [s.input_len for s in other] == [s.input_len for s in uni]
    assert other[0].prompt != uni[0].prompt


def test_percentile_matches_numpy() -> None:
    np = pytest.importorskip("numpy")
    values = sorted(random.Random(0).random() for _ in range(37))
    for q in (0, 50, 90, 99, 100):
        assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_concurrency_levels_timings_json_plot(server, tmp_path, capsys) -> None:
    base, state = server
    out, png = tmp_path / "r.json", tmp_path / "p.png"
    rc = run_cli(
        "--base-url",
        base,
        "--concurrency",
        "1,3",
        "--num-prompts",
        "6",
        "--input-len",
        "5",
        "--output-len",
        "6",
        "--warmup",
        "2",
        "--api-key",
        "sk-t",
        "--output",
        str(out),
        "--plot",
        str(png),
    )
    assert rc == 0
    assert state.num_requests == 2 + 6 + 6
    assert state.max_in_flight == 3
    assert set(state.auth) == {"Bearer sk-t"}
    body = state.bodies[-1]
    assert body["model"] == "fake-model" and body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert body["ignore_eos"] is True and body["temperature"] == 0.0 and body["max_tokens"] == 6
    doc = load(out)
    assert doc["config"]["levels"] == [1, 3] and doc["config"]["model"] == "fake-model"
    assert "api_key" not in doc["config"]
    lv1, lv3 = doc["results"]
    assert (lv1["level"], lv3["level"]) == (1, 3)
    assert (lv1["max_in_flight"], lv3["max_in_flight"]) == (1, 3)
    for lv in (lv1, lv3):
        assert lv["completed"] == 6 and lv["errors"] == 0
        assert lv["total_output_tokens"] == 36 and lv["total_prompt_tokens"] == 30
        assert all(r["output_tokens"] == 6 and r["prompt_tokens"] == 5 for r in lv["requests"])
        assert all(len(r["itl_ms"]) == 5 for r in lv["requests"])
        assert lv["output_throughput"] > 0 and lv["request_throughput"] > 0
        # known delays: 50 ms to the first chunk, 10 ms between chunks (noisy machine: wide)
        assert 45 <= lv["ttft_ms"]["p50"] <= 250
        assert 5 <= lv["itl_ms"]["p50"] <= 60
        assert 5 <= lv["tpot_ms"]["mean"] <= 60
        e2e = lv["e2e_ms"]
        assert 95 <= e2e["p50"] <= 500 and e2e["p50"] <= e2e["p90"] <= e2e["p99"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = capsys.readouterr().out
    assert "conc=1" in table and "conc=3" in table and "TTFT p99 (ms)" in table


def test_http_errors_are_counted(server, tmp_path) -> None:
    base, state = server
    state.fail_every = 3
    out = tmp_path / "r.json"
    rc = run_cli(
        "--base-url",
        base,
        "--model",
        "fake-model",
        "--concurrency",
        "3",
        "--num-prompts",
        "9",
        "--input-len",
        "4",
        "--output-len",
        "3",
        "--output",
        str(out),
        "--no-progress",
    )
    assert rc == 0
    (lv,) = load(out)["results"]
    assert lv["completed"] == 6 and lv["errors"] == 3
    assert lv["error_counts"] == {"HTTP 500: injected failure": 3}
    assert lv["total_output_tokens"] == 18


def test_poisson_rate_levels(server, tmp_path) -> None:
    base, state = server
    out = tmp_path / "r.json"
    rc = run_cli(
        "--base-url",
        base,
        "--request-rate",
        "40,inf",
        "--num-prompts",
        "8",
        "--input-len",
        "4",
        "--output-len",
        "3",
        "--output",
        str(out),
        "--no-progress",
    )
    assert rc == 0
    assert state.num_requests == 16
    doc = load(out)
    assert doc["config"]["mode"] == "rate" and doc["config"]["levels"] == [40.0, "inf"]
    paced, burst = doc["results"]
    assert paced["level"] == 40.0 and burst["level"] == "inf"
    assert paced["completed"] == burst["completed"] == 8
    starts = [r["start_ms"] for r in paced["requests"]]
    assert starts == sorted(starts) and starts[-1] > 20
    assert burst["max_in_flight"] == 8


@pytest.mark.parametrize("cap", [None, 2])
def test_infinite_rate_sends_up_to_the_cap_at_once(server, cap) -> None:
    base, state = server
    state.gather = cap or 8
    limit = ["--max-concurrency", str(cap)] if cap else []
    rc = run_cli(
        "--base-url",
        base,
        "--request-rate",
        "inf",
        *limit,
        "--num-prompts",
        "8",
        "--input-len",
        "3",
        "--output-len",
        "2",
        "--output",
        "",
        "--no-progress",
    )
    assert rc == 0
    assert state.num_requests == 8
    # all eight at once without a cap (a client that sent them one by one would reach 1)
    assert state.max_in_flight == (cap or 8)
    assert set(state.auth) == {None}


def test_dataset_chat_without_usage_and_stream_error(server, tmp_path) -> None:
    base, state = server
    data = tmp_path / "prompts.jsonl"
    rows = [
        {"prompt": "one two", "max_tokens": 2},
        {"prompt": "three", "max_tokens": 4},
        {"prompt": "four five six"},
        {"prompt": "STREAMERR please", "max_tokens": 5},
    ]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    out = tmp_path / "r.json"
    rc = run_cli(
        "--base-url",
        base,
        "--model",
        "nousage",
        "--endpoint",
        "chat",
        "--dataset",
        str(data),
        "--output-len",
        "3",
        "--no-ignore-eos",
        "--concurrency",
        "2",
        "--output",
        str(out),
        "--no-progress",
    )
    assert rc == 0
    assert state.num_requests == 4
    assert set(state.paths) == {"/v1/chat/completions"}
    assert all("ignore_eos" not in b and "messages" in b for b in state.bodies)
    (lv,) = load(out)["results"]
    assert lv["completed"] == 3 and lv["error_counts"] == {"stream error: boom": 1}
    recs = lv["requests"]
    assert [r["output_len"] for r in recs] == [2, 4, 3, 5]
    assert [r["output_tokens"] for r in recs[:3]] == [2, 4, 3]  # counted from content chunks
    assert all(r["prompt_tokens"] is None for r in recs)
    assert recs[0]["ttft_ms"] >= 45  # the role-only chunk does not count as a token


def test_connection_errors_do_not_crash(tmp_path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = f"http://127.0.0.1:{port}/v1"
    out = tmp_path / "r.json"
    rc = run_cli(
        "--base-url",
        base,
        "--model",
        "m",
        "--num-prompts",
        "3",
        "--input-len",
        "2",
        "--output-len",
        "2",
        "--output",
        str(out),
        "--no-progress",
    )
    assert rc == 1
    (lv,) = load(out)["results"]
    assert lv["completed"] == 0 and lv["errors"] == 3
    assert all(k.startswith("ConnectError") for k in lv["error_counts"])
    assert lv["ttft_ms"]["p50"] is None
    # without --model the model list is needed: a clear error, exit status 2
    assert main(["--base-url", base, "--output", "", "--no-progress"]) == 2


def test_module_help_runs_standalone() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "tokenmill.bench.serve", "--help"],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0
    assert "--request-rate" in proc.stdout and "--no-ignore-eos" in proc.stdout
