"""LLMEngine: add_request / abort_request / step over the scheduler and the model runner."""

from __future__ import annotations

import functools
import itertools
import logging
import time
from dataclasses import dataclass

import torch

from tokenmill.config import EngineArgs
from tokenmill.core.outputs import PooledChunk, PromptLogprobsChunk, SampleLogprobs
from tokenmill.core.request import RequestStatus
from tokenmill.engine.generation_defaults import sampling_defaults
from tokenmill.engine.grammar_queue import GrammarQueue, advance_grammar
from tokenmill.engine.lora_adapters import LoRAAdapters
from tokenmill.engine.output_processor import OutputProcessor
from tokenmill.engine.request_state import RequestBuilder, RequestState, SampleState
from tokenmill.engine.startup import (
    build_executors,
    calibrate,
    cuda_kv_budget,
    load_draft,
    load_target,
    log_startup,
    seconds_since_process_start,
)
from tokenmill.engine.structured_output import StructuredOutputManager
from tokenmill.engine.tokenizer import Tokenizer, load_tokenizer
from tokenmill.loader.load import ModelInfo
from tokenmill.loader.resolve import resolve_model
from tokenmill.lora_request import LoRARequest
from tokenmill.models.base import CausalLM
from tokenmill.outputs import EmbeddingRequestOutput, RequestOutput
from tokenmill.pooling_params import PoolingParams
from tokenmill.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineStats:
    """What the engine reports about its load (`LLMEngine.stats()`)."""

    num_running: int  # sequences in the running batch
    num_waiting: int  # sequences waiting to be scheduled
    kv_cache_usage: float  # fraction of KV blocks in use
    num_preemptions: int  # since start
    kv_cache_reserved_bytes: int
    kv_cache_resident_bytes: int  # pages of the pool the OS has committed
    prefix_cache_query_tokens: int  # prompt tokens looked up in the prefix cache
    prefix_cache_hit_tokens: int  # of which found cached
    spec_drafts: int  # speculative decoding: decodes of a sequence that carried drafts
    spec_draft_tokens: int  # draft tokens checked
    spec_accepted_tokens: int  # of which accepted


class LLMEngine:
    """Synchronous engine. Call `step()` until `has_unfinished_requests()` is False."""

    def __init__(self, args: EngineArgs) -> None:
        self.args = args
        args.apply_threads()
        torch.manual_seed(args.seed)
        # needed to load the model; create_engine_config resolves them the same way
        self.device = args.torch_device()
        self.dtype = args.torch_dtype(self.device)
        startup = {"imports and arguments": seconds_since_process_start()}
        draft = self._load(startup)
        self.scheduler, self.drafter, self.runner = build_executors(
            self.config,
            self.model,
            self.model_info.arch.vocab_size,
            self.device,
            self.workers,
            draft,
            startup,
        )
        self.startup_seconds = log_startup(startup)
        self._build_request_handling()
        for i, (name, path) in enumerate(args.lora_module_paths().items()):
            self.add_lora(LoRARequest(name, i + 1, path))

    def _load(self, startup: dict[str, float | None]) -> tuple[CausalLM, ModelInfo] | None:
        """Load the target model (and its tensor-parallel workers), the tokenizer and the draft
        model, resolve the EngineConfig and calibrate the exact channels; time each part into
        `startup`. Returns the draft as load_draft gives it (None without one)."""
        args = self.args
        source = resolve_model(args.model, allow_no_weights=args.load_format == "dummy")
        self.workers, self.model, self.model_info = load_target(
            args, source, self.device, self.dtype
        )
        info = self.model_info
        startup.update(info.load_seconds)
        t1 = time.perf_counter()
        self.tokenizer: Tokenizer = load_tokenizer(info, args.chat_template)
        # the model's recommended settings, for requests that leave them out (the server's)
        self.default_sampling = sampling_defaults(args.generation_config, info)
        startup["tokenizer"] = time.perf_counter() - t1
        t1 = time.perf_counter()
        draft = load_draft(args, self.dtype, self.device, info.arch.vocab_size)
        if draft is not None:
            startup["draft model"] = time.perf_counter() - t1
        self.config = config = args.create_engine_config(
            info,
            functools.partial(cuda_kv_budget, args, self.model, self.device, self.workers),
            self.model.attn_backend.supports_graphs,
            None if draft is None else draft[1].arch,
        )
        cache, max_len = config.cache, config.model.max_model_len
        seconds = calibrate(self.model, cache, self.device, max_len, args.exact_channels)
        if seconds is not None:
            startup["exact channels"] = seconds
        return draft

    def _build_request_handling(self) -> None:
        """What turns requests into scheduler work and outputs back into results: the request
        table, the request builder, the output processor, grammars, LoRA adapters."""
        config, info = self.config, self.model_info
        max_len = config.model.max_model_len
        self.groups: dict[str, RequestState] = {}
        self._child_to_group: dict[str, SampleState] = {}
        self._ids = itertools.count()
        self.requests = RequestBuilder(
            self.tokenizer,
            info.arch.vocab_size,
            max_len,
            config.scheduler.max_num_seqs,
            config.model.pooling_type,
        )
        self.outputs = OutputProcessor(self.tokenizer)
        self.structured_outputs = StructuredOutputManager(self.tokenizer, info.arch.vocab_size)
        self.grammars = GrammarQueue(self.structured_outputs)
        self.lora_adapters = LoRAAdapters(
            self.model, self.runner.lora, self.workers, self.args.max_lora_rank
        )

    @property
    def max_model_len(self) -> int:
        """The longest sequence (prompt + output) a request may reach."""
        return self.config.model.max_model_len

    @property
    def kv_capacity_tokens(self) -> int:
        """Tokens the KV cache holds."""
        return self.config.cache.capacity_tokens

    @property
    def kv_cache_bytes(self) -> int:
        """Bytes the KV cache reserves."""
        return self.config.cache.reserved_bytes

    def close(self) -> None:
        """Stop the tensor-parallel ranks' processes, if any (they also stop when this
        process exits)."""
        if self.workers is not None:
            self.workers.close()

    # ---- LoRA adapters ------------------------------------------------------------------------
    def add_lora(self, lora_request: LoRARequest) -> int:
        """Load adapter `lora_request` (a PEFT folder) for this model, once per id; returns its
        id. ValueError (ModelLoadError) for an engine without LoRA, an id already taken by
        another adapter, or an adapter that does not fit the model (the message names what)."""
        return self.lora_adapters.add(lora_request)

    def remove_lora(self, lora_int_id: int) -> None:
        """Forget adapter `lora_int_id`; ValueError while a request runs or waits with it (or
        for an unknown id)."""
        users = [s for s in self._child_to_group.values() if s.request.lora_id == lora_int_id]
        self.lora_adapters.remove(lora_int_id, len(users))

    def list_loras(self) -> list[LoRARequest]:
        """The adapters loaded so far, by id."""
        return self.lora_adapters.list()

    # ---- requests ---------------------------------------------------------------------------
    def new_request_id(self) -> str:
        return f"req-{next(self._ids)}"

    def encode_prompt(self, prompt: str | list[int]) -> tuple[str | None, list[int]]:
        """(text or None, token ids) of a text prompt or a list of token ids; ValueError for an
        empty prompt or ids outside the vocabulary."""
        return self.requests.encode_prompt(prompt)

    def add_request(
        self,
        request_id: str | None,
        prompt: str | list[int],
        params: SamplingParams | PoolingParams | None = None,
        prompt_token_ids: list[int] | None = None,
        final_only: bool = False,
        lora_request: LoRARequest | None = None,
    ) -> str:
        """Validate, tokenize and queue a request (n samples). Raises ValueError on bad input,
        leaving the engine untouched. With `final_only`, `step` returns the request's output
        once, when it has finished (vLLM's RequestOutputKind.FINAL_ONLY, as its offline LLM
        uses): no output object per step, whose copies of the token ids grow with the output,
        and, without stop strings, the text decoded once at the end.

        With PoolingParams it is an embedding request: the prompt runs once, nothing is
        generated, and `step` returns one EmbeddingRequestOutput when it has finished.

        With `lora_request`, the request runs with that LoRA adapter (loaded on first use,
        `add_lora`)."""
        params = params or SamplingParams()
        lora_id = None if lora_request is None else self.add_lora(lora_request)
        request_id = request_id or self.new_request_id()
        if request_id in self.groups:
            raise ValueError(f"request id {request_id!r} is already in use")
        if prompt_token_ids is not None:
            text, ids = (prompt if isinstance(prompt, str) else None), list(prompt_token_ids)
        else:
            text, ids = self.encode_prompt(prompt)
        if not ids:
            raise ValueError("prompt is empty (no tokens)")
        if isinstance(params, PoolingParams):
            self._add_group(self.requests.pooling(request_id, text, ids, params, lora_id))
            return request_id
        group = self.requests.generation(request_id, text, ids, params, final_only, lora_id)
        if params.structured_outputs is not None:
            # GrammarError (a ValueError) here for a constraint that cannot be translated
            group.grammar = self.structured_outputs.submit(params.structured_outputs)
            if group.grammar.done() and group.grammar.exception() is not None:
                raise group.grammar.exception()  # known not to compile (cached)
        self._add_group(group)
        return request_id

    def _add_group(self, group: RequestState) -> None:
        """Register a validated request and queue its samples (or its grammar's compilation)."""
        self.groups[group.request_id] = group
        for s in group.samples:
            self._child_to_group[s.request.request_id] = s
        if group.grammar is None:
            self._schedule_group(group)
        else:
            self.grammars.add(group)
            self._admit_compiled()

    def _schedule_group(self, group: RequestState) -> None:
        for s in group.samples:
            self.scheduler.add_request(s.request)

    def _admit_compiled(self) -> list[RequestState]:
        """Schedule the requests whose grammar is compiled now; return those whose grammar
        does not compile (to be reported). Never waits."""
        ready, failed = self.grammars.admit()
        for group in ready:
            self._schedule_group(group)
        return failed

    def abort_request(self, request_ids: str | list[str]) -> None:
        """Abort requests (by the id given to add_request); their KV blocks are freed now."""
        for rid in [request_ids] if isinstance(request_ids, str) else request_ids:
            group = self.groups.pop(rid, None)
            if group is None:
                continue
            self.grammars.discard(rid)
            child_ids = [s.request.request_id for s in group.samples]
            self.scheduler.abort_requests(child_ids)
            for cid in child_ids:
                self._child_to_group.pop(cid, None)

    def has_unfinished_requests(self) -> bool:
        return bool(self.groups)

    def unfinished_request_ids(self) -> list[str]:
        """The ids (as given to add_request) of every request not finished yet."""
        return list(self.groups)

    def queued_request_ids(self) -> list[str]:
        """Unfinished requests none of whose samples has started computing."""
        return [
            rid
            for rid, g in self.groups.items()
            if all(s.request.num_computed_tokens == 0 for s in g.samples)
        ]

    @property
    def num_waiting_sequences(self) -> int:
        """Sequences (each of a request's n samples counts) waiting to be scheduled (or for
        their grammar)."""
        return len(self.scheduler.waiting) + self.grammars.num_sequences

    def stats(self) -> EngineStats:
        """A snapshot for metrics (safe to call from another thread: it only reads sizes)."""
        sched = self.scheduler
        return EngineStats(
            num_running=len(sched.running),
            num_waiting=self.num_waiting_sequences,
            kv_cache_usage=sched.kv.usage,
            num_preemptions=sched.num_preemptions_total,
            kv_cache_reserved_bytes=self.runner.kv_pool.reserved_bytes,
            kv_cache_resident_bytes=self.runner.kv_pool.resident_bytes(),
            prefix_cache_query_tokens=sched.kv.num_prefix_query_tokens,
            prefix_cache_hit_tokens=sched.kv.num_prefix_hit_tokens,
            spec_drafts=sched.num_spec_drafts_total,
            spec_draft_tokens=sched.num_spec_draft_tokens_total,
            spec_accepted_tokens=sched.num_spec_accepted_tokens_total,
        )

    # ---- stepping ---------------------------------------------------------------------------
    def step(self) -> list[RequestOutput | EmbeddingRequestOutput]:
        """Run one scheduler step and return outputs of the requests that changed (an
        embedding request's once, when it has finished)."""
        failed = self._admit_compiled()
        if not failed and self.grammars and not (self.scheduler.running or self.scheduler.waiting):
            # Nothing else to run: wait (briefly, so aborts stay prompt) for a grammar.
            self.grammars.wait(timeout=0.05)
            failed = self._admit_compiled()
        sched = self.scheduler.schedule()
        runner_out = self.runner.execute(
            sched, self.grammars.token_bitmasks(sched, self._child_to_group)
        )
        updated, finished = self.scheduler.update_from_output(sched, runner_out)
        if self.drafter is not None:
            # requests finished or preempted: their draft state goes with their blocks
            dropped = sched.preempted_req_ids | sched.finished_req_ids
            dropped |= {r.request_id for r in finished}
            guesses = self.drafter.propose(self.scheduler.draft_jobs(sched), dropped)
            self.scheduler.set_drafts(guesses)
        for rid, chunk in runner_out.prompt_logprobs.items():
            self._on_prompt_logprobs(rid, chunk)
        for rid, pooled in runner_out.pooled.items():
            self._on_pooled(rid, pooled)
        touched: dict[str, None] = dict.fromkeys(g.request_id for g in failed)  # ordered set
        for req, new_ids in updated:
            sample = self._child_to_group.get(req.request_id)
            if sample is None:
                continue
            self._on_tokens(sample, new_ids, runner_out.logprobs.get(req.request_id))
            if sample.matcher is not None:
                self._advance_grammar(sample, new_ids)
            touched[sample.group_id] = None
        for req in finished:
            sample = self._child_to_group.get(req.request_id)
            if sample is not None:
                sample.pending_text += sample.detok.flush()
                touched[sample.group_id] = None  # e.g. a prompt-scoring request: no new token
        outputs = []
        for gid in touched:
            group = self.groups.get(gid)
            if group is None or (group.final_only and not group.finished):
                continue
            outputs.append(self.outputs.make_output(group))
            if group.finished:
                del self.groups[gid]
                for s in group.samples:
                    self._child_to_group.pop(s.request.request_id, None)
        return outputs

    def _advance_grammar(self, sample: SampleState, new_ids: list[int]) -> None:
        """Feed accepted tokens to the sample's grammar; a complete grammar ends the output."""
        if advance_grammar(sample, new_ids):
            self.scheduler.finish_requests(
                [sample.request.request_id], RequestStatus.FINISHED_STOPPED
            )
            sample.pending_text += sample.detok.flush()

    def _on_prompt_logprobs(self, request_id: str, chunk: PromptLogprobsChunk) -> None:
        sample = self._child_to_group.get(request_id)
        group = self.groups.get(sample.group_id) if sample is not None else None
        if group is not None and group.prompt_logprobs is not None:
            self.outputs.add_prompt_logprobs(group, chunk)

    def _on_pooled(self, request_id: str, chunk: PooledChunk) -> None:
        sample = self._child_to_group.get(request_id)
        group = self.groups.get(sample.group_id) if sample is not None else None
        if group is not None and group.pooling is not None:
            self.outputs.add_pooled(group, chunk)

    def _on_tokens(
        self, sample: SampleState, new_ids: list[int], lp: SampleLogprobs | None
    ) -> None:
        """Hand a sample's new tokens to the output processor; end its request when a stop
        string completed in them."""
        if self.outputs.add_tokens(sample, new_ids, lp):
            self.scheduler.finish_requests(
                [sample.request.request_id], RequestStatus.FINISHED_STOPPED
            )
