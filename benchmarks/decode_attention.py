"""The CPU decode-attention kernel's read rate over a paged KV pool, against the copy bandwidth.

A decode batch's attention reads every cached K and V row of its requests once per layer; on
a CPU that stream, not the arithmetic, sets its time once the caches outgrow L2. This measures
`paged_decode_attention` (the C++ kernel of the ISA level chosen as the engine chooses it, or
`TOKENMILL_CPU_ISA`) on a pool like the engine's: one K and one V tensor per layer, `--pool-gib`
in all, the layers called in turn so that each call starts cold, as in a decode step. Blocks are
laid out as the block pool hands them out to a batch that decodes in lockstep (request i's j-th
block is block j * batch + i: "lockstep"), or in random order ("random": a long-running
server's pool). A "warm" row repeats one layer (its rows then stay in L2): the kernel's rate
when memory is not the limit. Each case runs on both KV cache layouts the kernels read
(tokenmill/layers/attention_backends.py): head-major (the CPU backend's: each head's rows of a
block side by side) and token-major (a slot's heads side by side).

Each row: microseconds per layer call, GB/s of K and V rows read, and that over the machine's
copy bandwidth (measured in the same run; `bench_llamacpp.measure_bandwidth_gbs`). With
`--base REV`, that revision's kernels (built as `kernel_ab.py` builds them) run every case too,
interleaved with this checkout's pass by pass: the rows then add the base's time and the ratio.
Queries are in `--dtype`; the pool in each of `--cache-dtypes` (a KV cache of another dtype,
`--kv-cache-dtype`: the same rows rounded to it), every dtype's pass interleaved with the
others'; with several, each row adds its speed-up over the first dtype's on the same case.

    .venv/bin/python benchmarks/decode_attention.py [--heads 9/3x64] [--base REV] [--out FILE]
    .venv/bin/python benchmarks/decode_attention.py --dtype float32 --cache-dtypes float32,float16
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def pool(
    layers: int, slots: int, kv_heads: int, head_dim: int, dtype: torch.dtype
) -> list[tuple[torch.Tensor, ...]]:
    """Per layer (K, V), random rows in `dtype`: [slots, kv_heads, head_dim] each (the same
    rows in every dtype)."""
    g = torch.Generator().manual_seed(0)
    return [
        tuple(torch.randn(slots, kv_heads, head_dim, generator=g).to(dtype) for _ in range(2))
        for _ in range(layers)
    ]


def block_tables(batch: int, blocks_per_seq: int, num_blocks: int, layout: str) -> torch.Tensor:
    if layout == "lockstep":
        ids = torch.arange(blocks_per_seq * batch).view(blocks_per_seq, batch).t()
    elif layout == "contiguous":
        ids = torch.arange(blocks_per_seq * batch)
    else:
        g = torch.Generator().manual_seed(1)
        ids = torch.randperm(num_blocks, generator=g)[: batch * blocks_per_seq]
    return ids.reshape(batch, blocks_per_seq).to(torch.int32).contiguous()


def measure(ops, caches, q, tables, seq_lens, block_size, layers_used, repeats) -> float:
    """Best seconds per layer call over `repeats` passes through `layers_used` layers."""
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        for i in range(layers_used):
            k, v = caches[i % len(caches)]
            ops.paged_decode_attention(q, k, v, tables, seq_lens, block_size, 0.125)
        best = min(best, (time.perf_counter() - t) / layers_used)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--heads", default="9/3x64", help="query heads / kv heads x head_dim")
    ap.add_argument("--pool-gib", type=float, default=1.0)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--contexts", default="144,1024")
    ap.add_argument("--block-sizes", default="16,64")
    ap.add_argument("--kv-layouts", default="head-major,token-major")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="bfloat16", help="the queries' dtype")
    ap.add_argument("--cache-dtypes", default=None, help="the pool's dtypes (default: --dtype)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--base", help="a git revision whose kernels run interleaved with these")
    ap.add_argument("--out", default="benchmarks/results/decode_attention.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from bench_llamacpp import measure_bandwidth_gbs

    from tokenmill.kernels import cpu_isa, cpu_ops

    ops = cpu_ops.get_ops()
    base = None
    if args.base:
        from kernel_ab import build_base

        base = build_base(args.base, cpu_isa.select_isa().build)
    hq, rest = args.heads.split("/")
    hkv, d = (int(x) for x in rest.split("x"))
    hq = int(hq)
    slots = int(args.pool_gib * 2**30 / (args.layers * 2 * hkv * d * 2)) // 64 * 64
    cache_dtypes = (args.cache_dtypes or args.dtype).split(",")
    pools = {c: pool(args.layers, slots, hkv, d, getattr(torch, c)) for c in cache_dtypes}
    bw = measure_bandwidth_gbs()
    print(
        f"{os.environ.get('TOKENMILL_CPU_ISA', 'auto')} kernels, {args.threads} threads, heads "
        f"{hq}/{hkv}x{d}, pool {args.pool_gib} GiB over {args.layers} layers, copy bandwidth "
        f"{bw:.1f} GB/s",
        flush=True,
    )
    heads = ("batch", "ctx", "block", "kv", "layout", "cache", "us/layer", "GB/s", "of bw")
    widths = (5, 5, 5, 11, 10, 8, 9, 6, 6)
    if base is not None:
        heads, widths = heads + ("base us", "speed-up"), widths + (8, 8)
    if len(cache_dtypes) > 1:
        heads, widths = heads + (f"vs {cache_dtypes[0]}",), widths + (10,)
    print(" ".join(f"{h:>{w}}" for h, w in zip(heads, widths, strict=True)))
    rows = []
    for batch in (int(x) for x in args.batches.split(",")):
        q = torch.randn(batch, hq, d).to(getattr(torch, args.dtype))
        for ctx in (int(x) for x in args.contexts.split(",")):
            seq_lens = torch.full((batch,), ctx, dtype=torch.int32)
            for bs in (int(x) for x in args.block_sizes.split(",")):
                per_seq = (ctx + bs - 1) // bs
                if batch * per_seq > slots // bs:
                    continue  # does not fit the pool
                for kv, layout in itertools.product(
                    args.kv_layouts.split(","), ("lockstep", "contiguous", "random", "warm")
                ):
                    order = "lockstep" if layout == "warm" else layout
                    tables = block_tables(batch, per_seq, slots // bs, order)
                    used = {}
                    for c, caches in pools.items():
                        used[c] = caches[:1] if layout == "warm" else caches
                        if kv == "head-major":  # the same rows, read as [blocks, kv, bs, d]
                            used[c] = [tuple(x.view(-1, hkv, bs, d) for x in p) for p in used[c]]
                    calls = 2 * args.layers
                    if not rows:  # the first case's first pass pays the threads' start-up
                        for kernels in (ops, base) if base is not None else (ops,):
                            for u in used.values():
                                measure(kernels, u, q, tables, seq_lens, bs, calls, 1)
                    sec = dict.fromkeys(cache_dtypes, float("inf"))
                    base_sec = dict(sec)
                    for _ in range(args.repeats):  # interleaved pass by pass
                        for c, u in used.items():
                            sec[c] = min(sec[c], measure(ops, u, q, tables, seq_lens, bs, calls, 1))
                            if base is not None:
                                t = measure(base, u, q, tables, seq_lens, bs, calls, 1)
                                base_sec[c] = min(base_sec[c], t)
                    for c in cache_dtypes:
                        elt = torch.empty((), dtype=getattr(torch, c)).element_size()
                        gbs = batch * ctx * hkv * d * 2 * elt / sec[c] / 1e9
                        row = {
                            "batch": batch,
                            "context": ctx,
                            "block_size": bs,
                            "kv_layout": kv,
                            "layout": layout,
                            "dtype": args.dtype,
                            "cache_dtype": c,
                            "us_per_layer": sec[c] * 1e6,
                            "gb_s": gbs,
                            "of_bandwidth": gbs / bw,
                        }
                        line = (
                            f"{batch:5d} {ctx:5d} {bs:5d} {kv:>11} {layout:>10} {c:>8} "
                            f"{sec[c] * 1e6:9.1f} {gbs:6.1f} {gbs / bw:6.0%}"
                        )
                        if base is not None:
                            speedup = base_sec[c] / sec[c]
                            row.update(base_us_per_layer=base_sec[c] * 1e6, speedup=speedup)
                            line += f" {base_sec[c] * 1e6:8.1f} {speedup:7.2f}x"
                        if len(cache_dtypes) > 1:
                            row["vs_first_cache_dtype"] = sec[cache_dtypes[0]] / sec[c]
                            line += f" {row['vs_first_cache_dtype']:9.2f}x"
                        rows.append(row)
                        print(line, flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "isa": os.environ.get("TOKENMILL_CPU_ISA", "auto"),
                "threads": args.threads,
                "heads": args.heads,
                "dtype": args.dtype,
                "cache_dtypes": cache_dtypes,
                "pool_gib": args.pool_gib,
                "layers": args.layers,
                "bandwidth_gbs": bw,
                "base": args.base,
                "rows": rows,
            },
            indent=1,
        )
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
