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
    room = e.memory - max(e.total, e.loading_peak)
    rows = _fixed_rows(e, model) + _kv_rows(e, room)
    lines = [f"{k:<24}{v}" for k, v in rows]
    if room < 0:
        lines.append(f"{'fits with':<24}{_what_fits(e)}")
    lines.append("")
    lines.append(f"{'context':>10}{'KV per sequence':>18}{'sequences that fit':>20}")
    for n in context_lengths(e.max_model_len):
        lines.append(f"{n:>10}{e.kv(1, n) / 2**20:>14.1f} MiB{e.sequences_that_fit(n):>20}")
    return lines


def _gib(n: int) -> str:
    """`n` bytes in GiB, to two decimals."""
    return f"{n / GiB:.2f} GiB"


def _fixed_rows(e: MemoryEstimate, model: str) -> list[tuple[str, str]]:
    """The rows of what does not depend on the tokens cached: the model and device, the memory
    to fit in, the weights, the runtime, the loading peak (where the checkpoint is mapped) and
    the activations."""
    per = " per rank" if e.tensor_parallel_size > 1 else ""
    rows = [
        ("model", model),
        ("device", f"{e.device}, {e.dtype}" + (f", {e.tensor_parallel_size} ranks" if per else "")),
        ("memory", f"{_gib(e.memory)}{per} ({e.memory_source})"),
        ("weights", f"{_gib(e.weights)}{per} ({e.weights_stored})"),
        ("runtime", f"{_gib(e.runtime + e.first_steps)} ({e.runtime_source})"),
    ]
    if e.checkpoint_bytes:
        rows.append(
            (
                "while loading",
                f"{_gib(e.loading_peak)} (runtime, weights and the checkpoint's "
                f"{_gib(e.checkpoint_bytes)} of mapped pages)",
            )
        )
    rows.append(
        (
            "activations",
            f"{_gib(e.activations)} (the largest step: {e.step_tokens} tokens, and the logits "
            f"of {min(e.max_num_seqs, e.step_tokens)} rows)",
        )
    )
    return rows


def _kv_rows(e: MemoryEstimate, room: int) -> list[tuple[str, str]]:
    """The rows of the KV cache, the total at full use and the verdict (`room`: the memory
    left at the peak, negative when over), and the KV budget where it holds less than full
    use."""
    per = " per rank" if e.tensor_parallel_size > 1 else ""
    full = e.kv(e.max_num_seqs, e.max_model_len)
    verdict = f"fits, {_gib(room)} to spare" if room >= 0 else f"does not fit: {_gib(-room)} over"
    kv_note = (
        "committed as tokens are cached"
        if e.device == "cpu"
        else "reserved at start: the engine fills what the memory leaves"
    )
    rows = [
        ("KV cache per token", f"{e.kv_per_token / 1024:.1f} KiB{per} in {e.kv_dtype} ({kv_note})"),
        (
            "KV cache at full use",
            f"{_gib(full)} ({e.max_num_seqs} sequences x {e.max_model_len} tokens)",
        ),
        ("total at full use", f"{_gib(e.total)}"),
        ("verdict", verdict),
    ]
    if e.kv_budget is not None and e.kv_budget < full:
        rows.append(
            (
                "KV budget",
                f"{_gib(e.kv_budget)} holds {e.kv_budget // e.kv_per_token} tokens: "
                f"--kv-cache-memory-gib {-(-full * 100 // GiB) / 100:.2f} for full use",
            )
        )
    return rows


def _what_fits(e: MemoryEstimate) -> str:
    """What would fit instead: fewer sequences at the full length, or a shorter length for as
    many sequences."""
    seqs = e.sequences_that_fit(e.max_model_len)
    ctx = e.longest_context(e.max_num_seqs)
    hint = []
    if seqs:
        hint.append(f"--max-num-seqs {seqs} (at {e.max_model_len} tokens)")
    if ctx:
        hint.append(f"--max-model-len {ctx} (at {e.max_num_seqs} sequences)")
    return " or ".join(hint) if hint else "nothing: not even one"


__all__ = ["describe_estimate"]
