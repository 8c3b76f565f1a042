"""Tensor parallelism: decode throughput at each tensor_parallel_size, against one rank in the
same run, with the fraction of the bandwidth roofline.

    python benchmarks/tensor_parallel.py                       # embedded model, sizes 1 and 3
    python benchmarks/tensor_parallel.py --model DIR --load-format dummy --device cuda \\
        --sizes 1,2,4 --dtype bfloat16                        # real shapes on GPUs

Each repeat builds a fresh engine per size (sizes interleaved, best of --repeats) and times
`generate` of `batch` prompts of 16 tokens x `new_tokens` greedy tokens (ignore_eos), after a
warm-up request. The roofline divides the weights read per decode step by the measured copy
bandwidth: on the CPU the ranks share one memory, so every rank's bytes count; on GPUs each
rank reads its own share from its own memory at once, so one rank's bytes count.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from tokenmill import LLM, SamplingParams


def copy_bandwidth_gbs(device: str) -> float:
    """Bytes moved per second by a 256 MiB copy (read + write), best of 5."""
    src = torch.ones(64 << 20, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(5):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        dst.copy_(src)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return 2 * src.nbytes / best / 1e9


def run_once(options: dict, tp: int, batch: int, new_tokens: int) -> tuple[float, int]:
    """(output tokens per second, weight bytes one rank reads per step) for one engine."""
    prompts = [[100 + (7 * i + j) % 5000 for j in range(16)] for i in range(batch)]
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    with LLM(tensor_parallel_size=tp, **options) as llm:
        llm.generate(prompts[:1], SamplingParams(temperature=0, max_tokens=4))  # warm-up
        t = time.perf_counter()
        llm.generate(prompts, params)
        seconds = time.perf_counter() - t
        per_rank = llm.engine.model.weight_bytes_per_step()
    return batch * new_tokens / seconds, per_rank


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="GGUF file or HF folder (default: embedded)")
    ap.add_argument("--sizes", default="1,3", help="tensor_parallel_size values")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--load-format", default="auto")
    ap.add_argument("--out", default="benchmarks/results/tensor_parallel.json")
    a = ap.parse_args()
    sizes = [int(x) for x in a.sizes.split(",")]
    batches = [int(x) for x in a.batches.split(",")]
    options = dict(
        model=a.model,
        device=a.device,
        dtype=a.dtype,
        load_format=a.load_format,
        max_model_len=256,
        enable_prefix_caching=False,
    )
    if a.device == "cpu":
        options["kv_cache_memory_gib"] = 0.5
    bandwidth = copy_bandwidth_gbs(a.device if a.device != "auto" else "cpu")
    best: dict[tuple[int, int], float] = {}
    bytes_per_rank: dict[int, int] = {}
    for _ in range(a.repeats):
        for batch in batches:
            for tp in sizes:
                tok_s, per_rank = run_once(options, tp, batch, a.new_tokens)
                best[tp, batch] = max(best.get((tp, batch), 0.0), tok_s)
                bytes_per_rank[tp] = per_rank
    rows = []
    print(f"copy bandwidth {bandwidth:.1f} GB/s; {platform.processor() or platform.machine()}")
    print(f"{'tp':>3} {'batch':>5} {'tok/s':>9} {'vs tp=1':>8} {'roofline':>9}")
    for batch in batches:
        for tp in sizes:
            tok_s = best[tp, batch]
            shared = a.device == "cpu"  # ranks share one memory on the CPU
            step_bytes = bytes_per_rank[tp] * (tp if shared else 1)
            roofline = bandwidth * 1e9 / step_bytes  # decode steps per second
            fraction = tok_s / batch / roofline
            ratio = tok_s / best[sizes[0], batch]
            print(f"{tp:>3} {batch:>5} {tok_s:>9.1f} {ratio:>7.2f}x {100 * fraction:>8.1f}%")
            rows.append(
                dict(
                    tensor_parallel_size=tp,
                    batch=batch,
                    tokens_per_s=tok_s,
                    vs_first_size=ratio,
                    weight_bytes_per_rank=bytes_per_rank[tp],
                    roofline_fraction=fraction,
                )
            )
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(
        json.dumps(
            dict(
                method=f"best of {a.repeats} interleaved repeats, a fresh engine each",
                options={k: v for k, v in options.items()},
                new_tokens=a.new_tokens,
                copy_bandwidth_gbs=bandwidth,
                results=rows,
            ),
            indent=2,
        )
    )
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
