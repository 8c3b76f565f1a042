"""Offline throughput: tokenmill vs transformers `generate` on the same model, same threads.

Measures, in one run on this machine:
  - batch-1 decode tokens/s (128 new tokens, EOS ignored),
  - 32 concurrent requests x 128 new tokens, end-to-end output tokens/s,
for tokenmill (its defaults; with a GGUF model whose blocks run natively also the same dtype
with dequantized weights, `quantization="none"`; and float32) and transformers (float32 and
bfloat16, padded batch). Also measures memory bandwidth and matmul rate to report each result
as a fraction of its roofline: each decode step reads the weights as that engine stores them
(MB/step) plus the KV cache at the mean context. Prints a table and writes JSON
(benchmarks/results/offline.json by default).

    python benchmarks/bench_offline.py [--model PATH] [--new-tokens 128] [--batch 32]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from tokenmill import LLM, SamplingParams
from tokenmill.loader.inspect import count_parameters
from tokenmill.loader.load import read_model_info
from tokenmill.loader.resolve import resolve_model

TOPICS = [
    "a dragon",
    "the ocean",
    "a robot",
    "winter",
    "a lost key",
    "the moon",
    "a market",
    "an old tree",
]


def make_prompts(n: int) -> list[str]:
    return [
        f"Write a short story about {TOPICS[i % len(TOPICS)]} (story {i}). It begins:"
        for i in range(n)
    ]


def measure_bandwidth_gbs() -> float:
    """Read+write bandwidth of a large copy (bytes moved / s), best of 5."""
    src = torch.empty(64 << 20, dtype=torch.float32).fill_(1.0)  # 256 MiB
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t)
    return 2 * src.numel() * 4 / best / 1e9


def measure_matmul_tflops(dtype: torch.dtype) -> float:
    a = torch.randn(1024, 1024, dtype=dtype)
    b = torch.randn(1024, 1024, dtype=dtype)
    for _ in range(3):
        a @ b
    n, t = 10, time.perf_counter()
    for _ in range(n):
        a @ b
    return 2 * 1024**3 * n / (time.perf_counter() - t) / 1e12


def roofline_tokens_per_s(
    params: int,
    weight_bytes: float,
    batch: int,
    ctx: int,
    kv_bytes_per_token: int,
    bw: float,
    tflops: float,
) -> float:
    """Upper bound for decode: each step reads all weights once plus every sequence's KV."""
    step_bytes = weight_bytes + batch * ctx * kv_bytes_per_token
    t_mem = step_bytes / (bw * 1e9)
    t_flops = 2 * params * batch / (tflops * 1e12)
    return batch / max(t_mem, t_flops)


class TokenmillRunner:
    engine = "tokenmill"

    def __init__(self, model: str | None, dtype: str, quantization: str = "auto") -> None:
        self.llm = LLM(model, dtype=dtype, quantization=quantization)
        self.dtype = str(self.llm.engine.dtype).removeprefix("torch.")
        native = self.llm.engine.model_info.native_weights
        self.weights = f"native {native}" if native else f"dense {self.dtype}"
        self.weight_bytes = self.llm.engine.model.weight_bytes_per_step()
        self.llm.generate(make_prompts(4), SamplingParams(temperature=0, max_tokens=8))

    def run(self, prompts: list[str], new_tokens: int) -> float:
        params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
        t = time.perf_counter()
        outs = self.llm.generate(prompts, params)
        el = time.perf_counter() - t
        assert all(len(o.outputs[0].token_ids) == new_tokens for o in outs)
        return el


class TransformersRunner:
    engine = "transformers"

    def __init__(self, source, dtype: torch.dtype) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        folder, name = os.path.split(source.path) if source.kind == "gguf" else (source.path, None)
        kw = {"gguf_file": name} if name else {}
        self.tok = AutoTokenizer.from_pretrained(folder, **kw)
        self.tok.padding_side = "left"
        if self.tok.pad_token is None:
            self.tok.pad_token = self.tok.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **kw).eval()
        self.dtype = str(dtype).removeprefix("torch.")
        self.weights = "transformers"
        # transformers keeps GGUF weights packed: it reads the checkpoint's bytes per step.
        self.weight_bytes = (
            source.path.stat().st_size
            if source.kind == "gguf"
            else sum(p.numel() * p.element_size() for p in self.model.parameters())
        )
        self.run(make_prompts(2), 4)

    def run(self, prompts: list[str], new_tokens: int) -> float:
        enc = self.tok(prompts, return_tensors="pt", padding=True)
        t = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(
                **enc,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=self.tok.pad_token_id,
            )
        el = time.perf_counter() - t
        assert out.shape[1] - enc["input_ids"].shape[1] == new_tokens
        return el


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--out", default="benchmarks/results/offline.json")
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved runs; best is reported")
    args = ap.parse_args()

    prompts = make_prompts(args.batch)
    source = resolve_model(args.model)
    bw = measure_bandwidth_gbs()
    peak = {
        "float32": measure_matmul_tflops(torch.float32),
        "bfloat16": measure_matmul_tflops(torch.bfloat16),
    }
    runners = [TokenmillRunner(args.model, "auto")]
    if runners[0].weights.startswith("native"):  # the same dtype with dequantized weights
        runners.append(TokenmillRunner(args.model, "auto", quantization="none"))
    if runners[0].dtype != "float32":
        runners.append(TokenmillRunner(args.model, "float32"))
    if not args.skip_transformers:
        runners += [
            TransformersRunner(source, torch.float32),
            TransformersRunner(source, torch.bfloat16),
        ]
    arch = runners[0].llm.engine.model_info.arch
    info, reader = read_model_info(source)
    num_params = count_parameters(info, reader)
    # The machine's speed drifts (shared host): interleave the engines, keep the best run.
    times: dict[int, dict[str, list[float]]] = {
        i: {"bs1": [], "batch": []} for i in range(len(runners))
    }
    for rep in range(args.repeats):
        for i, r in enumerate(runners):
            times[i]["bs1"].append(r.run(prompts[:1], args.new_tokens))
            times[i]["batch"].append(r.run(prompts, args.new_tokens))
            print(
                f"rep {rep}: {r.engine} {r.dtype}: batch {times[i]['batch'][-1]:.2f}s", flush=True
            )
    rows = []
    for i, r in enumerate(runners):
        best1, bestb = min(times[i]["bs1"]), min(times[i]["batch"])
        rows.append(
            {
                "engine": r.engine,
                "dtype": r.dtype,
                "weights": r.weights,
                "weight_bytes_per_step": r.weight_bytes,
                "bs1_tok_s": args.new_tokens / best1,
                "batch_tok_s": len(prompts) * args.new_tokens / bestb,
                "bs1_seconds_all": times[i]["bs1"],
                "batch_seconds_all": times[i]["batch"],
            }
        )

    # mean context over the decode steps: prompt + half the new tokens
    tok = runners[0].llm.get_tokenizer()
    ctx = sum(len(tok.encode(p)) for p in prompts) / len(prompts) + args.new_tokens / 2
    for r in rows:
        elt = 4 if r["dtype"] == "float32" else 2
        kv_tok = 2 * arch.num_layers * arch.num_kv_heads * arch.head_dim * elt
        tflops = peak["float32" if elt == 4 else "bfloat16"]
        for key, b in (("bs1", 1), ("batch", args.batch)):
            roof = roofline_tokens_per_s(
                num_params, r["weight_bytes_per_step"], b, ctx, kv_tok, bw, tflops
            )
            r[f"{key}_roofline_tok_s"] = roof
            r[f"{key}_roofline_frac"] = r[f"{key}_tok_s"] / roof
    base = {r["dtype"]: r for r in rows if r["engine"] == "transformers"}
    tm = rows[0]
    ratios = {f"vs_transformers_{d}": tm["batch_tok_s"] / r["batch_tok_s"] for d, r in base.items()}

    print(
        f"\nmodel: {source.name}  threads: {torch.get_num_threads()}  "
        f"bandwidth: {bw:.1f} GB/s  matmul: fp32 {peak['float32']:.2f} / "
        f"bf16 {peak['bfloat16']:.2f} TFLOP/s  ({platform.processor() or platform.machine()})"
    )
    print(
        f"{'engine':<14}{'dtype':<10}{'weights':<30}{'MB/step':>8}{'bs1 tok/s':>10}"
        f"{'(roof %)':>10}{f'{args.batch}x{args.new_tokens} tok/s':>16}{'(roof %)':>10}"
    )
    for r in rows:
        print(
            f"{r['engine']:<14}{r['dtype']:<10}{r['weights']:<30}"
            f"{r['weight_bytes_per_step'] / 1e6:>8.0f}{r['bs1_tok_s']:>10.1f}"
            f"{100 * r['bs1_roofline_frac']:>9.1f}%{r['batch_tok_s']:>16.1f}"
            f"{100 * r['batch_roofline_frac']:>9.1f}%"
        )
    for k, v in ratios.items():
        print(f"tokenmill ({tm['dtype']}) {args.batch}-request throughput {k}: {v:.2f}x")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(
        json.dumps(
            {
                "method": "best of interleaved repeats",
                "model": source.name,
                "threads": torch.get_num_threads(),
                "bandwidth_gbs": bw,
                "matmul_tflops": peak,
                "params": num_params,
                "rows": rows,
                "ratios": ratios,
                "new_tokens": args.new_tokens,
                "batch": args.batch,
            },
            indent=2,
        )
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
