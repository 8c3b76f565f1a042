"""The model's recommended sampling settings (vLLM's `--generation-config`): the defaults of the
requests that leave them out.

* `auto`: the model's own: a folder's `generation_config.json` (temperature, top_p, top_k,
  min_p, repetition_penalty, as vLLM reads it), a GGUF file's `general.sampling.*` keys (temp,
  top_p, top_k, min_p, penalty_repeat, as llama.cpp's converter writes them from that file);
* `vllm`: none (the API's defaults: temperature 1, no top-k / top-p / min-p / penalty);
* a folder: its `generation_config.json`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from tokenmill.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

# generation_config.json's names, which are SamplingParams' too
CONFIG_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
# GGUF metadata key -> SamplingParams field
GGUF_KEYS = {
    "general.sampling.temp": "temperature",
    "general.sampling.top_p": "top_p",
    "general.sampling.top_k": "top_k",
    "general.sampling.min_p": "min_p",
    "general.sampling.penalty_repeat": "repetition_penalty",
}


def sampling_defaults(option: str, info: Any) -> dict[str, float | int]:
    """The default sampling settings under `--generation-config option` for the loaded model
    (`loader.load.ModelInfo`); settings that SamplingParams refuses are dropped, with a
    warning."""
    if option == "vllm":
        return {}
    if option == "auto" and info.source.kind == "gguf":
        found = {GGUF_KEYS[k]: v for k, v in info.metadata.items() if k in GGUF_KEYS}
        where = "the GGUF file's general.sampling keys"
    else:
        folder = Path(info.source.path if option == "auto" else option)
        path = folder / "generation_config.json"
        if not path.is_file():
            if option != "auto":
                raise ValueError(f"--generation-config {option}: no generation_config.json there")
            return {}
        config = json.loads(path.read_text(encoding="utf-8"))
        found = {k: config[k] for k in CONFIG_KEYS if isinstance(config, dict) and k in config}
        where = str(path)
    found = {k: v for k, v in found.items() if type(v) in (int, float)}  # no bools, no nulls
    try:
        SamplingParams(**found)
    except (TypeError, ValueError) as e:
        logger.warning("ignoring the sampling defaults of %s (%s): %s", where, found, e)
        return {}
    if found:
        shown = ", ".join(f"{k}={v:g}" for k, v in found.items())
        logger.info("default sampling from %s: %s", where, shown)
    return found
