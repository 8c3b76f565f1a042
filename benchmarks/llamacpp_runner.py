"""llama.cpp (llama-cpp-python, a benchmark-only dependency) driven through its C API: the same
token ids as tokenmill, greedy decoding of many sequences in one batch, timed end to end.

Runs in its own process (`bench_llamacpp.py` starts it): ggml's OpenMP runtime and PyTorch's
must not share one.
"""

from __future__ import annotations

import ctypes
import time

import numpy as np


class LlamaCppEngine:
    """One model + context sized for `max_seqs` sequences of `n_ctx_per_seq` tokens."""

    def __init__(
        self, path: str, threads: int, max_seqs: int, n_ctx_per_seq: int, extra_bufts: bool = True
    ) -> None:
        import llama_cpp as lc

        self.lc = lc
        self._quiet = lc.llama_log_callback(lambda level, text, data: None)
        lc.llama_log_set(self._quiet, ctypes.c_void_p(0))  # ggml's load log is very long
        lc.llama_backend_init()
        mp = lc.llama_model_default_params()
        mp.use_extra_bufts = extra_bufts
        self.model = lc.llama_model_load_from_file(path.encode(), mp)
        if not self.model:
            raise RuntimeError(f"llama.cpp cannot load {path}")
        cp = lc.llama_context_default_params()
        cp.n_ctx = max_seqs * n_ctx_per_seq
        cp.n_batch = cp.n_ubatch = 512
        cp.n_seq_max = max_seqs
        cp.n_threads = cp.n_threads_batch = threads
        self.ctx = lc.llama_init_from_model(self.model, cp)
        if not self.ctx:
            raise RuntimeError("llama.cpp cannot create a context")
        self.n_vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(self.model))
        self.batch = lc.llama_batch_init(512, 0, 1)

    def _decode(self, items: list[tuple[int, int, int, bool]]) -> list[int]:
        """items: (token, pos, seq, want_logits), at most 512 per call chunk; returns argmaxes
        for the items that want logits, in order."""
        out = []
        for start in range(0, len(items), 512):
            chunk = items[start : start + 512]
            b = self.batch
            b.n_tokens = len(chunk)
            for i, (tok, pos, seq, logits) in enumerate(chunk):
                b.token[i] = tok
                b.pos[i] = pos
                b.n_seq_id[i] = 1
                b.seq_id[i][0] = seq
                b.logits[i] = logits
            if self.lc.llama_decode(self.ctx, b) != 0:
                raise RuntimeError("llama_decode failed")
            for i, (_, _, _, logits) in enumerate(chunk):
                if logits:
                    ptr = self.lc.llama_get_logits_ith(self.ctx, i)
                    row = np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))
                    out.append(int(row.argmax()))
        return out

    def generate(self, prompts: list[list[int]], new_tokens: int) -> tuple[float, list[list[int]]]:
        """Greedy: prefill every prompt (chunks of 512 tokens), then one batched step per token
        for all sequences. Returns (seconds, generated ids)."""
        mem = self.lc.llama_get_memory(self.ctx)
        self.lc.llama_memory_clear(mem, True)
        t = time.perf_counter()
        items = [
            (tok, pos, s, pos == len(p) - 1)
            for s, p in enumerate(prompts)
            for pos, tok in enumerate(p)
        ]
        last = self._decode(items)
        outs = [[x] for x in last]
        for step in range(1, new_tokens):
            items = [(outs[s][-1], len(p) + step - 1, s, True) for s, p in enumerate(prompts)]
            for s, tok in enumerate(self._decode(items)):
                outs[s].append(tok)
        return time.perf_counter() - t, outs

    def weight_bytes(self) -> int:
        return int(self.lc.llama_model_size(self.model))

    def simd_level(self) -> str:
        """The tokenmill kernel level whose integer-dot instruction this build of ggml's CPU
        backend uses (from its system info): avx512, avxvnni or avx2. Which build runs is the
        `llama_cpp` package on the path: PYTHONPATH may name one built for a lower level."""
        info = self.lc.llama_print_system_info().decode()
        if "AVX512_VNNI = 1" in info:
            return "avx512"
        return "avxvnni" if "AVX_VNNI = 1" in info else "avx2"


def quantize(src: str, dst: str, ftype: str) -> None:
    """llama.cpp's own quantizer: `ftype` like "Q4_K_M", "Q6_K", "Q8_0" (requantizes)."""
    import llama_cpp as lc

    params = lc.llama_model_quantize_default_params()
    params.ftype = getattr(lc, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    params.allow_requantize = True
    params.nthread = 2
    rc = lc.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({src} -> {ftype}) failed: {rc}")
