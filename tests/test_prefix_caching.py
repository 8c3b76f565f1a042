"""Automatic prefix caching end to end: identical outputs with the cache on and off, and the
n samples of one request sharing their prompt's blocks."""

from __future__ import annotations

import pytest

from tokenmill import LLM
from tokenmill.sampling_params import SamplingParams

SYSTEM = (
    "You are a careful assistant for a library. Answer questions about opening hours, loans, "
    "renewals, fines, rooms and events. Keep every answer short and polite. "
) * 30


@pytest.mark.slow
def test_shared_system_prompt_same_outputs_with_cache_on_and_off(llm_f32):
    tok = llm_f32.get_tokenizer()
    convs = [
        [{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"Question {i}?"}]
        for i in range(8)
    ]
    prompts = [llm_f32.encode_chat(c)[1] for c in convs]
    assert min(len(p) for p in prompts) >= 1000
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    off = LLM(dtype="float32", quantization="none", max_model_len=2048, enable_prefix_caching=False)
    without = off.generate(prompts, greedy)
    del off
    kv = llm_f32.engine.scheduler.kv
    hits_before = kv.num_prefix_hit_tokens
    with_cache = llm_f32.generate(prompts, greedy)
    assert kv.num_prefix_hit_tokens - hits_before >= 7 * 960  # all but the first reuse it
    for a, b in zip(with_cache, without):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids, tok.decode(a.prompt_token_ids)


def test_n_samples_use_the_prompt_blocks_once(llm_f32):
    engine = llm_f32.engine
    kv = engine.scheduler.kv
    bs = kv.block_size
    prompt = list(range(200, 200 + 10 * bs + 5))  # 10 full blocks and a partial one
    engine.add_request("n4", prompt, SamplingParams(n=4, max_tokens=4, temperature=1.0, seed=0))
    engine.step()  # every sample's prompt is computed in this first step
    tables = [kv.req_to_blocks[f"n4#{i}"] for i in range(4)]
    full = [t[:10] for t in tables]
    assert all(f == full[0] for f in full)  # the same ten blocks
    assert all(b.ref_cnt == 4 for b in full[0])
    partial = {t[10].block_id for t in tables}
    assert len(partial) == 4  # each sample writes its own last block
    while engine.has_unfinished_requests():
        engine.step()
    assert kv.num_free_blocks == kv.block_pool.num_blocks
