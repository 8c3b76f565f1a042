"""CausalLM: what every model module provides, and strict weight loading by HF names."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from tokenmill.errors import ModelLoadError
from tokenmill.layers.attention import AttentionBackend, TorchAttentionBackend
from tokenmill.layers.embedding import VocabEmbedding
from tokenmill.layers.linear import Linear
from tokenmill.layers.ops import TorchOps
from tokenmill.models.config import ModelArchConfig
from tokenmill.quant.base import QuantConfig
from tokenmill.quant.dense import copy_checked, materialize, onednn_packable

KVCache = tuple[torch.Tensor, torch.Tensor]


def _short_list(names: Iterable[str], limit: int = 8) -> str:
    names = sorted(names)
    more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


class CausalLM(torch.nn.Module):
    """Base of model modules: forward -> hidden states; compute_logits on selected rows.

    Parameters keep Hugging Face names; fused layers are listed in `stacked_params` so separate
    q/k/v (gate/up) checkpoint tensors load into the right rows. `ignored_weights` are checkpoint
    tensors that are known and not needed (e.g. precomputed rotary tables).

    `attn_backend` (chosen at load, `layers.attention_backends.make_backend`; the torch reference
    when none is given) runs attention and, through its `.ops`, the fused elementwise steps.
    """

    stacked_params: dict[str, tuple[str, str]] = {}
    supports_native_gguf = False  # takes a QuantConfig (GGUF blocks load with no layout change)
    # takes a `layers.parallel.TensorParallel` (`tp=`) and a sharded architecture
    supports_tensor_parallel = False
    supports_lora = False  # takes `lora=` (a `layers.lora.LoRASlots`): decoder linears hold slots
    ignored_suffixes: tuple[str, ...] = ("rotary_emb.inv_freq",)

    def __init__(self, cfg: ModelArchConfig, backend: AttentionBackend | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.attn_backend = backend or TorchAttentionBackend(
            TorchOps(), cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        )

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[KVCache], meta
    ) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def input_embeddings(self) -> VocabEmbedding:  # pragma: no cover - abstract
        raise NotImplementedError

    def compute_logits(self, hidden: torch.Tensor, float32: bool = True) -> torch.Tensor:
        """[num_rows, hidden] -> [num_rows, vocab], in float32 unless `float32=False` (then in
        the model dtype, enough for an argmax)."""
        head = getattr(self, "lm_head", None)
        if head is not None:
            logits = head(hidden)
        elif self.packed_tied_head is not None:
            logits = torch.ops.mkldnn._linear_pointwise(
                hidden, self.packed_tied_head, None, "none", [], ""
            )
        else:
            logits = torch.nn.functional.linear(hidden, self.input_embeddings().dense_weight())
        return logits.float() if float32 else logits

    def _build_head(
        self, quant: QuantConfig, hidden: int, vocab: int, dtype: torch.dtype, embedding_name: str
    ) -> None:
        """`lm_head`: its own weight, or for tied models a quantized copy of the embedding's
        blocks when the quant config can run them; a tied dense head reads the table."""
        self.packed_tied_head: torch.Tensor | None = None
        self.tied_embedding_name = embedding_name
        if not self.cfg.tie_word_embeddings:
            self.lm_head = Linear(
                hidden,
                vocab,
                dtype=dtype,
                quant_method=quant.linear_method({"": "lm_head.weight"}, hidden, {"": vocab}),
            )
            return
        method = quant.tied_head_method(self.input_embeddings(), hidden, vocab)
        if method is not None:
            self.lm_head = Linear(hidden, vocab, dtype=dtype, quant_method=method)

    def _owned_by_layer(self, pname: str) -> bool:
        owner = self.get_submodule(pname.rsplit(".", 1)[0]) if "." in pname else self
        return isinstance(owner, (Linear, VocabEmbedding))

    def weight_bytes_per_step(self) -> int:
        """Bytes of weights one forward pass reads: every linear layer as its method stores it,
        norms and biases, and the output head; the embedding table is only read by rows, so it
        counts only when it doubles as the output head."""
        total = sum(
            p.numel() * p.element_size()
            for n, p in self.named_parameters()
            if not self._owned_by_layer(n)
        )
        for m in self.modules():
            if isinstance(m, Linear):
                total += m.quant_method.bytes_per_call(m)
                if m.bias is not None:
                    total += m.bias.numel() * m.bias.element_size()
        if self.cfg.tie_word_embeddings and getattr(self, "lm_head", None) is None:
            head = self.packed_tied_head
            head = self.input_embeddings().dense_weight() if head is None else head
            total += head.numel() * head.element_size()
        return total

    def weight_memory_bytes(self) -> int:
        """Bytes of weights held in memory: parameters, buffers and every packed copy, each
        storage counted once (a tied head sharing the embedding's blocks adds nothing)."""
        seen: dict[int, int] = {}

        def add(t: torch.Tensor | None) -> None:
            if t is None:
                return
            if t.is_mkldnn:  # oneDNN's packed weights have no storage to share
                seen[id(t)] = t.numel() * t.element_size()
            else:
                seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()

        for t in list(self.parameters()) + list(self.buffers()):
            add(t)
        add(self.packed_tied_head)
        for m in self.modules():
            add(getattr(m, "packed_weight", None))
            add(getattr(m, "packed", None))
            for seg in getattr(m, "segments", ()):
                add(seg.packed)
        kernels = [getattr(m, "kernel", None) for m in self.modules()]
        exact = sum(k.exact_bytes() for k in kernels if k is not None)  # exact channels' columns
        return sum(seen.values()) + exact

    def process_weights_after_loading(self) -> None:
        for module in self.modules():
            if isinstance(module, Linear):
                module.quant_method.process_weights_after_loading(module)
        w = self.input_embeddings().dense_weight()
        if (
            self.cfg.tie_word_embeddings
            and getattr(self, "lm_head", None) is None
            and w is not None
            and onednn_packable(w)
        ):
            # The output projection reuses the embedding matrix; a oneDNN-packed copy makes the
            # [num_rows, vocab] GEMM of every step ~1.5-2x faster in bf16 on CPU.
            self.packed_tied_head = torch.ops.mkldnn._reorder_linear_weight(w.detach())

    def normalize_name(self, name: str) -> str:
        """Map a checkpoint tensor name onto this module's naming (override per family)."""
        return name

    def transform_weight(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """Convert a checkpoint tensor's layout to this module's (override per family)."""
        return tensor

    def resolve_param(self, raw_name: str) -> tuple[str, str, str] | None:
        """Checkpoint name -> (normalized name, parameter name, shard of a fused Linear or "");
        None for tensors the model does not use."""
        name = self.normalize_name(raw_name)
        if name is None or name.endswith(self.ignored_suffixes):
            return None
        for frag, (fused, shard_id) in self.stacked_params.items():
            if f".{frag}." in name:
                return name, name.replace(f".{frag}.", f".{fused}."), shard_id
        return name, name, ""

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, Any]]) -> None:
        """Give every checkpoint tensor to the layer that owns it; missing/unexpected -> error.

        Tensors may be dense torch tensors or a GGUF file's raw blocks (`dequantize()`-able):
        a layer whose method takes raw blocks gets them as they are, every other one gets the
        dense tensor. A tied quantized output head gets the embedding's blocks too. A
        tensor-parallel Linear gets its rank's part (`Linear.local_part`).
        """
        modules = dict(self.named_modules())
        params = dict(self.named_parameters())
        expected: set[tuple[str, str]] = set()
        for mname, m in modules.items():
            if isinstance(m, Linear):
                kinds = ("weight", "bias") if m.bias is not None else ("weight",)
                expected.update((f"{mname}.{k}", s) for k in kinds for s in m.output_sizes)
            elif isinstance(m, VocabEmbedding):
                expected.add((f"{mname}.weight", ""))
        expected.update((p, "") for p in params if not self._owned_by_layer(p))
        tied_head = getattr(self, "lm_head", None) if self.cfg.tie_word_embeddings else None
        loaded: set[tuple[str, str]] = set()
        unexpected: list[str] = []
        for raw_name, tensor in weights:
            resolved = self.resolve_param(raw_name)
            if resolved is None:
                continue
            name, target, shard = resolved
            if (target, shard) not in expected:
                unexpected.append(raw_name)
                continue
            module = modules.get(target.rsplit(".", 1)[0])
            if isinstance(module, (Linear, VocabEmbedding)) and target.endswith(".weight"):
                method = module.quant_method
                if not method.takes_raw:
                    tensor = self.transform_weight(name, materialize(tensor))
                if isinstance(module, Linear):
                    if module.partition is not None:
                        if method.takes_raw:
                            raise ModelLoadError(
                                f"{raw_name}: {method.name} weights cannot be split over ranks"
                            )
                        tensor = module.local_part(tensor, shard, raw_name, bias=False)
                    method.load_weight(module, shard, tensor, raw_name)
                else:
                    method.load_weight(module, tensor, raw_name)
                    if tied_head is not None and name == self.tied_embedding_name:
                        tied_head.quant_method.load_weight(tied_head, "", tensor, raw_name)
                        loaded.add(("lm_head.weight", ""))
            else:
                tensor = self.transform_weight(name, materialize(tensor))
                if isinstance(module, Linear):
                    tensor = module.local_part(tensor, shard, raw_name, bias=True)
                dest = params[target].data
                if shard:
                    start, size = module.shard_offsets[shard]
                    dest = dest.narrow(0, start, size)
                copy_checked(dest, tensor, raw_name)
            loaded.add((target, shard))
        if unexpected:
            raise ModelLoadError(f"unexpected tensors in checkpoint: {_short_list(unexpected)}")
        missing = {f"{p}[{s}]" if s else p for p, s in expected - loaded}
        if missing:
            raise ModelLoadError(f"tensors missing from checkpoint: {_short_list(missing)}")
