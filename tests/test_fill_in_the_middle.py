"""Fill-in-the-middle (`suffix` in /v1/completions): the code model's prefix, suffix and middle
tokens around the texts, as llama.cpp's /infill orders them; found in a GGUF file's fim ids or
by their spelling in the vocabulary."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from tokenizers import Tokenizer as RustTokenizer

from tests.gguf_builder import QT, write_tiny_llama_gguf
from tests.server_utils import ServerProcess
from tokenmill.engine.tokenizer import Tokenizer, load_tokenizer
from tokenmill.loader.load import read_model_info
from tokenmill.loader.resolve import resolve_model

FIM_IDS = {"pre": 300, "suf": 301, "mid": 302}


def test_fim_tokens_found_by_their_spelling():
    info, _ = read_model_info(resolve_model(None))
    smollm = load_tokenizer(info)
    assert smollm.fim_token_ids is None  # SmolLM2's vocabulary has none
    with pytest.raises(ValueError, match="no fill-in-the-middle tokens"):
        smollm.fill_in_the_middle("a", "b")
    backend = RustTokenizer.from_str(smollm.backend.to_str())
    backend.add_special_tokens(["<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"])
    coder = Tokenizer(backend, eos_token_id=smollm.eos_token_id)
    ids = tuple(
        backend.token_to_id(t) for t in ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>")
    )
    assert coder.fim_token_ids == ids
    pre, suf, mid = ids
    prefix, suffix = "def add(a, b):\n    return ", "\n\nprint(add(1, 2))"
    want = [pre, *backend.encode(prefix, add_special_tokens=False).ids, suf]
    want += [*backend.encode(suffix, add_special_tokens=False).ids, mid]
    assert coder.fill_in_the_middle(prefix, suffix) == want


@pytest.fixture(scope="module")
def coder(tmp_path_factory) -> Path:
    """A tiny model whose GGUF file names fill-in-the-middle tokens (three filler ids)."""
    meta = {f"tokenizer.ggml.fim_{k}_token_id": i for k, i in FIM_IDS.items()}
    path = tmp_path_factory.mktemp("fim") / "coder.gguf"
    return write_tiny_llama_gguf(path, QT.Q8_0, extra_metadata=meta)


def test_suffix_in_completions(coder: Path):
    srv = ServerProcess(str(coder))
    try:
        url = srv.url + "/v1/completions"
        prefix, suffix = "the quick ", " over the lazy dog"
        body = {"model": "coder", "max_tokens": 8, "temperature": 0, "ignore_eos": True}
        fim = {"prompt": prefix, "suffix": suffix, "prompt_logprobs": 0}
        filled = httpx.post(url, json=body | fim).json()

        def ids(text: str) -> list[int]:
            r = httpx.post(
                srv.url + "/tokenize", json={"prompt": text, "add_special_tokens": False}
            )
            return r.json()["tokens"]

        prompt = [FIM_IDS["pre"], *ids(prefix), FIM_IDS["suf"], *ids(suffix), FIM_IDS["mid"]]
        by_hand = httpx.post(url, json=body | {"prompt": prompt}).json()
        assert filled["choices"][0]["text"] == by_hand["choices"][0]["text"]
        assert filled["usage"]["prompt_tokens"] == len(prompt)
        # prompt_logprobs name every prompt token (k = 0: only it) after the first, in order
        scored = [int(next(iter(d))) for d in filled["choices"][0]["prompt_logprobs"][1:]]
        assert scored == prompt[1:]
        for bad in ({"echo": True}, {"prompt": [1, 2, 3]}):
            r = httpx.post(url, json=body | {"prompt": prefix, "suffix": suffix} | bad)
            assert r.status_code == 400 and r.json()["error"]["param"] == "suffix", r.text
    finally:
        assert srv.stop() == 0
