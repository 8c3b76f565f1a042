"""Fused CPU kernels (csrc/*.cpp), compiled on first use with torch's C++ extension tools.

`get_ops()` returns the compiled module, or None when it cannot be built (no compiler / ninja,
TOKENMILL_DISABLE_CPU_KERNELS=1): callers then use their pure-PyTorch path, which is also the
reference the kernels are tested against. The build is cached by torch under
~/.cache/torch_extensions, so only the first process on a machine pays for it.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)
_SOURCES = [Path(__file__).parent / "csrc" / name for name in ("cpu_ops.cpp", "gguf_gemm.cpp")]
_NAME = "tokenmill_cpu_ops"
_lock = threading.Lock()
_ops: Any = None
_tried = False


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
        if not _is_built():
            logger.info("compiling the fused CPU kernels (first use only, about a minute)")
        try:
            from torch.utils.cpp_extension import load

            _ops = load(name=_NAME, sources=[str(s) for s in _SOURCES],
                        extra_cflags=["-O3", "-march=native", "-fopenmp", "-ffast-math"],
                        extra_ldflags=["-fopenmp"], verbose=False)
        except Exception as e:  # no compiler, no ninja, unsupported platform...
            logger.warning("fused CPU kernels unavailable (%s: %s); using the PyTorch path",
                           type(e).__name__, str(e).splitlines()[0] if str(e) else "")
            _ops = None
        return _ops


def _is_built() -> bool:
    """Whether torch's extension cache already holds a build (only decides a log line)."""
    try:
        from torch.utils.cpp_extension import _get_build_directory

        return (Path(_get_build_directory(_NAME, verbose=False)) / f"{_NAME}.so").exists()
    except Exception:  # a private helper: if it moves, just say nothing
        return True


def set_enabled(enabled: bool) -> None:
    """Tests: force the PyTorch reference path (False) or re-enable the kernels (True)."""
    global _ops, _tried
    if enabled:
        _tried = False
        os.environ.pop("TOKENMILL_DISABLE_CPU_KERNELS", None)
        get_ops()
    else:
        _ops, _tried = None, True
