"""Two host-side costs of a decode step, each against its baseline in the same process:

* sampling: `Sampler` on the PyTorch reference ops against the C++ kernels' one-pass argmax /
  inverse CDF (`CpuOps.sample`), on a vocabulary of 49,152 (the default model's), one greedy
  row and the rest random (two of them seeded), 1 / 5 / 32 rows;
* the engine thread: batch-1 decode of the default model (greedy, 128 new tokens) stepped on
  the thread that loaded it, on an AsyncEngine's thread, and on an AsyncEngine's thread
  without `release_openmp_threads` (the loading thread's OpenMP workers kept), interleaved,
  best of `--repeats`.

  .venv/bin/python benchmarks/host_overheads.py [--isa avx512] [--repeats 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from pathlib import Path
from unittest.mock import patch

import torch

ROOT = Path(__file__).resolve().parents[1]


def time_sampler(rows: int, repeats: int) -> dict[str, float]:
    from tokenmill.kernels.cpu_ops import get_ops
    from tokenmill.layers.ops import CpuOps, TorchOps
    from tokenmill.sample.sampler import Sampler, build_sampling_metadata
    from tokenmill.sampling_params import SamplingParams

    vocab = 49_152
    params = [SamplingParams(temperature=0)] + [
        SamplingParams(temperature=0.8, seed=i if i < 3 else None) for i in range(1, rows)
    ]
    logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(0)) * 3
    out = {}
    for name, ops in (("torch", TorchOps()), ("cpu", CpuOps(get_ops()))):
        sampler = Sampler(ops)
        best = float("inf")
        for _ in range(repeats):
            generators = {i: torch.Generator().manual_seed(i) for i in (1, 2) if i < rows}
            md = build_sampling_metadata(
                params, [[1]] * rows, [[2]] * rows, generators, vocab, torch.device("cpu")
            )
            sampler(logits, md)  # warm
            t0 = time.perf_counter()
            for _ in range(50):
                sampler(logits, md)
            best = min(best, (time.perf_counter() - t0) / 50)
        out[name] = best
    return out


def decode_ms_per_token(engine, where: str, new_tokens: int) -> float:
    """Batch-1 greedy decode through `where`: "caller" (engine.step here), "async" (an
    AsyncEngine's thread) or "async-kept" (the same, this thread's OpenMP workers kept)."""
    from tokenmill.engine.async_engine import AsyncEngine
    from tokenmill.sampling_params import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    _, ids = engine.encode_prompt("The history of the printing press")
    x = torch.ones(1 << 21)
    torch.add(x, x)  # as after loading: this thread's OpenMP pool exists
    if where == "caller":
        t0 = time.perf_counter()
        engine.add_request(None, "", params, prompt_token_ids=ids)
        while engine.has_unfinished_requests():
            engine.step()
        return (time.perf_counter() - t0) / new_tokens * 1e3

    aengine = AsyncEngine(engine)
    if where == "async-kept":
        with patch("tokenmill.engine.async_engine.release_openmp_threads", lambda: False):
            aengine.start()
    else:
        aengine.start()

    async def run() -> float:
        stream = await aengine.add_request(None, ids, params, f"bench-{time.perf_counter()}")
        t0 = time.perf_counter()
        async for _ in stream.outputs():
            pass
        return (time.perf_counter() - t0) / new_tokens * 1e3

    try:
        return asyncio.run(run())
    finally:
        aengine.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--isa", default=None, help="kernel level (default: the CPU's best)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--out", default="benchmarks/results/host_overheads.json")
    args = ap.parse_args()
    if args.isa:
        os.environ["TOKENMILL_CPU_ISA"] = args.isa

    from tokenmill.config import EngineArgs
    from tokenmill.engine.llm_engine import LLMEngine
    from tokenmill.kernels.cpu_isa import select_isa

    result: dict = {"isa": select_isa().build, "threads": torch.get_num_threads()}
    print(f"kernel level {result['isa']}, {result['threads']} threads")
    print(f"{'rows':>5} {'torch sampler':>14} {'C++ sampler':>12} {'ratio':>7}")
    result["sampler_ms"] = {}
    for rows in (1, 5, 32):
        t = time_sampler(rows, args.repeats)
        result["sampler_ms"][rows] = {k: v * 1e3 for k, v in t.items()}
        print(
            f"{rows:>5} {t['torch'] * 1e3:>11.3f} ms {t['cpu'] * 1e3:>9.3f} ms "
            f"{t['torch'] / t['cpu']:>6.1f}x"
        )

    engine = LLMEngine(EngineArgs(max_model_len=1024))
    wheres = ("caller", "async", "async-kept")
    times: dict[str, list[float]] = {w: [] for w in wheres}
    for _ in range(args.repeats):
        for w in wheres:
            times[w].append(decode_ms_per_token(engine, w, args.new_tokens))
    best = {w: min(v) for w, v in times.items()}
    result["decode_ms_per_token"] = times
    print(f"\nbatch-1 decode, {args.new_tokens} tokens, best of {args.repeats} (ms per token):")
    for w in wheres:
        print(
            f"  {w:<11} {best[w]:6.2f}  ({best['caller'] / best[w]:.2f}x the calling thread's "
            f"speed)  runs {[round(t, 2) for t in times[w]]}"
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
