"""Captured decode steps (worker/graph_runner.py) on the CPU: the graph object is the eager
stand-in that replays the captured function on the static buffers, and attention runs through
the Triton backend in its interpreter. The padded static-buffer path must give the eager
path's tokens at every capture size, with rows finishing mid-batch."""

from __future__ import annotations

import pytest
import torch

from tests.test_model_parity import _llama_like
from tests.test_prompt_logprobs import _char_tokenizer, tiny  # noqa: F401  (the fixture)
from tokenmill import LLM, SamplingParams
from tokenmill.worker.graph_runner import EagerGraph, capture_sizes
from tokenmill.worker.model_runner import ModelRunner

NUM_BLOCKS, BLOCK_SIZE, MAX_SEQS = 64, 4, 8


class CountingGraph(EagerGraph):
    def __init__(self, pool=None) -> None:
        super().__init__(pool)
        self.replays = 0

    def replay(self) -> None:
        self.replays += 1
        super().replay()


def _llm(path, **kw) -> LLM:
    return LLM(
        str(path),
        dtype="float32",
        num_kv_blocks=NUM_BLOCKS,
        block_size=BLOCK_SIZE,
        max_num_seqs=MAX_SEQS,
        max_model_len=128,
        **kw,
    )


def _graph_runner(engine) -> ModelRunner:
    """A runner over `engine`'s model that replays its decode steps through CountingGraph."""
    return ModelRunner(
        engine.model,
        NUM_BLOCKS,
        BLOCK_SIZE,
        torch.float32,
        torch.device("cpu"),
        engine.max_model_len,
        MAX_SEQS,
        graph_factory=CountingGraph,
    )


def test_capture_sizes():
    assert capture_sizes(256)[:10] == [1, 2, 4, 8, 16, 24, 32, 48, 64, 96]
    assert capture_sizes(256)[-1] == 256 and capture_sizes(100)[-2:] == [96, 100]
    assert capture_sizes(3) == [1, 2, 3]


def test_graph_replay_matches_eager_at_every_size(tiny, monkeypatch):  # noqa: F811
    monkeypatch.setenv("TOKENMILL_BACKEND", "triton")
    path, _ = tiny
    prompts = [[5 + (7 * i + j) % 150 for j in range(2 + i)] for i in range(MAX_SEQS)]
    # 2, 3, ..., 9 new tokens: the batch shrinks one row per step, so sizes 8, 4, 2 and 1 all
    # replay with padding rows; two rows sample with seeds from the graph's logits.
    params = [
        SamplingParams(temperature=0, max_tokens=2 + i, ignore_eos=True) for i in range(MAX_SEQS)
    ]
    params[2] = SamplingParams(temperature=1.0, seed=11, max_tokens=4, ignore_eos=True)
    params[5] = SamplingParams(temperature=0.8, top_k=5, seed=3, max_tokens=7, ignore_eos=True)
    expected = [o.outputs[0].token_ids for o in _llm(path).generate(prompts, params)]

    llm = _llm(path)
    engine = llm.engine
    assert engine.runner.graphs is None  # no graphs on the CPU by default
    engine.runner = _graph_runner(engine)
    graphs = engine.runner.graphs
    assert sorted(graphs.graphs) == [1, 2, 4, 8]
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    assert got == expected
    assert all(g.replays > 0 for g in graphs.graphs.values()), {
        s: g.replays for s, g in graphs.graphs.items()
    }
    # the last replay (one real row) ran its padding rows with slot -1: no KV write
    assert torch.all(graphs.static.slot_mapping[1:] == -1)


@pytest.fixture(scope="module")
def looping(tmp_path_factory):
    """A tiny random Llama whose attention and MLP outputs are scaled down to 0.1 and whose
    output head is scaled up 50x: the next token is mostly a function of the current one, by a
    clear margin, so greedy outputs fall into cycles that prompt lookup predicts (drafts get
    accepted), while attention still moves the logits."""
    torch.manual_seed(0)
    model = _llama_like("LlamaForCausalLM").eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(50)
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.mul_(0.1)
            layer.mlp.down_proj.weight.mul_(0.1)
    path = tmp_path_factory.mktemp("looping-llama")
    model.save_pretrained(path)
    _char_tokenizer().save(str(path / "tokenizer.json"))
    return path


def test_drafted_decodes_replay_graphs(looping, monkeypatch):
    """Speculative decoding with captured graphs: a decode with k drafts is k + 1 single-query
    rows, which replay the graph of their count. Greedy rows give plain decoding's tokens
    (beside a sampled row, and alone, where the graph's argmax checks the drafts), seeded
    sampled rows the eager speculative engine's, with drafts accepted on the way."""
    monkeypatch.setenv("TOKENMILL_BACKEND", "triton")
    spec = {"num_speculative_tokens": 3, "prompt_lookup_min": 1, "prompt_lookup_max": 2}
    prompts = [[40 + j % 4 for j in range(5)], [5 + (3 * j) % 7 for j in range(6)]]
    params = [
        SamplingParams(temperature=0, max_tokens=14, ignore_eos=True),
        SamplingParams(temperature=0.8, seed=7, max_tokens=14, ignore_eos=True),
    ]
    plain = _llm(looping).generate(prompts[0], params[0])[0].outputs[0].token_ids
    eager_llm = _llm(looping, speculative_config=spec)
    eager = [o.outputs[0].token_ids for o in eager_llm.generate(prompts, params)]
    llm = _llm(looping, speculative_config=spec)
    engine = llm.engine
    engine.runner = _graph_runner(engine)
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    assert got[0] == plain and got == eager
    assert engine.runner.graphs.graphs[8].replays > 0  # 2 requests x (1 + 3) rows
    accepted = engine.stats().spec_accepted_tokens
    assert accepted > 0
    # greedy alone: the graph's own argmax checks the drafts
    assert llm.generate(prompts[0], params[0])[0].outputs[0].token_ids == plain
    assert engine.stats().spec_accepted_tokens > accepted
    assert engine.runner.graphs.graphs[4].replays > 0


def test_backends_without_graph_support_never_capture(tiny, monkeypatch):  # noqa: F811
    monkeypatch.setenv("TOKENMILL_BACKEND", "torch")
    path, _ = tiny
    runner = _graph_runner(_llm(path).engine)
    assert runner.graphs is None


def test_profile_forward_runs_the_largest_step_on_every_backend(tiny, monkeypatch):  # noqa: F811
    """The CUDA KV budget's profile step (max_num_batched_tokens prompt tokens in sequences of
    at most max_model_len, plus the logits of max_num_seqs rows) runs through each backend on
    a scratch pool; it measures on CUDA only."""
    from tokenmill.worker.profile import profile_forward

    path, _ = tiny
    # (max_model_len, token counts): one sequence; sequences of max_model_len plus a remainder,
    # and plus a 1-token one (a decode). The Triton interpreter gets shorter sequences (300
    # tokens in sequences of 128 took it 23 s).
    cases = {
        "torch": (128, (37, 300, 257)),
        "cpu": (128, (37, 300, 257)),
        "triton": (32, (21, 75, 65)),
    }
    for backend, (max_len, token_counts) in cases.items():
        monkeypatch.setenv("TOKENMILL_BACKEND", backend)
        model = _llm(path).engine.model
        for tokens in token_counts:
            assert (
                profile_forward(
                    model, tokens, 8, BLOCK_SIZE, torch.float32, torch.device("cpu"), max_len
                )
                == 0
            )


def test_multi_step_rounds_give_the_single_step_tokens(tiny, monkeypatch):  # noqa: F811
    """num_scheduler_steps = 4 over the replayed static buffers (tokens fed back on the device)
    against the plain single-step eager engine: the same tokens and texts for greedy and seeded
    sampled rows, with max_tokens ending rounds early, a stop token id and a stop string met in
    the middle of a round (the round's later tokens are dropped)."""
    import dataclasses

    monkeypatch.setenv("TOKENMILL_BACKEND", "triton")
    path, _ = tiny
    prompts = [[5 + (11 * i + 3 * j) % 150 for j in range(3 + 2 * i)] for i in range(6)]
    params = [
        SamplingParams(temperature=0, max_tokens=14, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=7, ignore_eos=True),
        SamplingParams(temperature=1.0, seed=5, max_tokens=13, ignore_eos=True),
        SamplingParams(temperature=0.7, top_k=8, top_p=0.9, seed=9, max_tokens=10, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=14, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=14, ignore_eos=True),
    ]
    free_run = [o.outputs[0] for o in _llm(path).generate(prompts, params)]
    # row 4 stops at a token id; row 5 at a string that ends at output position 1, 2 or 3,
    # inside the first round (positions 1-4; the prefill step sampled position 0)
    params[4] = dataclasses.replace(params[4], stop_token_ids=[free_run[4].token_ids[6]])
    stop = free_run[5].text[1:3]
    params[5] = dataclasses.replace(params[5], stop=[stop])
    expected = [o.outputs[0] for o in _llm(path).generate(prompts, params)]
    assert expected[5].stop_reason == stop and len(expected[5].token_ids) <= 3

    llm = _llm(path)
    engine = llm.engine
    engine.scheduler.config = dataclasses.replace(engine.scheduler.config, num_scheduler_steps=4)
    engine.runner = _graph_runner(engine)
    rounds, fed = [], {}
    schedule, on_tokens = engine.scheduler.schedule, engine._on_tokens

    def spy_schedule():
        out = schedule()
        rounds.append(out.num_steps)
        return out

    def spy_on_tokens(sample, new_ids, lp):
        fed[sample.request.request_id] = fed.get(sample.request.request_id, 0) + len(new_ids)
        on_tokens(sample, new_ids, lp)

    engine.scheduler.schedule, engine._on_tokens = spy_schedule, spy_on_tokens
    outs = llm.generate(prompts, params)
    got = [o.outputs[0] for o in outs]
    assert [o.token_ids for o in got] == [o.token_ids for o in expected]
    assert [o.text for o in got] == [o.text for o in expected]
    assert [o.finish_reason for o in got] == [o.finish_reason for o in expected]
    assert got[4].stop_reason == params[4].stop_token_ids[0] and got[5].stop_reason == stop
    assert max(rounds) == 4 and rounds.count(1) < len(rounds) // 2, rounds
    # the stop string's round had sampled past it: those tokens reached the engine, then went
    assert fed[f"{outs[5].request_id}#0"] > len(got[5].token_ids)
