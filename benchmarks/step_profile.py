"""Where a batched decode step's time goes on the CPU, stage by stage, against each stage's
roofline.

One workload (`--batch` requests of `--prompt-len` token ids, `--new-tokens` greedy tokens each)
on a GGUF file with the CPU kernels, run twice in one process: once plain (the throughput), then
under torch.profiler, which records the ranges the C++ decode loop (`LlamaDecodeStack`,
tokenmill/kernels/csrc/decode_stack.cpp) opens around each of its stages. The output head, the
decode loop as a whole and the engine's own work per step (scheduling, input preparation,
sampling, detokenizing) are timed from Python in the same profiled run.

Per decode-only step it prints each stage's milliseconds and share of the step, the bytes it
reads (the quantized weights; for attention the K and V rows of every context) and its
multiply-adds, and how close it runs to its roofline: the larger of bytes / read bandwidth and
multiply-adds / the kernel level's peak integer rate (both measured in the same run), over its
time. The profiler costs a few microseconds per ATen call inside the loop (views, each
kernel's output allocation), in the stages and the loop's rest: 2% of a 1B-shape step at 32
requests, 22% of the default model's batch-1 step (4.6 ms); the plain run's throughput is
printed beside the profiled one.

    .venv/bin/python benchmarks/step_profile.py [--model PATH] [--batch 32] [--isa avx512]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path
from unittest.mock import patch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_llamacpp import default_model, measure_bandwidth_gbs, measure_int8_gmacs, token_ids

PREFIX = "decode_stack."
LINEARS = {  # stage -> the layer attribute path of its projection
    "qkv_proj": ("self_attn", "qkv_proj"),
    "o_proj": ("self_attn", "o_proj"),
    "gate_up_proj": ("mlp", "gate_up_proj"),
    "down_proj": ("mlp", "down_proj"),
}


def linear_cost(layers, stage: str, batch: int) -> tuple[float, float]:
    """(bytes read, multiply-adds) of one decode step's `stage` projections, all layers."""
    nbytes = macs = 0
    for layer in layers:
        lin = getattr(getattr(layer, LINEARS[stage][0]), LINEARS[stage][1])
        nbytes += lin.quant_method.bytes_per_call(lin)
        macs += batch * lin.in_features * lin.out_features
    return nbytes, macs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="a GGUF file (default: the embedded model)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--isa", default=None, help="kernel level (default: the CPU's best)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/step_profile.json")
    args = ap.parse_args()
    if args.isa:
        os.environ["TOKENMILL_CPU_ISA"] = args.isa

    import torch
    from torch.profiler import ProfilerActivity, profile

    from tokenmill import LLM, SamplingParams

    torch.set_num_threads(args.threads)
    path = args.model or default_model()
    llm = LLM(
        path,
        max_model_len=args.prompt_len + args.new_tokens + 16,
        kv_cache_memory_gib=1.0,
        num_threads=args.threads,
        enable_prefix_caching=False,
    )
    engine, model = llm.engine, llm.engine.model
    if model.decode_stack is None:
        raise SystemExit("this model runs no C++ decode loop (native kernels off or unsupported)")
    info = engine.model_info
    prompts = token_ids(7, args.batch, args.prompt_len, model.cfg.vocab_size)
    params = SamplingParams(temperature=0, max_tokens=args.new_tokens, ignore_eos=True)
    llm.generate(prompts[:2], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))

    t = time.perf_counter()
    llm.generate(prompts, params)
    plain = args.batch * args.new_tokens / (time.perf_counter() - t)

    # Python-side timers of the profiled run, per decode-only step
    spent: dict[str, float] = defaultdict(float)
    state = {"decode": False, "steps": 0}

    def timed(key, fn):  # fn's time in decode-only steps, into spent[key]
        def wrapper(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                if state["decode"]:
                    spent[key] += time.perf_counter() - t0

        return wrapper

    forward, step = model.forward, engine.step

    def classify_forward(*a, **k):
        meta = k["meta"] if "meta" in k else a[3]
        state["decode"] = meta.num_decode_tokens == meta.num_tokens
        return forward(*a, **k)

    def classify_step():
        state["decode"] = False
        t0 = time.perf_counter()
        out = step()
        if state["decode"]:
            spent["decode_step"] += time.perf_counter() - t0
            state["steps"] += 1
        return out

    with (
        patch.object(model, "forward", classify_forward),
        patch.object(model, "decode_stack", timed("decode_loop", model.decode_stack)),
        patch.object(model, "compute_logits", timed("lm_head", model.compute_logits)),
        patch.object(engine, "step", classify_step),
        profile(activities=[ProfilerActivity.CPU]) as prof,
    ):
        t = time.perf_counter()
        llm.generate(prompts, params)
        profiled = args.batch * args.new_tokens / (time.perf_counter() - t)
    steps = state["steps"]
    stage_s = defaultdict(float)
    for evt in prof.key_averages():
        if evt.key.startswith(PREFIX):
            stage_s[evt.key.removeprefix(PREFIX)] += evt.cpu_time_total / 1e6

    from tokenmill.kernels.cpu_isa import select_isa

    bw = measure_bandwidth_gbs()
    peak = measure_int8_gmacs(args.threads).get(select_isa().build, 0.0)
    layers = model.model.layers
    # every decode step's contexts: the prompt plus the tokens so far (1 .. new_tokens - 1)
    mean_ctx = args.prompt_len + args.new_tokens / 2
    kv_bytes = engine.config.cache.bytes_per_token  # in the KV cache's dtype
    cost = {s: linear_cost(layers, s, args.batch) for s in LINEARS}
    cost["attention"] = (args.batch * mean_ctx * kv_bytes, 0.0)
    head = model.lm_head
    cost["lm_head"] = (
        head.quant_method.bytes_per_call(head),
        args.batch * head.in_features * head.out_features,
    )

    step_ms = 1e3 * spent["decode_step"] / steps
    rows = []
    for name in [*stage_s, "decode_loop (rest)", "lm_head", "engine (rest)"]:
        if name == "decode_loop (rest)":
            sec = spent["decode_loop"] - sum(stage_s.values())
        elif name == "engine (rest)":
            sec = spent["decode_step"] - spent["decode_loop"] - spent["lm_head"]
        elif name == "lm_head":
            sec = spent["lm_head"]
        else:
            sec = stage_s[name]
        ms = 1e3 * sec / steps
        nbytes, macs = cost.get(name, (0.0, 0.0))
        bound_ms = max(nbytes / (bw * 1e9), macs / (peak * 1e9) if peak else 0.0) * 1e3
        rows.append(
            {
                "stage": name,
                "ms_per_step": ms,
                "share": ms / step_ms,
                "mbytes": nbytes / 1e6,
                "gbps": nbytes / 1e6 / ms if nbytes else None,
                "gmacs": macs / 1e6 / ms if macs else None,
                "of_roofline": bound_ms / ms if bound_ms else None,
            }
        )

    print(
        f"{Path(path).name}: {args.batch} x {args.prompt_len} + {args.new_tokens} tokens, "
        f"{args.threads} threads, {info.quant_reason}\n"
        f"plain {plain:.1f} tok/s, profiled {profiled:.1f} tok/s; {steps} decode steps of "
        f"{step_ms:.2f} ms; read bandwidth {bw:.1f} GB/s, integer peak {peak:.0f} GMAC/s"
    )
    widths = {"ms/step": 8, "share": 6, "MB": 8, "GB/s": 6, "GMAC/s": 7, "roof": 5}
    print(f"{'stage':22s} " + " ".join(f"{h:>{w}s}" for h, w in widths.items()))

    def fmt(v: float | None, spec: str) -> str:
        return format(v, spec) if v else "-"

    for r in rows:
        cells = [
            fmt(r["ms_per_step"], ".2f"),
            fmt(r["share"], ".1%"),
            fmt(r["mbytes"], ".1f"),
            fmt(r["gbps"], ".1f"),
            fmt(r["gmacs"], ".0f"),
            fmt(r["of_roofline"], ".0%"),
        ]
        print(f"{r['stage']:22s} " + " ".join(f"{c:>{w}s}" for c, w in zip(cells, widths.values())))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "model": Path(path).name,
                "batch": args.batch,
                "prompt_len": args.prompt_len,
                "new_tokens": args.new_tokens,
                "threads": args.threads,
                "kernels": info.quant_reason,
                "plain_tok_s": plain,
                "profiled_tok_s": profiled,
                "decode_steps": steps,
                "step_ms": step_ms,
                "bandwidth_gbs": bw,
                "int8_peak_gmacs": peak,
                "stages": rows,
            },
            indent=2,
        )
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
