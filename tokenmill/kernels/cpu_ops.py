"""Fused CPU kernels (csrc/*.cpp), compiled on first use with torch's C++ extension tools.

Only csrc/bindings.cpp includes pybind11 and torch's Tensor casters; the kernel files include
ATen's core headers alone, so ninja compiles them beside it on the other core (a level builds in
60-90 s on 2 cores, where every file parsing <torch/extension.h> took minutes).

The kernels are built once per instruction-set level (`ISA_FLAGS`), never with `-march=native`:
the level is chosen at run time from the CPU's flags (`select_isa`), so a cache shared between
machines never hands an AVX-512 build to an AVX2 CPU. The levels: `avx2` (`maddubs` integer
dots), `avxvnni` (the same kernels with 256-bit `vpdpbusd`: Intel cores from Alder Lake on, the
usual laptop and desktop CPU without AVX-512), `avx512` (VNNI) and `amx` (AVX-512 plus the tiles).
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
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
_AVX2 = ["-mavx2", "-mfma", "-mf16c", "-mbmi2"]
_AVX512 = _AVX2 + ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512vnni"]
ISA_FLAGS = {
    "avx2": _AVX2,
    "avxvnni": _AVX2 + ["-mavxvnni"],
    "avx512": _AVX512,
    "amx": _AVX512 + ["-mavx512bf16", "-mamx-tile", "-mamx-int8", "-mamx-bf16"],
}


def compile_flags(isa: str) -> list[str]:
    """The compiler flags of kernel level `isa` (beside torch's own: includes, -std, -fPIC)."""
    return _COMMON + ISA_FLAGS[isa]


# CPU flags (as /proc/cpuinfo names them) each level needs.
ISA_CPU_FLAGS = {
    "avx2": {"avx2", "fma", "f16c", "bmi2"},
    "avxvnni": {"avx2", "fma", "f16c", "bmi2", "avx_vnni"},
    "avx512": {
        "avx2",
        "fma",
        "f16c",
        "bmi2",
        "avx512f",
        "avx512bw",
        "avx512vl",
        "avx512dq",
        "avx512_vnni",
    },
    "amx": {
        "avx2",
        "fma",
        "f16c",
        "bmi2",
        "avx512f",
        "avx512bw",
        "avx512vl",
        "avx512dq",
        "avx512_vnni",
        "avx512_bf16",
        "amx_tile",
        "amx_int8",
        "amx_bf16",
    },
}
ISA_ORDER = ("amx", "avx512", "avxvnni", "avx2")
_LDFLAGS = ["-fopenmp"]
STALE_LOCK_SECONDS = 600.0
_lock = threading.Lock()
_built: dict[str, Any] = {}


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags, as the kernel reports them in /proc/cpuinfo (empty elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


@functools.lru_cache(maxsize=1)
def cpu_vendor() -> str:
    """The CPU's vendor string from /proc/cpuinfo ("GenuineIntel", "AuthenticAMD"; "" elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


# How far ahead the quantized GEMMs prefetch their weight streams (bytes into L1, into L2; 0:
# off), by CPU vendor. Intel's L2 hint keeps more DRAM lines in flight than the L1 fill buffers
# alone (Sapphire Rapids, 1B-shape step linears from DRAM, 2 threads: 1.08-1.13x). AMD cores
# bring every hinted line into L1, so prefetching 32 KiB ahead evicts the lines in use: EPYC
# Zen 3 (avx2 level, 2 threads, the 1B-shape Q4_K_M file's step linears from DRAM) read 19.0
# GB/s with it, 21.8-25.1 GB/s with the L1 kind alone.
WEIGHT_PREFETCH = {"AuthenticAMD": (8192, 0)}
DEFAULT_WEIGHT_PREFETCH = (8192, 32768)


def weight_prefetch(vendor: str | None = None) -> tuple[int, int, str]:
    """(L1 bytes, L2 bytes, why): TOKENMILL_CPU_PREFETCH="L1,L2" if set, else the vendor's
    distances (WEIGHT_PREFETCH; DEFAULT_WEIGHT_PREFETCH for the others)."""
    forced = os.environ.get("TOKENMILL_CPU_PREFETCH", "").strip()
    if forced:
        try:
            l1, l2 = (int(v) for v in forced.split(","))
        except ValueError:
            raise ValueError(
                f"TOKENMILL_CPU_PREFETCH={forced!r}: expected two byte counts, 'L1,L2'"
            ) from None
        if min(l1, l2) < 0 or l1 % 64 or l2 % 64:
            raise ValueError(
                f"TOKENMILL_CPU_PREFETCH={forced!r}: distances are whole 64-byte lines, >= 0"
            )
        return l1, l2, "forced by TOKENMILL_CPU_PREFETCH"
    vendor = cpu_vendor() if vendor is None else vendor
    l1, l2 = WEIGHT_PREFETCH.get(vendor, DEFAULT_WEIGHT_PREFETCH)
    return l1, l2, f"{vendor or 'unknown vendor'}'s distances"


def supported_isas(flags: frozenset[str] | None = None) -> list[str]:
    """Kernel levels this CPU can run, best first."""
    flags = cpu_flags() if flags is None else flags
    return [isa for isa in ISA_ORDER if ISA_CPU_FLAGS[isa] <= flags]


@dataclass(frozen=True)
class IsaChoice:
    """The kernel level in use: `build` is the compiled level (None: no kernels at all),
    `quant` whether quantized matmuls run natively, `reason` says why (logs, `info`)."""

    build: str | None
    quant: bool
    reason: str

    @property
    def name(self) -> str:
        return self.build if self.quant and self.build else "reference"


def select_isa(flags: frozenset[str] | None = None) -> IsaChoice:
    """TOKENMILL_CPU_ISA if set (an error when the CPU lacks it), else the best level."""
    available = supported_isas(flags)
    forced = os.environ.get("TOKENMILL_CPU_ISA", "").strip().lower()
    if forced:
        if forced == "reference":
            return IsaChoice(
                available[0] if available else None,
                False,
                "TOKENMILL_CPU_ISA=reference: quantized weights run dequantized",
            )
        if forced not in ISA_FLAGS:
            raise ValueError(
                f"TOKENMILL_CPU_ISA={forced!r}: expected one of reference, "
                f"{', '.join(reversed(ISA_ORDER))}"
            )
        if forced not in available:
            missing = sorted(ISA_CPU_FLAGS[forced] - (cpu_flags() if flags is None else flags))
            raise ValueError(f"TOKENMILL_CPU_ISA={forced}: this CPU lacks {', '.join(missing)}")
        return IsaChoice(forced, True, f"forced by TOKENMILL_CPU_ISA={forced}")
    if not available:
        return IsaChoice(
            None,
            False,
            "the CPU has no AVX2/FMA/F16C: quantized weights run dequantized with the PyTorch path",
        )
    return IsaChoice(available[0], True, f"best level this CPU supports ({', '.join(available)})")


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


class CpuDenseLinear:
    """`quant.dense.SmallBatchLinear` on the CPU: `dense_gemm` on float32, float16 or bfloat16
    weights (the sums in float32). Steps of up to 8 rows stream each weight row once, several
    side by side, 16-bit weights widened as they load, where the library's matrix-vector product
    read DRAM at 11-19 GB/s of the 26 two cores can (AMD Zen 3, float32). 16-bit weights beside
    float32 compute take every row count (larger steps widen L2-sized blocks of rows for the
    library's GEMM, where a float32 copy of the whole weight per call ran 1.3-8x slower from 16
    rows on, Sapphire Rapids, 2 threads); so do bfloat16 weights in bfloat16 compute where the
    kernel multiplies them as they lie (`bf16_path`: the AMX tiles on the amx level, AVX512-BF16
    dot products on an AVX-512 level whose CPU has them), which elsewhere oneDNN takes at every
    row count. The GLU and add + RMSNorm entry points run the fused CPU op, then
    the kernel."""

    max_stream_rows = 8

    def __init__(self, kernels: Any) -> None:
        self.kernels = kernels
        # how bfloat16 steps run: "tiles", "dot" or "" (oneDNN's packed layout instead)
        self.bf16_path = kernels.dense_bf16_path()

    def applies(self, w: Any) -> bool:
        import torch

        return (
            w.device.type == "cpu"
            and w.dim() == 2
            and w.is_contiguous()
            and w.dtype in (torch.float32, torch.float16, torch.bfloat16)
        )

    def max_rows_for(self, w: Any, dtype: Any) -> int:
        import torch

        if dtype == torch.float32:
            return self.max_stream_rows if w.dtype == torch.float32 else sys.maxsize
        if dtype == w.dtype == torch.bfloat16 and self.bf16_path:
            return sys.maxsize
        return 0

    def __call__(self, x: Any, w: Any, bias: Any) -> Any:
        import torch

        if x.dtype == torch.float32 or x.dtype == w.dtype == torch.bfloat16:
            return self.kernels.dense_gemm(x, w, bias)
        return self.kernels.dense_gemm(x.float(), w, bias).to(x.dtype)

    def glu(self, gate_up: Any, w: Any, bias: Any) -> Any:
        return self(self.kernels.silu_mul(gate_up.contiguous()), w, bias)

    def add_norm(
        self, residual: Any, delta: Any, norm_weight: Any, eps: float, w: Any, bias: Any
    ) -> tuple[Any, Any]:
        residual = residual.contiguous()  # updated in place: residual + delta
        delta = None if delta is None else delta.contiguous()
        normed = self.kernels.add_rms_norm(residual, delta, norm_weight, eps)
        return residual, self(normed, w, bias)


def dense_small_batch() -> CpuDenseLinear | None:
    """The CPU's `SmallBatchLinear` (None without kernels, or under TOKENMILL_CPU_DENSE_GEMM=0:
    the library's GEMM for every row count, the benchmarks' baseline)."""
    if os.environ.get("TOKENMILL_CPU_DENSE_GEMM", "1").strip() == "0":
        return None
    kernels = get_ops()
    return None if kernels is None else CpuDenseLinear(kernels)
