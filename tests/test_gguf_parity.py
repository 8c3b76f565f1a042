"""The embedded SmolLM2 GGUF: logits and greedy continuations equal transformers' (gguf_file=)."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import prompt_logits
from tokenmill import SamplingParams

PLAIN_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "The three primary colors are",
    "import numpy as np\n\nx = np.",
    "Water boils at a temperature of",
]
CHATS = [
    [{"role": "user", "content": "What is 2 + 2?"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name a fruit that is yellow."},
    ],
    [{"role": "user", "content": "Write a haiku about the sea."}],
]


def _hf_greedy(model, ids: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=n,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    return out[0, len(ids) :].tolist()


def test_gguf_logits_match_transformers(llm_f32, hf_gguf_model):
    engine = llm_f32.engine
    tok = engine.tokenizer
    prompts = [tok.encode(p) for p in PLAIN_PROMPTS[:3]]
    got = prompt_logits(engine.model, prompts, num_blocks=64)
    for ids, logits in zip(prompts, got):
        with torch.no_grad():
            ref = hf_gguf_model(torch.tensor([ids])).logits[0].float()
        torch.testing.assert_close(logits, ref, atol=2e-3, rtol=1e-3)
        assert logits.argmax(-1).tolist() == ref.argmax(-1).tolist()


# A float16 KV cache beside float32 compute (--kv-cache-dtype float16, what auto gives a CPU
# without native bfloat16) rounds every cached key and value to 11 significant bits (2^-11
# relative; the CPU kernels keep the query and the output in float32). Over these prompts the
# logits then differ from transformers' float32 by at most 0.045, on the longest (float32 KV:
# 8e-5); a bfloat16 cache, rounding to 8 bits (8x coarser), measured 0.14 on the first prompt
# alone. The tolerance sits between: a cache that kept bfloat16's precision, or lost rows, fails.
F16_KV_ATOL = 0.08


def test_float16_kv_cache_logits_match_transformers(llm_f32, hf_gguf_model):
    """Prefilled whole (the prefill kernel) and half prefilled then decoded token by token
    (the decode kernel), with the rows written in float16."""
    from tests.helpers import paged_logits
    from tokenmill.worker.model_runner import ModelRunner

    engine = llm_f32.engine
    tok = engine.tokenizer
    prompts = [tok.encode(p) for p in PLAIN_PROMPTS[:3]]
    prompts.append(tok.encode(" ".join(PLAIN_PROMPTS)))  # over 3 blocks
    whole = prompt_logits(engine.model, prompts, num_blocks=64, kv_dtype=torch.float16)
    runner = ModelRunner(
        engine.model, num_blocks=64, block_size=16, kv_dtype=torch.float16, device=engine.device
    )
    decoded = paged_logits(
        runner, prompts, [[len(p) // 2] + [1] * (len(p) - len(p) // 2) for p in prompts]
    )
    for ids, a, b in zip(prompts, whole, decoded):
        with torch.no_grad():
            ref = hf_gguf_model(torch.tensor([ids])).logits[0].float()
        for logits in (a, b):
            torch.testing.assert_close(logits, ref, atol=F16_KV_ATOL, rtol=0)
            assert logits.argmax(-1).tolist() == ref.argmax(-1).tolist()


@pytest.mark.slow
def test_greedy_continuations_identical(llm_f32, hf_gguf_model):
    prompts = [llm_f32.get_tokenizer().encode(p) for p in PLAIN_PROMPTS]
    prompts += [llm_f32.encode_chat(c)[1] for c in CHATS]
    assert len(prompts) >= 8
    params = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
    outs = llm_f32.generate(prompts, params)
    for ids, out in zip(prompts, outs):
        expected = _hf_greedy(hf_gguf_model, ids, 64)
        assert out.outputs[0].token_ids == expected, llm_f32.get_tokenizer().decode(ids)
