"""Llama family: Llama 2/3, Mistral, Qwen2/2.5 (qkv bias), Qwen3 (q/k norm), SmolLM2."""

from __future__ import annotations

import sys
from typing import Any

import torch

from tokenmill.layers.attention import Attention, AttentionBackend, AttentionMetadata
from tokenmill.layers.embedding import VocabEmbedding
from tokenmill.layers.linear import Linear
from tokenmill.layers.lora import LoRASlots
from tokenmill.layers.norm import RMSNorm
from tokenmill.layers.ops import Rope
from tokenmill.layers.parallel import Partition, TensorParallel
from tokenmill.layers.rotary import RotaryEmbedding
from tokenmill.models.base import CausalLM, KVCache
from tokenmill.models.config import ModelArchConfig
from tokenmill.quant.base import QuantConfig
from tokenmill.quant.dense import DenseConfig

EMBEDDING = "model.embed_tokens.weight"


def _linear(
    quant: QuantConfig,
    prefix: str,
    in_features: int,
    sizes: dict[str, int],
    dtype: torch.dtype,
    bias: bool = False,
    tp: TensorParallel | None = None,
    split_dim: int = 0,
    lora: LoRASlots | None = None,
) -> Linear:
    """A Linear whose shards load from `{prefix}.{shard}.weight` (or `{prefix}.weight`); with
    `tp`, split over the ranks along `split_dim` (0: output rows, 1: input columns); with `lora`,
    holding LoRA slots."""
    names = {s: f"{prefix}.{s}.weight" if s else f"{prefix}.weight" for s in sizes}
    return Linear(
        in_features,
        sizes,
        bias=bias,
        dtype=dtype,
        quant_method=quant.linear_method(names, in_features, sizes),
        partition=None if tp is None else Partition(tp, split_dim),
        lora=lora,
    )


class LlamaAttention(torch.nn.Module):
    def __init__(
        self,
        cfg: ModelArchConfig,
        dtype: torch.dtype,
        quant: QuantConfig,
        backend: AttentionBackend,
        prefix: str,
        tp: TensorParallel | None = None,
        lora: LoRASlots | None = None,
    ) -> None:
        super().__init__()
        d = cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, d
        self.q_size, self.kv_size = cfg.num_heads * d, cfg.num_kv_heads * d
        # Checkpoint names of the fused shards: q_proj, k_proj, v_proj.
        sizes = {"q_proj": self.q_size, "k_proj": self.kv_size, "v_proj": self.kv_size}
        qkv = _linear(
            quant, prefix, cfg.hidden_size, sizes, dtype, cfg.attention_bias, tp, lora=lora
        )
        self.qkv_proj = qkv
        self.o_proj = _linear(
            quant,
            f"{prefix}.o_proj",
            self.q_size,
            {"": cfg.hidden_size},
            dtype,
            tp=tp,
            split_dim=1,
            lora=lora,
        )
        if cfg.qk_norm:
            self.q_norm = RMSNorm(d, cfg.norm_eps, dtype)
            self.k_norm = RMSNorm(d, cfg.norm_eps, dtype)
        self.qk_norm = cfg.qk_norm
        self.attn = Attention(cfg.num_heads, cfg.num_kv_heads, d, d**-0.5, backend)

    def forward(
        self,
        residual: torch.Tensor,
        delta: torch.Tensor | None,
        norm: RMSNorm,
        positions: torch.Tensor,
        rotary: RotaryEmbedding,
        rotary_tables: tuple[torch.Tensor, torch.Tensor] | None,
        kv_cache: KVCache,
        meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(r, attention(norm(r))) with r = residual + delta."""
        n, d = residual.shape[0], self.head_dim
        residual, qkv = self.qkv_proj.forward_add_norm(residual, delta, norm)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=1)
        q = q.view(n, self.num_heads, d)
        k = k.view(n, self.num_kv_heads, d)
        v = v.view(n, self.num_kv_heads, d)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        # rotary is applied by the backend as it writes the cache (one launch on Triton)
        rope = Rope(positions, rotary, rotary_tables)
        return residual, self.o_proj(self.attn.forward(q, k, v, kv_cache, meta, rope))


class LlamaMLP(torch.nn.Module):
    def __init__(
        self,
        cfg: ModelArchConfig,
        dtype: torch.dtype,
        quant: QuantConfig,
        backend: AttentionBackend,
        prefix: str,
        tp: TensorParallel | None = None,
        lora: LoRASlots | None = None,
    ) -> None:
        super().__init__()
        if cfg.hidden_act != "silu":
            raise ValueError(f"hidden_act {cfg.hidden_act!r} is not supported (only 'silu')")
        i = cfg.intermediate_size
        self.intermediate_size = i
        self.gate_up_proj = _linear(
            quant, prefix, cfg.hidden_size, {"gate_proj": i, "up_proj": i}, dtype, tp=tp, lora=lora
        )
        self.down_proj = _linear(
            quant,
            f"{prefix}.down_proj",
            i,
            {"": cfg.hidden_size},
            dtype,
            tp=tp,
            split_dim=1,
            lora=lora,
        )
        self.ops = backend.ops

    def forward(
        self, residual: torch.Tensor, delta: torch.Tensor, norm: RMSNorm
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(r, mlp(norm(r))) with r = residual + delta."""
        residual, gate_up = self.gate_up_proj.forward_add_norm(residual, delta, norm)
        return residual, self.down_proj.forward_glu(gate_up, self.ops.silu_and_mul)


class LlamaDecoderLayer(torch.nn.Module):
    def __init__(
        self,
        cfg: ModelArchConfig,
        dtype: torch.dtype,
        quant: QuantConfig,
        backend: AttentionBackend,
        prefix: str,
        tp: TensorParallel | None = None,
        lora: LoRASlots | None = None,
    ) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(cfg, dtype, quant, backend, f"{prefix}.self_attn", tp, lora)
        self.mlp = LlamaMLP(cfg, dtype, quant, backend, f"{prefix}.mlp", tp, lora)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps, dtype, backend.ops)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps, dtype, backend.ops)

    def forward(
        self,
        residual: torch.Tensor,
        delta: torch.Tensor | None,
        positions: torch.Tensor,
        rotary: RotaryEmbedding,
        rotary_tables: tuple[torch.Tensor, torch.Tensor] | None,
        kv_cache: KVCache,
        meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's input is residual + delta (delta: the previous layer's MLP output, None
        for the first); returns (its residual, its MLP output), as in the reference:
        x = x + attn(norm(x)); x = x + mlp(norm(x)). Each residual add is fused with the norm
        after it, and where the linears have a kernel for it (`Linear.forward_add_norm`), with
        the projection after that too."""
        residual, attn = self.self_attn(
            residual,
            delta,
            self.input_layernorm,
            positions,
            rotary,
            rotary_tables,
            kv_cache,
            meta,
        )
        return self.mlp(residual, attn, self.post_attention_layernorm)


class LlamaModel(torch.nn.Module):
    def __init__(
        self,
        cfg: ModelArchConfig,
        dtype: torch.dtype,
        max_positions: int,
        rope_freq_factors: torch.Tensor | None,
        quant: QuantConfig,
        backend: AttentionBackend,
        tp: TensorParallel | None = None,
        lora: LoRASlots | None = None,
    ) -> None:
        super().__init__()
        self.embed_tokens = VocabEmbedding(
            cfg.vocab_size, cfg.hidden_size, dtype, quant.embedding_method(EMBEDDING)
        )
        self.layers = torch.nn.ModuleList(
            LlamaDecoderLayer(cfg, dtype, quant, backend, f"model.layers.{i}", tp, lora)
            for i in range(cfg.num_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps, dtype, backend.ops)
        self.rotary = RotaryEmbedding(
            cfg.head_dim, max_positions, cfg.rope_theta, cfg.rope_scaling, rope_freq_factors
        )


class LlamaForCausalLM(CausalLM):
    supports_native_gguf = True
    supports_tensor_parallel = True
    supports_lora = True
    # checkpoint name fragment -> (fused module fragment, shard)
    stacked_params = {
        "q_proj": ("qkv_proj", "q_proj"),
        "k_proj": ("qkv_proj", "k_proj"),
        "v_proj": ("qkv_proj", "v_proj"),
        "gate_proj": ("gate_up_proj", "gate_proj"),
        "up_proj": ("gate_up_proj", "up_proj"),
    }

    def __init__(
        self,
        cfg: ModelArchConfig,
        dtype: torch.dtype,
        max_positions: int,
        rope_freq_factors: torch.Tensor | None = None,
        quant: QuantConfig | None = None,
        backend: AttentionBackend | None = None,
        tp: TensorParallel | None = None,
        lora: LoRASlots | None = None,
    ) -> None:
        """`cfg` is what this rank builds: with `tp`, its share of the heads and of the
        intermediate width (`ModelArchConfig.shard`). With `lora`, the decoder's linears hold
        LoRA slots (`layers.lora`)."""
        super().__init__(cfg, backend)
        self.decode_stack = None  # built after loading when every projection is native
        self.tp = tp
        self.lora_slots = lora
        quant = quant or DenseConfig()
        self.model = LlamaModel(
            cfg, dtype, max_positions, rope_freq_factors, quant, self.attn_backend, tp, lora
        )
        self._build_head(quant, cfg.hidden_size, cfg.vocab_size, dtype, EMBEDDING)

    def process_weights_after_loading(self) -> None:
        super().process_weights_after_loading()
        self.decode_stack = self._build_decode_stack()

    def _build_decode_stack(self):
        """The C++ layer loop for decode-only batches (`LlamaDecodeStack`), when every
        projection runs a native kernel or the CPU's dense kernel (`DenseLinear`: the dense
        weights a `CpuDenseLinear` took, in float32 or 16 bits beside float32 compute, or
        bfloat16 ones in bfloat16 compute where it multiplies them as they lie),
        attention runs on the CPU backend (whose cache layout the loop reads) and the layers
        need nothing the loop lacks (q/k norm, partial rotary); None otherwise, and under
        tensor parallelism, whose sums the loop does not make (the Python path runs every
        step)."""
        m, cfg = self.model, self.cfg
        linears = [
            (
                layer.self_attn.qkv_proj,
                layer.self_attn.o_proj,
                layer.mlp.gate_up_proj,
                layer.mlp.down_proj,
            )
            for layer in m.layers
        ]
        if (
            self.attn_backend.name != "cpu"
            or self.tp is not None
            or cfg.qk_norm
            or m.rotary.rotary_dim != cfg.head_dim
        ):
            return None
        native = [x for group in linears for x in group if hasattr(x, "kernel")]
        # the build the native layers' kernel objects come from (the loop's must be theirs)
        ops = native[0].quant_method.ops if native else self.attn_backend.ops.kernels
        float32 = m.norm.weight.dtype == torch.float32

        def kernel(linear: torch.nn.Module) -> Any:
            """The layer's C++ kernel object, or None where the loop cannot run it (DenseLinear
            takes float32 inputs, and bfloat16 ones where the kernel takes every row count)."""
            if hasattr(linear, "kernel"):
                return linear.kernel
            if getattr(linear, "small_batch", None) is None or not (
                float32 or linear.small_batch_rows == sys.maxsize
            ):
                return None
            bias = None if linear.bias is None else linear.bias.float()
            return ops.DenseLinear(linear.weight, bias)

        kernels = [[kernel(x) for x in group] for group in linears]
        if any(k is None for group in kernels for k in group):
            return None
        return ops.LlamaDecodeStack(
            [layer.input_layernorm.weight for layer in m.layers],
            [layer.post_attention_layernorm.weight for layer in m.layers],
            m.norm.weight,
            *[[group[j] for group in kernels] for j in range(4)],
            cfg.num_heads,
            cfg.num_kv_heads,
            cfg.head_dim,
            cfg.norm_eps,
            cfg.head_dim**-0.5,
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[KVCache],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        m = self.model
        residual = m.embed_tokens(input_ids)
        if (
            self.decode_stack is not None
            and meta.num_decode_tokens == meta.num_tokens
            and not (self.lora_slots is not None and self.lora_slots.rows)  # the loop has none
        ):
            return self.decode_stack(
                residual,
                positions,
                [kv[0] for kv in kv_caches],
                [kv[1] for kv in kv_caches],
                meta.block_tables,
                meta.seq_lens,
                meta.slot_mapping,
                meta.block_size,
                m.rotary.cos_cached,
                m.rotary.sin_cached,
            )
        tables = self.attn_backend.ops.rotary_tables(m.rotary, positions, residual.dtype)
        delta = None
        for layer, kv_cache in zip(m.layers, kv_caches):
            residual, delta = layer(residual, delta, positions, m.rotary, tables, kv_cache, meta)
        return m.norm.add_forward(residual, delta)[1]

    def input_embeddings(self) -> VocabEmbedding:
        return self.model.embed_tokens

    def normalize_name(self, name: str) -> str | None:
        if name == "lm_head.weight" and self.cfg.tie_word_embeddings:
            return None  # some tied checkpoints store the copy anyway
        return name
