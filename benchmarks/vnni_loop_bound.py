"""The ceiling of the batched AVX-512 VNNI kernel's loop by its instruction mix, one thread.

Compiles and runs benchmarks/vnni_loop_bound.c (which documents each variant): the same dot
chains as the batched path of tokenmill/kernels/csrc/quant_gemm.cpp with the float tail of
today's K-quant / Q4_1 blocks, cheaper tails, and the integer alternative for Q4_K (per-256
activations, sub-block scales applied by `vpdpwssd`, offsets once per 256 inputs). On cores
where `vpdpbusd` shares its ports with the float unit (Sapphire Rapids), each tail op costs
about what a dot step does, and this bounds what any rearrangement of the tail can gain. Prints
GMAC/s, the fraction of the chains-only peak and the ratio to today's tail; writes JSON.

    python benchmarks/vnni_loop_bound.py [--out benchmarks/results/vnni_loop_bound.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
from pathlib import Path

ROWS = {
    "chains": "vpdpbusd chains alone (registers)",
    "broadcasts": "+ activation broadcasts (memory)",
    "tail_add": "+ 1-op tail (int32 add)",
    "tail_cvt_fma": "+ 2-op tail (cvt, FMA)",
    "tail_q4k": "+ 4-op tail (today: cvt, mul, FMA, offset FMA)",
    "int_tail_q4k": "integer tail (vpdpwssd) + per-256 offsets",
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="benchmarks/results/vnni_loop_bound.json")
    args = ap.parse_args()
    src = Path(__file__).with_name("vnni_loop_bound.c")
    with tempfile.TemporaryDirectory() as tmp:
        exe = Path(tmp) / "vnni_loop_bound"
        flags = ["-O2", "-mavx512f", "-mavx512bw", "-mavx512vnni"]
        subprocess.run(["cc", *flags, str(src), "-o", str(exe)], check=True)
        out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    rates = {name: float(v) for name, v in (line.split() for line in out.splitlines())}
    peak, today = rates["chains"], rates["tail_q4k"]
    print(f"{'loop':<48}{'GMAC/s':>9}{'of peak':>9}{'vs today':>10}")
    rows = []
    for name, label in ROWS.items():
        r = rates[name]
        rows.append({"loop": name, "gmacs": r, "of_peak": r / peak, "vs_today": r / today})
        print(f"{label:<48}{r:>9.1f}{r / peak:>8.0%}{r / today:>9.2f}x")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"rows": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
