r"""`tokenmill bench serve`: a load generator for any OpenAI-compatible streaming endpoint.

Sends streamed completions (or chat completions) at one or more load levels, each either a fixed
number of requests in flight (`--concurrency 1,8,32`) or Poisson arrivals (`--request-rate 2,inf`),
and reports TTFT, time per output token, inter-token latency, end-to-end latency and throughput.
The same command measures tokenmill, llama.cpp's server or vLLM:

    python -m tokenmill.bench.serve --base-url http://127.0.0.1:8080/v1 --concurrency 1,4,16 \
        --input-len 512 --output-len 128 --num-prompts 64 --plot bench.png
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any

from tokenmill.bench.config import ServeBenchConfig
from tokenmill.bench.prompts import BenchConfigError
from tokenmill.bench.report import format_table, write_json, write_plot
from tokenmill.bench.runner import run_benchmark

logger = logging.getLogger(__name__)

DEFAULT_OUTPUT = "benchmarks/results/bench_serve.json"
_EPILOG = (
    "Exit status: 0 when every level completed at least one request, 1 when a level had "
    "none, 2 for bad options. Failed requests are counted per error message, never fatal."
)


def _int_levels(text: str) -> list[int]:
    try:
        levels = [int(x) for x in text.split(",") if x.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected integers like 1,8,32, got {text!r}") from e
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError(f"concurrency levels must be >= 1, got {text!r}")
    return levels


def _rate_levels(text: str) -> list[float]:
    try:
        levels = [float(x) for x in text.split(",") if x.strip()]  # float("inf") parses
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected rates like 1,4.5,inf, got {text!r}") from e
    if not levels or any(not r > 0 for r in levels):
        raise argparse.ArgumentTypeError(f"request rates must be > 0, got {text!r}")
    return levels


def _json_object(text: str) -> dict[str, Any]:
    try:
        obj = json.loads(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"invalid JSON: {e}") from e
    if not isinstance(obj, dict):
        raise argparse.ArgumentTypeError("expected a JSON object")
    return obj


def add_bench_serve_args(parser: argparse.ArgumentParser) -> None:
    """Add every `bench serve` flag to `parser` (a subparser of the main CLI, or standalone)."""
    parser.epilog = _EPILOG
    t = parser.add_argument_group("target")
    t.add_argument(
        "--base-url",
        default="http://127.0.0.1:8000/v1",
        help="OpenAI-compatible API root (default: %(default)s)",
    )
    t.add_argument("--api-key", default=None, help="sent as 'Authorization: Bearer KEY'")
    t.add_argument("--model", default=None, help="model name (default: first id of GET /models)")
    t.add_argument(
        "--endpoint",
        choices=("completions", "chat"),
        default="completions",
        help="/completions, or /chat/completions with one user message",
    )
    t.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    t.add_argument(
        "--extra-body",
        type=_json_object,
        default=None,
        metavar="JSON",
        help="fields merged into every request body, e.g. '{\"top_k\": 1}'",
    )
    load = parser.add_argument_group("load (one or more comma-separated levels, run in order)")
    mx = load.add_mutually_exclusive_group()
    mx.add_argument(
        "--concurrency",
        type=_int_levels,
        default=None,
        metavar="N[,N...]",
        help="requests kept in flight (default: 1)",
    )
    mx.add_argument(
        "--request-rate",
        type=_rate_levels,
        default=None,
        metavar="R[,R...]",
        help="Poisson arrivals in requests/s; 'inf' sends all at once",
    )
    load.add_argument(
        "--max-concurrency",
        type=int,
        default=None,
        help="with --request-rate: cap on requests in flight",
    )
    load.add_argument(
        "--num-prompts",
        type=int,
        default=None,
        help="requests per level (default: 100, or the data set's size)",
    )
    load.add_argument("--warmup", type=int, default=0, help="requests sent first, not counted")
    p = parser.add_argument_group("prompts")
    p.add_argument("--input-len", type=int, default=256, help="mean prompt length (~words)")
    p.add_argument("--output-len", type=int, default=128, help="mean max_tokens per request")
    p.add_argument(
        "--len-dist",
        choices=("fixed", "uniform"),
        default="fixed",
        help="length distribution around the means",
    )
    p.add_argument(
        "--len-range",
        type=float,
        default=0.25,
        help="uniform: lengths in mean * [1 - f, 1 + f] (default: %(default)s)",
    )
    p.add_argument("--seed", type=int, default=0, help="seeds prompts and arrival times")
    p.add_argument(
        "--dataset",
        default=None,
        metavar="JSONL",
        help='prompts file: one {"prompt": ..., "max_tokens": ...} per line',
    )
    s = parser.add_argument_group("sampling")
    s.add_argument("--temperature", type=float, default=0.0)
    s.add_argument(
        "--no-ignore-eos",
        dest="ignore_eos",
        action="store_false",
        help="omit 'ignore_eos: true' (for servers that reject the field)",
    )
    o = parser.add_argument_group("output")
    o.add_argument(
        "--output",
        default=DEFAULT_OUTPUT,
        help="JSON results file ('' to skip; default: %(default)s)",
    )
    o.add_argument("--plot", default=None, metavar="PNG", help="write a latency/throughput plot")
    o.add_argument("--label", default="", help="free-form name of the run (stored in the JSON)")
    o.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def run_bench_serve(ns: argparse.Namespace) -> int:
    """Run the benchmark described by `ns`, print the table, write JSON (and PNG)."""
    cfg = ServeBenchConfig.from_namespace(ns)
    if not logger.isEnabledFor(logging.DEBUG):
        # httpx logs every request at INFO, which would bury the progress bar
        logging.getLogger("httpx").setLevel(logging.WARNING)
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    model, results = asyncio.run(run_benchmark(cfg))
    config = {**cfg.to_json(), "model": model, "started": started}
    title = f"{cfg.label + ': ' if cfg.label else ''}{model} @ {cfg.url}"
    sys.stdout.write(f"bench serve: {title} ({cfg.endpoint}, {cfg.mode} levels)\n")
    sys.stdout.write(format_table(results) + "\n")
    sys.stdout.flush()
    if ns.output:
        write_json(ns.output, config, results)
    if ns.plot:
        write_plot(ns.plot, results, title)
    return 0 if all(r["completed"] > 0 for r in results) else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="tokenmill bench serve",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ERROR")
    add_bench_serve_args(parser)
    ns = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, ns.log_level.upper(), logging.INFO),
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return run_bench_serve(ns)
    except BenchConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
