"""GPT-2: learned positions, LayerNorm, fused c_attn, tanh-GELU, tied output embedding."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tokenmill.layers.attention import Attention, AttentionBackend, AttentionMetadata
from tokenmill.layers.embedding import VocabEmbedding
from tokenmill.layers.linear import Linear
from tokenmill.models.base import CausalLM, KVCache
from tokenmill.models.config import ModelArchConfig
from tokenmill.quant.dense import DenseConfig

_PROJECTIONS = ("c_attn", "c_proj", "c_fc", "mlp_proj")


def _layer_norm(h: int, eps: float, dtype: torch.dtype) -> torch.nn.LayerNorm:
    ln = torch.nn.LayerNorm(h, eps=eps, dtype=dtype)
    ln.requires_grad_(False)
    return ln


class GPT2Block(torch.nn.Module):
    def __init__(
        self, cfg: ModelArchConfig, dtype: torch.dtype, layer_idx: int, backend: AttentionBackend
    ) -> None:
        super().__init__()
        h, d = cfg.hidden_size, cfg.head_dim
        self.num_heads, self.head_dim = cfg.num_heads, d
        self.ln_1 = _layer_norm(h, cfg.norm_eps, dtype)
        self.ln_2 = _layer_norm(h, cfg.norm_eps, dtype)
        self.c_attn = Linear(h, 3 * h, bias=True, dtype=dtype)
        self.c_proj = Linear(h, h, bias=True, dtype=dtype)
        self.c_fc = Linear(h, cfg.intermediate_size, bias=True, dtype=dtype)
        self.mlp_proj = Linear(cfg.intermediate_size, h, bias=True, dtype=dtype)
        scale = d**-0.5
        if cfg.extra.get("scale_attn_by_inverse_layer_idx"):
            scale /= float(layer_idx + 1)
        self.attn = Attention(cfg.num_heads, cfg.num_heads, d, scale, backend)

    def forward(self, x: torch.Tensor, kv_cache: KVCache, meta: AttentionMetadata) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = self.c_attn(self.ln_1(x)).view(n, 3, self.num_heads, self.head_dim).unbind(1)
        x = x + self.c_proj(self.attn.forward(q, k, v, kv_cache, meta))
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class GPT2LMHeadModel(CausalLM):
    def __init__(
        self,
        cfg: ModelArchConfig,
        dtype: torch.dtype,
        max_positions: int,
        rope_freq_factors: torch.Tensor | None = None,
        backend: AttentionBackend | None = None,
    ) -> None:
        super().__init__(cfg, backend)
        if cfg.hidden_act not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ValueError(f"GPT-2 activation {cfg.hidden_act!r} is not supported")
        self.wte = VocabEmbedding(cfg.vocab_size, cfg.hidden_size, dtype)
        self.wpe = torch.nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size, dtype=dtype)
        self.h = torch.nn.ModuleList(
            GPT2Block(cfg, dtype, i, self.attn_backend) for i in range(cfg.num_layers)
        )
        self.ln_f = _layer_norm(cfg.hidden_size, cfg.norm_eps, dtype)
        self.requires_grad_(False)
        self._build_head(DenseConfig(), cfg.hidden_size, cfg.vocab_size, dtype, "wte.weight")

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[KVCache],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        x = self.wte(input_ids) + self.wpe(positions)
        for block, kv_cache in zip(self.h, kv_caches):
            x = block(x, kv_cache, meta)
        return self.ln_f(x)

    def input_embeddings(self) -> VocabEmbedding:
        return self.wte

    def normalize_name(self, name: str) -> str | None:
        name = name.removeprefix("transformer.")
        if name.endswith((".attn.bias", ".attn.masked_bias")):
            return None  # causal-mask buffers some checkpoints carry
        if name == "lm_head.weight" and self.cfg.tie_word_embeddings:
            return None
        # Flatten attn./mlp. submodules into the block (one Linear per projection).
        return (
            name.replace(".attn.c_attn.", ".c_attn.")
            .replace(".attn.c_proj.", ".c_proj.")
            .replace(".mlp.c_fc.", ".c_fc.")
            .replace(".mlp.c_proj.", ".mlp_proj.")
        )

    def transform_weight(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        module = name.rsplit(".", 2)[-2]
        if self.conv1d_layout and name.endswith(".weight") and module in _PROJECTIONS:
            return tensor.t()
        return tensor

    # transformers stores projections as Conv1D ([in, out]); GGUF files store [out, in].
    conv1d_layout = True
