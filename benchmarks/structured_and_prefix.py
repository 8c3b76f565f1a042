"""Issue 10's two speed claims, each against its baseline in the same run, on the default model
with the engine's defaults (as users run it):

1. **JSON-schema decoding at batch 32.** 32 chat requests, the 10 schemas of
   `tests/data/json_schemas.json` round-robin, greedy. Baseline: the same prompts
   unconstrained, each held to exactly the number of tokens its constrained twin produced
   (ignore_eos), so both runs generate the same tokens per request. Reports output tokens/s
   and the constrained / unconstrained ratio (target: >= 0.90).
2. **Shared-prefix time to first token.** 32 requests with a ~1,000-token system prompt in
   common and their own question, submitted together; TTFT of each is the time from submission
   to its first token. Prefix caching on vs off, each on a fresh engine (target: mean TTFT
   >= 3x lower with the cache).

Each figure is the best of `--repeats` runs. Prints a table and writes JSON.

    python benchmarks/structured_and_prefix.py [--repeats 3] [--out benchmarks/results/issue10.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from tokenmill import LLM, SamplingParams
from tokenmill.sampling_params import StructuredOutputsParams

SCHEMAS = json.loads((Path(__file__).parents[1] / "tests/data/json_schemas.json").read_text())
SYSTEM = (
    "You are a careful assistant for a library. Answer questions about opening hours, loans, "
    "renewals, fines, rooms and events. Keep every answer short and polite. "
) * 30


def timed_generate(llm: LLM, prompts: list[list[int]], params: list[SamplingParams]):
    t = time.perf_counter()
    outs = llm.generate(prompts, params)
    return outs, time.perf_counter() - t


def structured_throughput(llm: LLM, batch: int, repeats: int) -> dict:
    names = [list(SCHEMAS)[i % len(SCHEMAS)] for i in range(batch)]
    prompts = [
        llm.encode_chat([{"role": "user", "content": f"Reply with a JSON object: a {n}."}])[1]
        for n in names
    ]
    constrained = [
        SamplingParams(
            temperature=0,
            max_tokens=256,
            structured_outputs=StructuredOutputsParams(json=SCHEMAS[n]),
        )
        for n in names
    ]
    llm.generate(prompts[:2], constrained[:2])  # warm up; compiles two grammars
    best_c, best_u = float("inf"), float("inf")
    for _ in range(repeats):
        outs, secs = timed_generate(llm, prompts, constrained)
        best_c = min(best_c, secs)
        lengths = [len(o.outputs[0].token_ids) for o in outs]
        free = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in lengths]
        _, secs = timed_generate(llm, prompts, free)
        best_u = min(best_u, secs)
    tokens = sum(lengths)
    return {
        "batch": batch,
        "output_tokens": tokens,
        "constrained_tok_s": tokens / best_c,
        "unconstrained_tok_s": tokens / best_u,
        "ratio": best_u / best_c,
    }


def shared_prefix_ttft(caching: bool, batch: int, repeats: int) -> dict:
    best: list[float] | None = None
    for _ in range(repeats):
        llm = LLM(enable_prefix_caching=caching, max_model_len=2048)
        engine = llm.engine
        prompts = [
            llm.encode_chat(
                [{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"Q{i}?"}]
            )[1]
            for i in range(batch)
        ]
        one = SamplingParams(temperature=0, max_tokens=1)
        t0 = time.perf_counter()
        for i, p in enumerate(prompts):
            engine.add_request(f"r{i}", p, one)
        ttft: dict[str, float] = {}
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.outputs[0].token_ids and out.request_id not in ttft:
                    ttft[out.request_id] = time.perf_counter() - t0
        times = sorted(ttft.values())
        if best is None or statistics.mean(times) < statistics.mean(best):
            best = times
        del llm, engine
    assert best is not None
    return {
        "prefix_caching": caching,
        "prompt_tokens": len(prompts[0]),
        "mean_ttft_s": statistics.mean(best),
        "p50_ttft_s": best[len(best) // 2],
        "max_ttft_s": best[-1],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results/issue10.json")
    args = ap.parse_args()

    llm = LLM(max_model_len=2048)
    so = structured_throughput(llm, args.batch, args.repeats)
    del llm
    on = shared_prefix_ttft(True, args.batch, args.repeats)
    off = shared_prefix_ttft(False, args.batch, args.repeats)
    speedup = off["mean_ttft_s"] / on["mean_ttft_s"]

    print(f"JSON-schema decoding, batch {so['batch']} ({so['output_tokens']} output tokens):")
    print(f"  constrained    {so['constrained_tok_s']:8.1f} tok/s")
    print(f"  unconstrained  {so['unconstrained_tok_s']:8.1f} tok/s")
    print(f"  ratio          {so['ratio']:8.3f}  (target >= 0.90)")
    print(f"Shared {on['prompt_tokens']}-token prompts x {args.batch}, time to first token:")
    for r in (on, off):
        label = "cache on " if r["prefix_caching"] else "cache off"
        print(
            f"  {label}  mean {r['mean_ttft_s']:6.2f} s  p50 {r['p50_ttft_s']:6.2f} s  "
            f"max {r['max_ttft_s']:6.2f} s"
        )
    print(f"  mean TTFT speed-up with the cache: {speedup:.1f}x  (target >= 3x)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {"structured": so, "prefix_on": on, "prefix_off": off, "ttft_speedup": speedup},
            indent=2,
        )
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
