"""Start-up and memory that grows with use: the KV pool is reserved untouched, the kernel cache is
shared across virtualenvs, and the start-up breakdown is logged."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest
import torch

from tokenmill import LLM
from tokenmill.core.block_pool import BlockPool, hash_block_tokens
from tokenmill.kernels import cpu_isa, cpu_ops

ROOT = Path(__file__).resolve().parents[1]

# Resident size of the pool's mapping as the kernel accounts it (/proc/self/smaps), next to the
# engine's own figure (mincore), right after start and after a long generation.
_KV_SCRIPT = textwrap.dedent("""
    import json
    from tokenmill import LLM, SamplingParams

    def smaps_rss(addr):
        lines = open("/proc/self/smaps").read().splitlines()
        for i, line in enumerate(lines):
            head = line.split()[0]
            if "-" in head and ":" not in head:
                lo, hi = (int(x, 16) for x in head.split("-"))
                if lo <= addr < hi:
                    for rest in lines[i + 1:]:
                        if rest.startswith("Rss:"):
                            return int(rest.split()[1]) * 1024
        raise AssertionError("no mapping holds the KV pool")

    llm = LLM(kv_cache_memory_gib=1.0, max_model_len=1024)
    pool = llm.engine.runner.kv_pool
    addr = llm.engine.runner.kv_caches[0][0].data_ptr()
    start = (smaps_rss(addr), pool.resident_bytes())
    prompts = [[100 + i, 200, 300, 400] for i in range(8)]
    outs = llm.generate(prompts, SamplingParams(max_tokens=300, temperature=0, ignore_eos=True))
    tokens = sum(len(o.prompt_token_ids) + len(o.outputs[0].token_ids) for o in outs)
    end = (smaps_rss(addr), pool.resident_bytes())
    per_token = llm.engine.kv_cache_bytes / llm.engine.kv_capacity_tokens
    print(json.dumps({"reserved": pool.reserved_bytes, "start": start, "end": end,
                      "tokens": tokens, "per_token": per_token}))
""")


def test_kv_pool_is_committed_as_it_is_written():
    out = subprocess.run(
        [sys.executable, "-c", _KV_SCRIPT], capture_output=True, text=True, timeout=600, cwd=ROOT
    )
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    (smaps_start, ours_start), (smaps_end, ours_end) = r["start"], r["end"]
    assert r["reserved"] >= 0.99 * (1 << 30)
    assert smaps_start < 0.1 * r["reserved"], r
    written = r["tokens"] * r["per_token"]  # bytes of KV the generation wrote
    assert smaps_end - smaps_start >= 0.9 * written, r
    # Reused blocks: no more than what was written, plus one partial page per layer tensor.
    assert smaps_end <= smaps_start + written + 60 * 2 * 4096 + (1 << 20), r
    # The engine's figure (for the log and /metrics) follows the kernel's accounting. (The
    # mapping smaps reports may have merged with neighbouring anonymous memory, so compare the
    # growth; its start is an upper bound of the pool's.)
    assert ours_start <= smaps_start and ours_start < 0.1 * r["reserved"], r
    assert abs((ours_end - ours_start) - (smaps_end - smaps_start)) <= 1 << 20, r


def test_freed_blocks_without_cached_content_are_reused_first():
    pool = BlockPool(8, enable_caching=True)
    a = pool.get_new_blocks(3)  # blocks 0, 1, 2
    pool.cache_full_block(a[0], hash_block_tokens(None, [7, 8]))
    pool.free_blocks(reversed(a))
    # 1 and 2 were written and hold nothing reusable: handed out before the untouched 3..7;
    # 0 holds a cached prefix: handed out last (LRU).
    assert [b.block_id for b in pool.get_new_blocks(8)] == [1, 2, 3, 4, 5, 6, 7, 0]
    pool.check_invariants()


def _level() -> str:
    return cpu_isa.select_isa().build or pytest.skip("no kernel level on this CPU")


def test_kernel_cache_is_shared_by_a_second_virtualenv(tmp_path):
    """A second virtualenv whose torch sits at another path (so torch's include paths differ)
    imports the same cached build: no rebuild, the artifacts keep their mtimes."""
    isa = _level()
    assert cpu_ops.load_ops(isa) is not None
    build = cpu_ops.build_directory(isa)
    artifacts = sorted(p for p in build.iterdir() if p.is_file())
    before = {p.name: p.stat().st_mtime_ns for p in artifacts}
    venv = tmp_path / "venv2"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    purelib = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    site = Path(
        subprocess.run(
            [str(venv / "bin" / "python"), "-c", purelib],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    torch_dir = Path(torch.__file__).parent
    (site / "torch").symlink_to(torch_dir, target_is_directory=True)  # torch at a new path
    # everything else torch imports, from this environment, after the new site-packages
    (site / "base.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    script = textwrap.dedent(f"""
        import torch
        assert torch.__file__.startswith({str(site)!r}), torch.__file__
        from tokenmill.kernels import cpu_isa, cpu_ops
        ops = cpu_ops.load_ops({isa!r})
        assert ops is not None and ops.quant_isa() in cpu_isa.ISA_ORDER
        print(cpu_ops.build_directory({isa!r}))
    """)
    env = dict(os.environ, PYTHONPATH=str(ROOT), TOKENMILL_REQUIRE_CPU_KERNELS="1")
    out = subprocess.run(
        [str(venv / "bin" / "python"), "-c", script],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == str(build)  # the same cache entry
    assert "compiling" not in out.stderr, out.stderr
    after = {p.name: p.stat().st_mtime_ns for p in artifacts}
    assert after == before


def test_startup_breakdown_is_logged_at_debug_level(caplog):
    with caplog.at_level(logging.DEBUG, logger="tokenmill.engine.startup"):
        LLM(max_model_len=128, kv_cache_memory_gib=0.05)
    lines = [r.getMessage() for r in caplog.records if "start-up breakdown" in r.getMessage()]
    assert len(lines) == 1
    for phase in ("file mapping", "kernel load", "weights", "tokenizer", "KV pool", "total"):
        assert phase in lines[0], lines[0]
    loaded = [r.getMessage() for r in caplog.records if r.getMessage().startswith("loaded ")]
    assert loaded and "GB/s" in loaded[0]


def test_gguf_header_parser_matches_gguf_reader():
    """The start-up GGUF parser gives GGUFReader's metadata, tensor infos and data, field by
    field, on the embedded model (Q4_1 / Q8_0 / F32, a 49k-token tokenizer)."""
    import numpy as np
    from gguf import GGUFReader

    from tokenmill.loader.gguf_file import open_gguf
    from tokenmill.loader.resolve import default_model_path

    path = str(default_model_path())
    ours, ref = open_gguf(path), GGUFReader(path, "r")
    meta = {}
    for name, fld in ref.fields.items():
        if not name.startswith("GGUF."):
            v = fld.contents()
            meta[name] = v.item() if isinstance(v, np.generic) else v
    assert meta.keys() == ours.metadata.keys()
    for key, want in meta.items():
        got = ours.metadata[key]
        assert got == want or np.float32(got) == np.float32(want), key
    assert len(ours.tensors) == len(ref.tensors)
    for a, b in zip(ours.tensors, ref.tensors):
        assert (a.name, a.tensor_type, list(a.shape)) == (b.name, b.tensor_type, list(b.shape))
        assert (a.n_elements, a.n_bytes) == (int(b.n_elements), int(b.n_bytes)), a.name
        assert a.data.shape == b.data.shape and a.data.dtype == b.data.dtype, a.name
        assert np.array_equal(np.asarray(a.data), np.asarray(b.data)), a.name


def test_cli_and_scheduler_do_not_import_torch():
    """`tokenmill --help`, argument parsing and the scheduler start without torch (1.5 s of a
    start); the package's public names still resolve on first use."""
    code = textwrap.dedent("""
        import sys
        import tokenmill, tokenmill.cli, tokenmill.core.scheduler
        from tokenmill import SamplingParams
        assert "torch" not in sys.modules, "torch was imported"
        from tokenmill import LLM
        assert "torch" in sys.modules and LLM.__name__ == "LLM"
    """)
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])


def test_two_processes_starting_together_build_the_kernels_once(tmp_path):
    """Two first starts on an empty kernel cache: one compiles, the other waits for it (torch's
    lock) and loads the result; every object is compiled once (ninja's log). The build runs
    `cpu_ops`' own cache, lock and import steps over two small stand-in sources (a binding and
    a kernel file): the kernels themselves take a minute and more of the 2 cores' time, which
    would test nothing more, and every real level is built by `scripts/setup.sh` and loaded by
    the rest of the suite."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "kernel.cpp").write_text("int tokenmill_test_kernel(int x) { return 2 * x; }\n")
    (src / "bindings.cpp").write_text(
        "#include <pybind11/pybind11.h>\n"
        "int tokenmill_test_kernel(int x);\n"
        "PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {\n"
        '  m.def("twice", &tokenmill_test_kernel);\n'
        '  m.def("set_weight_prefetch", [](long, long) {});\n'  # what load_ops sets
        "}\n"
    )
    sources = [str(src / "bindings.cpp"), str(src / "kernel.cpp")]
    level = "avx2" if "avx2" in cpu_isa.supported_isas() else _level()
    code = (
        "from pathlib import Path\n"
        "from tokenmill.kernels import cpu_ops\n"
        f"cpu_ops._SOURCES = [Path(p) for p in {sources!r}]\n"
        f"assert cpu_ops.load_ops({level!r}).twice(21) == 42\n"
    )
    cache = tmp_path / "cache"
    env = dict(os.environ, XDG_CACHE_HOME=str(cache), TOKENMILL_REQUIRE_CPU_KERNELS="1")
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code],
            env=env,
            stderr=subprocess.PIPE,
            text=True,
            cwd=Path(__file__).parents[1],
        )
        for _ in range(2)
    ]
    errors = [p.communicate(timeout=900)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), errors
    (build_dir,) = (cache / "tokenmill" / "kernels").iterdir()
    targets = [
        line.split("\t")[3]
        for line in (build_dir / ".ninja_log").read_text().splitlines()
        if not line.startswith("#")
    ]
    assert sorted(targets) == sorted(["bindings.o", "kernel.o", f"tokenmill_cpu_ops_{level}.so"])
