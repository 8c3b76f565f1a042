"""Embeddings (`LLM.embed`, `/v1/embeddings`): against transformers' final hidden states on a
tiny float32 Qwen3 (the architecture of Qwen3-Embedding), pooled by hand.

Tolerance: both sides run the same float32 math in a different order (chunked prefill, paged
attention), so the unit vectors differ by float32 rounding of a 2-layer model: ~1e-7 measured;
2e-5 leaves room for other BLAS orders and still fails any wrong position or missing norm
(those move components by > 1e-2)."""

from __future__ import annotations

import base64
import json

import httpx
import numpy as np
import openai
import pytest
import torch

from tests.server_utils import ServerProcess
from tests.test_model_parity import _llama_like
from tests.test_prompt_logprobs import _char_tokenizer
from tokenmill import LLM, PoolingParams, SamplingParams
from tokenmill.errors import ModelLoadError
from tokenmill.loader.load import sentence_transformers_pooling
from tokenmill.models.config import arch_config_from_gguf

ATOL = 2e-5
TEXTS = [
    "a",  # one token: its last, first and mean positions are one
    "hello world",
    "The quick brown fox jumps over the lazy dog. " * 3,  # 135 tokens: 9 chunks of 16
    "Pack my box with five dozen liquor jugs!",
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(folder, transformers model): a random Qwen3 checkpoint (tied embeddings, q/k norm) with
    a one-token-per-character tokenizer, float32."""
    torch.manual_seed(0)
    model = _llama_like("Qwen3ForCausalLM", head_dim=16, tie_word_embeddings=True).eval()
    path = tmp_path_factory.mktemp("tiny-qwen3")
    model.save_pretrained(path)
    _char_tokenizer().save(str(path / "tokenizer.json"))
    return str(path), model


def reference(model, text: str, pooling: str, normalize: bool = True) -> torch.Tensor:
    """transformers' last_hidden_state (after the final norm) pooled by hand."""
    ids = torch.tensor([_char_tokenizer().encode(text).ids])
    with torch.no_grad():
        hidden = model.model(ids).last_hidden_state[0]
    vector = {"last": hidden[-1], "mean": hidden.mean(0), "cls": hidden[0]}[pooling]
    return torch.nn.functional.normalize(vector, dim=0) if normalize else vector


@pytest.mark.parametrize("pooling", ["last", "mean", "cls"])
def test_embed_matches_transformers(tiny, pooling):
    """Every pooling type, with prompts chunked across steps and batched together; unit
    vectors, or the raw pooled state with normalize=False."""
    path, model = tiny
    llm = LLM(path, dtype="float32", pooling_type=pooling, max_num_batched_tokens=16)
    assert llm.engine.config.model.pooling_type == pooling
    outs = llm.embed(TEXTS)
    raw = llm.embed(TEXTS, PoolingParams(normalize=False))
    for text, out, plain in zip(TEXTS, outs, raw):
        assert out.prompt_token_ids == _char_tokenizer().encode(text).ids
        got = torch.tensor(out.outputs.embedding)
        assert got.shape == (64,)
        torch.testing.assert_close(got, reference(model, text, pooling), atol=ATOL, rtol=0)
        torch.testing.assert_close(
            torch.tensor(plain.outputs.embedding),
            reference(model, text, pooling, normalize=False),
            atol=ATOL,
            rtol=0,
        )


def _run(engine, requests: dict) -> dict:
    """Add the requests (id -> (prompt, params)), step until all finish; id -> final output."""
    for rid, (prompt, params) in requests.items():
        engine.add_request(rid, prompt, params)
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    return done


def test_embeddings_beside_generation_and_the_prefix_cache(tiny):
    """Embedding requests share steps with a generation, which gives the tokens it gives
    alone; a "last" request whose prompt is cached reuses the cache and gives the same vector;
    a "mean" request never takes cached positions (it needs every hidden state)."""
    path, model = tiny
    greedy = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    for pooling in ("last", "mean"):
        llm = LLM(path, dtype="float32", pooling_type=pooling, max_num_batched_tokens=32)
        engine = llm.engine
        alone = llm.generate("Once upon a time", greedy)[0].outputs[0].token_ids
        first = _run(
            engine,
            {
                "gen": ("Once upon a time", greedy),
                **{f"e{i}": (t, PoolingParams()) for i, t in enumerate(TEXTS)},
            },
        )
        assert first["gen"].outputs[0].token_ids == alone
        hits = engine.stats().prefix_cache_hit_tokens
        again = _run(engine, {"again": (TEXTS[2], PoolingParams())})["again"]
        new_hits = engine.stats().prefix_cache_hit_tokens - hits
        assert new_hits == (128 if pooling == "last" else 0)  # 8 full blocks of 16 before the last
        for out in (first["e2"], again):
            torch.testing.assert_close(
                torch.tensor(out.outputs.embedding),
                reference(model, TEXTS[2], pooling),
                atol=ATOL,
                rtol=0,
            )


def test_mean_pooling_survives_preemption(tiny):
    """A KV cache too small for a decoding request and a long prompt at once: the embedding
    request, newest, is preempted mid-prompt again and again and recomputed from the start,
    and its mean still counts each position once."""
    path, model = tiny
    llm = LLM(
        path,
        dtype="float32",
        pooling_type="mean",
        max_num_batched_tokens=8,
        block_size=4,
        num_kv_blocks=24,
    )
    engine = llm.engine
    texts = [TEXTS[2][:70], TEXTS[2][:75]]
    gen = SamplingParams(temperature=0, max_tokens=100, ignore_eos=True)
    requests = {"g": ("Once upon a time", gen)}
    requests |= {f"e{i}": (t, PoolingParams()) for i, t in enumerate(texts)}
    for rid, (prompt, params) in requests.items():
        engine.add_request(rid, prompt, params)
    first = engine.groups["e0"].samples[0].request
    done = _run(engine, {})
    assert first.num_preemptions > 1
    for i, text in enumerate(texts):
        torch.testing.assert_close(
            torch.tensor(done[f"e{i}"].outputs.embedding),
            reference(model, text, "mean"),
            atol=ATOL,
            rtol=0,
        )


def test_pooling_type_from_the_checkpoint(tiny, tmp_path):
    """A sentence-transformers folder's Pooling module and a GGUF's pooling_type choose the
    pooling; the option overrides them; an unknown mode is an error naming the file."""
    path, _ = tiny
    assert sentence_transformers_pooling(tmp_path) is None  # not a sentence-transformers folder
    (tmp_path / "modules.json").write_text(
        json.dumps(
            [
                {
                    "idx": 0,
                    "name": "0",
                    "path": "",
                    "type": "sentence_transformers.models.Transformer",
                },
                {
                    "idx": 1,
                    "name": "1",
                    "path": "1_Pooling",
                    "type": "sentence_transformers.models.Pooling",
                },
            ]
        )
    )
    (tmp_path / "1_Pooling").mkdir()
    modes = {"pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True}
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps(modes))
    assert sentence_transformers_pooling(tmp_path) == "mean"
    modes = {"pooling_mode_mean_tokens": False, "pooling_mode_weightedmean_tokens": True}
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps(modes))
    with pytest.raises(ModelLoadError, match="1_Pooling/config.json.*weightedmean"):
        sentence_transformers_pooling(tmp_path)

    import shutil

    folder = tmp_path / "st-model"
    shutil.copytree(path, folder)
    shutil.copy(tmp_path / "modules.json", folder)
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True}))
    assert LLM(str(folder), dtype="float32").engine.config.model.pooling_type == "cls"
    llm = LLM(str(folder), dtype="float32", pooling_type="last")
    assert llm.engine.config.model.pooling_type == "last"

    meta = {
        "general.architecture": "qwen3",
        "qwen3.attention.head_count": 4,
        "qwen3.embedding_length": 64,
        "qwen3.vocab_size": 160,
        "qwen3.block_count": 2,
        "qwen3.feed_forward_length": 112,
    }
    assert arch_config_from_gguf(meta, set()).pooling_type is None
    for value, name in [(1, "mean"), (2, "cls"), (3, "last")]:  # llama.cpp's llama_pooling_type
        assert (
            arch_config_from_gguf(meta | {"qwen3.pooling_type": value}, set()).pooling_type == name
        )


@pytest.fixture(scope="module")
def server(tiny):
    srv = ServerProcess(tiny[0], "--served-model-name", "tiny", "--max-prompts", "4")
    yield srv
    assert srv.stop() == 0


def test_embeddings_endpoint(server, tiny):
    """The openai client's defaults (base64) and floats, texts and token ids, vLLM's
    normalize and truncate_prompt_tokens; vectors as transformers gives them; usage counts the
    input tokens."""
    _, model = tiny
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none")
    r = client.embeddings.create(model="tiny", input=TEXTS)  # base64 on the wire
    assert [d.index for d in r.data] == [0, 1, 2, 3]
    assert r.model == "tiny"
    tokens = [_char_tokenizer().encode(t).ids for t in TEXTS]
    assert r.usage.prompt_tokens == r.usage.total_tokens == sum(map(len, tokens))
    for text, d in zip(TEXTS, r.data):
        torch.testing.assert_close(
            torch.tensor(d.embedding), reference(model, text, "last"), atol=ATOL, rtol=0
        )
    # token ids = their text; float32 both ways (base64 carries the float32 bits, not a
    # rounding of them). Every request matches within float32 rounding, not bit for bit: on an
    # AMD EPYC a dense float32 matmul rounded a row a few ulps apart from one request to the
    # next, the same rows in the same steps (not a function of the inputs alone there).
    floats = client.embeddings.create(model="tiny", input=tokens, encoding_format="float")
    again = client.embeddings.create(model="tiny", input=tokens)  # base64
    for a, b, first in zip(floats.data, again.data, r.data, strict=True):
        for other in (b, first):
            torch.testing.assert_close(
                torch.tensor(a.embedding), torch.tensor(other.embedding), rtol=1e-6, atol=1e-7
            )

    raw = httpx.post(
        server.url + "/v1/embeddings",
        json={"model": "tiny", "input": TEXTS[1], "encoding_format": "base64", "normalize": False},
    ).json()
    vector = np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), dtype="<f4")
    torch.testing.assert_close(
        torch.from_numpy(vector.copy()),
        reference(model, TEXTS[1], "last", False),
        atol=ATOL,
        rtol=0,
    )
    cut = client.embeddings.create(
        model="tiny", input=TEXTS[2], extra_body={"truncate_prompt_tokens": 20}
    )
    assert cut.usage.prompt_tokens == 20
    torch.testing.assert_close(
        torch.tensor(cut.data[0].embedding),
        reference(model, TEXTS[2][-20:], "last"),
        atol=ATOL,
        rtol=0,
    )


@pytest.mark.parametrize(
    "body, param",
    [
        ({"input": ""}, "input"),
        ({"input": []}, "input"),
        ({"input": ["ok", ""]}, "input"),
        ({"input": [[1, 2], [999]]}, "input"),
        ({"input": "x" * 300}, "input"),  # longer than the context (256)
        ({"input": ["a"] * 5}, "input"),  # --max-prompts 4
        ({"input": "a", "dimensions": 32}, "dimensions"),
        ({"input": "a", "truncate_prompt_tokens": 0}, "truncate_prompt_tokens"),
        ({"input": "a", "encoding_format": "int8"}, "encoding_format"),
        ({"input": "a", "stream": True}, "stream"),
    ],
)
def test_embeddings_bad_requests(server, body, param):
    r = httpx.post(server.url + "/v1/embeddings", json={"model": "tiny", **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
    r = httpx.post(server.url + "/v1/embeddings", json={"model": "tiny", "input": "still up"})
    assert r.status_code == 200


def test_embeddings_unknown_model(server):
    r = httpx.post(server.url + "/v1/embeddings", json={"model": "nope", "input": "a"})
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "model_not_found"


def test_default_model_embeddings_follow_transformers(default_gguf, hf_gguf_model):
    """The embedded model as a user runs it (native quantized kernels: 8-bit activation
    blocks, bfloat16 where the CPU has it) against transformers' float32 reading of the same
    file. Each 8-bit block rounds its values by up to 2^-8 of its largest and bfloat16 by 2^-9
    relative; over 30 layers that measured 1 - cosine <= 1.6e-4 (last) and 5e-5 (mean) on this
    suite's texts. The bound 1e-3 leaves 6x room; a wrong position or a missing norm gives
    cosines below 0.9."""
    texts = [
        "The capital of France is Paris.",
        "def fib(n): return n if n < 2 else fib(n - 1) + fib(n - 2)",
        "Photosynthesis converts light into chemical energy in plants. " * 8,
    ]
    for pooling in ("last", "mean"):
        outs = LLM(default_gguf, pooling_type=pooling).embed(texts)
        for out in outs:
            with torch.no_grad():
                hidden = hf_gguf_model.model(torch.tensor([out.prompt_token_ids])).last_hidden_state
            ref = hidden[0, -1] if pooling == "last" else hidden[0].mean(0)
            got = torch.tensor(out.outputs.embedding)
            assert abs(got.norm().item() - 1) < 1e-5
            cos = torch.nn.functional.cosine_similarity(got, ref, dim=0).item()
            assert cos > 1 - 1e-3, (pooling, out.prompt, cos)
