"""Dense weights in the compute dtype (the always-correct path), or in the checkpoint's own 16-bit
dtype beside float32 compute."""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from tokenmill.errors import ModelLoadError

# The 16-bit dtypes a dense weight may keep beside float32 compute, as `tokenmill info` names them
DTYPE_NAMES = {torch.float16: "F16", torch.bfloat16: "BF16"}


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


def onednn_packable(w: torch.Tensor) -> bool:
    """Whether oneDNN can repack `w` ([out, in]) into its blocked layout for `_linear_pointwise`:
    a CPU tensor in bf16 / fp16 on a CPU with oneDNN's kernels for that dtype (bf16 needs
    AVX-512 BW/VL/DQ or AVX-NE-CONVERT, fp16 AVX-512-FP16 or AVX-NE-CONVERT; an AVX2-only CPU
    such as AMD Zen 3 has neither and keeps the strided weight)."""
    if w.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if w.dtype == torch.bfloat16:
        return torch.ops.mkldnn._is_mkldnn_bf16_supported()
    if w.dtype == torch.float16:
        return torch.ops.mkldnn._is_mkldnn_fp16_supported()
    return False


class SmallBatchLinear(Protocol):
    """A kernel for x W^T (+ b) on steps of a few rows (decode), where the library GEMM leaves
    bandwidth unused; handed to `DenseConfig` by the loader (quant does not import kernels)."""

    def applies(self, w: torch.Tensor) -> bool:
        """Whether the kernel takes this [out, in] weight (its dtype, layout and size)."""

    def max_rows_for(self, w: torch.Tensor, dtype: torch.dtype) -> int:
        """The most rows of x (in the compute dtype `dtype`) one call takes with the weight `w`
        (one it `applies` to): 0 for none, `sys.maxsize` for every row count."""

    def __call__(
        self, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor: ...

    def glu(
        self, gate_up: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        """(silu(gate) * up) W^T + b (`LinearMethod.apply_glu`)."""

    def add_norm(
        self,
        residual: torch.Tensor,
        delta: torch.Tensor | None,
        norm_weight: torch.Tensor,
        eps: float,
        w: torch.Tensor,
        bias: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(r, rms_norm(r) * norm_weight W^T + b), r = residual + delta
        (`LinearMethod.apply_add_norm`)."""


def _small_batch_rows(
    small_batch: SmallBatchLinear | None, w: torch.Tensor, dtype: torch.dtype
) -> int:
    """The most rows the small-batch kernel takes with `w` and compute dtype `dtype` (0: none)."""
    if small_batch is None or not small_batch.applies(w):
        return 0
    return small_batch.max_rows_for(w, dtype)


def _attach_small_batch(
    layer: torch.nn.Module, small_batch: SmallBatchLinear | None, w: torch.Tensor
) -> None:
    """Give `layer` the small-batch kernel and its row limit for `w` when the kernel takes it."""
    rows = _small_batch_rows(small_batch, w, layer.compute_dtype)
    if rows:
        layer.small_batch = small_batch
        layer.small_batch_rows = rows


class UnquantizedLinearMethod:
    """Dense [out, in] weights; on CPU in bf16/fp16 repacked into oneDNN's blocked layout; with
    a `SmallBatchLinear` that takes the weight, inputs of up to its `max_rows_for` rows run on it.

    `storage_dtype` keeps the weights in a 16-bit dtype of their own beside a float32 compute
    dtype (an F16 / BF16 checkpoint, exactly as stored: half the bytes a step reads); the
    small-batch kernel widens them as it loads them (the CPU's at every row count), and without
    one each call widens a copy."""

    name = "dense"
    takes_raw = False

    def __init__(
        self,
        small_batch: SmallBatchLinear | None = None,
        storage_dtype: torch.dtype | None = None,
    ) -> None:
        self.small_batch = small_batch
        self.storage_dtype = storage_dtype

    def create_weights(
        self,
        layer: torch.nn.Module,
        in_features: int,
        output_sizes: dict[str, int],
        dtype: torch.dtype,
    ) -> None:
        layer.weight = torch.nn.Parameter(
            torch.empty(sum(output_sizes.values()), in_features, dtype=self.storage_dtype or dtype),
            requires_grad=False,
        )
        layer.compute_dtype = dtype
        layer.packed_weight = None
        layer.small_batch = None
        layer.small_batch_rows = 0

    def load_weight(self, layer: torch.nn.Module, shard: str, tensor: Any, name: str) -> None:
        dest = layer.weight.data
        if shard:
            start, size = layer.shard_offsets[shard]
            dest = dest.narrow(0, start, size)
        copy_checked(dest, materialize(tensor), name)

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        w = layer.weight
        every_row = _small_batch_rows(self.small_batch, w, layer.compute_dtype) == sys.maxsize
        if self.storage_dtype is None and onednn_packable(w) and not every_row:
            # oneDNN's blocked layout: 1.2-2x faster bf16 GEMMs than the strided weight
            # (bit-identical results). The dense copy is dropped to keep memory flat. A
            # small-batch kernel that takes every row count (the CPU's on bfloat16:
            # `bf16_path`) reads the weight as it is instead.
            layer.packed_weight = torch.ops.mkldnn._reorder_linear_weight(w.detach())
            layer.weight = None
        else:
            _attach_small_batch(layer, self.small_batch, w)

    def apply(
        self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        small = self._small(layer, x)
        if small is not None:
            return small(x, layer.weight, bias)
        if layer.packed_weight is not None:
            return torch.ops.mkldnn._linear_pointwise(x, layer.packed_weight, bias, "none", [], "")
        return F.linear(x, layer.weight.to(x.dtype), bias)

    def bytes_per_call(self, layer: torch.nn.Module) -> int:
        w = layer.packed_weight if layer.packed_weight is not None else layer.weight
        return w.numel() * w.element_size()

    @staticmethod
    def _small(layer: torch.nn.Module, x: torch.Tensor) -> SmallBatchLinear | None:
        """The small-batch kernel when it takes this layer and x's rows."""
        small = layer.small_batch
        if small is None or x.dim() != 2 or x.shape[0] > layer.small_batch_rows:
            return None
        return small

    def apply_glu(
        self, layer: torch.nn.Module, gate_up: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor | None:
        small = self._small(layer, gate_up)
        return small.glu(gate_up, layer.weight, bias) if small is not None else None

    def apply_add_norm(
        self,
        layer: torch.nn.Module,
        residual: torch.Tensor,
        delta: torch.Tensor | None,
        norm_weight: torch.Tensor,
        eps: float,
        bias: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        small = self._small(layer, residual)
        if small is None:
            return None
        return small.add_norm(residual, delta, norm_weight, eps, layer.weight, bias)


class DenseEmbeddingMethod:
    """A dense [vocab, hidden] table, in `storage_dtype` when given (a 16-bit table beside a
    float32 compute dtype: rows are widened as they are looked up)."""

    name = "dense"
    takes_raw = False

    def __init__(self, storage_dtype: torch.dtype | None = None) -> None:
        self.storage_dtype = storage_dtype

    def create_weights(
        self, layer: torch.nn.Module, num_embeddings: int, dim: int, dtype: torch.dtype
    ) -> None:
        layer.weight = torch.nn.Parameter(
            torch.empty(num_embeddings, dim, dtype=self.storage_dtype or dtype),
            requires_grad=False,
        )
        layer.compute_dtype = dtype

    def load_weight(self, layer: torch.nn.Module, tensor: Any, name: str) -> None:
        copy_checked(layer.weight.data, materialize(tensor), name)

    def lookup(self, layer: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, layer.weight).to(layer.compute_dtype)

    def dense_weight(self, layer: torch.nn.Module) -> torch.Tensor | None:
        return layer.weight


class SharedDenseHead(UnquantizedLinearMethod):
    """The output head of a tied model with a dense table: the embedding's table, not a copy,
    through the small-batch kernel where it applies (the table's own dtype: a 16-bit table is
    widened as it loads)."""

    def __init__(self, embedding: torch.nn.Module, small_batch: SmallBatchLinear | None) -> None:
        super().__init__(small_batch)
        self.embedding = embedding

    def create_weights(
        self,
        layer: torch.nn.Module,
        in_features: int,
        output_sizes: dict[str, int],
        dtype: torch.dtype,
    ) -> None:
        layer.weight = None
        layer.compute_dtype = dtype
        layer.packed_weight = None
        layer.small_batch = None
        layer.small_batch_rows = 0

    def load_weight(self, layer: torch.nn.Module, shard: str, tensor: Any, name: str) -> None:
        """Nothing to store: the embedding keeps the table."""

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        _attach_small_batch(layer, self.small_batch, self.embedding.weight)

    def apply(
        self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        w = self.embedding.weight
        small = self._small(layer, x)
        if small is not None:
            return small(x, w, bias)
        return F.linear(x, w.to(x.dtype), bias)

    def bytes_per_call(self, layer: torch.nn.Module) -> int:
        w = self.embedding.weight
        return w.numel() * w.element_size()


def shared_dense_head(
    embedding: torch.nn.Module, small_batch: SmallBatchLinear | None
) -> SharedDenseHead | None:
    """The head of a tied model with a dense table (`DenseEmbeddingMethod`): `SharedDenseHead`,
    or None where the model's own product with the table serves: a table in the compute dtype
    with no small-batch kernel, one oneDNN would pack (unless the kernel takes it at every row
    count), or one on a GPU (whose heads ran at 89-100% of the bandwidth on cuBLAS)."""
    w = embedding.weight
    dtype = embedding.compute_dtype
    every_row = _small_batch_rows(small_batch, w, dtype) == sys.maxsize
    if w.dtype == dtype and (
        small_batch is None or (onednn_packable(w) and not every_row) or w.device.type != "cpu"
    ):
        return None
    return SharedDenseHead(embedding, small_batch)


def common_storage(
    stored: Mapping[str, torch.dtype] | None, names: Iterable[str]
) -> torch.dtype | None:
    """The 16-bit dtype that every checkpoint tensor of `names` keeps (`stored`: by checkpoint
    name, the tensors kept as stored beside a float32 compute dtype), else None: the layer's
    weight in the compute dtype (a fused layer is kept only when all its parts are)."""
    if not stored:
        return None
    dtypes = {stored.get(n) for n in names}
    return dtypes.pop() if len(dtypes) == 1 else None


class DenseConfig:
    """Every layer dense (safetensors checkpoints, `quantization="none"`, no kernels), with the
    loader's `SmallBatchLinear` for the linears (and a tied head) where there is one. `stored`
    maps checkpoint names to the 16-bit dtype those tensors keep beside a float32 compute dtype
    (`common_storage`, `UnquantizedLinearMethod.storage_dtype`); `counts` records the layers
    kept so, for logs and `tokenmill info`."""

    def __init__(
        self,
        small_batch: SmallBatchLinear | None = None,
        stored: Mapping[str, torch.dtype] | None = None,
    ) -> None:
        self.small_batch = small_batch
        self.stored = stored
        self.counts: Counter = Counter()

    def linear_method(
        self, names: dict[str, str], in_features: int, output_sizes: dict[str, int]
    ) -> UnquantizedLinearMethod:
        storage = common_storage(self.stored, names.values())
        if storage is not None:
            self.counts[DTYPE_NAMES[storage]] += 1
        return UnquantizedLinearMethod(self.small_batch, storage)

    def embedding_method(self, name: str) -> DenseEmbeddingMethod:
        storage = common_storage(self.stored, [name])
        if storage is not None:
            self.counts[f"{DTYPE_NAMES[storage]} embedding"] += 1
        return DenseEmbeddingMethod(storage)

    def tied_head_method(
        self, embedding: torch.nn.Module, in_features: int, vocab: int
    ) -> SharedDenseHead | None:
        return shared_dense_head(embedding, self.small_batch)
