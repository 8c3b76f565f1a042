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


def _patch_device_functions_once() -> None:
    """Triton 3.8's interpreter re-patches `triton.language` for every call of a @jit device
    function inside a kernel (tl.sum, tl.max, tl.zeros, our helpers): `inspect.getmembers` over
    the language modules, a third of an interpreted launch's time. The patch of a device
    function's modules outlives the call (Triton drops its scope without restoring it), and the
    kernel's own launch has patched `triton.language` already, so after a device function's
    first call the repeats change nothing: this skips them (16-30% off the Triton tests). Other
    Triton versions keep their own behaviour."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    try:
        import triton
        from triton.runtime import interpreter
    except ImportError:  # the lowest-pins run's first venv has no triton
        return

    if not triton.__version__.startswith("3.8.") or not hasattr(interpreter, "_patch_lang"):
        return
    patched: set[int] = set()  # ids of the device functions' globals, patched once

    def call(self, *args, **kwargs):
        if id(self.fn.__globals__) not in patched:
            interpreter._patch_lang(self.fn)
            patched.add(id(self.fn.__globals__))
        fn = self.rewrite()
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            raise interpreter.InterpreterError(repr(e)) from e

    interpreter.InterpretedFunction.__call__ = call


_patch_device_functions_once()


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
