"""Linear layers that own a quantization method (how their weights are stored and applied)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


class UnquantizedLinearMethod:
    """Dense weights in the compute dtype; `apply` is a plain GEMM."""

    name = "dense"

    def create_weights(self, layer: Linear, in_features: int, out_features: int,
                       dtype: torch.dtype) -> None:
        layer.weight = torch.nn.Parameter(torch.empty(out_features, in_features, dtype=dtype),
                                          requires_grad=False)

    def process_weights_after_loading(self, layer: Linear) -> None:
        """Repack weights for the fastest kernel on this device (called once after loading)."""
        w = layer.weight
        if (w.device.type == "cpu" and w.dtype in (torch.bfloat16, torch.float16)
                and torch.backends.mkldnn.is_available()):
            # oneDNN's blocked layout: 1.2-2x faster bf16 GEMMs than the strided weight
            # (bit-identical results). The dense copy is dropped to keep memory flat.
            layer.packed_weight = torch.ops.mkldnn._reorder_linear_weight(w.detach())
            layer.weight = None

    def apply(self, layer: Linear, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if layer.packed_weight is not None:
            return torch.ops.mkldnn._linear_pointwise(x, layer.packed_weight, bias, "none", [], "")
        return F.linear(x, layer.weight, bias)


class Linear(torch.nn.Module):
    """y = x W^T + b, with W's storage and kernel delegated to `quant_method`.

    `output_sizes` names the row blocks of a fused layer (e.g. q, k, v of a fused qkv_proj) so
    checkpoints that store them separately load into the right rows.
    """

    def __init__(
        self, in_features: int, output_sizes: dict[str, int] | int, bias: bool = False,
        dtype: torch.dtype = torch.float32, quant_method: UnquantizedLinearMethod | None = None,
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
        self.packed_weight: torch.Tensor | None = None
        self.quant_method = quant_method or UnquantizedLinearMethod()
        self.quant_method.create_weights(self, in_features, self.out_features, dtype)
        self.bias = (torch.nn.Parameter(torch.zeros(self.out_features, dtype=dtype),
                                        requires_grad=False) if bias else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_method.apply(self, x, self.bias)
