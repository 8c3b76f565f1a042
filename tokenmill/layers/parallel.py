"""Tensor parallelism inside a model (Megatron-style): which rows or columns a rank holds.

Each of `size` ranks builds the model with its share of the attention heads and of the MLP's
intermediate width (`ModelArchConfig.shard`). The projections that fan out (q/k/v, gate/up)
keep a slice of their output rows ("column parallel"); the projections that fan back in
(o_proj, down_proj) keep the matching slice of their input columns ("row parallel") and sum
their partial outputs over the ranks (one all-reduce each, through torch.distributed).
Embedding, norms and output head are replicated, so every rank holds the same residual
stream.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class TensorParallel:
    """This process's place among the ranks of one model: `rank` of `size`, with `group` the
    torch.distributed process group that sums the row-parallel outputs."""

    rank: int
    size: int
    group: Any  # torch.distributed.ProcessGroup

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """x summed over the ranks, in place."""
        torch.distributed.all_reduce(x, group=self.group)
        return x


def rank_part(tensor: torch.Tensor, tp: TensorParallel, dim: int, size: int) -> torch.Tensor:
    """This rank's `size`-wide slice of a whole tensor along `dim` (contiguous)."""
    return tensor.narrow(dim, tp.rank * size, size).contiguous()


@dataclass(frozen=True)
class Partition:
    """How one Linear is split over the ranks: `dim` 0 splits its output rows (every shard of
    a fused layer separately; no communication), `dim` 1 its input columns (partial outputs
    summed by an all-reduce, the bias added once after it)."""

    tp: TensorParallel
    dim: int
