"""Running `bench serve`'s load levels: each level's prompts, sending them at a fixed
concurrency or as Poisson arrivals, and the whole run (warmup, then every level in order).
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import httpx
from tqdm import tqdm

from tokenmill.bench.client import RequestRecord, build_payload, first_model_id, send_request
from tokenmill.bench.config import ServeBenchConfig
from tokenmill.bench.metrics import summarize_level
from tokenmill.bench.prompts import (
    BenchConfigError,
    PromptSpec,
    load_dataset,
    synthetic_prompts,
    take,
)
from tokenmill.bench.report import level_label

logger = logging.getLogger(__name__)


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
