"""A GGUF file's tokenizer as a `tokenizers.Tokenizer`: llama.cpp stores the vocabulary, merges
and token types in the metadata instead of a `tokenizer.json`; `gguf_backend` rebuilds the
equivalent pipeline (byte-level BPE or sentencepiece)."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as RustTokenizer

from tokenmill.errors import ModelLoadError

logger = logging.getLogger(__name__)

# llama.cpp token types (gguf.TokenType)
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6
_SPM_SPACE = "\u2581"  # sentencepiece's visible space

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# `tokenizer.ggml.pre` -> the split the merges were learned with. Anything else gets GPT-2's.
_SPLIT_BY_PRE: dict[str, str] = {
    **dict.fromkeys(
        ("llama3", "llama-v3", "llama-bpe", "smaug-bpe", "falcon3", "dbrx"), _LLAMA3_SPLIT
    ),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "megrez"), _QWEN2_SPLIT),
    **dict.fromkeys(("gpt-4o", "llama4"), _GPT4O_SPLIT),
}
# llama.cpp splits every digit off first for these (as their own tokenizer.json files do)
_DIGITS_FIRST_PRE = {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"}
_GPT2_PRE = {"default", "gpt2", "gpt-2", "mpt", "olmo", "jais"}


@lru_cache(maxsize=1)
def byte_level_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character table (how byte-level vocabularies spell bytes)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _gguf_merges(metadata: Mapping[str, Any]) -> list[tuple[str, str]] | None:
    raw = metadata.get("tokenizer.ggml.merges")
    if raw is None:
        return None
    merges = []
    for line in raw:
        left, _, right = line.partition(" ")
        merges.append((left, right))
    return merges


def merges_from_scores(
    tokens: Sequence[str], scores: Sequence[float], token_types: Sequence[int]
) -> list[tuple[str, str]]:
    """BPE merges equivalent to sentencepiece's score-driven merging: every way to split a token
    into two vocabulary pieces, best score first (ties: longer left, then longer right piece).

    Control, byte and unknown tokens are never the result of a merge in sentencepiece, so they
    produce none here.
    """
    vocab = {tok: i for i, tok in enumerate(tokens)}
    candidates: list[tuple[float, str, str]] = []
    seen: set[str] = set()
    for index, tok in enumerate(tokens):
        kind = token_types[index] if index < len(token_types) else _NORMAL
        if tok in seen or kind in (_CONTROL, _BYTE, _UNKNOWN):
            continue
        seen.add(tok)
        pairs = [(tok[:k], tok[k:]) for k in range(1, len(tok))]
        pairs = sorted(
            ((lt, rt) for lt, rt in pairs if lt in vocab and rt in vocab),
            key=lambda p: (vocab[p[0]], vocab[p[1]]),
        )
        candidates.extend((float(scores[index]), lt, rt) for lt, rt in pairs)
    # a stable sort keeps vocabulary order among exact ties
    candidates.sort(key=lambda c: (c[0], len(c[1]), len(c[2])), reverse=True)
    return [(lt, rt) for _, lt, rt in candidates]


def _byte_level_backend(metadata: Mapping[str, Any], tokens: list[str], types: list[int]) -> Any:
    alphabet = byte_level_alphabet()
    chars = set(alphabet.values())
    vocab: dict[str, int] = {}
    for i, tok in enumerate(tokens):
        # Control / user-defined tokens keep their spelling: they are matched whole in the text
        # and decoded verbatim. Normal tokens must be in the byte alphabet; respell any that aren't.
        kind = types[i] if i < len(types) else _NORMAL
        if kind in (_CONTROL, _USER_DEFINED) or set(tok) <= chars:
            vocab[tok] = i
        else:
            vocab["".join(alphabet[b] for b in tok.encode("utf-8"))] = i
    merges = _gguf_merges(metadata)
    if merges is None:
        raise ModelLoadError("GGUF byte-level BPE tokenizer has no 'tokenizer.ggml.merges'")
    backend = RustTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    pre = metadata.get("tokenizer.ggml.pre") or "default"
    if pre in _SPLIT_BY_PRE:
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_SPLIT_BY_PRE[pre]), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    else:
        if pre not in _GPT2_PRE | _DIGITS_FIRST_PRE:
            logger.warning("GGUF pre-tokenizer %r is not known; using GPT-2's split", pre)
        steps = [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
        if pre in _DIGITS_FIRST_PRE:
            steps.insert(0, pre_tokenizers.Digits(individual_digits=True))
        backend.pre_tokenizer = pre_tokenizers.Sequence(steps)
    backend.decoder = decoders.ByteLevel()
    return backend


def _sentencepiece_backend(metadata: Mapping[str, Any], tokens: list[str], types: list[int]) -> Any:
    merges = _gguf_merges(metadata)
    if merges is None:
        scores = metadata.get("tokenizer.ggml.scores")
        if scores is None:
            raise ModelLoadError("GGUF sentencepiece tokenizer has neither merges nor scores")
        merges = merges_from_scores(tokens, scores, types)
    unk_id = metadata.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[unk_id] if isinstance(unk_id, int) and 0 <= unk_id < len(tokens) else None
    vocab = {tok: i for i, tok in enumerate(tokens)}
    model = models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True)
    backend = RustTokenizer(model)
    add_prefix = bool(metadata.get("tokenizer.ggml.add_space_prefix", True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement=_SPM_SPACE, prepend_scheme="first" if add_prefix else "never", split=False
    )
    steps = [decoders.Replace(_SPM_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    backend.decoder = decoders.Sequence(steps)
    return backend


def gguf_backend(metadata: Mapping[str, Any]) -> Any:
    """A `tokenizers.Tokenizer` equivalent to the one GGUF metadata describes."""
    kind = metadata.get("tokenizer.ggml.model")
    tokens = metadata.get("tokenizer.ggml.tokens")
    if not tokens:
        raise ModelLoadError("GGUF file has no tokenizer vocabulary ('tokenizer.ggml.tokens')")
    tokens = [str(t) for t in tokens]
    types = [int(t) for t in metadata.get("tokenizer.ggml.token_type") or ()]
    if kind == "gpt2":
        backend = _byte_level_backend(metadata, tokens, types)
    elif kind == "llama":
        backend = _sentencepiece_backend(metadata, tokens, types)
    else:
        raise ModelLoadError(
            f"GGUF tokenizer model {kind!r} is not supported (supported: 'gpt2', 'llama')"
        )
    # Control tokens (e.g. <|im_start|>) are matched whole and are special; user-defined ones
    # (e.g. <think>) are matched whole but decoded like text.
    control = [
        AddedToken(t, special=True, normalized=False)
        for t, k in zip(tokens, types)
        if k == _CONTROL
    ]
    user = [
        AddedToken(t, special=False, normalized=False)
        for t, k in zip(tokens, types)
        if k == _USER_DEFINED
    ]
    if control:
        backend.add_special_tokens(control)
    if user:
        backend.add_tokens(user)
    if backend.get_vocab_size(with_added_tokens=True) != len(tokens):
        logger.warning(
            "GGUF tokenizer grew from %d to %d tokens while adding special tokens",
            len(tokens),
            backend.get_vocab_size(with_added_tokens=True),
        )
    return backend
