"""LoRA adapters served beside the base model: every decoder Linear holds `max_loras` slots of
low-rank weights, and each step says which rows of the batch use which slot.

For a Linear with output shards s (q/k/v, gate/up, or one), slot i holds A_s [r, in] stacked
into `a[i]` [shards * max_rank, in] and scale * B_s [out_s, r] placed block-diagonally into
`b[i]` [out, shards * max_rank], zero-padded to `max_rank`: the rows x of requests using
adapter i get y += (x a[i]^T) b[i]^T, two small matmuls per slot in use, on top of whatever
the Linear's method computed (dense, fp8 or the native GGUF kernels).
"""

from __future__ import annotations

import torch

from tokenmill.layers.parallel import Partition, rank_part


class LoRASlots:
    """The model-wide slot table: `max_loras` slots of rank up to `max_rank`, and this step's
    rows per slot (`rows`, set by the runner before each forward; empty: no adapter runs)."""

    def __init__(self, max_loras: int, max_rank: int) -> None:
        self.max_loras = max_loras
        self.max_rank = max_rank
        self.rows: list[tuple[int, torch.Tensor]] = []  # (slot, row indices of the batch)


class LoRAWeights(torch.nn.Module):
    """One Linear's slots (`LoRASlots`); `add(x, y)` adds this step's adapters' updates."""

    def __init__(
        self,
        slots: LoRASlots,
        in_features: int,
        output_sizes: dict[str, int],
        dtype: torch.dtype,
        partition: Partition | None = None,
    ) -> None:
        super().__init__()
        self.slots = slots
        self.partition = partition  # the Linear's: each slot holds this rank's part
        self.shards = list(output_sizes)
        self.offsets = {}
        start = 0
        for name, size in output_sizes.items():
            self.offsets[name] = (start, size)
            start += size
        width = len(self.shards) * slots.max_rank
        self.register_buffer(
            "a", torch.zeros(slots.max_loras, width, in_features, dtype=dtype), persistent=False
        )
        self.register_buffer(
            "b", torch.zeros(slots.max_loras, start, width, dtype=dtype), persistent=False
        )

    def set_slot(self, slot: int, shards: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Slot `slot` := the adapter's (A [r, in], scale * B [out_shard, r]) per shard, whole
        (shards it leaves out stay zero). Under tensor parallelism the slot keeps this rank's
        part: B's rows of a layer split by output rows, A's columns of one split by input
        columns (whose partial updates the layer's all-reduce then sums)."""
        self.a[slot].zero_()
        self.b[slot].zero_()
        rank = self.slots.max_rank
        p = self.partition
        for shard, (a, b) in shards.items():
            j = self.shards.index(shard)
            r = a.shape[0]
            start, size = self.offsets[shard]
            if p is not None and p.dim == 0:
                b = rank_part(b, p.tp, 0, size)
            elif p is not None:
                a = rank_part(a, p.tp, 1, self.a.shape[2])
            self.a[slot, j * rank : j * rank + r].copy_(a)
            self.b[slot, start : start + size, j * rank : j * rank + r].copy_(b)

    def add(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """y (the Linear's output for x) plus each row's adapter update, in place."""
        for slot, rows in self.slots.rows:
            h = x.index_select(0, rows)
            y.index_add_(0, rows, (h @ self.a[slot].T) @ self.b[slot].T)
        return y
