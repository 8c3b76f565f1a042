"""GGUF's quantized blocks run natively: integer-dot kernels for linear layers and the output
head, row dequantization for the embedding lookup. No dense copy of a quantized tensor is kept.

`GGUFQuantConfig` reads each tensor's declared type from the file's header and hands a
`GGUFLinearMethod` to every Linear whose shards all have a kernel (types in
`gguf_fields.NAMES`, 16-row shards, whole units along the input); others stay dense. Shards of
one fused layer may differ in type (a Q4_K_M file's attn_v is often Q6_K next to Q4_K q/k): the
activations are quantized once per call and each run of same-typed shards is one kernel call.
Blocks are repacked at load by the C++ `gguf_repack` (one pass, threads over tiles), which
equals `gguf_pack.pack(gguf_fields.parse(...))`, the documented reference, byte for byte.

Exact channels (`calibrate_exact_channels`, once at start-up): the activations of an LLM have a
few input channels far larger than the rest (the residual stream's "massive" dimensions), and
in a block of 32 such a channel sets the 8-bit scale, rounding its 31 neighbours coarsely. Each
decoder-layer linear keeps its largest few input channels out of the rounding (read as 0 there)
and multiplies them by their weight columns in float32, the mixed decomposition of LLM.int8().
On the SmolLM2 files, 8 channels per layer cut the KL divergence from the float32 model 1.9-2.3x
(benchmarks/quality_llamacpp.py). They cost 8 float32 FMAs per token and 16 outputs, and their
weight table's bytes: the small Q4_K_M file's layer-0 linears ran 0.94-0.97x at 32 tokens and
0.90-0.98x at batch 1 against the same linears without them (one process, 2026-12-05).
"""

from __future__ import annotations

import logging
import time
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from tokenmill.errors import ModelLoadError
from tokenmill.quant import gguf_fields as gf
from tokenmill.quant import gguf_pack as gp
from tokenmill.quant.base import UnfusedEntryPoints
from tokenmill.quant.dense import (
    DTYPE_NAMES,
    DenseEmbeddingMethod,
    SharedDenseHead,
    SmallBatchLinear,
    UnquantizedLinearMethod,
    common_storage,
    shared_dense_head,
)

logger = logging.getLogger(__name__)


@dataclass
class _Segment:
    """Consecutive shards of one type: one kernel call writing columns [col, col + n)."""

    qtype: int
    col: int
    n: int
    packed: torch.Tensor
    bias: torch.Tensor | None = None


class GGUFLinearMethod(UnfusedEntryPoints):
    """Packed GGUF blocks per shard; `apply` quantizes x once and runs the integer kernel."""

    takes_raw = True

    def __init__(self, qtypes: dict[str, int], ops: Any) -> None:
        self.qtypes = qtypes
        self.ops = ops
        self.name = "+".join(dict.fromkeys(gf.NAMES[q] for q in qtypes.values()))

    def create_weights(
        self,
        layer: torch.nn.Module,
        in_features: int,
        output_sizes: dict[str, int],
        dtype: torch.dtype,
    ) -> None:
        layer.weight = None
        layer.packed_weight = None
        layer.shard_packed = {}
        layer.segments = []

    def load_weight(self, layer: torch.nn.Module, shard: str, tensor: Any, name: str) -> None:
        qtype, rows = self.qtypes[shard], layer.output_sizes[shard]
        if isinstance(tensor, torch.Tensor) or int(tensor.ggml_type) != qtype:
            raise ModelLoadError(
                f"tensor {name!r} is not stored as {gf.NAMES[qtype]} as the file's header declared"
            )
        if tuple(tensor.shape) != (rows, layer.in_features):
            raise ModelLoadError(
                f"tensor {name!r} has shape {tuple(tensor.shape)}, "
                f"the model expects {(rows, layer.in_features)}"
            )
        layer.shard_packed[shard] = self.ops.gguf_repack(
            _raw_bytes(tensor.data), qtype, rows, layer.in_features, gf.grid_levels(qtype)
        )

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        segments: list[_Segment] = []
        for shard, (start, size) in layer.shard_offsets.items():
            packed, qtype = layer.shard_packed.pop(shard), self.qtypes[shard]
            if segments and segments[-1].qtype == qtype and segments[-1].n % 16 == 0:
                last = segments[-1]
                last.packed = torch.cat([last.packed, packed])
                last.n += size
            else:
                segments.append(_Segment(qtype, start, size, packed))
        if layer.bias is not None:
            for s in segments:
                bias = layer.bias.detach().float()[s.col : s.col + s.n]
                s.bias = torch.cat([bias, bias.new_zeros(gp.padded_rows(s.n) - s.n)])
        layer.segments = segments
        layer.kernel = _kernel(self.ops, segments, layer.in_features)

    def apply(
        self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        if x.dim() == 2:
            return layer.kernel(x)
        return layer.kernel(x.reshape(-1, x.shape[-1])).view(*x.shape[:-1], layer.out_features)

    def bytes_per_call(self, layer: torch.nn.Module) -> int:
        return sum(s.packed.numel() for s in layer.segments) + layer.kernel.exact_bytes()


def _raw_bytes(data: Any) -> torch.Tensor:
    """A GGUF tensor's blocks (a read-only view of the mapped file) as a flat uint8 tensor, no
    copy; the repacking only reads it."""
    arr = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    with warnings.catch_warnings():  # torch warns that the array is not writable
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(arr)


def _kernel(ops: Any, segments: list[_Segment], in_features: int) -> Any:
    """The C++ layer object: x [M, in] (float32 / bfloat16) -> y [M, out], one call."""
    return ops.QuantLinear(
        [s.packed for s in segments],
        [s.qtype for s in segments],
        [s.n for s in segments],
        [s.bias for s in segments],
        in_features,
    )


class GGUFEmbeddingMethod:
    """The table kept as packed GGUF blocks; a lookup dequantizes just the rows asked for (in
    C++, the same float32 values as gguf's dequantization). A tied output head runs from the
    same packed blocks, so the table is stored once."""

    takes_raw = True

    def __init__(self, qtype: int, ops: Any) -> None:
        self.qtype = qtype
        self.ops = ops
        self.name = gf.NAMES[qtype]

    def create_weights(
        self, layer: torch.nn.Module, num_embeddings: int, dim: int, dtype: torch.dtype
    ) -> None:
        layer.weight = None
        layer.packed = None

    def load_weight(self, layer: torch.nn.Module, tensor: Any, name: str) -> None:
        n, k = layer.num_embeddings, layer.embedding_dim
        if isinstance(tensor, torch.Tensor) or int(tensor.ggml_type) != self.qtype:
            raise ModelLoadError(f"tensor {name!r} is not stored as the file's header declared")
        if tuple(tensor.shape) != (n, k):
            raise ModelLoadError(
                f"tensor {name!r} has shape {tuple(tensor.shape)}, the model expects {(n, k)}"
            )
        layer.packed = self.ops.gguf_repack(
            _raw_bytes(tensor.data), self.qtype, n, k, gf.grid_levels(self.qtype)
        )

    def lookup(self, layer: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
        rows = self.ops.quant_rows(
            layer.packed, self.qtype, layer.num_embeddings, layer.embedding_dim, ids
        )
        return rows.to(layer.dtype).view(*ids.shape, layer.embedding_dim)

    def dense_weight(self, layer: torch.nn.Module) -> None:
        return None


class _SharedPackedHead(GGUFLinearMethod):
    """The output head of a tied model: the embedding's packed blocks, not a copy."""

    def __init__(self, embedding: torch.nn.Module, qtype: int, ops: Any) -> None:
        super().__init__({"": qtype}, ops)
        self.embedding = embedding

    def load_weight(self, layer: torch.nn.Module, shard: str, tensor: Any, name: str) -> None:
        """Nothing to store: the embedding keeps the blocks."""

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        layer.segments = [_Segment(self.qtypes[""], 0, layer.out_features, self.embedding.packed)]
        layer.kernel = _kernel(self.ops, layer.segments, layer.in_features)


# GGML's 16-bit float types, kept as they are beside float32 compute (GGUFQuantConfig.dense16)
DENSE16_TYPES = {1: torch.float16, 30: torch.bfloat16}  # F16, BF16


class GGUFQuantConfig:
    """Methods for a GGUF file's tensors: native where a kernel exists, dense elsewhere.

    `tensor_types` maps checkpoint (HF) names to (GGML type, [out, in] shape). `counts` records
    what was chosen, by type, for logs and `tokenmill info`. Dense layers run on `small_batch`
    for decode steps where it takes them; with `dense16` (a float32 compute dtype), F16 and
    BF16 tensors stay in their 16-bit dtype (`UnquantizedLinearMethod.storage_dtype`).
    """

    def __init__(
        self,
        tensor_types: dict[str, tuple[int, tuple[int, ...]]],
        ops: Any,
        small_batch: SmallBatchLinear | None = None,
        dense16: bool = False,
    ) -> None:
        self.tensor_types = tensor_types
        self.ops = ops
        self.small_batch = small_batch
        self.dense16 = dense16
        self.stored = (
            {n: DENSE16_TYPES[t] for n, (t, _) in tensor_types.items() if t in DENSE16_TYPES}
            if dense16
            else None
        )
        self.counts: Counter = Counter()

    def _native_types(self, names: dict[str, str], in_features: int) -> dict[str, int] | None:
        qtypes = {}
        for shard, name in names.items():
            qtype, shape = self.tensor_types.get(name, (None, ()))
            if qtype is None or len(shape) != 2 or not gp.can_pack(qtype, shape[0], in_features):
                return None
            qtypes[shard] = qtype
        return qtypes

    def linear_method(
        self, names: dict[str, str], in_features: int, output_sizes: dict[str, int]
    ) -> GGUFLinearMethod | UnquantizedLinearMethod:
        qtypes = self._native_types(names, in_features)
        if qtypes is None:
            storage = common_storage(self.stored, names.values())
            self.counts["dense" if storage is None else DTYPE_NAMES[storage]] += 1
            return UnquantizedLinearMethod(self.small_batch, storage)
        method = GGUFLinearMethod(qtypes, self.ops)
        self.counts[method.name] += 1
        return method

    def embedding_method(self, name: str) -> GGUFEmbeddingMethod | DenseEmbeddingMethod:
        """Packed blocks when a kernel type (row lookups in C++); other types are dequantized
        (a dense table is what the lookup and a tied head would need anyway)."""
        qtype, shape = self.tensor_types.get(name, (0, ()))
        if len(shape) != 2 or not gp.can_pack(qtype, *shape):
            storage = common_storage(self.stored, [name])
            if storage is not None:
                self.counts[f"{DTYPE_NAMES[storage]} embedding"] += 1
            return DenseEmbeddingMethod(storage)
        self.counts[f"{gf.NAMES[qtype]} embedding"] += 1
        return GGUFEmbeddingMethod(qtype, self.ops)

    def tied_head_method(
        self, embedding: torch.nn.Module, in_features: int, vocab: int
    ) -> GGUFLinearMethod | SharedDenseHead | None:
        method = embedding.quant_method
        if isinstance(method, DenseEmbeddingMethod):
            return shared_dense_head(embedding, self.small_batch)
        self.counts[f"{method.name} output"] += 1
        return _SharedPackedHead(embedding, method.qtype, self.ops)


@dataclass
class ExactChannels:
    """What `calibrate_exact_channels` chose (logged at start-up)."""

    per_layer: int  # channels per layer
    layers: int  # linear layers that keep them
    calibration_tokens: int
    table_bytes: int  # float32 weight columns, all layers
    seconds: float


@torch.inference_mode()
def calibrate_exact_channels(
    model: torch.nn.Module,
    forward: Callable[[torch.Tensor], Any],
    per_layer: int,
    num_tokens: int = 64,
    seed: int = 0,
) -> ExactChannels | None:
    """Pick each native linear layer's `per_layer` largest input channels and keep them exact.

    `forward(ids)` runs the model once over `ids` (a scratch KV cache, no sampling). It sees
    `num_tokens` token ids drawn from `seed`: the channels that stand out are properties of the
    model (its massive residual dimensions, its norms' gains) and show on any input, so no text
    is needed. Each layer records the max |x| per input channel during that forward and keeps
    the `per_layer` largest. The output head is left out: its input is the final norm's output,
    where keeping channels exact changed nothing measurable, and its columns are the widest.
    Returns None when no layer runs a native kernel or `per_layer` is 0.
    """
    layers = [
        m
        for name, m in model.named_modules()
        if isinstance(getattr(m, "quant_method", None), GGUFLinearMethod)
        and name.rsplit(".", 1)[-1] != "lm_head"
    ]
    if not layers or per_layer <= 0:
        return None
    t = time.perf_counter()
    vocab = model.cfg.vocab_size
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (num_tokens,), generator=g)
    for layer in layers:
        layer.kernel.observe_inputs(True)
    try:
        forward(ids)
        for layer in layers:
            absmax = layer.kernel.observed_absmax()
            k = min(per_layer, absmax.numel())
            layer.kernel.set_exact_channels(absmax.topk(k).indices.tolist())
    finally:
        for layer in layers:
            layer.kernel.observe_inputs(False)
    return ExactChannels(
        per_layer,
        len(layers),
        num_tokens,
        sum(layer.kernel.exact_bytes() for layer in layers),
        time.perf_counter() - t,
    )


def describe_counts(counts: Counter) -> str:
    """'Q4_1 x120, Q8_0 output, Q8_0 embedding, dense x2' (layers by the method they run)."""
    return ", ".join(
        f"{name} x{n}" if " " not in name else name for name, n in counts.most_common()
    )
