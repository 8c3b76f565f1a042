"""LoRA adapters in PEFT's format (a folder with adapter_config.json and
adapter_model.safetensors), read against a loaded model's LoRA-capable linears."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from tokenmill.errors import ModelLoadError
from tokenmill.layers.linear import Linear
from tokenmill.models.base import CausalLM

# base_model.model.<module>.lora_A.weight (older PEFT versions kept the adapter's name in it)
_TENSOR = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.\w+)?\.weight$"
)


@dataclass(frozen=True)
class LoRAAdapter:
    """An adapter ready for the model's slots: per Linear module name, per shard of it,
    (A [r, in], scale * B [out_shard, r]) in the model's dtype."""

    name: str
    path: str
    rank: int  # the largest of its modules' ranks
    weights: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]]


def _check_config(cfg: dict, path: Path) -> None:
    """Refuse what this engine does not run (rather than run it wrong)."""
    unsupported = [
        ("peft_type", cfg.get("peft_type", "LORA") != "LORA"),
        ("use_dora", bool(cfg.get("use_dora"))),
        ("bias", cfg.get("bias", "none") != "none" or bool(cfg.get("lora_bias"))),
        ("modules_to_save", bool(cfg.get("modules_to_save"))),
        ("fan_in_fan_out", bool(cfg.get("fan_in_fan_out"))),
        ("target_parameters", bool(cfg.get("target_parameters"))),
        ("layer_replication", bool(cfg.get("layer_replication"))),
        ("trainable_token_indices", bool(cfg.get("trainable_token_indices"))),
    ]
    for key, bad in unsupported:
        if bad:
            raise ModelLoadError(
                f"LoRA adapter {path}: {key}={cfg.get(key)!r} is not supported (plain LoRA "
                "of the decoder's linear layers only)"
            )


def _alpha(cfg: dict, module: str) -> float:
    """The module's alpha: an `alpha_pattern` key its name ends with, else `lora_alpha`."""
    for key, value in (cfg.get("alpha_pattern") or {}).items():
        if re.search(rf"(^|\.){key}$", module):
            return float(value)
    return float(cfg.get("lora_alpha", 8))


def load_lora_adapter(name: str, path: str, model: CausalLM, max_rank: int) -> LoRAAdapter:
    """Read the PEFT adapter folder `path` for `model` (built with LoRA slots). Every tensor
    must be a lora_A / lora_B pair of a linear layer the model holds slots in, with its shapes
    and a rank of at most `max_rank`; anything else is a ModelLoadError naming it. Pickled
    adapters (adapter_model.bin) are refused."""
    folder = Path(path)
    cfg, file = _read_folder(folder, path)
    weights: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
    top = 0
    for module, ab in sorted(_read_pairs(file, path).items()):
        if set(ab) != {"A", "B"}:
            missing = "A" if "A" not in ab else "B"
            raise ModelLoadError(f"LoRA adapter {path}: {module} lacks lora_{missing}")
        owner, shard, layer = _adapted_layer(model, module, path)
        pair = _scaled_pair(layer, shard, module, ab["A"], ab["B"], cfg, max_rank, path)
        weights.setdefault(owner, {})[shard] = pair
        top = max(top, ab["A"].shape[0])
    if not weights:
        raise ModelLoadError(f"LoRA adapter {path}: no lora_A / lora_B tensors")
    return LoRAAdapter(name, str(folder), top, weights)


def _read_folder(folder: Path, path: str) -> tuple[dict, Path]:
    """The adapter's config (checked: `_check_config`) and its safetensors file; a
    ModelLoadError where either is missing, or where the weights are only pickled."""
    config_file = folder / "adapter_config.json"
    if not config_file.is_file():
        raise ModelLoadError(f"LoRA adapter {path}: no adapter_config.json")
    cfg = json.loads(config_file.read_text())
    _check_config(cfg, folder)
    file = folder / "adapter_model.safetensors"
    if not file.is_file():
        if (folder / "adapter_model.bin").is_file():
            raise ModelLoadError(
                f"LoRA adapter {path}: adapter_model.bin is a pickle, which is never loaded "
                "(it can run code); save the adapter as safetensors"
            )
        raise ModelLoadError(f"LoRA adapter {path}: no adapter_model.safetensors")
    return cfg, file


def _read_pairs(file: Path, path: str) -> dict[str, dict[str, torch.Tensor]]:
    """The adapter file's tensors by module name, then "A" / "B"; a ModelLoadError names any
    tensor that is not a lora_A / lora_B weight."""
    from safetensors.torch import load_file

    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for tensor_name, tensor in load_file(str(file)).items():
        m = _TENSOR.match(tensor_name)
        if m is None:
            raise ModelLoadError(
                f"LoRA adapter {path}: unsupported tensor {tensor_name} (only lora_A / lora_B "
                "weights of linear layers)"
            )
        pairs.setdefault(m["module"], {})[m["ab"]] = tensor
    return pairs


def _adapted_layer(model: CausalLM, module: str, path: str) -> tuple[str, str, Linear]:
    """The model's Linear that holds `module`'s weight: its name, the shard of it (a fused
    layer's part, else "") and the layer; a ModelLoadError where it holds no LoRA slots."""
    resolved = model.resolve_param(f"{module}.weight")
    layer = None
    if resolved is not None:
        owner = resolved[1].rsplit(".", 1)[0]
        try:
            layer = model.get_submodule(owner)
        except AttributeError:
            layer = None
    if not isinstance(layer, Linear) or layer.lora is None:
        raise ModelLoadError(
            f"LoRA adapter {path}: {module} is not a layer adapters apply to (the "
            "decoder's q/k/v/o and gate/up/down projections)"
        )
    return owner, resolved[2], layer


def _scaled_pair(
    layer: Linear,
    shard: str,
    module: str,
    a: torch.Tensor,
    b: torch.Tensor,
    cfg: dict,
    max_rank: int,
    path: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, scale * B) in the layer's LoRA dtype, once their shapes are checked against the
    layer's `shard` and their rank against `max_rank`; scale is alpha / r (alpha / sqrt(r)
    with use_rslora)."""
    r = a.shape[0]
    rows, cols = layer.full_shape(shard)  # the whole weight's, under tensor parallelism too
    want_a, want_b = (r, cols), (rows, r)
    if a.dim() != 2 or tuple(a.shape) != want_a or tuple(b.shape) != want_b:
        raise ModelLoadError(
            f"LoRA adapter {path}: {module} has A {tuple(a.shape)} and B {tuple(b.shape)}, "
            f"the model needs {want_a} and {want_b}"
        )
    if r > max_rank:
        raise ModelLoadError(
            f"LoRA adapter {path}: {module} has rank {r}, above max_lora_rank {max_rank}"
        )
    use_rslora = bool(cfg.get("use_rslora"))
    scale = _alpha(cfg, module) / (math.sqrt(r) if use_rslora else r)
    dtype = layer.lora.a.dtype
    return a.to(dtype), (b.float() * scale).to(dtype)
