"""Embeddings: tokenmill vs llama.cpp (and transformers) on the same GGUF, threads and token ids.

Each case embeds `count` sequences of `length` random token ids with last-token pooling (the
final norm's output at the last position, what decoder embedding models use and tokenmill's
default): tokenmill's `LLM.embed` (prefix caching off, so every repeat computes its prompts)
at every kernel level the CPU has; llama.cpp's embedding context (`pooling_type` LAST, whole
sequences packed into 2,048-token batches, as its examples/embedding does); transformers'
bf16 forward of the same batches. One process per engine, interleaved, best of `--repeats`.

Correctness in the same run: each engine's vectors of the first 4 sequences against
transformers' float32 forward of the file (cosine similarity). Speed: tokens/s, and the
fraction of the compute roofline: the multiply-adds per token of the decoder's linear layers
(the output head is not run) plus causal attention's (layers x heads x head_dim x length),
over the measured peak of the instruction the engine multiplies with (`bench_llamacpp.py`).

    python benchmarks/embeddings.py [--model FILE.gguf] [--cases 64x128,16x512]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

from bench_llamacpp import (  # noqa: E402
    Worker,
    _cpu_flags,
    default_model,
    measure_ceilings,
    peak_macs_per_s,
    token_ids,
    tokenmill_llm,
    write_results,
)

CHECKED = 4  # sequences whose vectors are compared with the float32 reference
BATCH_TOKENS = 2048  # tokens per forward (llama.cpp's batch, transformers', tokenmill's budget)


def _tokenmill(path: str, threads: int, isa: str):
    llm = tokenmill_llm(
        path,
        threads,
        isa,
        max_model_len=1024,
        kv_cache_memory_gib=1.0,
        max_num_batched_tokens=BATCH_TOKENS,
    )
    info = llm.engine.model_info

    def run(prompts):
        t = time.perf_counter()
        outs = llm.embed(prompts)
        el = time.perf_counter() - t
        return el, [o.outputs.embedding for o in outs[:CHECKED]]

    return run, {
        "weights": info.native_weights or f"dense {llm.engine.dtype}",
        "int8_level": isa if info.native_weights else None,
        "pooling": llm.engine.config.model.pooling_type,
    }


def _llamacpp(path: str, threads: int, length: int):
    from llamacpp_runner import LlamaCppEmbedder, simd_level

    eng = LlamaCppEmbedder(path, threads, length, BATCH_TOKENS)

    def run(prompts):
        el, vectors = eng.embed(prompts)
        return el, vectors[:CHECKED].tolist()

    return run, {"weights": "llama.cpp (its repacking)", "int8_level": simd_level()}


def _transformers(path: str, threads: int):
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    folder, name = os.path.split(path)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.bfloat16)
    body = model.eval().model

    def run(prompts):
        per = max(1, BATCH_TOKENS // len(prompts[0]))
        t = time.perf_counter()
        vectors = []
        with torch.inference_mode():
            for i in range(0, len(prompts), per):
                hidden = body(torch.tensor(prompts[i : i + per])).last_hidden_state
                vectors.append(hidden[:, -1].float())
        el = time.perf_counter() - t
        return el, torch.cat(vectors)[:CHECKED].tolist()

    return run, {"weights": "dequantized bf16", "int8_level": None}


def reference(path: str, prompts: list[list[int]]) -> np.ndarray:
    """transformers' float32 last-token hidden states of the prompts (one forward each)."""
    import torch
    from transformers import AutoModelForCausalLM

    folder, name = os.path.split(path)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    with torch.inference_mode():
        rows = [model.model(torch.tensor([p])).last_hidden_state[0, -1] for p in prompts]
    return torch.stack(rows).numpy()


def macs_per_token(path: str, length: int) -> float:
    """The decoder's linear layers (every 2-D blk.* weight) plus causal attention's QK and PV
    products at the mean context length / 2."""
    import gguf

    reader = gguf.GGUFReader(path)
    arch = str(bytes(reader.fields["general.architecture"].parts[-1]), "utf-8")

    def value(key: str, default: int | None = None) -> int:
        field = reader.fields.get(f"{arch}.{key}")
        return default if field is None else int(field.parts[-1][0])

    linear = sum(
        int(t.n_elements) for t in reader.tensors if t.name.startswith("blk.") and len(t.shape) == 2
    )
    heads, hidden = value("attention.head_count"), value("embedding_length")
    head_dim = value("attention.key_length", hidden // heads)
    return linear + value("block_count") * heads * head_dim * length


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float((a @ b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="a GGUF file (default: the embedded model)")
    ap.add_argument("--cases", default="64x128,16x512", help="COUNTxLENGTH, comma-separated")
    ap.add_argument("--isas", default="amx,avx512,avxvnni,avx2")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-transformers", dest="transformers", action="store_false")
    ap.add_argument("--out", default="benchmarks/results/embeddings.json")
    args = ap.parse_args()

    from tokenmill.kernels.cpu_isa import supported_isas

    path = args.model or default_model()
    cases = [tuple(int(x) for x in c.split("x")) for c in args.cases.split(",")]
    isas = [i for i in args.isas.split(",") if i in supported_isas()]
    samples = [measure_ceilings(args.threads)]
    rows = []
    for count, length in cases:
        prompts = token_ids(7, count, length)
        warm = (token_ids(8, 2, length),)
        workers = [
            Worker(f"tokenmill {i}", "tokenmill", (path, args.threads, i), _tokenmill, warm)
            for i in isas
        ]
        workers.append(
            Worker("llama.cpp", "llama.cpp", (path, args.threads, length), _llamacpp, warm)
        )
        if args.transformers:
            workers.append(
                Worker("transformers", "transformers", (path, args.threads), _transformers, warm)
            )
        times = {w.label: [] for w in workers}
        vectors = {}
        for rep in range(args.repeats):
            for w in workers[rep % len(workers) :] + workers[: rep % len(workers)]:
                seconds, vectors[w.label] = w.time(prompts)
                times[w.label].append(seconds)
                print(f"  {count}x{length} rep {rep}: {w.label} {seconds:.2f}s", flush=True)
        for w in workers:
            w.close()
        ref = reference(path, prompts[:CHECKED])
        macs = macs_per_token(path, length)
        for w in workers:
            rows.append(
                {
                    "case": f"{count}x{length}",
                    "engine": w.label,
                    **w.desc,
                    "seconds": times[w.label],
                    "tok_s": count * length / min(times[w.label]),
                    "macs_per_token": macs,
                    "min_cosine_vs_fp32": min(
                        cosine(np.asarray(v), r) for v, r in zip(vectors[w.label], ref)
                    ),
                }
            )
        samples.append(measure_ceilings(args.threads))
    ceilings = {k: max(s.get(k, 0.0) for s in samples) for k in samples[0]}
    peaks = {k: v for k, v in ceilings.items() if k != "bandwidth"}
    for r in rows:
        bound = peak_macs_per_s(r["int8_level"], peaks, prefill=True) / r["macs_per_token"]
        r["roofline"] = r["tok_s"] / bound

    flags = sorted(f for f in _cpu_flags() if f.startswith(("avx", "amx")))
    print(
        f"\n{platform.processor() or platform.machine()}, {args.threads} threads, bf16 matmul "
        f"{ceilings['bf16']:.2f} TFLOP/s, int8 peak GMAC/s "
        f"{ {k: round(v) for k, v in peaks.items() if k != 'bf16'} }; flags: {' '.join(flags)}"
    )
    print(f"{'case':<9}{'engine':<19}{'tok/s':>10}{'roof':>6}{'x l.cpp':>9}{'min cos':>10}")
    for r in rows:
        base = next(b for b in rows if b["case"] == r["case"] and b["engine"] == "llama.cpp")
        print(
            f"{r['case']:<9}{r['engine']:<19}{r['tok_s']:>10.0f}{100 * r['roofline']:>5.0f}%"
            f"{r['tok_s'] / base['tok_s']:>8.2f}x{r['min_cosine_vs_fp32']:>10.5f}"
        )
    write_results(
        args.out,
        {
            "model": path,
            "threads": args.threads,
            "ceilings": ceilings,
            "ceiling_samples": samples,
            "cpu_flags": flags,
            "args": vars(args),
            "rows": rows,
        },
    )


if __name__ == "__main__":
    main()
