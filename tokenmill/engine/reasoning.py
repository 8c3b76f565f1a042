"""Reasoning parsers (vLLM's `--reasoning-parser`): a reasoning model's output split into its
reasoning, written between `<think>` and `</think>`, and its answer after them.

* `deepseek_r1`: the output starts inside the reasoning (DeepSeek-R1's templates end the prompt
  with `<think>`, and its first releases wrote none), so everything up to `</think>` is
  reasoning, all of it when the output has none (cut short while thinking).
* `qwen3`: the output is inside the reasoning when it starts with `<think>` (Qwen3's hybrid
  models) or the prompt ends with it (the thinking-only releases); otherwise (thinking turned
  off by `enable_thinking: false`) everything is the answer.

An output constraint (structured output, a required tool call) starts after `</think>`
(`grammar_after`), so that the model reasons first, as vLLM does.

As in vLLM, neither part is trimmed: Qwen3's answer keeps the blank line it writes after
`</think>`. A streamed split equals the whole output's split, however the text was cut into
deltas (a tag split over deltas is held back until it is complete or ruled out)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

START, END = "<think>", "</think>"
REASONING_PARSERS = ("deepseek_r1", "qwen3")


@dataclass(frozen=True)
class ReasoningParser:
    """One of `REASONING_PARSERS`: where a sample's reasoning starts and ends."""

    name: str

    def __post_init__(self) -> None:
        if self.name not in REASONING_PARSERS:
            known = ", ".join(REASONING_PARSERS)
            raise ValueError(f"unknown reasoning parser {self.name!r}; choose from {known}")

    def starts_inside(self, prompt_text: str | None) -> bool:
        """Whether a sample of this prompt starts inside its reasoning (before any `<think>`
        of its own)."""
        if self.name == "deepseek_r1":
            return True
        return prompt_text is not None and prompt_text.rstrip().endswith(START)

    def grammar_after(self, prompt_text: str | None, tokenizer: Any) -> int | None:
        """The token an output constraint of this prompt's samples starts after
        (`StructuredOutputsParams.after_token_id`): `</think>` where a sample may reason and
        the vocabulary spells it as one token (Qwen3's and DeepSeek-R1's do); None, from the
        first token, where it is not one token or the prompt closed the reasoning already
        (Qwen3 with `enable_thinking: false`)."""
        if self.name == "qwen3" and prompt_text is not None and prompt_text.rstrip().endswith(END):
            return None
        ids = tokenizer.encode(END, add_special_tokens=False)
        return ids[0] if len(ids) == 1 else None

    def streamer(self, prompt_text: str | None) -> ReasoningStreamer:
        """A new streaming split for one sample of this prompt."""
        return ReasoningStreamer(self.starts_inside(prompt_text))

    def extract(self, text: str, prompt_text: str | None) -> tuple[str | None, str]:
        """A whole output as (reasoning, answer): reasoning None when the sample never
        reasoned."""
        s = self.streamer(prompt_text)
        reasoning, content = s.feed(text)
        more_reasoning, more_content = s.finish()
        return (reasoning + more_reasoning if s.reasoned else None), content + more_content


class ReasoningStreamer:
    """The split of one sample's output, fed its text delta by delta."""

    def __init__(self, inside: bool) -> None:
        self.state = "start"  # "start" (may still open with <think>), "reasoning", "content"
        self.inside = inside  # the sample starts inside its reasoning
        self.reasoned = inside
        self.held = ""  # text not yet given out: a possible start of a tag

    def feed(self, delta: str) -> tuple[str, str]:
        """The (reasoning, answer) text that `delta` completes."""
        text, self.held = self.held + delta, ""
        reasoning = content = ""
        if self.state == "start":
            if START.startswith(text) and text != START:
                self.held = text  # "<thi": wait for the rest
                return "", ""
            if text.startswith(START):
                text, self.reasoned = text[len(START) :], True
                self.state = "reasoning"
            else:
                self.state = "reasoning" if self.inside else "content"
        if self.state == "reasoning":
            end = text.find(END)
            if end < 0:
                keep = _partial_suffix(text, END)
                reasoning, self.held = text[: len(text) - keep], text[len(text) - keep :]
                return reasoning, ""
            reasoning, text = text[:end], text[end + len(END) :]
            self.state = "content"
        content = text
        return reasoning, content

    def finish(self) -> tuple[str, str]:
        """What was held back, once the sample ended: part of its reasoning when it was
        reasoning (an unfinished `</think>`), else of its answer."""
        held, self.held = self.held, ""
        if self.state == "reasoning" or (self.state == "start" and self.inside):
            return held, ""
        return "", held


def _partial_suffix(text: str, tag: str) -> int:
    """The length of the longest end of `text` that begins `tag` (shorter than the tag)."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0
