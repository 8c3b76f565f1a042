"""Split GGUF models (llama.cpp's gguf-split naming, written here by gguf-py's writer): any shard
or the folder loads the whole model, which computes exactly what the same model in one file
does; missing or inconsistent shards are clear errors."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from gguf import GGMLQuantizationType as QT

from tests.gguf_builder import write_tiny_llama_gguf
from tests.helpers import prompt_logits
from tokenmill import LLM
from tokenmill.errors import ModelLoadError
from tokenmill.loader.gguf_file import open_gguf
from tokenmill.loader.resolve import resolve_model

PROMPTS = ["hello world, this is a test", "the quick brown fox"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("split")
    (root / "one").mkdir()
    (root / "split").mkdir()
    single = write_tiny_llama_gguf(root / "one" / "tiny.gguf", QT.Q4_K, seed=3)
    first = write_tiny_llama_gguf(
        root / "split" / "tiny.gguf", QT.Q4_K, seed=3, split_max_tensors=6
    )
    return single, first


def _logits(path) -> list[torch.Tensor]:
    llm = LLM(model=str(path), dtype="float32", max_model_len=256, kv_cache_memory_gib=0.05)
    engine = llm.engine
    prompts = [engine.tokenizer.encode(p) for p in PROMPTS]
    return prompt_logits(engine.model, prompts, num_blocks=32)


def test_split_model_computes_what_the_single_file_does(files):
    single, first = files
    shards = sorted(first.parent.glob("*.gguf"))
    assert [p.name for p in shards] == [f"tiny-{i:05d}-of-00004.gguf" for i in range(1, 5)]
    reader = open_gguf(shards[2])  # any shard opens the set
    assert reader.paths == [str(p) for p in shards]
    assert {t.name for t in reader.tensors} == {t.name for t in open_gguf(single).tensors}
    ref = _logits(single)
    for model in (first, shards[3], first.parent):
        source = resolve_model(model)
        assert source.path == first and source.name == "tiny"
        for a, b in zip(_logits(model), ref):
            assert torch.equal(a, b)
    llm = LLM(model=str(first.parent), max_model_len=128, kv_cache_memory_gib=0.05)
    assert llm.engine.model_info.checkpoint_bytes == sum(os.path.getsize(p) for p in shards)
    assert "Q4_K x" in llm.engine.model_info.native_weights


def test_missing_or_foreign_shards_are_clear_errors(files, tmp_path):
    _, first = files
    shards = sorted(first.parent.glob("*.gguf"))
    for p in shards[:3]:
        shutil.copy(p, tmp_path / p.name)
    with pytest.raises(ModelLoadError, match="missing: .*tiny-00004-of-00004.gguf"):
        open_gguf(tmp_path / shards[0].name)
    shutil.copy(shards[2], tmp_path / shards[3].name)  # shard 3's bytes under shard 4's name
    with pytest.raises(ModelLoadError, match="shard 2 of 4 .* its name says 3 of 4"):
        open_gguf(tmp_path / shards[0].name)
    shutil.copy(shards[0], tmp_path / "renamed.gguf")
    with pytest.raises(ModelLoadError, match="shard 1 of a model split in 4"):
        open_gguf(tmp_path / "renamed.gguf")
