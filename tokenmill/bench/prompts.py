"""Benchmark prompts: synthetic ones built from a word list, or read from a JSONL data set."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from tokenmill.errors import TokenmillError

# Common English words that nearly every BPE vocabulary holds as one token when preceded by a
# space, so a prompt of N words is close to N tokens on most models.
_WORD_TEXT = (
    "the of and to in is was for on that with as by at from his her they this had not are but"
    " have one all were when there can an your which their said each she do how will up other"
    " about out many then them these so some would make like him into time has look two more"
    " write go see number no way could people my than first water been call who oil its now"
    " find long down day did get come made may part over new sound take only little work know"
    " place year live me back give most very after thing our just name good man think say great"
    " where help through much before line right too mean old any same tell boy follow came want"
    " show also around form three small set put end does another well large must big even such"
    " because turn here why ask went men read need land different home us move try kind hand"
    " picture again change off play spell air away animal house point page letter mother answer"
    " found study still learn should world high every near add food between own below country"
    " plant last school father keep tree never start city earth eye light thought head under"
    " story saw left few while along might close something seem next hard open example begin"
    " life always those both paper together got group often run important until children side"
    " feet car mile night walk white sea began grow took river four carry state once book hear"
    " stop without second later miss idea enough eat face watch far real almost let above girl"
)
WORDS: tuple[str, ...] = tuple(_WORD_TEXT.split())


class BenchConfigError(TokenmillError, ValueError):
    """A benchmark option or input file that cannot be used (the message says why)."""


@dataclass(frozen=True, slots=True)
class PromptSpec:
    """One benchmark request: the prompt text and how many tokens to ask for.

    `input_len` is the intended prompt length in tokens (the word count for synthetic prompts,
    None for data sets); the server's own count comes back in the usage chunk.
    """

    prompt: str
    output_len: int
    input_len: int | None = None


def sample_lengths(rng: random.Random, mean: int, num: int, dist: str, frac: float) -> list[int]:
    """`num` lengths around `mean`: all equal (`fixed`) or uniform in mean * [1-frac, 1+frac]."""
    if mean < 1:
        raise BenchConfigError(f"lengths must be at least 1, got {mean}")
    if dist == "fixed":
        return [mean] * num
    if dist != "uniform":
        raise BenchConfigError(f"unknown length distribution {dist!r} (fixed or uniform)")
    if not 0.0 <= frac <= 1.0:
        raise BenchConfigError(f"--len-range must be in [0, 1], got {frac}")
    lo = max(1, round(mean * (1.0 - frac)))
    hi = max(lo, round(mean * (1.0 + frac)))
    return [rng.randint(lo, hi) for _ in range(num)]


def synthetic_prompts(
    num: int,
    input_len: int,
    output_len: int,
    dist: str = "fixed",
    frac: float = 0.0,
    seed: int = 0,
    salt: str = "",
) -> list[PromptSpec]:
    """Random word prompts. Lengths depend only on `seed`; words also on `salt`.

    Levels of one run share lengths but get different words (a different `salt`), so a server's
    prefix cache cannot serve a later level from an earlier one.
    """
    len_rng = random.Random(seed)
    in_lens = sample_lengths(len_rng, input_len, num, dist, frac)
    out_lens = sample_lengths(len_rng, output_len, num, dist, frac)
    word_rng = random.Random(f"{seed}/{salt}")
    specs = []
    for n_in, n_out in zip(in_lens, out_lens):
        text = " ".join(word_rng.choice(WORDS) for _ in range(n_in))
        specs.append(PromptSpec(prompt=text, output_len=n_out, input_len=n_in))
    return specs


def load_dataset(path: str | Path, default_output_len: int) -> list[PromptSpec]:
    """Read JSONL: one object per line with `prompt` (a string) and optional `max_tokens`."""
    specs = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise BenchConfigError(f"cannot read data set {path}: {e}") from e
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise BenchConfigError(f"{path}:{lineno}: invalid JSON ({e})") from e
        if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
            raise BenchConfigError(f"{path}:{lineno}: expected an object with a string 'prompt'")
        max_tokens = obj.get("max_tokens", default_output_len)
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise BenchConfigError(f"{path}:{lineno}: max_tokens must be a positive integer")
        specs.append(PromptSpec(prompt=obj["prompt"], output_len=max_tokens))
    if not specs:
        raise BenchConfigError(f"data set {path} holds no prompts")
    return specs


def take(specs: list[PromptSpec], num: int) -> list[PromptSpec]:
    """The first `num` specs, cycling through the list when it is shorter."""
    return [specs[i % len(specs)] for i in range(num)]
