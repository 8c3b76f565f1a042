"""Which adapter sits in which of the model's LoRA slots (`layers.lora`), step by step."""

from __future__ import annotations

from typing import Any

import torch

from tokenmill.layers.linear import Linear
from tokenmill.layers.lora import LoRASlots


class LoRAManager:
    """The runner's adapters (by id) and the slots they occupy. `rows_for(...)` makes a step's
    adapters resident (an adapter not in a slot takes the least recently used one that this
    step does not need) and sets the model's rows per slot."""

    def __init__(self, model: torch.nn.Module, slots: LoRASlots, device: torch.device) -> None:
        self.slots = slots
        self.device = device
        self.layers = {
            name: m
            for name, m in model.named_modules()
            if isinstance(m, Linear) and m.lora is not None
        }
        self.adapters: dict[int, Any] = {}  # id -> loader.lora.LoRAAdapter
        self.resident: dict[int, int] = {}  # id -> slot
        self.last_used: dict[int, int] = {}  # slot -> step counter
        self.steps = 0

    def add(self, lora_id: int, adapter: Any) -> None:
        """Register (or replace) adapter `lora_id`; it is written into a slot when used."""
        self.remove(lora_id)
        self.adapters[lora_id] = adapter

    def remove(self, lora_id: int) -> None:
        self.adapters.pop(lora_id, None)
        self.resident.pop(lora_id, None)

    def _load(self, lora_id: int, busy: set[int]) -> int:
        free = [s for s in range(self.slots.max_loras) if s not in self.resident.values()]
        if free:
            slot = free[0]
        else:
            candidates = [(self.last_used.get(s, -1), s) for s in self.resident.values()]
            slot = min(c for c in candidates if c[1] not in busy)[1]
            evicted = next(i for i, s in self.resident.items() if s == slot)
            del self.resident[evicted]
        weights = self.adapters[lora_id].weights
        for name, layer in self.layers.items():
            layer.lora.set_slot(slot, weights.get(name, {}))
        self.resident[lora_id] = slot
        return slot

    def set_rows(self, rows: dict[int, list[int]]) -> None:
        """This step: the batch rows of each adapter id (at most `max_loras` ids)."""
        self.steps += 1
        busy: set[int] = set()
        out = []
        for lora_id in rows:
            slot = self.resident.get(lora_id)
            if slot is not None:
                busy.add(slot)
        for lora_id, r in rows.items():
            slot = self.resident.get(lora_id)
            if slot is None:
                slot = self._load(lora_id, busy)
                busy.add(slot)
            self.last_used[slot] = self.steps
            out.append((slot, torch.tensor(r, dtype=torch.int64, device=self.device)))
        self.slots.rows = out
