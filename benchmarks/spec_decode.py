"""Speculative decoding by prompt lookup at batch 1: tokenmill with and without drafts vs llama.cpp
with and without the same drafts, on the same GGUF, threads and token ids.

Three chat prompts for the default model (SmolLM2-135M-Instruct), rendered with its template by
tokenmill's tokenizer: rewriting a piece of code (the answer copies most of the prompt), answering
questions about a text by quoting it, and an open-ended story (few n-gram matches: what the
drafts cost when they do not help). Greedy, `--new-tokens` tokens each (eos ignored).

- tokenmill plain, and with `speculative_config` {"method": "ngram", ...} (`--spec`);
- llama.cpp plain (one decode per token), and llama.cpp with prompt lookup: the same n-gram
  proposer (tokenmill's, loaded from its file without torch), each step decoding the last token
  and the drafts in one batch, greedy verification, rejected cells removed from its KV cache.

Correctness in the same run: each engine's tokens against tokenmill plain (greedy speculation
must give the plain tokens; tokens differ only after a near-tie of the two engines' numerics).
Speed, best of `--repeats` interleaved: end-to-end tokens/s (prompt included), and decode
tokens/s (the tokens after the first over the time after a prefill-only run of the same
prompt), as ratios to llama.cpp plain and to the engine without drafts, and as a fraction of a
roofline: a step must read the weights once and multiply every row it computes (1 + drafts)
at the engine's integer peak; the bound is the tokens a step emits on average over the slower
of the two. The read rate is measured on a buffer the size of the engine's weights, read again
and again as decoding does (a small model's weights stay partly in the last-level cache, so a
copy of a larger buffer understates it).

    python benchmarks/spec_decode.py [--model FILE.gguf] [--spec '{"num_speculative_tokens": 4}']

With a draft model in `--spec` ('{"model": "default", "num_speculative_tokens": 4}': the
embedded file drafting for `--model`), tokenmill runs plain and with the draft, and llama.cpp
plain (its Python binding has no draft-model decoding); a step's roofline then reads the
target's weights once and the draft's once per guess.
"""

from __future__ import annotations

import argparse
import importlib.util
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from bench_llamacpp import (  # noqa: E402
    Worker,
    _cpu_flags,
    count_params,
    default_model,
    measure_ceilings,
    peak_macs_per_s,
    tokenmill_llm,
    write_results,
)

CODE = """import json
from pathlib import Path


def load_records(path):
    records = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            records.append(json.loads(line))
    return records


def count_by_key(records, key):
    counts = {}
    for record in records:
        value = record.get(key)
        if value is None:
            continue
        counts[value] = counts.get(value, 0) + 1
    return counts


def save_counts(counts, path):
    with open(path, "w") as f:
        for value, count in sorted(counts.items()):
            f.write(f"{value}\\t{count}\\n")
"""
TEXT = (
    "The lighthouse at Skerry Point was built in 1871 from granite quarried on the island. "
    "Its lamp burned paraffin until 1926, when it was converted to electricity. The last "
    "keeper, Margaret Dunn, left in 1989, after which the light was automated. Today the "
    "keeper's cottage is a small museum that is open from May to September, and the tower "
    "itself can be climbed on Saturdays. The museum holds the original paraffin lamp, the "
    "keepers' logbooks from 1871 to 1989, and a collection of photographs of the island."
)
TASKS = {
    "code rewrite": "Rewrite this Python module so that every function has type hints and a "
    f"docstring. Keep the code otherwise the same.\n\n```python\n{CODE}```",
    "quote answers": f"{TEXT}\n\nAnswer each question by quoting the sentence of the text that "
    "answers it. When was the lighthouse built? When was it converted to electricity? Who was "
    "the last keeper? When is the museum open? What does the museum hold?",
    "open story": "Write a long story about a fox who learns to play the violin.",
}


def working_set_read_gbs(nbytes: int, threads: int) -> float:
    """GB/s of summing a buffer of `nbytes` with `threads` threads, best of 20 passes after a
    warm-up: the rate at which decoding can re-read weights of that size on this machine."""
    import torch

    torch.set_num_threads(threads)
    x = torch.ones(nbytes // 4, dtype=torch.float32)
    x.sum()
    best = float("inf")
    for _ in range(20):
        t = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t)
    return x.numel() * 4 / best / 1e9


def _load_proposer(k: int, lo: int, hi: int):
    """tokenmill's NgramProposer from its file (numpy only: no torch in llama.cpp's process)."""
    path = Path(__file__).parents[1] / "tokenmill" / "core" / "spec_decode.py"
    spec = importlib.util.spec_from_file_location("spec_decode", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    proposer = module.NgramProposer(lo, hi)
    proposer.k = k
    return proposer


def _tokenmill(path: str, threads: int, isa: str, spec: dict | None):
    from tokenmill import SamplingParams

    llm = tokenmill_llm(
        path, threads, isa, max_model_len=2048, kv_cache_memory_gib=0.5, speculative_config=spec
    )
    engine = llm.engine

    def run(prompt: list[int], new: int):
        before = engine.stats()
        t = time.perf_counter()
        out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=new, ignore_eos=True))
        seconds = time.perf_counter() - t
        after = engine.stats()
        drafts = after.spec_drafts - before.spec_drafts
        accepted = after.spec_accepted_tokens - before.spec_accepted_tokens
        draft_tokens = after.spec_draft_tokens - before.spec_draft_tokens
        # decode steps: each emits 1 token plus its accepted drafts (the first comes from
        # the prefill)
        steps = new - 1 - accepted
        return seconds, out[0].outputs[0].token_ids, steps, draft_tokens, drafts

    prompts = {
        name: llm.encode_chat([{"role": "user", "content": text}], True)[1]
        for name, text in TASKS.items()
    }
    info = engine.model_info
    drafter = engine.drafter
    return run, {
        "weights": info.native_weights or f"dense {engine.dtype}",
        "int8_level": isa if info.native_weights else None,
        "weight_bytes": engine.model.weight_bytes_per_step(),
        "draft_weight_bytes": 0 if drafter is None else drafter.model.weight_bytes_per_step(),
        "prompts": prompts,
    }


def _llamacpp(path: str, threads: int, spec: dict | None):
    from llamacpp_runner import LlamaCppEngine

    eng = LlamaCppEngine(path, threads, max_seqs=1, n_ctx_per_seq=2048)
    proposer = None
    if spec is not None:
        proposer = _load_proposer(
            spec["num_speculative_tokens"], spec["prompt_lookup_min"], spec["prompt_lookup_max"]
        )

    def run(prompt: list[int], new: int):
        if proposer is None:
            seconds, outs = eng.generate([prompt], new)
            return seconds, outs[0], new - 1, 0, 0
        seconds, out, steps, draft_tokens = eng.generate_lookup(prompt, new, proposer)
        return seconds, out, steps, draft_tokens, None

    return run, {
        "weights": "llama.cpp",
        "int8_level": eng.simd_level(),
        "weight_bytes": eng.weight_bytes(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="GGUF file (default: the embedded model)")
    ap.add_argument(
        "--spec",
        default='{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 2, '
        '"prompt_lookup_max": 4}',
        help="tokenmill's speculative_config (the same proposer drives llama.cpp's lookup)",
    )
    ap.add_argument("--isa", default=None, help="tokenmill kernel level (default: the best)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--out", default="benchmarks/results/spec_decode.json")
    args = ap.parse_args()

    from tokenmill.config import SpeculativeConfig
    from tokenmill.kernels.cpu_isa import supported_isas

    path = args.model or default_model()
    parsed = SpeculativeConfig.parse(args.spec)
    spec = {
        "method": parsed.method,
        "num_speculative_tokens": parsed.num_speculative_tokens,
        "prompt_lookup_min": parsed.prompt_lookup_min,
        "prompt_lookup_max": parsed.prompt_lookup_max,
    }
    if parsed.model is not None:
        spec = {
            "model": parsed.model,
            "num_speculative_tokens": parsed.num_speculative_tokens,
            **({} if parsed.quantization is None else {"quantization": parsed.quantization}),
        }
    isa = args.isa or supported_isas()[0]
    warmup = ([5] * 8, 4)
    kind = "ngram" if parsed.model is None else "draft"
    workers = [
        Worker("tokenmill", "tokenmill", (path, args.threads, isa, None), _tokenmill, warmup),
        Worker(
            f"tokenmill {kind}", "tokenmill", (path, args.threads, isa, spec), _tokenmill, warmup
        ),
        Worker("llama.cpp", "llama.cpp", (path, args.threads, None), _llamacpp, warmup),
    ]
    if parsed.model is None:  # llama.cpp runs the same proposer's drafts
        workers.append(
            Worker("llama.cpp ngram", "llama.cpp", (path, args.threads, spec), _llamacpp, warmup)
        )
    prompts = workers[0].desc.pop("prompts")
    workers[1].desc.pop("prompts")
    ceilings = measure_ceilings(args.threads)
    results: dict[str, dict[str, dict]] = {w.label: {} for w in workers}
    for task, prompt in prompts.items():
        for rep in range(args.repeats):
            for w in workers[rep % len(workers) :] + workers[: rep % len(workers)]:
                seconds, tokens, steps, draft_tokens, drafts = w.time(prompt, args.new_tokens)
                r = results[w.label].setdefault(task, {"seconds": [], "prefill_seconds": []})
                r["seconds"].append(seconds)
                r["prefill_seconds"].append(w.time(prompt, 1)[0])
                r.update(tokens=tokens, steps=steps, draft_tokens=draft_tokens, drafts=drafts)
            print(f"  {task} rep {rep} done", flush=True)
    later = measure_ceilings(args.threads)
    ceilings = {k: max(ceilings.get(k, 0.0), later.get(k, 0.0)) for k in ceilings}
    read_bw = {w.label: working_set_read_gbs(w.desc["weight_bytes"], args.threads) for w in workers}
    params = count_params(path)
    print(
        f"\n{platform.processor() or platform.machine()}, {args.threads} threads, copy bandwidth "
        f"{ceilings['bandwidth']:.1f} GB/s, read rate of each engine's weights' size "
        f"{ {k: round(v, 1) for k, v in read_bw.items()} } GB/s; tokenmill kernels {isa}; "
        f"drafts: {args.spec}; "
        f"{args.new_tokens} new tokens, greedy, batch 1; flags: "
        + " ".join(sorted(f for f in _cpu_flags() if f.startswith(("avx", "amx"))))
    )
    print(
        f"{'task':<15}{'engine':<17}{'e2e tok/s':>10}{'decode':>8}{'x l.cpp':>9}{'x plain':>9}"
        f"{'tok/step':>9}{'accept':>8}{'roof':>6}{'same':>6}"
    )
    rows = []
    for task, prompt in prompts.items():
        ref = results["tokenmill"][task]["tokens"]

        def decode_rate(r: dict) -> float:
            """Tokens after the first over the time after the prefill (best of each)."""
            return (args.new_tokens - 1) / (min(r["seconds"]) - min(r["prefill_seconds"]))

        base = decode_rate(results["llama.cpp"][task])
        for w in workers:
            r = results[w.label][task]
            e2e = args.new_tokens / min(r["seconds"])
            tok_s = decode_rate(r)
            plain = decode_rate(results[w.label.split(" ")[0]][task])
            per_step = (args.new_tokens - 1) / r["steps"]
            rows_per_step = 1 + r["draft_tokens"] / r["steps"]
            macs = peak_macs_per_s(w.desc.get("int8_level"), ceilings, False)
            bw = read_bw[w.label] * 1e9
            # a draft model reads its weights once per guess (k passes a step)
            guesses = parsed.num_speculative_tokens if w.desc.get("draft_weight_bytes") else 0
            step_bytes = w.desc["weight_bytes"] + guesses * w.desc.get("draft_weight_bytes", 0)
            step_bound = max(step_bytes / bw, params * rows_per_step / macs)
            fraction = tok_s / (per_step / step_bound)
            same = sum(1 for a, b in zip(r["tokens"], ref) if a == b) if r["tokens"] else 0
            prefix = next((i for i, (a, b) in enumerate(zip(r["tokens"], ref)) if a != b), None)
            accept = (
                f"{(per_step - 1) / (rows_per_step - 1):.0%}"
                if r["draft_tokens"] and rows_per_step > 1
                else "-"
            )
            print(
                f"{task:<15}{w.label:<17}{e2e:>10.1f}{tok_s:>8.1f}{tok_s / base:>8.2f}x"
                f"{tok_s / plain:>8.2f}x"
                f"{per_step:>9.2f}{accept:>8}{100 * fraction:>5.0f}%"
                f"{'yes' if prefix is None else prefix:>6}"
            )
            rows.append(
                {
                    "task": task,
                    "engine": w.label,
                    **{k: v for k, v in w.desc.items() if k != "prompts"},
                    "prompt_tokens": len(prompt),
                    "e2e_tok_s": e2e,
                    "decode_tok_s": tok_s,
                    "x_llamacpp": tok_s / base,
                    "x_plain": tok_s / plain,
                    "tokens_per_step": per_step,
                    "rows_per_step": rows_per_step,
                    "roofline_fraction": fraction,
                    "first_token_differing_from_tokenmill_plain": prefix,
                    "matching_tokens": same,
                    "seconds": r["seconds"],
                }
            )
    for w in workers:
        w.close()
    write_results(
        args.out,
        {
            "threads": args.threads,
            "spec": spec,
            "ceilings": ceilings,
            "weights_read_gbs": read_bw,
            "params": params,
            "args": vars(args),
            "rows": rows,
        },
    )


if __name__ == "__main__":
    main()
