"""LoRA adapters (PEFT folders) served beside the base model. The reference is PEFT itself:
the same adapter folder loaded by `peft.PeftModel` over the same transformers checkpoint."""

from __future__ import annotations

import json

import httpx
import pytest
import torch

from tests.server_utils import ServerProcess
from tests.test_prompt_logprobs import tiny  # noqa: F401  (the fixture)
from tokenmill import LLM, LoRARequest, SamplingParams
from tokenmill.errors import ModelLoadError

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PROMPTS = [[5, 17, 33, 90, 12, 7, 44, 3, 61], [70, 2, 9], [11] * 21 + [4, 8]]


def _adapter(base_path, out, seed: int, **config):
    """A PEFT LoRA adapter of the checkpoint at `base_path`, with random (non-zero) A and B,
    saved to `out`; returns the PeftModel (float32, eval)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(base_path)
    options = dict(r=4, lora_alpha=8, target_modules=TARGETS) | config
    peft_model = get_peft_model(model, LoraConfig(**options))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    peft_model.save_pretrained(out)
    return peft_model.eval()


@pytest.fixture(scope="module")
def adapters(tiny, tmp_path_factory):  # noqa: F811
    """name -> (LoRARequest, PeftModel): every projection at rank 4; q and v only at rank 8
    (the fused q/k/v layer with its k rows left alone); rank-stabilized scaling with an alpha
    pattern."""
    path, _ = tiny
    root = tmp_path_factory.mktemp("lora")
    specs = {
        "all": dict(seed=1),
        "qv": dict(seed=2, r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
        "rs": dict(seed=3, use_rslora=True, alpha_pattern={"down_proj": 2}),
    }
    out = {}
    for i, (name, spec) in enumerate(specs.items()):
        folder = root / name
        out[name] = (LoRARequest(name, i + 1, str(folder)), _adapter(path, folder, **spec))
    return out


def _llm(path, **kw) -> LLM:
    return LLM(str(path), dtype="float32", max_model_len=128, enable_lora=True, **kw)


def _prompt_logprobs(outputs) -> list[list[float]]:
    """The logprob of each prompt token after the first, per request."""
    return [[next(iter(d.values())).logprob for d in o.prompt_logprobs[1:]] for o in outputs]


def _reference_logprobs(model, ids: list[int]) -> list[float]:
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    return [lp[i - 1, ids[i]].item() for i in range(1, len(ids))]


def _reference_greedy(model, ids: list[int], n: int) -> list[int]:
    """n argmax tokens, a full forward each (no end-of-sequence stop)."""
    ids = list(ids)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[-n:]


def test_logits_and_greedy_tokens_match_peft(tiny, adapters):  # noqa: F811
    """Base and three adapters in the same batches: each prompt's logprobs (every position:
    prefill) and 10 greedy tokens (decode steps) equal PEFT's for its adapter."""
    path, base = tiny
    cases = [(None, base)] + [(req, model) for req, model in adapters.values()]
    prompts = [p for p in PROMPTS for _ in cases]
    loras = [req for _ in PROMPTS for req, _ in cases]
    models = [model for _ in PROMPTS for _, model in cases]
    llm = _llm(path)
    scored = llm.generate(
        prompts, SamplingParams(max_tokens=1, prompt_logprobs=0), lora_request=loras
    )
    for got, ids, model in zip(_prompt_logprobs(scored), prompts, models):
        torch.testing.assert_close(
            torch.tensor(got), torch.tensor(_reference_logprobs(model, ids)), atol=2e-4, rtol=0
        )
    greedy = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    outs = llm.generate(prompts, greedy, lora_request=loras)
    for o, ids, model in zip(outs, prompts, models):
        assert o.outputs[0].token_ids == _reference_greedy(model, ids, 10)
    # the adapters change the outputs (a test of them that could pass on the base model fails)
    assert len({tuple(o.outputs[0].token_ids) for o in outs[: len(cases)]}) == len(cases)


def test_adapters_over_two_ranks(tiny, adapters):  # noqa: F811
    """Tensor parallelism (two ranks over gloo): each rank keeps its part of every slot (B's
    rows of q/k/v and gate/up, A's columns of o and down, whose partial updates the layer's
    all-reduce sums). Base and adapters in one batch give PEFT's logprobs and greedy tokens."""
    path, base = tiny
    cases = [(None, base)] + [(req, model) for req, model in adapters.values()]
    prompts = [PROMPTS[0]] * len(cases)
    loras = [req for req, _ in cases]
    with _llm(path, tensor_parallel_size=2, max_loras=2) as llm:
        scored = llm.generate(
            prompts, SamplingParams(max_tokens=1, prompt_logprobs=0), lora_request=loras
        )
        greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
        outs = llm.generate(prompts, greedy, lora_request=loras)
    for got, (_, model) in zip(_prompt_logprobs(scored), cases):
        torch.testing.assert_close(
            torch.tensor(got),
            torch.tensor(_reference_logprobs(model, PROMPTS[0])),
            atol=2e-4,
            rtol=0,
        )
    for o, (_, model) in zip(outs, cases):
        assert o.outputs[0].token_ids == _reference_greedy(model, PROMPTS[0], 6)


def test_more_adapters_than_slots(tiny, adapters):  # noqa: F811
    """max_loras=1: requests of three adapters and the base model queued together run one
    adapter at a time (the scheduler holds the others back), each slot refilled as adapters
    change; every output is the one it has alone."""
    path, _ = tiny
    reqs = [req for req, _ in adapters.values()]
    loras = [None, *reqs, reqs[0], None, reqs[2]]
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(loras))]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    llm = _llm(path, max_loras=1)
    alone = [
        llm.generate(p, params, lora_request=r)[0].outputs[0].token_ids
        for p, r in zip(prompts, loras)
    ]
    together = [o.outputs[0].token_ids for o in llm.generate(prompts, params, lora_request=loras)]
    assert together == alone


def test_prefix_cache_is_per_adapter(tiny, adapters):  # noqa: F811
    """The same 40-token prompt with the base model, then an adapter, then the adapter
    again: the adapter never reuses the base model's blocks (its K/V differ), but reuses its
    own; outputs equal an engine without the cache."""
    path, _ = tiny
    req = adapters["all"][0]
    prompt = [(7 * j) % 150 + 3 for j in range(40)]
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    llm = _llm(path, block_size=4)
    base = llm.generate(prompt, params)[0]
    first = llm.generate(prompt, params, lora_request=req)[0]
    second = llm.generate(prompt, params, lora_request=req)[0]
    assert first.num_cached_tokens == 0 and second.num_cached_tokens >= 36
    uncached = _llm(path, enable_prefix_caching=False)
    assert first.outputs[0].token_ids == second.outputs[0].token_ids
    assert first.outputs[0].token_ids == (
        uncached.generate(prompt, params, lora_request=req)[0].outputs[0].token_ids
    )
    assert base.outputs[0].token_ids != first.outputs[0].token_ids


def test_adapters_on_the_native_kernels(default_gguf, tmp_path):
    """The embedded model on its native Q4_1 kernels, with a rank-8 adapter on every
    projection (written by PEFT over transformers' load of the file): the logprobs of its
    prompt (prefill) and of its greedy tokens (decode steps, which leave the C++ decode loop
    while an adapter runs) against the float32 engine with the adapter. The bound is derived
    in the test: twice the native kernels' own distance from float32 without the adapter on
    the same tokens, plus 0.02; the adapter moves the float32 logprobs of both parts by over 3x
    that. (A stronger adapter amplifies bfloat16's rounding beyond it: dense bfloat16 strays
    as far as the native kernels then.)"""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    folder, name = default_gguf.rsplit("/", 1)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for pname, p in peft_model.named_parameters():
            if "lora_" in pname:
                p.copy_(torch.randn(p.shape, generator=g) * 0.06)
    peft_model.save_pretrained(tmp_path)
    del model, peft_model
    req = LoRARequest("smol", 1, str(tmp_path))
    native = LLM(max_model_len=256, enable_lora=True)
    assert native.engine.model_info.native_weights
    dense = LLM(dtype="float32", max_model_len=256, quantization="none", enable_lora=True)

    def scored(llm, ids, lora):
        params = SamplingParams(max_tokens=1, prompt_logprobs=0)
        return torch.tensor(_prompt_logprobs(llm.generate(ids, params, lora_request=lora))[0])

    ids = native.get_tokenizer().encode("The capital of France is Paris, and of Italy it is")
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=0)
    out = native.generate(ids, greedy, lora_request=req)[0].outputs[0]
    decoded = [lp[t].logprob for lp, t in zip(out.logprobs, out.token_ids)]
    full = ids + list(out.token_ids)
    got = torch.cat([scored(native, ids, req), torch.tensor(decoded)])
    reference = scored(dense, full, req)
    base = scored(dense, full, None)
    bound = 2 * (scored(native, full, None) - base).abs().max().item() + 0.02
    assert (got - reference).abs().max().item() < bound
    # an adapter ignored by the prefill or by the decode steps would break the bound above
    n = len(ids) - 1
    moved = (reference - base).abs()
    assert moved[:n].max().item() > 3 * bound and moved[n:].max().item() > 3 * bound, (
        moved,
        bound,
    )


def test_bad_adapters_and_options(tiny, adapters, tmp_path):  # noqa: F811
    from safetensors.torch import save_file

    path, _ = tiny
    llm = _llm(path, max_lora_rank=4)
    with pytest.raises(ModelLoadError, match="rank 8, above max_lora_rank 4"):
        llm.generate(PROMPTS[0], lora_request=adapters["qv"][0])
    with pytest.raises(ValueError, match="lora_int_id 1 is already 'all'"):
        llm.generate(PROMPTS[0], lora_request=adapters["all"][0])
        llm.generate(PROMPTS[0], lora_request=LoRARequest("other", 1, "/nowhere"))
    folder = tmp_path / "embed"
    _adapter(path, folder, 4, target_modules=["embed_tokens"])
    with pytest.raises(
        ModelLoadError, match=r"unsupported tensor base_model\.model\.model\.embed_tokens"
    ):
        llm.generate(PROMPTS[0], lora_request=LoRARequest("e", 5, str(folder)))
    head = tmp_path / "head"  # by hand: PEFT also saves the base layer of an output head
    head.mkdir()
    (head / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8}))
    save_file(
        {
            "base_model.model.lm_head.lora_A.weight": torch.zeros(4, 64),
            "base_model.model.lm_head.lora_B.weight": torch.zeros(160, 4),
        },
        str(head / "adapter_model.safetensors"),
    )
    with pytest.raises(ModelLoadError, match="lm_head is not a layer adapters apply to"):
        llm.generate(PROMPTS[0], lora_request=LoRARequest("h", 8, str(head)))
    q_proj = "base_model.model.model.layers.0.self_attn.q_proj"
    for present, missing in (("A", "B"), ("B", "A")):
        half = tmp_path / f"only_{present}"  # a pair with one of its two matrices
        half.mkdir()
        (half / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8}))
        shape = (4, 64) if present == "A" else (64, 4)
        save_file(
            {f"{q_proj}.lora_{present}.weight": torch.zeros(shape)},
            str(half / "adapter_model.safetensors"),
        )
        with pytest.raises(ModelLoadError, match=f"q_proj lacks lora_{missing}"):
            llm.generate(
                PROMPTS[0], lora_request=LoRARequest(present, 10 + ord(present), str(half))
            )
    dora = tmp_path / "dora"
    _adapter(path, dora, 5, use_dora=True)
    with pytest.raises(ModelLoadError, match="use_dora=True is not supported"):
        llm.generate(PROMPTS[0], lora_request=LoRARequest("d", 6, str(dora)))
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8}))
    (pickled / "adapter_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ModelLoadError, match="adapter_model.bin is a pickle"):
        llm.generate(PROMPTS[0], lora_request=LoRARequest("p", 7, str(pickled)))
    # an adapter in use stays until its requests finish
    engine = llm.engine
    rid = engine.add_request(None, PROMPTS[0], lora_request=adapters["all"][0])
    with pytest.raises(ValueError, match=r"'all' is in use by 1 unfinished sequence"):
        engine.remove_lora(1)
    engine.abort_request(rid)
    engine.remove_lora(1)
    assert [r.lora_name for r in engine.list_loras()] == []
    # the engine still serves the base model and the adapters that loaded
    assert llm.generate(PROMPTS[0], lora_request=adapters["all"][0])[0].outputs[0].token_ids
    plain = LLM(str(path), dtype="float32", max_model_len=128)
    with pytest.raises(ValueError, match="need an engine started with enable_lora=True"):
        plain.generate(PROMPTS[0], lora_request=adapters["all"][0])
    with pytest.raises(ValueError, match="expected NAME=PATH"):
        LLM(str(path), lora_modules="just-a-path")


def _completion_tokens(srv, model: str, max_tokens: int = 8) -> httpx.Response:
    return httpx.post(
        srv.url + "/v1/completions",
        json={
            "model": model,
            "prompt": PROMPTS[0],
            "max_tokens": max_tokens,
            "temperature": 0,
            "ignore_eos": True,
            "return_tokens_as_token_ids": True,
            "logprobs": 0,
        },
        timeout=60,
    )


def _tokens(r: httpx.Response) -> list[int]:
    assert r.status_code == 200, r.text
    return [int(t.split(":")[1]) for t in r.json()["choices"][0]["logprobs"]["tokens"]]


def test_server_serves_adapters_by_model_name(tiny, adapters, tmp_path):  # noqa: F811
    """`--lora-modules` adapters are models by name; with `--allow-runtime-lora-updating`,
    vLLM's load / unload endpoints add and remove them, and without it they do not exist."""
    path, _ = tiny
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    llm = _llm(path)
    expected = {
        name: llm.generate(PROMPTS[0], params, lora_request=adapters.get(name, (None,))[0])[0]
        .outputs[0]
        .token_ids
        for name in ("tiny", "all", "qv")
    }
    all_path, qv_path = adapters["all"][0].lora_path, adapters["qv"][0].lora_path
    srv = ServerProcess(
        str(path),
        "--served-model-name",
        "tiny",
        "--lora-modules",
        f"all={all_path}",
        "--max-model-len",
        "128",
        "--allow-runtime-lora-updating",
    )
    try:
        models = httpx.get(srv.url + "/v1/models").json()["data"]
        assert sorted(m["id"] for m in models) == ["all", "tiny"]
        for name in ("tiny", "all"):
            r = _completion_tokens(srv, name)
            assert r.json()["model"] == name and _tokens(r) == expected[name]
        load = srv.url + "/v1/load_lora_adapter"
        unload = srv.url + "/v1/unload_lora_adapter"
        r = httpx.post(load, json={"lora_name": "qv", "lora_path": qv_path})
        assert r.status_code == 200 and "added" in r.text, r.text
        assert _tokens(_completion_tokens(srv, "qv")) == expected["qv"]
        assert httpx.post(load, json={"lora_name": "qv", "lora_path": qv_path}).status_code == 400
        r = httpx.post(load, json={"lora_name": "bad", "lora_path": str(tmp_path)})
        assert r.status_code == 400 and "no adapter_config.json" in r.json()["error"]["message"]
        r = httpx.post(unload, json={"lora_name": "qv"})
        assert r.status_code == 200 and "removed" in r.text, r.text
        assert _completion_tokens(srv, "qv").status_code == 404
        assert httpx.post(unload, json={"lora_name": "qv"}).status_code == 404
        assert _tokens(_completion_tokens(srv, "all")) == expected["all"]
    finally:
        srv.stop()
    plain = ServerProcess(str(path), "--lora-modules", f"all={all_path}")
    try:
        r = httpx.post(
            plain.url + "/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": qv_path}
        )
        assert r.status_code == 404
    finally:
        plain.stop()
