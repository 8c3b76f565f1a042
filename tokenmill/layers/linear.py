"""Linear layers that own a quantization method (how their weights are stored and applied)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from tokenmill.errors import ModelLoadError
from tokenmill.layers.lora import LoRASlots, LoRAWeights
from tokenmill.layers.norm import RMSNorm
from tokenmill.layers.parallel import Partition, rank_part
from tokenmill.quant.base import LinearMethod
from tokenmill.quant.dense import UnquantizedLinearMethod


class Linear(torch.nn.Module):
    """y = x W^T + b, with W's storage and kernel delegated to `quant_method` (dense when None).

    `output_sizes` names the row blocks of a fused layer (e.g. q, k, v of a fused qkv_proj) so
    checkpoints that store them separately load into the right rows.

    With a tensor-parallel `partition`, the sizes are this rank's share and `local_part`
    cuts each checkpoint tensor down to it; a layer split by input columns sums its partial
    outputs over the ranks before adding its bias.

    With `lora` (the model's LoRA slot table), the layer holds LoRA slots (`self.lora`) and
    adds the step's adapters' updates to its output; while any adapter runs, the fused entry
    points take their unfused path (the adapters need the layer's input).
    """

    def __init__(
        self,
        in_features: int,
        output_sizes: dict[str, int] | int,
        bias: bool = False,
        dtype: torch.dtype = torch.float32,
        quant_method: LinearMethod | None = None,
        partition: Partition | None = None,
        lora: LoRASlots | None = None,
    ) -> None:
        super().__init__()
        self.partition = partition
        # the layer sums partial outputs over the ranks (then adds its bias)
        self.reduces = partition is not None and partition.dim == 1
        if isinstance(output_sizes, int):
            output_sizes = {"": output_sizes}
        self.in_features = in_features
        self.output_sizes = output_sizes
        self.out_features = sum(output_sizes.values())
        self.shard_offsets: dict[str, tuple[int, int]] = {}
        start = 0
        for name, size in output_sizes.items():
            self.shard_offsets[name] = (start, size)
            start += size
        self.quant_method = quant_method or UnquantizedLinearMethod()
        self.quant_method.create_weights(self, in_features, output_sizes, dtype)
        self.bias = (
            torch.nn.Parameter(torch.zeros(self.out_features, dtype=dtype), requires_grad=False)
            if bias
            else None
        )
        self.lora = (
            None if lora is None else LoRAWeights(lora, in_features, output_sizes, dtype, partition)
        )

    def local_part(self, tensor: torch.Tensor, shard: str, name: str, bias: bool) -> torch.Tensor:
        """The part of checkpoint tensor `name` (the weight or bias of `shard`) that this rank
        holds: all of it without a partition (and a row-parallel layer's bias)."""
        p = self.partition
        if p is None or (bias and p.dim == 1):
            return tensor
        dim = 0 if bias else p.dim
        size = self.output_sizes[shard] if dim == 0 else self.in_features
        if tensor.dim() <= dim or tensor.shape[dim] != size * p.tp.size:
            raise ModelLoadError(
                f"{name}: shape {tuple(tensor.shape)} does not split into {p.tp.size} parts "
                f"of {size} along dimension {dim}"
            )
        return rank_part(tensor, p.tp, dim, size)

    def _finish(self, y: torch.Tensor) -> torch.Tensor:
        """A row-parallel layer's partial output summed over the ranks, plus the bias."""
        if not self.reduces:
            return y
        y = self.partition.tp.all_reduce(y)
        return y if self.bias is None else y + self.bias

    @property
    def _local_bias(self) -> torch.Tensor | None:
        """The bias the method adds: none where the ranks' partial outputs are summed first."""
        return None if self.reduces else self.bias

    @property
    def _lora_active(self) -> bool:
        return self.lora is not None and bool(self.lora.slots.rows)

    def full_shape(self, shard: str) -> tuple[int, int]:
        """(rows of `shard`, input columns) of the whole weight, across the ranks."""
        rows, cols = self.output_sizes[shard], self.in_features
        p = self.partition
        if p is not None:
            rows, cols = (rows * p.tp.size, cols) if p.dim == 0 else (rows, cols * p.tp.size)
        return rows, cols

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.quant_method.apply(self, x, self._local_bias)
        if self._lora_active:  # before the ranks' sum: a rank's update is partial too
            y = self.lora.add(x, y)
        return self._finish(y)

    def forward_glu(
        self, gate_up: torch.Tensor, silu_and_mul: Callable[[torch.Tensor], torch.Tensor]
    ) -> torch.Tensor:
        """self(silu_and_mul(gate_up)) for gate_up = [gate | up]: one kernel where the method
        has one for this call (`apply_glu`), else the backend's `silu_and_mul` first."""
        if self._lora_active:
            return self(silu_and_mul(gate_up))
        y = self.quant_method.apply_glu(self, gate_up, self._local_bias)
        return self._finish(y) if y is not None else self(silu_and_mul(gate_up))

    def forward_add_norm(
        self, residual: torch.Tensor, delta: torch.Tensor | None, norm: RMSNorm
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(r, self(norm(r))) with r = residual + delta (`norm.add_forward`): one kernel where
        the method has one for this call (`apply_add_norm`), else the norm's fused op first.
        `residual` may be updated in place; use the returned r."""
        if self._lora_active:
            residual, h = norm.add_forward(residual, delta)
            return residual, self(h)
        out = self.quant_method.apply_add_norm(
            self, residual, delta, norm.weight, norm.eps, self._local_bias
        )
        if out is not None:
            return out[0], self._finish(out[1])
        residual, h = norm.add_forward(residual, delta)
        return residual, self(h)
