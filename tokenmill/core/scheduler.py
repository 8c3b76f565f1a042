"""Scheduler: continuous batching with chunked prefill and preemption by recompute (FCFS)."""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterable

from tokenmill.config import SchedulerConfig
from tokenmill.core.kv_cache_manager import KVCacheManager
from tokenmill.core.outputs import DraftJob, ModelRunnerOutput, ScheduledRequest, SchedulerOutput
from tokenmill.core.request import Request, RequestStatus
from tokenmill.core.spec_decode import NgramProposer

logger = logging.getLogger(__name__)


class Scheduler:
    """Decides, each step, how many tokens of which requests to compute.

    Running requests are served first (in arrival order), then waiting ones, within the token
    budget and max_num_seqs. When blocks run out, the newest running request is preempted: its
    blocks are freed and it goes back to the front of the queue to be recomputed later.

    With num_scheduler_steps > 1, a step in which every running request decodes, no waiting
    request could be admitted and no request needs the host between its tokens runs several
    decode steps at once
    (`SchedulerOutput.num_steps`); tokens past a request's stop are discarded.

    With speculative decoding (`config.speculative`), a decoding request whose next tokens need
    nothing from the host in between also computes the draft tokens the proposer finds, within
    the token budget, its max_tokens and the context; the drafts the model rejects are rolled
    back (their KV slots are simply written again later). A draft model proposes after each
    step instead (`draft_jobs`, then `set_drafts`), and every request gets its guesses' KV
    slots ahead of time when blocks allow.
    """

    def __init__(self, config: SchedulerConfig, kv_cache_manager: KVCacheManager) -> None:
        self.config = config
        self.kv = kv_cache_manager
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self._finished_ids: set[str] = set()
        self.num_preemptions_total = 0
        spec = config.speculative
        self.proposer = (
            NgramProposer(spec.prompt_lookup_min, spec.prompt_lookup_max)
            if spec is not None and spec.method == "ngram"
            else None
        )
        draft_model = spec is not None and spec.method == "draft_model"
        # a draft model's guesses for each decoding request (set_drafts), and the KV slots
        # reserved past a step's tokens for the next guesses
        self._proposed: dict[str, tuple[int, ...]] = {}
        self._lookahead = spec.num_speculative_tokens if draft_model else 0
        # speculative decoding since start: decodes that carried drafts, drafts, accepted drafts
        self.num_spec_drafts_total = 0
        self.num_spec_draft_tokens_total = 0
        self.num_spec_accepted_tokens_total = 0

    # ---- queue management -------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"duplicate request id {request.request_id!r}")
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def finish_requests(self, request_ids: Iterable[str], status: RequestStatus) -> list[Request]:
        """Finish (or abort) requests wherever they are; their blocks are freed at once."""
        assert status.finished
        done = []
        for rid in request_ids:
            req = self.requests.pop(rid, None)
            if req is None:
                continue
            if req.status == RequestStatus.RUNNING:
                self.running.remove(req)
            else:
                self.waiting.remove(req)
            req.status = status
            self.kv.free(req)
            self._proposed.pop(rid, None)
            self._finished_ids.add(rid)
            done.append(req)
        return done

    def abort_requests(self, request_ids: Iterable[str]) -> list[Request]:
        return self.finish_requests(request_ids, RequestStatus.FINISHED_ABORTED)

    @property
    def num_unfinished(self) -> int:
        return len(self.requests)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    # ---- one step ---------------------------------------------------------------------
    def _preempt(self, req: Request) -> None:
        self.kv.free(req)
        self._proposed.pop(req.request_id, None)
        req.status = RequestStatus.PREEMPTED
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        self.num_preemptions_total += 1
        self.waiting.appendleft(req)
        logger.debug("preempted %s", req.request_id)

    def schedule(self) -> SchedulerOutput:
        multi = self._schedule_multi_step()
        if multi is not None:
            return multi
        budget = self.config.max_num_batched_tokens
        scheduled: list[ScheduledRequest] = []
        preempted: set[str] = set()

        idx = 0
        while idx < len(self.running) and budget > 0:
            req = self.running[idx]
            num_new = min(req.num_tokens - req.num_computed_tokens, budget)
            if num_new <= 0:
                idx += 1
                continue
            drafts = self._drafts(req, budget)
            while True:
                blocks = self._allocate(req, num_new + len(drafts))
                if blocks is not None:
                    break
                if drafts:  # drop the drafts before preempting anyone for them
                    drafts = ()
                    continue
                victim = self.running.pop()
                self._preempt(victim)
                preempted.add(victim.request_id)
                if victim is req:
                    break
            if blocks is None:
                break  # req itself was preempted; everything after it too
            scheduled.append(self._make_scheduled(req, num_new, blocks, drafts))
            budget -= num_new + len(drafts)
            idx += 1

        if not preempted:
            budget = self._schedule_waiting(budget, scheduled)

        finished = frozenset(self._finished_ids)
        self._finished_ids.clear()
        total = self.config.max_num_batched_tokens - budget
        return SchedulerOutput(tuple(scheduled), total, finished, frozenset(preempted))

    def _schedule_multi_step(self) -> SchedulerOutput | None:
        """A round of k > 1 decode steps for every running request, or None (a normal step).

        k is num_scheduler_steps, capped so that no request computes past its max_tokens or
        the context; each request gets the KV slots of all k steps now. Requests whose tokens
        the host must see one at a time (a grammar, penalties, logprobs, min_tokens still
        pending) keep the batch on single steps, as does a waiting request while a sequence slot
        is free (it is admitted now) and a step that cannot get the blocks. With every slot
        taken, a request that finishes in a round frees its slot at the round's end."""
        k = self.config.num_scheduler_steps
        if k == 1 or not self.running:
            return None
        if self.waiting and len(self.running) < self.config.max_num_seqs:
            return None  # a waiting request may be admitted now
        if len(self.running) > self.config.max_num_batched_tokens:
            return None
        for req in self.running:
            if req.num_tokens - req.num_computed_tokens != 1 or not _host_free(req):
                return None
            if req.lora_id is not None:  # adapters run eagerly (the graphs hold none)
                return None
            k = min(
                k,
                req.max_tokens - req.num_output_tokens,
                self.config.max_model_len - req.num_tokens,
            )
        if k <= 1:
            return None
        scheduled = []
        for req in self.running:
            blocks = self.kv.allocate_slots(req, k)
            if blocks is None:  # slots already given stay with their requests
                return None
            scheduled.append(self._make_scheduled(req, 1, blocks))
        finished = frozenset(self._finished_ids)
        self._finished_ids.clear()
        return SchedulerOutput(tuple(scheduled), len(scheduled), finished, num_steps=k)

    def _lora_fits(self, req: Request) -> bool:
        """Whether `req` may run now: at most max_loras distinct adapters run at once."""
        if req.lora_id is None:
            return True
        running = {r.lora_id for r in self.running if r.lora_id is not None}
        return req.lora_id in running or len(running) < self.config.max_loras

    def _schedule_waiting(self, budget: int, scheduled: list[ScheduledRequest]) -> int:
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            if not self._lora_fits(req):
                break  # first come, first served: it waits for an adapter to finish
            hits, num_hit_tokens = self.kv.get_computed_blocks(req)
            num_new = req.num_tokens - num_hit_tokens
            if num_new > budget:
                if not self.config.enable_chunked_prefill:
                    break
                num_new = budget
            blocks = self._allocate(req, num_new, hits)
            if blocks is None:
                break
            self.waiting.popleft()
            req.num_computed_tokens = num_hit_tokens
            if req.num_preemptions == 0:
                req.num_cached_tokens = num_hit_tokens
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            scheduled.append(self._make_scheduled(req, num_new, blocks))
            budget -= num_new
        return budget

    def _allocate(self, req: Request, num_new: int, hits: list | tuple = ()) -> list | None:
        """`kv.allocate_slots`, with a draft model's lookahead slots past the new tokens (within
        the context) when the blocks allow, else without them."""
        if self._lookahead:
            computed = req.num_computed_tokens + len(hits) * self.kv.block_size
            ahead = min(self._lookahead, self.config.max_model_len - computed - num_new)
            if ahead > 0:
                blocks = self.kv.allocate_slots(req, num_new, hits, ahead)
                if blocks is not None:
                    return blocks
        return self.kv.allocate_slots(req, num_new, hits)

    def _num_drafts(self, req: Request, budget: int) -> int:
        """How many draft tokens a running request may compute in a step: none unless
        speculative decoding is on, the request is decoding (one known token to compute, after
        its first output token) with nothing from the host between its tokens, and the batch
        is not over `disable_by_batch_size`; at most what the budget, its max_tokens and the
        context leave room for after the token it samples anyway."""
        spec = self.config.speculative
        if (
            spec is None
            or req.num_tokens - req.num_computed_tokens != 1
            or not req.output_token_ids
            or not _host_free(req)
        ):
            return 0
        if (
            spec.disable_by_batch_size is not None
            and len(self.running) > spec.disable_by_batch_size
        ):
            return 0
        return max(
            0,
            min(
                spec.num_speculative_tokens,
                budget - 1,
                req.max_tokens - req.num_output_tokens - 1,
                self.config.max_model_len - req.num_tokens - 1,
            ),
        )

    def _drafts(self, req: Request, budget: int) -> tuple[int, ...]:
        """The draft tokens a running request computes this step (`_num_drafts` of them at
        most): the n-gram proposer's, or the draft model's from after the last step."""
        k = self._num_drafts(req, budget)
        if k == 0:
            return ()
        if self.proposer is None:
            return self._proposed.get(req.request_id, ())[:k]
        return tuple(self.proposer.propose(req.prompt_token_ids + req.output_token_ids, k))

    def draft_jobs(self, sched: SchedulerOutput) -> list[DraftJob]:
        """A draft model's work after step `sched` (`update_from_output` applied): every request
        of the step that still runs, up to its last token when it is decoding (else up to what
        the step computed) and within its KV slots, with as many guesses as its next step may
        carry (the budget aside) and its slots hold."""
        jobs = []
        bs = self.kv.block_size
        for s in sched.scheduled:
            req = s.request
            if req.request_id not in self.requests or req.status != RequestStatus.RUNNING:
                continue
            if req.pooling is not None:  # an embedding request never decodes
                continue
            block_ids = tuple(self.kv.get_block_ids(req.request_id))
            room = len(block_ids) * bs
            decoding = req.num_tokens - req.num_computed_tokens == 1
            end = min(req.num_tokens if decoding else req.num_computed_tokens, room)
            k = self._num_drafts(req, self.config.max_num_batched_tokens)
            # the guesses' keys and values go to the slots after the last token's
            k = min(k, room - req.num_tokens + 1) if end == req.num_tokens else 0
            jobs.append(DraftJob(req, block_ids, s.num_computed_tokens, end, max(k, 0)))
        return jobs

    def set_drafts(self, drafts: dict[str, list[int]]) -> None:
        """A draft model's guesses (`draft_jobs`), each for its request's next step."""
        for rid, tokens in drafts.items():
            if rid in self.requests:
                self._proposed[rid] = tuple(tokens)

    @staticmethod
    def _make_scheduled(
        req: Request, num_new: int, blocks: list, drafts: tuple[int, ...] = ()
    ) -> ScheduledRequest:
        block_ids = tuple(b.block_id for b in blocks)
        return ScheduledRequest(
            req, req.num_computed_tokens, num_new + len(drafts), block_ids, drafts
        )

    def update_from_output(
        self, scheduler_output: SchedulerOutput, runner_output: ModelRunnerOutput
    ) -> tuple[list[tuple[Request, list[int]]], list[Request]]:
        """Advance progress, append sampled tokens, apply stop rules.

        Returns (requests that got new tokens with those tokens, requests that finished).
        """
        updated: list[tuple[Request, list[int]]] = []
        finished: list[Request] = []
        for sched in scheduler_output.scheduled:
            req = sched.request
            if req.is_finished or req.request_id not in self.requests:
                continue  # aborted while the step ran
            if req.status != RequestStatus.RUNNING:
                continue  # preempted in this step's scheduling
            req.num_computed_tokens += sched.num_scheduled_tokens - len(sched.spec_token_ids)
            tokens = runner_output.sampled.get(req.request_id)
            if tokens is None:
                if req.max_tokens == 0 and req.num_computed_tokens >= req.num_tokens:
                    # a prompt-scoring request (max_tokens 0) is done once its prompt is
                    self.finish_requests([req.request_id], RequestStatus.FINISHED_LENGTH_CAPPED)
                    finished.append(req)
                continue
            if sched.spec_token_ids:
                self.num_spec_drafts_total += 1
                self.num_spec_draft_tokens_total += len(sched.spec_token_ids)
                self.num_spec_accepted_tokens_total += len(tokens) - 1
            accepted: list[int] = []
            status = None
            # several in a multi-step round or after accepted drafts: the rest of a stop is dropped
            for token in tokens:
                req.output_token_ids.append(token)
                accepted.append(token)
                status = self._check_stop(req, token)
                if status is not None:
                    break
            # every accepted token but the last was also an input of the step (a draft) or round
            req.num_computed_tokens += len(accepted) - 1
            updated.append((req, accepted))
            if status is not None:
                self.finish_requests([req.request_id], status)
                finished.append(req)
        return updated, finished

    def _check_stop(self, req: Request, token: int) -> RequestStatus | None:
        params = req.sampling_params
        if req.num_output_tokens >= params.min_tokens:
            if token in params.stop_token_ids:
                req.stop_reason = token
                return RequestStatus.FINISHED_STOPPED
            if not params.ignore_eos and token in req.eos_token_ids:
                return RequestStatus.FINISHED_STOPPED
        if req.num_output_tokens >= req.max_tokens or req.num_tokens >= self.config.max_model_len:
            return RequestStatus.FINISHED_LENGTH_CAPPED
        return None


def _host_free(req: Request) -> bool:
    """True when the request's next tokens can be sampled on the device with nothing from the
    host in between: no grammar mask, no penalties or logit bias, no logprobs to report,
    and min_tokens reached (its mask changes with the count)."""
    p = req.sampling_params
    return (
        p.structured_outputs is None
        and p.logprobs is None
        and not p.adjusts_logits
        and req.num_output_tokens >= p.min_tokens
    )
