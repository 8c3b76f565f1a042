"""The quantization seam: how a Linear (or an embedding) stores its weights and runs them.

A `QuantConfig` is resolved once per model load (from the checkpoint's declared format, the
`quantization` option and the CPU's kernel level) and hands each layer its method when the layer
is built. Nothing is patched after loading: the loader gives each tensor to the method of the
module that owns it (`load_weight`), then `process_weights_after_loading` repacks once.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch


class LinearMethod(Protocol):
    """Storage and kernel of one Linear layer's weight (y = x W^T + b)."""

    name: str
    takes_raw: bool  # whether load_weight accepts a checkpoint's quantized blocks as they are

    def create_weights(
        self,
        layer: torch.nn.Module,
        in_features: int,
        output_sizes: dict[str, int],
        dtype: torch.dtype,
    ) -> None:
        """Allocate what the layer holds before loading (dense: an empty [out, in] weight)."""

    def load_weight(self, layer: torch.nn.Module, shard: str, tensor: Any, name: str) -> None:
        """Take the checkpoint tensor `name` for `shard` ("" for an unfused layer); errors name
        the tensor."""

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        """Repack once for the kernel (called after every shard was loaded)."""

    def apply(
        self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        """[..., in] -> [..., out] in x's dtype."""

    def bytes_per_call(self, layer: torch.nn.Module) -> int:
        """Weight bytes one call reads (the roofline's numerator)."""

    def apply_glu(
        self, layer: torch.nn.Module, gate_up: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor | None:
        """(silu(gate) * up) W^T + b for gate_up [rows, 2 * in] = [gate | up] in one kernel,
        or None where the method has none for this call (`Linear.forward_glu` then runs the
        backend's silu_and_mul and `apply`)."""

    def apply_add_norm(
        self,
        layer: torch.nn.Module,
        residual: torch.Tensor,
        delta: torch.Tensor | None,
        norm_weight: torch.Tensor,
        eps: float,
        bias: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(r, rms_norm(r) * norm_weight W^T + b) with r = residual + delta in one kernel, or
        None where the method has none for this call (`Linear.forward_add_norm` then runs the
        norm's add_forward and `apply`)."""


class UnfusedEntryPoints:
    """The fused entry points of a method that has no fused kernel: every call returns None."""

    def apply_glu(
        self, layer: torch.nn.Module, gate_up: torch.Tensor, bias: torch.Tensor | None
    ) -> None:
        return None

    def apply_add_norm(
        self,
        layer: torch.nn.Module,
        residual: torch.Tensor,
        delta: torch.Tensor | None,
        norm_weight: torch.Tensor,
        eps: float,
        bias: torch.Tensor | None,
    ) -> None:
        return None


class EmbeddingMethod(Protocol):
    """Storage and row lookup of a token embedding table [vocab, hidden]."""

    name: str
    takes_raw: bool

    def create_weights(
        self, layer: torch.nn.Module, num_embeddings: int, dim: int, dtype: torch.dtype
    ) -> None: ...

    def load_weight(self, layer: torch.nn.Module, tensor: Any, name: str) -> None: ...

    def lookup(self, layer: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` in the layer's dtype."""

    def dense_weight(self, layer: torch.nn.Module) -> torch.Tensor | None:
        """The dense table when there is one (a tied dense output head reads it)."""


class QuantConfig(Protocol):
    """Chooses each layer's method by the checkpoint name of the layer's weight(s)."""

    def linear_method(
        self, names: dict[str, str], in_features: int, output_sizes: dict[str, int]
    ) -> LinearMethod:
        """`names` maps each shard to its checkpoint tensor name (HF naming)."""

    def embedding_method(self, name: str) -> EmbeddingMethod: ...

    def tied_head_method(
        self, embedding: torch.nn.Module, in_features: int, vocab: int
    ) -> LinearMethod | None:
        """A method that runs the output head from the (already built) embedding's own stored
        blocks (None: the head multiplies by the dense table)."""
