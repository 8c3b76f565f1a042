"""The command line, run as a real process on the embedded model."""

from __future__ import annotations

import subprocess
import sys

from tokenmill import SamplingParams


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tokenmill", *args], capture_output=True, text=True, timeout=300
    )


def test_generate_matches_python_api(llm_f32):
    prompt = "The capital of France is"
    res = _run(
        "generate",
        prompt,
        "--temperature",
        "0",
        "--max-tokens",
        "12",
        "--ignore-eos",
        "--dtype",
        "float32",
        "--quantization",
        "none",
    )
    assert res.returncode == 0, res.stderr
    expected = (
        llm_f32.generate(prompt, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0]
        .outputs[0]
        .text
    )
    assert res.stdout.rstrip("\n") == expected
    assert "KV cache" in res.stderr  # capacity is logged at start-up


def test_info_reports_model_facts():
    res = _run("info", "--dtype", "float32", "--kv-cache-memory-gib", "1")
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert "LlamaForCausalLM" in out and "Q4_1" in out
    # 30 layers x 2 (k, v) x 3 kv heads x 64 dims x 4 bytes = 46080 bytes = 45.0 KiB per token
    assert "45.0 KiB" in out
    assert "23296 tokens" in out  # 1 GiB / (45 KiB * 16) = 1456 blocks of 16 tokens


def test_bad_arguments_give_clear_errors(tmp_path):
    res = _run("generate", "hi", "--top-p", "1.5")
    assert res.returncode == 2 and "top_p" in res.stderr
    res = _run("info", str(tmp_path / "missing.gguf"))
    assert res.returncode == 2 and "does not exist" in res.stderr


def test_chat_loop_streams_replies_and_exits():
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "tokenmill",
            "chat",
            "--temperature",
            "0",
            "--max-tokens",
            "8",
            "--dtype",
            "float32",
        ],
        input="What is 2 + 2?\n/exit\n",
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr
    reply = res.stdout.split(">>> ")[1].strip()
    assert reply  # the model answered something before /exit


def test_hub_id_without_network_is_a_clear_error():
    res = _run("info", "some-org/not-a-real-model-xyz")
    assert res.returncode == 2
    assert "could not be fetched from the Hugging Face Hub" in res.stderr
