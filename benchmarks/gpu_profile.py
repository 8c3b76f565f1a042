"""Kernel-level profile of a batch-1 decode step on a GPU (a follow-up of gpu_bench.py): for
the 1B and 8B shapes, the captured step's kernels as torch.profiler sees them (eager run of
the captured function over the same static buffers, and the graph replay), the sum of kernel
times per step against the replay's wall time (the difference is launch gaps); first, a sweep
of the small kernels' launch configurations (`sweep`), and before it the skinny GEMM against
cuBLAS on the dense linears of both shapes (`skinny_sweep`).

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

from benchmarks.gpu_bench import SHAPES, VOCAB, Run, env, make_llm, model_folder  # noqa: E402


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


def _us(fn, reps: int = 20) -> float:
    """Device time of one call of `fn`: `reps` calls captured in a CUDA graph, replayed. The
    graph leaves out the host's launch cost, which at these sizes (a few us of work) is what a
    per-call timer (triton's do_bench) mostly measures; inside a decode step's graph the
    launches cost nothing either. The inputs stay in L2 across the calls."""
    import torch

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile and warm up outside the capture
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(5):
        graph.replay()
    torch.cuda.synchronize()
    return 1e6 * (time.perf_counter() - t0) / (5 * reps)


def _attention_case(head_dim: int, batch: int) -> dict:
    """Split-KV decode attention (32 query / 8 KV heads, 576 tokens of context) in every
    launch configuration of the sweep, against the default configuration's output."""
    import torch

    from tokenmill.kernels import triton_attention as ta

    dev, dt = "cuda", torch.bfloat16
    heads, kv, bs, ctx = 32, 8, 16, 576
    per_seq = -(-ctx // bs)
    blocks = batch * per_seq + 1
    k_cache = torch.randn(blocks * bs, kv, head_dim, dtype=dt, device=dev)
    v_cache = torch.randn(blocks * bs, kv, head_dim, dtype=dt, device=dev)
    tables = torch.randperm(blocks - 1, device=dev)[: batch * per_seq].view(batch, -1)
    meta = dict(
        block_tables=tables.int(),
        seq_lens=torch.full((batch,), ctx, dtype=torch.int32, device=dev),
        query_start_loc=torch.arange(batch + 1, dtype=torch.int32, device=dev),
        max_query_len=1,
        block_size=bs,
        scale=head_dim**-0.5,
    )
    q = torch.randn(batch, heads, head_dim, dtype=dt, device=dev)

    def attend(**kw) -> torch.Tensor:
        return ta.paged_attention(q, k_cache, v_cache, **kw, **meta)

    default = dict(num_splits=8 if batch == 1 else 1)
    ref = attend(**default)
    rows = [{"config": "default", "us": _us(lambda: attend(**default))}]
    for splits in (4, 8, 16) if batch == 1 else (1,):
        for block_n in (32, 64, 128):
            for warps in (2, 4, 8):
                kw = dict(num_splits=splits, block_n=block_n, num_warps=warps)
                try:
                    err = (attend(**kw).float() - ref.float()).abs().max().item()
                    rows.append(
                        {"config": kw, "us": _us(lambda kw=kw: attend(**kw)), "max_err": err}
                    )
                except Exception as e:  # a config that does not compile or fit
                    rows.append({"config": kw, "error": f"{type(e).__name__}: {e}"[:200]})
    timed_rows = sorted((r for r in rows if "us" in r), key=lambda r: r["us"])
    return {
        "default_us": rows[0]["us"],
        "best": timed_rows[:6],
        "errors": [r for r in rows if "error" in r][:3],
    }


def _norm_case(hidden: int, rows: int) -> dict:
    import torch

    from tokenmill.kernels import triton_ops as tk

    res = torch.randn(rows, hidden, dtype=torch.bfloat16, device="cuda")
    delta, w = torch.randn_like(res), torch.randn(hidden, dtype=torch.bfloat16, device="cuda")
    return {
        str(warps): _us(lambda warps=warps: tk.add_rms_norm(res, delta, w, 1e-5, warps))
        for warps in (None, 1, 2, 4, 8, 16)
    }


def _argmax_case(rows: int) -> dict:
    import torch

    from tokenmill.kernels import triton_ops as tk

    logits = torch.randn(rows, 128256, dtype=torch.bfloat16, device="cuda")
    ref = logits.argmax(-1)
    entry = {"torch": _us(lambda: logits.argmax(-1))}
    for block in (1024, 2048, 4096, 8192):
        entry[str(block)] = {
            "us": _us(lambda block=block: tk.argmax_rows(logits, block)),
            "equal": torch.equal(tk.argmax_rows(logits, block), ref),
        }
    return entry


# The dense linears of a decode step (out, in), Llama-3.2-1B and Llama-3-8B shapes.
LINEARS = {
    "1B": {"qkv": (3072, 2048), "o": (2048, 2048), "gate_up": (16384, 2048), "down": (2048, 8192)},
    "8B": {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)},
}
# triton_skinny.skinny_linear configurations tried: (BLOCK_N, BLOCK_K, warps, stages[, dot]);
# the GEMVs (dot=False) at one row only
SKINNY_CONFIGS = (
    (16, 256, 4, 4),
    (16, 128, 4, 4),
    (16, 512, 4, 3),
    (32, 256, 4, 4),
    (16, 256, 8, 6),
    (16, 512, 8, 4),
    (8, 512, 4, 3, False),
    (4, 512, 4, 3, False),
    (8, 1024, 4, 2, False),
    (16, 512, 8, 3, False),
)


def _skinny_case(n: int, k: int, rows: int, copy_gbs: float) -> dict:
    """x W^T for `rows` rows on cuBLAS (F.linear) and on skinny_linear in every configuration
    of SKINNY_CONFIGS that takes that many rows: device time per call and the fraction of the
    copy bandwidth its weight bytes need. The graph cycles through copies of W totalling >= 512
    MB, so each call reads its weight from memory, not from the 50 MB L2 (`_us` alone would keep
    it there)."""
    import torch
    import torch.nn.functional as F

    from tokenmill.kernels import triton_skinny as ts

    dt, dev = torch.bfloat16, "cuda"
    nbytes = n * k * 2
    copies = max(2, -(-(512 << 20) // nbytes))
    ws = [torch.randn(n, k, dtype=dt, device=dev) * 0.02 for _ in range(copies)]
    x = torch.randn(rows, k, dtype=dt, device=dev)
    ref = F.linear(x.float(), ws[0].float())

    def per_call(fn) -> float:
        return _us(lambda: [fn(w) for w in ws], reps=1) / copies

    def entry(us: float) -> dict:
        return {"us": round(us, 2), "bw_fraction": round(nbytes / (us * 1e-6) / 1e9 / copy_gbs, 3)}

    out = {"cublas": entry(per_call(lambda w: F.linear(x, w)))}
    for cfg in SKINNY_CONFIGS:
        if not ts.SkinnyConfig(*cfg).dot and rows != 1:
            continue
        err = ((ts.skinny_linear(x, ws[0], None, cfg).float() - ref).abs().max()).item()
        out[str(cfg)] = entry(per_call(lambda w, cfg=cfg: ts.skinny_linear(x, w, None, cfg)))
        out[str(cfg)]["max_err_rel"] = err / ref.abs().max().item()
    ws.clear()
    torch.cuda.empty_cache()
    return out


def skinny_sweep(run: Run) -> dict:
    """skinny_linear against cuBLAS on every dense linear of the 1B and 8B shapes at 1, 4 and
    16 rows (`_skinny_case`): which weights the small-batch kernel should take
    (`triton_skinny.SkinnyLinear.max_weight_bytes`) and in which configurations
    (`triton_skinny.SKINNY_CONFIG`, and `SKINNY_GEMV_CONFIG` for one row)."""
    copy_gbs = run.results.get("copy_gbs") or 4000.0
    out = {}
    for shape, linears in LINEARS.items():
        for name, (n, k) in linears.items():
            for rows in (1, 4, 16):
                out[f"{shape} {name} x{rows}"] = _skinny_case(n, k, rows, copy_gbs)
    return out


def sweep(run: Run) -> dict:
    """Launch configurations of the small kernels of a decode step, each checked against the
    default configuration's output and timed on the device alone (`_us`):
    split-KV attention (splits, keys per iteration, warps) at batch 1 and 32 for head_dim 64 and
    128, add_rms_norm's warps, and the two-stage argmax against torch.argmax."""
    import torch

    torch.manual_seed(0)
    out = {}
    for head_dim in (64, 128):
        for batch in (1, 32):
            out[f"attention d{head_dim} b{batch}"] = _attention_case(head_dim, batch)
    for hidden in (2048, 4096):
        for rows in (1, 32):
            out[f"add_rms_norm {hidden} x{rows}"] = _norm_case(hidden, rows)
    for rows in (1, 32):
        out[f"argmax x{rows}"] = _argmax_case(rows)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--sweep-only", action="store_true", help="only the launch-config sweep")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    run = Run(out / "gpu_profile.json", smoke=False)
    run.section("env", env, run)
    run.section("skinny sweep", skinny_sweep, run)
    run.section("sweep", sweep, run)
    if not args.sweep_only:
        with tempfile.TemporaryDirectory() as tmp:
            for name in ("1B", "8B"):
                run.section(f"profile {name}", profile_shape, run, Path(tmp), name)
    for name, sec in run.results["sections"].items():
        if not sec.get("ok") or name == "env" or name.endswith("sweep"):
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
