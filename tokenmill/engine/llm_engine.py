"""LLMEngine: add_request / abort_request / step over the scheduler and the model runner."""

from __future__ import annotations

import concurrent.futures
import itertools
import logging
import os
import time
from dataclasses import dataclass, field

import torch

from tokenmill.config import EngineArgs, GiB, ModelConfig, SpeculativeConfig
from tokenmill.core.kv_cache_manager import KVCacheManager
from tokenmill.core.outputs import PooledChunk, PromptLogprobsChunk, SampleLogprobs
from tokenmill.core.request import Request, RequestStatus
from tokenmill.core.scheduler import Scheduler
from tokenmill.engine.detokenizer import IncrementalDetokenizer
from tokenmill.engine.structured_output import Matcher, StructuredOutputManager
from tokenmill.engine.tensor_parallel import profile_budget, start_ranks
from tokenmill.engine.tokenizer import Tokenizer, load_tokenizer
from tokenmill.layers.lora import LoRASlots
from tokenmill.loader.load import ModelInfo, load_model
from tokenmill.loader.lora import load_lora_adapter
from tokenmill.loader.resolve import resolve_model
from tokenmill.lora_request import LoRARequest
from tokenmill.models.base import CausalLM
from tokenmill.outputs import (
    CompletionOutput,
    EmbeddingOutput,
    EmbeddingRequestOutput,
    Logprob,
    PromptLogprobList,
    RequestOutput,
)
from tokenmill.pooling_params import PoolingParams
from tokenmill.quant.gguf import calibrate_exact_channels
from tokenmill.sample.metadata import TokenBitmasks
from tokenmill.sampling_params import SamplingParams
from tokenmill.worker.draft import DraftProposer
from tokenmill.worker.model_runner import ModelRunner, profile_forward

logger = logging.getLogger(__name__)


_first_engine = [True]


def seconds_since_process_start() -> float | None:
    """For the first engine of a process: the wall time since the process started (Linux
    /proc), i.e. what the imports and argument handling before the engine took. None for later
    engines and elsewhere."""
    if not _first_engine[0]:
        return None
    _first_engine[0] = False
    try:
        start_ticks = int(open("/proc/self/stat").read().rsplit(")", 1)[1].split()[19])
        uptime = float(open("/proc/uptime").read().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None


@dataclass
class _Sample:
    """Engine-side state of one of a request's n samples (one core Request)."""

    group_id: str
    index: int
    request: Request
    detok: IncrementalDetokenizer
    logprobs: list[dict[int, Logprob]] | None
    cumulative_logprob: float = 0.0
    pending_text: str = ""
    pending_ids: list[int] = field(default_factory=list)
    matcher: Matcher | None = None  # structured output: the sample's place in its grammar


@dataclass
class _Group:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    samples: list[_Sample]
    # [None, then one entry per scored prompt position]; filled by the first sample's request
    prompt_logprobs: PromptLogprobList | None = None
    # structured output: the grammar being compiled; the samples wait outside the scheduler
    grammar: concurrent.futures.Future | None = None
    error: str | None = None  # why the request failed (its grammar did not compile)
    final_only: bool = False  # `step` returns its output only once it has finished
    # an embedding request: its parameters, and the sum of the hidden states pooled so far
    pooling: PoolingParams | None = None
    pooled: torch.Tensor | None = None
    pooled_positions: int = 0

    @property
    def finished(self) -> bool:
        return all(s.request.is_finished for s in self.samples)


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
        source = resolve_model(args.model, allow_no_weights=args.load_format == "dummy")
        t0 = time.perf_counter()
        self.workers = start_ranks(args, source, self.device, self.dtype)
        try:
            self.model, self.model_info = load_model(
                source,
                self.dtype,
                args.max_model_len,
                self.device,
                quantization=args.quantization,
                load_format=args.load_format,
                seed=args.seed,
                tp=self.workers.tp if self.workers else None,
                lora=LoRASlots(args.max_loras, args.max_lora_rank) if args.lora_enabled else None,
            )
        except Exception as e:
            if self.workers is not None:
                self.workers.loaded(f"{type(e).__name__}: {e}")
            raise
        if self.workers is not None:
            self.workers.loaded(None)
        info = self.model_info
        startup.update(info.load_seconds)
        t1 = time.perf_counter()
        self.tokenizer: Tokenizer = load_tokenizer(info)
        startup["tokenizer"] = time.perf_counter() - t1
        arch = info.arch
        logger.info(
            "loaded %s (%s, %s) in %.1fs (weights at %.2f GB/s); weights %.3f GB in memory "
            "(file %.3f GB), %s; %s; attention and fused ops: %s",
            source.name,
            arch.architecture,
            info.weight_format,
            time.perf_counter() - t0,
            info.load_throughput_gbs(),
            self.model.weight_memory_bytes() / 1e9,
            info.checkpoint_bytes / 1e9,
            f"native quantized kernels: {info.native_weights}"
            if info.native_weights
            else f"weights in {str(self.dtype).removeprefix('torch.')}",
            info.quant_reason,
            info.backend,
        )

        t1 = time.perf_counter()
        draft = self._load_draft()
        if draft is not None:
            startup["draft model"] = time.perf_counter() - t1
        self.config = config = args.create_engine_config(
            info,
            self._cuda_kv_budget,
            self.model.attn_backend.supports_graphs,
            None if draft is None else draft[1].arch,
        )
        cache, max_len = config.cache, config.model.max_model_len
        t1 = time.perf_counter()
        exact = calibrate_exact_channels(
            self.model,
            lambda ids: profile_forward(
                self.model,
                len(ids),
                0,
                cache.block_size,
                cache.torch_dtype(),
                self.device,
                max_len,
                ids,
            ),
            args.exact_channels,
        )
        if exact is not None:
            startup["exact channels"] = time.perf_counter() - t1
            logger.info(
                "exact channels: the %d largest input channels of each of %d quantized layers "
                "skip the 8-bit activation rounding (float32 columns, %.1f MB; found by a "
                "%d-token calibration forward in %.2f s)",
                exact.per_layer,
                exact.layers,
                exact.table_bytes / 1e6,
                exact.calibration_tokens,
                exact.seconds,
            )
        self.scheduler = Scheduler(
            config.scheduler,
            KVCacheManager(cache.num_blocks, cache.block_size, cache.enable_prefix_caching),
        )
        spec = config.scheduler.speculative
        if spec is not None:
            logger.info(
                "speculative decoding: %s, up to %d draft tokens per decode (%s)%s",
                spec.method,
                spec.num_speculative_tokens,
                f"n-grams of {spec.prompt_lookup_min}-{spec.prompt_lookup_max} tokens"
                if draft is None
                else f"greedy guesses of {draft[1].source.name}",
                ""
                if spec.disable_by_batch_size is None
                else f", none above {spec.disable_by_batch_size} running sequences",
            )
        # the draft model's pool mirrors the target's blocks (worker/draft.py)
        self.drafter = (
            None
            if draft is None
            else DraftProposer(
                draft[0],
                cache.num_blocks,
                cache.block_size,
                cache.torch_dtype(),
                self.device,
                min(draft[1].arch.max_position_embeddings, max_len),
                arch.vocab_size,
            )
        )
        t1 = time.perf_counter()
        self.runner = ModelRunner(
            self.model,
            cache.num_blocks,
            cache.block_size,
            cache.torch_dtype(),
            self.device,
            max_len,
            config.scheduler.max_num_seqs,
            graphs=config.cuda_graphs,
            workers=self.workers,
        )
        graphs = self.runner.graphs
        startup["KV pool"] = time.perf_counter() - t1 - (graphs.capture_seconds if graphs else 0)
        if graphs is not None:
            startup["graph capture"] = graphs.capture_seconds
        logger.info(
            "KV cache: %d blocks x %d tokens = %d tokens (%.2f GiB reserved, %.2f GiB resident: "
            "pages are committed as blocks are written; keys and values in %s); max "
            "concurrency at full context (%d tokens): %.1f",
            cache.num_blocks,
            cache.block_size,
            cache.capacity_tokens,
            cache.reserved_bytes / GiB,
            self.runner.kv_pool.resident_bytes() / GiB,
            cache.dtype,
            max_len,
            cache.capacity_tokens / max_len,
        )
        if startup["imports and arguments"] is None:
            del startup["imports and arguments"]
        logger.debug(
            "start-up breakdown: %s; total %.2f s",
            ", ".join(f"{k} {v:.2f} s" for k, v in startup.items()),
            sum(startup.values()),
        )
        self.startup_seconds = startup
        self.groups: dict[str, _Group] = {}
        self._child_to_group: dict[str, _Sample] = {}
        self._ids = itertools.count()
        self._token_text: dict[int, str] = {}  # token id -> its text alone (logprob entries)
        self.structured_outputs = StructuredOutputManager(self.tokenizer, arch.vocab_size)
        self._awaiting_grammar: dict[str, _Group] = {}  # request id -> group, in arrival order
        self.loras: dict[int, LoRARequest] = {}  # the adapters loaded so far, by id
        for i, (name, path) in enumerate(args.lora_module_paths().items()):
            self.add_lora(LoRARequest(name, i + 1, path))

    # ---- set-up ---------------------------------------------------------------------------
    def _load_draft(self) -> tuple[CausalLM, ModelInfo] | None:
        """The draft model of speculative decoding's draft_model method and its ModelInfo,
        loaded like the target (dtype, device; quantization unless the speculative config
        names its own); None without one."""
        args = self.args
        if args.speculative_config is None:
            return None
        spec = SpeculativeConfig.parse(args.speculative_config)
        if spec.model is None:
            return None
        model, info = load_model(
            resolve_model(spec.model),
            self.dtype,
            args.max_model_len,
            self.device,
            quantization=spec.quantization or args.quantization,
            seed=args.seed,
        )
        target = self.model_info.arch.vocab_size
        if info.arch.vocab_size != target:
            logger.warning(
                "the draft model's vocabulary has %d entries, the target's %d: guesses are "
                "limited to ids below %d",
                info.arch.vocab_size,
                target,
                min(target, info.arch.vocab_size),
            )
        logger.info(
            "draft model %s (%s, %s); weights %.3f GB in memory; %s",
            info.source.name,
            info.arch.architecture,
            info.weight_format,
            model.weight_memory_bytes() / 1e9,
            f"native quantized kernels: {info.native_weights}"
            if info.native_weights
            else f"weights in {str(self.dtype).removeprefix('torch.')}",
        )
        return model, info

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

    def _cuda_kv_budget(self, model: ModelConfig) -> float:
        """The KV budget on a GPU (`EngineArgs.create_engine_config`), with the peak of the
        largest step measured by a profile forward of the loaded model (on every
        tensor-parallel rank: the smallest rank's budget)."""
        args = self.args
        profile = (
            args.max_num_batched_tokens,
            args.max_num_seqs,
            args.block_size,
            getattr(torch, args.kv_cache_dtype_for(model.device, model.dtype)),
            model.max_model_len,
        )
        if self.workers is not None:
            self.workers.profile(*profile)
        budget = profile_budget(self.model, self.device, *profile)
        return budget if self.workers is None else self.workers.min_over_ranks(budget)

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
        if self.runner.lora is None:
            raise ValueError("LoRA adapters need an engine started with enable_lora=True")
        known = self.loras.get(lora_request.lora_int_id)
        if known is not None:
            if known != lora_request:
                raise ValueError(
                    f"lora_int_id {lora_request.lora_int_id} is already {known.lora_name!r} "
                    f"({known.lora_path})"
                )
            return lora_request.lora_int_id
        name, path = lora_request.lora_name, lora_request.lora_path
        max_rank = self.args.max_lora_rank
        adapter = load_lora_adapter(name, path, self.model, max_rank)
        if self.workers is not None:  # each rank keeps its part of every slot
            self.workers.add_lora(lora_request.lora_int_id, name, path, max_rank)
        self.runner.lora.add(lora_request.lora_int_id, adapter)
        self.loras[lora_request.lora_int_id] = lora_request
        logger.info(
            "LoRA adapter %r (id %d, rank %d, %d layers) from %s",
            lora_request.lora_name,
            lora_request.lora_int_id,
            adapter.rank,
            len(adapter.weights),
            lora_request.lora_path,
        )
        return lora_request.lora_int_id

    def remove_lora(self, lora_int_id: int) -> None:
        """Forget adapter `lora_int_id`; ValueError while a request runs or waits with it (or
        for an unknown id)."""
        if lora_int_id not in self.loras:
            raise ValueError(f"no LoRA adapter with id {lora_int_id}")
        users = [s for s in self._child_to_group.values() if s.request.lora_id == lora_int_id]
        if users:
            raise ValueError(
                f"LoRA adapter {self.loras[lora_int_id].lora_name!r} is in use by "
                f"{len(users)} unfinished sequence(s)"
            )
        if self.workers is not None:
            self.workers.remove_lora(lora_int_id)
        self.runner.lora.remove(lora_int_id)
        del self.loras[lora_int_id]

    def list_loras(self) -> list[LoRARequest]:
        """The adapters loaded so far, by id."""
        return [self.loras[i] for i in sorted(self.loras)]

    # ---- requests ---------------------------------------------------------------------------
    def new_request_id(self) -> str:
        return f"req-{next(self._ids)}"

    def encode_prompt(self, prompt: str | list[int]) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt is empty")
            return prompt, self.tokenizer.encode(prompt)
        ids = list(prompt)
        if not ids:
            raise ValueError("prompt is empty")
        vocab = self.model_info.arch.vocab_size
        bad = [t for t in ids if not isinstance(t, int) or not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token ids out of range [0, {vocab}): {bad[:5]}")
        return None, ids

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
            self._add_group(self._pooling_group(request_id, text, ids, params, lora_id))
            return request_id
        self._check_params_fit_model(params)
        # A prompt-scoring request (max_tokens 0) may fill the whole context.
        if len(ids) > self.max_model_len or (
            len(ids) == self.max_model_len and params.max_tokens != 0
        ):
            raise ValueError(
                f"prompt has {len(ids)} tokens, but the context is {self.max_model_len} tokens "
                "(it must leave room for at least one generated token)"
            )
        room = self.max_model_len - len(ids)
        max_tokens = room if params.max_tokens is None else min(params.max_tokens, room)
        eos = set() if params.ignore_eos else self.tokenizer.eos_token_ids
        children = (
            [params] if params.n == 1 else [params.clone_for_child(i) for i in range(params.n)]
        )
        for child in children[1:]:
            child.prompt_logprobs = None  # the prompt is scored once, by the first sample
        bad_words = self._bad_words_token_ids(params.bad_words)
        samples = []
        for i, p in enumerate(children):
            req = Request(
                f"{request_id}#{i}",
                ids,
                p,
                eos,
                max_tokens,
                time.monotonic(),
                bad_words,
                lora_id=lora_id,
            )
            detok = IncrementalDetokenizer(
                self.tokenizer,
                ids,
                p.skip_special_tokens,
                p.stop,
                p.include_stop_str_in_output,
                deferred=final_only and not p.stop,
            )
            samples.append(
                _Sample(request_id, i, req, detok, [] if p.logprobs is not None else None)
            )
        group = _Group(
            request_id,
            text,
            ids,
            samples,
            [None] if params.prompt_logprobs is not None else None,
            final_only=final_only,
        )
        if params.structured_outputs is not None:
            # GrammarError (a ValueError) here for a constraint that cannot be translated
            group.grammar = self.structured_outputs.submit(params.structured_outputs)
            if group.grammar.done() and group.grammar.exception() is not None:
                raise group.grammar.exception()  # known not to compile (cached)
        self._add_group(group)
        return request_id

    def _add_group(self, group: _Group) -> None:
        """Register a validated request and queue its samples (or its grammar's compilation)."""
        self.groups[group.request_id] = group
        for s in group.samples:
            self._child_to_group[s.request.request_id] = s
        if group.grammar is None:
            self._schedule_group(group)
        else:
            self._awaiting_grammar[group.request_id] = group
            self._admit_compiled()

    def _pooling_group(
        self,
        request_id: str,
        text: str | None,
        ids: list[int],
        params: PoolingParams,
        lora_id: int | None = None,
    ) -> _Group:
        """An embedding request: one sequence that computes its prompt (which may fill the
        whole context) and generates nothing (max_tokens 0); the runner pools its hidden
        states by the model's pooling type."""
        if len(ids) > self.max_model_len:
            raise ValueError(
                f"prompt has {len(ids)} tokens, but the context is {self.max_model_len} tokens"
            )
        req = Request(
            f"{request_id}#0",
            ids,
            SamplingParams(),
            (),
            0,
            time.monotonic(),
            pooling=self.config.model.pooling_type,
            lora_id=lora_id,
        )
        detok = IncrementalDetokenizer(self.tokenizer, ids, deferred=True)
        return _Group(
            request_id, text, ids, [_Sample(request_id, 0, req, detok, None)], pooling=params
        )

    def _schedule_group(self, group: _Group) -> None:
        for s in group.samples:
            self.scheduler.add_request(s.request)

    def _admit_compiled(self) -> list[_Group]:
        """Schedule the requests whose grammar is compiled now; fail those whose grammar does
        not compile (returned, to be reported). Never waits."""
        failed = []
        for rid, group in list(self._awaiting_grammar.items()):
            fut = group.grammar
            assert fut is not None
            if not fut.done():
                continue
            del self._awaiting_grammar[rid]
            error = fut.exception()
            if error is not None:
                group.error = str(error)
                for s in group.samples:
                    s.request.status = RequestStatus.FINISHED_ABORTED
                failed.append(group)
                continue
            for s in group.samples:
                s.matcher = self.structured_outputs.new_matcher(fut.result())
            self._schedule_group(group)
        return failed

    def _bad_words_token_ids(self, words: list[str] | None) -> tuple[tuple[int, ...], ...]:
        """Each bad word as the token sequences that spell it: as written (stripped on the
        left) and after a space, which byte-level and sentencepiece vocabularies spell apart."""
        seqs: dict[tuple[int, ...], None] = {}
        for word in words or []:
            for text in (word.lstrip(), " " + word.lstrip()):
                ids = tuple(self.tokenizer.encode(text, add_special_tokens=False))
                if ids:
                    seqs[ids] = None
        return tuple(seqs)

    def _check_params_fit_model(self, params: SamplingParams) -> None:
        """Limits that depend on the model: caught here so a bad value never reaches a step."""
        vocab = self.model_info.arch.vocab_size
        bad = [t for t in params.stop_token_ids if t >= vocab]
        if bad:
            raise ValueError(f"stop_token_ids out of range [0, {vocab}): {bad[:5]}")
        bad = [t for t in params.logit_bias or {} if t >= vocab]
        if bad:
            raise ValueError(f"logit_bias token ids out of range [0, {vocab}): {bad[:5]}")
        bad = [t for t in params.allowed_token_ids or [] if t >= vocab]
        if bad:
            raise ValueError(f"allowed_token_ids out of range [0, {vocab}): {bad[:5]}")
        if params.logprobs is not None and params.logprobs > vocab:
            raise ValueError(f"logprobs must be <= the vocabulary size ({vocab})")
        if params.prompt_logprobs is not None and params.prompt_logprobs > vocab:
            raise ValueError(f"prompt_logprobs must be <= the vocabulary size ({vocab})")
        max_num_seqs = self.config.scheduler.max_num_seqs
        if params.n > max_num_seqs:
            raise ValueError(f"n ({params.n}) exceeds max_num_seqs ({max_num_seqs})")

    def abort_request(self, request_ids: str | list[str]) -> None:
        """Abort requests (by the id given to add_request); their KV blocks are freed now."""
        for rid in [request_ids] if isinstance(request_ids, str) else request_ids:
            group = self.groups.pop(rid, None)
            if group is None:
                continue
            self._awaiting_grammar.pop(rid, None)
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
        return len(self.scheduler.waiting) + sum(
            len(g.samples) for g in self._awaiting_grammar.values()
        )

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
        if (
            not failed
            and self._awaiting_grammar
            and not (self.scheduler.running or self.scheduler.waiting)
        ):
            # Nothing else to run: wait (briefly, so aborts stay prompt) for a grammar.
            concurrent.futures.wait(
                [g.grammar for g in self._awaiting_grammar.values()],
                timeout=0.05,
                return_when=concurrent.futures.FIRST_COMPLETED,
            )
            failed = self._admit_compiled()
        sched = self.scheduler.schedule()
        runner_out = self.runner.execute(sched, self._token_bitmasks(sched))
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
            outputs.append(self._make_output(group))
            if group.finished:
                del self.groups[gid]
                for s in group.samples:
                    self._child_to_group.pop(s.request.request_id, None)
        return outputs

    def _token_bitmasks(self, sched) -> TokenBitmasks | None:
        """The masks of this step's sampling rows that carry a grammar (None if none does)."""
        rids, matchers = [], []
        for s in sched.scheduled:
            sample = self._child_to_group.get(s.request_id) if s.samples else None
            if sample is not None and sample.matcher is not None:
                rids.append(s.request_id)
                matchers.append(sample.matcher)
        if not matchers:
            return None
        return TokenBitmasks(rids, self.structured_outputs.fill_bitmask(matchers))

    def _advance_grammar(self, sample: _Sample, new_ids: list[int]) -> None:
        """Feed accepted tokens to the sample's grammar; a complete grammar ends the output
        (finish_reason "stop")."""
        req = sample.request
        matcher = sample.matcher
        assert matcher is not None
        for token in new_ids:
            if token in req.eos_token_ids and req.is_finished:
                break  # the end of the output (the grammar allowed it)
            if not matcher.accept(token):
                logger.error(
                    "%s: sampled token %d outside its grammar (%s); ending the request",
                    req.request_id,
                    token,
                    matcher.error,
                )
                break
        if (matcher.is_terminated or matcher.error) and not req.is_finished:
            self.scheduler.finish_requests([req.request_id], RequestStatus.FINISHED_STOPPED)
            sample.pending_text += sample.detok.flush()

    def _text_of(self, token_id: int) -> str:
        text = self._token_text.get(token_id)
        if text is None:
            text = self._token_text[token_id] = self.tokenizer.decode([token_id], False)
        return text

    def _logprob_entry(
        self, token_ids: list[int], logprobs: list[float], rank: int | None
    ) -> dict[int, Logprob]:
        """{token: Logprob} of one position: the chosen token first, then the top-k."""
        entry = {token_ids[0]: Logprob(logprobs[0], rank, self._text_of(token_ids[0]))}
        for r, (tid, val) in enumerate(zip(token_ids[1:], logprobs[1:]), start=1):
            entry.setdefault(tid, Logprob(val, r, self._text_of(tid)))
        return entry

    def _on_prompt_logprobs(self, request_id: str, chunk: PromptLogprobsChunk) -> None:
        sample = self._child_to_group.get(request_id)
        group = self.groups.get(sample.group_id) if sample is not None else None
        if group is None or group.prompt_logprobs is None:
            return
        plps = group.prompt_logprobs
        # Entry p + 1 holds position p's logprobs. Positions already held were recomputed after
        # a preemption: they are skipped, so each prompt token is reported exactly once.
        skip = len(plps) - 1 - chunk.first_position
        if skip < 0:
            raise RuntimeError(
                f"{request_id}: prompt logprobs from position "
                f"{chunk.first_position}, expected {len(plps) - 1}"
            )
        for ids, lps, rank in zip(
            chunk.token_ids[skip:], chunk.logprobs[skip:], chunk.ranks[skip:]
        ):
            plps.append(self._logprob_entry(ids, lps, rank))

    def _on_pooled(self, request_id: str, chunk: PooledChunk) -> None:
        """Add a step's pooled hidden states to the request's sum. A chunk from position 0
        starts the sum again: the prompt is being recomputed after a preemption."""
        sample = self._child_to_group.get(request_id)
        group = self.groups.get(sample.group_id) if sample is not None else None
        if group is None or group.pooling is None:
            return
        if group.pooled is None or chunk.first_position == 0:
            group.pooled, group.pooled_positions = chunk.total, chunk.num_positions
        else:
            group.pooled = group.pooled + chunk.total
            group.pooled_positions += chunk.num_positions

    def _embedding_output(self, group: _Group) -> EmbeddingRequestOutput:
        """The finished embedding request's vector: the pooled sum (a mean's divided by its
        count), unit-normalized if asked."""
        assert group.pooling is not None
        req = group.samples[0].request
        expected = req.num_prompt_tokens if req.pooling == "mean" else 1
        if group.pooled is None or group.pooled_positions != expected:
            raise RuntimeError(
                f"{group.request_id}: pooled {group.pooled_positions} positions, "
                f"expected {expected} ({req.pooling} pooling)"
            )
        vector = group.pooled / group.pooled_positions
        if group.pooling.normalize:
            vector = torch.nn.functional.normalize(vector, dim=0)
        return EmbeddingRequestOutput(
            group.request_id, group.prompt, group.prompt_token_ids, EmbeddingOutput(vector.tolist())
        )

    def _on_tokens(self, sample: _Sample, new_ids: list[int], lp: SampleLogprobs | None) -> None:
        """Detokenize a sample's new tokens (several after a multi-step round, fed one at a time:
        a stop string ends the output at the token that completes it, later ones are dropped)."""
        req = sample.request
        if lp is not None and sample.logprobs is not None:
            sample.logprobs.append(self._logprob_entry(lp.token_ids, lp.logprobs, lp.sampled_rank))
            sample.cumulative_logprob += lp.logprobs[0]
        detok, dropped = sample.detok, 0
        for i, token in enumerate(new_ids):
            sample.pending_text += detok.add_tokens([token])
            if detok.stop_reason is not None:
                dropped = len(new_ids) - 1 - i
                if dropped:
                    del req.output_token_ids[-dropped:]
                    new_ids = new_ids[: i + 1]
                break
        sample.pending_ids.extend(new_ids)
        if detok.stop_reason is not None and (dropped or not req.is_finished):
            req.stop_reason = detok.stop_reason
            if req.is_finished:  # by a dropped token of the round (eos, length): the string won
                req.status = RequestStatus.FINISHED_STOPPED
            else:
                self.scheduler.finish_requests([req.request_id], RequestStatus.FINISHED_STOPPED)

    def _make_output(self, group: _Group) -> RequestOutput | EmbeddingRequestOutput:
        if group.pooling is not None:
            return self._embedding_output(group)
        outs = []
        for s in group.samples:
            req = s.request
            outs.append(
                CompletionOutput(
                    index=s.index,
                    text=s.detok.text,
                    token_ids=list(req.output_token_ids),
                    cumulative_logprob=s.cumulative_logprob if s.logprobs is not None else None,
                    logprobs=list(s.logprobs) if s.logprobs is not None else None,
                    finish_reason=req.finish_reason,
                    stop_reason=req.stop_reason,
                    delta_text=s.pending_text,
                    delta_token_ids=s.pending_ids,
                )
            )
            s.pending_text, s.pending_ids = "", []
        return RequestOutput(
            group.request_id,
            group.prompt,
            group.prompt_token_ids,
            outs,
            group.finished,
            num_cached_tokens=group.samples[0].request.num_cached_tokens,
            prompt_logprobs=group.prompt_logprobs,
            error=group.error,
        )
