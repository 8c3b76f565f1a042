"""Speculative decoding (prompt-lookup drafts and a draft model): the proposer against a naive
search, the rejection sampler's output distribution against hand-computed target distributions,
and the engine's output against plain decoding (greedy: token for token; limits, stops,
preemption, prefix cache, mixed batches), the draft model's cache bookkeeping (a draft that
is the target gets its guesses accepted), the options and the server's counters."""

from __future__ import annotations

import json
import math
import random

import httpx
import numpy as np
import pytest
import torch

from tests.server_utils import ServerProcess
from tests.test_engine import _prompts
from tokenmill import LLM, SamplingParams
from tokenmill.config import EngineArgs, SpeculativeConfig
from tokenmill.core.kv_cache_manager import KVCacheManager
from tokenmill.core.request import Request
from tokenmill.core.spec_decode import NgramProposer
from tokenmill.kernels.cpu_ops import get_ops
from tokenmill.layers.ops import CpuOps, TorchOps
from tokenmill.loader.inspect import describe_model
from tokenmill.loader.resolve import default_model_path
from tokenmill.sample.rejection import accept_greedy, rejection_sample
from tokenmill.sample.sampler import build_sampling_metadata

SPEC = {
    "method": "ngram",
    "num_speculative_tokens": 4,
    "prompt_lookup_min": 1,
    "prompt_lookup_max": 3,
}


# ---- the proposer ------------------------------------------------------------------------------
def _naive_propose(tokens: list[int], k: int, lo: int, hi: int) -> list[int]:
    """The specification, literally: the longest n in [lo, hi] whose last-n tokens occur earlier
    (the latest such place wins); the up to k tokens after it."""
    for n in range(hi, lo - 1, -1):
        if n >= len(tokens):
            continue
        suffix = tokens[-n:]
        for start in range(len(tokens) - n - 1, -1, -1):
            if tokens[start : start + n] == suffix:
                return tokens[start + n : start + n + k]
    return []


def test_ngram_proposer_matches_a_naive_search():
    rng = random.Random(0)
    proposer = NgramProposer(2, 4)
    found = 0
    for _ in range(400):
        vocab = rng.choice([2, 3, 5, 50])
        tokens = [rng.randrange(vocab) for _ in range(rng.randrange(0, 60))]
        k = rng.randrange(0, 6)
        want = _naive_propose(tokens, k, 2, 4)
        assert proposer.propose(tokens, k) == want, (tokens, k)
        found += bool(want)
    assert found > 100  # the cases are not all empty


def test_ngram_proposer_by_hand():
    p = NgramProposer(1, 3)
    #        0  1  2  3  4  5  6  7
    seq = [7, 1, 2, 3, 9, 1, 2, 3]
    assert p.propose(seq, 2) == [9, 1]  # "1 2 3" at 1..3 is followed by 9, 1
    assert p.propose([5, 6, 5, 6, 5], 3) == [6, 5]  # latest earlier "5 6 5" at 0..2: then 6, 5
    assert p.propose([1, 2, 3, 4], 3) == []  # nothing repeats
    assert p.propose([4, 4], 5) == [4]  # n = 1: the 4 at 0 is followed by the 4 at 1
    with pytest.raises(ValueError):
        NgramProposer(3, 2)


# ---- the rejection sampler ---------------------------------------------------------------------
@pytest.fixture(params=["torch", "cpu"])
def ops(request):
    if request.param == "torch":
        return TorchOps()
    kernels = get_ops()
    if kernels is None:
        pytest.skip("no C++ compiler to build the kernels")
    return CpuOps(kernels)


def _target(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """The distribution a plain step samples from, computed by hand (float64): temperature, then
    top-k, top-p (the smallest set of best tokens reaching top_p), min-p."""
    z = logits.astype(np.float64) / params.temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    keep = np.ones(len(p), dtype=bool)
    order = np.argsort(-p, kind="stable")
    if params.top_k > 0:
        keep[order[params.top_k :]] = False
    if params.top_p < 1:
        q = np.where(keep, p, 0) / np.where(keep, p, 0).sum()
        before = np.cumsum(q[order]) - q[order]
        keep[order[before >= params.top_p]] = False
    if params.min_p > 0:
        keep &= p >= params.min_p * p.max()
    p = np.where(keep, p, 0)
    return p / p.sum()


def _assert_distribution(tokens: np.ndarray, p: np.ndarray, label: str) -> None:
    n = len(tokens)
    assert n > 1000, f"{label}: only {n} samples"
    freq = np.bincount(tokens, minlength=len(p)) / n
    bound = 5 * math.sqrt(0.25 / n)  # 5 standard deviations of a frequency at most
    assert np.abs(freq - p).max() < bound, f"{label}: {freq.round(4)} vs {p.round(4)}"
    assert (freq[p == 0] == 0).all(), f"{label}: sampled a token of probability 0"


PARAMS = {
    "t1": SamplingParams(temperature=1.0),
    "t0.7-topk4": SamplingParams(temperature=0.7, top_k=4),
    "t1.3-topp0.8": SamplingParams(temperature=1.3, top_p=0.8),
    "minp0.15": SamplingParams(temperature=1.0, min_p=0.15),
}


@pytest.mark.parametrize("name", sorted(PARAMS))
@pytest.mark.parametrize("drafts_kind", ["likely", "unlikely"])
def test_rejection_sampling_keeps_the_target_distribution(ops, name, drafts_kind):
    """80k identical requests with 2 drafts each: the first emitted token follows p0 whatever
    the draft; after the first draft, the second follows p1; after both, the bonus follows p2.
    "unlikely" drafts are the least likely tokens: where the filters remove them (probability
    0), always rejected."""
    params = PARAMS[name]
    vocab, n = 7, 80000
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, vocab, generator=g) * 1.5  # positions 0, 1, 2
    p = [_target(row.numpy(), params) for row in logits]
    rank = 1 if drafts_kind == "likely" else -1
    drafts = (int(np.argsort(-p[0])[rank]), int(np.argsort(-p[1])[rank]))
    md = build_sampling_metadata(
        [params] * n, [[]] * n, [[]] * n, {}, vocab, torch.device("cpu"), None, None
    )
    torch.manual_seed(0)
    accepted, final = rejection_sample(logits.repeat(n, 1), [drafts] * n, md, ops)
    accepted, final = accepted.numpy(), final.numpy()
    first = np.where(accepted >= 1, drafts[0], final)
    _assert_distribution(first, p[0], "first token")
    after_first = accepted >= 1
    if drafts_kind == "unlikely":  # too few acceptances to measure what follows
        assert after_first.mean() < 0.05
        assert p[0][drafts[0]] > 0 or not after_first.any()
        return
    second = np.where(accepted[after_first] >= 2, drafts[1], final[after_first])
    _assert_distribution(second, p[1], "second token after the first draft")
    _assert_distribution(final[accepted == 2], p[2], "bonus token")


def test_greedy_rows_accept_exactly_the_argmax(ops):
    """Temperature-0 rows (beside a random row) keep drafts while they are the argmax, then
    emit the argmax: what plain greedy decoding gives."""
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(3 + 4 + 2, 11, generator=g)
    argmax = logits.argmax(1).tolist()
    drafts = [
        (argmax[0], 5 if argmax[1] != 5 else 6),  # first right, second wrong
        (argmax[3], argmax[4], argmax[5]),  # all right: a bonus token
        (argmax[7] + 1) % 11,  # wrong at once
    ]
    drafts[2] = (drafts[2],)
    params = [SamplingParams(temperature=0), SamplingParams(temperature=0), SamplingParams()]
    params[2] = SamplingParams(temperature=0)
    md = build_sampling_metadata(
        params, [[]] * 3, [[]] * 3, {}, 11, torch.device("cpu"), None, None
    )
    accepted, final = rejection_sample(logits, drafts, md, ops)
    got = [[*d[:a], f] for d, a, f in zip(drafts, accepted.tolist(), final.tolist())]
    assert got == accept_greedy(argmax, drafts)
    assert got == [argmax[0:2], argmax[3:7], argmax[7:8]]


def test_accept_greedy_by_hand():
    #          request 0 (2 drafts)  request 1 (0)  request 2 (1)
    targets = [4, 5, 6, 9, 3, 8]
    assert accept_greedy(targets, [(4, 7), (), (3,)]) == [[4, 5], [9], [3, 8]]


def test_seeded_requests_reproduce_and_ignore_their_neighbours(ops):
    """A request with a seed draws its acceptance tests and its token from its own generator:
    the same seed gives the same result whatever else is in the batch (here: neighbours with
    more drafts than it)."""
    vocab = 9
    logits = torch.randn(4, vocab, generator=torch.Generator().manual_seed(3))
    mine = (int(logits[0].argmax()), int(logits[1].argmax()))
    theirs = (*mine, int(logits[2].argmax()))

    def run(batch: int, row: int) -> list[tuple[int, int]]:
        params = [SamplingParams(temperature=1.0) for _ in range(batch)]
        params[row] = SamplingParams(temperature=1.0, seed=42)
        gen = {row: torch.Generator().manual_seed(42)}
        md = build_sampling_metadata(
            params, [[]] * batch, [[]] * batch, gen, vocab, torch.device("cpu"), None, None
        )
        drafts = [mine if r == row else theirs for r in range(batch)]
        rows = torch.cat([logits[: len(d) + 1] for d in drafts])
        results = []
        for _ in range(20):  # the generator moves on: 20 different draws
            a, f = rejection_sample(rows, drafts, md, ops)
            results.append((int(a[row]), int(f[row])))
        return results

    alone = run(1, 0)
    assert run(5, 3) == alone
    assert len(set(alone)) > 1


# ---- the engine --------------------------------------------------------------------------------
CODE = """def mean(values):
    total = 0
    for value in values:
        total = total + value
    return total / len(values)
"""
COPY_PROMPTS = [
    f"Repeat this code exactly:\n{CODE}\nHere it is again:\n",
    "one two three four five six seven eight. one two three four five six seven eight. one two",
    f"{CODE}\n# the same function, renamed:\n",
]


# a draft model: the embedded file on its native kernels (8-bit activations) drafting for the
# same file dequantized to float32: mostly right, sometimes not
DRAFT = {"model": str(default_model_path()), "num_speculative_tokens": 4, "quantization": "auto"}


@pytest.fixture(scope="module", params=["ngram", "draft model"])
def spec(request):
    return SPEC if request.param == "ngram" else DRAFT


@pytest.fixture(scope="module")
def spec_llm(spec):
    return LLM(dtype="float32", max_model_len=2048, quantization="none", speculative_config=spec)


_GREEDY = {"temperature": 0, "max_tokens": 24, "ignore_eos": True}


def _check_same_as_plain(ref, got, label: str) -> None:
    """`got` (speculative) gives `ref`'s greedy tokens, except after a step where the plain
    run's top-2 logprobs were within 1e-4 (a float32 tie that a different batch shape may
    break the other way)."""
    a, b = ref.outputs[0], got.outputs[0]
    for t, (x, y) in enumerate(zip(a.token_ids, b.token_ids)):
        if x != y:
            top = sorted((v.logprob for v in a.logprobs[t].values()), reverse=True)
            assert top[0] - top[1] < 1e-4, (
                f"{label}: diverged at token {t} ({x} vs {y}), gap {top[0] - top[1]}"
            )
            return
    assert a.token_ids == b.token_ids, label
    assert a.text == b.text and a.finish_reason == b.finish_reason, label


def _spec_counts(llm: LLM) -> tuple[int, int, int]:
    s = llm.engine.stats()
    return s.spec_drafts, s.spec_draft_tokens, s.spec_accepted_tokens


def test_greedy_output_is_plain_greedy_output(llm_f32, spec_llm):
    """A batch of copy-heavy and ordinary prompts: the same tokens as plain decoding (the
    reference runs with logprobs, which also keeps it off the speculative path), with drafts
    both accepted and rejected along the way."""
    prompts = COPY_PROMPTS + _prompts(5)
    ref_params = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True, logprobs=2)
    refs = llm_f32.generate(prompts, ref_params)
    before = _spec_counts(spec_llm)
    outs = spec_llm.generate(prompts, SamplingParams(temperature=0, max_tokens=48, ignore_eos=True))
    drafts, draft_tokens, accepted = (x - y for x, y in zip(_spec_counts(spec_llm), before))
    assert drafts > 0 and 0 < accepted < draft_tokens, (drafts, draft_tokens, accepted)
    for i, (ref, got) in enumerate(zip(refs, outs)):
        _check_same_as_plain(ref, got, f"prompt {i}")
        assert len(got.outputs[0].token_ids) == 48


def test_limits_and_stops_hold_inside_accepted_drafts(llm_f32, spec_llm, spec):
    """max_tokens, the context length, stop strings and stop tokens cut a run of accepted
    drafts exactly where plain decoding stops."""
    prompt = COPY_PROMPTS[1]
    greedy = {"temperature": 0, "max_tokens": 40, "ignore_eos": True}
    ref = llm_f32.generate(prompt, SamplingParams(**greedy))[0]
    text, ids = ref.outputs[0].text, ref.outputs[0].token_ids
    cases = {
        "max_tokens": SamplingParams(**{**greedy, "max_tokens": 13}),
        "stop string": SamplingParams(**greedy, stop=[text[24:30]]),
        "stop token": SamplingParams(**greedy, stop_token_ids=[ids[21]]),
    }
    for label, params in cases.items():
        plain = llm_f32.generate(prompt, params)[0].outputs[0]
        got = spec_llm.generate(prompt, params)[0].outputs[0]
        assert (got.token_ids, got.text, got.finish_reason) == (
            plain.token_ids,
            plain.text,
            plain.finish_reason,
        ), label
    assert len(llm_f32.generate(prompt, cases["max_tokens"])[0].outputs[0].token_ids) == 13

    short = LLM(dtype="float32", quantization="none", max_model_len=40, speculative_config=spec)
    n_prompt = len(short.engine.tokenizer.encode(prompt))
    out = short.generate(prompt, SamplingParams(temperature=0, max_tokens=100, ignore_eos=True))
    got = out[0].outputs[0]
    assert got.finish_reason == "length" and n_prompt + len(got.token_ids) == 40
    assert got.token_ids == ids[: 40 - n_prompt]
    assert _spec_counts(short)[2] > 0


@pytest.mark.slow
def test_preemption_chunks_and_prefix_cache_keep_the_output(llm_f32, spec):
    """Tiny KV (requests preempted and recomputed, rejected drafts' slots reused), 32-token
    chunks, and a prefix-cache hit: still plain greedy output, and every block comes back."""
    prompts = COPY_PROMPTS + _prompts(9)
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    ref_params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True, logprobs=2)
    refs = llm_f32.generate(prompts, ref_params)
    llm = LLM(
        dtype="float32",
        quantization="none",
        max_model_len=256,
        # 160 slots for 12 requests of 34-80 tokens (and 4 drafts' lookahead): preemptions
        # whatever share of the drafts the target accepts (18 blocks had none on one CPU)
        num_kv_blocks=10,
        max_num_batched_tokens=32,
        speculative_config=spec,
    )
    outs = llm.generate(prompts, params)
    assert llm.engine.scheduler.num_preemptions_total > 0
    assert _spec_counts(llm)[2] > 0
    for i, (ref, got) in enumerate(zip(refs, outs)):
        _check_same_as_plain(ref, got, f"prompt {i}")
    # the last prompt's blocks were freed last: the least recently used go first
    again = llm.generate(prompts[-1], params)[0]
    assert again.num_cached_tokens > 0
    assert again.outputs[0].token_ids == outs[-1].outputs[0].token_ids
    kv = llm.engine.scheduler.kv
    assert kv.num_free_blocks == kv.block_pool.num_blocks


def test_a_draft_with_a_smaller_vocabulary_takes_every_token(llm_f32, tmp_path):
    """A draft model whose table ends below the ids the target produces (a random Llama of
    8,192 entries drafting for the 49,152 of the default model): the tokens past its table
    reach it as id 0, so nothing fails; its guesses (below 8,192) are checked as any are, and
    the output is plain greedy output."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=8192,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    spec = {"model": str(tmp_path), "num_speculative_tokens": 3}
    llm = LLM(dtype="float32", quantization="none", max_model_len=256, speculative_config=spec)
    prompts = COPY_PROMPTS[:2]
    assert max(t for p in prompts for t in llm.engine.tokenizer.encode(p)) >= 8192
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    refs = llm_f32.generate(prompts, SamplingParams(**{**_GREEDY, "logprobs": 2}))
    for i, (ref, got) in enumerate(zip(refs, llm.generate(prompts, params))):
        _check_same_as_plain(ref, got, f"prompt {i}")
    assert _spec_counts(llm)[1] > 0  # its guesses were checked


def test_mixed_batch_with_requests_that_get_no_drafts(llm_f32, spec_llm):
    """Drafted greedy and seeded random requests share steps with requests that get no drafts
    (penalties, logprobs, min_tokens): those give what they give without speculation, seeds
    reproduce, and drafted greedy requests stay plain greedy."""
    prompt = COPY_PROMPTS[0]
    undrafted = [
        SamplingParams(temperature=0.8, seed=5, max_tokens=24, repetition_penalty=1.3),
        SamplingParams(temperature=0, max_tokens=24, logprobs=2),
        SamplingParams(temperature=0.9, seed=6, max_tokens=24, min_tokens=24, ignore_eos=True),
    ]
    greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    seeded = SamplingParams(temperature=0.7, seed=11, max_tokens=24, ignore_eos=True)
    before = _spec_counts(spec_llm)
    outs = spec_llm.generate([prompt] * 5, [*undrafted, greedy, seeded])
    assert _spec_counts(spec_llm)[0] > before[0]
    for params, got in zip(undrafted, outs):
        plain = llm_f32.generate(prompt, params)[0].outputs[0]
        assert got.outputs[0].token_ids == plain.token_ids, params
    ref = llm_f32.generate(prompt, SamplingParams(temperature=0, max_tokens=24, logprobs=2))[0]
    _check_same_as_plain(ref, outs[3], "greedy beside undrafted requests")
    alone = spec_llm.generate(prompt, seeded)[0].outputs[0].token_ids
    assert outs[4].outputs[0].token_ids == alone


# ---- a draft model -----------------------------------------------------------------------------
def test_a_draft_that_is_the_target_gets_its_guesses_accepted(llm_f32):
    """The target drafting for itself (the same float32 weights): every guess is the target's
    own greedy token, unless the draft's cache held wrong keys and values at some position (a
    guess kept after the target rejected it, a position shifted, a preempted request's old
    blocks). With 48-token chunks, a cache small enough to preempt, and a prefix-cache hit; the
    output is plain greedy."""
    prompts = COPY_PROMPTS + _prompts(5)
    ref_params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True, logprobs=2)
    refs = llm_f32.generate(prompts, ref_params)
    llm = LLM(
        dtype="float32",
        quantization="none",
        max_model_len=256,
        num_kv_blocks=24,
        max_num_batched_tokens=48,
        speculative_config={"model": str(default_model_path()), "num_speculative_tokens": 3},
    )
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    outs = llm.generate(prompts, params)
    assert llm.engine.scheduler.num_preemptions_total > 0
    for i, (ref, got) in enumerate(zip(refs, outs)):
        _check_same_as_plain(ref, got, f"prompt {i}")
    again = llm.generate(prompts[-1], params)[0]  # freed last, so still cached
    assert again.num_cached_tokens > 0
    assert again.outputs[0].token_ids == outs[-1].outputs[0].token_ids
    _, draft_tokens, accepted = _spec_counts(llm)
    assert draft_tokens > 100 and accepted >= 0.97 * draft_tokens, (draft_tokens, accepted)
    assert not llm.engine.drafter.computed  # every request's state went with it


def _slots(cache: torch.Tensor, block_size: int) -> torch.Tensor:
    """A layer's K or V cache as [slot, head, dim], whichever layout its backend keeps."""
    if cache.dim() == 4:  # [block, head, token in block, dim]
        return cache.permute(0, 2, 1, 3).reshape(-1, cache.shape[1], cache.shape[3])
    return cache


def test_the_draft_cache_holds_the_targets_keys_and_values():
    """The target drafting for itself, checked after every step: at every position the
    target computed for a running request, the draft's cache holds what the target's does
    (the same weights and tokens: float32 rounding apart). 40-token chunks and a cache small
    enough to preempt; seeded sampling beside greedy."""
    llm = LLM(
        dtype="float32",
        quantization="none",
        max_model_len=256,
        num_kv_blocks=16,
        max_num_batched_tokens=40,
        enable_prefix_caching=False,
        speculative_config={"model": str(default_model_path()), "num_speculative_tokens": 3},
    )
    engine = llm.engine
    # a block holds both models' keys and values: 2 x (30 layers x k, v x 3 heads x 64 x 4 B)
    assert engine.config.cache.bytes_per_token == 2 * 30 * 2 * 3 * 64 * 4
    bs = engine.config.cache.block_size
    target = engine.runner.kv_pool.caches
    draft = engine.drafter.kv_pool.caches
    for i, prompt in enumerate(COPY_PROMPTS + _prompts(4)):
        params = SamplingParams(temperature=0.8 * (i % 2), seed=i, max_tokens=24, ignore_eos=True)
        engine.add_request(None, prompt, params)
    checked = 0
    while engine.has_unfinished_requests():
        engine.step()
        for req in engine.scheduler.running:
            blocks = engine.scheduler.kv.get_block_ids(req.request_id)
            pos = np.arange(req.num_computed_tokens)
            slots = torch.from_numpy(np.asarray(blocks)[pos // bs] * bs + pos % bs)
            for (tk, tv), (dk, dv) in zip(target, draft):
                for t, d in ((tk, dk), (tv, dv)):
                    got, want = _slots(d, bs)[slots], _slots(t, bs)[slots]
                    torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)
            checked += len(pos)
    assert engine.scheduler.num_preemptions_total > 0
    assert checked > 2000
    _, draft_tokens, accepted = _spec_counts(llm)
    assert 0 < accepted <= draft_tokens


def test_lookahead_slots_never_cache_a_block_early():
    """A draft model's lookahead slots (past a prefill chunk) get blocks, but only the blocks
    the chunk fills are cached: a block of prompt tokens not computed yet must not be found by
    another request."""
    kv = KVCacheManager(num_blocks=10, block_size=4, enable_prefix_caching=True)
    req = Request("a", list(range(10)), SamplingParams(max_tokens=4), set(), 4)
    blocks = kv.allocate_slots(req, 4, (), 6)
    assert len(blocks) == 3
    assert [b.block_hash is not None for b in blocks] == [True, False, False]


# ---- options and the server --------------------------------------------------------------------
@pytest.mark.parametrize(
    "value, message",
    [
        ("{", "not valid JSON"),
        ("[1]", "JSON object"),
        ({"method": "eagle", "num_speculative_tokens": 2}, "method must be one of"),
        ({"method": "ngram"}, "num_speculative_tokens is required"),
        ({"num_speculative_tokens": 0}, "num_speculative_tokens must be an integer >= 1"),
        ({"num_speculative_tokens": 2, "draft_model": "x"}, "unsupported key(s) draft_model"),
        ({"method": "ngram", "num_speculative_tokens": 2, "model": "x"}, "needs method"),
        ({"method": "draft_model", "num_speculative_tokens": 2}, "needs a model"),
        ({"num_speculative_tokens": 2, "model": ""}, "model must be a path"),
        ({"num_speculative_tokens": 2, "model": "x", "prompt_lookup_max": 3}, "for method ngram"),
        ({"num_speculative_tokens": 2, "model": "x", "quantization": "q3"}, "quantization is a"),
        ({"num_speculative_tokens": 2, "quantization": "none"}, "quantization is a"),
        ({"num_speculative_tokens": 2, "prompt_lookup_min": 4, "prompt_lookup_max": 2}, "> prompt"),
        ({"num_speculative_tokens": True}, "must be an integer"),
    ],
)
def test_bad_speculative_configs_are_named(value, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        EngineArgs(speculative_config=value)


def test_info_counts_the_drafts_cache():
    """`tokenmill info` with a draft model: the KV per token is both models' (hand-computed),
    and the draft is named."""
    args = {"dtype": "float32", "kv_cache_memory_gib": 1}
    spec = {"model": str(default_model_path()), "num_speculative_tokens": 3}
    shown = describe_model(EngineArgs(**args, speculative_config=spec))
    assert shown["KV cache per token"] == f"{2 * 46080 / 1024:.1f} KiB in float32"
    assert shown["KV capacity"].startswith("11648 tokens")  # 1 GiB / (90 KiB x 16): 728 blocks
    assert shown["speculative decoding"].startswith("draft_model, 3 drafts per decode from ")
    assert describe_model(EngineArgs(**args))["speculative decoding"] == "off"


def test_draft_model_options_are_checked():
    with pytest.raises(ValueError, match="one rank"):
        EngineArgs(
            speculative_config={"model": "x", "num_speculative_tokens": 2}, tensor_parallel_size=2
        )
    with pytest.raises(ValueError, match="nonexistent-draft.gguf"):
        LLM(
            dtype="float32",
            speculative_config={"model": "/nonexistent-draft.gguf", "num_speculative_tokens": 2},
        )


def test_speculative_config_defaults_like_vllm():
    assert SpeculativeConfig.parse('{"num_speculative_tokens": 3}') == SpeculativeConfig(
        "ngram", 3, 5, 5
    )
    assert SpeculativeConfig.parse({"num_speculative_tokens": 3, "prompt_lookup_max": 4}) == (
        SpeculativeConfig("ngram", 3, 4, 4)
    )
    # a model given: the draft_model method
    assert SpeculativeConfig.parse({"num_speculative_tokens": 3, "model": "d.gguf"}) == (
        SpeculativeConfig("draft_model", 3, model="d.gguf")
    )


def test_server_speculates_and_counts():
    """`tokenmill serve --speculative-config ...`: a streamed completion of a copy prompt, and
    /metrics counts drafts and accepted drafts."""
    server = ServerProcess("--speculative-config", json.dumps(SPEC))
    try:
        body = {
            "model": "SmolLM2-135M-Instruct",
            "prompt": COPY_PROMPTS[1],
            "max_tokens": 24,
            "temperature": 0,
            "stream": True,
        }
        text = ""
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    text += json.loads(line[6:])["choices"][0]["text"]
        assert text
        accepted = server.metric("tokenmill_spec_decode_num_accepted_tokens")
        assert accepted > 0
        assert server.metric("tokenmill_spec_decode_num_draft_tokens") >= accepted
        assert server.metric("tokenmill_spec_decode_num_drafts") > 0
    finally:
        server.stop()


def test_native_kernels_give_plain_greedy_output():
    """The default model on its native quantized kernels (float32 activations): drafted decodes
    run as single-query rows through the C++ layer loop, and still give plain greedy tokens."""
    native = LLM(dtype="float32", max_model_len=1024)
    assert native.engine.model.decode_stack is not None
    prompts = COPY_PROMPTS + _prompts(3)
    # alone, like the speculative runs: a batched prefill of several prompts takes other
    # kernels (bfloat16 tiles for 64+ rows), whose rounding moves logprobs by ~0.1
    ref_params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, logprobs=2)
    refs = [native.generate(p, ref_params)[0] for p in prompts]
    del native
    spec = LLM(dtype="float32", max_model_len=1024, speculative_config=SPEC)
    for i, prompt in enumerate(prompts):  # alone: batch 1, the case speculation is for
        got = spec.generate(prompt, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
        _check_same_as_plain(refs[i], got[0], f"prompt {i}")
    assert _spec_counts(spec)[2] > 0
