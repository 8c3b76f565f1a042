"""Linear layers that own a quantization method (how their weights are stored and applied)."""

from __future__ import annotations

import torch

from tokenmill.quant.base import LinearMethod
from tokenmill.quant.dense import UnquantizedLinearMethod


class Linear(torch.nn.Module):
    """y = x W^T + b, with W's storage and kernel delegated to `quant_method` (dense when None).

    `output_sizes` names the row blocks of a fused layer (e.g. q, k, v of a fused qkv_proj) so
    checkpoints that store them separately load into the right rows.
    """

    def __init__(
        self,
        in_features: int,
        output_sizes: dict[str, int] | int,
        bias: bool = False,
        dtype: torch.dtype = torch.float32,
        quant_method: LinearMethod | None = None,
    ) -> None:
        super().__init__()
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_method.apply(self, x, self.bias)
