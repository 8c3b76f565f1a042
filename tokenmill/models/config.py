"""ModelArchConfig: the architecture facts a model module needs, from config.json or GGUF."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from tokenmill.errors import ModelLoadError


@dataclass(frozen=True)
class ModelArchConfig:
    architecture: str  # registry key, e.g. "LlamaForCausalLM"
    model_type: str  # "llama", "mistral", "qwen2", "qwen3", "gpt2"
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    max_position_embeddings: int
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v bias (Qwen2)
    qk_norm: bool = False  # per-head RMSNorm on q and k (Qwen3)
    hidden_act: str = "silu"
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pooling_type: str | None = None  # the embedding pooling the checkpoint declares, if any
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ModelLoadError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})"
            )

    def shard(self, size: int) -> ModelArchConfig:
        """What one of `size` tensor-parallel ranks builds: its share of the query heads, the
        KV heads and the intermediate width (`layers.parallel`). Raises ModelLoadError naming
        the dimension that does not divide."""
        for what, n in (
            ("attention heads", self.num_heads),
            ("key/value heads", self.num_kv_heads),
            ("intermediate size", self.intermediate_size),
        ):
            if n % size:
                raise ModelLoadError(
                    f"tensor_parallel_size {size} must divide the model's {what} ({n})"
                )
        return dataclasses.replace(
            self,
            num_heads=self.num_heads // size,
            num_kv_heads=self.num_kv_heads // size,
            intermediate_size=self.intermediate_size // size,
        )


def _rope_from_hf(cfg: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """rope_theta and scaling from either the classic keys or transformers 5's rope_parameters."""
    params = cfg.get("rope_parameters")
    if isinstance(params, dict):
        theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
        rope_type = params.get("rope_type", params.get("type", "default"))
        return theta, None if rope_type == "default" else dict(params)
    scaling = cfg.get("rope_scaling")
    return float(cfg.get("rope_theta", 10000.0)), dict(scaling) if scaling else None


def _eos_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(value) if isinstance(value, (list, tuple)) else (int(value),)


LLAMA_LIKE = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}


def arch_config_from_hf(cfg: dict[str, Any]) -> ModelArchConfig:
    """Build from a Hugging Face config.json dict."""
    archs = cfg.get("architectures") or []
    arch = archs[0] if archs else {"gpt2": "GPT2LMHeadModel"}.get(cfg.get("model_type", ""), "")
    if arch == "GPT2LMHeadModel":
        h = cfg["n_embd"]
        return ModelArchConfig(
            architecture=arch,
            model_type="gpt2",
            vocab_size=cfg["vocab_size"],
            hidden_size=h,
            num_layers=cfg["n_layer"],
            num_heads=cfg["n_head"],
            num_kv_heads=cfg["n_head"],
            head_dim=h // cfg["n_head"],
            intermediate_size=cfg.get("n_inner") or 4 * h,
            max_position_embeddings=cfg["n_positions"],
            norm_eps=cfg.get("layer_norm_epsilon", 1e-5),
            tie_word_embeddings=cfg.get("tie_word_embeddings", True),
            hidden_act=cfg.get("activation_function", "gelu_new"),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=_eos_ids(cfg.get("eos_token_id")),
            extra={
                "scale_attn_by_inverse_layer_idx": cfg.get("scale_attn_by_inverse_layer_idx", False)
            },
        )
    if arch not in LLAMA_LIKE:
        # Let the registry produce the "supported architectures" error.
        return ModelArchConfig(
            architecture=arch or str(cfg.get("model_type")),
            model_type=str(cfg.get("model_type")),
            vocab_size=0,
            hidden_size=0,
            num_layers=0,
            num_heads=1,
            num_kv_heads=1,
            head_dim=0,
            intermediate_size=0,
            max_position_embeddings=0,
        )
    model_type = LLAMA_LIKE[arch]
    heads = cfg["num_attention_heads"]
    theta, scaling = _rope_from_hf(cfg)
    return ModelArchConfig(
        architecture=arch,
        model_type=model_type,
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        num_layers=cfg["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
        intermediate_size=cfg["intermediate_size"],
        max_position_embeddings=cfg.get("max_position_embeddings", 2048),
        norm_eps=cfg.get("rms_norm_eps", 1e-6),
        rope_theta=theta,
        rope_scaling=scaling,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        attention_bias=bool(cfg.get("attention_bias", model_type == "qwen2")),
        qk_norm=model_type == "qwen3",
        hidden_act=cfg.get("hidden_act", "silu"),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=_eos_ids(cfg.get("eos_token_id")),
    )


GGUF_ARCHS = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gpt2": "GPT2LMHeadModel",
}


# llama.cpp's enum llama_pooling_type (the `{arch}.pooling_type` key) -> config.POOLING_TYPES
GGUF_POOLING_TYPES = {1: "mean", 2: "cls", 3: "last"}


def arch_config_from_gguf(meta: dict[str, Any], tensor_names: set[str]) -> ModelArchConfig:
    """Build from GGUF metadata (llama.cpp's key names)."""
    arch = meta.get("general.architecture")
    if arch not in GGUF_ARCHS:
        raise ModelLoadError(
            f"GGUF architecture {arch!r} is not supported (supported: {sorted(GGUF_ARCHS)})"
        )

    def key(name: str, default: Any = None) -> Any:
        return meta.get(f"{arch}.{name}", default)

    heads = int(key("attention.head_count"))
    hidden = int(key("embedding_length"))
    vocab = key("vocab_size") or len(meta.get("tokenizer.ggml.tokens", ()))
    eos = meta.get("tokenizer.ggml.eos_token_id")
    common = dict(
        architecture=GGUF_ARCHS[arch],
        model_type=arch,
        vocab_size=int(vocab),
        hidden_size=hidden,
        num_layers=int(key("block_count")),
        num_heads=heads,
        num_kv_heads=int(key("attention.head_count_kv", heads)),
        head_dim=int(key("attention.key_length", hidden // heads)),
        intermediate_size=int(key("feed_forward_length")),
        max_position_embeddings=int(key("context_length", 2048)),
        tie_word_embeddings="output.weight" not in tensor_names,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=() if eos is None else (int(eos),),
        pooling_type=GGUF_POOLING_TYPES.get(key("pooling_type")),
    )
    if arch == "gpt2":
        return ModelArchConfig(
            **common,
            norm_eps=float(key("attention.layer_norm_epsilon", 1e-5)),
            hidden_act="gelu_new",
        )
    scaling = None
    if key("rope.scaling.type") == "linear":
        scaling = {"rope_type": "linear", "factor": float(key("rope.scaling.factor"))}
    return ModelArchConfig(
        **common,
        norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=float(key("rope.freq_base", 10000.0)),
        rope_scaling=scaling,
        attention_bias=arch == "qwen2",
        qk_norm=arch == "qwen3",
    )
