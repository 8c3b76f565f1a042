"""One streamed request to an OpenAI-compatible server, timed chunk by chunk.

Server-sent events: each event is `data: <json>` lines; `data: [DONE]` ends the stream; comment
lines (starting with ':') and other fields (`event:`, `id:`) are skipped. A JSON object with an
`error` key is a server error event (vLLM and llama.cpp send one when generation fails midway).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

import httpx

from tokenmill.bench.prompts import PromptSpec

logger = logging.getLogger(__name__)

DONE = "[DONE]"
_MAX_MESSAGE = 120


@dataclass(slots=True)
class RequestRecord:
    """What one request did. Times are seconds from the start of its level.

    `chunk_times` are the arrival times of chunks that carried generated text; the first one
    gives TTFT, the gaps between them give the inter-token latencies.
    """

    index: int
    output_len: int
    input_len: int | None = None
    start: float = 0.0
    end: float = 0.0
    chunk_times: list[float] = field(default_factory=list)
    prompt_tokens: int | None = None
    completion_tokens: int | None = None  # from the usage chunk, when the server sent one
    finish_reason: str | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def output_tokens(self) -> int:
        """Server-counted tokens when reported, else the number of text-carrying chunks."""
        return (
            self.completion_tokens if self.completion_tokens is not None else len(self.chunk_times)
        )

    @property
    def ttft(self) -> float | None:
        return self.chunk_times[0] - self.start if self.chunk_times else None

    @property
    def e2e(self) -> float:
        return self.end - self.start

    @property
    def itl(self) -> list[float]:
        t = self.chunk_times
        return [b - a for a, b in pairwise(t)]

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first: (e2e - ttft) / (tokens - 1)."""
        ttft = self.ttft
        if ttft is None or self.output_tokens < 2:
            return None
        return (self.e2e - ttft) / (self.output_tokens - 1)


def parse_sse_line(line: str) -> str | None:
    """The payload of a `data:` line, or None for blank, comment and other field lines."""
    if not line.startswith("data:"):
        return None
    data = line[5:]
    return data.removeprefix(" ")


def build_payload(
    endpoint: str,
    model: str,
    spec: PromptSpec,
    temperature: float,
    ignore_eos: bool,
    extra_body: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The JSON body of a streamed completions or chat completions request."""
    body: dict[str, Any] = {"model": model}
    if endpoint == "chat":
        body["messages"] = [{"role": "user", "content": spec.prompt}]
    else:
        body["prompt"] = spec.prompt
    body.update(
        max_tokens=spec.output_len,
        temperature=temperature,
        stream=True,
        stream_options={"include_usage": True},
    )
    if ignore_eos:
        body["ignore_eos"] = True  # vLLM / tokenmill / llama.cpp extension
    if extra_body:
        body.update(extra_body)
    return body


def _error_text(obj: Any) -> str:
    """A short message out of an error body (`{"error": {"message": ...}}`, `{"detail": ...}`)."""
    if isinstance(obj, dict):
        inner = obj.get("error", obj.get("detail", obj.get("message", obj)))
        if isinstance(inner, dict):
            inner = inner.get("message", inner)
        obj = inner
    text = obj if isinstance(obj, str) else json.dumps(obj)
    text = " ".join(text.split())
    return text[:_MAX_MESSAGE]


def _http_error(status: int, body: bytes) -> str:
    try:
        message = _error_text(json.loads(body))
    except ValueError:
        message = _error_text(body.decode("utf-8", "replace"))
    return f"HTTP {status}: {message}" if message else f"HTTP {status}"


def _chunk_text(choice: dict[str, Any]) -> str:
    """Generated text in one streamed choice (completions `text` or a chat `delta`)."""
    if "text" in choice:
        return choice.get("text") or ""
    delta = choice.get("delta") or {}
    parts = (delta.get("content"), delta.get("reasoning_content"), delta.get("reasoning"))
    return "".join(p for p in parts if isinstance(p, str))


def _consume_event(rec: RequestRecord, obj: Any, now: float) -> None:
    """Update `rec` with one decoded `data:` event."""
    if not isinstance(obj, dict):
        rec.error = "stream error: event is not a JSON object"
        return
    if "error" in obj:
        rec.error = f"stream error: {_error_text(obj)}"
        return
    usage = obj.get("usage")
    if isinstance(usage, dict):
        rec.prompt_tokens = usage.get("prompt_tokens", rec.prompt_tokens)
        rec.completion_tokens = usage.get("completion_tokens", rec.completion_tokens)
    for choice in obj.get("choices") or ():
        if _chunk_text(choice):
            rec.chunk_times.append(now)
        if choice.get("finish_reason"):
            rec.finish_reason = choice["finish_reason"]


async def send_request(
    client: httpx.AsyncClient,
    url: str,
    payload: dict[str, Any],
    rec: RequestRecord,
    t0: float,
) -> RequestRecord:
    """POST `payload`, read the event stream into `rec`; never raises for a failed request."""
    rec.start = time.perf_counter() - t0
    done = False
    try:
        async with client.stream("POST", url, json=payload) as resp:
            if resp.status_code != 200:
                rec.error = _http_error(resp.status_code, await resp.aread())
                return rec
            async for line in resp.aiter_lines():
                data = parse_sse_line(line)
                if data is None:
                    continue
                if data.strip() == DONE:
                    done = True
                    break
                try:
                    obj = json.loads(data)
                except ValueError:
                    rec.error = "stream error: invalid JSON in event"
                    break
                _consume_event(rec, obj, time.perf_counter() - t0)
                if rec.error is not None:
                    break
        if rec.error is None and not done and rec.finish_reason is None:
            rec.error = "stream ended before [DONE]"
    except httpx.HTTPError as e:
        rec.error = f"{type(e).__name__}: {_error_text(str(e))}".rstrip(": ")
    except Exception as e:  # one broken request must not end the benchmark
        logger.debug("request %d failed", rec.index, exc_info=True)
        rec.error = f"{type(e).__name__}: {_error_text(str(e))}".rstrip(": ")
    finally:
        rec.end = time.perf_counter() - t0
    return rec


async def first_model_id(client: httpx.AsyncClient, base_url: str) -> str:
    """The first model id that GET {base_url}/models lists."""
    resp = await client.get(f"{base_url}/models")
    resp.raise_for_status()
    models = resp.json().get("data") or []
    if not models:
        raise ValueError(f"{base_url}/models lists no models")
    return str(models[0]["id"])
