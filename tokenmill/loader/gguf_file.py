"""Reading GGUF files through the `gguf` package (memory-mapped), with clear errors."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from tokenmill.errors import ModelLoadError

GGUF_MAGIC = b"GGUF"


def open_gguf(path: str | os.PathLike) -> Any:
    """A `gguf.GGUFReader` over `path`; any malformed or truncated file -> ModelLoadError."""
    from gguf import GGUFReader

    path = os.fspath(path)
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise ModelLoadError(f"{path} is not a GGUF file (magic bytes {magic!r}, expected b'GGUF')")
    try:
        return GGUFReader(path, "r")
    except Exception as e:  # the reader raises many kinds on damaged files
        raise ModelLoadError(
            f"{path} is not a valid GGUF file (truncated or corrupt): {type(e).__name__}: {e}"
        ) from None


def gguf_metadata(reader: Any) -> dict[str, Any]:
    """All key/value fields as plain Python values (str, int, float, bool, list)."""
    out: dict[str, Any] = {}
    for name, fld in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        try:
            value = fld.contents()
        except Exception as e:
            raise ModelLoadError(f"GGUF field {name!r} cannot be read: {e}") from None
        if isinstance(value, np.generic):
            value = value.item()
        out[name] = value
    return out
