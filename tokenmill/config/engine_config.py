"""EngineConfig and its parts (ModelConfig, CacheConfig, SpeculativeConfig, SchedulerConfig): the
options as resolved against one model (`EngineArgs.create_engine_config`), and the values an
option may take."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported where used: `tokenmill --help` and the CLI start fast
    import torch

QUANTIZATION_MODES = ("auto", "none", "fp8")
LOAD_FORMATS = ("auto", "dummy")
# How an embedding request turns the prompt's final hidden states (after the model's last
# norm) into one vector: "last": the last token's (decoder embedding models: Qwen3-Embedding,
# e5-mistral, gte-Qwen2); "mean": the average over every prompt token; "cls": the first's.
POOLING_TYPES = ("last", "mean", "cls")


@dataclass(frozen=True)
class ModelConfig:
    """The model as the engine runs it."""

    name: str  # the model's name (a GGUF file's stem, a folder's or a Hub id's last part)
    path: str  # the GGUF file or the HF folder
    architecture: str  # e.g. "LlamaForCausalLM"
    max_position_embeddings: int  # the model's own context length
    dtype: str  # compute dtype, a name in DTYPE_SIZES (the KV cache's: CacheConfig.dtype)
    device: str  # "cpu", "cuda" or "cuda:N"
    # The longest sequence (prompt + output): the model's context length, capped by the
    # max_model_len option and by the KV cache's capacity.
    max_model_len: int
    quantization: str  # the option (QUANTIZATION_MODES); the loader decides per checkpoint
    load_format: str  # LOAD_FORMATS: real weights or random ones of the checkpoint's shapes
    # how embedding requests pool the hidden states (POOLING_TYPES): the option,
    # else what the checkpoint declares, else "last"
    pooling_type: str = "last"

    def torch_dtype(self) -> torch.dtype:
        """`dtype` as a torch dtype."""
        import torch

        return getattr(torch, self.dtype)


@dataclass(frozen=True)
class CacheConfig:
    """The paged KV cache: `num_blocks` blocks of `block_size` tokens each."""

    block_size: int  # tokens per block
    num_blocks: int
    # keys and values of every layer (kv_cache_bytes_per_token; with a draft model, its too)
    bytes_per_token: int
    enable_prefix_caching: bool  # blocks of identical prompt prefixes are shared
    dtype: str = "float32"  # the keys' and values' dtype, a name in DTYPE_SIZES

    def torch_dtype(self) -> torch.dtype:
        """`dtype` as a torch dtype."""
        import torch

        return getattr(torch, self.dtype)

    @property
    def capacity_tokens(self) -> int:
        """Tokens the whole cache holds."""
        return self.num_blocks * self.block_size

    @property
    def reserved_bytes(self) -> int:
        """Bytes the whole cache reserves."""
        return self.capacity_tokens * self.bytes_per_token


SPECULATIVE_METHODS = ("ngram", "draft_model")


@dataclass(frozen=True)
class SpeculativeConfig:
    """Speculative decoding (vLLM's `speculative_config`): each decoding request whose next
    tokens need nothing from the host in between (no grammar, penalties, logit bias or
    logprobs, min_tokens reached) gets up to `num_speculative_tokens` draft tokens per step,
    checked in the same forward pass; the output follows the same distribution as without.
    "ngram" drafts by prompt lookup (`core/spec_decode.py`): the tokens that followed the last
    earlier occurrence of the sequence's last n tokens, n from prompt_lookup_max down to
    prompt_lookup_min. "draft_model" (the method when `model` is given, as in vLLM) drafts with
    a smaller model of the same vocabulary, greedily, after each step (`worker/draft.py`); its
    KV cache mirrors the target's blocks. Steps with more running sequences than
    `disable_by_batch_size` draft nothing (a big batch is compute-bound, where rejected drafts
    cost real work)."""

    method: str
    num_speculative_tokens: int
    prompt_lookup_min: int = 5
    prompt_lookup_max: int = 5
    disable_by_batch_size: int | None = None
    model: str | None = None  # the draft model (a GGUF file or a folder), for "draft_model"
    quantization: str | None = None  # the draft's --quantization (default: the target's)

    @classmethod
    def parse(cls, value: str | dict[str, Any]) -> SpeculativeConfig:
        """From vLLM's JSON / dict form, e.g. {"method": "ngram", "num_speculative_tokens": 4,
        "prompt_lookup_max": 4} or {"model": "draft.gguf", "num_speculative_tokens": 4};
        errors name the offending key."""
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise ValueError(f"speculative_config is not valid JSON: {e}") from None
        if not isinstance(value, dict):
            raise ValueError("speculative_config must be a JSON object")
        known = {
            "method",
            "num_speculative_tokens",
            "prompt_lookup_min",
            "prompt_lookup_max",
            "disable_by_batch_size",
            "model",
            "quantization",
        }
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(
                f"speculative_config: unsupported key(s) {', '.join(unknown)} (supported: "
                f"{', '.join(sorted(known))})"
            )
        model = value.get("model")
        if model is not None and (not isinstance(model, str) or not model):
            raise ValueError(f"speculative_config: model must be a path, got {model!r}")
        method = value.get("method", "ngram" if model is None else "draft_model")
        if method not in SPECULATIVE_METHODS:
            raise ValueError(
                f"speculative_config: method must be one of {SPECULATIVE_METHODS}, got {method!r}"
            )
        if (method == "draft_model") != (model is not None):
            raise ValueError(
                "speculative_config: a draft model needs method draft_model (or none) and a model"
                if model is not None
                else "speculative_config: method draft_model needs a model (the draft's path)"
            )
        if model is not None and {"prompt_lookup_min", "prompt_lookup_max"} & set(value):
            raise ValueError("speculative_config: prompt_lookup_min/max are for method ngram")
        quantization = value.get("quantization")
        if quantization is not None and (model is None or quantization not in QUANTIZATION_MODES):
            raise ValueError(
                "speculative_config: quantization is a draft model's, one of "
                f"{QUANTIZATION_MODES}, got {quantization!r}"
            )

        def integer(key: str, default: int | None) -> int | None:
            v = value.get(key, default)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise ValueError(f"speculative_config: {key} must be an integer >= 1, got {v!r}")
            return v

        k = integer("num_speculative_tokens", None)
        if k is None:
            raise ValueError("speculative_config: num_speculative_tokens is required")
        lo, hi = integer("prompt_lookup_min", None), integer("prompt_lookup_max", None)
        # vLLM's defaults: 5 and 5, or the one given for both
        lo, hi = lo or hi or 5, hi or lo or 5
        if lo > hi:
            raise ValueError(
                f"speculative_config: prompt_lookup_min ({lo}) > prompt_lookup_max ({hi})"
            )
        return cls(method, k, lo, hi, integer("disable_by_batch_size", None), model, quantization)


@dataclass(frozen=True)
class SchedulerConfig:
    """Per-step budgets. max_num_batched_tokens bounds the tokens of one forward pass."""

    max_num_batched_tokens: int
    max_num_seqs: int  # sequences (each sample of a request counts) per step
    max_model_len: int  # a sequence stops here (ModelConfig.max_model_len)
    enable_chunked_prefill: bool = True  # a prompt may be split across steps
    # Decode steps per scheduling round when every running request is decoding, nothing waits
    # and no request needs the host between tokens (Scheduler.schedule): the sampled tokens
    # are fed back on the device and come back to the host once per round.
    num_scheduler_steps: int = 1
    speculative: SpeculativeConfig | None = None  # draft tokens per decode (single steps)
    max_loras: int = 0  # distinct LoRA adapters running at once (0: LoRA off)

    def __post_init__(self) -> None:
        if self.speculative is not None and self.num_scheduler_steps > 1:
            raise ValueError("speculative decoding and num_scheduler_steps > 1 exclude each other")
        if self.num_scheduler_steps < 1:
            raise ValueError("num_scheduler_steps must be >= 1")
        if self.max_num_batched_tokens < 1:
            raise ValueError("max_num_batched_tokens must be >= 1")
        if self.max_num_seqs < 1:
            raise ValueError("max_num_seqs must be >= 1")
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError(
                f"without chunked prefill, max_num_batched_tokens ({self.max_num_batched_tokens}) "
                f"must be >= max_model_len ({self.max_model_len})"
            )


@dataclass(frozen=True)
class EngineConfig:
    """Every option resolved against one model, read by the engine and `tokenmill info`."""

    model: ModelConfig
    cache: CacheConfig
    scheduler: SchedulerConfig
    cuda_graphs: bool  # pure-decode steps replay captured CUDA graphs (CUDA, not enforce_eager)
    tensor_parallel_size: int = 1  # ranks that split the model (the cache's sizes are per rank)
