"""Shared fixtures: the embedded GGUF, tiny random HF checkpoints, a float32 engine."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if not torch.cuda.is_available():  # Triton kernels run in its interpreter on the CPU
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def default_gguf() -> str:
    from tokenmill.loader.resolve import default_model_path

    return str(default_model_path())


@pytest.fixture(scope="session")
def hf_gguf_model(default_gguf):
    """transformers' own loading of the embedded GGUF (the reference), float32."""
    from transformers import AutoModelForCausalLM

    folder, name = os.path.split(default_gguf)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="session")
def hf_gguf_tokenizer(default_gguf):
    from transformers import AutoTokenizer

    folder, name = os.path.split(default_gguf)
    return AutoTokenizer.from_pretrained(folder, gguf_file=name)


@pytest.fixture(scope="session")
def llm_f32():
    """One float32 engine over the embedded model with dequantized weights, shared by the
    end-to-end tests: float32 math throughout, so batching, chunking and preemption must not
    change a greedy token except at exact ties (the native kernels quantize activations to
    int8, which turns float noise into visible logit changes: tests/test_gguf_native.py)."""
    from tokenmill import LLM

    return LLM(dtype="float32", max_model_len=2048, quantization="none")
