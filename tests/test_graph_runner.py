"""Captured decode steps (worker/graph_runner.py) on the CPU: the graph object is the eager
stand-in that replays the captured function on the static buffers, and attention runs through
the Triton backend in its interpreter. The padded static-buffer path must give the eager
path's tokens at every capture size, with rows finishing mid-batch."""

from __future__ import annotations

import torch

from tests.test_prompt_logprobs import tiny  # noqa: F401  (the fixture)
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


def _llm(path) -> LLM:
    return LLM(
        str(path),
        dtype="float32",
        num_kv_blocks=NUM_BLOCKS,
        block_size=BLOCK_SIZE,
        max_num_seqs=MAX_SEQS,
        max_model_len=128,
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
    engine.runner = ModelRunner(
        engine.model,
        NUM_BLOCKS,
        BLOCK_SIZE,
        torch.float32,
        torch.device("cpu"),
        engine.max_model_len,
        MAX_SEQS,
        graph_factory=CountingGraph,
    )
    graphs = engine.runner.graphs
    assert sorted(graphs.graphs) == [1, 2, 4, 8]
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    assert got == expected
    assert all(g.replays > 0 for g in graphs.graphs.values()), {
        s: g.replays for s, g in graphs.graphs.items()
    }
    # the last replay (one real row) ran its padding rows with slot -1: no KV write
    assert torch.all(graphs.static.slot_mapping[1:] == -1)


def test_backends_without_graph_support_never_capture(tiny, monkeypatch):  # noqa: F811
    monkeypatch.setenv("TOKENMILL_BACKEND", "torch")
    path, _ = tiny
    engine = _llm(path).engine
    runner = ModelRunner(
        engine.model,
        NUM_BLOCKS,
        BLOCK_SIZE,
        torch.float32,
        torch.device("cpu"),
        engine.max_model_len,
        MAX_SEQS,
        graph_factory=CountingGraph,
    )
    assert runner.graphs is None


def test_profile_forward_runs_the_largest_step_on_every_backend(tiny, monkeypatch):  # noqa: F811
    """The CUDA KV budget's profile step (max_num_batched_tokens prompt tokens in sequences of
    at most max_model_len, plus the logits of max_num_seqs rows) runs through each backend on
    a scratch pool; it measures on CUDA only."""
    from tokenmill.worker.model_runner import profile_forward

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
