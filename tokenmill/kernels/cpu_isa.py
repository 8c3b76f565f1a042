"""The CPU kernels' instruction-set levels: the compiler flags each level adds (`ISA_FLAGS`),
the CPU flags each needs (`ISA_CPU_FLAGS`), this CPU's flags and vendor from /proc/cpuinfo, the
level in use (`select_isa`, TOKENMILL_CPU_ISA) and the quantized GEMMs' weight-prefetch
distances by vendor (`weight_prefetch`, TOKENMILL_CPU_PREFETCH). How a level is built, cached
and loaded: `cpu_ops`.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

_AVX2 = ["-mavx2", "-mfma", "-mf16c", "-mbmi2"]
_AVX512 = _AVX2 + ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512vnni"]
ISA_FLAGS = {
    "avx2": _AVX2,
    "avxvnni": _AVX2 + ["-mavxvnni"],
    "avx512": _AVX512,
    "amx": _AVX512 + ["-mavx512bf16", "-mamx-tile", "-mamx-int8", "-mamx-bf16"],
}


# CPU flags (as /proc/cpuinfo names them) each level needs.
_AVX2_CPU = frozenset({"avx2", "fma", "f16c", "bmi2"})
_AVX512_CPU = _AVX2_CPU | {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni"}
ISA_CPU_FLAGS = {
    "avx2": _AVX2_CPU,
    "avxvnni": _AVX2_CPU | {"avx_vnni"},
    "avx512": _AVX512_CPU,
    "amx": _AVX512_CPU | {"avx512_bf16", "amx_tile", "amx_int8", "amx_bf16"},
}
ISA_ORDER = ("amx", "avx512", "avxvnni", "avx2")


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
