"""Tensor parallelism on the CPU: ranks are processes joined by torch.distributed (gloo), each
holding its share of every layer's heads and MLP width. Logits must equal transformers' on
the same checkpoints, and the engine's tokens those of one rank."""

from __future__ import annotations

import multiprocessing
import os
import signal
import time

import httpx
import pytest
import torch

from tests.helpers import paged_logits
from tests.server_utils import ServerProcess
from tests.test_graph_runner import CountingGraph
from tests.test_model_parity import ARCHS, ATOL, _randomize, _reference_logits
from tests.test_prompt_logprobs import _char_tokenizer
from tokenmill import LLM, SamplingParams
from tokenmill.config import EngineArgs, GiB
from tokenmill.errors import ModelLoadError
from tokenmill.loader.inspect import describe_model
from tokenmill.worker.model_runner import ModelRunner

BLOCK_SIZE = 4


@pytest.fixture(autouse=True)
def no_rank_left():
    """Every test stops the rank processes it started (and leaves the process group)."""
    yield
    assert not multiprocessing.active_children()
    assert not torch.distributed.is_initialized()


def _checkpoint(name: str, tmp_path_factory):
    torch.manual_seed(0)
    model = ARCHS[name]().eval()
    _randomize(model)
    path = tmp_path_factory.mktemp(f"tp-{name}")
    model.save_pretrained(path)
    _char_tokenizer().save(str(path / "tokenizer.json"))
    return path, model


@pytest.fixture(scope="module", params=["llama", "mistral", "qwen2", "qwen3"])
def checkpoint(request, tmp_path_factory):
    return _checkpoint(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return _checkpoint("llama", tmp_path_factory)


def _llm(path, tp: int, **kw) -> LLM:
    return LLM(
        str(path),
        dtype="float32",
        num_kv_blocks=64,
        block_size=BLOCK_SIZE,
        max_model_len=128,
        tensor_parallel_size=tp,
        **kw,
    )


def _check_logits(path, reference) -> None:
    """Two ranks' logits against transformers': whole prompts in one batch, then chunks and
    decodes across block boundaries in the same steps."""
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 160, (n,), generator=g).tolist() for n in (37, 5, 20)]
    expected = [_reference_logits(reference, p) for p in prompts]
    for chunks in ([[len(p)] for p in prompts], [[21] + [1] * 16, [2, 1, 2], [7, 7, 6]]):
        with _llm(path, 2) as llm:
            got = paged_logits(llm.engine.runner, prompts, chunks)
        for e, o in zip(expected, got):
            torch.testing.assert_close(o, e, atol=ATOL, rtol=1e-4)


def test_logits_match_transformers_over_two_ranks(checkpoint):
    """Llama (untied head), Mistral (head_dim 16), Qwen2 (q/k/v biases split with their rows,
    tied head), Qwen3 (per-head q/k norms) on the default CPU backend: 2 query heads and 1 KV
    head per rank, the MLP's 112 channels as 2 x 56."""
    path, reference = checkpoint
    _check_logits(path, reference)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_logits_match_transformers_on_every_backend(llama, backend, monkeypatch):
    monkeypatch.setenv("TOKENMILL_BACKEND", backend)  # the ranks' processes inherit it
    _check_logits(*llama)


def test_tokens_match_one_rank(llama):
    """Greedy, seeded sampling, n=2, penalties and logprobs, and prompt-lookup drafts: the
    outputs of one rank (sampling happens on rank 0 from the replicated head's logits)."""
    path, _ = llama
    prompts = [[5 + (7 * i + j) % 150 for j in range(3 + 2 * i)] for i in range(5)]
    params = [
        SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
        SamplingParams(temperature=0.9, seed=3, max_tokens=10, ignore_eos=True, n=2),
        SamplingParams(temperature=0, max_tokens=9, ignore_eos=True, repetition_penalty=1.3),
        SamplingParams(temperature=0.7, top_p=0.9, seed=5, logprobs=3, max_tokens=8),
        SamplingParams(temperature=0, max_tokens=11, ignore_eos=True, logprobs=2),
    ]
    spec = {"num_speculative_tokens": 3, "prompt_lookup_min": 1, "prompt_lookup_max": 2}

    def run(tp: int, **kw) -> list:
        with _llm(path, tp, **kw) as llm:
            outs = llm.generate(prompts, params)
        return [
            [(c.token_ids, [sorted(d) for d in c.logprobs or []]) for c in o.outputs] for o in outs
        ]

    one = run(1)
    assert run(2) == one
    greedy = [SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)] * 3
    with _llm(path, 1) as llm:
        plain = [o.outputs[0].token_ids for o in llm.generate(prompts[:3], greedy)]
    with _llm(path, 2, speculative_config=spec) as llm:
        drafted = [o.outputs[0].token_ids for o in llm.generate(prompts[:3], greedy)]
        assert llm.engine.stats().spec_draft_tokens > 0
    assert drafted == plain


def test_graphs_replay_on_every_rank(llama, monkeypatch):
    """Captured decode graphs (the CPU's stand-in graph, Triton in its interpreter) on both
    ranks: each rank captures the same sizes in the same order and replays the graph rank 0
    picks, so the all-reduces inside pair up; tokens are the eager engine's."""
    monkeypatch.setenv("TOKENMILL_BACKEND", "triton")
    path, _ = llama
    prompts = [[5 + (7 * i + j) % 150 for j in range(2 + i)] for i in range(4)]
    params = [
        SamplingParams(temperature=0, max_tokens=2 + 2 * i, ignore_eos=True) for i in range(4)
    ]
    params[1] = SamplingParams(temperature=1.0, seed=11, max_tokens=5, ignore_eos=True)
    with _llm(path, 1) as llm:
        expected = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    with _llm(path, 2, max_num_seqs=4) as llm:
        engine = llm.engine
        engine.runner = ModelRunner(
            engine.model,
            64,
            BLOCK_SIZE,
            torch.float32,
            torch.device("cpu"),
            engine.max_model_len,
            4,
            graph_factory=CountingGraph,
            workers=engine.workers,
        )
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
        replays = {s: g.replays for s, g in engine.runner.graphs.graphs.items()}
    assert got == expected
    assert replays[4] > 0 and replays[2] > 0 and replays[1] > 0, replays


def test_embedded_gguf_over_three_ranks(default_gguf, llm_f32):
    """The embedded model (9 query heads, 3 KV heads, 1536 MLP channels) over three ranks:
    its GGUF weights dequantized and split, the greedy text of one float32 rank."""
    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time"]
    params = SamplingParams(temperature=0, max_tokens=16)
    expected = [o.outputs[0].text for o in llm_f32.generate(prompts, params)]
    with LLM(dtype="float32", max_model_len=512, tensor_parallel_size=3) as llm:
        got = [o.outputs[0].text for o in llm.generate(prompts, params)]
        assert "tensor parallel" in llm.engine.model_info.quant_reason
        held = llm.engine.model.weight_memory_bytes()
    assert got == expected
    # `tokenmill info`'s estimate of a rank's weights (from the headers) against rank 0's
    info = describe_model(EngineArgs(dtype="float32", max_model_len=512, tensor_parallel_size=3))
    estimate = float(info["weights in memory"].split()[0]) * GiB
    assert abs(estimate - held) < 0.02 * held, (estimate, held)
    assert info["KV cache per token"] == f"{30 * 2 * 64 * 4 / 1024:.1f} KiB in float32 per rank"


def test_sizes_that_do_not_split_the_model(llama, tmp_path_factory):
    path, _ = llama
    with pytest.raises(ModelLoadError, match=r"must divide the model's attention heads \(4\)"):
        _llm(path, 3)
    gpt2, _ = _checkpoint("gpt2", tmp_path_factory)
    with pytest.raises(ModelLoadError, match="not supported for GPT2LMHeadModel"):
        _llm(gpt2, 2)
    with pytest.raises(ValueError, match="num_scheduler_steps > 1 runs on one rank"):
        _llm(path, 2, num_scheduler_steps=4)


def test_a_load_error_names_every_rank(llama, tmp_path):
    """A checkpoint that fails on every rank (a tensor missing): one error naming each rank's
    failure, and every rank's process stopped."""
    from safetensors.torch import load_file, save_file

    path, _ = llama
    for f in os.listdir(path):
        if f.endswith(".json"):
            (tmp_path / f).write_bytes((path / f).read_bytes())
    tensors = load_file(str(path / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(ModelLoadError) as e:
        _llm(tmp_path, 2)
    for rank in (0, 1):
        assert f"rank {rank}: ModelLoadError: tensors missing from checkpoint: " in str(e.value)
    assert "model.layers.1.mlp.gate_up_proj.weight[up_proj]" in str(e.value)


def _children(pid: int) -> list[int]:
    """The pids whose parent is `pid` (from /proc)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry))
    return out


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _wait_dead(pids: list[int]) -> None:
    deadline = time.time() + 30
    while time.time() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.2)
    assert not any(_alive(p) for p in pids)


@pytest.mark.parametrize("stop", ["sigterm", "sigkill"])
def test_server_over_three_ranks_and_ranks_die_with_it(llm_f32, stop):
    """`tokenmill serve --tensor-parallel-size 3` answers like one rank. Stopped with SIGTERM,
    it stops its ranks and exits 0; killed with SIGKILL (no clean-up at all), its rank
    processes notice the closed links and exit."""
    prompt = "The capital of France is"
    expected = llm_f32.generate(prompt, SamplingParams(temperature=0, max_tokens=12))[0]
    server = ServerProcess("--tensor-parallel-size", "3")
    try:
        r = httpx.post(
            server.url + "/v1/completions",
            json={
                "model": "SmolLM2-135M-Instruct",
                "prompt": prompt,
                "max_tokens": 12,
                "temperature": 0,
            },
            timeout=60,
        )
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == expected.outputs[0].text
        ranks = [p for p in _children(server.proc.pid) if "spawn_main" in _cmdline(p)]
        assert len(ranks) == 2, ranks
        os.kill(server.proc.pid, signal.SIGTERM if stop == "sigterm" else signal.SIGKILL)
        code = server.proc.wait(30)
        assert code == (0 if stop == "sigterm" else -signal.SIGKILL), server.output()[-2000:]
        _wait_dead(ranks)
    finally:
        server.stop()


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode()
    except OSError:
        return ""
