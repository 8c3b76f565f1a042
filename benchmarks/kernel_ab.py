"""Two builds of the CPU kernels in one process: this checkout's against a git revision's.

A kernel change is judged by a ratio measured in the same process, interleaved, best of
`--repeats`: the VM's speed drifts by 10-15% between processes, more than most changes gain.
The base revision's sources (tokenmill/kernels/csrc) are compiled under another module name
(an extension module's name is its identity: two builds under one name would be one module),
then for the model file:

  * linears: layer 0's quantized linears and the output head, each as two QuantLinear objects
    over the same packed weights (the same exact channels), at every `--tokens` count; the step
    column counts every layer's linears and the head once;
  * end to end: two LLMs on the same file, one per build, batch-1 decode and 32 x 128
    (`--no-e2e` skips it), counting the sequences whose greedy tokens both builds agree on.
    The LLM created first (the new build's) is not neutral: an A/A run (this checkout against
    HEAD, no change) gave 0.93-0.94x at batch 1 on the 1B-shape Q4_K_M file (memory-bound: the
    two models' 0.7 GB of weights sit in different memory), and 0.99-1.01x at 32 x 128. Judge
    a batch-1 ratio there against an A/A run. The end-to-end part needs a base whose kernels
    read head-major KV caches (the CPU backend's layout since that change); older bases run the
    linears only (`--no-e2e`).

    .venv/bin/python benchmarks/kernel_ab.py [--base HEAD~1] [--model PATH] [--isa avx512]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path
from unittest.mock import patch

ROOT = Path(__file__).resolve().parents[1]
SRC = "tokenmill/kernels/csrc"


def build_base(rev: str, isa: str) -> object:
    """The kernels of revision `rev`, compiled for level `isa` as module tm_base_<isa>."""
    from torch.utils.cpp_extension import load

    from tokenmill.kernels import cpu_isa, cpu_ops

    src = Path(tempfile.mkdtemp(prefix="tm-base-src-"))
    names = subprocess.run(
        ["git", "ls-tree", "--name-only", f"{rev}:{SRC}"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    for name in names:
        blob = subprocess.run(
            ["git", "show", f"{rev}:{SRC}/{name}"], cwd=ROOT, check=True, capture_output=True
        ).stdout
        (src / name).write_bytes(blob)
    out = Path(tempfile.mkdtemp(prefix="tm-base-build-"))
    print(f"building {rev}'s {isa} kernels in {out}", flush=True)
    module = load(
        name=f"tm_base_{isa}",
        sources=[str(p) for p in sorted(src.glob("*.cpp"))],
        extra_cflags=cpu_ops.compile_flags(isa),
        extra_ldflags=list(cpu_ops._LDFLAGS),
        build_directory=str(out),
        verbose=False,
    )
    if hasattr(module, "set_weight_prefetch"):  # the distances this CPU's loaded build runs
        module.set_weight_prefetch(*cpu_isa.weight_prefetch()[:2])
    return module


def seconds_per_call(kernel, x, calls: int) -> float:
    t = time.perf_counter()
    for _ in range(calls):
        kernel(x)
    return (time.perf_counter() - t) / calls


def linears(llm, base, tokens: list[int], repeats: int) -> list[dict]:
    import torch

    model = llm.engine.model
    layer = model.model.layers[0]
    lins = {
        "qkv": layer.self_attn.qkv_proj,
        "o": layer.self_attn.o_proj,
        "gate_up": layer.mlp.gate_up_proj,
        "down": layer.mlp.down_proj,
        "head": model.lm_head,
    }
    n_layers = len(model.model.layers)

    def build(mod, lin):
        s = lin.segments
        k = mod.QuantLinear(
            [x.packed for x in s],
            [x.qtype for x in s],
            [x.n for x in s],
            [x.bias for x in s],
            lin.in_features,
        )
        k.set_exact_channels(lin.kernel.exact_channels())
        return k

    rows = []
    for m in tokens:
        step = {"new": 0.0, "base": 0.0}
        for name, lin in lins.items():
            if not hasattr(lin, "segments"):
                continue  # a dense layer: no kernel of either build
            new, old = build(lin.quant_method.ops, lin), build(base, lin)
            x = torch.randn(m, lin.in_features, dtype=llm.engine.dtype)
            ref = old(x).float()
            diff = ((new(x).float() - ref).abs().max() / ref.abs().max()).item()
            macs = m * lin.in_features * lin.out_features
            calls = max(2, int(3e8 / macs))
            t = {"new": float("inf"), "base": float("inf")}
            for _ in range(repeats):  # interleaved
                t["new"] = min(t["new"], seconds_per_call(new, x, calls))
                t["base"] = min(t["base"], seconds_per_call(old, x, calls))
            weight = 1 if name == "head" else n_layers
            for k in step:
                step[k] += weight * t[k]
            rows.append(
                {
                    "tokens": m,
                    "linear": name,
                    "type": lin.quant_method.name,
                    "new_us": t["new"] * 1e6,
                    "base_us": t["base"] * 1e6,
                    "speedup": t["base"] / t["new"],
                    "max_rel_diff": diff,
                }
            )
            print(
                f"{m:4d} {name:8s} {lin.quant_method.name:10s} new {t['new'] * 1e6:9.1f} us "
                f"({macs / t['new'] / 1e9:5.0f} GMAC/s)  base {t['base'] * 1e6:9.1f} us  "
                f"x{t['base'] / t['new']:.3f}  max rel diff {diff:.1e}",
                flush=True,
            )
        rows.append(
            {
                "tokens": m,
                "linear": "step",
                "new_us": step["new"] * 1e6,
                "base_us": step["base"] * 1e6,
                "speedup": step["base"] / step["new"],
            }
        )
        print(
            f"{m:4d} step linears: new {step['new'] * 1e3:.2f} ms, base "
            f"{step['base'] * 1e3:.2f} ms, x{step['base'] / step['new']:.3f}",
            flush=True,
        )
    return rows


def end_to_end(path, base, isa: str, repeats: int, threads: int) -> list[dict]:
    import numpy as np

    from tokenmill import LLM, SamplingParams
    from tokenmill.kernels import cpu_ops

    kw = dict(
        max_model_len=1024,
        kv_cache_memory_gib=1.0,
        num_threads=threads,
        enable_prefix_caching=False,
    )
    llms = {"new": LLM(path, **kw)}
    with patch.object(cpu_ops, "load_ops", lambda level: base):  # the base build's layers
        llms["base"] = LLM(path, **kw)
    rng = np.random.default_rng(0)
    cases = {
        "bs1": [rng.integers(100, 20000, 16).tolist()],
        "32x128": [rng.integers(100, 20000, 16).tolist() for _ in range(32)],
    }
    params = SamplingParams(temperature=0, max_tokens=128, ignore_eos=True)
    best, tokens = {}, {}
    for llm in llms.values():
        llm.generate(cases["bs1"], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    for r in range(repeats):
        # alternate which build runs first: each case then follows the other build's run as
        # often as its own
        for build in ("new", "base") if r % 2 == 0 else ("base", "new"):
            llm = llms[build]
            for case, prompts in cases.items():
                t = time.perf_counter()
                outs = llm.generate(prompts, params)
                rate = len(prompts) * 128 / (time.perf_counter() - t)
                best[build, case] = max(best.get((build, case), 0.0), rate)
                tokens[build, case] = [o.outputs[0].token_ids for o in outs]
    rows = []
    for case in cases:
        pairs = list(zip(tokens["new", case], tokens["base", case], strict=True))
        same = sum(a == b for a, b in pairs)  # sequences whose greedy tokens are identical
        new, old = best["new", case], best["base", case]
        rows.append(
            {
                "case": case,
                "new_tok_s": new,
                "base_tok_s": old,
                "speedup": new / old,
                "same_sequences": same,
                "sequences": len(pairs),
            }
        )
        print(
            f"{case:7s} new {new:8.1f} tok/s  base {old:8.1f}  x{new / old:.3f}  "
            f"identical sequences: {same}/{len(pairs)}",
            flush=True,
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="HEAD", help="git revision of the baseline kernels")
    ap.add_argument("--model", default=None, help="a GGUF file (default: the embedded model)")
    ap.add_argument("--isa", default=None, help="kernel level (default: the CPU's best)")
    ap.add_argument("--tokens", default="1,32", help="token counts for the linears")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-e2e", dest="e2e", action="store_false")
    ap.add_argument("--out", default="benchmarks/results/kernel_ab.json")
    args = ap.parse_args()

    from tokenmill.kernels import cpu_isa

    isa = args.isa or cpu_isa.select_isa().build
    os.environ["TOKENMILL_CPU_ISA"] = isa
    import torch

    from tokenmill import LLM

    torch.set_num_threads(args.threads)
    base = build_base(args.base, isa)
    llm = LLM(args.model, max_model_len=256, kv_cache_memory_gib=0.2, num_threads=args.threads)
    result = {
        "args": vars(args),
        "isa": isa,
        "linears": linears(llm, base, [int(t) for t in args.tokens.split(",")], args.repeats),
    }
    del llm
    if args.e2e:
        result["end_to_end"] = end_to_end(
            args.model, base, isa, max(1, args.repeats - 2), args.threads
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
