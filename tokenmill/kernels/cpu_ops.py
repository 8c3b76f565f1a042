"""Fused CPU kernels (csrc/*.cpp), compiled on first use with torch's C++ extension tools.

`get_ops()` returns the compiled module, or None when it cannot be built (no compiler / ninja,
TOKENMILL_DISABLE_CPU_KERNELS=1): callers then use their pure-PyTorch path, which is also the
reference the kernels are tested against.

The build is cached in a directory named by a hash of the sources, the flags and the torch
version (under $XDG_CACHE_HOME/tokenmill or ~/.cache/tokenmill), with the sources copied in, so
every checkout of the same code shares one build and only the first process pays for it. A
build killed half-way leaves torch's lock file behind, which would make every later process
wait forever: a lock older than `STALE_LOCK_SECONDS` is removed.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)
_SOURCES = [Path(__file__).parent / "csrc" / name for name in ("cpu_ops.cpp", "gguf_gemm.cpp")]
_NAME = "tokenmill_cpu_ops"
_CFLAGS = ["-O3", "-march=native", "-fopenmp", "-ffast-math"]
_LDFLAGS = ["-fopenmp"]
STALE_LOCK_SECONDS = 600.0
_lock = threading.Lock()
_ops: Any = None
_tried = False


def build_directory() -> Path:
    import torch

    h = hashlib.sha256()
    for src in _SOURCES:
        h.update(src.name.encode() + b"\0" + src.read_bytes())
    h.update(" ".join(_CFLAGS + _LDFLAGS + [torch.__version__]).encode())
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tokenmill"
    return root / "kernels" / h.hexdigest()[:16]


def _prepare(build_dir: Path) -> list[str]:
    """Copy the sources into the build directory (stable paths across checkouts), clear a
    stale lock, and say what is about to happen."""
    src_dir = build_dir / "src"
    src_dir.mkdir(parents=True, exist_ok=True)
    copies = []
    for src in _SOURCES:
        dst = src_dir / src.name
        if not dst.exists() or dst.read_bytes() != src.read_bytes():
            shutil.copyfile(src, dst)
        copies.append(str(dst))
    lock = build_dir / "lock"
    if lock.exists():
        age = time.time() - lock.stat().st_mtime
        if age > STALE_LOCK_SECONDS:
            logger.warning("removing a stale kernel build lock (%.0f s old): %s", age, lock)
            lock.unlink(missing_ok=True)
        else:
            logger.info("waiting for another process that is compiling the CPU kernels")
    elif not (build_dir / f"{_NAME}.so").exists():
        logger.info("compiling the fused CPU kernels (first use only, about a minute)")
    return copies


def get_ops() -> Any:
    global _ops, _tried
    if _tried:
        return _ops
    with _lock:
        if _tried:
            return _ops
        _tried = True
        if os.environ.get("TOKENMILL_DISABLE_CPU_KERNELS") == "1":
            return None
        try:
            from torch.utils.cpp_extension import load

            build_dir = build_directory()
            sources = _prepare(build_dir)
            _ops = load(name=_NAME, sources=sources, extra_cflags=list(_CFLAGS),  # load() appends
                        extra_ldflags=list(_LDFLAGS), build_directory=str(build_dir), verbose=False)
        except Exception as e:  # no compiler, no ninja, unsupported platform...
            logger.warning("fused CPU kernels unavailable (%s: %s); using the PyTorch path",
                           type(e).__name__, str(e).splitlines()[0] if str(e) else "")
            _ops = None
        return _ops


def set_enabled(enabled: bool) -> None:
    """Tests: force the PyTorch reference path (False) or re-enable the kernels (True)."""
    global _ops, _tried
    if enabled:
        _tried = False
        os.environ.pop("TOKENMILL_DISABLE_CPU_KERNELS", None)
        get_ops()
    else:
        _ops, _tried = None, True
