"""Dense (F16 / BF16 / float32) weights on the CPU: tokenmill's `dense_gemm` against the
library's path in the same run.

Two parts, each engine configuration in its own process:
  1. end to end on a GGUF file of 16-bit weights (default: the embedded model as F16, made by
     bench_llamacpp.py's `--files F16`): batch-1 decode (64 tokens after a 16-token prompt),
     prefill of a 512-token prompt, 32 requests x 64 tokens; with the kernel
     (`TOKENMILL_CPU_DENSE_GEMM=1`) and without (`=0`: the library's GEMM for every step, bfloat16
     weights in oneDNN's packed layout), in the compute dtype `--dtype` (auto: bfloat16 on a CPU
     with native bfloat16); batch 1 also as a fraction of the bandwidth roofline (the weights a
     step reads over the read bandwidth measured here: torch.dot of a 512 MiB vector with itself
     on every thread, the fastest of the library's reductions; a kernel that prefetches may read
     faster, so this can pass 100%);
  2. the linears alone: 16 layers of the 1B shape's projections (1.95 GB of bfloat16 weights,
     so every step reads DRAM) at 1-8 rows of x, in GB/s of weights, `dense_gemm` against
     oneDNN's packed bfloat16 product.

On a CPU with AMX, `TOKENMILL_CPU_ISA=avx512 ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16` (inherited by
both processes) stands in for one with AVX512-BF16 and no AMX (AMD Zen 4): tokenmill's avx512
level and oneDNN's AVX512-BF16 kernels.

    .venv/bin/python benchmarks/dense_cpu.py [--model PATH] [--dtype auto|bfloat16|float32]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

MODEL = "benchmarks/results/models/SmolLM2-135M-Instruct.F16.gguf"


def measure_read_gbs(threads: int) -> float:
    """The best of 5 dot products of 512 MiB of float32 with itself on `threads` threads, in
    GB/s read."""
    import torch

    torch.set_num_threads(threads)
    t = torch.ones(128 << 20)
    times = []
    for _ in range(5):
        start = time.perf_counter()
        torch.dot(t, t)
        times.append(time.perf_counter() - start)
    return t.numel() * 4 / min(times) / 1e9


def end_to_end(model: str, dtype: str, threads: int) -> dict:
    """One engine configuration (the environment's), best of 3 per case."""
    import torch

    from tokenmill import LLM, SamplingParams

    torch.set_num_threads(threads)
    llm = LLM(
        model,
        dtype=dtype,
        num_threads=threads,
        enable_prefix_caching=False,
        max_model_len=1024,
        kv_cache_memory_gib=1.0,
    )

    def best(prompts: list, params: SamplingParams, repeats: int = 3) -> float:
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            llm.generate(prompts, params)
            times.append(time.perf_counter() - t)
        return min(times)

    new = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
    one = SamplingParams(temperature=0, max_tokens=1)
    return {
        "dtype": str(llm.engine.dtype).removeprefix("torch."),
        "decode_loop": llm.engine.model.decode_stack is not None,
        "weight_bytes": llm.engine.model.weight_bytes_per_step(),
        "bs1": 64 / best([{"prompt_token_ids": list(range(100, 116))}], new),
        "prefill512": 512 / best([{"prompt_token_ids": [100 + 7 * i for i in range(512)]}], one),
        "batch32": 32
        * 64
        / best([{"prompt_token_ids": list(range(100 + i, 116 + i))} for i in range(32)], new, 2),
    }


def linears(threads: int) -> list[dict]:
    """GB/s of 1B-shape bfloat16 weights read by 16 layers' projections at 1-8 rows of x."""
    import torch

    from tokenmill.kernels.cpu_ops import get_ops

    torch.set_num_threads(threads)
    ops = get_ops()
    shapes = [(3072, 2048), (2048, 2048), (16384, 2048), (2048, 8192)]
    ws = [[torch.randn(n, k).bfloat16() for n, k in shapes] for _ in range(16)]
    packed = [[torch.ops.mkldnn._reorder_linear_weight(w) for w in layer] for layer in ws]
    gb = sum(n * k * 2 for n, k in shapes) * 16 / 1e9

    def rate(fn, rows: int) -> float:
        xs = {k: torch.randn(rows, k).bfloat16() for _, k in shapes}

        def step() -> None:
            for i in range(16):
                for j, (_, k) in enumerate(shapes):
                    fn(xs[k], i, j)

        step()
        times = []
        for _ in range(5):
            t = time.perf_counter()
            step()
            times.append(time.perf_counter() - t)
        return gb / min(times)

    def widened(x, i, j):
        return ops.dense_gemm(x.float(), ws[i][j])

    def bf16(x, i, j):
        return ops.dense_gemm(x, ws[i][j])

    def onednn(x, i, j):
        return torch.ops.mkldnn._linear_pointwise(x, packed[i][j], None, "none", [], "")

    return [
        {
            "rows": rows,
            "dense_gemm_f32_acts": rate(widened, rows),
            "dense_gemm_bf16_acts": rate(bf16, rows),
            "onednn_packed": rate(onednn, rows),
        }
        for rows in (1, 2, 4, 8)
    ]


def in_child(args: list[str], env: dict[str, str]) -> dict | list:
    cmd = [sys.executable, __file__, "--child", *args]
    res = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=MODEL)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-linears", dest="linears", action="store_false")
    ap.add_argument("--out", default="benchmarks/results/dense_cpu.json")
    ap.add_argument("--child", nargs="*", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        kind = args.child[0]
        result = (
            linears(args.threads)
            if kind == "linears"
            else end_to_end(args.child[1], args.child[2], args.threads)
        )
        print(json.dumps(result))
        return

    bw = measure_read_gbs(args.threads)
    rows = {}
    for label, on in (("dense_gemm", "1"), ("library", "0")):
        rows[label] = in_child(
            ["e2e", args.model, args.dtype, "--threads", str(args.threads)],
            {"TOKENMILL_CPU_DENSE_GEMM": on},
        )
    print(f"{Path(args.model).name}, {args.threads} threads, read bandwidth {bw:.1f} GB/s")
    print(
        f"{'path':<12}{'dtype':<10}{'loop':<6}{'bs1 tok/s':>10}{'roof':>6}{'x lib':>7}"
        f"{'prefill512':>12}{'x lib':>7}{'32x64':>9}{'x lib':>7}"
    )
    base = rows["library"]
    for label, r in rows.items():
        roof = r["bs1"] * r["weight_bytes"] / 1e9 / bw
        print(
            f"{label:<12}{r['dtype']:<10}{'yes' if r['decode_loop'] else 'no':<6}"
            f"{r['bs1']:>10.1f}{roof:>6.0%}{r['bs1'] / base['bs1']:>6.2f}x"
            f"{r['prefill512']:>12.1f}{r['prefill512'] / base['prefill512']:>6.2f}x"
            f"{r['batch32']:>9.1f}{r['batch32'] / base['batch32']:>6.2f}x"
        )
    result = {"model": args.model, "threads": args.threads, "read_gbs": bw, "e2e": rows}
    if args.linears:
        lin = in_child(["linears", "--threads", str(args.threads)], {})
        print("1B-shape projections, 16 layers of bfloat16 weights (1.95 GB), GB/s read:")
        print(f"{'rows':>5}{'f32 acts':>10}{'bf16 acts':>11}{'oneDNN':>9}")
        for r in lin:
            print(
                f"{r['rows']:>5}{r['dense_gemm_f32_acts']:>10.1f}"
                f"{r['dense_gemm_bf16_acts']:>11.1f}{r['onednn_packed']:>9.1f}"
            )
        result["linears"] = lin
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
