"""ModelRunner: SchedulerOutput -> flat input tensors -> forward -> sample -> ModelRunnerOutput."""

from __future__ import annotations

import logging
from typing import Any, Protocol

import numpy as np
import torch

from tokenmill.core.outputs import (
    ModelRunnerOutput,
    SampleLogprobs,
    SchedulerOutput,
)
from tokenmill.core.request import Request
from tokenmill.models.base import CausalLM, KVCache
from tokenmill.sample.metadata import SamplingMetadata, TokenBitmasks
from tokenmill.sample.rejection import accept_greedy, rejection_sample
from tokenmill.sample.sampler import Sampler, build_sampling_metadata
from tokenmill.worker.batch import HostBatch, ModelInputs, plan_batch, to_host
from tokenmill.worker.graph_runner import (
    CudaGraph,
    DecodeGraphRunner,
    GraphFactory,
    capture_sizes,
)
from tokenmill.worker.kv_pool import KVPool
from tokenmill.worker.lora import LoRAManager
from tokenmill.worker.prompt_outputs import pool, prompt_logprobs


class OtherRanks(Protocol):
    """The other tensor-parallel ranks, as rank 0's runner drives them
    (`engine.tensor_parallel.TensorParallelWorkers`)."""

    def build_runner(self, *args: Any) -> None:
        """Each rank builds its ModelRunner from `ModelRunner`'s arguments after the model and
        the device (and captures its graphs alongside rank 0's)."""

    def step(self, batch: HostBatch, size: int | None) -> None:
        """Each rank runs `ModelRunner.forward(batch, size)` (all-reducing with rank 0's)."""


logger = logging.getLogger(__name__)


def _plain_greedy(req, p) -> bool:
    return (
        p.greedy
        and p.logprobs is None
        and not p.adjusts_logits
        and req.num_output_tokens >= p.min_tokens
    )


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
            prompt_logprobs(self.model, sched, inputs.order, hidden)
            if any(s.prompt_logprob_positions for s in sched.scheduled)
            else {}
        )
        pooled = (
            pool(sched, inputs.order, hidden)
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
