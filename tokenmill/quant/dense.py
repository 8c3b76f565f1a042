"""Dense weights in the compute dtype (the always-correct path)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from tokenmill.errors import ModelLoadError


def materialize(tensor: Any) -> torch.Tensor:
    """A checkpoint tensor as a dense torch tensor (GGUF blocks are dequantized)."""
    return tensor if isinstance(tensor, torch.Tensor) else tensor.dequantize()


def copy_checked(dest: torch.Tensor, tensor: torch.Tensor, name: str) -> None:
    if tuple(dest.shape) != tuple(tensor.shape):
        raise ModelLoadError(
            f"tensor {name!r} has shape {tuple(tensor.shape)}, "
            f"the model expects {tuple(dest.shape)}"
        )
    dest.copy_(tensor)


class UnquantizedLinearMethod:
    """Dense [out, in] weights; on CPU in bf16/fp16 repacked into oneDNN's blocked layout."""

    name = "dense"
    takes_raw = False

    def create_weights(
        self,
        layer: torch.nn.Module,
        in_features: int,
        output_sizes: dict[str, int],
        dtype: torch.dtype,
    ) -> None:
        layer.weight = torch.nn.Parameter(
            torch.empty(sum(output_sizes.values()), in_features, dtype=dtype), requires_grad=False
        )
        layer.packed_weight = None

    def load_weight(self, layer: torch.nn.Module, shard: str, tensor: Any, name: str) -> None:
        dest = layer.weight.data
        if shard:
            start, size = layer.shard_offsets[shard]
            dest = dest.narrow(0, start, size)
        copy_checked(dest, materialize(tensor), name)

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        w = layer.weight
        if (
            w.device.type == "cpu"
            and w.dtype in (torch.bfloat16, torch.float16)
            and torch.backends.mkldnn.is_available()
        ):
            # oneDNN's blocked layout: 1.2-2x faster bf16 GEMMs than the strided weight
            # (bit-identical results). The dense copy is dropped to keep memory flat.
            layer.packed_weight = torch.ops.mkldnn._reorder_linear_weight(w.detach())
            layer.weight = None

    def apply(
        self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        if layer.packed_weight is not None:
            return torch.ops.mkldnn._linear_pointwise(x, layer.packed_weight, bias, "none", [], "")
        return F.linear(x, layer.weight, bias)

    def bytes_per_call(self, layer: torch.nn.Module) -> int:
        w = layer.packed_weight if layer.packed_weight is not None else layer.weight
        return w.numel() * w.element_size()


class DenseEmbeddingMethod:
    """A dense [vocab, hidden] table."""

    name = "dense"
    takes_raw = False

    def create_weights(
        self, layer: torch.nn.Module, num_embeddings: int, dim: int, dtype: torch.dtype
    ) -> None:
        layer.weight = torch.nn.Parameter(
            torch.empty(num_embeddings, dim, dtype=dtype), requires_grad=False
        )

    def load_weight(self, layer: torch.nn.Module, tensor: Any, name: str) -> None:
        copy_checked(layer.weight.data, materialize(tensor), name)

    def lookup(self, layer: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, layer.weight)

    def dense_weight(self, layer: torch.nn.Module) -> torch.Tensor | None:
        return layer.weight


class DenseConfig:
    """Every layer dense (safetensors checkpoints, `quantization="none"`, no kernels)."""

    def linear_method(
        self, names: dict[str, str], in_features: int, output_sizes: dict[str, int]
    ) -> UnquantizedLinearMethod:
        return UnquantizedLinearMethod()

    def embedding_method(self, name: str) -> DenseEmbeddingMethod:
        return DenseEmbeddingMethod()

    def tied_head_method(self, embedding: torch.nn.Module, in_features: int, vocab: int) -> None:
        return None
