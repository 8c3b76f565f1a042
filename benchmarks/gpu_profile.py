"""Kernel-level profile of a batch-1 decode step on a GPU (a follow-up of gpu_bench.py): for
the 1B and 8B shapes, the captured step's kernels as torch.profiler sees them (eager run of
the captured function over the same static buffers, and the graph replay), the sum of kernel
times per step against the replay's wall time (the difference is launch gaps).

    python benchmarks/gpu_profile.py --out $OUT
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.gpu_bench import SHAPES, VOCAB, Run, make_llm, model_folder  # noqa: E402


def kernel_table(prof, steps: int) -> tuple[float, list[dict]]:
    """(device µs per step, kernels sorted by total time) from a profile of `steps` steps."""
    from torch.autograd import DeviceType

    rows = {}
    for e in prof.events():
        if e.device_type != DeviceType.CUDA:
            continue
        r = rows.setdefault(e.name, {"name": e.name[:90], "count": 0, "us": 0.0})
        r["count"] += 1
        r["us"] += e.device_time
    total = sum(r["us"] for r in rows.values()) / steps
    table = sorted(rows.values(), key=lambda r: -r["us"])
    for r in table:
        r["us_per_step"] = r["us"] / steps
        r["calls_per_step"] = r["count"] / steps
    return total, table


def profile_shape(run: Run, root: Path, name: str) -> dict:
    import torch

    from tokenmill import SamplingParams

    path = model_folder(root, name, SHAPES[name], VOCAB)
    llm = make_llm(run, path, max_model_len=2048, max_num_seqs=8)
    prompt = [[(7 * j) % (VOCAB - 10) + 5 for j in range(512)]]
    llm.generate(prompt, SamplingParams(temperature=0, max_tokens=64, ignore_eos=True))
    graphs = llm.engine.runner.graphs
    step = graphs._step_fn(1)  # the captured function, on the last decode's static buffers
    graph = graphs.graphs[1]
    out = {}
    steps = 20
    for label, fn in (("eager", step), ("graph", graph.replay)):
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / steps
        with torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CUDA, torch.profiler.ProfilerActivity.CPU]
        ) as prof:
            for _ in range(steps):
                fn()
            torch.cuda.synchronize()
        total, table = kernel_table(prof, steps)
        out[label] = {
            "wall_us_per_step": 1e6 * wall,
            "kernel_us_per_step": total,
            "kernels_per_step": sum(r["count"] for r in table) / steps,
            "top": table[:25],
        }
    del llm, graphs, step, graph
    import gc

    gc.collect()
    torch.cuda.empty_cache()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    run = Run(out / "gpu_profile.json", smoke=False)
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("1B", "8B"):
            run.section(f"profile {name}", profile_shape, run, Path(tmp), name)
    for name, sec in run.results["sections"].items():
        if not sec.get("ok"):
            continue
        for label in ("eager", "graph"):
            p = sec[label]
            print(
                f"{name} {label}: wall {p['wall_us_per_step']:.0f} us/step, kernels "
                f"{p['kernel_us_per_step']:.0f} us in {p['kernels_per_step']:.0f} launches"
            )
            for r in p["top"]:
                print(f"  {r['us_per_step']:8.1f} us {r['calls_per_step']:5.1f}x  {r['name']}")
    print(json.dumps({"wrote": str(run.out)}))


if __name__ == "__main__":
    main()
