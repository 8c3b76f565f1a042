"""xgrammar vs llguidance on this CPU, with the default model's tokenizer: how issue 10 chose
the structured-output engine.

Measures, for each engine:
- tokenizer set-up (once per model);
- compile time of each of the 10 JSON schemas of `tests/data/json_schemas.json` (cold: no cache);
- the per-token mask at batch 32: 32 matchers (the schemas round-robin) each walk the grammar by
  random allowed tokens; every step computes all 32 bitmasks in one batched call (the engines'
  own thread pools) and then advances every matcher by its token. Mask and advance are timed
  apart, as ms per step of 32 rows.

Both engines get the same tokenizer (tokenmill's, built from the GGUF), the same schemas and the
same random walks' lengths. Prints a table and writes JSON.

    python benchmarks/grammar_engines.py [--steps 48] [--out PATH.json]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import torch

from tokenmill.engine.tokenizer import Tokenizer
from tokenmill.loader.resolve import resolve_model

SCHEMAS = json.loads((Path(__file__).parents[1] / "tests/data/json_schemas.json").read_text())
BATCH = 32


def _allowed(bitmask_row: torch.Tensor, vocab: int) -> list[int]:
    bits = (bitmask_row.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1
    return torch.nonzero(bits.reshape(-1)[:vocab]).flatten().tolist()


class LLGuidance:
    name = "llguidance"

    def __init__(self, tok: Tokenizer, vocab: int, threads: int) -> None:
        import llguidance
        import llguidance.torch as llt

        self.ll, self.llt = llguidance, llt
        t = time.perf_counter()
        self.tok = llguidance.LLTokenizer(
            tok.backend.to_str(), n_vocab=vocab, eos_token=sorted(tok.eos_token_ids)
        )
        self.setup_s = time.perf_counter() - t
        self.executor = llguidance.LLExecutor(num_threads=threads)
        self.vocab = vocab

    def compile(self, schema: dict):
        m = self.ll.LLMatcher(self.tok, self.ll.LLMatcher.grammar_from_json_schema(schema))
        if m.is_error():
            raise RuntimeError(m.get_error())
        return m

    def matcher(self, compiled):
        return compiled.deep_copy()

    def fill(self, matchers, bitmask) -> None:
        self.llt.fill_next_token_bitmask_par(
            self.executor, [(m, i) for i, m in enumerate(matchers)], bitmask
        )

    def advance(self, matchers, tokens) -> None:
        for m, t in zip(matchers, tokens):
            assert m.consume_token(t), m.get_error()

    def done(self, m) -> bool:
        return m.is_stopped() or m.is_accepting()


class XGrammar:
    name = "xgrammar"

    def __init__(self, tok: Tokenizer, vocab: int, threads: int) -> None:
        import xgrammar
        from transformers import PreTrainedTokenizerFast

        self.xgr = xgrammar
        t = time.perf_counter()
        hf = PreTrainedTokenizerFast(tokenizer_object=tok.backend)
        info = xgrammar.TokenizerInfo.from_huggingface(
            hf, vocab_size=vocab, stop_token_ids=sorted(tok.eos_token_ids)
        )
        self.compiler = xgrammar.GrammarCompiler(info, max_threads=threads, cache_enabled=False)
        self.setup_s = time.perf_counter() - t
        self.batch = xgrammar.BatchGrammarMatcher(max_threads=threads)
        self.vocab = vocab

    def compile(self, schema: dict):
        return self.compiler.compile_json_schema(json.dumps(schema))

    def matcher(self, compiled):
        return self.xgr.GrammarMatcher(compiled)

    def fill(self, matchers, bitmask) -> None:
        self.batch.batch_fill_next_token_bitmask(matchers, bitmask)

    def advance(self, matchers, tokens) -> None:
        for m, t in zip(matchers, tokens):
            assert m.accept_token(t)

    def done(self, m) -> bool:
        return m.is_terminated() or m.is_completed()


def run_engine(cls, tok: Tokenizer, vocab: int, threads: int, steps: int, seed: int) -> dict:
    eng = cls(tok, vocab, threads)
    compile_ms = {}
    compiled = {}
    for name, schema in SCHEMAS.items():
        t = time.perf_counter()
        compiled[name] = eng.compile(schema)
        compile_ms[name] = 1e3 * (time.perf_counter() - t)
    names = list(SCHEMAS)
    rng = random.Random(seed)
    eos = tok.eos_token_ids
    matchers = [eng.matcher(compiled[names[i % len(names)]]) for i in range(BATCH)]
    bitmask = torch.full((BATCH, (vocab + 31) // 32), -1, dtype=torch.int32)
    fill_ms, advance_ms = [], []
    for _ in range(steps):
        t = time.perf_counter()
        eng.fill(matchers, bitmask)
        fill_ms.append(1e3 * (time.perf_counter() - t))
        tokens = []
        for i, m in enumerate(matchers):
            allowed = [a for a in _allowed(bitmask[i], vocab) if a not in eos]
            if not allowed or eng.done(m) and rng.random() < 0.5:  # finished: start over
                matchers[i] = m = eng.matcher(compiled[names[i % len(names)]])
                eng.fill([m], bitmask[i : i + 1])
                allowed = [a for a in _allowed(bitmask[i], vocab) if a not in eos]
            tokens.append(rng.choice(allowed))
        t = time.perf_counter()
        eng.advance(matchers, tokens)
        advance_ms.append(1e3 * (time.perf_counter() - t))
    return {
        "tokenizer_setup_s": eng.setup_s,
        "compile_ms": compile_ms,
        "compile_total_ms": sum(compile_ms.values()),
        "mask_batch32_ms_median": statistics.median(fill_ms),
        "mask_batch32_ms_p90": sorted(fill_ms)[int(0.9 * len(fill_ms))],
        "advance_batch32_ms_median": statistics.median(advance_ms),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results/grammar_engines.json")
    args = ap.parse_args()
    source = resolve_model(None)
    tok = Tokenizer.from_gguf(source.path)
    from tokenmill.loader.gguf_file import gguf_metadata, open_gguf

    vocab = len(gguf_metadata(open_gguf(source.path))["tokenizer.ggml.tokens"])
    results = {}
    for cls in (LLGuidance, XGrammar):
        results[cls.name] = run_engine(cls, tok, vocab, args.threads, args.steps, args.seed)
    print(f"{'':28s}" + "".join(f"{n:>14s}" for n in results))
    rows = [("tokenizer set-up (s)", "tokenizer_setup_s", "{:.2f}")]
    rows += [(f"compile {k} (ms)", k, "{:.1f}") for k in SCHEMAS]
    for label, key, fmt in rows + [
        ("compile, 10 schemas (ms)", "compile_total_ms", "{:.1f}"),
        ("mask, batch 32 (ms, median)", "mask_batch32_ms_median", "{:.2f}"),
        ("mask, batch 32 (ms, p90)", "mask_batch32_ms_p90", "{:.2f}"),
        ("advance, batch 32 (ms)", "advance_batch32_ms_median", "{:.2f}"),
    ]:
        vals = [r["compile_ms"][key] if key in SCHEMAS else r[key] for r in results.values()]
        print(f"{label:30s}" + "".join(f"{fmt.format(v):>14s}" for v in vals))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"threads": args.threads, "vocab": vocab, **results}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
