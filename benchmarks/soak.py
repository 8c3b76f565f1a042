"""Soak: many random requests against a real `tokenmill serve`, a share of them abandoned midway.

10,000 requests at concurrency 64 by default, each with random parameters (chat or completion,
n, logprobs, stop strings, streaming, max_tokens, temperature, seed, a JSON or choice
constraint, tools with tool_choice auto or required); 30% of the clients
disconnect at a random moment (mid-stream, or before a non-streaming answer arrives).

Pass means:
  * every request that stayed connected got a complete, well-formed response (a 200 whose JSON
    has n choices with a finish reason and usage, or a stream of JSON events ending in [DONE]
    with a finish reason for every choice);
  * no 5xx at all;
  * no KV block in use and no request left running or waiting at the end;
  * the server's resident memory after the last 1,000 requests at most 5% above the value after
    the first 1,000 (lower is fine: the engine hands freed heap pages back to the OS), not
    counting the KV pool's committed pages (which by design grow with the blocks in use, up to
    the peak working set: issue 11); the raw RSS is reported too.

    .venv/bin/python benchmarks/soak.py [--requests 10000] [--concurrency 64]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.startup import rss_bytes  # noqa: E402
from tests.server_utils import ServerProcess  # noqa: E402

WORDS = "the river stone light ancient mountain code seven blue market winter garden".split()
TOOL = {
    "type": "function",
    "function": {
        "name": "lookup",
        "parameters": {
            "type": "object",
            "properties": {"word": {"type": "string", "maxLength": 12}},
            "required": ["word"],
        },
    },
}
FINISH_REASONS = ("stop", "length", "tool_calls")


def random_request(rng: random.Random, model: str) -> tuple[str, dict]:
    n = rng.choice([1, 1, 1, 2, 3])
    body: dict = {
        "model": model,
        "n": n,
        "max_tokens": rng.randint(1, 48),
        "temperature": rng.choice([0, 0, 0.7, 1.0]),
        "stream": rng.random() < 0.5,
    }
    if rng.random() < 0.3:
        body["seed"] = rng.randint(0, 1 << 30)
    if rng.random() < 0.3:
        body["stop"] = rng.sample(WORDS, rng.randint(1, 4))
    text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 60)))
    if rng.random() < 0.5:
        body["prompt"] = text
        if rng.random() < 0.3:
            body["logprobs"] = rng.randint(0, 5)
        if rng.random() < 0.1:
            body["structured_outputs"] = {"choice": rng.sample(WORDS, 3)}
        return "/v1/completions", body
    body["messages"] = [{"role": "user", "content": text}]
    if rng.random() < 0.3:
        body["logprobs"], body["top_logprobs"] = True, rng.randint(0, 5)
    if body["stream"] and rng.random() < 0.3:
        body["stream_options"] = {"include_usage": True}
    roll = rng.random()
    if roll < 0.1:
        body["response_format"] = {"type": "json_object"}
    elif roll < 0.15:
        body["tools"] = [TOOL]
        body["tool_choice"] = rng.choice(["auto", "required"])
    return "/v1/chat/completions", body


def check_json(body: dict, payload: dict) -> str | None:
    choices = payload.get("choices")
    if not isinstance(choices, list) or len(choices) != body["n"]:
        return f"expected {body['n']} choices, got {choices!r:.200}"
    if any(c.get("finish_reason") not in FINISH_REASONS for c in choices):
        return f"bad finish reasons {[c.get('finish_reason') for c in choices]}"
    if "usage" not in payload:
        return "no usage"
    return None


def check_stream(body: dict, lines: list[str]) -> str | None:
    if not lines or lines[-1] != "data: [DONE]":
        return f"stream did not end with [DONE]: {lines[-2:]!r:.300}"
    finished = set()
    for line in lines[:-1]:
        if not line.startswith("data: "):
            return f"not an SSE data line: {line!r:.200}"
        event = json.loads(line[6:])
        if "error" in event:
            return f"error event: {event['error']}"
        for c in event.get("choices", []):
            if c.get("finish_reason"):
                finished.add(c["index"])
    if len(finished) != body["n"]:
        return f"finish reasons for {sorted(finished)} of {body['n']} choices"
    return None


async def one(client: httpx.AsyncClient, rng: random.Random, model: str, stats: dict) -> None:
    path, body = random_request(rng, model)
    abandon = rng.random() < 0.3
    try:
        if body["stream"]:
            lines: list[str] = []
            stop_after = rng.randint(1, 8)
            async with client.stream("POST", path, json=body) as r:
                if r.status_code >= 500:
                    stats["5xx"] += 1
                    _example(stats, body, f"{r.status_code}: {(await r.aread())[:300]!r}")
                    return
                async for line in r.aiter_lines():
                    if line:
                        lines.append(line)
                    if abandon and len(lines) >= stop_after:
                        stats["abandoned"] += 1
                        return  # leaving the block closes the connection mid-stream
            problem = check_stream(body, lines) if r.status_code == 200 else f"{r.status_code}"
        else:
            task = asyncio.ensure_future(client.post(path, json=body))
            if abandon:
                await asyncio.sleep(rng.random() * 0.5)
                if not task.done():
                    task.cancel()
                    stats["abandoned"] += 1
                    return
            r = await task
            if r.status_code >= 500:
                stats["5xx"] += 1
                _example(stats, body, f"{r.status_code}: {r.text[:300]}")
                return
            problem = check_json(body, r.json()) if r.status_code == 200 else f"{r.status_code}"
    except (httpx.HTTPError, asyncio.CancelledError) as e:
        problem = f"{type(e).__name__}: {e}"
    if problem:
        stats["bad"] += 1
        _example(stats, body, problem)
    else:
        stats["ok"] += 1


def _example(stats: dict, body: dict, problem: str) -> None:
    if len(stats["examples"]) < 10:
        stats["examples"].append({"body": body, "problem": problem})


def kv_resident(srv: ServerProcess) -> int:
    return int(srv.metric("tokenmill_kv_cache_resident_bytes"))


async def soak(srv: ServerProcess, n: int, concurrency: int, seed: int) -> dict:
    model = httpx.get(srv.url + "/v1/models").json()["data"][0]["id"]
    stats: dict = {"ok": 0, "bad": 0, "5xx": 0, "abandoned": 0, "examples": []}
    rss: dict[str, int] = {}
    sem = asyncio.Semaphore(concurrency)
    done = 0
    rng = random.Random(seed)
    limits = httpx.Limits(max_connections=concurrency * 2)
    async with httpx.AsyncClient(base_url=srv.url, timeout=300, limits=limits) as client:

        async def worker(i: int) -> None:
            nonlocal done
            async with sem:
                await one(client, random.Random(rng.random() + i), model, stats)
            done += 1
            if done == 1000:
                rss["after_first_1000"] = rss_bytes(srv.proc.pid)
                rss["kv_after_first_1000"] = kv_resident(srv)
            if done % 1000 == 0:
                print(
                    f"  {done} requests: {stats['ok']} ok, {stats['bad']} bad, "
                    f"{stats['5xx']} 5xx, {stats['abandoned']} abandoned",
                    flush=True,
                )

        await asyncio.gather(*(worker(i) for i in range(n)))
    rss["after_last"] = rss_bytes(srv.proc.pid)
    rss["kv_after_last"] = kv_resident(srv)
    stats["rss"] = rss
    return stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=10_000)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results/soak.json")
    args = ap.parse_args()
    srv = ServerProcess(
        "--max-num-seqs",
        "64",
        "--max-queued-requests",
        "4096",
        "--quantization",
        "auto",
        "--dtype",
        "auto",
    )
    try:
        t0 = time.perf_counter()
        stats = asyncio.run(soak(srv, args.requests, args.concurrency, args.seed))
        stats["seconds"] = time.perf_counter() - t0
        srv.wait_idle(60)
        stats["leaked"] = {
            "kv_cache_usage": srv.metric("tokenmill_kv_cache_usage_perc"),
            "running": srv.metric("tokenmill_num_requests_running"),
            "waiting": srv.metric("tokenmill_num_requests_waiting"),
        }
    finally:
        srv.stop()
    rss = stats["rss"]
    first = rss.get("after_first_1000", 0) - rss.get("kv_after_first_1000", 0)
    last = rss["after_last"] - rss["kv_after_last"]
    drift = last / first - 1 if first > 0 else 0
    raw = rss["after_last"] / rss["after_first_1000"] - 1 if rss.get("after_first_1000") else 0
    stats["rss_drift"], stats["raw_rss_drift"] = drift, raw
    stats["pass"] = (
        stats["bad"] == 0
        and stats["5xx"] == 0
        and drift < 0.05  # growth is a leak; pages handed back to the OS are not
        and not any(stats["leaked"].values())
    )
    print(
        f"{args.requests} requests at concurrency {args.concurrency} in "
        f"{stats['seconds']:.0f} s: {stats['ok']} complete and well-formed, {stats['bad']} "
        f"bad, {stats['5xx']} 5xx, {stats['abandoned']} abandoned; leaked {stats['leaked']}; "
        f"RSS without the KV pool {first / 1e6:.0f} -> {last / 1e6:.0f} MB "
        f"({100 * drift:+.1f}%; raw {rss.get('after_first_1000', 0) / 1e6:.0f} -> "
        f"{rss['after_last'] / 1e6:.0f} MB, {100 * raw:+.1f}%); "
        f"{'PASS' if stats['pass'] else 'FAIL'}"
    )
    for ex in stats["examples"]:
        print("  example:", json.dumps(ex)[:400])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), **stats}, indent=1))


if __name__ == "__main__":
    main()
