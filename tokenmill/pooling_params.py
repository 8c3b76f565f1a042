"""PoolingParams: what a caller asks of an embedding request (vLLM's `PoolingParams`)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PoolingParams:
    """An embedding request: the prompt is run once (no token is generated) and its hidden
    states are pooled by the model's pooling type (`ModelConfig.pooling_type`, one of
    config.POOLING_TYPES).

    `normalize`: scale the vector to unit L2 norm (the default, as vLLM and sentence-transformers
    do for embedding models), so dot products are cosine similarities.
    """

    normalize: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.normalize, bool):
            raise ValueError("normalize must be a boolean")
