"""Perplexity of a text under the model, by sliding windows scored with prompt logprobs.

The text is tokenized once; windows of `context_length` tokens start every `stride` tokens
(the Hugging Face perplexity guide's scheme). Each token is scored once, in the first window
that reaches it, so every token but the first few of the text sees at least
`context_length - stride` tokens of context. All windows go to the engine at once as
prompt-scoring requests (`max_tokens=0`, `prompt_logprobs=0`), so they are batched.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tokenmill.sampling_params import SamplingParams

if TYPE_CHECKING:
    from tokenmill.engine.llm import LLM

DEFAULT_CONTEXT_LENGTH = 512


@dataclass(frozen=True, slots=True)
class Window:
    """Tokens [begin, end) of the text, of which [first_scored, end) are scored here."""

    begin: int
    end: int
    first_scored: int


@dataclass(frozen=True, slots=True)
class PerplexityResult:
    perplexity: float  # exp(mean_nll)
    mean_nll: float  # mean negative log-likelihood per scored token (nats)
    num_scored_tokens: int  # every token of the text but the first
    num_evaluated_tokens: int  # tokens run through the model (windows overlap)
    num_windows: int
    context_length: int
    stride: int
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        """Scored tokens per second of wall-clock time."""
        return self.num_scored_tokens / self.seconds if self.seconds > 0 else math.inf


def sliding_windows(num_tokens: int, context_length: int, stride: int) -> list[Window]:
    """Windows over a text of num_tokens tokens; together they score tokens 1..num_tokens-1
    once each (token 0 has nothing before it)."""
    if context_length < 2:
        raise ValueError(f"context length must be >= 2, got {context_length}")
    if not 1 <= stride < context_length:
        # a stride of a whole window would leave each window's first token unscored
        raise ValueError(f"stride must be in [1, context length={context_length}), got {stride}")
    windows: list[Window] = []
    prev_end = 0
    for begin in range(0, num_tokens, stride):
        end = min(begin + context_length, num_tokens)
        windows.append(Window(begin, end, max(prev_end, begin + 1)))
        prev_end = end
        if end == num_tokens:
            break
    return windows


def perplexity(
    llm: LLM,
    text: str | list[int],
    context_length: int | None = None,
    stride: int | None = None,
    max_tokens: int | None = None,
    use_tqdm: bool = False,
) -> PerplexityResult:
    """Perplexity of `text` (a string, tokenized with special tokens as `encode` adds them, or
    token ids). context_length defaults to min(max_model_len, 512), stride to half of it;
    max_tokens keeps only the text's first tokens."""
    ids = llm.get_tokenizer().encode(text) if isinstance(text, str) else list(text)
    if max_tokens is not None:
        if max_tokens < 2:
            raise ValueError(f"max_tokens must be >= 2, got {max_tokens}")
        ids = ids[:max_tokens]
    if len(ids) < 2:
        raise ValueError(f"the text has {len(ids)} token(s); perplexity needs at least 2")
    max_len = llm.engine.max_model_len
    context_length = context_length or min(max_len, DEFAULT_CONTEXT_LENGTH)
    if context_length > max_len:
        raise ValueError(
            f"context length {context_length} exceeds the model's maximum "
            f"context ({max_len} tokens)"
        )
    stride = stride or max(1, context_length // 2)
    windows = sliding_windows(len(ids), context_length, stride)
    params = SamplingParams(max_tokens=0, prompt_logprobs=0)
    t0 = time.perf_counter()
    outputs = llm.generate([ids[w.begin : w.end] for w in windows], params, use_tqdm=use_tqdm)
    seconds = time.perf_counter() - t0
    nlls: list[float] = []
    for w, out in zip(windows, outputs):
        plps = out.prompt_logprobs
        assert plps is not None and len(plps) == w.end - w.begin
        for pos in range(w.first_scored, w.end):
            nlls.append(-plps[pos - w.begin][ids[pos]].logprob)
    mean_nll = math.fsum(nlls) / len(nlls)
    return PerplexityResult(
        perplexity=math.exp(mean_nll),
        mean_nll=mean_nll,
        num_scored_tokens=len(nlls),
        num_evaluated_tokens=sum(w.end - w.begin for w in windows),
        num_windows=len(windows),
        context_length=context_length,
        stride=stride,
        seconds=seconds,
    )
