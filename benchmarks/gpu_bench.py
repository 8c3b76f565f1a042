"""The GPU check (issue 8): one call of the device tool, well under 8 minutes, JSON under $OUT.

In order, each section timed and saved as soon as it ends (a timeout keeps what finished):
  1. env: versions, GPU, measured device-copy bandwidth and bf16 GEMM rate;
  2. kernels: every Triton kernel in bfloat16 against the torch reference;
  3. tiny: a tiny random Llama end to end, the fast path (Triton + CUDA graphs) against the
     reference path (torch attention, eager): same greedy tokens; a decode step (greedy and
     sampled) under torch.cuda.set_sync_debug_mode("error");
  4. shapes: random-weight models of Llama-3.2-1B and Llama-3-8B shapes (load_format=dummy):
     start-up (load, capture), prefill, batch-1 decode, batch 32 / 64, offline 1,000 x 128/128
     on the 8B; every rate also as a fraction of the bandwidth roofline; batch 1 and 16 with
     the skinny GEMM against cuBLAS (`skinny_ab`);
  4a. offline sweep: the 8B offline run under larger per-step budgets (OFFLINE_BUDGETS);
  4b. fp8: --quantization fp8 against bfloat16 (quality on a tiny model, 8B decode speed);
  4c. lora: a LoRA adapter against its update merged into the weights (tiny, float32), and the
      1B shape's decode with 1 and 4 adapters against none;
  5. transformers eager (random weights, same shapes) at batch 1, as a sanity baseline.

    python benchmarks/gpu_bench.py --out $OUT/gpu_bench.json
    python benchmarks/gpu_bench.py --smoke   # CPU: tiny shapes, Triton interpreter, no timing
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPES = {  # Llama-3.2-1B and Llama-3-8B
    "1B": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        tie_word_embeddings=True,
        rope_theta=500000.0,
    ),
    "8B": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        tie_word_embeddings=False,
        rope_theta=500000.0,
    ),
}
SMOKE_SHAPES = {
    "1B": dict(
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    ),
    "8B": dict(
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        tie_word_embeddings=False,
    ),
}
VOCAB = 128256
TINY_SHAPE = dict(  # the end-to-end and fp8 quality checks
    hidden_size=512,
    intermediate_size=1024,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=2,
    tie_word_embeddings=False,
)
# A top-2 log-probability gap below this is a near-tie that bfloat16 rounding may flip: the
# logits of the tiny model are O(10), bf16 keeps 8 bits, and ~10 roundings lie between the
# reference's and the fast path's (different kernels, fused vs separate ops).
TIE_MARGIN = 0.1


class Run:
    """Sections in order; results (or the error) saved after each one."""

    def __init__(self, out: Path, smoke: bool) -> None:
        self.out = out
        self.smoke = smoke
        self.results: dict = {"smoke": smoke, "sections": {}}
        import torch

        self.device = torch.device("cuda" if torch.cuda.is_available() and not smoke else "cpu")

    def section(self, name: str, fn, *args) -> dict | None:
        t0 = time.perf_counter()
        print(f"== {name}", flush=True)
        try:
            result = {"ok": True, **fn(*args)}
        except Exception as e:  # keep going: the other sections still tell something
            result = {
                "ok": False,
                "error": f"{type(e).__name__}: {e}",
                "traceback": traceback.format_exc()[-4000:],
            }
        result["seconds"] = round(time.perf_counter() - t0, 2)
        self.results["sections"][name] = result
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.write_text(json.dumps(self.results, indent=1, default=str))
        print(json.dumps(result, default=str)[:3000], flush=True)
        return result

    def sync(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()


def timed(run: Run, fn, repeat: int = 1) -> float:
    """Best wall time of `repeat` calls (synchronised)."""
    best = float("inf")
    for _ in range(repeat):
        run.sync()
        t0 = time.perf_counter()
        fn()
        run.sync()
        best = min(best, time.perf_counter() - t0)
    return best


# ---- 1. environment ---------------------------------------------------------------------
def env(run: Run) -> dict:
    import torch
    import triton

    out = {"torch": torch.__version__, "triton": triton.__version__, "device": str(run.device)}
    try:
        import transformers

        out["transformers"] = transformers.__version__
    except ImportError:
        out["transformers"] = None
    if run.device.type != "cuda":
        return out
    p = torch.cuda.get_device_properties(0)
    out.update(
        gpu=p.name,
        capability=f"{p.major}.{p.minor}",
        memory_gb=p.total_memory / 1e9,
        sms=p.multi_processor_count,
    )
    n = 1 << 30
    x = torch.empty(n, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    t = timed(run, lambda: [y.copy_(x) for _ in range(10)], 3) / 10
    out["copy_gbs"] = 2 * n / t / 1e9  # read + write
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    t = timed(run, lambda: [a @ a for _ in range(10)], 3) / 10
    out["bf16_gemm_tflops"] = 2 * 8192**3 / t / 1e12
    run.results["copy_gbs"] = out["copy_gbs"]
    return out


def _skinny_checks(dev, dt) -> dict:
    """The skinny GEMM and its two prologues against float references (bf16 on the device)."""
    import torch
    import torch.nn.functional as F

    from tokenmill.kernels import triton_ops as tk
    from tokenmill.kernels import triton_skinny as ts

    checks = {}
    for rows in (1, 5, 16):
        x = torch.randn(rows, 2048, device=dev).to(dt)
        w = (torch.randn(3072, 2048, device=dev) * 0.02).to(dt)
        b = torch.randn(3072, device=dev).to(dt)
        expected = F.linear(x.float(), w.float(), b.float())
        got = ts.skinny_linear(x, w, b).float()
        checks[f"skinny_linear x{rows}"] = (
            (got - expected).abs().max() / expected.abs().max()
        ).item()
        gu = torch.randn(rows, 2 * 2048, device=dev).to(dt)
        got = ts.skinny_glu_linear(gu, w, b).float()
        two = ts.skinny_linear(tk.silu_and_mul(gu), w, b).float()  # the launches it replaces
        checks[f"skinny_glu_linear x{rows}"] = ((got - two).abs().max() / two.abs().max()).item()
        delta, g = torch.randn_like(x), (1 + 0.1 * torch.randn(2048, device=dev)).to(dt)
        r, got = ts.skinny_add_norm_linear(x, delta, g, 1e-5, w, b)
        rf = (x.float() + delta.float()).to(dt)
        expected = F.linear(F.rms_norm(rf.float(), (2048,), g.float(), 1e-5), w.float(), b.float())
        checks[f"skinny_add_norm_linear x{rows} residual exact"] = float(torch.equal(r, rf))
        checks[f"skinny_add_norm_linear x{rows}"] = (
            (got.float() - expected).abs().max() / expected.abs().max()
        ).item()
    return checks


# ---- 2. kernels ---------------------------------------------------------------------------
def kernels(run: Run) -> dict:
    import torch
    import torch.nn.functional as F

    from tests.test_triton_kernels import _paged_batch, _reference_attention
    from tokenmill.kernels import triton_attention as ta
    from tokenmill.kernels import triton_ops as tk
    from tokenmill.layers.rotary import RotaryEmbedding, apply_rotary

    dt = torch.float32 if run.smoke else torch.bfloat16
    dev = run.device
    tol = 2e-5 if run.smoke else 3e-2
    checks = {}
    for gqa, hd in ((1, 64), (4, 128), (8, 128)):
        ql, sl = [1, 1, 1, 5, 16, 21], [1, 16, 37, 5, 48, 300]
        kc, vc, tables, meta = _paged_batch(ql, sl, 2, hd, 16, dt)
        q = torch.randn(sum(ql), 2 * gqa, hd).to(dt)
        ref = _reference_attention(q, kc, vc, tables, ql, sl, 16, hd**-0.5)
        meta = {k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in meta.items()}
        for splits in (1, 4):
            out = ta.paged_attention(
                q.to(dev), kc.to(dev), vc.to(dev), scale=hd**-0.5, num_splits=splits, **meta
            )
            err = (out.double().cpu() - ref).abs().max().item()
            checks[f"attention gqa{gqa} d{hd} splits{splits}"] = err
    res = torch.randn(33, 2048, device=dev).to(dt)
    delta = torch.randn(33, 2048, device=dev).to(dt)
    w = torch.randn(2048, device=dev).to(dt)
    expected = F.rms_norm((res + delta).float(), (2048,), w.float(), 1e-5)
    _, got = tk.add_rms_norm(res.clone(), delta, w, 1e-5)
    checks["add_rms_norm"] = ((got.float() - expected).abs().max() / expected.abs().max()).item()
    rot = RotaryEmbedding(128, 4096, 500000.0).to(dev)
    x = torch.randn(9, 40, 128, device=dev).to(dt)
    pos = torch.randint(0, 4096, (9,), device=dev)
    expected = apply_rotary(x.float(), *rot.cos_sin(pos, torch.float32))
    checks["rotary"] = (
        (tk.rotary_inplace(x.clone(), pos, rot.cos_cached, rot.sin_cached).float() - expected)
        .abs()
        .max()
        .item()
    )
    qkv = torch.randn(9, 48 * 128, device=dev).to(dt)  # 32 query + 8 KV heads of 128
    q, k, v = (t.view(9, -1, 128) for t in qkv.split([32 * 128, 8 * 128, 8 * 128], dim=1))
    slots = torch.randperm(64, device=dev)[:9]
    slots[4] = -1
    kc, vc = (
        torch.zeros(64, 8, 128, device=dev, dtype=dt),
        torch.zeros(64, 8, 128, device=dev, dtype=dt),
    )
    exp_q = apply_rotary(q.float(), *rot.cos_sin(pos, torch.float32))
    exp_k = apply_rotary(k.float(), *rot.cos_sin(pos, torch.float32))
    keep = slots >= 0
    tk.rope_write_kv(q, k, v, kc, vc, pos, slots, rot.cos_cached, rot.sin_cached)
    checks["rope_write_kv"] = max(
        (q.float() - exp_q).abs().max().item(),
        (kc[slots[keep]].float() - exp_k[keep]).abs().max().item(),
    )
    checks["rope_write_kv v exact"] = float(torch.equal(vc[slots[keep]], v[keep]))
    gu = torch.randn(17, 2 * 8192, device=dev).to(dt)
    g, u = gu.float().chunk(2, dim=-1)
    expected = F.silu(g) * u
    checks["silu_and_mul"] = (
        (tk.silu_and_mul(gu).float() - expected).abs().max() / expected.abs().max()
    ).item()
    k = torch.randn(64, 8, 128, device=dev).to(dt)
    kc = torch.zeros(256, 8, 128, device=dev, dtype=dt)
    slots = torch.randperm(256, device=dev)[:64]
    slots[::7] = -1
    tk.write_kv(k, k, kc, kc.clone(), slots)
    keep = slots >= 0
    checks["write_kv exact"] = float(torch.equal(kc[slots[keep]], k[keep]))
    try:  # a failure here turns the skinny GEMM off for the rest of the run (main)
        checks.update(_skinny_checks(dev, dt))
    except Exception as e:
        checks["skinny error"] = f"{type(e).__name__}: {e}"
    logits = torch.randn(5, 128256, device=dev).to(dt)
    logits[1, [7, 90000]] = 50.0  # a tie across chunks: the first index wins
    checks["argmax exact"] = float(torch.equal(tk.argmax_rows(logits), logits.argmax(-1)))
    if not run.smoke:  # the interpreter's e4m3 rounding is not the GPU's (tests/test_fp8.py)
        from tokenmill.quant.fp8 import quantize_rows

        x = torch.randn(7, 4096, device=dev).to(dt)
        x[3, 5] = 900.0
        q, scale = tk.fp8_quantize_rows(x)
        q_ref, scale_ref = quantize_rows(x)
        same = torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))
        checks["fp8 quantize exact"] = float(same and torch.equal(scale, scale_ref))
    failed = [
        n
        for n, v in checks.items()
        if n.endswith("error") or (v != 1.0 if n.endswith("exact") else not v <= tol)
    ]
    return {"dtype": str(dt), "tolerance": tol, "max_errors": checks, "failed": failed}


# ---- model folders ------------------------------------------------------------------------
def model_folder(root: Path, name: str, shape: dict, vocab: int) -> Path:
    """config.json of a Llama with `shape`, plus a word-level tokenizer covering the vocab."""
    from tokenizers import Tokenizer, models

    path = root / name
    path.mkdir(parents=True, exist_ok=True)
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab,
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5,
        "hidden_act": "silu",
        "torch_dtype": "bfloat16",
        "bos_token_id": 1,
        "eos_token_id": 2,
        **shape,
    }
    (path / "config.json").write_text(json.dumps(cfg))
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tok.save(str(path / "tokenizer.json"))
    return path


def make_llm(run: Run, path: Path, **kw):
    from tokenmill import LLM

    kw.setdefault("dtype", "float32" if run.smoke else "bfloat16")
    return LLM(str(path), load_format="dummy", device=str(run.device), **kw)


def release_memory() -> None:
    """Give the memory of LLMs the caller has deleted back to the device (the KV pool of one
    fills most of it)."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---- 3. tiny end to end -------------------------------------------------------------------
def tiny(run: Run, root: Path) -> dict:
    import torch

    from tokenmill import SamplingParams

    path = model_folder(root, "tiny", TINY_SHAPE, 4096)
    prompts = [[(17 * i + 3 * j) % 4000 + 10 for j in range(5 + 9 * i)] for i in range(12)]
    greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    out = {}
    os.environ["TOKENMILL_BACKEND"] = "torch"
    ref_llm = make_llm(run, path, enforce_eager=True, max_model_len=512, max_num_seqs=16)
    # the reference also reports its top-2 log-probabilities, to tell a bf16 near-tie from a bug
    scored = ref_llm.generate(prompts, dataclasses.replace(greedy, logprobs=2))
    ref = [o.outputs[0].token_ids for o in scored]
    ref_logprobs = [o.outputs[0].logprobs for o in scored]
    del ref_llm, scored
    release_memory()
    del os.environ["TOKENMILL_BACKEND"]
    if run.smoke:
        os.environ["TOKENMILL_BACKEND"] = "triton"
    llm = make_llm(run, path, max_model_len=512, max_num_seqs=16)
    out["backend"] = llm.engine.model_info.backend
    out["graphs"] = llm.engine.runner.graphs is not None
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy)]
    out["identical_sequences"] = sum(a == b for a, b in zip(ref, got))
    out["sequences"] = len(ref)
    out["first_divergence"] = [
        next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None) for a, b in zip(ref, got)
    ]
    # the reference's top-1 minus top-2 log-probability where a sequence first diverges
    margins = []
    for lps, i in zip(ref_logprobs, out["first_divergence"]):
        if i is not None:
            top = sorted((lp.logprob for lp in lps[i].values()), reverse=True)
            margins.append(top[0] - top[1])
    out["divergence_margins"] = margins
    out["divergences_with_clear_margin"] = sum(m > TIE_MARGIN for m in margins)
    # One decode step (greedy, then sampled with a seed) under sync-debug "error".
    engine = llm.engine
    checks = {}
    for label, params in (
        ("greedy", greedy),
        (
            "sampled",
            SamplingParams(
                temperature=0.9, top_k=50, top_p=0.9, seed=7, max_tokens=24, ignore_eos=True
            ),
        ),
    ):
        engine.add_request(f"sync-{label}", prompts[3], params)
        engine.step()  # prefill
        engine.step()  # a first decode step (graph capture already done)
        if run.device.type == "cuda":
            torch.cuda.set_sync_debug_mode("error")
        try:
            engine.step()
            checks[label] = "no host sync"
        except RuntimeError as e:
            checks[label] = f"synchronised: {e}"
        finally:
            if run.device.type == "cuda":
                torch.cuda.set_sync_debug_mode("default")
        while engine.has_unfinished_requests():
            engine.step()
    out["sync_debug"] = checks
    del llm, engine
    release_memory()
    os.environ.pop("TOKENMILL_BACKEND", None)
    return out


# ---- 4. real shapes -----------------------------------------------------------------------
def roofline_tokens_per_s(llm, batch: int, context: int, copy_gbs: float | None) -> float | None:
    """Decode tok/s if every step read the weights and the batch's KV at the copy bandwidth."""
    if not copy_gbs:
        return None
    engine = llm.engine
    arch = engine.model_info.arch
    kv_per_token = 2 * arch.num_layers * arch.num_kv_heads * arch.head_dim * 2
    step_bytes = engine.model.weight_bytes_per_step() + batch * context * kv_per_token
    return batch / (step_bytes / (copy_gbs * 1e9))


def gen_seconds(run: Run, llm, vocab: int, n: int, length: int, tokens: int, lora=None) -> float:
    """Wall time of `tokens` greedy tokens for each of `n` prompts of `length` ids (with the
    LoRA adapter(s) `lora`: one, or one per prompt)."""
    from tokenmill import SamplingParams

    prompts = [[(31 * i + 7 * j) % (vocab - 10) + 5 for j in range(length)] for i in range(n)]
    params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    return timed(run, lambda: llm.generate(prompts, params, lora_request=lora))


def decode_tok_s(
    run: Run, llm, vocab: int, batch: int, prompt_len: int, new: int, lora=None
) -> float:
    """Steady decode rate of `batch` requests: the time of `new` tokens each less that of the
    first `new // 8`. Both runs include the whole prefill, in which the first requests already
    decode while later prompts are still chunked in (mixed steps); counting only from 1 token
    (the first version) credited those tokens to decoding and overstated batch rates."""
    head = max(1, new // 8)
    t_head = gen_seconds(run, llm, vocab, batch, prompt_len, head, lora)
    t_all = gen_seconds(run, llm, vocab, batch, prompt_len, new, lora)
    return batch * (new - head) / (t_all - t_head)


def estimate_check(run: Run, llm, path: Path, max_num_seqs: int) -> dict:
    """`tokenmill estimate`'s GPU figures against the loaded engine: its weights against the
    model's, its activations against a profile forward of the largest step (what the engine
    budgets its KV cache with), its CUDA context against the memory in use outside torch's
    allocator."""
    import torch

    from tokenmill.config import EngineArgs
    from tokenmill.loader.estimate import estimate_memory
    from tokenmill.worker.profile import profile_forward

    engine = llm.engine
    args = EngineArgs(
        model=str(path),
        dtype=str(engine.dtype).removeprefix("torch."),
        device="cuda",
        max_model_len=2048,
        max_num_seqs=max_num_seqs,
    )
    if run.device.type != "cuda":  # --smoke: the estimate runs, nothing to hold it against
        e = estimate_memory(args, memory_gib=80)
        return {"activations_estimate_gb": e.activations / 1e9, "checked": False}
    e = estimate_memory(args)
    cfg = engine.config
    peak = profile_forward(
        engine.model,
        args.max_num_batched_tokens,
        args.max_num_seqs,
        cfg.cache.block_size,
        engine.dtype,
        engine.device,
        cfg.model.max_model_len,
    )
    free, total = torch.cuda.mem_get_info(engine.device)
    outside = (total - free) - torch.cuda.memory_reserved(engine.device)
    weights = engine.model.weight_memory_bytes()
    return {
        "weights_estimate_gb": e.weights / 1e9,
        "weights_gb": weights / 1e9,
        "weights_ratio": e.weights / weights,
        "activations_estimate_gb": e.activations / 1e9,
        "profiled_peak_gb": peak / 1e9,
        "activations_ratio": e.activations / peak if peak else None,
        "context_estimate_gb": e.runtime / 1e9,
        "outside_allocator_gb": outside / 1e9,
    }


def shape_run(run: Run, root: Path, name: str) -> dict:
    shape = (SMOKE_SHAPES if run.smoke else SHAPES)[name]
    vocab = 512 if run.smoke else VOCAB
    path = model_folder(root, name, shape, vocab)
    prompt_len, new = (16, 8) if run.smoke else (512, 128)
    t0 = time.perf_counter()
    llm = make_llm(run, path, max_model_len=2048, max_num_seqs=8 if run.smoke else 256)
    out = {
        "ready_s": time.perf_counter() - t0,
        "startup_breakdown": dict(llm.engine.startup_seconds),
        "weights_gb": llm.engine.model.weight_memory_bytes() / 1e9,
        "kv_capacity_tokens": llm.engine.kv_capacity_tokens,
        "backend": llm.engine.model_info.backend,
    }
    copy_gbs = run.results.get("copy_gbs")

    def gen(n: int, length: int, tokens: int) -> float:
        return gen_seconds(run, llm, vocab, n, length, tokens)

    gen(1, prompt_len, 24)  # warm-up: kernel compilation, lazy CUDA module loading, a round
    t_prefill = gen(1, prompt_len, 1)
    out["prefill_tok_s"] = prompt_len / t_prefill

    def decode_rate(b: int) -> float:
        return decode_tok_s(run, llm, vocab, b, prompt_len, new)

    # Multi-step decoding (num_scheduler_steps): the default against other round lengths, at
    # batch 1 and the large batches. The scheduler's config is swapped in place (a benchmark
    # knob, not an API).
    sched = llm.engine.scheduler
    default_steps = sched.config.num_scheduler_steps
    out["num_scheduler_steps"] = default_steps
    batches = (1, 32, 64) if not run.smoke else (1, 4)
    for b in batches:
        rate = decode_rate(b)
        roof = roofline_tokens_per_s(llm, b, prompt_len + new // 2, copy_gbs)
        out[f"decode_b{b}_tok_s"] = rate
        out[f"decode_b{b}_roofline_fraction"] = rate / roof if roof else None
        by_steps = {}
        others = (1, 4, 16) if b == 1 else (1,)
        for steps in others if llm.engine.runner.graphs is not None else ():
            sched.config = dataclasses.replace(sched.config, num_scheduler_steps=steps)
            by_steps[steps] = decode_rate(b)
        sched.config = dataclasses.replace(sched.config, num_scheduler_steps=default_steps)
        out[f"decode_b{b}_tok_s_by_scheduler_steps"] = {default_steps: rate, **by_steps}
    out["b1_step_anatomy"] = step_anatomy(run, llm, out)
    out["estimate"] = estimate_check(run, llm, path, 8 if run.smoke else 256)
    out["skinny_vs_cublas"] = skinny_ab(llm, decode_rate)
    if name == "8B" or run.smoke:
        n = 40 if run.smoke else 1000
        length = 16 if run.smoke else 128
        out["offline"] = {"prompts": n, "in": length, "out": length}
        out["offline"].update(offline_run(run, llm, vocab, n, length))
    llm = None  # the closures above reach the LLM through this name
    release_memory()
    return out


# Per-step budgets tried for the offline run besides the defaults (max_num_seqs, tokens per
# step): vLLM's offline defaults on 80+ GB GPUs are 1,024 sequences and 16,384 tokens; more
# sequences per decode step read the weights for more tokens, more tokens per step cut the
# prefill phase's steps. The defaults change only on what these measure.
OFFLINE_BUDGETS = ((512, 8192), (1024, 16384))


def offline_run(run: Run, llm, vocab: int, n: int, length: int) -> dict:
    """One offline run (n prompts x `length` in / `length` out) and how its steps went: multi-step
    rounds by length, single decode steps, steps with prefill tokens. Rounds shorter than
    num_scheduler_steps were cut by the request nearest its max_tokens (or the context), single
    decode steps by a waiting request or a host-bound one (`Scheduler._schedule_multi_step`)."""
    sched = llm.engine.scheduler
    steps: Counter = Counter()
    schedule = sched.schedule

    def counting():
        out = schedule()
        tokens = sum(s.num_scheduled_tokens for s in out.scheduled)
        if out.num_steps > 1:
            steps[f"round of {out.num_steps}"] += 1
        else:
            steps["decode" if tokens == len(out.scheduled) else "with prefill"] += 1
        return out

    sched.schedule = counting  # a benchmark's probe on the instance, removed below
    try:
        t = gen_seconds(run, llm, vocab, n, length, length)
    finally:
        del sched.schedule
    return {
        "seconds": t,
        "output_tok_s": n * length / t,
        "total_tok_s": 2 * n * length / t,
        "steps": dict(sorted(steps.items())),
    }


def offline_sweep(run: Run, root: Path) -> dict:
    """The 8B offline run (1,000 prompts x 128 in / 128 out) under each of OFFLINE_BUDGETS,
    each on a fresh LLM (its graphs captured up to max_num_seqs), with its ready time."""
    name = "8B"
    shape = (SMOKE_SHAPES if run.smoke else SHAPES)[name]
    vocab = 512 if run.smoke else VOCAB
    path = model_folder(root, name, shape, vocab)
    n, length = (40, 16) if run.smoke else (1000, 128)
    out = {}
    for seqs, tokens in OFFLINE_BUDGETS:
        seqs = min(seqs, 8) if run.smoke else seqs
        t0 = time.perf_counter()
        llm = make_llm(
            run, path, max_model_len=2048, max_num_seqs=seqs, max_num_batched_tokens=tokens
        )
        ready = time.perf_counter() - t0
        gen_seconds(run, llm, vocab, seqs, length, 8)  # warm-up: every batch size's kernels
        out[f"{seqs}x{tokens}"] = {"ready_s": ready, **offline_run(run, llm, vocab, n, length)}
        llm = None
        release_memory()
    return out


def step_anatomy(run: Run, llm, out: dict) -> dict:
    """Where a batch-1 decode step's time goes: the captured graph replayed back to back (the
    device's share) against a whole single step (the rest is the host's: scheduling, inputs,
    sampling's copy back, detokenizing). Overlapping the host with the device would bound a
    step by the larger of the two; a round of k steps pays the host share once per k."""
    graphs = llm.engine.runner.graphs
    if graphs is None:
        return {"graphs": False}
    graph = graphs.graphs[min(graphs.graphs)]
    reps = 5 if run.smoke else 200
    graph.replay()
    t = timed(run, lambda: [graph.replay() for _ in range(reps)]) / reps
    single = 1 / out["decode_b1_tok_s_by_scheduler_steps"][1]
    host = max(single - t, 0.0)
    return {
        "graph_replay_ms": 1e3 * t,
        "single_step_ms": 1e3 * single,
        "host_ms": 1e3 * host,
        "overlap_bound_tok_s": 1 / max(t, host),
        "round_bound_tok_s": {k: k / (k * t + host) for k in (4, 8, 16)},
    }


def skinny_ab(llm, decode_rate) -> dict:
    """Decode at batch 1 and 16 with the dense linears' small-batch kernel (the skinny GEMM,
    `SkinnyLinear`) detached from every linear, so cuBLAS runs every row count, then attached
    again, and at batch 1 once more with its tl.dot kind in place of the one-row GEMV; the
    decode graphs recaptured each time (a benchmark knob, not an API); the same measurement as
    the shape's other decode rates."""
    linears = [m for m in llm.engine.model.modules() if getattr(m, "small_batch", None)]
    out = {"linears_on_skinny": len(linears)}
    graphs = llm.engine.runner.graphs
    if not linears:
        return out
    kernel = linears[0].small_batch
    for label, k in (("cublas", None), ("skinny", kernel)):
        for m in linears:
            m.small_batch = k
        if graphs is not None:
            graphs.capture()
        for b in (1, 16):
            out[f"{label}_b{b}_tok_s"] = decode_rate(b)
    for b in (1, 16):
        out[f"skinny_over_cublas_b{b}"] = out[f"skinny_b{b}_tok_s"] / out[f"cublas_b{b}_tok_s"]
    # one row on the tl.dot kind instead of the GEMV (_skinny_launch reads triton_skinny's
    # SKINNY_GEMV_CONFIG from its module globals at each launch: patched there, it takes effect)
    from tokenmill.kernels import triton_skinny as ts

    gemv = ts.SKINNY_GEMV_CONFIG
    ts.SKINNY_GEMV_CONFIG = ts.SKINNY_CONFIG
    try:
        if graphs is not None:
            graphs.capture()
        out["skinny_dot_b1_tok_s"] = decode_rate(1)
    finally:
        ts.SKINNY_GEMV_CONFIG = gemv
        if graphs is not None:
            graphs.capture()
    out["gemv_over_dot_b1"] = out["skinny_b1_tok_s"] / out["skinny_dot_b1_tok_s"]
    return out


def fp8(run: Run, root: Path) -> dict:
    """--quantization fp8. Quality: a random Llama's prompt log-probabilities in float32 (the
    reference), bfloat16, and fp8 (bfloat16 otherwise); the bound (tests/test_fp8.py): fp8's
    mean shift from float32 at most 16 times bfloat16's (e4m3's unit roundoff is 2^4 times
    bf16's). Speed: the 8B shape's decode at batch 1 and 32, against its bfloat16 figures of
    the same run ("shape 8B")."""
    import torch

    from tokenmill import SamplingParams

    out: dict = {}
    vocab = 4096
    path = model_folder(root, "tiny-fp8", TINY_SHAPE, vocab)
    prompt = [[(13 * j) % (vocab - 10) + 5 for j in range(200)]]
    params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0)
    lps = {}
    compute = "float32" if run.smoke else "bfloat16"
    variants = {
        "float32": dict(dtype="float32"),
        "bfloat16": dict(dtype="bfloat16"),
        "fp8": dict(dtype=compute, quantization="fp8"),
    }
    for label, kw in variants.items():
        llm = make_llm(run, path, max_model_len=512, max_num_seqs=4, **kw)
        scored = llm.generate(prompt, params)[0].prompt_logprobs[1:]
        lps[label] = torch.tensor([next(iter(e.values())).logprob for e in scored])
        del llm, scored
        release_memory()
    bf16 = (lps["bfloat16"] - lps["float32"]).abs().mean().item()
    fp8 = (lps["fp8"] - lps["float32"]).abs().mean().item()
    out["quality"] = {
        "bf16_mean_logprob_shift": bf16,
        "fp8_mean_logprob_shift": fp8,
        "ratio": fp8 / bf16 if bf16 else None,
        "within_bound_16": fp8 <= 16 * bf16,
    }
    name = "8B"
    vocab = 512 if run.smoke else VOCAB
    path = model_folder(root, name, (SMOKE_SHAPES if run.smoke else SHAPES)[name], vocab)
    prompt_len, new = (16, 8) if run.smoke else (512, 128)
    t0 = time.perf_counter()
    llm = make_llm(run, path, quantization="fp8", max_model_len=2048, max_num_seqs=256)
    out["ready_s"] = time.perf_counter() - t0
    out["weights_gb"] = llm.engine.model.weight_memory_bytes() / 1e9
    gen_seconds(run, llm, vocab, 1, prompt_len, 24)  # warm-up
    bf16 = run.results["sections"].get(f"shape {name}", {})
    for b in (1, 32):
        rate = decode_tok_s(run, llm, vocab, b, prompt_len, new)
        roof = roofline_tokens_per_s(llm, b, prompt_len + new // 2, run.results.get("copy_gbs"))
        out[f"decode_b{b}_tok_s"] = rate
        out[f"decode_b{b}_roofline_fraction"] = rate / roof if roof else None
        base = bf16.get(f"decode_b{b}_tok_s")
        out[f"decode_b{b}_vs_bf16"] = rate / base if base else None
    llm = None
    release_memory()
    return out


# ---- 4c. LoRA -----------------------------------------------------------------------------
LORA_TARGETS = {  # PEFT module name -> (input, output) as multiples of (hidden, head_dim...)
    "self_attn.q_proj": ("h", "q"),
    "self_attn.k_proj": ("h", "kv"),
    "self_attn.v_proj": ("h", "kv"),
    "self_attn.o_proj": ("q", "h"),
    "mlp.gate_proj": ("h", "i"),
    "mlp.up_proj": ("h", "i"),
    "mlp.down_proj": ("i", "h"),
}


def lora_adapter(path: Path, shape: dict, rank: int, seed: int) -> Path:
    """A PEFT adapter folder of rank `rank` on every projection of a Llama of `shape`, random
    (A ~ N(0, 1/in), B ~ N(0, 0.02^2), alpha = rank)."""
    import torch
    from safetensors.torch import save_file

    h = shape["hidden_size"]
    d = h // shape["num_attention_heads"]
    size = {
        "h": h,
        "q": shape["num_attention_heads"] * d,
        "kv": shape["num_key_value_heads"] * d,
        "i": shape["intermediate_size"],
    }
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(shape["num_hidden_layers"]):
        for module, (fan_in, fan_out) in LORA_TARGETS.items():
            name = f"base_model.model.model.layers.{layer}.{module}"
            a = torch.randn(rank, size[fan_in], generator=g) / size[fan_in] ** 0.5
            tensors[f"{name}.lora_A.weight"] = a
            tensors[f"{name}.lora_B.weight"] = torch.randn(size[fan_out], rank, generator=g) * 0.02
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": rank, "target_modules": []}
    config["target_modules"] = sorted(m.split(".")[1] for m in LORA_TARGETS)
    (path / "adapter_config.json").write_text(json.dumps(config))
    return path


def lora(run: Run, root: Path) -> dict:
    """LoRA adapters on the device (tests/test_lora.py checks the loader and the math against
    PEFT on the CPU). Correctness: a tiny random Llama in float32 with a rank-16 adapter, its
    prompt logprobs against a second engine of the same random weights with the adapter's
    update merged into them (W + b a, from the first engine's own slot), within 1e-3. Speed:
    the 1B shape's decode at batch 1 and 32 with one adapter (rank 16, every projection) and
    at batch 32 with 4 adapters, against the same engine without one (steps with adapters run
    eagerly; without, they replay the graphs)."""
    import torch

    from tokenmill import LoRARequest, SamplingParams

    out: dict = {}
    vocab = 4096
    path = model_folder(root, "tiny-lora", TINY_SHAPE, vocab)
    req = LoRARequest("tiny", 1, str(lora_adapter(root / "tiny-adapter", TINY_SHAPE, 16, 0)))
    prompt = [[(13 * j) % (vocab - 10) + 5 for j in range(200)]]
    params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0)
    opts = dict(dtype="float32", max_model_len=512, max_num_seqs=4, enforce_eager=True)
    llm = make_llm(run, path, enable_lora=True, **opts)
    scored = llm.generate(prompt, params, lora_request=req)[0].prompt_logprobs[1:]
    with_adapter = torch.tensor([next(iter(e.values())).logprob for e in scored])
    updates = {
        name: (m.lora.b[0] @ m.lora.a[0]).clone()  # slot 0: the only adapter
        for name, m in llm.engine.model.named_modules()
        if getattr(m, "lora", None) is not None
    }
    del llm, scored
    release_memory()
    merged = make_llm(run, path, **opts)
    with torch.no_grad():
        for name, delta in updates.items():
            merged.engine.model.get_submodule(name).weight.add_(delta)
    scored = merged.generate(prompt, params)[0].prompt_logprobs[1:]
    reference = torch.tensor([next(iter(e.values())).logprob for e in scored])
    del merged, scored
    release_memory()
    err = (with_adapter - reference).abs().max().item()
    out["tiny_max_logprob_error"] = err
    out["tiny_ok"] = err <= 1e-3
    name = "1B"
    shape = (SMOKE_SHAPES if run.smoke else SHAPES)[name]
    vocab = 512 if run.smoke else VOCAB
    path = model_folder(root, name, shape, vocab)
    prompt_len, new = (16, 8) if run.smoke else (512, 128)
    adapters = [
        LoRARequest(f"a{i}", i + 1, str(lora_adapter(root / f"a{i}", shape, 16, i + 1)))
        for i in range(4)
    ]
    llm = make_llm(run, path, max_model_len=2048, max_num_seqs=256, enable_lora=True)
    gen_seconds(run, llm, vocab, 1, prompt_len, 24)  # warm-up: graphs and kernels
    gen_seconds(run, llm, vocab, 4, prompt_len, 24, adapters)  # and the adapters' slots
    cases = {"b1": (1, None), "b1_lora": (1, adapters[0]), "b32": (32, None)}
    cases |= {"b32_lora": (32, adapters[0]), "b32_4_loras": (32, adapters * 8)}
    for label, (b, which) in cases.items():
        out[f"decode_{label}_tok_s"] = decode_tok_s(run, llm, vocab, b, prompt_len, new, which)
    for label in ("b1_lora", "b32_lora", "b32_4_loras"):
        plain = out[f"decode_{label.split('_')[0]}_tok_s"]
        out[f"decode_{label}_vs_none"] = out[f"decode_{label}_tok_s"] / plain
    llm = None
    release_memory()
    return out


# ---- 5. transformers eager ----------------------------------------------------------------
def transformers_eager(run: Run, name: str) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = (SMOKE_SHAPES if run.smoke else SHAPES)[name]
    vocab = 512 if run.smoke else VOCAB
    cfg = LlamaConfig(vocab_size=vocab, max_position_embeddings=8192, **shape)
    dtype = torch.float32 if run.smoke else torch.bfloat16
    with torch.device(run.device):
        model = LlamaForCausalLM(cfg).to(dtype).eval()
    prompt_len, new = (16, 8) if run.smoke else (512, 128)
    ids = torch.randint(5, vocab - 5, (1, prompt_len), device=run.device)

    def gen(tokens: int):
        with torch.no_grad():
            model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)

    gen(2)
    t1 = timed(run, lambda: gen(1))
    tn = timed(run, lambda: gen(new))
    return {"decode_b1_tok_s": (new - 1) / (tn - t1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--out", default=os.path.join(os.environ.get("OUT", "benchmarks/results"), "gpu_bench.json")
    )
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, interpreter")
    ap.add_argument(
        "--skip", default="", help="comma-separated: kernels,tiny,1B,8B,offline,fp8,lora,hf"
    )
    args = ap.parse_args()
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    skip = set(filter(None, args.skip.split(",")))
    run = Run(Path(args.out), args.smoke)
    run.section("env", env, run)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if "kernels" not in skip:
            result = run.section("kernels", kernels, run)
            bad = [n for n in (result or {}).get("failed", []) if n.startswith("skinny")]
            if bad:  # measure the rest on cuBLAS rather than lose the run
                os.environ["TOKENMILL_SKINNY_GEMM"] = "0"
                run.results["skinny_gemm_disabled"] = bad
        if "tiny" not in skip:
            run.section("tiny", tiny, run, root)
        for name in ("1B", "8B"):
            if name not in skip:
                run.section(f"shape {name}", shape_run, run, root, name)
        if "8B" not in skip and "offline" not in skip:
            run.section("offline sweep 8B", offline_sweep, run, root)
        if "fp8" not in skip:
            run.section("fp8", fp8, run, root)
        if "lora" not in skip:
            run.section("lora", lora, run, root)
        if "hf" not in skip:
            for name in ("1B", "8B"):
                if name not in skip:
                    run.section(f"transformers eager {name}", transformers_eager, run, name)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
