"""The lines `tokenmill estimate` prints for a `MemoryEstimate`: the figures, the verdict, what
would fit instead, and the sequences that fit at each context length."""

from __future__ import annotations

from tokenmill.config import GiB
from tokenmill.loader.estimate import MemoryEstimate


def context_lengths(max_len: int) -> list[int]:
    """Powers of two from 2,048 up to `max_len`, and `max_len` itself."""
    lengths = []
    n = 2048
    while n < max_len:
        lengths.append(n)
        n *= 2
    return [*lengths, max_len]


def describe_estimate(e: MemoryEstimate, model: str) -> list[str]:
    """The lines `tokenmill estimate` prints."""

    def gib(n: int) -> str:
        return f"{n / GiB:.2f} GiB"

    per = " per rank" if e.tensor_parallel_size > 1 else ""
    full = e.kv(e.max_num_seqs, e.max_model_len)
    room = e.memory - max(e.total, e.loading_peak)
    verdict = f"fits, {gib(room)} to spare" if room >= 0 else f"does not fit: {gib(-room)} over"
    kv_note = (
        "committed as tokens are cached"
        if e.device == "cpu"
        else "reserved at start: the engine fills what the memory leaves"
    )
    rows = [
        ("model", model),
        ("device", f"{e.device}, {e.dtype}" + (f", {e.tensor_parallel_size} ranks" if per else "")),
        ("memory", f"{gib(e.memory)}{per} ({e.memory_source})"),
        ("weights", f"{gib(e.weights)}{per} ({e.weights_stored})"),
        ("runtime", f"{gib(e.runtime + e.first_steps)} ({e.runtime_source})"),
        *(
            [
                (
                    "while loading",
                    f"{gib(e.loading_peak)} (runtime, weights and the checkpoint's "
                    f"{gib(e.checkpoint_bytes)} of mapped pages)",
                )
            ]
            if e.checkpoint_bytes
            else []
        ),
        (
            "activations",
            f"{gib(e.activations)} (the largest step: {e.step_tokens} tokens, and the logits of "
            f"{min(e.max_num_seqs, e.step_tokens)} rows)",
        ),
        (
            "KV cache per token",
            f"{e.kv_per_token / 1024:.1f} KiB{per} in {e.kv_dtype} ({kv_note})",
        ),
        (
            "KV cache at full use",
            f"{gib(full)} ({e.max_num_seqs} sequences x {e.max_model_len} tokens)",
        ),
        ("total at full use", f"{gib(e.total)}"),
        ("verdict", verdict),
    ]
    if e.kv_budget is not None and e.kv_budget < full:
        rows.append(
            (
                "KV budget",
                f"{gib(e.kv_budget)} holds {e.kv_budget // e.kv_per_token} tokens: "
                f"--kv-cache-memory-gib {-(-full * 100 // GiB) / 100:.2f} for full use",
            )
        )
    lines = [f"{k:<24}{v}" for k, v in rows]
    if room < 0:
        seqs = e.sequences_that_fit(e.max_model_len)
        ctx = e.longest_context(e.max_num_seqs)
        hint = []
        if seqs:
            hint.append(f"--max-num-seqs {seqs} (at {e.max_model_len} tokens)")
        if ctx:
            hint.append(f"--max-model-len {ctx} (at {e.max_num_seqs} sequences)")
        lines.append(f"{'fits with':<24}{' or '.join(hint) if hint else 'nothing: not even one'}")
    lines.append("")
    lines.append(f"{'context':>10}{'KV per sequence':>18}{'sequences that fit':>20}")
    for n in context_lengths(e.max_model_len):
        lines.append(f"{n:>10}{e.kv(1, n) / 2**20:>14.1f} MiB{e.sequences_that_fit(n):>20}")
    return lines


__all__ = ["describe_estimate"]
