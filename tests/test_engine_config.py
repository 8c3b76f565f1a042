"""EngineArgs.create_engine_config: max length, dtype and KV blocks resolved in one place, the
same for the engine and `tokenmill info`."""

from __future__ import annotations

import dataclasses

import pytest

from tokenmill.config import EngineArgs, GiB, ModelConfig, cpu_has_native_bf16


@pytest.fixture(scope="module")
def info():
    """The embedded model's ModelInfo (headers only)."""
    from tokenmill.loader.load import read_model_info
    from tokenmill.loader.resolve import resolve_model

    return read_model_info(resolve_model(None))[0]


def _kv_bytes_per_token(arch, dtype_size: int) -> int:
    """By hand: a key and a value vector per layer and KV head."""
    return 2 * arch.num_layers * arch.num_kv_heads * arch.head_dim * dtype_size


def test_config_is_frozen(info):
    config = EngineArgs(device="cpu", dtype="float32").create_engine_config(info)
    for obj, name in [
        (config, "model"),
        (config.model, "max_model_len"),
        (config.cache, "num_blocks"),
        (config.scheduler, "max_num_seqs"),
    ]:
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(obj, name, 1)


def test_max_model_len_capped_by_the_model_and_the_option(info):
    arch = info.arch
    assert arch.max_position_embeddings == 8192  # the embedded SmolLM2-135M
    config = EngineArgs(device="cpu", dtype="float32").create_engine_config(info)
    # default CPU budget: 2 GiB / (46080 bytes x 16 tokens) = 2912 blocks, more than 8192 tokens
    per_token = _kv_bytes_per_token(arch, 4)
    assert per_token == 30 * 2 * 3 * 64 * 4 == 46080
    assert config.cache.bytes_per_token == per_token
    assert config.cache.num_blocks == 2 * GiB // (per_token * 16) == 2912
    assert config.model.max_model_len == 8192
    assert config.scheduler.max_model_len == 8192
    config = EngineArgs(device="cpu", dtype="float32", max_model_len=512).create_engine_config(info)
    assert config.model.max_model_len == config.scheduler.max_model_len == 512


def test_max_model_len_capped_by_kv_capacity(info):
    config = EngineArgs(device="cpu", dtype="float32", num_kv_blocks=8).create_engine_config(info)
    assert (config.cache.num_blocks, config.cache.capacity_tokens) == (8, 8 * 16)
    assert config.model.max_model_len == config.scheduler.max_model_len == 128
    assert config.cache.reserved_bytes == 128 * 46080
    # a bf16 budget of 0.01 GiB: 10737418 // (23040 bytes x 16 tokens) = 29 blocks = 464 tokens
    per_token = _kv_bytes_per_token(info.arch, 2)
    assert per_token == 23040
    args = EngineArgs(device="cpu", dtype="bfloat16", kv_cache_memory_gib=0.01)
    config = args.create_engine_config(info)
    assert config.cache.num_blocks == int(0.01 * GiB // (per_token * 16)) == 29
    assert config.model.max_model_len == 464


def test_budget_without_a_block_is_an_error(info):
    with pytest.raises(ValueError, match="holds no block"):
        EngineArgs(device="cpu", kv_cache_memory_gib=1e-6).create_engine_config(info)


def test_dtype_resolution(info):
    for dtype in ("float32", "bfloat16", "float16"):
        config = EngineArgs(device="cpu", dtype=dtype).create_engine_config(info)
        assert config.model.dtype == dtype and config.model.device == "cpu"
    auto = EngineArgs(device="cpu").create_engine_config(info).model.dtype
    assert auto == ("bfloat16" if cpu_has_native_bf16() else "float32")
    config = EngineArgs(device="cpu", dtype="float16").create_engine_config(info)
    assert config.cache.bytes_per_token == _kv_bytes_per_token(info.arch, 2)


def test_kv_cache_dtype_resolution(info):
    """auto: the compute dtype, but float16 on a CPU where auto chose float32 compute; the
    option wins; the cache's bytes per token follow the cache's dtype."""
    arch = info.arch

    def cache(**kw):
        return EngineArgs(device="cpu", **kw).create_engine_config(info).cache

    auto = cache()
    assert auto.dtype == ("bfloat16" if cpu_has_native_bf16() else "float16")
    assert auto.bytes_per_token == _kv_bytes_per_token(arch, 2)
    assert cache(dtype="float32").dtype == "float32"  # a float32 asked for keeps float32 KV
    assert cache(dtype="float32").bytes_per_token == _kv_bytes_per_token(arch, 4)
    assert cache(dtype="bfloat16").dtype == "bfloat16"
    assert cache(dtype="float32", kv_cache_dtype="float16").dtype == "float16"
    assert cache(dtype="bfloat16", kv_cache_dtype="float32").bytes_per_token == (
        _kv_bytes_per_token(arch, 4)
    )
    # the same 2 GiB budget holds twice the tokens in float16 as in float32 (2912 blocks)
    per_token = _kv_bytes_per_token(arch, 2)
    assert (
        cache(dtype="float32", kv_cache_dtype="float16").num_blocks
        == 2 * GiB // (per_token * 16)
        == 5825
    )
    gpu = EngineArgs(device="cuda", dtype="bfloat16", num_kv_blocks=4)
    assert gpu.create_engine_config(info).cache.dtype == "bfloat16"  # auto: the compute dtype
    assert gpu.kv_cache_dtype_for("cuda", "float32") == "float32"
    with pytest.raises(ValueError, match="kv_cache_dtype must be auto or one of"):
        EngineArgs(kv_cache_dtype="fp8")


def test_gpu_budget_comes_from_the_callback(info):
    """On a GPU the budget is the caller's measure (the engine profiles the loaded model); it
    sees the model's config before the KV cap. Nothing here touches a GPU."""
    seen: list[ModelConfig] = []

    def budget(model: ModelConfig) -> float:
        seen.append(model)
        return 100 * 23040 * 16 + 5  # 100 blocks of float16 KV, and a few bytes to spare

    args = EngineArgs(device="cuda", dtype="float16", max_model_len=4096)
    config = args.create_engine_config(info, budget)
    assert [m.max_model_len for m in seen] == [4096]
    assert config.cache.num_blocks == 100 and config.model.max_model_len == 1600
    assert config.model.device == "cuda" and config.cuda_graphs
    eager = dataclasses.replace(args, enforce_eager=True, num_kv_blocks=4)
    assert not eager.create_engine_config(info).cuda_graphs
    with pytest.raises(ValueError, match="memory profile"):
        args.create_engine_config(info)


def test_gpu_memory_utilization_sets_the_share(monkeypatch):
    """`--gpu-memory-utilization`: the share of a GPU's memory filled, less what is in use and
    the step's peak (hand-computed; torch.cuda's memory query stands in for a GPU)."""
    import torch

    from tokenmill.config import cuda_kv_budget

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (60 * GiB, 80 * GiB))
    budget = cuda_kv_budget("cuda:0", 4 * GiB, "a test", "peak", utilization=0.5)
    assert budget == 0.5 * 80 * GiB - 20 * GiB - 4 * GiB
    assert cuda_kv_budget("cuda:0", 0, "a test", "peak") == 0.9 * 80 * GiB - 20 * GiB
    assert EngineArgs(gpu_memory_utilization=0.5).gpu_memory_utilization == 0.5
    for bad in (0, 1.5):
        with pytest.raises(ValueError, match="gpu_memory_utilization"):
            EngineArgs(gpu_memory_utilization=bad)


def _info_lines(capsys, *flags: str) -> dict[str, str]:
    from tokenmill.cli import main

    assert main(["info", *flags]) == 0
    lines = capsys.readouterr().out.splitlines()
    return {line[:28].strip(): line[28:] for line in lines}


def test_info_reports_what_the_engine_runs(capsys, info):
    """`tokenmill info` and the engine agree on the KV capacity and the (capped) max length."""
    from tokenmill import LLM

    kwargs = dict(device="cpu", dtype="float32", quantization="none", num_kv_blocks=8)
    engine = LLM(**kwargs).engine
    assert engine.config == EngineArgs(**kwargs).create_engine_config(info)
    assert (engine.kv_capacity_tokens, engine.max_model_len) == (128, 128)
    flags = [x for k, v in kwargs.items() for x in ("--" + k.replace("_", "-"), str(v))]
    shown = _info_lines(capsys, *flags)
    assert shown["KV capacity"].startswith(f"{engine.kv_capacity_tokens} tokens ")
    assert shown["max model length"] == f"{engine.max_model_len} tokens"
    assert shown["max concurrency at full ctx"] == "1.0 x 128 tokens"
    assert shown["KV cache per token"] == f"{46080 / 1024:.1f} KiB in float32"
    assert shown["compute dtype"] == "float32 on cpu"
    assert shown["embedding pooling"] == "last (the default: the checkpoint declares none)"
    shown = _info_lines(capsys, *flags, "--pooling-type", "mean")
    assert shown["embedding pooling"] == "mean (--pooling-type)"


def test_scheduler_steps_resolve_with_cuda_graphs(info):
    """Rounds of decode steps need captured graphs: 1 on the CPU by default, an error when
    asked for there; on CUDA (the resolution only: a cuda device is named, nothing runs on it)
    the default with graphs, 1 with enforce_eager or a backend that cannot be captured."""
    from tokenmill.config import DEFAULT_CUDA_SCHEDULER_STEPS

    cpu = dict(device="cpu", dtype="float32")
    assert EngineArgs(**cpu).create_engine_config(info).scheduler.num_scheduler_steps == 1
    with pytest.raises(ValueError, match="needs CUDA graphs"):
        EngineArgs(**cpu, num_scheduler_steps=4).create_engine_config(info)
    with pytest.raises(ValueError, match="num_scheduler_steps"):
        EngineArgs(**cpu, num_scheduler_steps=0)
    cuda = dict(device="cuda", dtype="bfloat16", num_kv_blocks=16)

    def steps(graphs_supported=True, **kw) -> tuple[bool, int]:
        config = EngineArgs(**cuda, **kw).create_engine_config(info, None, graphs_supported)
        return config.cuda_graphs, config.scheduler.num_scheduler_steps

    assert steps() == (True, DEFAULT_CUDA_SCHEDULER_STEPS)
    assert steps(num_scheduler_steps=16) == (True, 16)
    assert steps(enforce_eager=True) == (False, 1)
    assert steps(graphs_supported=False) == (False, 1)
    with pytest.raises(ValueError, match="needs CUDA graphs"):
        steps(enforce_eager=True, num_scheduler_steps=8)
