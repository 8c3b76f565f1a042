"""CausalLM: what every model module provides, and strict weight loading by HF names."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from tokenmill.errors import ModelLoadError
from tokenmill.layers.linear import Linear
from tokenmill.models.config import ModelArchConfig

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
    """

    stacked_params: dict[str, tuple[str, str]] = {}
    supports_native_gguf = False  # GGUF linear weights load as-is (no layout transform)
    ignored_suffixes: tuple[str, ...] = ("rotary_emb.inv_freq",)

    def __init__(self, cfg: ModelArchConfig) -> None:
        super().__init__()
        self.cfg = cfg

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[KVCache], meta) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def input_embeddings(self) -> torch.nn.Embedding:  # pragma: no cover - abstract
        raise NotImplementedError

    def compute_logits(self, hidden: torch.Tensor, float32: bool = True) -> torch.Tensor:
        """[num_rows, hidden] -> [num_rows, vocab], in float32 unless `float32=False` (then in
        the model dtype, enough for an argmax)."""
        native = getattr(self, "native_head", None)
        packed = getattr(self, "packed_tied_head", None)
        if native is not None:
            logits = native(hidden)
        elif packed is not None:
            logits = torch.ops.mkldnn._linear_pointwise(hidden, packed, None, "none", [], "")
        elif self.cfg.tie_word_embeddings:
            logits = torch.nn.functional.linear(hidden, self.input_embeddings().weight)
        else:
            logits = self.lm_head(hidden)
        return logits.float() if float32 else logits

    def weight_bytes_per_step(self) -> int:
        """Bytes of weights one forward pass reads: every linear layer as stored (dense, packed
        or quantized blocks), norms and biases, and the output head; the embedding table is
        only read by rows, so it counts only when it doubles as the output head."""
        embedding = self.input_embeddings().weight
        total = sum(p.numel() * p.element_size() for p in self.parameters()
                    if p is not embedding)
        for m in self.modules():
            if isinstance(m, Linear):
                for t in (getattr(m, "qweight", None), m.packed_weight):
                    if t is not None:
                        total += t.numel() * t.element_size()
        if self.cfg.tie_word_embeddings and getattr(self, "native_head", None) is None:
            head = getattr(self, "packed_tied_head", None)
            head = embedding if head is None else head
            total += head.numel() * head.element_size()
        return total

    def process_weights_after_loading(self) -> None:
        for module in self.modules():
            if isinstance(module, Linear):
                module.quant_method.process_weights_after_loading(module)
        if self.cfg.tie_word_embeddings:
            # The output projection reuses the embedding matrix; a oneDNN-packed copy makes the
            # [num_rows, vocab] GEMM of every step ~1.5-2x faster in bf16 on CPU.
            w = self.input_embeddings().weight
            if (getattr(self, "native_head", None) is None and w.device.type == "cpu"
                    and w.dtype in (torch.bfloat16, torch.float16)
                    and torch.backends.mkldnn.is_available()):
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
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy every checkpoint tensor into its parameter; missing/unexpected -> error."""
        params = dict(self.named_parameters())
        expected: set[tuple[str, str]] = set()
        for pname, _ in params.items():
            module_name = pname.rsplit(".", 1)[0]
            module = self.get_submodule(module_name)
            if isinstance(module, Linear) and pname.endswith(".weight"):
                expected.update((pname, shard) for shard in module.output_sizes)
            elif isinstance(module, Linear) and pname.endswith(".bias"):
                expected.update((pname, shard) for shard in module.output_sizes)
            else:
                expected.add((pname, ""))
        loaded: set[tuple[str, str]] = set()
        unexpected: list[str] = []
        for raw_name, tensor in weights:
            resolved = self.resolve_param(raw_name)
            if resolved is None:
                continue
            name, target, shard = resolved
            param = params.get(target)
            if param is None:
                unexpected.append(raw_name)
                continue
            tensor = self.transform_weight(name, tensor)
            if shard:
                module = self.get_submodule(target.rsplit(".", 1)[0])
                start, size = module.shard_offsets[shard]
                dest = param.data.narrow(0, start, size)
            else:
                dest = param.data
            if tuple(dest.shape) != tuple(tensor.shape):
                raise ModelLoadError(
                    f"tensor {raw_name!r} has shape {tuple(tensor.shape)}, "
                    f"the model expects {tuple(dest.shape)}"
                )
            dest.copy_(tensor)
            loaded.add((target, shard))
        if unexpected:
            raise ModelLoadError(f"unexpected tensors in checkpoint: {_short_list(unexpected)}")
        missing = {f"{p}[{s}]" if s else p for p, s in expected - loaded}
        if missing:
            raise ModelLoadError(f"tensors missing from checkpoint: {_short_list(missing)}")
