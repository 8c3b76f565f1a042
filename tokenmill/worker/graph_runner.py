"""Captured pure-decode steps: the model, the LM head and the greedy argmax replayed as graphs.

A decode step of n requests runs the graph captured for the smallest capture size >= n, over
persistent input buffers: the step's ids, positions, slots, context lengths and block tables
are copied in, and the padding rows past n get slot -1 (their K/V are written nowhere), no
queries and context length 0, so attention skips them. Outputs are the graph's own static
tensors: logits [size, vocab] in the model dtype and the argmax of each row.

The graph object is pluggable (`GraphFactory`): `CudaGraph` captures with
`torch.cuda.graph` into one memory pool shared by all sizes (captured largest first);
`EagerGraph` re-runs the captured function on the same static buffers, which lets CPU tests
prove that the padded static-buffer path gives the eager path's tokens. `run_steps` replays a
size several times with the sampled tokens fed back on the device (multi-step decoding).
Prefill and mixed steps never come here. Only an attention backend that reads everything from
device tensors and skips padding (`supports_graphs`) can be captured.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from tokenmill.layers.attention import AttentionBackend, AttentionMetadata

logger = logging.getLogger(__name__)

Outputs = tuple[torch.Tensor, torch.Tensor]  # (logits [size, vocab], argmax tokens [size])


class Graph(Protocol):
    def capture(self, fn: Callable[[], Outputs]) -> Outputs:
        """Run `fn` once under capture; its outputs become the graph's static outputs."""

    def replay(self) -> None:
        """Re-run the captured work on the current contents of the static inputs."""


class CudaGraph:
    """A CUDA graph in a memory pool shared with the other capture sizes."""

    def __init__(self, pool: Any) -> None:
        self.graph = torch.cuda.CUDAGraph()
        self.pool = pool

    def capture(self, fn: Callable[[], Outputs]) -> Outputs:
        with torch.cuda.graph(self.graph, pool=self.pool):
            return fn()

    def replay(self) -> None:
        self.graph.replay()


class EagerGraph:
    """Replays by calling the function again and copying into the first call's outputs."""

    def __init__(self, pool: Any = None) -> None:
        self.fn: Callable[[], Outputs] | None = None
        self.outputs: Outputs | None = None

    def capture(self, fn: Callable[[], Outputs]) -> Outputs:
        self.fn = fn
        self.outputs = fn()
        return self.outputs

    def replay(self) -> None:
        for static, new in zip(self.outputs, self.fn()):
            static.copy_(new)


GraphFactory = Callable[[Any], Graph]


def capture_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, 16, 24, 32, 48, 64, then every 32 up to max_num_seqs (always included)."""
    sizes = [s for s in (1, 2, 4, 8, 16, 24, 32, 48, 64) if s <= max_num_seqs]
    sizes += list(range(96, max_num_seqs + 1, 32))
    if sizes[-1] != max_num_seqs:
        sizes.append(max_num_seqs)
    return sizes


@dataclass
class _Static:
    """Persistent input buffers, sized for the largest capture."""

    input_ids: torch.Tensor  # [max_size] int64
    positions: torch.Tensor  # [max_size] int64
    slot_mapping: torch.Tensor  # [max_size] int64, -1 on padding rows
    seq_lens: torch.Tensor  # [max_size] int32, 0 on padding rows
    query_start_loc: torch.Tensor  # [max_size + 1] int32
    block_tables: torch.Tensor  # [max_size, max_blocks] int32


class DecodeGraphRunner:
    """Captures `model` decode steps at `sizes` and replays them for batches that fit."""

    def __init__(
        self,
        model: Any,
        kv_caches: list,
        backend: AttentionBackend,
        sizes: list[int],
        max_blocks: int,
        block_size: int,
        max_model_len: int,
        device: torch.device,
        graph_factory: GraphFactory,
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.backend = backend
        self.sizes = sorted(sizes)
        self.max_blocks = max_blocks
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.device = device
        self.graph_factory = graph_factory
        n = self.sizes[-1]
        self.static = _Static(
            input_ids=torch.zeros(n, dtype=torch.int64, device=device),
            positions=torch.zeros(n, dtype=torch.int64, device=device),
            slot_mapping=torch.full((n,), -1, dtype=torch.int64, device=device),
            seq_lens=torch.zeros(n, dtype=torch.int32, device=device),
            query_start_loc=torch.zeros(n + 1, dtype=torch.int32, device=device),
            block_tables=torch.zeros(n, max_blocks, dtype=torch.int32, device=device),
        )
        self.graphs: dict[int, Graph] = {}
        self.outputs: dict[int, Outputs] = {}
        self.capture_seconds = 0.0

    def _metadata(self, size: int) -> AttentionMetadata:
        s = self.static
        common = AttentionMetadata(
            num_tokens=size,
            slot_mapping=s.slot_mapping[:size],
            query_start_loc=s.query_start_loc[: size + 1],
            seq_lens=s.seq_lens[:size],
            block_tables=s.block_tables[:size],
            max_query_len=1,
            max_seq_len=self.max_model_len,
            num_decode_tokens=size,
            block_size=self.block_size,
            query_lens_host=[1] * size,
            seq_lens_host=[self.max_model_len] * size,
            block_tables_host=[],
        )
        return self.backend.build_metadata(common, self.device)

    def _step_fn(self, size: int) -> Callable[[], Outputs]:
        meta = self._metadata(size)
        s = self.static

        def step() -> Outputs:
            hidden = self.model(s.input_ids[:size], s.positions[:size], self.kv_caches, meta)
            logits = self.model.compute_logits(hidden, float32=False)
            return logits, self.backend.ops.argmax(logits)

        return step

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every size, largest first (smaller graphs reuse the pool's blocks); each is
        run once eagerly before capture (kernel compilation, allocator warm-up)."""
        t0 = time.perf_counter()
        self._reset_padding(0)
        pool = torch.cuda.graph_pool_handle() if self.device.type == "cuda" else None
        for size in reversed(self.sizes):
            fn = self._step_fn(size)
            fn()
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            graph = self.graph_factory(pool)
            self.outputs[size] = graph.capture(fn)
            self.graphs[size] = graph
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.capture_seconds = time.perf_counter() - t0
        logger.info(
            "captured decode graphs for batch sizes %s in %.1f s", self.sizes, self.capture_seconds
        )

    def _reset_padding(self, n: int) -> None:
        s = self.static
        s.slot_mapping[n:].fill_(-1)
        s.seq_lens[n:].zero_()
        s.query_start_loc[n + 1 :].fill_(n)

    def size_for(self, num_reqs: int, num_tokens: int, max_blocks: int) -> int | None:
        """The capture size a pure-decode batch of `num_reqs` would replay, else None."""
        if num_tokens != num_reqs or max_blocks > self.max_blocks:
            return None
        return next((s for s in self.sizes if s >= num_reqs), None)

    def run(
        self, size: int, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> Outputs:
        """Copy a decode batch (n = meta.num_tokens rows) into the static buffers, replay the
        `size` graph, and return views of its outputs for the n real rows."""
        n = self._load(input_ids, positions, meta)
        self.graphs[size].replay()
        logits, tokens = self.outputs[size]
        return logits[:n], tokens[:n]

    def run_steps(
        self,
        size: int,
        steps: int,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        sample: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        """`steps` decode steps of a batch, all on the device: after each replay,
        `sample(logits, argmax)` of the n real rows gives their next tokens, which become the
        next step's inputs at the next positions (slots from the block tables, which must
        already hold every step's blocks). Returns the tokens, [steps, n] int64."""
        n = self._load(input_ids, positions, meta)
        s, bs = self.static, self.block_size
        graph, (logits, greedy) = self.graphs[size], self.outputs[size]
        tokens = torch.empty(steps, n, dtype=torch.int64, device=self.device)
        for step in range(steps):
            if step:
                s.input_ids[:n].copy_(tokens[step - 1])
                s.positions[:n] += 1
                s.seq_lens[:n] += 1
                pos = s.positions[:n]
                block = s.block_tables[:n].gather(1, (pos // bs).unsqueeze(1)).squeeze(1)
                s.slot_mapping[:n] = block * bs + pos % bs
            graph.replay()
            tokens[step] = sample(logits[:n], greedy[:n])
        return tokens

    def _load(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> int:
        """Copy a decode batch into the static buffers (padding rows reset); returns its rows."""
        n, s = meta.num_tokens, self.static
        s.input_ids[:n].copy_(input_ids, non_blocking=True)
        s.positions[:n].copy_(positions, non_blocking=True)
        s.slot_mapping[:n].copy_(meta.slot_mapping, non_blocking=True)
        s.seq_lens[:n].copy_(meta.seq_lens, non_blocking=True)
        s.query_start_loc[: n + 1].copy_(meta.query_start_loc, non_blocking=True)
        width = meta.block_tables.shape[1]
        s.block_tables[:n, :width].copy_(meta.block_tables, non_blocking=True)
        self._reset_padding(n)
        return n
