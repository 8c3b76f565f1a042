"""The Triton kernels compile for the GPUs they are written for, checked without one.

The interpreter tests (test_triton_kernels.py and the backend runs) check what the kernels
compute; they never meet the compiler. benchmarks/triton_compile.py runs the Triton backend
over a Llama-3.2-1B-shaped layer (the real vocab) through a prefill, a mixed batch and decode
batches at every graph capture size, records each launch's specialization, and compiles it for
sm_90a (H100 / H200) with the installed Triton and its ptxas. It fails on a kernel that does not
compile, that needs more shared memory than an sm_90 block has, or that spills registers; and
every kernel of the Triton modules (kernels/triton_ops.py, triton_attention.py, triton_skinny.py)
must have been launched.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_kernel_compiles_for_hopper_without_spills(tmp_path):
    out = tmp_path / "compile.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")  # a throwaway cache
    proc = subprocess.run(
        [
            sys.executable,
            "benchmarks/triton_compile.py",
            "--shapes",
            "1B",
            "--dtypes",
            "bfloat16",
            "--out",
            str(out),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    report = json.loads(out.read_text())
    assert report["not_launched"] == []
    kernels = {row["kernel"] for row in report["rows"]}
    assert {"_attention_kernel", "_merge_kernel", "_skinny_linear_kernel"} <= kernels
    for row in report["rows"]:
        assert "error" not in row and row["spill_stores"] == row["spill_loads"] == 0, row
        assert 0 < row["regs"] <= 255 and 0 <= row["shared"] <= 227 * 1024, row
    # both attention paths (one pass, and split-KV with its merge) and both skinny kinds
    attention = [r["constexprs"] for r in report["rows"] if r["kernel"] == "_attention_kernel"]
    assert any("NUM_SPLITS=1" in c for c in attention)
    assert any("NUM_SPLITS=16" in c for c in attention)
    skinny = [r["constexprs"] for r in report["rows"] if r["kernel"] == "_skinny_linear_kernel"]
    assert any("DOT=True" in c for c in skinny) and any("DOT=False" in c for c in skinny)
