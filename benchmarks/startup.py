"""Start-up time and resident memory: tokenmill vs llama.cpp's server, same files, same run.

For each file:
  * `serve` start: process spawn -> /health 200 (tokenmill serve; llama_cpp.server, where
    installed: `pip install sse-starlette starlette-context pydantic-settings` next to
    llama-cpp-python, a benchmark-only extra);
  * `LLM()` start: process spawn -> first generated token (tokenmill's Python API);
  * resident memory (RSS) of the server right after start, and after 32 requests x 512 tokens;
  * tokenmill's load throughput (the weights phase, GB/s, from its log).
"Warm" = the kernels are built and the file is in the page cache (each start runs twice; the
second is reported). `--cold-kernels` also times a first start with an empty kernel cache.

Targets (issue 11): warm start of the default model <= 3 s; RSS after start <= 1.3 x file size
+ 300 MB; the 1B Q4_K_M file loads at >= 1 GB/s from a warm page cache.

    .venv/bin/python benchmarks/startup.py [--files default,1B-Q4_K_M,1B-F16] [--requests 32]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.bench_llamacpp import default_model, prepare_files  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def wait_health(port: int, proc: subprocess.Popen, path: str, timeout: float = 600) -> float:
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=1) as r:
                if r.status == 200:
                    return time.perf_counter()
        except OSError:
            pass
        time.sleep(0.02)
    raise TimeoutError("no /health 200")


def eos_token_id(path: str) -> int | None:
    from tokenmill.loader.gguf_file import open_gguf

    return open_gguf(path).metadata.get("tokenizer.ggml.eos_token_id")


def load_server(port: int, n: int, tokens: int, eos: int | None) -> None:
    """n concurrent completions of `tokens` tokens each, EOS suppressed: tokenmill's
    `ignore_eos`; for llama.cpp's server, which has no such field, a -100 bias on `eos`."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=10) as r:
        model = json.loads(r.read())["data"][0]["id"]
    req = {"model": model, "prompt": "Once upon a time", "max_tokens": tokens, "temperature": 0}
    if eos is None:
        req["ignore_eos"] = True
    else:
        req["logit_bias"] = {str(eos): -100}
    body = json.dumps(req).encode()

    def one(_):
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/completions",
            data=body,
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=3600) as r:
            r.read()

    with ThreadPoolExecutor(n) as ex:
        list(ex.map(one, range(n)))


def serve_cmd(engine: str, path: str, port: int, threads: int) -> list[str]:
    if engine == "tokenmill":
        return [
            sys.executable,
            "-m",
            "tokenmill",
            "serve",
            path,
            "--port",
            str(port),
            "--max-model-len",
            "4096",
        ]
    return [
        sys.executable,
        "-m",
        "llama_cpp.server",
        "--model",
        path,
        "--port",
        str(port),
        "--n_ctx",
        "4096",
        "--n_threads",
        str(threads),
    ]


def time_serve(engine: str, path: str, threads: int, requests: int, tokens: int, env: dict) -> dict:
    port = free_port()
    log = tempfile.TemporaryFile(mode="w+")  # a file, not a pipe: a full pipe stalls a server
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        serve_cmd(engine, path, port, threads),
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        # llama_cpp.server has no /health: its model list answers once the model is loaded
        ready = wait_health(port, proc, "/health" if engine == "tokenmill" else "/v1/models") - t0
        rss_start = rss_bytes(proc.pid)
        rss_load = None
        if requests:
            load_server(
                port, requests, tokens, eos_token_id(path) if engine == "llama.cpp" else None
            )
            rss_load = rss_bytes(proc.pid)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.seek(0)
        out = log.read()
        log.close()
    m = re.search(r"weights at ([0-9.]+) GB/s", out or "")
    return {
        "start_s": ready,
        "rss_start": rss_start,
        "rss_after_load": rss_load,
        "load_gbs": float(m.group(1)) if m else None,
    }


_FIRST_TOKEN = """
import sys, time
t0 = float(sys.argv[2])
from tokenmill import LLM, SamplingParams
llm = LLM(sys.argv[1], max_model_len=4096)
llm.generate([[100, 200, 300]], SamplingParams(max_tokens=1, temperature=0))
print("FIRST", time.time() - t0)
"""


def time_first_token(path: str, env: dict) -> float:
    out = subprocess.run(
        [sys.executable, "-c", _FIRST_TOKEN, path, repr(time.time())],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    m = re.search(r"FIRST ([0-9.]+)", out.stdout)
    if not m:
        raise RuntimeError(out.stderr[-2000:])
    return float(m.group(1))


def has_llamacpp_server() -> bool:
    r = subprocess.run([sys.executable, "-c", "import llama_cpp.server.app"], capture_output=True)
    return r.returncode == 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--files", default="default,1B-Q4_K_M,1B-F16")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument(
        "--llamacpp-requests",
        type=int,
        default=2,
        help="requests for llama.cpp's server, which runs them one at a time (its "
        "KV cache is allocated at start, so RSS does not depend on the count)",
    )
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--cold-kernels", action="store_true")
    ap.add_argument("--workdir", default="benchmarks/results/models")
    ap.add_argument("--out", default="benchmarks/results/startup.json")
    args = ap.parse_args()
    names = args.files.split(",")
    files = prepare_files([n for n in names if n != "default"], Path(args.workdir))
    files["default"] = default_model()
    env = dict(os.environ, TOKENMILL_NUM_THREADS=str(args.threads))
    llama = has_llamacpp_server()
    rows = []
    if args.cold_kernels:
        with tempfile.TemporaryDirectory() as cache:
            cold_env = dict(env, XDG_CACHE_HOME=cache)
            r = time_serve("tokenmill", files["default"], args.threads, 0, 0, cold_env)
            rows.append({"file": "default", "engine": "tokenmill", "case": "cold kernels", **r})
            print(f"default cold kernels: serve ready in {r['start_s']:.1f} s", flush=True)
    for name in names:
        path = files[name]
        size = Path(path).stat().st_size
        engines = ["tokenmill"] + (["llama.cpp"] if llama else [])
        for engine in engines:
            time_serve(engine, path, args.threads, 0, 0, env)  # warm the page cache / kernels
            n = args.requests if engine == "tokenmill" else args.llamacpp_requests
            r = time_serve(engine, path, args.threads, n, args.tokens, env)
            row = {
                "file": name,
                "engine": engine,
                "case": "warm",
                "file_bytes": size,
                "requests": n,
                **r,
            }
            if engine == "tokenmill":
                time_first_token(path, env)
                row["first_token_s"] = time_first_token(path, env)
            row["rss_target"] = 1.3 * size + 300e6
            rows.append(row)
            print(
                f"{name:10s} {engine:9s} serve {r['start_s']:5.2f} s"
                + (
                    f", LLM() first token {row['first_token_s']:5.2f} s"
                    if "first_token_s" in row
                    else ""
                )
                + f", RSS {r['rss_start'] / 1e6:6.0f} MB"
                + f" (target <= {row['rss_target'] / 1e6:.0f})"
                + (
                    f", after {n}x{args.tokens} {r['rss_after_load'] / 1e6:6.0f} MB"
                    if r["rss_after_load"]
                    else ""
                )
                + (f", load {r['load_gbs']:.2f} GB/s" if r["load_gbs"] else ""),
                flush=True,
            )
    if not llama:
        print(
            "llama.cpp server not installed: pip install sse-starlette starlette-context "
            "pydantic-settings (next to llama-cpp-python)"
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
