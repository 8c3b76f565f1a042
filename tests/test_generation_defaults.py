"""`--generation-config`: the model's recommended sampling settings as the defaults of requests
that leave them out, read from a GGUF file's general.sampling keys or a folder's
generation_config.json, as llama.cpp and vLLM read them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

from tests.gguf_builder import QT, write_tiny_llama_gguf
from tests.server_utils import ServerProcess
from tokenmill.engine.generation_defaults import sampling_defaults


def _info(kind: str, path: Path | str = "", metadata: dict | None = None) -> SimpleNamespace:
    return SimpleNamespace(source=SimpleNamespace(kind=kind, path=path), metadata=metadata or {})


def test_gguf_keys() -> None:
    meta = {
        "general.sampling.temp": 0.6,
        "general.sampling.top_k": 20,
        "general.sampling.top_p": 0.95,
        "general.sampling.penalty_last_n": 64,  # no SamplingParams counterpart
        "general.name": "x",
    }
    want = {"temperature": 0.6, "top_k": 20, "top_p": 0.95}
    assert sampling_defaults("auto", _info("gguf", metadata=meta)) == want
    assert sampling_defaults("vllm", _info("gguf", metadata=meta)) == {}


def test_generation_config_json(tmp_path: Path) -> None:
    config = {
        "temperature": 0.7,
        "top_p": 0.8,
        "repetition_penalty": 1.05,
        "do_sample": True,
        "bos_token_id": 1,
        "min_p": None,
    }
    (tmp_path / "generation_config.json").write_text(json.dumps(config))
    want = {"temperature": 0.7, "top_p": 0.8, "repetition_penalty": 1.05}
    assert sampling_defaults("auto", _info("hf", tmp_path)) == want
    assert sampling_defaults(str(tmp_path), _info("gguf")) == want  # a folder named
    assert sampling_defaults("auto", _info("hf", tmp_path / "elsewhere")) == {}  # none: none
    with pytest.raises(ValueError, match="no generation_config.json"):
        sampling_defaults(str(tmp_path / "elsewhere"), _info("hf", tmp_path))


def test_invalid_settings_are_ignored(tmp_path: Path, caplog) -> None:
    (tmp_path / "generation_config.json").write_text(json.dumps({"temperature": -1}))
    assert sampling_defaults("auto", _info("hf", tmp_path)) == {}
    assert "ignoring the sampling defaults" in caplog.text


@pytest.fixture(scope="module")
def greedy_gguf(tmp_path_factory) -> Path:
    """A tiny model whose file recommends greedy decoding (temperature 0)."""
    path = tmp_path_factory.mktemp("gen") / "greedy.gguf"
    return write_tiny_llama_gguf(
        path, QT.Q8_0, extra_metadata={"general.sampling.temp": 0.0, "general.sampling.top_k": 5}
    )


def test_llm_defaults(greedy_gguf: Path) -> None:
    from tokenmill import LLM

    llm = LLM(model=str(greedy_gguf), max_model_len=128)
    params = llm.get_default_sampling_params()
    assert (params.temperature, params.top_k) == (0.0, 5)
    outs = [llm.generate("hello", None)[0].outputs[0].token_ids for _ in range(2)]
    assert outs[0] == outs[1]
    llm.close()
    llm = LLM(model=str(greedy_gguf), max_model_len=128, generation_config="vllm")
    assert llm.get_default_sampling_params().temperature == 1.0
    llm.close()


def test_server_requests_without_settings_take_the_defaults(greedy_gguf: Path) -> None:
    srv = ServerProcess("--max-num-seqs", "4", str(greedy_gguf))
    try:
        body = {"model": "greedy", "prompt": "hello", "max_tokens": 12, "seed": None}
        texts = {
            httpx.post(srv.url + "/v1/completions", json=body | {"seed": s}).json()["choices"][0][
                "text"
            ]
            for s in range(4)  # different seeds: sampled at temperature 1, they would differ
        }
        assert len(texts) == 1
        hot = {
            httpx.post(
                srv.url + "/v1/completions", json=body | {"seed": s, "temperature": 1.0}
            ).json()["choices"][0]["text"]
            for s in range(4)
        }
        assert len(hot) > 1  # the request's own setting wins
    finally:
        assert srv.stop() == 0


def test_cli_flags_left_out_take_the_defaults(greedy_gguf: Path) -> None:
    def generate(*flags: str) -> str:
        cmd = [sys.executable, "-m", "tokenmill", "generate", "hello", "--model", str(greedy_gguf)]
        res = subprocess.run(
            [*cmd, "--max-tokens", "10", "--max-model-len", "128", *flags],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert res.returncode == 0, res.stderr
        return res.stdout

    assert generate("--seed", "1") == generate("--seed", "2")  # greedy, as the file says
    hot = {generate("--seed", str(s), "--temperature", "1") for s in range(3)}
    assert len(hot) > 1
