"""Per-level summaries of request records: throughput and latency percentiles."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from typing import Any

from tokenmill.bench.client import RequestRecord

STATS = ("mean", "p50", "p90", "p99")
LATENCIES = ("ttft", "tpot", "itl", "e2e")


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default) of an ascending sequence."""
    if not sorted_values:
        return math.nan
    pos = (len(sorted_values) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def summarize_ms(values_s: Sequence[float]) -> dict[str, float | None]:
    """mean / p50 / p90 / p99 / max in milliseconds (None for an empty sample)."""
    if not values_s:
        return {name: None for name in (*STATS, "max")}
    ms = sorted(v * 1000.0 for v in values_s)
    out: dict[str, float | None] = {"mean": sum(ms) / len(ms)}
    for q in (50, 90, 99):
        out[f"p{q}"] = percentile(ms, q)
    out["max"] = ms[-1]
    return {k: round(v, 3) for k, v in out.items() if v is not None}


def max_in_flight(records: Sequence[RequestRecord]) -> int:
    """Most requests open at once, from their (start, end) intervals."""
    events = sorted(
        [(r.start, 1) for r in records] + [(r.end, -1) for r in records], key=lambda e: (e[0], e[1])
    )
    peak = cur = 0
    for _, delta in events:
        cur += delta
        peak = max(peak, cur)
    return peak


def record_to_json(rec: RequestRecord) -> dict[str, Any]:
    """The raw record as JSON (times in ms, rounded to the microsecond)."""
    ttft, tpot = rec.ttft, rec.tpot
    return {
        "index": rec.index,
        "ok": rec.ok,
        "error": rec.error,
        "start_ms": round(rec.start * 1000.0, 3),
        "e2e_ms": round(rec.e2e * 1000.0, 3),
        "ttft_ms": None if ttft is None else round(ttft * 1000.0, 3),
        "tpot_ms": None if tpot is None else round(tpot * 1000.0, 3),
        "itl_ms": [round(g * 1000.0, 3) for g in rec.itl],
        "input_len": rec.input_len,
        "prompt_tokens": rec.prompt_tokens,
        "output_len": rec.output_len,
        "output_tokens": rec.output_tokens,
        "num_chunks": len(rec.chunk_times),
        "finish_reason": rec.finish_reason,
    }


def summarize_level(
    records: Sequence[RequestRecord], duration_s: float, mode: str, level: float | str
) -> dict[str, Any]:
    """Everything reported for one load level (`level` as shown: 8, 2.5 or 'inf')."""
    ok = [r for r in records if r.ok]
    errors = Counter(r.error for r in records if r.error is not None)
    prompt_tokens = sum(
        r.prompt_tokens if r.prompt_tokens is not None else (r.input_len or 0) for r in ok
    )
    output_tokens = sum(r.output_tokens for r in ok)
    duration = max(duration_s, 1e-9)
    result: dict[str, Any] = {
        "mode": mode,
        "level": level,
        "num_requests": len(records),
        "completed": len(ok),
        "errors": sum(errors.values()),
        "error_counts": dict(errors.most_common()),
        "duration_s": round(duration_s, 4),
        "request_throughput": len(ok) / duration,
        "output_throughput": output_tokens / duration,
        "total_token_throughput": (prompt_tokens + output_tokens) / duration,
        "total_prompt_tokens": prompt_tokens,
        "prompt_tokens_from_server": all(r.prompt_tokens is not None for r in ok),
        "total_output_tokens": output_tokens,
        "max_in_flight": max_in_flight(records),
    }
    samples = {
        "ttft": [t for r in ok if (t := r.ttft) is not None],
        "tpot": [t for r in ok if (t := r.tpot) is not None],
        "itl": [g for r in ok for g in r.itl],
        "e2e": [r.e2e for r in ok],
    }
    for name in LATENCIES:
        result[f"{name}_ms"] = summarize_ms(samples[name])
    result["requests"] = [record_to_json(r) for r in records]
    return result
