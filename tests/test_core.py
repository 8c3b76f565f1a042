"""Core units without torch: block pool, KV cache manager and scheduler with a fake runner."""

from __future__ import annotations

import random

import pytest

from tokenmill.core.block_pool import BlockHash, BlockPool, hash_block_tokens
from tokenmill.core.kv_cache_manager import KVCacheManager
from tokenmill.core.outputs import ModelRunnerOutput
from tokenmill.core.request import Request, RequestStatus
from tokenmill.core.scheduler import Scheduler, SchedulerConfig
from tokenmill.sampling_params import SamplingParams

EOS = 99


def make_req(rid: str, n_prompt: int, max_tokens: int = 8, **kw) -> Request:
    params = SamplingParams(max_tokens=max_tokens, **kw)
    return Request(rid, list(range(1, n_prompt + 1)), params, {EOS}, max_tokens)


def test_block_pool_refcounts_and_lru_order():
    pool = BlockPool(4, enable_caching=True)
    a = pool.get_new_blocks(3)
    pool.check_invariants()
    assert pool.num_free_blocks == 1
    key = hash_block_tokens(None, [1, 2, 3, 4])
    pool.cache_full_block(a[0], key)
    pool.touch([a[0]])
    assert a[0].ref_cnt == 2
    pool.free_blocks(reversed(a))
    pool.check_invariants()
    assert a[0].ref_cnt == 1 and pool.num_free_blocks == 3
    pool.free_blocks([a[0]])
    pool.check_invariants()
    # Free order: a[1], a[2] (written, nothing cached: reused before untouched memory; the one
    # freed last first), then the never-used block 3, then a[0] (cached content, LRU tail).
    order = [b.block_id for b in pool.get_new_blocks(4)]
    assert order == [a[1].block_id, a[2].block_id, 3, a[0].block_id]
    # Handing a cached block out again evicts it from the cache.
    assert pool.get_cached_block(key) is None
    pool.check_invariants()
    with pytest.raises(RuntimeError):
        pool.get_new_blocks(1)


def test_double_free_is_caught():
    pool = BlockPool(2)
    (b,) = pool.get_new_blocks(1)
    pool.free_blocks([b])
    with pytest.raises(RuntimeError):
        pool.free_blocks([b])


def test_kv_manager_allocates_exact_blocks_and_frees():
    kv = KVCacheManager(num_blocks=10, block_size=4)
    r = make_req("a", 9)
    blocks = kv.allocate_slots(r, 9)
    assert len(blocks) == 3  # ceil(9 / 4)
    r.num_computed_tokens = 9
    r.output_token_ids.append(5)
    assert len(kv.allocate_slots(r, 1)) == 3  # token 10 still fits in block 3
    r.num_computed_tokens = 10
    r.output_token_ids.extend([5, 5, 5])
    assert len(kv.allocate_slots(r, 3)) == 4
    assert kv.allocate_slots(make_req("b", 30), 30) is None  # 8 blocks > 6 free
    assert kv.num_free_blocks == 6
    kv.free(r)
    kv.block_pool.check_invariants()
    assert kv.num_free_blocks == 10


def test_prefix_cache_hits_shared_blocks():
    kv = KVCacheManager(num_blocks=10, block_size=4, enable_prefix_caching=True)
    a = make_req("a", 10)
    kv.allocate_slots(a, 10)
    b = make_req("b", 10)
    hits, n = kv.get_computed_blocks(b)
    assert n == 8 and [h.block_id for h in hits] == kv.get_block_ids("a")[:2]
    kv.allocate_slots(b, 2, hits)
    assert kv.get_block_ids("b")[:2] == kv.get_block_ids("a")[:2]
    assert hits[0].ref_cnt == 2
    kv.free(a)
    kv.free(b)
    kv.block_pool.check_invariants()
    assert kv.num_free_blocks == 10


class FakeRunner:
    """Returns token 7 for every sampling request, EOS when told to."""

    def __init__(self, eos_for: set[str] = frozenset()):
        self.eos_for = eos_for

    def execute(self, sched) -> ModelRunnerOutput:
        out = ModelRunnerOutput()
        for s in sched.scheduled:
            if s.samples:
                out.sampled[s.request_id] = [EOS if s.request_id in self.eos_for else 7]
        return out


def run_to_completion(sched: Scheduler, runner: FakeRunner, max_steps: int = 1000):
    steps = []
    for _ in range(max_steps):
        if not sched.has_unfinished_requests():
            break
        so = sched.schedule()
        assert so.total_num_scheduled_tokens <= sched.config.max_num_batched_tokens
        assert len(sched.running) <= sched.config.max_num_seqs
        steps.append(so)
        sched.update_from_output(so, runner.execute(so))
        sched.kv.block_pool.check_invariants()
    assert not sched.has_unfinished_requests()
    return steps


def test_chunked_prefill_and_decode_mix_within_budget():
    kv = KVCacheManager(64, 4)
    sched = Scheduler(
        SchedulerConfig(max_num_batched_tokens=10, max_num_seqs=4, max_model_len=128), kv
    )
    a, b = make_req("a", 3, max_tokens=5), make_req("b", 23, max_tokens=2)
    sched.add_request(a)
    sched.add_request(b)
    steps = run_to_completion(sched, FakeRunner())
    first = {s.request_id: s.num_scheduled_tokens for s in steps[0].scheduled}
    assert first == {"a": 3, "b": 7}  # b's prompt is chunked
    second = {s.request_id: s.num_scheduled_tokens for s in steps[1].scheduled}
    assert second == {"a": 1, "b": 9}  # a decodes while b keeps prefilling
    assert a.output_token_ids == [7] * 5 and a.finish_reason == "length"
    assert b.output_token_ids == [7] * 2
    assert kv.num_free_blocks == 64


def test_max_num_seqs_and_fcfs():
    kv = KVCacheManager(64, 4)
    sched = Scheduler(SchedulerConfig(100, max_num_seqs=2, max_model_len=64), kv)
    reqs = [make_req(f"r{i}", 4, max_tokens=3) for i in range(5)]
    for r in reqs:
        sched.add_request(r)
    so = sched.schedule()
    assert [s.request_id for s in so.scheduled] == ["r0", "r1"]
    run_to_completion(sched, FakeRunner())
    assert all(r.num_output_tokens == 3 for r in reqs)


def test_preemption_by_recompute_when_blocks_run_out():
    kv = KVCacheManager(num_blocks=6, block_size=4)
    sched = Scheduler(SchedulerConfig(64, 8, 64), kv)
    reqs = [make_req(f"r{i}", 6, max_tokens=10) for i in range(3)]
    for r in reqs:
        sched.add_request(r)
    steps = run_to_completion(sched, FakeRunner())
    assert sched.num_preemptions_total > 0
    assert any(so.preempted_req_ids for so in steps)
    # The newest request is the one preempted first.
    first = next(so for so in steps if so.preempted_req_ids)
    assert "r2" in first.preempted_req_ids
    assert all(r.num_output_tokens == 10 for r in reqs)
    assert kv.num_free_blocks == 6


def test_stop_rules_eos_min_tokens_stop_ids_ignore_eos():
    kv = KVCacheManager(64, 4)
    sched = Scheduler(SchedulerConfig(100, 8, 64), kv)
    eos = make_req("eos", 4, max_tokens=10)
    ign = make_req("ign", 4, max_tokens=4, ignore_eos=True)
    stop = make_req("stop", 4, max_tokens=10, stop_token_ids=[7])
    for r in (eos, ign, stop):
        sched.add_request(r)
    run_to_completion(sched, FakeRunner(eos_for={"eos", "ign"}))
    assert eos.output_token_ids == [EOS] and eos.finish_reason == "stop"
    assert ign.output_token_ids == [EOS] * 4 and ign.finish_reason == "length"
    assert stop.output_token_ids == [7] and stop.stop_reason == 7


def test_max_model_len_caps_generation():
    kv = KVCacheManager(64, 4)
    sched = Scheduler(SchedulerConfig(100, 8, max_model_len=10), kv)
    r = make_req("a", 8, max_tokens=50)
    sched.add_request(r)
    run_to_completion(sched, FakeRunner())
    assert r.num_tokens == 10 and r.finish_reason == "length"


def test_abort_frees_everything_at_once_in_any_state():
    kv = KVCacheManager(32, 4)
    sched = Scheduler(SchedulerConfig(8, 8, 64), kv)
    reqs = [make_req(f"r{i}", 12, max_tokens=20) for i in range(4)]
    for r in reqs:
        sched.add_request(r)
    so = sched.schedule()  # r0 fully, r1 partly (budget 8 -> chunk)
    sched.update_from_output(so, FakeRunner().execute(so))
    sched.abort_requests(["r0", "r1", "r3"])  # running, running, waiting
    kv.block_pool.check_invariants()
    assert {r.status for r in reqs[:2]} == {RequestStatus.FINISHED_ABORTED}
    assert sched.num_unfinished == 1
    run_to_completion(sched, FakeRunner())
    assert kv.num_free_blocks == 32


def test_randomized_workload_keeps_invariants():
    rng = random.Random(0)
    kv = KVCacheManager(num_blocks=12, block_size=4)
    sched = Scheduler(SchedulerConfig(16, 6, 48), kv)
    n = 0
    for _ in range(400):
        if rng.random() < 0.3:
            sched.add_request(make_req(f"q{n}", rng.randint(1, 30), max_tokens=rng.randint(1, 15)))
            n += 1
        if sched.requests and rng.random() < 0.05:
            sched.abort_requests([rng.choice(list(sched.requests))])
        so = sched.schedule()
        sched.update_from_output(so, FakeRunner().execute(so))
        kv.block_pool.check_invariants()
        used = sum(len(b) for b in kv.req_to_blocks.values())
        assert used + kv.num_free_blocks == 12
    run_to_completion(sched, FakeRunner())
    assert kv.num_free_blocks == 12


def test_prefix_keys_are_sha256_chains_verified_on_a_hit():
    first = hash_block_tokens(None, [1, 2, 3, 4])
    second = hash_block_tokens(first, [5, 6, 7, 8])
    import hashlib
    import struct

    expected = hashlib.sha256(first.digest + struct.pack("<4q", 5, 6, 7, 8)).digest()
    assert second.digest == expected and second.parent == first.digest
    assert hash_block_tokens(None, [1, 2, 3, 4], ("lora", 3)).digest != first.digest
    pool = BlockPool(2, enable_caching=True)
    (block,) = pool.get_new_blocks(1)
    pool.cache_full_block(block, second)
    assert pool.get_cached_block(hash_block_tokens(first, [5, 6, 7, 8])) is block
    # A key that collides on the digest but names other content is not a hit.
    forged = BlockHash(second.digest, first.digest, (9, 9, 9, 9))
    assert pool.get_cached_block(forged) is None
    pool.check_invariants()


def test_randomized_workload_with_prefix_caching_and_evictions():
    """Shared prefixes in a pool too small to keep them: hits, evictions and aborts, with the
    pool's invariants checked after every step and every block free at the end."""
    rng = random.Random(1)
    kv = KVCacheManager(num_blocks=16, block_size=4, enable_prefix_caching=True)
    sched = Scheduler(SchedulerConfig(24, 6, 64), kv)
    prefixes = [[rng.randrange(1, 50) for _ in range(rng.randint(4, 20))] for _ in range(4)]
    n = 0
    for _ in range(500):
        if rng.random() < 0.35:
            prompt = rng.choice(prefixes) + [rng.randrange(1, 50) for _ in range(rng.randint(0, 9))]
            params = SamplingParams(max_tokens=rng.randint(1, 12))
            sched.add_request(Request(f"q{n}", prompt, params, {EOS}, params.max_tokens))
            n += 1
        if sched.requests and rng.random() < 0.05:
            sched.abort_requests([rng.choice(list(sched.requests))])
        so = sched.schedule()
        sched.update_from_output(so, FakeRunner().execute(so))
        kv.block_pool.check_invariants()
        held = {b.block_id for blocks in kv.req_to_blocks.values() for b in blocks}
        assert len(held) + kv.num_free_blocks == 16  # shared blocks counted once
    run_to_completion(sched, FakeRunner())
    assert kv.num_free_blocks == 16
    assert kv.num_prefix_hit_tokens > 0  # the shared prefixes did hit


class PositionRunner:
    """Samples num_steps tokens per sampling request, each 10 + its output position (so a
    token says where it belongs); EOS at the output positions in `eos_at`."""

    def __init__(self, eos_at: dict[str, int] | None = None):
        self.eos_at = eos_at or {}

    def execute(self, sched) -> ModelRunnerOutput:
        out = ModelRunnerOutput()
        for s in sched.scheduled:
            if s.samples:
                n0 = s.request.num_output_tokens
                out.sampled[s.request_id] = [
                    EOS if self.eos_at.get(s.request_id) == n0 + j else 10 + n0 + j
                    for j in range(sched.num_steps)
                ]
        return out


def _run_rounds(sched: Scheduler, runner, reqs: list[Request]) -> list[int]:
    """Step to completion; every request still running after a step has exactly its last
    token left to compute. Returns each step's num_steps."""
    rounds = []
    while sched.has_unfinished_requests():
        so = sched.schedule()
        rounds.append(so.num_steps)
        if so.num_steps > 1:  # every request holds the KV slots of the whole round
            for s in so.scheduled:
                assert len(s.block_ids) * 4 >= s.num_computed_tokens + so.num_steps
        sched.update_from_output(so, runner.execute(so))
        sched.kv.block_pool.check_invariants()
        for r in reqs:
            if r.status == RequestStatus.RUNNING and r.output_token_ids:
                assert r.num_computed_tokens == r.num_tokens - 1
    return rounds


def test_multi_step_rounds_are_capped_by_max_tokens_and_context():
    kv = KVCacheManager(64, 4)
    sched = Scheduler(SchedulerConfig(100, 8, 64, num_scheduler_steps=4), kv)
    a, b = make_req("a", 5, max_tokens=10), make_req("b", 3, max_tokens=6)
    for r in (a, b):
        sched.add_request(r)
    # prefill (1 token each); then min(4, 9, 5) = 4; then b has 1 left: a single step; then a
    # alone: 4 more
    assert _run_rounds(sched, PositionRunner(), [a, b]) == [1, 4, 1, 4]
    assert a.output_token_ids == list(range(10, 20)) and a.finish_reason == "length"
    assert b.output_token_ids == list(range(10, 16)) and b.finish_reason == "length"
    assert kv.num_free_blocks == 64

    ctx = KVCacheManager(64, 4)
    sched = Scheduler(SchedulerConfig(100, 8, max_model_len=12, num_scheduler_steps=8), ctx)
    c = make_req("c", 6, max_tokens=50)
    sched.add_request(c)
    assert _run_rounds(sched, PositionRunner(), [c]) == [1, 5]  # the context ends at 12 tokens
    assert c.num_tokens == 12 and c.finish_reason == "length"


def test_multi_step_drops_tokens_after_a_stop_and_keeps_the_rest_going():
    kv = KVCacheManager(64, 4)
    sched = Scheduler(SchedulerConfig(100, 8, 64, num_scheduler_steps=4), kv)
    a = make_req("a", 4, max_tokens=12)
    b = make_req("b", 4, max_tokens=9, stop_token_ids=[16])
    c = make_req("c", 4, max_tokens=9)
    for r in (a, b, c):
        sched.add_request(r)
    rounds = _run_rounds(sched, PositionRunner(eos_at={"a": 2}), [a, b, c])
    assert rounds[:2] == [1, 4] and max(rounds) == 4
    assert a.output_token_ids == [10, 11, EOS] and a.finish_reason == "stop"
    assert b.output_token_ids == list(range(10, 17)) and b.stop_reason == 16
    assert c.output_token_ids == list(range(10, 19)) and c.finish_reason == "length"
    assert kv.num_free_blocks == 64


def test_multi_step_only_when_no_request_needs_the_host_between_tokens():
    def rounds_with(**kw) -> list[int]:
        kv = KVCacheManager(64, 4)
        sched = Scheduler(SchedulerConfig(100, 8, 64, num_scheduler_steps=4), kv)
        plain, other = make_req("plain", 4, max_tokens=9), make_req("x", 4, max_tokens=9, **kw)
        for r in (plain, other):
            sched.add_request(r)
        rounds = _run_rounds(sched, PositionRunner(), [plain, other])
        assert plain.output_token_ids == other.output_token_ids == list(range(10, 19))
        return rounds

    assert rounds_with() == [1, 4, 4]
    assert set(rounds_with(presence_penalty=0.5)) == {1}
    assert set(rounds_with(repetition_penalty=1.2)) == {1}
    assert set(rounds_with(logprobs=2)) == {1}
    assert rounds_with(min_tokens=3) == [1, 1, 1, 4, 2]  # multi-step once min_tokens is met
    with pytest.raises(ValueError, match="num_scheduler_steps"):
        SchedulerConfig(100, 8, 64, num_scheduler_steps=0)

    # a request waiting for a free sequence slot does not stop rounds; one that could be
    # admitted does (it is admitted at once)
    kv = KVCacheManager(64, 4)
    sched = Scheduler(SchedulerConfig(100, 1, 64, num_scheduler_steps=4), kv)
    a, b = make_req("a", 4, max_tokens=5), make_req("b", 4, max_tokens=5)
    for r in (a, b):
        sched.add_request(r)
    assert _run_rounds(sched, PositionRunner(), [a, b]) == [1, 4, 1, 4]
    sched = Scheduler(SchedulerConfig(100, 2, 64, num_scheduler_steps=4), KVCacheManager(64, 4))
    a, b = make_req("a", 4, max_tokens=9), make_req("b", 4, max_tokens=5)
    sched.add_request(a)
    so = sched.schedule()
    sched.update_from_output(so, PositionRunner().execute(so))
    sched.add_request(b)
    so = sched.schedule()
    assert so.num_steps == 1 and [s.request_id for s in so.scheduled] == ["a", "b"]
    sched.update_from_output(so, PositionRunner().execute(so))
    assert _run_rounds(sched, PositionRunner(), [a, b]) == [4, 3]
