"""tokenmill: an LLM inference engine and OpenAI-compatible server.

The public names are imported on first use, so importing a submodule (the scheduler, the CLI's
argument parsing) does not pull in torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tokenmill.engine.llm import LLM
    from tokenmill.lora_request import LoRARequest
    from tokenmill.outputs import CompletionOutput, EmbeddingRequestOutput, RequestOutput
    from tokenmill.pooling_params import PoolingParams
    from tokenmill.sampling_params import SamplingParams

__all__ = [
    "LLM",
    "SamplingParams",
    "PoolingParams",
    "RequestOutput",
    "CompletionOutput",
    "EmbeddingRequestOutput",
    "LoRARequest",
]
__version__ = "0.1.0"

_WHERE = {
    "LLM": "tokenmill.engine.llm",
    "SamplingParams": "tokenmill.sampling_params",
    "RequestOutput": "tokenmill.outputs",
    "CompletionOutput": "tokenmill.outputs",
    "PoolingParams": "tokenmill.pooling_params",
    "EmbeddingRequestOutput": "tokenmill.outputs",
    "LoRARequest": "tokenmill.lora_request",
}


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'tokenmill' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(_WHERE[name]), name)
    globals()[name] = value
    return value
