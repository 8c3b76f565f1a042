"""Engine options and their resolution (the config layer: a leaf that imports no other package).

* `engine_args`: EngineArgs, every engine option in one place, shared by the Python API and the
  CLI, and `EngineArgs.create_engine_config`, the one place they are resolved against a model.
* `resolve`: the parts of that resolution (the model, the KV cache, the scheduler), and
  `reserved_kv_bytes`, the KV budget the options give (also for `tokenmill estimate`).
* `engine_config`: EngineConfig and its parts (ModelConfig, CacheConfig, SpeculativeConfig,
  SchedulerConfig), the options as resolved, and the values an option may take.
* `memory`: dtype sizes, the KV cache's bytes per token, the KV budget on a GPU, and whether the
  CPU computes bfloat16 natively.

The names below are the layer's interface: import them from `tokenmill.config`.
"""

from tokenmill.config.engine_args import MAX_EXACT_CHANNELS, EngineArgs
from tokenmill.config.engine_config import (
    LOAD_FORMATS,
    POOLING_TYPES,
    QUANTIZATION_MODES,
    SPECULATIVE_METHODS,
    CacheConfig,
    EngineConfig,
    ModelConfig,
    SchedulerConfig,
    SpeculativeConfig,
)
from tokenmill.config.memory import (
    CUDA_MEMORY_UTILIZATION,
    DEFAULT_CPU_KV_GIB,
    DTYPE_SIZES,
    GiB,
    cpu_has_native_bf16,
    cuda_kv_budget,
    kv_cache_bytes_per_token,
)
from tokenmill.config.resolve import DEFAULT_CUDA_SCHEDULER_STEPS, reserved_kv_bytes

__all__ = [
    "CUDA_MEMORY_UTILIZATION",
    "DEFAULT_CPU_KV_GIB",
    "DEFAULT_CUDA_SCHEDULER_STEPS",
    "DTYPE_SIZES",
    "LOAD_FORMATS",
    "MAX_EXACT_CHANNELS",
    "POOLING_TYPES",
    "QUANTIZATION_MODES",
    "SPECULATIVE_METHODS",
    "CacheConfig",
    "EngineArgs",
    "EngineConfig",
    "GiB",
    "ModelConfig",
    "SchedulerConfig",
    "SpeculativeConfig",
    "cpu_has_native_bf16",
    "cuda_kv_budget",
    "kv_cache_bytes_per_token",
    "reserved_kv_bytes",
]
