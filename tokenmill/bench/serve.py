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
import math
import random
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any

import httpx
from tqdm import tqdm

from tokenmill.bench.client import RequestRecord, build_payload, first_model_id, send_request
from tokenmill.bench.metrics import summarize_level
from tokenmill.bench.prompts import (
    BenchConfigError,
    PromptSpec,
    load_dataset,
    synthetic_prompts,
    take,
)
from tokenmill.bench.report import format_table, level_label, write_json, write_plot

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


@dataclass(frozen=True, slots=True)
class ServeBenchConfig:
    """The options of one `bench serve` run (the API key is kept out of `to_json`)."""

    base_url: str
    api_key: str | None
    model: str | None
    endpoint: str
    mode: str  # "concurrency" or "rate"
    levels: tuple[float, ...]
    max_concurrency: int | None
    num_prompts: int | None
    warmup: int
    input_len: int
    output_len: int
    len_dist: str
    len_range: float
    seed: int
    dataset: str | None
    temperature: float
    ignore_eos: bool
    timeout: float
    extra_body: dict[str, Any] | None
    label: str
    progress: bool

    def __post_init__(self) -> None:
        if self.num_prompts is not None and self.num_prompts < 1:
            raise BenchConfigError("--num-prompts must be at least 1")
        if self.warmup < 0:
            raise BenchConfigError("--warmup must be >= 0")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise BenchConfigError("--max-concurrency must be at least 1")
        if self.max_concurrency is not None and self.mode != "rate":
            raise BenchConfigError("--max-concurrency applies to --request-rate only")
        if self.timeout <= 0:
            raise BenchConfigError("--timeout must be > 0")

    @classmethod
    def from_namespace(cls, ns: argparse.Namespace) -> ServeBenchConfig:
        mode = "rate" if ns.request_rate is not None else "concurrency"
        levels = ns.request_rate if mode == "rate" else (ns.concurrency or [1])
        return cls(
            base_url=ns.base_url.rstrip("/"),
            api_key=ns.api_key,
            model=ns.model,
            endpoint=ns.endpoint,
            mode=mode,
            levels=tuple(float(x) for x in levels),
            max_concurrency=ns.max_concurrency,
            num_prompts=ns.num_prompts,
            warmup=ns.warmup,
            input_len=ns.input_len,
            output_len=ns.output_len,
            len_dist=ns.len_dist,
            len_range=ns.len_range,
            seed=ns.seed,
            dataset=ns.dataset,
            temperature=ns.temperature,
            ignore_eos=ns.ignore_eos,
            timeout=ns.timeout,
            extra_body=ns.extra_body,
            label=ns.label,
            progress=not ns.no_progress,
        )

    @property
    def url(self) -> str:
        path = "/chat/completions" if self.endpoint == "chat" else "/completions"
        return self.base_url + path

    def level_value(self, level: float) -> float | str:
        """A level as shown in JSON: an int for concurrency, 'inf' for an unbounded rate."""
        if math.isinf(level):
            return "inf"
        return int(level) if self.mode == "concurrency" else level

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        del d["api_key"], d["progress"]
        d["levels"] = [self.level_value(x) for x in self.levels]
        d["url"] = self.url
        return d


def level_prompts(
    cfg: ServeBenchConfig, num: int, salt: str, dataset: list[PromptSpec] | None
) -> list[PromptSpec]:
    """Prompts for one level: the data set's (cycled), or synthetic ones with fresh words."""
    if dataset is not None:
        return take(dataset, num)
    return synthetic_prompts(
        num, cfg.input_len, cfg.output_len, cfg.len_dist, cfg.len_range, cfg.seed, salt
    )


async def _fixed_concurrency(send: Callable[[int], Awaitable[None]], num: int, conc: int) -> None:
    """`conc` workers, each sending its next request as soon as the previous one finished."""
    indices = iter(range(num))  # shared: next() never yields to the event loop

    async def worker() -> None:
        for i in indices:
            await send(i)

    await asyncio.gather(*(worker() for _ in range(min(conc, num))))


async def _poisson(
    send: Callable[[int], Awaitable[None]],
    num: int,
    rate: float,
    rng: random.Random,
    cap: int | None,
) -> None:
    """Start request i at the i-th arrival of a Poisson process (all at once when rate=inf)."""
    sem = asyncio.Semaphore(cap) if cap else None

    async def guarded(i: int) -> None:
        if sem is None:
            await send(i)
            return
        async with sem:
            await send(i)

    loop = asyncio.get_running_loop()
    t_start, arrival, tasks = loop.time(), 0.0, []
    for i in range(num):
        if i > 0 and not math.isinf(rate):
            arrival += rng.expovariate(rate)
            delay = t_start + arrival - loop.time()  # absolute schedule: no drift
            if delay > 0:
                await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(guarded(i)))
    await asyncio.gather(*tasks)


async def run_requests(
    client: httpx.AsyncClient,
    cfg: ServeBenchConfig,
    model: str,
    specs: Sequence[PromptSpec],
    level: float,
    mode: str,
    desc: str,
    seed: int,
) -> tuple[list[RequestRecord], float]:
    """Send `specs` at one load level; returns the records and the level's duration (s)."""
    records = [
        RequestRecord(index=i, output_len=s.output_len, input_len=s.input_len)
        for i, s in enumerate(specs)
    ]
    bar = tqdm(total=len(specs), desc=desc, file=sys.stderr, disable=not cfg.progress, leave=False)
    t0 = time.perf_counter()

    async def send(i: int) -> None:
        payload = build_payload(
            cfg.endpoint, model, specs[i], cfg.temperature, cfg.ignore_eos, cfg.extra_body
        )
        await send_request(client, cfg.url, payload, records[i], t0)
        bar.update(1)

    try:
        if mode == "concurrency":
            await _fixed_concurrency(send, len(specs), int(level))
        else:
            await _poisson(send, len(specs), level, random.Random(seed), cfg.max_concurrency)
    finally:
        bar.close()
    return records, time.perf_counter() - t0


async def _resolve_model(client: httpx.AsyncClient, cfg: ServeBenchConfig) -> str:
    if cfg.model:
        return cfg.model
    try:
        return await first_model_id(client, cfg.base_url)
    except (httpx.HTTPError, ValueError, KeyError, TypeError) as e:
        raise BenchConfigError(
            f"could not read the model list at {cfg.base_url}/models ({e}); pass --model"
        ) from e


async def run_benchmark(cfg: ServeBenchConfig) -> tuple[str, list[dict[str, Any]]]:
    """Warm up, then run every level in order; returns the model name and per-level results."""
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    finite = [int(x) for x in cfg.levels if not math.isinf(x)]
    keepalive = max([*finite, cfg.max_concurrency or 0, 16])
    # trust_env=False: measure the server directly, never through a proxy from the environment.
    async with httpx.AsyncClient(
        headers=headers,
        timeout=httpx.Timeout(cfg.timeout),
        trust_env=False,
        limits=httpx.Limits(max_connections=None, max_keepalive_connections=keepalive),
    ) as client:
        model = await _resolve_model(client, cfg)
        dataset = load_dataset(cfg.dataset, cfg.output_len) if cfg.dataset else None
        num = cfg.num_prompts or (len(dataset) if dataset else 100)
        if cfg.warmup:
            conc = int(cfg.levels[0]) if cfg.mode == "concurrency" else cfg.warmup
            # synthetic even with a data set, so no data set prompt is cached before it counts
            specs = level_prompts(cfg, cfg.warmup, "warmup", None)
            records, _ = await run_requests(
                client, cfg, model, specs, min(conc, cfg.warmup), "concurrency", "warmup", cfg.seed
            )
            failed = sum(not r.ok for r in records)
            if failed:
                logger.warning(
                    "%d of %d warmup requests failed (first: %s)",
                    failed,
                    len(records),
                    next(r.error for r in records if not r.ok),
                )
        results = []
        for k, level in enumerate(cfg.levels):
            specs = level_prompts(cfg, num, f"level{k}", dataset)
            records, duration = await run_requests(
                client, cfg, model, specs, level, cfg.mode, f"{cfg.mode}={level:g}", cfg.seed + k
            )
            result = summarize_level(records, duration, cfg.mode, cfg.level_value(level))
            logger.info(
                "%s: %d/%d completed in %.2f s",
                level_label(result),
                result["completed"],
                len(records),
                duration,
            )
            results.append(result)
    return model, results


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
