"""End-to-end engine behaviour on the embedded model: batching invariance, sampling, errors."""

from __future__ import annotations

import math
import pickle

import pytest

from tokenmill import LLM, SamplingParams
from tokenmill.errors import ModelLoadError

WORDS = (
    "river stone light ancient quickly mountain code python seven blue market winter "
    "garden the of and a to in is was it"
).split()


def _prompts(n: int) -> list[str]:
    out = []
    for i in range(n):
        k = 2 + (i * 7) % 37  # mixed lengths, 2..38 words
        out.append(" ".join(WORDS[(i + j * 3) % len(WORDS)] for j in range(k)))
    return out


GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=2)


def _assert_same_or_tie(ref, got, label: str) -> None:
    """Identical greedy tokens, except after a step whose top-2 logits were within 1e-4."""
    a, b = ref.outputs[0], got.outputs[0]
    for t, (x, y) in enumerate(zip(a.token_ids, b.token_ids)):
        if x != y:
            gaps = []
            for lp in (a.logprobs[t], b.logprobs[t]):
                top = sorted((v.logprob for v in lp.values()), reverse=True)
                gaps.append(top[0] - top[1])
            assert min(gaps) < 1e-4, f"{label}: diverged at step {t} with top-2 gaps {gaps}"
            return
    assert len(a.token_ids) == len(b.token_ids)


@pytest.fixture(scope="module")
def alone_outputs(llm_f32):
    return [llm_f32.generate(p, GREEDY)[0] for p in _prompts(32)]


def test_batch_of_32_matches_alone(llm_f32, alone_outputs):
    outs = llm_f32.generate(_prompts(32), GREEDY)
    for i, (ref, got) in enumerate(zip(alone_outputs, outs)):
        _assert_same_or_tie(ref, got, f"prompt {i} in batch")


@pytest.mark.slow
def test_tiny_chunks_and_forced_preemption_match_alone(alone_outputs):
    llm = LLM(
        dtype="float32",
        max_model_len=256,
        max_num_batched_tokens=5,
        kv_cache_memory_gib=0.05,
        quantization="none",
    )
    outs = llm.generate(_prompts(32), GREEDY)
    for i, (ref, got) in enumerate(zip(alone_outputs, outs)):
        _assert_same_or_tie(ref, got, f"prompt {i} with 5-token chunks")
    engine = llm.engine
    assert engine.scheduler.kv.num_free_blocks == engine.scheduler.kv.block_pool.num_blocks
    del llm

    # 20 blocks of 16 tokens for 32 requests of up to ~60 tokens: preemption must happen.
    llm = LLM(dtype="float32", max_model_len=256, num_kv_blocks=20, quantization="none")
    outs = llm.generate(_prompts(32), GREEDY)
    assert llm.engine.scheduler.num_preemptions_total > 0
    for i, (ref, got) in enumerate(zip(alone_outputs, outs)):
        _assert_same_or_tie(ref, got, f"prompt {i} under preemption")
    kv = llm.engine.scheduler.kv
    assert kv.num_free_blocks == kv.block_pool.num_blocks


def test_huge_and_negative_seeds_work(llm_f32):
    for seed in (-5, 2**70):
        p = SamplingParams(temperature=1.0, seed=seed, max_tokens=4, ignore_eos=True)
        a = llm_f32.generate("Hi", p)[0].outputs[0].token_ids
        assert a == llm_f32.generate("Hi", p)[0].outputs[0].token_ids and len(a) == 4


def test_seeded_sampling_reproducible_alone_and_in_batch(llm_f32):
    p = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=12, ignore_eos=True)
    alone = llm_f32.generate("Tell me about cats", p)[0].outputs[0].token_ids
    again = llm_f32.generate("Tell me about cats", p)[0].outputs[0].token_ids
    others = [SamplingParams(temperature=0.7, max_tokens=20, ignore_eos=True)] * 5
    batch = llm_f32.generate(_prompts(5) + ["Tell me about cats"], others + [p])
    assert alone == again == batch[-1].outputs[0].token_ids
    other_seed = SamplingParams(temperature=1.0, top_p=0.9, seed=99, max_tokens=12, ignore_eos=True)
    assert llm_f32.generate("Tell me about cats", other_seed)[0].outputs[0].token_ids != alone


def test_n_samples_logprobs_and_finish_reasons(llm_f32):
    p = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=8, ignore_eos=True, logprobs=3)
    out = llm_f32.generate("The weather today", p)[0]
    assert [o.index for o in out.outputs] == [0, 1, 2]
    assert len({tuple(o.token_ids) for o in out.outputs}) > 1
    for o in out.outputs:
        assert o.finish_reason == "length" and len(o.token_ids) == 8
        assert len(o.logprobs) == 8
        for tok, lp in zip(o.token_ids, o.logprobs):
            assert tok in lp and len(lp) <= 4 and lp[tok].logprob <= 0
            top = [v for v in lp.values() if v.rank == 1]
            assert top and top[0].logprob >= lp[tok].logprob
        assert math.isclose(
            o.cumulative_logprob,
            sum(lp[t].logprob for t, lp in zip(o.token_ids, o.logprobs)),
            rel_tol=1e-5,
        )


def test_stop_string_not_emitted_and_text_matches_tokens(llm_f32):
    base = llm_f32.generate("def add(a, b):", SamplingParams(temperature=0, max_tokens=24))[0]
    full = base.outputs[0].text
    stop = full[5:8]
    assert stop and stop in full
    out = llm_f32.generate(
        "def add(a, b):", SamplingParams(temperature=0, max_tokens=24, stop=[stop])
    )[0].outputs[0]
    assert out.text == full[: full.index(stop)]
    assert out.finish_reason == "stop" and out.stop_reason == stop


def test_min_tokens_and_stop_token_ids(llm_f32):
    tok = llm_f32.get_tokenizer()
    chat = [{"role": "user", "content": "Say hi."}]
    out = llm_f32.chat(chat, SamplingParams(temperature=0, max_tokens=64))[0].outputs[0]
    assert out.finish_reason == "stop" and out.token_ids[-1] in tok.eos_token_ids
    n = len(out.token_ids)
    longer = llm_f32.chat(chat, SamplingParams(temperature=0, max_tokens=64, min_tokens=n + 3))[
        0
    ].outputs[0]
    assert len(longer.token_ids) >= n + 3
    assert not set(longer.token_ids[: n + 2]) & tok.eos_token_ids
    first = out.token_ids[0]
    stopped = llm_f32.chat(
        chat, SamplingParams(temperature=0, max_tokens=64, stop_token_ids=[first])
    )[0].outputs[0]
    assert stopped.token_ids == [first] and stopped.stop_reason == first


def test_logit_bias_bans_and_forces_tokens_in_a_mixed_batch(llm_f32):
    prompt = "The weather today"
    plain = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, logprobs=3)
    base = llm_f32.generate(prompt, plain)[0].outputs[0]
    ranked = sorted(base.logprobs[0].values(), key=lambda v: v.rank)
    first, second, third = ranked[0], ranked[1], ranked[2]
    assert first.logprob - second.logprob > 1e-3 and second.logprob - third.logprob > 1e-3
    first_id, second_id = (
        next(t for t, v in base.logprobs[0].items() if v is x) for x in (first, second)
    )
    forced_id = llm_f32.get_tokenizer().encode(" blue", add_special_tokens=False)[0]
    ban = SamplingParams(
        temperature=0, max_tokens=4, ignore_eos=True, logprobs=3, logit_bias={first_id: -100}
    )
    force = SamplingParams(
        temperature=0, max_tokens=4, ignore_eos=True, logit_bias={forced_id: 100}
    )
    outs = llm_f32.generate([prompt] * 3, [plain, ban, force])
    assert outs[0].outputs[0].token_ids == base.token_ids  # the unbiased row is untouched
    banned = outs[1].outputs[0]
    assert banned.token_ids[0] == second_id
    # the reported logprobs are the model's, not the biased ones
    assert math.isclose(banned.logprobs[0][first_id].logprob, first.logprob, rel_tol=1e-5)
    assert outs[2].outputs[0].token_ids == [forced_id] * 4
    # alone, a greedy request without logprobs: the runner's bare-argmax path must not skip it
    assert llm_f32.generate(prompt, force)[0].outputs[0].token_ids == [forced_id] * 4
    with pytest.raises(ValueError, match="logit_bias token ids out of range"):
        llm_f32.generate(prompt, SamplingParams(logit_bias={10**7: 1.0}))
    # allowed_token_ids, greedy without logprobs (the bare-argmax path must not skip it): the
    # runner-up is the only allowed token the model ranks above the rest
    only = SamplingParams(temperature=0, max_tokens=1, allowed_token_ids=[second_id, forced_id])
    assert llm_f32.generate(prompt, only)[0].outputs[0].token_ids == [second_id]
    with pytest.raises(ValueError, match="allowed_token_ids out of range"):
        llm_f32.generate(prompt, SamplingParams(allowed_token_ids=[10**7]))


def test_bad_words_never_appear_in_the_output(llm_f32):
    tok = llm_f32.get_tokenizer()
    prompt = "List some colors: red, green,"
    plain = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    base = llm_f32.generate(prompt, plain)[0].outputs[0]
    words = [w.strip(",.") for w in base.text.split() if w.strip(",.").isalpha()][:2]
    assert words, base.text

    def spelled(ids: list[int], word: str) -> bool:
        seqs = [tok.encode(t, add_special_tokens=False) for t in (word, " " + word)]
        return any(ids[i : i + len(q)] == q for q in seqs for i in range(len(ids)))

    assert any(spelled(base.token_ids, w) for w in words)  # the unbanned output has them
    banned = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, bad_words=words)
    outs = llm_f32.generate([prompt, prompt], [banned, plain])  # in one batch
    assert outs[1].outputs[0].token_ids == base.token_ids
    assert not any(spelled(outs[0].outputs[0].token_ids, w) for w in words), outs[0].outputs[0].text


def test_vllm_dict_prompts(llm_f32):
    p = SamplingParams(temperature=0, max_tokens=4)
    ids = llm_f32.get_tokenizer().encode("The weather today")
    want = llm_f32.generate(ids, p)[0].outputs[0].token_ids
    outs = llm_f32.generate([{"prompt_token_ids": ids}, {"prompt": "The weather today"}], p)
    assert [o.outputs[0].token_ids for o in outs] == [want, want]
    assert llm_f32.generate({"prompt_token_ids": ids}, p)[0].outputs[0].token_ids == want
    assert list(llm_f32.stream({"prompt_token_ids": ids}, p))[-1].outputs[0].token_ids == want
    with pytest.raises(ValueError, match="exactly one key"):
        llm_f32.generate({"prompt": "x", "multi_modal_data": {}}, p)


def test_streaming_deltas_add_up_and_closing_aborts(llm_f32):
    p = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    final = llm_f32.generate("List some colors:", p)[0].outputs[0]
    text, ids = "", []
    for out in llm_f32.stream("List some colors:", p):
        text += out.outputs[0].delta_text
        ids += out.outputs[0].delta_token_ids
    assert text == final.text and ids == final.token_ids
    stream = llm_f32.stream("List some colors:", p)
    next(stream)
    stream.close()
    kv = llm_f32.engine.scheduler.kv
    assert not llm_f32.engine.has_unfinished_requests()
    assert kv.num_free_blocks == kv.block_pool.num_blocks


def test_final_only_requests_report_once_with_the_streamed_result(llm_f32):
    """`final_only` (what LLM.generate asks for): no output until the request finishes, then
    the text, ids and finish reasons a streaming request of the same params produced, in the
    same batch; with and without stop strings (deferred vs incremental decoding), n = 2."""
    engine = llm_f32.engine
    cases = [
        SamplingParams(temperature=0, max_tokens=24, ignore_eos=True),
        SamplingParams(temperature=0.8, seed=5, n=2, max_tokens=24, stop=[" the", "\n"]),
    ]
    for p in cases:
        streamed = engine.add_request(None, "Tell me about rivers.", p)
        final = engine.add_request(None, "Tell me about rivers.", p, final_only=True)
        seen: dict[str, list] = {streamed: [], final: []}
        while engine.has_unfinished_requests():
            for out in engine.step():
                seen[out.request_id].append(out)
        assert len(seen[final]) == 1 and seen[final][0].finished
        assert len(seen[streamed]) > 1
        last, only = seen[streamed][-1], seen[final][0]
        for a, b in zip(last.outputs, only.outputs, strict=True):
            assert (a.text, a.token_ids, a.finish_reason, a.stop_reason) == (
                b.text,
                b.token_ids,
                b.finish_reason,
                b.stop_reason,
            )
            assert a.text and a.token_ids


@pytest.mark.parametrize(
    "bad",
    [
        dict(prompt=""),
        dict(prompt=[]),
        dict(prompt="word " * 3000),
        dict(prompt=[10**7]),
        dict(prompt="hi", stop_token_ids=[10**9], min_tokens=2),
        dict(prompt="hi", logprobs=10**7),
        dict(prompt="hi", n=10**6),
    ],
)
def test_bad_prompts_rejected_others_keep_running(llm_f32, bad):
    engine = llm_f32.engine
    good = engine.add_request(None, "Hello there", SamplingParams(max_tokens=6, ignore_eos=True))
    kw = {k: v for k, v in bad.items() if k != "prompt"}
    with pytest.raises(ValueError) as e:
        engine.add_request(None, bad["prompt"], SamplingParams(max_tokens=4, **kw))
    assert str(e.value)
    done = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done = out
    assert done.request_id == good and len(done.outputs[0].token_ids) == 6
    kv = engine.scheduler.kv
    assert kv.num_free_blocks == kv.block_pool.num_blocks


def test_prompt_over_context_error_says_numbers(llm_f32):
    with pytest.raises(ValueError, match=r"prompt has \d+ tokens.*2048"):
        llm_f32.generate("word " * 3000)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(max_tokens=0),
        dict(max_tokens=-3),
        dict(top_p=0.0),
        dict(top_p=1.5),
        dict(temperature=-0.1),
        dict(n=0),
        dict(min_p=2.0),
        dict(top_k=-5),
    ],
)
def test_bad_sampling_params(kwargs):
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)


def test_bad_model_paths(tmp_path, default_gguf):
    with pytest.raises(ModelLoadError, match="does not exist"):
        LLM(str(tmp_path / "nope.gguf"))
    text = tmp_path / "notes.txt"
    text.write_text("hello, I am not a model")
    with pytest.raises(ModelLoadError, match="not a model file"):
        LLM(str(text))
    pkl = tmp_path / "pytorch_model.bin"
    pkl.write_bytes(pickle.dumps({"weight": [1, 2, 3]}))
    with pytest.raises(ModelLoadError, match="never unpickles"):
        LLM(str(pkl))
    (tmp_path / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    with pytest.raises(ModelLoadError, match="pickle"):
        LLM(str(tmp_path))
    truncated = tmp_path / "cut.gguf"
    with open(default_gguf, "rb") as f:
        truncated.write_bytes(f.read(1 << 20))
    with pytest.raises(ModelLoadError, match="GGUF"):
        LLM(str(truncated))
    garbage = tmp_path / "junk.gguf"
    garbage.write_bytes(b"GGUF" + bytes(range(256)) * 4)
    with pytest.raises(ModelLoadError):
        LLM(str(garbage))


def test_bad_safetensors_and_unknown_arch(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text('{"architectures": ["FancyNetForCausalLM"]}')
    (folder / "model.safetensors").write_bytes((10**12).to_bytes(8, "little") + b"{}")
    with pytest.raises(ModelLoadError, match="FancyNet.*supported.*LlamaForCausalLM"):
        LLM(str(folder))


def test_unknown_engine_option():
    with pytest.raises(TypeError, match="unknown engine option"):
        LLM(not_an_option=1)


def test_prefix_caching_reuses_blocks_and_keeps_outputs(alone_outputs):
    llm = LLM(
        dtype="float32",
        max_model_len=256,
        enable_prefix_caching=True,
        kv_cache_memory_gib=0.5,
        quantization="none",
    )
    prompts = _prompts(32)
    first = llm.generate(prompts, GREEDY)
    second = llm.generate(prompts, GREEDY)  # every full prompt block is now cached
    pool = llm.engine.scheduler.kv.block_pool
    assert pool.num_free_blocks == pool.num_blocks
    assert any(b.block_hash is not None for b in pool.blocks)
    long_prompts = [o for o in second if len(o.prompt_token_ids) > 16]
    assert long_prompts and all(o.num_cached_tokens >= 16 for o in long_prompts)
    for i, (ref, a, b) in enumerate(zip(alone_outputs, first, second)):
        _assert_same_or_tie(ref, a, f"prompt {i} with prefix caching")
        _assert_same_or_tie(ref, b, f"prompt {i} from cached blocks")
