"""LoRARequest: which LoRA adapter a request runs with (vLLM's form)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LoRARequest:
    """The adapter `lora_name`, a PEFT folder at `lora_path`, known to the engine by
    `lora_int_id` (> 0; one id per adapter: the prefix cache keys blocks by it)."""

    lora_name: str
    lora_int_id: int
    lora_path: str

    def __post_init__(self) -> None:
        if self.lora_int_id < 1:
            raise ValueError(f"lora_int_id must be >= 1, got {self.lora_int_id}")
        if not self.lora_name:
            raise ValueError("lora_name must not be empty")
