"""Fused CPU kernels (csrc/*.cpp), compiled on first use with torch's C++ extension tools.

Only csrc/bindings.cpp includes pybind11 and torch's Tensor casters; the kernel files include
ATen's core headers alone, so ninja compiles them beside it on the other core (a level builds in
60-90 s on 2 cores, where every file parsing <torch/extension.h> took minutes).

The kernels are built once per instruction-set level (`cpu_isa.ISA_FLAGS`), never with
`-march=native`: the level is chosen at run time from the CPU's flags (`cpu_isa.select_isa`), so
a cache shared between machines never hands an AVX-512 build to an AVX2 CPU. The levels: `avx2`
(`maddubs` integer dots), `avxvnni` (the same kernels with 256-bit `vpdpbusd`: Intel cores from
Alder Lake on, the usual laptop and desktop CPU without AVX-512), `avx512` (VNNI) and `amx`
(AVX-512 plus the tiles).
`TOKENMILL_CPU_ISA=reference|avx2|avxvnni|avx512|amx` forces a level (tests and benchmarks run
every level the machine supports); `reference` keeps the kernels of the best level for everything
but the quantized matmuls, which then run dense.

`get_ops()` returns the compiled module of the selected level, or None when it cannot be built
(no compiler / ninja, TOKENMILL_DISABLE_CPU_KERNELS=1): callers then use their pure-PyTorch
path, which is also the reference the kernels are tested against. With
TOKENMILL_REQUIRE_CPU_KERNELS=1 (CI) a failed build raises instead.

The build is cached in a directory named by a hash of the sources, the level, the flags, the
torch version and the compiler (under $XDG_CACHE_HOME/tokenmill or ~/.cache/tokenmill), with the
sources copied in, so every checkout and every virtualenv with the same torch and compiler
shares one build per level and only the first process pays for it. A finished build is imported
directly, without torch's ninja step: ninja would compare the include paths of the virtualenv
that built it with this one's and compile again. A build killed half-way leaves torch's lock
file behind, which would make every later process wait forever: a lock older than
`STALE_LOCK_SECONDS` is removed. Two processes starting together build once (the second waits
on the lock). `scripts/setup.sh` builds the level of the machine, so `serve` finds it ready.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import logging
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from tokenmill.kernels.cpu_isa import ISA_FLAGS, select_isa, weight_prefetch

logger = logging.getLogger(__name__)
_SOURCES = [
    Path(__file__).parent / "csrc" / name
    for name in (
        "bindings.cpp",
        "cpu_ops.cpp",
        "cpu_ops.h",
        "decode_attention.h",
        "decode_attention_avx512.h",
        "decode_attention_avx2.h",
        "sampling.h",
        "quant_gemm.cpp",
        "quant_gemm.h",
        "quant_common.h",
        "quant_act.h",
        "quant_vec.h",
        "quant_block.h",
        "quant_streaming.h",
        "quant_batch_acts.h",
        "quant_batch_kernels.h",
        "quant_batched.h",
        "quant_amx.h",
        "quant_dispatch.h",
        "decode_stack.cpp",
        "decode_stack.h",
        "dense_gemm.cpp",
        "dense_gemm.h",
        "dense_stream.h",
        "dense_tiles.h",
        "dense_dot_bf16.h",
        "linear_kernel.h",
        "gguf_repack.cpp",
        "gguf_repack.h",
        "gguf_decode.h",
        "prefill_attention.cpp",
        "prefill_attention.h",
        "prefill_blocks.h",
        "vec_math.h",
        "gguf_types.h",
        "amx.h",
    )
]
_NAME = "tokenmill_cpu_ops"
_COMMON = ["-O3", "-fopenmp", "-ffast-math", "-mtune=generic"]


def compile_flags(isa: str) -> list[str]:
    """The compiler flags of kernel level `isa` (beside torch's own: includes, -std, -fPIC)."""
    return _COMMON + ISA_FLAGS[isa]


_LDFLAGS = ["-fopenmp"]
STALE_LOCK_SECONDS = 600.0
_lock = threading.Lock()
_built: dict[str, Any] = {}


@functools.lru_cache(maxsize=1)
def compiler_identity() -> str:
    """The C++ compiler torch's extension builder will run ($CXX or c++) and its version."""
    cxx = os.environ.get("CXX", "c++")
    path = shutil.which(cxx)
    if path is None:
        return f"{cxx} (not found)"
    try:
        version = subprocess.run(
            [path, "-dumpfullversion", "-dumpversion"], capture_output=True, text=True, timeout=30
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        version = "?"
    return f"{os.path.realpath(path)} {version}"


def build_directory(isa: str) -> Path:
    import torch

    h = hashlib.sha256()
    for src in _SOURCES:
        h.update(src.name.encode() + b"\0" + src.read_bytes())
    h.update(
        " ".join(
            [isa, *compile_flags(isa), *_LDFLAGS, torch.__version__, compiler_identity()]
        ).encode()
    )
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tokenmill"
    return root / "kernels" / f"{isa}-{h.hexdigest()[:16]}"


def _prepare(build_dir: Path, isa: str) -> list[str]:
    """Copy the sources into the build directory (stable paths across checkouts) and clear a
    stale lock; returns the .cpp copies."""
    src_dir = build_dir / "src"
    src_dir.mkdir(parents=True, exist_ok=True)
    copies = []
    for src in _SOURCES:
        dst = src_dir / src.name
        if not dst.exists() or dst.read_bytes() != src.read_bytes():
            shutil.copyfile(src, dst)
        if dst.suffix == ".cpp":
            copies.append(str(dst))
    lock = build_dir / "lock"
    if lock.exists():
        age = time.time() - lock.stat().st_mtime
        if age > STALE_LOCK_SECONDS:
            logger.warning("removing a stale kernel build lock (%.0f s old): %s", age, lock)
            lock.unlink(missing_ok=True)
        else:
            logger.info("waiting for another process that is compiling the CPU kernels")
    return copies


def _import_built(build_dir: Path, isa: str) -> Any:
    """The finished build in `build_dir` as a module, or None when there is none yet."""
    so = build_dir / f"{_NAME}_{isa}.so"
    if not so.exists() or (build_dir / "lock").exists():
        return None
    spec = importlib.util.spec_from_file_location(f"{_NAME}_{isa}", so)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _compile(build_dir: Path, isa: str) -> Any:
    """Build (or wait for another process's build of) level `isa`, saying so while it runs."""
    from torch.utils.cpp_extension import load

    sources = _prepare(build_dir, isa)
    done = threading.Event()
    building = not (build_dir / "lock").exists()
    if building:
        logger.warning(
            "compiling the %s CPU kernels once, 60-90 s per level on 2 cores (cached in %s)",
            isa,
            build_dir,
        )

    def progress() -> None:
        t0 = time.monotonic()
        while not done.wait(15.0):
            logger.warning(
                "... still %s the %s CPU kernels (%.0f s)",
                "compiling" if building else "waiting for",
                isa,
                time.monotonic() - t0,
            )

    ticker = threading.Thread(target=progress, daemon=True)
    ticker.start()
    try:
        return load(
            name=f"{_NAME}_{isa}",
            sources=sources,
            extra_cflags=compile_flags(isa),
            extra_ldflags=list(_LDFLAGS),
            build_directory=str(build_dir),
            verbose=False,
        )
    finally:
        done.set()


def load_ops(isa: str) -> Any:
    """The compiled module for kernel level `isa` (built on first use), or None if it cannot be
    built; raises instead under TOKENMILL_REQUIRE_CPU_KERNELS=1."""
    with _lock:
        if isa in _built:
            return _built[isa]
        if os.environ.get("TOKENMILL_DISABLE_CPU_KERNELS") == "1":
            return None
        ops = None
        try:
            build_dir = build_directory(isa)
            ops = _import_built(build_dir, isa) or _compile(build_dir, isa)
        except Exception as e:  # no compiler, no ninja, unsupported platform...
            if os.environ.get("TOKENMILL_REQUIRE_CPU_KERNELS") == "1":
                raise RuntimeError(f"the {isa} CPU kernels failed to build: {e}") from e
            logger.warning(
                "fused CPU kernels unavailable (%s: %s); using the PyTorch path",
                type(e).__name__,
                str(e).splitlines()[0] if str(e) else "",
            )
        if ops is not None:
            l1, l2, why = weight_prefetch()
            ops.set_weight_prefetch(l1, l2)
            logger.debug("weight prefetch: %d bytes ahead into L1, %d into L2 (%s)", l1, l2, why)
        _built[isa] = ops
        return ops


def get_ops() -> Any:
    """The kernels of the level `select_isa` picks now (None: use the PyTorch path). Called at
    load, where the backend and the quantization methods are chosen, never per op."""
    build = select_isa().build
    return load_ops(build) if build else None
