"""Prompt logprobs, completions echo, perplexity: against transformers on a tiny float32 Llama."""

from __future__ import annotations

import json
import math
import string

import httpx
import pytest
import torch

from tests.server_utils import ServerProcess
from tokenmill import LLM, SamplingParams
from tokenmill.engine.perplexity import perplexity, sliding_windows

ATOL = 5e-5
VOCAB = 160
TEXT = (
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs! "
    "How vexingly quick daft zebras jump."
)


def _char_tokenizer():
    """One token per character, every id of the model's vocabulary a distinct character (so
    any generated token decodes to exactly one character)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    chars = ["\x00", *string.printable, *(chr(0x100 + i) for i in range(VOCAB - 101))]
    tok = Tokenizer(models.WordLevel({c: i for i, c in enumerate(chars)}, unk_token="\x00"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return tok


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(folder, transformers model): a random Llama checkpoint with a tokenizer, float32."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=112,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # larger weights than the default init: a peaked distribution
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    _char_tokenizer().save(str(path / "tokenizer.json"))
    return path, model


def _engine(path, **kw) -> LLM:
    return LLM(str(path), **{"dtype": "float32", "num_kv_blocks": 64, "block_size": 4, **kw})


def _reference(model, ids: list[int]) -> torch.Tensor:
    """[len(ids), vocab] log_softmax of transformers' float32 logits at every position."""
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (37, 5, 20, 1)]


def _check_against_reference(model, ids: list[int], plps, k: int) -> None:
    assert len(plps) == len(ids) and plps[0] is None
    ref = _reference(model, ids)
    for p in range(1, len(ids)):
        entry, row, tok = plps[p], ref[p - 1], ids[p]
        assert next(iter(entry)) == tok  # the prompt token comes first
        assert entry[tok].logprob == pytest.approx(row[tok].item(), abs=ATOL)
        assert entry[tok].rank == int((row >= row[tok]).sum())
        top = row.topk(k)
        alts = {t: v for t, v in entry.items() if v.rank is not None and v.rank <= k}
        assert sorted(alts) == sorted(top.indices.tolist())
        for t, v in zip(top.indices.tolist(), top.values.tolist()):
            assert alts[t].logprob == pytest.approx(v, abs=ATOL)
        assert len(entry) in (k, k + 1)


def _flat(plps) -> list[tuple[int, float]]:
    return [(t, v.logprob) for e in plps[1:] for t, v in e.items()]


def test_sampling_params_validation():
    assert SamplingParams(prompt_logprobs=20, max_tokens=0).max_tokens == 0
    for bad in (
        dict(prompt_logprobs=21),
        dict(prompt_logprobs=-1),
        dict(max_tokens=0),
        dict(prompt_logprobs=1.5),
    ):
        with pytest.raises(ValueError):
            SamplingParams(**bad)


def test_prompt_logprobs_match_transformers(tiny):
    path, model = tiny
    llm = _engine(path)
    prompts = _prompts()
    params = [
        SamplingParams(prompt_logprobs=3, max_tokens=2, temperature=0, ignore_eos=True),
        SamplingParams(prompt_logprobs=0, max_tokens=0),
        SamplingParams(max_tokens=3, temperature=0, ignore_eos=True),  # off: no extra
        SamplingParams(prompt_logprobs=5, max_tokens=1, ignore_eos=True),
    ]
    outs = llm.generate(prompts, params)
    _check_against_reference(model, prompts[0], outs[0].prompt_logprobs, 3)
    _check_against_reference(model, prompts[1], outs[1].prompt_logprobs, 0)
    assert outs[2].prompt_logprobs is None
    assert outs[3].prompt_logprobs == [None]  # a one-token prompt: nothing to score
    # max_tokens 0 scores the prompt and generates nothing
    assert outs[1].finished and outs[1].outputs[0].token_ids == []
    assert outs[1].outputs[0].finish_reason == "length"
    # the greedy continuation is unaffected by also computing prompt logprobs
    alone = llm.generate(prompts[0], SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))
    assert outs[0].outputs[0].token_ids == alone[0].outputs[0].token_ids
    # n samples share one prompt_logprobs list, computed once
    n2 = llm.generate(
        prompts[2], SamplingParams(n=2, prompt_logprobs=1, max_tokens=2, ignore_eos=True, seed=3)
    )[0]
    assert len(n2.outputs) == 2
    _check_against_reference(model, prompts[2], n2.prompt_logprobs, 1)
    # a prompt as long as the context can be scored when nothing is generated
    full = (prompts[0] * 8)[: llm.engine.max_model_len]
    out = llm.generate(full, SamplingParams(prompt_logprobs=0, max_tokens=0))[0]
    assert len(out.prompt_logprobs) == len(full)
    with pytest.raises(ValueError, match="context"):
        llm.generate(full, SamplingParams(prompt_logprobs=0, max_tokens=1))


def test_chunked_prefill_and_preemption_give_the_same_logprobs(tiny):
    path, model = tiny
    prompts = _prompts()[:3]
    params = SamplingParams(prompt_logprobs=2, max_tokens=4, temperature=0, ignore_eos=True)
    whole = _engine(path).generate(prompts, params)
    # 5-token chunks: each prompt is scored over several steps, mixed with decodes. Steps of up
    # to 8 rows run the CPU's small-batch kernel, the whole prompts the library's GEMM: two
    # float32 sums in different orders, 1e-5 apart on these logprobs (1.1e-5 seen)
    chunked = _engine(path, max_num_batched_tokens=5).generate(prompts, params)
    for w, c, ids in zip(whole, chunked, prompts):
        assert [list(e) for e in c.prompt_logprobs[1:]] == [list(e) for e in w.prompt_logprobs[1:]]
        for (tw, vw), (tc, vc) in zip(_flat(w.prompt_logprobs), _flat(c.prompt_logprobs)):
            assert tw == tc and vc == pytest.approx(vw, abs=5e-5)
        _check_against_reference(model, ids, c.prompt_logprobs, 2)
    # 10 blocks of 4 tokens: the second request is preempted in the middle of its prompt and
    # recomputed; its prompt logprobs are still reported once each
    a, b = _prompts()[0][:30], _prompts()[2]
    llm = _engine(path, num_kv_blocks=10, max_num_batched_tokens=8)
    outs = llm.generate(
        [a, b],
        [
            SamplingParams(max_tokens=8, ignore_eos=True, temperature=0),
            SamplingParams(prompt_logprobs=2, max_tokens=1),
        ],
    )
    assert llm.engine.scheduler.num_preemptions_total > 0
    _check_against_reference(model, b, outs[1].prompt_logprobs, 2)


def test_prefix_cache_is_not_used_for_prompt_logprobs(tiny):
    path, model = tiny
    llm = _engine(path, enable_prefix_caching=True)
    ids = _prompts()[0]
    plain = SamplingParams(max_tokens=1)
    llm.generate(ids, plain)
    out = llm.generate(ids, SamplingParams(prompt_logprobs=1, max_tokens=1))[0]
    assert out.num_cached_tokens == 0
    _check_against_reference(model, ids, out.prompt_logprobs, 1)
    assert llm.generate(ids, plain)[0].num_cached_tokens > 0  # the cache still serves others


def _hf_perplexity(model, ids: list[int], window: int, stride: int) -> tuple[float, int]:
    """The Hugging Face perplexity guide's loop, on transformers' logits."""
    nll, count, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + window, len(ids))
        trg_len = end - prev_end
        ref = _reference(model, ids[begin:end])
        for j in range(max(1, end - begin - trg_len), end - begin):
            nll -= ref[j - 1, ids[begin + j]].item()
            count += 1
        prev_end = end
        if end == len(ids):
            break
    return math.exp(nll / count), count


def test_perplexity_matches_transformers(tiny, capsys):
    path, model = tiny
    llm = _engine(path, max_num_batched_tokens=16)
    ids = llm.get_tokenizer().encode(TEXT)
    assert len(ids) == len(TEXT)  # one token per character
    res = perplexity(llm, TEXT, context_length=24, stride=10)
    expected, count = _hf_perplexity(model, ids, 24, 10)
    assert res.num_windows == len(sliding_windows(len(ids), 24, 10)) > 5
    assert res.num_scored_tokens == count == len(ids) - 1
    assert res.perplexity == pytest.approx(expected, rel=1e-4)
    assert res.tokens_per_second > 0
    short = perplexity(llm, ids, context_length=24, max_tokens=50)  # stride 12
    assert short.num_scored_tokens == 49 and short.stride == 12
    assert short.perplexity == pytest.approx(_hf_perplexity(model, ids[:50], 24, 12)[0], rel=1e-4)
    with pytest.raises(ValueError, match="stride"):
        perplexity(llm, TEXT, context_length=24, stride=24)

    # the CLI subcommand reports the same numbers
    from tokenmill.cli import main

    text_file = path / "text.txt"
    text_file.write_text(TEXT)
    rc = main(
        [
            "--log-level",
            "WARNING",
            "perplexity",
            str(path),
            str(text_file),
            "--context-length",
            "24",
            "--stride",
            "10",
            "--dtype",
            "float32",
            "--num-kv-blocks",
            "64",
            "--block-size",
            "4",
        ]
    )
    assert rc == 0
    lines = dict(
        line.split(None, 1)
        if not line.startswith("tokens ")
        else ("tokens " + line.split()[1], line.split()[2])
        for line in capsys.readouterr().out.splitlines()
    )
    assert float(lines["perplexity"]) == pytest.approx(expected, rel=1e-3)
    assert int(lines["tokens scored"]) == count


def test_server_echo_with_logprobs(tiny):
    path, model = tiny
    srv = ServerProcess(str(path), "--served-model-name", "tiny", "--num-kv-blocks", "64")
    try:
        prompt = "Hello, world"
        ids = _char_tokenizer().encode(prompt).ids
        assert len(ids) == len(prompt)
        ref = _reference(model, ids)
        body = {
            "model": "tiny",
            "prompt": prompt,
            "echo": True,
            "logprobs": 2,
            "max_tokens": 3,
            "temperature": 0,
            "ignore_eos": True,
        }
        r = httpx.post(srv.url + "/v1/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        lp = choice["logprobs"]
        assert choice["text"].startswith(prompt) and len(choice["text"]) == len(prompt) + 3
        assert lp["tokens"] == list(choice["text"])
        assert lp["text_offset"] == list(range(len(prompt) + 3))
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        for p in range(1, len(ids)):
            assert lp["token_logprobs"][p] == pytest.approx(ref[p - 1, ids[p]].item(), abs=ATOL)
            assert len(lp["top_logprobs"][p]) == 2
        assert all(len(t) == 2 for t in lp["top_logprobs"][len(ids) :])
        assert r.json()["usage"]["completion_tokens"] == 3

        # streaming, prompt only (max_tokens 0): the first chunk carries the echo + logprobs
        body.update(stream=True, max_tokens=0)
        with httpx.stream("POST", srv.url + "/v1/completions", json=body, timeout=60) as s:
            events = [line[6:] for line in s.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e)["choices"][0] for e in events[:-1]]
        assert chunks[0]["text"] == prompt and chunks[-1]["finish_reason"] == "length"
        assert chunks[0]["logprobs"]["token_logprobs"] == lp["token_logprobs"][: len(ids)]

        no_echo = httpx.post(
            srv.url + "/v1/completions",
            timeout=60,
            json={"model": "tiny", "prompt": prompt, "max_tokens": 0},
        )
        assert no_echo.status_code == 400 and no_echo.json()["error"]["param"] == "max_tokens"
    finally:
        srv.stop()
