"""Start a real `tokenmill serve` process on 127.0.0.1 for tests."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import tempfile
import time

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, *args: str, api_key: str | None = None) -> None:
        self.port = free_port()
        self.api_key = api_key
        cmd = [
            sys.executable,
            "-m",
            "tokenmill",
            "--log-level",
            "WARNING",
            "serve",
            "--port",
            str(self.port),
            "--dtype",
            "float32",
            "--quantization",
            "none",
            "--max-model-len",
            "1024",
            # Test clients keep pooled connections idle while other requests run; with the 5 s
            # default the server may close one just as a client reuses it (a keep-alive race,
            # seen once in CI as "Server disconnected without sending a response").
            "--keep-alive-timeout",
            "600",
            *args,
        ]
        if api_key:
            cmd += ["--api-key", api_key]
        env = {k: v for k, v in os.environ.items() if k != "TOKENMILL_API_KEY"}
        # a file, not a pipe: nobody reads the server's output while it runs, and a full pipe
        # would block it
        self.log = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(
            cmd, stdout=self.log, stderr=subprocess.STDOUT, text=True, env=env
        )
        self.url = f"http://127.0.0.1:{self.port}"
        self._wait_ready()

    def _wait_ready(self, timeout: float = 180) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.output()[-3000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError("server did not become ready")

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def metric(self, name: str) -> float:
        text = httpx.get(self.url + "/metrics", headers=self.headers, timeout=5).text
        m = re.search(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M)
        assert m, f"metric {name} missing"
        return float(m.group(1))

    def wait_idle(self, timeout: float = 20) -> None:
        """Until no request runs or waits and no KV block is in use."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if (
                self.metric("tokenmill_kv_cache_usage_perc") == 0
                and self.metric("tokenmill_num_requests_running") == 0
                and self.metric("tokenmill_num_requests_waiting") == 0
            ):
                return
            time.sleep(0.1)
        raise AssertionError("server did not become idle (KV blocks still in use)")

    def output(self) -> str:
        """Everything the server printed so far (stdout and stderr)."""
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def stream_through_failing_step(path: str, body: dict, fail_at: int = 3) -> list[dict]:
    """POST a streaming `body` to `path` of an in-process app whose engine step raises
    ("injected step failure") on its `fail_at`-th call, after the stream began; the data of
    every SSE event it sent, in order (the HTTP status was 200)."""
    import asyncio
    import json

    from tokenmill.config import EngineArgs
    from tokenmill.engine.async_engine import AsyncEngine
    from tokenmill.engine.llm_engine import LLMEngine
    from tokenmill.server.app import build_app

    engine = LLMEngine(EngineArgs(max_model_len=256, kv_cache_memory_gib=0.05))
    real_step, calls = engine.step, []

    def flaky_step():
        calls.append(1)
        if len(calls) == fail_at:
            raise RuntimeError("injected step failure")
        return real_step()

    engine.step = flaky_step
    aengine = AsyncEngine(engine)
    app = build_app(aengine, "SmolLM2-135M-Instruct")

    async def main() -> str:
        aengine.start()
        try:
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
                async with c.stream("POST", path, json=body) as r:
                    assert r.status_code == 200
                    return "".join([chunk async for chunk in r.aiter_text()])
        finally:
            aengine.shutdown()

    text = asyncio.run(main())
    return [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: ")]
