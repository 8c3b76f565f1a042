"""ModelRunner: SchedulerOutput -> flat input tensors -> forward -> sample -> ModelRunnerOutput."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from tokenmill.core.outputs import (
    ModelRunnerOutput,
    PooledChunk,
    PromptLogprobsChunk,
    SampleLogprobs,
    SchedulerOutput,
)
from tokenmill.core.request import Request
from tokenmill.layers.attention import AttentionBackend, AttentionMetadata
from tokenmill.models.base import CausalLM, KVCache
from tokenmill.sample.metadata import SamplingMetadata, TokenBitmasks
from tokenmill.sample.rejection import accept_greedy, rejection_sample
from tokenmill.sample.sampler import Sampler, build_sampling_metadata, compute_logprobs
from tokenmill.worker.graph_runner import (
    CudaGraph,
    DecodeGraphRunner,
    GraphFactory,
    capture_sizes,
)
from tokenmill.worker.kv_pool import KVPool
from tokenmill.worker.lora import LoRAManager


class OtherRanks(Protocol):
    """The other tensor-parallel ranks, as rank 0's runner drives them
    (`engine.tensor_parallel.TensorParallelWorkers`)."""

    def build_runner(self, *args: Any) -> None:
        """Each rank builds its ModelRunner from `ModelRunner`'s arguments after the model and
        the device (and captures its graphs alongside rank 0's)."""

    def step(self, batch: HostBatch, size: int | None) -> None:
        """Each rank runs `ModelRunner.forward(batch, size)` (all-reducing with rank 0's)."""


logger = logging.getLogger(__name__)

# Prompt logprobs are computed over at most this many logits at once ([rows, vocab] float32),
# so a long prefill chunk does not materialise its whole logits matrix.
PROMPT_LOGPROBS_SLICE_ELEMENTS = 1 << 24


@dataclass(frozen=True, slots=True)
class ModelInputs:
    input_ids: torch.Tensor  # [num_tokens] int64
    positions: torch.Tensor  # [num_tokens] int64
    attn: AttentionMetadata
    # [num_sampled] int64: rows of the hidden states to sample (a request with drafts: 1 + k)
    logits_indices: torch.Tensor
    sample_rows: list[int]  # indices into scheduler_output.scheduled of the sampling requests
    order: list[int]  # scheduler_output.scheduled indices in flat-batch order


@dataclass(frozen=True, slots=True)
class HostBatch:
    """One step's flat batch on the host (`plan_batch`): every index array in one int64
    buffer, and the sizes the attention metadata needs. Tensor-parallel ranks receive this
    (it pickles small) and each turns it into device tensors (`to_device`)."""

    # token ids, positions, slots, query starts, seq lens, block tables, logits rows
    flat: np.ndarray
    parts: tuple[int, ...]  # the length of each array in `flat`
    max_blocks: int
    max_query_len: int
    max_seq_len: int
    num_decode_tokens: int
    block_size: int
    query_lens: list[int]  # per attention row
    seq_lens: list[int]
    block_tables: list[list[int]]
    sample_rows: list[int]
    order: list[int]
    lora_rows: dict[int, list[int]]  # LoRA adapter id -> its requests' rows

    @property
    def num_tokens(self) -> int:
        return self.parts[0]

    def to_device(self, device: torch.device, backend: AttentionBackend) -> ModelInputs:
        """The step's tensors on `device` (one non-blocking copy) with `backend`'s metadata."""
        views = iter(_to_device(self.flat, device).split(list(self.parts)))
        input_ids, positions, slots, starts, seq_lens, tables, logits_rows = views
        common = AttentionMetadata(
            num_tokens=self.num_tokens,
            slot_mapping=slots,
            query_start_loc=starts.to(torch.int32),
            seq_lens=seq_lens.to(torch.int32),
            block_tables=tables.view(len(self.seq_lens), self.max_blocks).to(torch.int32),
            max_query_len=self.max_query_len,
            max_seq_len=self.max_seq_len,
            num_decode_tokens=self.num_decode_tokens,
            block_size=self.block_size,
            query_lens_host=self.query_lens,
            seq_lens_host=self.seq_lens,
            block_tables_host=self.block_tables,
        )
        return ModelInputs(
            input_ids=input_ids,
            positions=positions,
            attn=backend.build_metadata(common, device),
            logits_indices=logits_rows,
            sample_rows=self.sample_rows,
            order=self.order,
        )


def plan_batch(sched: SchedulerOutput, block_size: int) -> HostBatch:
    """The flat, unpadded batch of one step on the host (a pure function of the schedule).

    Single-query requests (decodes) are laid out first, then the multi-token chunks, so the
    attention backend can treat the two groups separately. A decode with draft tokens is laid
    out as one single-query row per token, each seeing the context up to itself (its block
    table repeated): the step stays a decode batch for every backend (and the CPU's C++ layer
    loop), and a draft attends to the drafts before it, whose K/V the step writes first. A
    sampling request has logits at its chunk's last position, and at the positions before it
    that verify its drafts.
    """
    order = sorted(
        range(len(sched.scheduled)),
        key=lambda i: (
            sched.scheduled[i].num_scheduled_tokens > 1 and not sched.scheduled[i].spec_token_ids
        ),
    )
    token_ids: list[int] = []
    # per attention row (a request, or one token of a decode with drafts)
    query_lens, seq_lens, block_tables = [], [], []
    sample_rows, logits_rows = [], []
    lora_rows: dict[int, list[int]] = {}
    for i in order:
        s = sched.scheduled[i]
        if s.request.lora_id is not None:
            first = len(token_ids)
            rows = range(first, first + s.num_scheduled_tokens)
            lora_rows.setdefault(s.request.lora_id, []).extend(rows)
        token_ids.extend(s.token_ids)
        table = list(s.block_ids)
        if s.spec_token_ids:
            query_lens.extend([1] * s.num_scheduled_tokens)
            seq_lens.extend(
                range(s.num_computed_tokens + 1, s.num_computed_tokens + s.num_scheduled_tokens + 1)
            )
            block_tables.extend([table] * s.num_scheduled_tokens)
        else:
            query_lens.append(s.num_scheduled_tokens)
            seq_lens.append(s.num_computed_tokens + s.num_scheduled_tokens)
            block_tables.append(table)
        if s.samples:
            sample_rows.append(i)
            logits_rows.extend(range(len(token_ids) - 1 - len(s.spec_token_ids), len(token_ids)))
    return plan_rows(
        token_ids,
        query_lens,
        seq_lens,
        block_tables,
        logits_rows,
        block_size,
        sample_rows,
        order,
        lora_rows,
    )


def plan_rows(
    token_ids: list[int],
    query_lens: list[int],
    seq_lens: list[int],
    block_tables: list[list[int]],
    logits_rows: list[int],
    block_size: int,
    sample_rows: list[int] | None = None,
    order: list[int] | None = None,
    lora_rows: dict[int, list[int]] | None = None,
) -> HostBatch:
    """A flat batch from its attention rows: row i computes the last `query_lens[i]` of its
    first `seq_lens[i]` positions (block table `block_tables[i]`), its tokens next in
    `token_ids`; single-query rows come first. `logits_rows` are the flat positions whose
    hidden states are sampled; the rest (`plan_batch`'s bookkeeping) is carried as given."""
    q = np.asarray(query_lens, dtype=np.int64)
    sl = np.asarray(seq_lens, dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(q)])
    # position of every new token: (seq_len - query_len) + offset within its chunk
    req_of_token = np.repeat(np.arange(len(q)), q)
    positions = (sl - q)[req_of_token] + (np.arange(starts[-1]) - starts[:-1][req_of_token])
    max_blocks = max(len(bt) for bt in block_tables)
    bt = np.zeros((len(q), max_blocks), dtype=np.int64)
    for i, row in enumerate(block_tables):
        bt[i, : len(row)] = row
    slot_mapping = bt[req_of_token, positions // block_size] * block_size + positions % block_size
    logits_indices = np.asarray(logits_rows, dtype=np.int64)
    parts = [
        np.asarray(token_ids, dtype=np.int64),
        positions,
        slot_mapping,
        starts,
        sl,
        bt.ravel(),
        logits_indices,
    ]
    return HostBatch(
        flat=np.concatenate(parts),
        parts=tuple(len(x) for x in parts),
        max_blocks=max_blocks,
        max_query_len=int(q.max()),
        max_seq_len=int(sl.max()),
        num_decode_tokens=int((q == 1).sum()),
        block_size=block_size,
        query_lens=query_lens,
        seq_lens=seq_lens,
        block_tables=block_tables,
        sample_rows=sample_rows or [],
        order=order or [],
        lora_rows=lora_rows or {},
    )


def prepare_inputs(
    sched: SchedulerOutput, block_size: int, device: torch.device, backend: AttentionBackend
) -> ModelInputs:
    """The step's inputs on `device` (`plan_batch`, then `HostBatch.to_device`): the common
    attention metadata, turned into `backend`'s own by its `build_metadata`."""
    return plan_batch(sched, block_size).to_device(device, backend)


def _to_device(host: np.ndarray, device: torch.device) -> torch.Tensor:
    """int64 host array -> a tensor on `device`: no copy on the CPU; on CUDA through pinned
    memory with a non-blocking copy (no host synchronisation)."""
    t = torch.from_numpy(host)
    if device.type != "cuda":
        return t
    return t.pin_memory().to(device, non_blocking=True)


def to_host(*tensors: torch.Tensor) -> list[list]:
    """The tensors as Python lists. On CUDA: non-blocking copies into pinned memory and one
    wait on an event (the step's only synchronisation; `tolist()` on device tensors would
    synchronise the stream once per tensor)."""
    if not tensors or tensors[0].device.type != "cuda":
        return [t.tolist() for t in tensors]
    pinned = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
    for dst, src in zip(pinned, tensors):
        dst.copy_(src, non_blocking=True)
    done = torch.cuda.Event()
    done.record()
    done.synchronize()
    return [p.tolist() for p in pinned]


def _plain_greedy(req, p) -> bool:
    return (
        p.greedy
        and p.logprobs is None
        and not p.adjusts_logits
        and req.num_output_tokens >= p.min_tokens
    )


@torch.inference_mode()
def profile_forward(
    model: CausalLM,
    num_tokens: int,
    num_sampled: int,
    block_size: int,
    kv_dtype: torch.dtype,
    device: torch.device,
    max_model_len: int,
    input_ids: torch.Tensor | None = None,
) -> int:
    """Run the largest step the scheduler can send (`num_tokens` prompt tokens, as sequences of
    at most `max_model_len`, then the float32 logits of `num_sampled` rows and a sort of them,
    as top-p sampling does) on a scratch KV pool just big enough. Returns its peak memory
    beyond what was allocated before and the scratch pool (CUDA; 0 on other devices, where
    nothing is measured). The tokens are `input_ids` when given (the calibration of exact
    channels), else zeros."""
    backend = model.attn_backend
    cfg = model.cfg
    seq = min(num_tokens, max_model_len)
    # a shorter remainder first: a 1-token sequence is a decode, and decodes come first
    lens = ([num_tokens % seq] if num_tokens % seq else []) + [seq] * (num_tokens // seq)
    per_seq = -(-seq // block_size)  # blocks per sequence
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    pool = KVPool(
        cfg.num_layers,
        backend.kv_cache_shape(len(lens) * per_seq, block_size, cfg.num_kv_heads, cfg.head_dim),
        kv_dtype,
        device,
    )
    positions = np.concatenate([np.arange(n) for n in lens])
    seq_of = np.repeat(np.arange(len(lens)), lens)
    tables = [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(len(lens))]
    starts = np.concatenate([[0], np.cumsum(lens)])
    common = AttentionMetadata(
        num_tokens=num_tokens,
        slot_mapping=torch.from_numpy(seq_of * per_seq * block_size + positions).to(device),
        query_start_loc=torch.from_numpy(starts.astype(np.int32)).to(device),
        seq_lens=torch.tensor(lens, dtype=torch.int32, device=device),
        block_tables=torch.tensor(tables, dtype=torch.int32, device=device),
        max_query_len=seq,
        max_seq_len=seq,
        num_decode_tokens=sum(1 for n in lens if n == 1),
        block_size=block_size,
        query_lens_host=lens,
        seq_lens_host=lens,
        block_tables_host=tables,
    )
    if input_ids is None:
        ids = torch.zeros(num_tokens, dtype=torch.int64, device=device)
    else:
        ids = input_ids.to(device=device, dtype=torch.int64)
        assert ids.shape == (num_tokens,), (ids.shape, num_tokens)
    hidden = model(
        ids,
        torch.from_numpy(positions).to(device),
        pool.caches,
        backend.build_metadata(common, device),
    )
    rows = hidden[-1:].expand(min(num_sampled, num_tokens), -1)
    model.compute_logits(rows).sort(dim=-1, descending=True)
    if not cuda:
        return 0
    torch.cuda.synchronize(device)
    return max(0, torch.cuda.max_memory_allocated(device) - before - pool.reserved_bytes)


class ModelRunner:
    """Owns the model, the KV cache tensors and per-request sampling state (generators).

    Attention and the fused ops run through the model's backend (`model.attn_backend`, chosen
    once at load), which also shapes the KV cache and builds each step's metadata.

    With `graphs` (on CUDA unless --enforce-eager; `graph_factory` overrides the graph kind,
    which tests use on the CPU) and a backend that supports them, pure-decode steps of up to
    `max_num_seqs` requests replay captured graphs (`worker/graph_runner.py`); prefill and
    mixed steps run eagerly.

    Under tensor parallelism this is rank 0's runner: `workers` (the other ranks' processes)
    build a runner of their own with the same arguments, and run every step's forward pass
    with it (`forward`); sampling, logprobs and pooling happen here only, on the replicated
    output head."""

    def __init__(
        self,
        model: CausalLM,
        num_blocks: int,
        block_size: int,
        kv_dtype: torch.dtype,
        device: torch.device,
        max_model_len: int = 0,
        max_num_seqs: int = 0,
        graphs: bool = False,
        graph_factory: GraphFactory | None = None,
        workers: OtherRanks | None = None,
    ) -> None:
        if workers is not None:  # the other ranks build theirs (and capture) alongside
            workers.build_runner(
                num_blocks, block_size, kv_dtype, max_model_len, max_num_seqs, graphs, graph_factory
            )
        self.workers = workers
        self.model = model
        self.device = device
        self.block_size = block_size
        cfg = model.cfg
        self.vocab_size = cfg.vocab_size
        self.attn_backend = model.attn_backend
        self.ops = self.attn_backend.ops
        shape = self.attn_backend.kv_cache_shape(
            num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim
        )
        self.kv_pool = KVPool(cfg.num_layers, shape, kv_dtype, device)
        self.kv_caches: list[KVCache] = self.kv_pool.caches
        self.sampler = Sampler(self.ops)
        self.generators: dict[str, torch.Generator] = {}
        slots = getattr(model, "lora_slots", None)
        # the adapters by id and their slots (a model built with LoRA slots)
        self.lora = None if slots is None else LoRAManager(model, slots, device)
        self.graphs: DecodeGraphRunner | None = None
        if (graphs or graph_factory is not None) and self.attn_backend.supports_graphs:
            self.graphs = DecodeGraphRunner(
                model,
                self.kv_caches,
                self.attn_backend,
                capture_sizes(max_num_seqs),
                -(-max_model_len // block_size),
                block_size,
                max_model_len,
                device,
                graph_factory or CudaGraph,
            )
            self.graphs.capture()

    def _generator(self, request_id: str, seed: int) -> torch.Generator:
        gen = self.generators.get(request_id)
        if gen is None:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(seed % (1 << 63))  # any int is a valid OpenAI seed
            self.generators[request_id] = gen
        return gen

    @torch.inference_mode()
    def execute(
        self, sched: SchedulerOutput, token_bitmasks: TokenBitmasks | None = None
    ) -> ModelRunnerOutput:
        """Run one step: forward, then sample the requests whose chunk ends at their last
        known token. `token_bitmasks` restricts the listed requests to the tokens their
        structured-output constraint allows (no fast path skips it)."""
        for rid in sched.finished_req_ids:
            self.generators.pop(rid, None)
        if sched.is_empty:
            return ModelRunnerOutput()
        batch = plan_batch(sched, self.block_size)
        size = self._graph_size(sched, batch)
        if sched.num_steps > 1:
            if size is None or self.workers is not None:
                raise RuntimeError(
                    "a multi-step round needs a captured decode graph of its size and one rank"
                )
            return self._execute_steps(sched, batch.to_device(self.device, self.attn_backend), size)
        inputs, out = self.forward(batch, size)
        if size is not None:
            return self._execute_graph(sched, inputs, out, token_bitmasks)
        hidden = out
        prompt_lps = (
            self._prompt_logprobs(sched, inputs.order, hidden)
            if any(s.prompt_logprob_positions for s in sched.scheduled)
            else {}
        )
        pooled = (
            self._pool(sched, inputs.order, hidden)
            if any(s.pool_positions for s in sched.scheduled)
            else {}
        )
        if not inputs.sample_rows:
            return ModelRunnerOutput(prompt_logprobs=prompt_lps, pooled=pooled)
        hidden = hidden[inputs.logits_indices]
        reqs = [sched.scheduled[i].request for i in inputs.sample_rows]
        drafts = [sched.scheduled[i].spec_token_ids for i in inputs.sample_rows]
        if any(drafts):
            greedy = all(_plain_greedy(r, r.sampling_params) for r in reqs)
            logits = self.model.compute_logits(hidden, float32=not greedy)
            out = self._verify(reqs, drafts, logits, token_bitmasks)
        elif all(_plain_greedy(r, r.sampling_params) for r in reqs):
            # Nothing to penalise or report: the sampler would reduce to an argmax (of the
            # masked logits), which the model-dtype logits give exactly (widening is exact).
            logits = self.model.compute_logits(hidden, float32=False)
            self._mask(reqs, logits, token_bitmasks)
            (tokens,) = to_host(self.ops.argmax(logits))
            out = ModelRunnerOutput(sampled={r.request_id: [t] for r, t in zip(reqs, tokens)})
        else:
            logits = self.model.compute_logits(hidden)
            self._mask(reqs, logits, token_bitmasks)
            out = self._sample(reqs, logits)
        out.prompt_logprobs = prompt_lps
        out.pooled = pooled
        return out

    def forward(
        self, batch: HostBatch, size: int | None
    ) -> tuple[ModelInputs, torch.Tensor | tuple[torch.Tensor, torch.Tensor]]:
        """One step's forward pass (on every tensor-parallel rank: the step goes to the other
        ranks first): its inputs on the device, and the hidden states, or with a graph `size`
        that graph's (logits, argmax) views. The model's LoRA slots get the batch's rows per
        adapter first."""
        if self.workers is not None:
            self.workers.step(batch, size)
        if self.lora is not None:
            self.lora.set_rows(batch.lora_rows)
        inputs = batch.to_device(self.device, self.attn_backend)
        if size is not None:
            return inputs, self.graphs.run(size, inputs.input_ids, inputs.positions, inputs.attn)
        return inputs, self.model(inputs.input_ids, inputs.positions, self.kv_caches, inputs.attn)

    def _verify(
        self,
        reqs: list[Request],
        drafts: list[tuple[int, ...]],
        logits: torch.Tensor,
        token_bitmasks: TokenBitmasks | None,
        argmax: torch.Tensor | None = None,
    ) -> ModelRunnerOutput:
        """Sample a step in which some requests carry draft tokens (`logits`: 1 + k rows per
        request, in order; float32 unless every request is plain greedy; `argmax`: theirs
        when known, before any mask): a greedy batch by the argmax of every row, checked on
        the host; otherwise the requests with drafts by rejection sampling
        (`sample/rejection.py`) and the others (penalties, logprobs, grammars) by the
        sampler, one row each."""
        counts = [1 + len(d) for d in drafts]
        row_reqs = [r for r, c in zip(reqs, counts) for _ in range(c)]
        self._mask(row_reqs, logits, token_bitmasks)
        if all(_plain_greedy(r, r.sampling_params) for r in reqs):
            if argmax is None or token_bitmasks is not None:
                argmax = self.ops.argmax(logits)
            (targets,) = to_host(argmax)
            tokens = accept_greedy(targets, drafts)
            return ModelRunnerOutput(sampled={r.request_id: t for r, t in zip(reqs, tokens)})
        logits = logits.float()
        first = np.cumsum(counts) - counts
        plain = [j for j, d in enumerate(drafts) if not d]
        out = ModelRunnerOutput()
        if plain:
            rows = torch.from_numpy(first[plain]).to(self.device)
            out = self._sample([reqs[j] for j in plain], logits[rows])
        spec = [j for j, d in enumerate(drafts) if d]
        rows = np.concatenate([np.arange(first[j], first[j] + counts[j]) for j in spec])
        spec_reqs = [reqs[j] for j in spec]
        spec_drafts = [drafts[j] for j in spec]
        num_accepted, final = rejection_sample(
            logits[torch.from_numpy(rows).to(self.device)],
            spec_drafts,
            self._sampling_metadata(spec_reqs),
            self.ops,
        )
        num_accepted, final = to_host(num_accepted, final)
        for r, d, n, t in zip(spec_reqs, spec_drafts, num_accepted, final):
            out.sampled[r.request_id] = [*d[:n], t]
        return out

    def _graph_size(self, sched: SchedulerOutput, batch: HostBatch) -> int | None:
        """The captured size this step replays, or None to run it eagerly."""
        if (
            self.graphs is None
            or batch.lora_rows  # the graphs hold no adapters
            or any(s.prompt_logprob_positions or s.pool_positions for s in sched.scheduled)
        ):
            return None
        # a decode with drafts is one attention row per token (plan_batch)
        return self.graphs.size_for(len(batch.seq_lens), batch.num_tokens, batch.max_blocks)

    def _execute_graph(
        self,
        sched: SchedulerOutput,
        inputs: ModelInputs,
        outputs: tuple[torch.Tensor, torch.Tensor],
        token_bitmasks: TokenBitmasks | None,
    ) -> ModelRunnerOutput:
        logits, greedy = outputs
        if not inputs.sample_rows:
            return ModelRunnerOutput()
        reqs = [sched.scheduled[i].request for i in inputs.sample_rows]
        drafts = [sched.scheduled[i].spec_token_ids for i in inputs.sample_rows]
        if any(drafts):  # the graph's buffers stay as they were: indexing copies
            rows = inputs.logits_indices
            return self._verify(reqs, drafts, logits[rows], token_bitmasks, greedy[rows])
        plain = all(_plain_greedy(r, r.sampling_params) for r in reqs)
        if plain and token_bitmasks is None:
            (tokens,) = to_host(greedy[inputs.logits_indices])
            return ModelRunnerOutput(sampled={r.request_id: [t] for r, t in zip(reqs, tokens)})
        logits = logits[inputs.logits_indices]  # a copy: the graph's buffer stays as it was
        self._mask(reqs, logits, token_bitmasks)
        if plain:  # the graph's argmax predates the mask
            (tokens,) = to_host(self.ops.argmax(logits))
            return ModelRunnerOutput(sampled={r.request_id: [t] for r, t in zip(reqs, tokens)})
        return self._sample(reqs, logits.float())

    def _execute_steps(
        self, sched: SchedulerOutput, inputs: ModelInputs, size: int
    ) -> ModelRunnerOutput:
        """A multi-step round (`SchedulerOutput.num_steps`): the graph replayed num_steps times,
        each step's sampled tokens the next one's inputs on the device, one copy to the host at
        the end. Every row is a decode that samples with nothing from the host in between (the
        scheduler's choice), so the tokens are those of num_steps single steps."""
        reqs = [sched.scheduled[i].request for i in inputs.sample_rows]
        if all(_plain_greedy(r, r.sampling_params) for r in reqs):

            def sample(logits: torch.Tensor, greedy: torch.Tensor) -> torch.Tensor:
                return greedy

        else:
            meta = self._sampling_metadata(reqs)

            def sample(logits: torch.Tensor, greedy: torch.Tensor) -> torch.Tensor:
                return self.sampler(logits.float(), meta).sampled_token_ids

        tokens = self.graphs.run_steps(
            size, sched.num_steps, inputs.input_ids, inputs.positions, inputs.attn, sample
        )
        (rows,) = to_host(tokens[:, inputs.logits_indices].T)
        return ModelRunnerOutput(sampled={r.request_id: row for r, row in zip(reqs, rows)})

    def _prompt_logprobs(
        self, sched: SchedulerOutput, order: list[int], hidden: torch.Tensor
    ) -> dict[str, PromptLogprobsChunk]:
        """Logprobs of the prompt tokens that this step's chunks predict (log_softmax of the
        float32 logits, no sampling transforms), in slices of rows to bound memory."""
        rows: list[np.ndarray] = []
        targets: list[int] = []
        wanted: list[tuple[str, int, int, int]] = []  # (request id, first position, rows, k)
        start = 0
        for i in order:  # flat-batch order: row offsets follow it
            s = sched.scheduled[i]
            span = s.prompt_logprob_positions
            if span:  # span starts at the chunk's first token
                rows.append(np.arange(start, start + len(span)))
                targets.extend(s.request.prompt_token_ids[span.start + 1 : span.stop + 1])
                wanted.append(
                    (s.request_id, span.start, len(span), s.request.sampling_params.prompt_logprobs)
                )
            start += s.num_scheduled_tokens
        k = max(w[3] for w in wanted)
        row_index = torch.from_numpy(np.concatenate(rows)).to(self.device)
        target_ids = torch.tensor(targets, dtype=torch.int64, device=self.device)
        step = max(1, PROMPT_LOGPROBS_SLICE_ELEMENTS // self.vocab_size)
        lps, ids, ranks = [], [], []
        for lo in range(0, len(targets), step):
            logits = self.model.compute_logits(hidden[row_index[lo : lo + step]])  # float32
            lp, tid, rank = compute_logprobs(
                torch.log_softmax(logits, dim=-1), target_ids[lo : lo + step], k
            )
            lps.append(lp)
            ids.append(tid)
            ranks.append(rank)
        all_lps = torch.cat(lps).tolist()
        all_ids = torch.cat(ids).tolist()
        all_ranks = torch.cat(ranks).tolist()
        result: dict[str, PromptLogprobsChunk] = {}
        pos = 0
        for rid, first_position, n, kr in wanted:
            result[rid] = PromptLogprobsChunk(
                first_position,
                [r[: 1 + kr] for r in all_ids[pos : pos + n]],
                [r[: 1 + kr] for r in all_lps[pos : pos + n]],
                all_ranks[pos : pos + n],
            )
            pos += n
        return result

    def _pool(
        self, sched: SchedulerOutput, order: list[int], hidden: torch.Tensor
    ) -> dict[str, PooledChunk]:
        """For each embedding request, the float32 sum of the hidden states of the positions
        it pools in this step (`ScheduledRequest.pool_positions`), copied to the CPU at once."""
        spans: list[tuple[str, int, int, int]] = []  # (request id, first position, row, rows)
        start = 0
        for i in order:  # flat-batch order: row offsets follow it
            s = sched.scheduled[i]
            span = s.pool_positions
            if span:
                row = start + span.start - s.num_computed_tokens
                spans.append((s.request_id, span.start, row, len(span)))
            start += s.num_scheduled_tokens
        totals = torch.stack([hidden[row : row + n].float().sum(0) for _, _, row, n in spans])
        totals = totals.cpu()
        return {rid: PooledChunk(first, n, totals[j]) for j, (rid, first, _, n) in enumerate(spans)}

    def _mask(
        self, reqs: list[Request], logits: torch.Tensor, token_bitmasks: TokenBitmasks | None
    ) -> None:
        """Restrict, in place, the logits rows of requests with a structured-output constraint
        to the tokens it allows; every sampling path runs after this."""
        if token_bitmasks is None:
            return
        index = {rid: i for i, rid in enumerate(token_bitmasks.request_ids)}
        rows = [row for row, r in enumerate(reqs) if r.request_id in index]
        if not rows:
            return
        picked = [index[reqs[row].request_id] for row in rows]
        bitmask = token_bitmasks.bitmask
        if picked != list(range(len(bitmask))):
            bitmask = bitmask[picked]
        bitmask = bitmask.to(self.device, non_blocking=True)
        if len(rows) == len(reqs):
            self.ops.apply_token_bitmask_(logits, bitmask)
        else:
            self.ops.apply_token_bitmask_(logits, bitmask, torch.tensor(rows, device=self.device))

    def _sampling_metadata(self, reqs: list[Request]) -> SamplingMetadata:
        """The sampler's settings for `reqs` (one row each), with their seeded generators."""
        params = [r.sampling_params for r in reqs]
        generators = {
            row: self._generator(r.request_id, p.seed)
            for row, (r, p) in enumerate(zip(reqs, params))
            if p.seed is not None
        }
        min_tok_stops = [
            (set(r.eos_token_ids) | set(p.stop_token_ids))
            if r.num_output_tokens < p.min_tokens
            else set()
            for r, p in zip(reqs, params)
        ]
        return build_sampling_metadata(
            params,
            [r.prompt_token_ids for r in reqs],
            [r.output_token_ids for r in reqs],
            generators,
            self.vocab_size,
            self.device,
            min_tok_stops,
            [r.bad_words_token_ids for r in reqs],
        )

    def _sample(self, reqs: list[Request], logits: torch.Tensor) -> ModelRunnerOutput:
        out = self.sampler(logits, self._sampling_metadata(reqs))
        if out.logprobs is None:
            (tokens,) = to_host(out.sampled_token_ids)
        else:
            tokens, lps, ids, ranks = to_host(
                out.sampled_token_ids, out.logprobs, out.logprob_token_ids, out.sampled_rank
            )
        result = ModelRunnerOutput(sampled={r.request_id: [t] for r, t in zip(reqs, tokens)})
        if out.logprobs is not None:
            for row, r in enumerate(reqs):
                k = r.sampling_params.logprobs
                if k is None:
                    continue
                result.logprobs[r.request_id] = SampleLogprobs(
                    ids[row][: 1 + k], lps[row][: 1 + k], ranks[row]
                )
        return result
