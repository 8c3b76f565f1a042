"""Text <-> token ids for one model, with its special ids and its chat template.

`Tokenizer` wraps a `tokenizers.Tokenizer` (the Rust library). It is built either from a Hugging
Face folder (`tokenizer.json` + `tokenizer_config.json` [+ `chat_template.jinja`,
`generation_config.json`]) or from GGUF metadata, where llama.cpp stores the vocabulary, merges
and token types instead of a `tokenizer.json`; `gguf_tokenizer.gguf_backend` rebuilds the
equivalent pipeline.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from tokenizers import Tokenizer as RustTokenizer

from tokenmill.engine.chat_template import (
    check_chat_template,
    read_chat_template,
    render_chat_template,
)
from tokenmill.engine.gguf_tokenizer import gguf_backend
from tokenmill.errors import ModelLoadError


def _read_json(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot read {path}: {e}") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} should hold a JSON object")
    return data


def _token_content(value: Any) -> str | None:
    """tokenizer_config writes special tokens as strings or as serialized AddedToken dicts."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _as_id_list(value: Any) -> list[int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value]
    return []


class Tokenizer:
    """A model's tokenizer: encode/decode, special ids, stop ids and chat template.

    `add_bos_token` / `add_eos_token`: None trusts the backend's post-processor; True/False make
    `encode(add_special_tokens=True)` add (or not add) BOS/EOS whatever the backend does.
    """

    def __init__(
        self,
        backend: Any,
        *,
        bos_token_id: int | None = None,
        eos_token_id: int | None = None,
        extra_eos_token_ids: Iterable[int] = (),
        add_bos_token: bool | None = None,
        add_eos_token: bool | None = None,
        chat_templates: Mapping[str, str] | None = None,
        fim_token_ids: tuple[int, int, int] | None = None,
    ) -> None:
        self.backend = backend
        self._fim_ids = fim_token_ids
        self._bos_id = bos_token_id
        self._eos_id = eos_token_id
        self._eos_ids = {i for i in (eos_token_id, *extra_eos_token_ids) if i is not None}
        self._templates = dict(chat_templates or {})
        # What the backend's post-processor already adds, probed on an empty text.
        probe = backend.encode("", add_special_tokens=True).ids
        adds_bos = bos_token_id is not None and probe[:1] == [bos_token_id]
        adds_eos = (
            eos_token_id is not None and len(probe) > int(adds_bos) and probe[-1] == eos_token_id
        )
        self._prepend_bos = bool(add_bos_token) and bos_token_id is not None and not adds_bos
        self._strip_bos = add_bos_token is False and adds_bos
        self._append_eos = bool(add_eos_token) and eos_token_id is not None and not adds_eos
        self._strip_eos = add_eos_token is False and adds_eos
        special = {i for i, tok in backend.get_added_tokens_decoder().items() if tok.special}
        self._special_ids = special | self._eos_ids | ({bos_token_id} - {None})
        self._byte_reader: Any = None  # llguidance's LLTokenizer, built by token_bytes
        self._byte_reader_lock = threading.Lock()

    # ----------------------------------------------------------------------------- constructors
    @classmethod
    def from_gguf_metadata(cls, metadata: Mapping[str, Any]) -> Tokenizer:
        """Build from GGUF key/values (see `tokenmill.loader.gguf_file.gguf_metadata`)."""
        backend = gguf_backend(metadata)
        add_bos = metadata.get("tokenizer.ggml.add_bos_token")
        if add_bos is None:  # llama.cpp adds BOS to sentencepiece vocabularies unless told not to
            add_bos = metadata.get("tokenizer.ggml.model") == "llama"
        extra = [metadata.get(f"tokenizer.ggml.{k}_token_id") for k in ("eot", "eom")]
        template = metadata.get("tokenizer.chat_template")
        pre, suf, mid = (metadata.get(f"tokenizer.ggml.fim_{k}_token_id") for k in FIM_KEYS)
        fim = (pre, suf, mid) if all(isinstance(i, int) for i in (pre, suf, mid)) else None
        return cls(
            backend,
            bos_token_id=metadata.get("tokenizer.ggml.bos_token_id"),
            eos_token_id=metadata.get("tokenizer.ggml.eos_token_id"),
            extra_eos_token_ids=[i for i in extra if isinstance(i, int)],
            add_bos_token=bool(add_bos),
            add_eos_token=bool(metadata.get("tokenizer.ggml.add_eos_token", False)),
            chat_templates={"default": template} if isinstance(template, str) else None,
            fim_token_ids=fim,
        )

    @classmethod
    def from_gguf(cls, path: str | os.PathLike) -> Tokenizer:
        from tokenmill.loader.gguf_file import gguf_metadata, open_gguf

        return cls.from_gguf_metadata(gguf_metadata(open_gguf(path)))

    @classmethod
    def from_hf_dir(cls, path: str | os.PathLike) -> Tokenizer:
        """Build from a Hugging Face model or tokenizer folder."""
        path = os.fspath(path)
        tok_file = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(tok_file):
            raise ModelLoadError(f"{path} has no tokenizer.json (needed to build the tokenizer)")
        try:
            backend = RustTokenizer.from_file(tok_file)
        except Exception as e:  # noqa: BLE001  (the Rust library raises plain Exception)
            raise ModelLoadError(f"cannot load {tok_file}: {e}") from None
        config = _read_json(os.path.join(path, "tokenizer_config.json"))
        gen_config = _read_json(os.path.join(path, "generation_config.json"))

        def token_id(key: str) -> int | None:
            content = _token_content(config.get(key))
            return backend.token_to_id(content) if content is not None else None

        gen_eos = _as_id_list(gen_config.get("eos_token_id"))
        eos_id = token_id("eos_token")
        if eos_id is None and gen_eos:
            eos_id = gen_eos[0]
        bos_id = token_id("bos_token")
        if bos_id is None:
            bos_id = next(iter(_as_id_list(gen_config.get("bos_token_id"))), None)
        templates: dict[str, str] = {}
        raw = config.get("chat_template")
        if isinstance(raw, str):
            templates["default"] = raw
        elif isinstance(raw, list):
            templates.update(
                {
                    t["name"]: t["template"]
                    for t in raw
                    if isinstance(t, dict) and "name" in t and "template" in t
                }
            )
        jinja_file = os.path.join(path, "chat_template.jinja")
        if os.path.isfile(jinja_file):
            with open(jinja_file, encoding="utf-8") as f:
                templates["default"] = f.read()
        return cls(
            backend,
            bos_token_id=bos_id,
            eos_token_id=eos_id,
            extra_eos_token_ids=gen_eos,
            add_bos_token=config.get("add_bos_token"),
            add_eos_token=config.get("add_eos_token"),
            chat_templates=templates,
        )

    # ----------------------------------------------------------------------------- encode/decode
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids: list[int] = self.backend.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens:
            if self._strip_bos and ids[:1] == [self._bos_id]:
                ids = ids[1:]
            if self._strip_eos and ids[-1:] == [self._eos_id]:
                ids = ids[:-1]
            if self._prepend_bos:
                ids = [self._bos_id, *ids]
            if self._append_eos:
                ids = [*ids, self._eos_id]
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_bytes(self, ids: Sequence[int]) -> list[bytes]:
        """Each token's own bytes, before any UTF-8 decoding: a byte-level or byte-fallback
        token that holds part of a character gives that part (`decode` shows it as U+FFFD), and
        a special token its text; an id past the vocabulary gives b"". The vocabulary's byte
        reading is llguidance's (the structured outputs' library), built on the first call
        (0.3 s for 49k tokens; call with no ids to build it ahead) and kept."""
        with self._byte_reader_lock:
            if self._byte_reader is None:
                import llguidance

                self._byte_reader = llguidance.LLTokenizer(self.backend.to_str())
        reader = self._byte_reader
        n = reader.vocab_size
        return [reader.decode_bytes([i]) if 0 <= i < n else b"" for i in ids]

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def fill_in_the_middle(self, prefix: str, suffix: str) -> list[int]:
        """The prompt of a code model's fill-in-the-middle: its prefix, suffix and middle
        tokens around the two texts, in that order (llama.cpp's /infill order), after BOS where
        the model starts with one. ValueError for a model without those tokens."""
        ids = self.fim_token_ids
        if ids is None:
            raise ValueError("this model has no fill-in-the-middle tokens (suffix needs them)")
        pre, suf, mid = ids
        start = self.encode("", add_special_tokens=True)[:1]  # BOS, where the model adds one
        body = [pre, *self.encode(prefix, False), suf, *self.encode(suffix, False), mid]
        return [*start, *body] if start == [self._bos_id] else body

    @property
    def fim_token_ids(self) -> tuple[int, int, int] | None:
        """(prefix, suffix, middle) ids of a code model's fill-in-the-middle tokens: a GGUF
        file's fim_pre / fim_suf / fim_mid ids, else the first spelling of `FIM_SPELLINGS` the
        vocabulary has whole; None without them."""
        if self._fim_ids is None:
            for spelling in FIM_SPELLINGS:
                found = [self.backend.token_to_id(t) for t in spelling]
                if all(i is not None for i in found):
                    self._fim_ids = (found[0], found[1], found[2])
                    break
        return self._fim_ids

    # ----------------------------------------------------------------------------- properties
    @property
    def bos_token_id(self) -> int | None:
        return self._bos_id

    @property
    def eos_token_id(self) -> int | None:
        return self._eos_id

    @property
    def eos_token_ids(self) -> set[int]:
        """Ids that end generation: EOS plus extra stop ids (generation_config, GGUF eot/eom)."""
        return set(self._eos_ids)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def all_special_ids(self) -> set[int]:
        return set(self._special_ids)

    @property
    def chat_template(self) -> str | None:
        return self._templates.get("default") or next(iter(self._templates.values()), None)

    def use_chat_template(self, template: str) -> None:
        """Render every conversation (with tools too) with `template` instead of the model's
        templates; a template that does not compile is a ChatTemplateError now."""
        check_chat_template(template)
        self._templates = {"default": template}

    def chat_template_for(self, tools: bool = False) -> str | None:
        """The template that renders a conversation (with tools: the `tool_use` one if any)."""
        if tools and "tool_use" in self._templates:
            return self._templates["tool_use"]
        return self.chat_template

    def _token_text(self, token_id: int | None) -> str:
        text = self.id_to_token(token_id) if token_id is not None else None
        return text or ""

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        **extra: Any,
    ) -> str:
        """Render `messages` to the prompt text with the model's chat template (sandboxed);
        `extra` are the template's variables (`tools`, or a template's own such as
        `enable_thinking`). `continue_final_message`: see `render_chat_template`."""
        template = self.chat_template_for(tools=bool(extra.get("tools")))
        variables = {
            "bos_token": self._token_text(self._bos_id),
            "eos_token": self._token_text(self._eos_id),
            **extra,
        }
        return render_chat_template(
            template,
            messages,
            add_generation_prompt,
            continue_final_message=continue_final_message,
            **variables,
        )


# A GGUF file's fill-in-the-middle token ids: tokenizer.ggml.fim_{pre,suf,mid}_token_id.
FIM_KEYS = ("pre", "suf", "mid")
# Fill-in-the-middle tokens (prefix, suffix, middle) as code models spell them: Qwen2.5-Coder;
# StarCoder, SmolLM; Code Llama; DeepSeek-Coder (begin, hole, end play the same parts).
FIM_SPELLINGS = (
    ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"),
    ("<fim_prefix>", "<fim_suffix>", "<fim_middle>"),
    ("<PRE>", "<SUF>", "<MID>"),
    ("▁<PRE>", "▁<SUF>", "▁<MID>"),
    ("<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>"),
)


def load_tokenizer(info: Any, chat_template: str | None = None) -> Tokenizer:
    """The tokenizer of a loaded model (`loader.load.ModelInfo`): a GGUF file's embedded
    vocabulary, or a folder's tokenizer.json; with `chat_template` (a template, or a file
    holding one: `EngineArgs.chat_template`), rendering with that instead of the model's."""
    if info.source.kind == "gguf":
        tok = Tokenizer.from_gguf_metadata(info.metadata)
    else:
        tok = Tokenizer.from_hf_dir(info.source.path)
    if chat_template is not None:
        tok.use_chat_template(read_chat_template(chat_template))
    return tok
