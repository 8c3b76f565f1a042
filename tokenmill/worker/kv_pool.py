"""The KV-cache pool: every layer's K and V tensors, reserved without being touched.

On the CPU the pool is one private anonymous mapping. The OS hands out zero pages lazily, so a
page of it is committed (counts in the process's resident memory) only when a block on it is
first written: the resident size follows the tokens actually cached, however large the budget.
The block pool (`core/block_pool.py`) reuses already-written blocks before fresh ones, which
keeps it that way on a long-running server. Unwritten slots read as zeros, as with
`torch.zeros`. Other devices allocate zeroed tensors as before.
"""

from __future__ import annotations

import ctypes
import math
import mmap

import numpy as np
import torch

from tokenmill.models.base import KVCache

PAGE = mmap.PAGESIZE


def _libc():
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:  # pragma: no cover - not a glibc/musl system
        return None


_LIBC = _libc()


class KVPool:
    """Owns the KV caches of all layers: `caches[i] = (k, v)`, each of `shape` (the attention
    backend's `kv_cache_shape`).

    `reserved_bytes` is the pool's size; `resident_bytes()` how much of it the OS has committed
    (exact, from `mincore`, where the pool is a mapping; else the reserved size).
    """

    def __init__(
        self, num_layers: int, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
    ) -> None:
        elt = torch.empty((), dtype=dtype).element_size()
        per_tensor = math.prod(shape) * elt
        self.reserved_bytes = 2 * num_layers * per_tensor
        self._map: mmap.mmap | None = None
        if torch.device(device).type == "cpu" and self.reserved_bytes > 0:
            flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_NORESERVE", 0)
            self._map = mmap.mmap(-1, self.reserved_bytes, flags=flags)
            flat = torch.frombuffer(self._map, dtype=torch.uint8)
            views = flat.view(2 * num_layers, per_tensor).view(dtype)
            self.caches: list[KVCache] = [
                (views[2 * i].view(shape), views[2 * i + 1].view(shape)) for i in range(num_layers)
            ]
        else:
            self.caches = [
                (
                    torch.zeros(shape, dtype=dtype, device=device),
                    torch.zeros(shape, dtype=dtype, device=device),
                )
                for _ in range(num_layers)
            ]

    def resident_bytes(self) -> int:
        """Bytes of the pool the OS has committed (pages written at least once)."""
        if self._map is None or _LIBC is None:
            return self.reserved_bytes
        addr = self.caches[0][0].data_ptr()
        pages = (self.reserved_bytes + PAGE - 1) // PAGE
        vec = np.zeros(pages, dtype=np.uint8)
        rc = _LIBC.mincore(
            ctypes.c_void_p(addr),
            ctypes.c_size_t(self.reserved_bytes),
            vec.ctypes.data_as(ctypes.c_void_p),
        )
        if rc != 0:
            return self.reserved_bytes
        return int(np.count_nonzero(vec & 1)) * PAGE
