"""The options of one `bench serve` run (`ServeBenchConfig`), checked and read from the
command line's namespace."""

from __future__ import annotations

import argparse
import math
from dataclasses import asdict, dataclass
from typing import Any

from tokenmill.bench.prompts import BenchConfigError


@dataclass(frozen=True, slots=True)
class ServeBenchConfig:
    """The options of one `bench serve` run (the API key is kept out of `to_json`)."""

    base_url: str
    api_key: str | None
    model: str | None
    endpoint: str
    mode: str  # "concurrency" or "rate"
    levels: tuple[float, ...]
    max_concurrency: int | None
    num_prompts: int | None
    warmup: int
    input_len: int
    output_len: int
    len_dist: str
    len_range: float
    seed: int
    dataset: str | None
    temperature: float
    ignore_eos: bool
    timeout: float
    extra_body: dict[str, Any] | None
    label: str
    progress: bool

    def __post_init__(self) -> None:
        if self.num_prompts is not None and self.num_prompts < 1:
            raise BenchConfigError("--num-prompts must be at least 1")
        if self.warmup < 0:
            raise BenchConfigError("--warmup must be >= 0")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise BenchConfigError("--max-concurrency must be at least 1")
        if self.max_concurrency is not None and self.mode != "rate":
            raise BenchConfigError("--max-concurrency applies to --request-rate only")
        if self.timeout <= 0:
            raise BenchConfigError("--timeout must be > 0")

    @classmethod
    def from_namespace(cls, ns: argparse.Namespace) -> ServeBenchConfig:
        mode = "rate" if ns.request_rate is not None else "concurrency"
        levels = ns.request_rate if mode == "rate" else (ns.concurrency or [1])
        return cls(
            base_url=ns.base_url.rstrip("/"),
            api_key=ns.api_key,
            model=ns.model,
            endpoint=ns.endpoint,
            mode=mode,
            levels=tuple(float(x) for x in levels),
            max_concurrency=ns.max_concurrency,
            num_prompts=ns.num_prompts,
            warmup=ns.warmup,
            input_len=ns.input_len,
            output_len=ns.output_len,
            len_dist=ns.len_dist,
            len_range=ns.len_range,
            seed=ns.seed,
            dataset=ns.dataset,
            temperature=ns.temperature,
            ignore_eos=ns.ignore_eos,
            timeout=ns.timeout,
            extra_body=ns.extra_body,
            label=ns.label,
            progress=not ns.no_progress,
        )

    @property
    def url(self) -> str:
        path = "/chat/completions" if self.endpoint == "chat" else "/completions"
        return self.base_url + path

    def level_value(self, level: float) -> float | str:
        """A level as shown in JSON: an int for concurrency, 'inf' for an unbounded rate."""
        if math.isinf(level):
            return "inf"
        return int(level) if self.mode == "concurrency" else level

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        del d["api_key"], d["progress"]
        d["levels"] = [self.level_value(x) for x in self.levels]
        d["url"] = self.url
        return d
