"""Reporting for `bench serve`: a text table, the JSON file and an optional PNG plot."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from tokenmill.bench.metrics import LATENCIES, STATS
from tokenmill.bench.prompts import BenchConfigError

logger = logging.getLogger(__name__)

_LATENCY_NAMES = {"ttft": "TTFT", "tpot": "TPOT", "itl": "ITL", "e2e": "E2E latency"}


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def level_label(result: dict[str, Any]) -> str:
    prefix = "conc" if result["mode"] == "concurrency" else "rate"
    level = result["level"]
    if isinstance(level, float) and level.is_integer():
        level = int(level)
    return f"{prefix}={level}"


def format_table(results: list[dict[str, Any]]) -> str:
    """One column per load level, one row per metric."""
    rows: list[tuple[str, list[str]]] = [
        ("completed", [_fmt(r["completed"]) for r in results]),
        ("errors", [_fmt(r["errors"]) for r in results]),
        ("max in flight", [_fmt(r["max_in_flight"]) for r in results]),
        ("duration (s)", [_fmt(r["duration_s"]) for r in results]),
        ("requests/s", [_fmt(r["request_throughput"], 3) for r in results]),
        ("output tokens/s", [_fmt(r["output_throughput"], 1) for r in results]),
        ("total tokens/s", [_fmt(r["total_token_throughput"], 1) for r in results]),
        ("prompt tokens", [_fmt(r["total_prompt_tokens"]) for r in results]),
        ("output tokens", [_fmt(r["total_output_tokens"]) for r in results]),
    ]
    for name in LATENCIES:
        for stat in STATS:
            label = f"{_LATENCY_NAMES[name]} {stat} (ms)"
            rows.append((label, [_fmt(r[f"{name}_ms"][stat]) for r in results]))
    header = ["metric", *(level_label(r) for r in results)]
    widths = [max(len(header[0]), *(len(label) for label, _ in rows))]
    for i in range(len(results)):
        widths.append(max(len(header[i + 1]), *(len(cells[i]) for _, cells in rows)))

    def line(cells: list[str]) -> str:
        first = cells[0].ljust(widths[0])
        return "  ".join([first, *(c.rjust(w) for c, w in zip(cells[1:], widths[1:]))])

    out = [line(header), line(["-" * w for w in widths])]
    out += [line([label, *cells]) for label, cells in rows]
    for r in results:
        for message, count in r["error_counts"].items():
            out.append(f"{level_label(r)}: {count} x {message}")
    return "\n".join(out)


def write_json(path: str | Path, config: dict[str, Any], results: list[dict[str, Any]]) -> None:
    """Write the run's config and per-level results (raw records included)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"schema": "tokenmill.bench.serve/1", "config": config, "results": results}
    path.write_text(json.dumps(doc, indent=1, allow_nan=False) + "\n", encoding="utf-8")
    logger.info("wrote %s", path)


def _x_positions(results: list[dict[str, Any]]) -> tuple[list[float], list[str]]:
    """Plot positions for the levels; an infinite rate sits one step past the largest finite."""
    finite = [float(r["level"]) for r in results if r["level"] != "inf"]
    far = max(finite) * 2.0 if finite else 1.0
    xs = [far if r["level"] == "inf" else float(r["level"]) for r in results]
    labels = [
        "inf" if r["level"] == "inf" else _fmt(r["level"], 3).rstrip("0").rstrip(".")
        for r in results
    ]
    return xs, labels


def write_plot(path: str | Path, results: list[dict[str, Any]], title: str = "") -> None:
    """PNG: latency against load, throughput against load, and latency against throughput."""
    try:
        from matplotlib.figure import Figure
    except ImportError as e:
        raise BenchConfigError(
            "--plot needs matplotlib: pip install matplotlib (or tokenmill[test])"
        ) from e
    xs, labels = _x_positions(results)
    mode = results[0]["mode"] if results else "concurrency"
    xlabel = "concurrency (requests in flight)" if mode == "concurrency" else "request rate (req/s)"
    # (metric, stat, label, colour): the same curve keeps its colour in every panel
    curves = [
        ("ttft", "p50", "TTFT p50", "C0"),
        ("ttft", "p99", "TTFT p99", "C1"),
        ("tpot", "p50", "TPOT p50", "C2"),
        ("e2e", "p50", "E2E p50", "C3"),
        ("e2e", "p99", "E2E p99", "C4"),
    ]

    def series(name: str, stat: str) -> list[float]:
        vals = [r[f"{name}_ms"][stat] for r in results]
        return [math.nan if v is None else v for v in vals]

    fig = Figure(figsize=(15, 4.5))
    ax_lat, ax_tput, ax_trade = fig.subplots(1, 3)
    for name, stat, label, colour in curves:
        ax_lat.plot(xs, series(name, stat), marker="o", label=label, color=colour)
    ax_lat.set(xlabel=xlabel, ylabel="latency (ms)", title="latency vs load", yscale="log")
    out_tps = [r["output_throughput"] for r in results]
    ax_tput.plot(xs, out_tps, marker="o", label="output tokens/s")
    ax_tput.plot(
        xs, [r["total_token_throughput"] for r in results], marker="s", label="total tokens/s"
    )
    ax_tput.set(xlabel=xlabel, ylabel="tokens/s", title="throughput vs load")
    for name, stat, label, colour in curves[2:]:
        ax_trade.plot(out_tps, series(name, stat), marker="o", label=label, color=colour)
    for x, y, text in zip(out_tps, series("e2e", "p50"), labels):
        ax_trade.annotate(text, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax_trade.set(
        xlabel="output tokens/s", ylabel="latency (ms)", title="latency vs throughput", yscale="log"
    )
    for ax in (ax_lat, ax_tput):
        if len(xs) > 1 and min(xs) > 0 and max(xs) / min(xs) >= 8:
            ax.set_xscale("log")
        ax.set_xticks(xs, labels)
        ax.set_xticks([], minor=True)
    for ax in (ax_lat, ax_tput, ax_trade):
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    logger.info("wrote %s", path)
