"""Sampler tests: filters and penalties against hand-computed values, sampled frequencies against
the target distribution, batch-independence of seeded rows, and logprobs of the raw logits."""

from __future__ import annotations

import math

import pytest
import torch

from tokenmill.kernels.cpu_ops import get_ops
from tokenmill.layers.ops import CpuOps, TorchOps
from tokenmill.sample.sampler import (
    Sampler,
    SamplingMetadata,
    apply_penalties,
    build_sampling_metadata,
    inverse_cdf,
    process_logits,
    random_sample,
)
from tokenmill.sampling_params import SamplingParams

CPU = torch.device("cpu")
# Probabilities 0.5, 0.25, 0.15, 0.1 placed at token ids 2, 0, 3, 1 (so sorted order != id order).
BASE_PROBS = {2: 0.5, 0: 0.25, 3: 0.15, 1: 0.1}


def _base_logits(num_rows: int = 1) -> torch.Tensor:
    row = torch.zeros(4)
    for token, prob in BASE_PROBS.items():
        row[token] = math.log(prob)
    return row.repeat(num_rows, 1)


def _metadata(
    params: list[SamplingParams],
    vocab_size: int,
    prompt_ids: list[list[int]] | None = None,
    output_ids: list[list[int]] | None = None,
    generators: dict[int, torch.Generator] | None = None,
    stop_ids: list[set[int]] | None = None,
    bad_words: list[tuple[tuple[int, ...], ...]] | None = None,
) -> SamplingMetadata:
    n = len(params)
    return build_sampling_metadata(
        params,
        prompt_ids if prompt_ids is not None else [[] for _ in range(n)],
        output_ids if output_ids is not None else [[] for _ in range(n)],
        generators or {},
        vocab_size,
        CPU,
        stop_ids,
        bad_words,
    )


def _kept(logits: torch.Tensor) -> list[set[int]]:
    return [set(torch.nonzero(torch.isfinite(row)).flatten().tolist()) for row in logits]


@pytest.fixture(params=["torch", "cpu"])
def sampler(request: pytest.FixtureRequest) -> Sampler:
    """The sampler on each implementation of the ops seam that draws on the CPU: the PyTorch
    reference, and the C++ kernels (argmax and inverse CDF in one pass per row)."""
    if request.param == "torch":
        return Sampler(TorchOps())
    kernels = get_ops()
    if kernels is None:
        pytest.skip("no C++ compiler to build the kernels")
    return Sampler(CpuOps(kernels))


def _frequencies(
    sampler: Sampler, params: SamplingParams, logits_row: torch.Tensor, draws: int
) -> torch.Tensor:
    """Empirical distribution of `draws` independent samples (one batch, one row per draw)."""
    torch.manual_seed(0)
    md = _metadata([params] * draws, logits_row.shape[0])
    tokens = sampler(logits_row.repeat(draws, 1), md).sampled_token_ids
    return torch.bincount(tokens, minlength=logits_row.shape[0]).float() / draws


def test_metadata_leaves_unused_features_out() -> None:
    md = _metadata([SamplingParams(temperature=0.0), SamplingParams()], vocab_size=10)
    assert md.top_k is None and md.top_p is None and md.min_p is None
    assert md.repetition_penalty is None and md.presence_penalty is None
    assert md.frequency_penalty is None and md.prompt_token_ids is None
    assert md.output_token_ids is None and md.forbidden_mask is None
    assert md.max_num_logprobs is None and md.logit_bias is None
    assert not md.all_greedy
    assert md.temperature.tolist() == [0.0, 1.0]

    md = _metadata(
        [SamplingParams(repetition_penalty=1.5, top_k=3, logprobs=2), SamplingParams(logprobs=0)],
        vocab_size=10,
        prompt_ids=[[1, 2, 3], [4]],
        output_ids=[[5], []],
    )
    assert not md.all_greedy and md.max_num_logprobs == 2
    assert md.top_k is not None and md.top_k.tolist() == [3, 0]
    assert md.prompt_token_ids is not None and md.output_token_ids is not None
    assert md.prompt_token_ids.tolist() == [[1, 2, 3], [4, 10, 10]]
    assert md.output_token_ids.tolist() == [[5], [10]]


def test_top_k_keeps_exactly_k() -> None:
    vocab = 12
    perm = torch.randperm(vocab, generator=torch.Generator().manual_seed(3))
    logits = torch.empty(3, vocab)
    logits[:] = torch.arange(vocab, dtype=torch.float32)[perm]  # logit of id perm^-1(v) is v
    params = [SamplingParams(top_k=3), SamplingParams(), SamplingParams(top_k=5)]
    kept = _kept(process_logits(logits, _metadata(params, vocab)))
    top_ids = [int(torch.nonzero(perm == v)) for v in range(vocab - 1, -1, -1)]
    assert kept == [set(top_ids[:3]), set(range(vocab)), set(top_ids[:5])]


@pytest.mark.parametrize(
    ("top_k", "top_p", "expected"),
    [
        (-1, 0.3, {2}),  # 0.5 >= 0.3
        (-1, 0.7, {2, 0}),  # 0.5 < 0.7 <= 0.75
        (-1, 0.8, {2, 0, 3}),  # 0.75 < 0.8 <= 0.9
        (-1, 1.0, {0, 1, 2, 3}),
        (2, 0.9, {2, 0}),  # top-2 renormalised: 2/3, 1/3
        (2, 0.6, {2}),  # 2/3 >= 0.6
    ],
)
def test_top_p_nucleus(top_k: int, top_p: float, expected: set[int]) -> None:
    params = [SamplingParams(top_k=top_k, top_p=top_p), SamplingParams(top_p=0.95)]
    kept = _kept(process_logits(_base_logits(2), _metadata(params, 4)))
    assert kept[0] == expected
    assert kept[1] == {0, 1, 2, 3}  # 0.9 < 0.95: the whole support is needed


def test_min_p_threshold_after_temperature() -> None:
    params = [
        SamplingParams(min_p=0.25),  # threshold 0.125: drops 0.1
        SamplingParams(min_p=0.4),  # threshold 0.2: keeps 0.5, 0.25
        SamplingParams(min_p=0.6),  # threshold 0.3: keeps 0.5
        # T=2: probs ~ sqrt(p); ratios to max 1, 0.707, 0.548, 0.447 -> keeps 0.5, 0.25
        SamplingParams(min_p=0.6, temperature=2.0),
    ]
    kept = _kept(process_logits(_base_logits(4), _metadata(params, 4)))
    assert kept == [{2, 0, 3}, {2, 0}, {2}, {2, 0}]


def test_penalties_match_hand_computed_logits() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, 0.0, -2.0]] * 3)
    params = [
        SamplingParams(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25),
        SamplingParams(),  # neutral row inside a penalised batch
        SamplingParams(repetition_penalty=0.5),  # < 1 boosts seen tokens
    ]
    md = _metadata(
        params,
        vocab_size=6,
        prompt_ids=[[0, 1], [5, 5, 5, 4], [5]],
        output_ids=[[1, 3, 3], [], [0]],
    )
    out = apply_penalties(logits, md)
    # Row 0: repetition on {0, 1, 3}: 2/2, -1*2, 3/2; counts {1: 1, 3: 2}:
    #   token 1: -2 - 0.5*1 - 0.25 = -2.75; token 3: 1.5 - 0.5*2 - 0.25 = 0.25.
    expected = torch.tensor(
        [
            [1.0, -2.75, 0.5, 0.25, 0.0, -2.0],
            [2.0, -1.0, 0.5, 3.0, 0.0, -2.0],
            [4.0, -1.0, 0.5, 3.0, 0.0, -1.0],  # 2/0.5, -2*0.5
        ]
    )
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(logits[1], expected[1])  # input untouched


def test_logit_bias_added_before_the_penalties_and_sampled_from() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, 0.0, -2.0]] * 3)
    params = [
        SamplingParams(temperature=0.0, logit_bias={0: 4.0, 3: -100}, repetition_penalty=2.0),
        SamplingParams(temperature=0.0),  # no bias inside a biased batch
        SamplingParams(temperature=0.0, logit_bias={5: 100}),
    ]
    md = _metadata(params, 6, prompt_ids=[[0], [], []])
    assert md.logit_bias is not None
    out = apply_penalties(logits, md)
    # Row 0: bias first (2 + 4 = 6, 3 - 100 = -97), then the repetition penalty on token 0: 6 / 2.
    expected = torch.tensor(
        [
            [3.0, -1.0, 0.5, -97.0, 0.0, -2.0],
            [2.0, -1.0, 0.5, 3.0, 0.0, -2.0],
            [2.0, -1.0, 0.5, 3.0, 0.0, 98.0],
        ]
    )
    torch.testing.assert_close(out, expected)
    assert Sampler(TorchOps())(logits, md).sampled_token_ids.tolist() == [0, 3, 5]
    # a sampled row: -100 on the likeliest token removes it from 2,000 draws (e^-100 ~ 0)
    biased = SamplingParams(logit_bias={2: -100.0})
    assert _frequencies(Sampler(TorchOps()), biased, _base_logits()[0], 2000)[2] == 0


def test_allowed_token_ids_mask_the_rest_with_min_tokens() -> None:
    logits = torch.tensor([[0.0, 1.0, 5.0, 0.5, 3.0]] * 3)
    eos = 2
    params = [
        SamplingParams(temperature=0.0, allowed_token_ids=[2, 3, 9]),  # 9: past this vocab
        SamplingParams(temperature=0.0, allowed_token_ids=[2, 3], min_tokens=2),
        SamplingParams(temperature=0.0),
    ]
    md = _metadata(params, 5, output_ids=[[], [], []], stop_ids=[set(), {eos}, set()])
    assert md.forbidden_mask is not None
    assert md.forbidden_mask.tolist() == [
        [True, True, False, False, True],
        [True, True, True, False, True],  # eos allowed, but not before min_tokens
        [False] * 5,
    ]
    assert Sampler(TorchOps())(logits, md).sampled_token_ids.tolist() == [2, 3, 2]
    allowed = SamplingParams(allowed_token_ids=[0, 1])  # sampled: only those ever come out
    freq = _frequencies(Sampler(TorchOps()), allowed, _base_logits()[0], 2000)
    assert freq[2] == 0 and freq[3] == 0 and freq[0] > 0 and freq[1] > 0


def test_bad_words_ban_the_token_that_would_complete_one() -> None:
    words = ((3,), (7, 9), (5, 8), (1, 2, 4), (2, 7, 6))
    params = [SamplingParams(temperature=0.0, bad_words=["x"])] * 2 + [SamplingParams()]
    md = _metadata(params, 10, output_ids=[[5, 7], [], [7]], bad_words=[words, words, ()])
    assert md.forbidden_mask is not None
    # 3 always; row 0's output ends with 7 (bans 9), not with 5, [1, 2] or [2, 7] (8, 4, 6 stay)
    assert torch.nonzero(md.forbidden_mask).tolist() == [[0, 3], [0, 9], [1, 3]]


@pytest.mark.parametrize("words", [[""], ["  "], [3], "abc"])
def test_bad_words_validation(words: object) -> None:
    with pytest.raises(ValueError, match="bad_words"):
        SamplingParams(bad_words=words)  # type: ignore[arg-type]


@pytest.mark.parametrize("ids", [[], [-1], [True], ["3"], 3])
def test_allowed_token_ids_validation(ids: object) -> None:
    with pytest.raises(ValueError, match="allowed_token_ids"):
        SamplingParams(allowed_token_ids=ids)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "bias",
    [{-1: 1.0}, {"3": 1.0}, {True: 1.0}, {3: 100.5}, {3: float("nan")}, {3: "1"}, [(3, 1.0)]],
)
def test_logit_bias_validation(bias: object) -> None:
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingParams(logit_bias=bias)  # type: ignore[arg-type]


def test_min_tokens_blocks_eos_until_reached() -> None:
    eos = 2
    logits = torch.tensor([[0.0, 1.0, 5.0, 0.5]] * 2)
    params = [SamplingParams(temperature=0.0, min_tokens=3)] * 2
    md = _metadata(params, 4, output_ids=[[1], [1, 1, 1]], stop_ids=[{eos, 9}, {eos}])
    assert md.forbidden_mask is not None
    assert md.forbidden_mask.tolist() == [[False, False, True, False], [False] * 4]
    assert Sampler(TorchOps())(logits, md).sampled_token_ids.tolist() == [1, eos]
    no_mask = _metadata(params, 4, output_ids=[[1, 1, 1]] * 2, stop_ids=[{eos}, {eos}])
    assert no_mask.forbidden_mask is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_is_argmax(dtype: torch.dtype) -> None:
    logits = torch.randn(8, 50, generator=torch.Generator().manual_seed(1)).to(dtype)
    md = _metadata([SamplingParams(temperature=0.0, top_k=2, top_p=0.1)] * 8, 50)
    assert md.all_greedy
    out = Sampler(TorchOps())(logits, md)
    assert out.sampled_token_ids.tolist() == logits.float().argmax(dim=1).tolist()


def test_greedy_rows_inside_random_batch(sampler: Sampler) -> None:
    logits = torch.randn(6, 40, generator=torch.Generator().manual_seed(2))
    params = [SamplingParams(temperature=0.0 if i % 2 else 1.5) for i in range(6)]
    tokens = sampler(logits, _metadata(params, 40)).sampled_token_ids
    assert tokens[1::2].tolist() == logits[1::2].argmax(dim=1).tolist()


def test_temperature_frequencies_match_softmax(sampler: Sampler) -> None:
    probs = torch.tensor([0.4, 0.3, 0.15, 0.1, 0.05])
    temperature = 0.7
    freq = _frequencies(sampler, SamplingParams(temperature=temperature), probs.log(), 20_000)
    target = probs ** (1 / temperature)  # softmax(log p / T) = p^(1/T) / sum
    target = target / target.sum()
    assert (freq - target).abs().max().item() < 0.012  # ~3.5 sigma for p ~ 0.5


def test_top_p_with_temperature_frequencies(sampler: Sampler) -> None:
    # T=0.5 squares the probabilities: 0.25, 0.0625, 0.0225, 0.01 (sum 0.345), i.e. about
    # 0.725, 0.181, 0.065, 0.029; top_p=0.8 keeps ids 2 and 0, renormalised 0.25:0.0625 = 0.8:0.2.
    params = SamplingParams(temperature=0.5, top_p=0.8)
    freq = _frequencies(sampler, params, _base_logits()[0], 20_000)
    target = torch.tensor([0.2, 0.0, 0.8, 0.0])
    assert freq[1].item() == 0.0 and freq[3].item() == 0.0
    assert (freq - target).abs().max().item() < 0.01


def test_top_k_frequencies(sampler: Sampler) -> None:
    freq = _frequencies(sampler, SamplingParams(top_k=2), _base_logits()[0], 20_000)
    target = torch.tensor([1 / 3, 0.0, 2 / 3, 0.0])
    assert (freq - target).abs().max().item() < 0.012


def _run_steps(
    sampler: Sampler,
    logits_steps: list[torch.Tensor],
    params: list[SamplingParams],
    seeds: dict[int, int],
    global_seed: int,
) -> torch.Tensor:
    """Sample len(logits_steps) steps; returns [steps, num_rows] tokens."""
    torch.manual_seed(global_seed)
    generators = {row: torch.Generator().manual_seed(seed) for row, seed in seeds.items()}
    out = []
    for logits in logits_steps:
        md = _metadata(params, logits.shape[1], generators=generators)
        out.append(sampler(logits, md).sampled_token_ids)
    return torch.stack(out)


@pytest.mark.parametrize("top_p", [0.95, 1.0])
def test_seeded_row_is_independent_of_batch(sampler: Sampler, top_p: float) -> None:
    """Alone or beside other rows (whose filters send the whole batch through the filtered
    path: with top_p=1 the row alone takes the unfiltered one), a seeded row draws the same."""
    vocab, steps = 300, 6
    gen = torch.Generator().manual_seed(7)
    row_logits = [torch.randn(1, vocab, generator=gen) for _ in range(steps)]
    seeded = SamplingParams(temperature=0.9, top_p=top_p, seed=1234)
    alone = _run_steps(sampler, row_logits, [seeded], {0: 1234}, global_seed=0)[:, 0]

    others = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=1.3, top_k=5),
        SamplingParams(temperature=0.5, seed=99),
        SamplingParams(min_p=0.1, repetition_penalty=1.3),
    ]
    batch = others[:2] + [seeded] + others[2:]
    batch_logits = []
    for step_logits in row_logits:
        mixed = torch.randn(5, vocab, generator=gen)
        mixed[2] = step_logits[0]
        batch_logits.append(mixed)
    in_batch = _run_steps(sampler, batch_logits, batch, {2: 1234, 3: 99}, global_seed=1)
    assert in_batch[:, 2].tolist() == alone.tolist()

    # The generator really drives the row: another seed gives another sequence.
    other_seed = _run_steps(sampler, row_logits, [seeded], {0: 4321}, global_seed=0)[:, 0]
    assert other_seed.tolist() != alone.tolist()


def test_logprobs_are_raw_log_softmax_and_true_top_k() -> None:
    vocab, k = 30, 4
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(3, vocab, generator=gen).to(torch.bfloat16)
    # Row 0: logit of token t is t / 10 -> top ids 29, 28, 27, 26.
    logits[0] = (torch.arange(vocab, dtype=torch.float32) / 10).to(torch.bfloat16)
    params = [
        SamplingParams(temperature=0.0, logprobs=k, repetition_penalty=2.0),
        SamplingParams(temperature=1.0, logprobs=1, top_k=3, presence_penalty=1.0),
        SamplingParams(temperature=0.8),
    ]
    md = _metadata(params, vocab, prompt_ids=[[29], [1], []], output_ids=[[29], [2, 3], []])
    out = Sampler(TorchOps())(logits, md)
    assert out.logprobs is not None and out.logprob_token_ids is not None
    assert out.sampled_rank is not None
    assert out.logprobs.dtype == torch.float32 and out.logprobs.shape == (3, 1 + k)

    raw = torch.log_softmax(logits.float(), dim=1)
    sampled = out.sampled_token_ids
    assert out.logprob_token_ids[:, 0].tolist() == sampled.tolist()
    torch.testing.assert_close(out.logprobs[:, 0], raw.gather(1, sampled[:, None])[:, 0])
    # Repetition penalty moved row 0's argmax to 28, but logprobs stay on the raw logits.
    assert sampled[0].item() == 28 and out.sampled_rank[0].item() == 2
    assert out.logprob_token_ids[0, 1:].tolist() == [29, 28, 27, 26]
    row0 = logits[0].float().tolist()
    log_z = math.log(sum(math.exp(x) for x in row0))
    expected_lp = torch.tensor([row0[t] - log_z for t in (29, 28, 27, 26)])
    torch.testing.assert_close(out.logprobs[0, 1:], expected_lp)
    top = raw.topk(k, dim=1)
    assert out.logprob_token_ids[:, 1:].tolist() == top.indices.tolist()
    for row in range(3):
        better = (raw[row] > raw[row, sampled[row]]).sum().item()
        assert out.sampled_rank[row].item() >= better + 1


def test_logprobs_zero_and_none() -> None:
    logits = torch.randn(2, 10, generator=torch.Generator().manual_seed(4))
    out = Sampler(TorchOps())(logits, _metadata([SamplingParams(logprobs=0), SamplingParams()], 10))
    assert out.logprobs is not None and out.logprobs.shape == (2, 1)
    out = Sampler(TorchOps())(logits, _metadata([SamplingParams()] * 2, 10))
    assert out.logprobs is None and out.logprob_token_ids is None


def test_forward_does_not_modify_logits() -> None:
    logits = torch.randn(3, 20, generator=torch.Generator().manual_seed(6))
    before = logits.clone()
    params = [SamplingParams(top_p=0.5, top_k=3, min_p=0.1, repetition_penalty=1.5)] * 3
    Sampler(TorchOps())(
        logits, _metadata(params, 20, prompt_ids=[[1, 2]] * 3, output_ids=[[3]] * 3)
    )
    assert torch.equal(logits, before)


def test_top_k_without_top_p_does_not_sort(monkeypatch: pytest.MonkeyPatch) -> None:
    logits = torch.randn(4, 64, generator=torch.Generator().manual_seed(8))
    params = [SamplingParams(top_k=k, min_p=0.05) for k in (1, 7, -1, 20)]
    md = _metadata(params, 64)
    sorted_path = process_logits(
        logits, SamplingMetadata(**{**md.__dict__, "top_p": torch.ones(4)})
    )

    def no_sort(*args: object, **kwargs: object) -> None:
        raise AssertionError("full-vocabulary sort without top-p")

    monkeypatch.setattr(torch.Tensor, "sort", no_sort)
    monkeypatch.setattr(torch, "sort", no_sort)
    topk_path = process_logits(logits, md)
    assert [len(s) for s in _kept(topk_path)][:2] == [1, 7]
    torch.testing.assert_close(topk_path, sorted_path)


@pytest.mark.parametrize("method", ["exponential", "inverse_cdf"])
def test_random_sample_frequencies_and_seeds(method: str) -> None:
    """Both samplers (CUDA's exponential race, the CPU's inverse CDF) draw from probs exactly:
    frequencies within ~4 sigma, never a zero-probability token, and a seeded row repeats."""
    probs = torch.tensor([0.5, 0.0, 0.25, 0.125, 0.0, 0.125])
    n = 20_000
    torch.manual_seed(0)
    draws = random_sample(probs.expand(n, -1).contiguous(), {}, method)
    freq = torch.bincount(draws, minlength=6).float() / n
    assert freq[1].item() == 0.0 and freq[4].item() == 0.0
    assert (freq - probs).abs().max().item() < 0.015
    rows = probs.expand(3, -1).contiguous()
    first = [random_sample(rows, {1: torch.Generator().manual_seed(5)}, method)[1] for _ in "ab"]
    assert first[0].item() == first[1].item()


@pytest.mark.parametrize("vocab_size", [6, 255, 256, 257, 49_155])
def test_inverse_cdf_matches_one_cumulative_sum(vocab_size: int) -> None:
    """The two-level inverse CDF picks the token one float64 cumulative sum over the row picks
    (the textbook definition), for any u, with zero-probability tokens and whole zero blocks;
    and it never picks a token of probability 0, even at u -> 1."""
    g = torch.Generator().manual_seed(vocab_size)
    probs = torch.rand(64, vocab_size, generator=g) ** 4
    probs[probs < 0.05] = 0.0  # scattered zeros
    probs[:, vocab_size * 3 // 4] += 0.1  # no row without mass
    probs[:8, : vocab_size // 2] = 0.0  # rows whose first half (whole blocks) is empty
    probs[8:16, -1] = 0.0  # the last token of the row has no mass
    probs[16, :] = 0.0
    probs[16, vocab_size // 3] = 1.0  # one certain token
    probs = probs / probs.sum(dim=1, keepdim=True)
    u = torch.rand(64, dtype=torch.float64, generator=g)
    u[-4:] = torch.tensor([0.0, 0.5, 1 - 2**-53, 1 - 2**-40], dtype=torch.float64)
    cdf = probs.to(torch.float64).cumsum(dim=1)
    expected = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(1), right=True).squeeze(1)
    expected = expected.clamp(max=vocab_size - 1)
    got = inverse_cdf(probs, u)
    assert torch.equal(got, expected)
    assert (probs.gather(1, got.unsqueeze(1)) > 0).all()
