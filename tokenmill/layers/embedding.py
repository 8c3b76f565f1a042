"""Token embedding whose table is stored by an EmbeddingMethod (dense, or GGUF's rows)."""

from __future__ import annotations

import torch

from tokenmill.quant.base import EmbeddingMethod
from tokenmill.quant.dense import DenseEmbeddingMethod


class VocabEmbedding(torch.nn.Module):
    """ids [...] -> rows [..., dim] in `dtype`."""

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        dtype: torch.dtype,
        quant_method: EmbeddingMethod | None = None,
    ) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.dtype = num_embeddings, embedding_dim, dtype
        self.quant_method = quant_method or DenseEmbeddingMethod()
        self.quant_method.create_weights(self, num_embeddings, embedding_dim, dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.quant_method.lookup(self, ids)

    def dense_weight(self) -> torch.Tensor | None:
        return self.quant_method.dense_weight(self)
