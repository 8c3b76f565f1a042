"""Reading GGUF files: the header parsed here, the tensor data memory-mapped, clear errors.

`gguf.GGUFReader` builds a numpy view per array element of the metadata, which takes seconds
for a tokenizer's 50-150k strings (3.4 s of a 6.4 s start for the default model). This parser
reads the same header (key/values, then tensor infos; the format is in gguf's docs) with
`struct` in tens of milliseconds, and exposes what the loader uses with GGUFReader's names:
`tensors[i].name / tensor_type / shape (GGUF order) / n_elements / n_bytes / data` (a read-only
view of the mapped file, shaped as GGUFReader shapes it). Type constants and block sizes come
from the `gguf` package. Tests check it against GGUFReader field by field.

A model split by llama.cpp's `gguf-split` (or gguf-py's writer) into `NAME-00001-of-0000N.gguf`
... `NAME-0000N-of-0000N.gguf` opens as one: any shard's path names the set, the first shard's
key/values are the model's (the others hold only `split.*`), and the tensors are all shards'.
"""

from __future__ import annotations

import os
import re
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from tokenmill.errors import ModelLoadError

GGUF_MAGIC = b"GGUF"

# GGUF value types -> (struct format, numpy dtype) for the fixed-size ones.
_SCALARS = {
    0: ("<B", np.uint8),
    1: ("<b", np.int8),
    2: ("<H", np.uint16),
    3: ("<h", np.int16),
    4: ("<I", np.uint32),
    5: ("<i", np.int32),
    6: ("<f", np.float32),
    7: ("<?", np.bool_),
    10: ("<Q", np.uint64),
    11: ("<q", np.int64),
    12: ("<d", np.float64),
}
_STRING, _ARRAY = 8, 9


@dataclass
class GGUFTensorInfo:
    name: str
    tensor_type: Any  # gguf.GGMLQuantizationType
    shape: np.ndarray  # dims in GGUF order (fastest first), as GGUFReader gives them
    n_elements: int
    n_bytes: int
    data: np.ndarray


class GGUFFile:
    """The parsed header of a GGUF file and memory-mapped views of its tensors (`paths`: the
    files they come from, one but for a split model)."""

    def __init__(self, path: str) -> None:
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        self.path = path
        self.paths = [path]
        self._map = np.memmap(path, mode="r")
        buf = memoryview(self._map)
        self._buf, self._pos = buf, 4
        version = self._u32()
        if version not in (2, 3):
            raise ValueError(f"unsupported GGUF version {version}")
        n_tensors, n_kv = self._u64(), self._u64()
        self.metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = self._str()
            self.metadata[key] = self._value(self._u32())
        infos = []
        for _ in range(n_tensors):
            name = self._str()
            dims = [self._u64() for _ in range(self._u32())]
            infos.append((name, dims, self._u32(), self._u64()))
        align = int(self.metadata.get("general.alignment", 32))
        data_start = -(-self._pos // align) * align
        self.tensors: list[GGUFTensorInfo] = []
        simple = {
            GGMLQuantizationType.F32: np.float32,
            GGMLQuantizationType.F16: np.float16,
            GGMLQuantizationType.F64: np.float64,
            GGMLQuantizationType.I8: np.int8,
            GGMLQuantizationType.I16: np.int16,
            GGMLQuantizationType.I32: np.int32,
            GGMLQuantizationType.I64: np.int64,
        }
        for name, dims, type_id, offset in infos:
            qtype = GGMLQuantizationType(type_id)
            n_el = int(np.prod(dims, dtype=np.int64)) if dims else 1
            block, type_size = GGML_QUANT_SIZES[qtype]
            n_bytes = n_el // block * type_size
            start = data_start + offset
            if start + n_bytes > len(self._map):
                raise ValueError(f"tensor {name!r} extends past the end of the file")
            np_dims = list(reversed(dims))
            if qtype in simple:
                data = self._map[start : start + n_bytes].view(simple[qtype]).reshape(np_dims)
            else:
                np_dims[-1] = np_dims[-1] // block * type_size
                data = self._map[start : start + n_bytes].reshape(np_dims)
            self.tensors.append(
                GGUFTensorInfo(name, qtype, np.array(dims, dtype=np.uint64), n_el, n_bytes, data)
            )
        del self._buf

    def _take(self, fmt: str) -> Any:
        v = struct.unpack_from(fmt, self._buf, self._pos)[0]
        self._pos += struct.calcsize(fmt)
        return v

    def _u32(self) -> int:
        return self._take("<I")

    def _u64(self) -> int:
        return self._take("<Q")

    def _str(self) -> str:
        n = self._u64()
        s = bytes(self._buf[self._pos : self._pos + n]).decode("utf-8", errors="replace")
        self._pos += n
        return s

    def _value(self, vtype: int) -> Any:
        if vtype in _SCALARS:
            return self._take(_SCALARS[vtype][0])
        if vtype == _STRING:
            return self._str()
        if vtype == _ARRAY:
            item_type, count = self._u32(), self._u64()
            if item_type in _SCALARS:
                dtype = np.dtype(_SCALARS[item_type][1]).newbyteorder("<")
                arr = np.frombuffer(self._buf, dtype=dtype, count=count, offset=self._pos)
                self._pos += count * dtype.itemsize
                return arr.tolist()
            return [self._value(item_type) for _ in range(count)]
        raise ValueError(f"unknown GGUF value type {vtype}")


# llama.cpp's shard names (llama_split_path): PREFIX-%05d-of-%05d.gguf, numbered from 1.
_SHARD_NAME = re.compile(r"^(?P<prefix>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")


def shard_paths(path: str | os.PathLike) -> list[str] | None:
    """Every shard's path of the split model whose shard `path` is (by its name), or None."""
    path = os.fspath(path)
    m = _SHARD_NAME.match(os.path.basename(path))
    if m is None or int(m["count"]) < 1 or not 1 <= int(m["no"]) <= int(m["count"]):
        return None
    folder, count = os.path.dirname(path), int(m["count"])
    return [
        os.path.join(folder, f"{m['prefix']}-{i:05d}-of-{count:05d}.gguf")
        for i in range(1, count + 1)
    ]


def open_gguf(path: str | os.PathLike) -> GGUFFile:
    """The parsed GGUF file at `path`, or the whole split model whose shard it is; any malformed,
    truncated or missing file -> ModelLoadError."""
    named = _open_one(os.fspath(path))
    count = int(named.metadata.get("split.count", 1))
    if count <= 1:
        return named
    paths = shard_paths(path)
    if paths is None or len(paths) != count:
        raise ModelLoadError(
            f"{named.path} is shard {int(named.metadata.get('split.no', 0)) + 1} of a model split "
            f"in {count}, but its name is not NAME-0000i-of-{count:05d}.gguf, which is how the "
            "other shards are found"
        )
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise ModelLoadError(f"shards of the split model are missing: {', '.join(missing)}")
    shards = [named if os.path.samefile(p, named.path) else _open_one(p) for p in paths]
    names: set[str] = set()
    for i, shard in enumerate(shards):
        no, n = shard.metadata.get("split.no"), shard.metadata.get("split.count")
        if no != i or n != count:
            raise ModelLoadError(
                f"{shard.path} says it is shard {no} of {n} (from 0); its name says {i} of {count}"
            )
        for t in shard.tensors:
            if t.name in names:
                raise ModelLoadError(f"tensor {t.name!r} is in more than one shard ({shard.path})")
            names.add(t.name)
    merged = shards[0]  # its key/values are the model's
    expected = int(merged.metadata.get("split.tensors.count", len(names)))
    if len(names) != expected:
        raise ModelLoadError(
            f"the split model's shards hold {len(names)} tensors; its first shard says {expected}"
        )
    merged.tensors = [t for shard in shards for t in shard.tensors]
    merged.paths = paths
    return merged


def _open_one(path: str) -> GGUFFile:
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise ModelLoadError(f"{path} is not a GGUF file (magic bytes {magic!r}, expected b'GGUF')")
    try:
        return GGUFFile(path)
    except Exception as e:  # struct.error, ValueError, MemoryError... on damaged files
        raise ModelLoadError(
            f"{path} is not a valid GGUF file (truncated or corrupt): {type(e).__name__}: {e}"
        ) from None


def gguf_metadata(reader: GGUFFile) -> dict[str, Any]:
    """All key/value fields as plain Python values (str, int, float, bool, list)."""
    return dict(reader.metadata)
