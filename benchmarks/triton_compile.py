"""Every Triton kernel the GPU backend launches for real model shapes, compiled for Hopper
(sm_90a; with `--archs`, A100 / Ampere / Ada too) here, without a GPU: what the device's first
minutes would otherwise find out.

The Triton backend runs on the CPU (`TOKENMILL_BACKEND=triton`, no interpreter) over
random-weight models of Llama-3.2-1B and Llama-3-8B shapes (one layer each, the real vocab;
`gpu_bench.py`'s shapes), through the steps the engine takes: a prefill of 512 tokens, a
mixed batch (decodes beside prefill chunks with cached context), and pure decode batches at
every CUDA-graph capture size up to 64, with one long context among them (the split-KV path);
then the output head, the greedy argmax and the FP8 activation quantizer. A stand-in driver
reports an sm_90 target, and Triton's `jit_cache_hook` records each launch's specialization
(argument types, divisibility, constexprs, warps, stages) instead of compiling and launching
it, so a kernel's outputs stay unwritten: nothing is checked here but what the compiler says.
Each distinct specialization is then compiled (`triton.compile`, Triton's own ptxas) and its
resources read from ptxas's report: registers per thread, shared memory, spilled bytes.

It fails (exit 1) when a kernel does not compile or asks for more shared memory than a block
gets on that GPU (227 KiB on sm_90), and on sm_90 when it spills registers (elsewhere that is a
note). `--sweeps` adds the launch configurations that benchmarks/gpu_profile.py tries on the
device; their problems are notes (a sweep skips or times such a configuration), not failures.
Run it under the device image's Triton too (3.6): `pip install --no-deps --target DIR
triton==3.6.0`, then `PYTHONPATH=DIR python ...`; a language change between releases then shows
up here, not on the device.

    python benchmarks/triton_compile.py [--shapes 1B,8B] [--dtypes bfloat16,float16]
        [--archs 90,80,86,89] [--sweeps]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import sys
import tempfile
import time
from contextlib import redirect_stdout
from pathlib import Path
from unittest.mock import patch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

# The shared memory one block may use (cudaDevAttrMaxSharedMemoryPerBlockOptin), per compute
# capability: Hopper (H100 / H200), A100, and the Ampere / Ada cards (RTX 30xx / 40xx, L4, L40).
MAX_SHARED = {90: 227 * 1024, 80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024}
CAPTURE_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64)


def cuda_target(arch: int):
    """Triton's target for an NVIDIA GPU of compute capability `arch` (90: sm_90a)."""
    from triton.backends.compiler import GPUTarget

    return GPUTarget("cuda", arch, 32)


class HopperTarget:
    """The parts of a Triton driver that `JITFunction.run` asks for before it compiles: the
    device, the stream and the target (an H100 / H200: sm_90, warps of 32)."""

    def __init__(self) -> None:
        self.target = cuda_target(90)

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device=None) -> int:
        return 0

    def get_current_target(self):
        return self.target


class Recorder:
    """Installs HopperTarget and a jit_cache_hook that keeps each distinct specialization
    launched (and tells Triton not to compile or launch it)."""

    def __init__(self) -> None:
        self.specs: dict[str, dict] = {}
        self.source = "engine"  # what launches are recorded now: "engine" or "sweep"
        self.min_arch = 0  # the lowest compute capability that runs them

    def __enter__(self) -> Recorder:
        from triton import knobs
        from triton.runtime.driver import driver

        driver.set_active(HopperTarget())
        knobs.runtime.jit_cache_hook = self.hook
        return self

    def __exit__(self, *exc) -> None:
        from triton import knobs

        # (the stand-in driver stays: without a GPU, Triton has no other to go back to)
        knobs.runtime.jit_cache_hook = None

    def hook(self, *, fn, compile, **_) -> bool:
        key = f"{fn.name}:{compile['key']}"
        if key not in self.specs:
            self.specs[key] = {
                "fn": fn.jit_function,
                "name": fn.name,
                "source": self.source,
                "min_arch": self.min_arch,
                **compile,
            }
        return True  # skip: nothing runs


def constexpr_text(spec: dict) -> str:
    """The spec's constexpr arguments as name=value (the kernel's launch-time choices)."""
    names = [p.name for p in spec["fn"].params]
    parts = []
    for path, value in sorted(spec["constants"].items()):
        if len(path) == 1 and path[0] < len(names):
            parts.append(f"{names[path[0]]}={value}")
    return " ".join(parts)


def compile_spec(spec: dict, arch: int) -> dict:
    """Compiles one recorded specialization for compute capability `arch`: its resources from
    ptxas's own report (Triton runs ptxas with -v; TRITON_DUMP_PTXAS_LOG prints it) or the
    error."""
    import triton
    from triton import knobs
    from triton.compiler import ASTSource

    row = {
        "arch": arch,
        "kernel": spec["name"],
        "source": spec["source"],
        "constexprs": constexpr_text(spec),
        "warps": spec["num_warps"],
        "stages": spec["num_stages"],
    }
    t = time.perf_counter()
    log = io.StringIO()
    try:
        src = ASTSource(spec["fn"], spec["signature"], spec["constants"], spec["configs"][0])
        options = {"num_warps": spec["num_warps"], "num_stages": spec["num_stages"]}
        with (
            patch.object(knobs.compilation, "always_compile", True),  # ptxas runs: its report
            patch.object(knobs.nvidia, "dump_ptxas_log", True),
            redirect_stdout(log),
        ):
            kernel = triton.compile(src, target=cuda_target(arch), options=options)
    except Exception as e:  # noqa: BLE001 - the report says which kernel failed and why
        row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:300]}"
        return row
    row["compile_s"] = round(time.perf_counter() - t, 2)
    row["shared"] = int(kernel.metadata.shared)
    row |= ptxas_resources(log.getvalue())
    return row


def ptxas_resources(log: str) -> dict:
    """Registers per thread, stack frame and spilled bytes from ptxas's -v report."""

    def number(pattern: str) -> int:
        m = re.search(pattern, log)
        if m is None:
            raise ValueError(f"no {pattern!r} in ptxas's report: {log[-500:]!r}")
        return int(m.group(1))

    return {
        "regs": number(r"Used (\d+) registers"),
        "stack": number(r"(\d+) bytes stack frame"),
        "spill_stores": number(r"(\d+) bytes spill stores"),
        "spill_loads": number(r"(\d+) bytes spill loads"),
    }


def problems(row: dict) -> tuple[list[str], list[str]]:
    """(failures, notes) of a compiled row. A kernel that does not compile or needs more shared
    memory than a block gets would not launch: a failure on every GPU. Register spills are a
    failure on sm_90, the GPUs the launch configurations are tuned for, and a note elsewhere."""
    if "error" in row:
        return [row["error"]], []
    failures, notes = [], []
    limit = MAX_SHARED[row["arch"]]
    if row["shared"] > limit:
        failures.append(f"shared memory {row['shared']} B > sm_{row['arch']}'s {limit} B")
    if row["spill_stores"] + row["spill_loads"] > 0:
        spills = f"register spills: {row['spill_stores']} B stored, {row['spill_loads']} B loaded"
        (failures if row["arch"] == 90 else notes).append(spills)
    return failures, notes


# ---- the launches -------------------------------------------------------------------------
def schedule(requests: list[tuple[int, int]], block_size: int, vocab: int):
    """A SchedulerOutput of (cached tokens, new tokens) per request, each with its own blocks
    and token ids drawn from the vocab."""
    from tokenmill.core.outputs import ScheduledRequest, SchedulerOutput
    from tokenmill.core.request import Request
    from tokenmill.sampling_params import SamplingParams

    scheduled, next_block = [], 0
    for i, (cached, new) in enumerate(requests):
        total = cached + new
        ids = [(7 * i + 13 * j) % vocab for j in range(total)]
        r = Request(f"r{i}", ids, SamplingParams(max_tokens=1), set(), 1)
        r.num_computed_tokens = cached
        blocks = -(-total // block_size)
        scheduled.append(
            ScheduledRequest(r, cached, new, tuple(range(next_block, next_block + blocks)))
        )
        next_block += blocks
    return SchedulerOutput(tuple(scheduled), sum(n for _, n in requests)), next_block


def steps() -> dict[str, list[tuple[int, int]]]:
    """The batches run per model: name -> (cached tokens, new tokens) per request."""
    out = {
        "prefill 512": [(0, 512)],
        "mixed": [(100, 1), (700, 1), (3000, 1), (0, 256), (300, 128)],
    }
    for b in CAPTURE_SIZES:
        # contexts of a 512-token prompt part-way through 128 new tokens; one long one (split-KV)
        out[f"decode {b}"] = [(4096 if i == 0 else 512 + 7 * i, 1) for i in range(b)]
    return out


def record_model(
    name: str, shape: dict, vocab: int, dtype_name: str, root: Path, rec: Recorder
) -> int:
    """Runs every step of `steps()` through one-layer `shape`'s forward, head and argmax on the
    Triton backend in `dtype_name` (launches recorded, not run); returns the number of steps."""
    import torch
    from gpu_bench import model_folder

    from tokenmill import LLM
    from tokenmill.kernels import triton_attention, triton_ops
    from tokenmill.worker.batch import prepare_inputs

    dtype = getattr(torch, dtype_name)
    path = model_folder(root, name, {**shape, "num_hidden_layers": 1}, vocab)
    batches = steps()
    blocks_needed = 0
    block_size = 16
    for reqs in batches.values():
        blocks_needed = max(blocks_needed, schedule(reqs, block_size, vocab)[1])
    # The dense linears' one CPU-only branch, oneDNN's packed weights, stays off: the linears
    # take the GPU's route (the skinny GEMM up to 16 rows, torch's matmul above).
    with patch("tokenmill.quant.dense.onednn_packable", return_value=False):
        llm = LLM(
            str(path),
            load_format="dummy",
            device="cpu",
            dtype=dtype_name,
            num_kv_blocks=blocks_needed + 1,
            block_size=block_size,
            max_model_len=8192,
            max_num_seqs=max(CAPTURE_SIZES),
            enable_prefix_caching=False,
        )
    runner = llm.engine.runner
    assert runner.ops.name == "triton", runner.ops.name
    with torch.inference_mode():
        for reqs in batches.values():
            sched, _ = schedule(reqs, block_size, vocab)
            inputs = prepare_inputs(sched, block_size, runner.device, runner.attn_backend)
            hidden = runner.model(inputs.input_ids, inputs.positions, runner.kv_caches, inputs.attn)
            logits = runner.model.compute_logits(hidden[inputs.logits_indices]).float()
            runner.ops.argmax(logits)
        # The kernels a Llama's layers do not launch (rope_write_kv does both their jobs): rotary
        # alone (q / k norms, partial rotary) and the cache write alone, on this shape's
        # tensors; the FP8 path's activation quantizer; and a KV cache in another dtype
        # (--kv-cache-dtype: float16 beside bfloat16) written and read.
        heads, kv_heads = shape["num_attention_heads"], shape["num_key_value_heads"]
        head_dim = shape["hidden_size"] // heads
        rotary = runner.model.model.rotary
        k_cache, v_cache = runner.kv_caches[0]
        other = torch.bfloat16 if dtype == torch.float16 else torch.float16
        k_other, v_other = (torch.zeros_like(k_cache, dtype=other) for _ in range(2))
        for n, splits in ((1, 4), (64, 1)):
            q = torch.randn(n, heads, head_dim, dtype=dtype)
            k = torch.randn(n, kv_heads, head_dim, dtype=dtype)
            positions = torch.arange(n)
            triton_ops.rope_write_kv(
                q,
                k,
                k.clone(),
                k_other,
                v_other,
                positions,
                positions,
                rotary.cos_cached,
                rotary.sin_cached,
            )
            triton_attention.paged_attention(
                q,
                k_other,
                v_other,
                block_tables=torch.zeros(n, 1, dtype=torch.int32),
                seq_lens=torch.ones(n, dtype=torch.int32),
                query_start_loc=torch.arange(n + 1, dtype=torch.int32),
                max_query_len=1,
                block_size=block_size,
                scale=head_dim**-0.5,
                num_splits=splits,
            )
        for n in (1, 64, 512):
            positions = torch.arange(n)
            triton_ops.rotary_inplace(
                torch.randn(n, heads, head_dim, dtype=dtype),
                positions,
                rotary.cos_cached,
                rotary.sin_cached,
            )
            k = torch.randn(n, kv_heads, head_dim, dtype=dtype)
            triton_ops.write_kv(k, k.clone(), k_cache, v_cache, positions)
            rec.min_arch = 89  # quant.fp8.fp8_unsupported: e4m3 needs compute capability 8.9+
            triton_ops.fp8_quantize_rows(torch.randn(n, shape["hidden_size"], dtype=dtype))
            rec.min_arch = 0
    del llm
    return len(batches)


def record_sweeps(dtype_name: str) -> None:
    """The launch configurations benchmarks/gpu_profile.py's sweeps try on the device, on the
    shapes it tries them (launches recorded, not run): the skinny GEMM's SKINNY_CONFIGS on
    every dense linear at 1, 4 and 16 rows; split-KV attention over splits, keys per iteration
    and warps; add_rms_norm's warps; the argmax's chunk sizes."""
    import torch
    from gpu_profile import LINEARS, SKINNY_CONFIGS

    from tokenmill.kernels import triton_attention as ta
    from tokenmill.kernels import triton_ops as tk
    from tokenmill.kernels import triton_skinny as ts

    dt = getattr(torch, dtype_name)
    for linears in LINEARS.values():
        for n, k in linears.values():
            w = torch.empty(n, k, dtype=dt)
            for rows in (1, 4, 16):
                x = torch.randn(rows, k, dtype=dt)
                for cfg in SKINNY_CONFIGS:
                    if ts.SkinnyConfig(*cfg).dot or rows == 1:
                        ts.skinny_linear(x, w, None, cfg)
    heads, kv, bs, ctx = 32, 8, 16, 576
    for head_dim in (64, 128):
        for batch in (1, 32):
            per_seq = -(-ctx // bs)
            cache = torch.empty((batch * per_seq + 1) * bs, kv, head_dim, dtype=dt)
            meta = dict(
                block_tables=torch.arange(batch * per_seq, dtype=torch.int32).view(batch, -1),
                seq_lens=torch.full((batch,), ctx, dtype=torch.int32),
                query_start_loc=torch.arange(batch + 1, dtype=torch.int32),
                max_query_len=1,
                block_size=bs,
                scale=head_dim**-0.5,
            )
            q = torch.randn(batch, heads, head_dim, dtype=dt)
            for splits in (4, 8, 16) if batch == 1 else (1,):
                for block_n in (32, 64, 128):
                    for warps in (2, 4, 8):
                        ta.paged_attention(
                            q,
                            cache,
                            cache,
                            **meta,
                            num_splits=splits,
                            block_n=block_n,
                            num_warps=warps,
                        )
    for hidden in (2048, 4096):
        for rows in (1, 32):
            res = torch.randn(rows, hidden, dtype=dt)
            for warps in (None, 1, 2, 4, 8, 16):
                tk.add_rms_norm(
                    res, torch.randn_like(res), torch.ones(hidden, dtype=dt), 1e-5, warps
                )
    for rows in (1, 32):
        for block in (1024, 2048, 4096, 8192):
            tk.argmax_rows(torch.randn(rows, 128256, dtype=dt), block)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="1B,8B")
    ap.add_argument("--dtypes", default="bfloat16,float16")
    ap.add_argument(
        "--archs", default="90", help=f"compute capabilities to compile for ({sorted(MAX_SHARED)})"
    )
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument(
        "--sweeps", action="store_true", help="also gpu_profile.py's sweep configurations"
    )
    ap.add_argument("--out", default="benchmarks/results/triton_compile.json")
    args = ap.parse_args()
    os.environ["TOKENMILL_BACKEND"] = "triton"
    if os.environ.get("TRITON_INTERPRET"):
        raise SystemExit("unset TRITON_INTERPRET: this compiles the kernels, it does not run them")

    import torch
    import triton
    from gpu_bench import SHAPES

    torch.set_num_threads(2)
    rec = Recorder()
    with rec, tempfile.TemporaryDirectory() as tmp:
        for dtype in args.dtypes.split(","):
            for name in args.shapes.split(","):
                t = time.perf_counter()
                n = record_model(name, SHAPES[name], args.vocab, dtype, Path(tmp) / dtype, rec)
                print(
                    f"{name} {dtype}: {n} steps, {len(rec.specs)} specializations so far "
                    f"({time.perf_counter() - t:.1f} s)",
                    flush=True,
                )
        if args.sweeps:
            rec.source = "sweep"
            record_sweeps(args.dtypes.split(",")[0])
            print(f"sweeps: {len(rec.specs)} specializations in all", flush=True)
    archs = [int(a) for a in args.archs.split(",")]
    rows = [
        compile_spec(s, arch) for arch in archs for s in rec.specs.values() if arch >= s["min_arch"]
    ]
    bad = 0
    print(f"\nTriton {triton.__version__}, torch {torch.__version__}")
    print(
        f"{'arch':5s} {'kernel':28s} {'warps':>5s} {'stages':>6s} {'regs':>5s} {'shared':>8s}"
        f" {'spills':>6s}  constexprs"
    )
    for row in sorted(rows, key=lambda r: (r["arch"], r["kernel"], r["constexprs"])):
        failures, notes = problems(row)
        if row["source"] == "sweep":  # a sweep tries (and skips) what does not fit
            failures, notes = [], failures + notes
        bad += bool(failures)
        res = (
            f"{row['regs']:5d} {row['shared']:8d} {row['spill_stores']:6d}"
            if "error" not in row
            else f"{'-':>5s} {'-':>8s} {'-':>6s}"
        )
        sweep = " (sweep)" if row["source"] == "sweep" else ""
        print(
            f"sm_{row['arch']:<2d} {row['kernel']:28s} {row['warps']:5d} {row['stages']:6d} {res}  "
            f"{row['constexprs']}{sweep}"
        )
        for w in failures:
            print(f"    PROBLEM: {w}")
        for w in notes:
            print(f"    note: {w}")
    missing = sorted(kernels_defined() - {r["kernel"] for r in rows})
    if missing:
        print(f"never launched here: {', '.join(missing)}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "triton": triton.__version__,
                "torch": torch.__version__,
                "rows": rows,
                "not_launched": missing,
            },
            indent=1,
        )
    )
    print(f"{len(rows)} specializations, {bad} of the engine's with problems; wrote {out}")
    sys.exit(1 if bad else 0)


def kernels_defined() -> set[str]:
    """Names of the @triton.jit kernels (launched, not device functions) in every Triton kernel
    module, `tokenmill/kernels/triton_*.py` (triton_ops, triton_attention, triton_skinny)."""
    import importlib
    import pkgutil

    from triton.runtime.jit import JITFunction

    import tokenmill.kernels

    names: set[str] = set()
    for info in pkgutil.iter_modules(tokenmill.kernels.__path__):
        if not info.name.startswith("triton_"):
            continue
        module = importlib.import_module(f"tokenmill.kernels.{info.name}")
        for name, obj in vars(module).items():
            if isinstance(obj, JITFunction) and name.endswith("_kernel"):
                assert name not in names, f"two Triton kernels named {name}"
                names.add(name)
    return names


if __name__ == "__main__":
    main()
