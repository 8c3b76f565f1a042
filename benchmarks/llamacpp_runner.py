"""llama.cpp (llama-cpp-python, a benchmark-only dependency) driven through its C API: the same
token ids as tokenmill, greedy decoding of many sequences in one batch, timed end to end.

Runs in its own process (`bench_llamacpp.py` starts it): ggml's OpenMP runtime and PyTorch's
must not share one.
"""

from __future__ import annotations

import ctypes
import time

import numpy as np


def simd_level() -> str:
    """The tokenmill kernel level whose integer-dot instruction this build of ggml's CPU
    backend uses (from its system info): avx512, avxvnni or avx2. Which build runs is the
    `llama_cpp` package on the path: PYTHONPATH may name one built for a lower level."""
    import llama_cpp as lc

    info = lc.llama_print_system_info().decode()
    if "AVX512_VNNI = 1" in info:
        return "avx512"
    return "avxvnni" if "AVX_VNNI = 1" in info else "avx2"


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

    def generate_lookup(
        self, prompt: list[int], new_tokens: int, proposer
    ) -> tuple[float, list[int], int, int]:
        """Greedy decoding of one sequence with prompt-lookup drafts (`proposer.propose(tokens,
        k)`, tokenmill's n-gram search, so both engines check the same drafts): each step
        decodes the last token and up to `proposer.k` drafts with logits at every position,
        keeps the drafts that equal the argmax before them, and removes the rejected
        positions from the KV cache. Returns (seconds, generated ids, steps, draft tokens)."""
        mem = self.lc.llama_get_memory(self.ctx)
        self.lc.llama_memory_clear(mem, True)
        t = time.perf_counter()
        items = [(tok, pos, 0, pos == len(prompt) - 1) for pos, tok in enumerate(prompt)]
        out = self._decode(items)
        steps = draft_tokens = 0
        while len(out) < new_tokens:
            tokens = prompt + out
            drafts = proposer.propose(tokens, min(proposer.k, new_tokens - len(out) - 1))
            n = len(tokens) - 1  # the position of the last token, not yet in the cache
            items = [(tok, n + j, 0, True) for j, tok in enumerate([tokens[-1], *drafts])]
            targets = self._decode(items)
            kept = 0
            while kept < len(drafts) and targets[kept] == drafts[kept]:
                kept += 1
            out += targets[: kept + 1]
            self.lc.llama_memory_seq_rm(mem, 0, n + kept + 1, -1)  # the rejected drafts' cells
            steps += 1
            draft_tokens += len(drafts)
        return time.perf_counter() - t, out[:new_tokens], steps, draft_tokens

    def weight_bytes(self) -> int:
        return int(self.lc.llama_model_size(self.model))

    def simd_level(self) -> str:
        return simd_level()


class LlamaCppEmbedder:
    """llama.cpp's embeddings (last-token pooling, after the final norm, as tokenmill's
    default) of sequences of `seq_len` tokens, as many whole sequences per llama_decode as fit
    in `batch_tokens` (its examples/embedding packs them so)."""

    def __init__(self, path: str, threads: int, seq_len: int, batch_tokens: int = 2048) -> None:
        import llama_cpp as lc

        self.lc = lc
        self._quiet = lc.llama_log_callback(lambda level, text, data: None)
        lc.llama_log_set(self._quiet, ctypes.c_void_p(0))
        lc.llama_backend_init()
        self.model = lc.llama_model_load_from_file(path.encode(), lc.llama_model_default_params())
        if not self.model:
            raise RuntimeError(f"llama.cpp cannot load {path}")
        self.per_batch = max(1, batch_tokens // seq_len)
        cp = lc.llama_context_default_params()
        cp.n_ctx = cp.n_batch = cp.n_ubatch = self.per_batch * seq_len
        cp.n_seq_max = self.per_batch
        cp.n_threads = cp.n_threads_batch = threads
        cp.embeddings = True
        cp.pooling_type = lc.LLAMA_POOLING_TYPE_LAST
        self.ctx = lc.llama_init_from_model(self.model, cp)
        if not self.ctx:
            raise RuntimeError("llama.cpp cannot create an embedding context")
        self.n_embd = lc.llama_model_n_embd(self.model)
        self.batch = lc.llama_batch_init(cp.n_batch, 0, 1)

    def embed(self, prompts: list[list[int]]) -> tuple[float, np.ndarray]:
        """(seconds, [len(prompts), n_embd] float32 vectors, not normalized)."""
        lc, mem = self.lc, self.lc.llama_get_memory(self.ctx)
        out = np.empty((len(prompts), self.n_embd), dtype=np.float32)
        t = time.perf_counter()
        for first in range(0, len(prompts), self.per_batch):
            group = prompts[first : first + self.per_batch]
            lc.llama_memory_clear(mem, True)
            b, i = self.batch, 0
            for seq, ids in enumerate(group):
                for pos, tok in enumerate(ids):
                    b.token[i], b.pos[i], b.n_seq_id[i] = tok, pos, 1
                    b.seq_id[i][0] = seq
                    b.logits[i] = pos == len(ids) - 1
                    i += 1
            b.n_tokens = i
            if lc.llama_decode(self.ctx, b) != 0:
                raise RuntimeError("llama_decode failed")
            for seq in range(len(group)):
                ptr = lc.llama_get_embeddings_seq(self.ctx, seq)
                out[first + seq] = np.ctypeslib.as_array(ptr, shape=(self.n_embd,))
        return time.perf_counter() - t, out


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
