"""The engine's LoRA adapters by id: each loaded once from its PEFT folder, checked against the
model, and handed to the runner's slots (`worker.lora.LoRAManager`) and to every
tensor-parallel rank."""

from __future__ import annotations

import logging

from tokenmill.engine.tensor_parallel import TensorParallelWorkers
from tokenmill.loader.lora import load_lora_adapter
from tokenmill.lora_request import LoRARequest
from tokenmill.models.base import CausalLM
from tokenmill.worker.lora import LoRAManager

logger = logging.getLogger(__name__)


class LoRAAdapters:
    """The adapters loaded so far (`LLMEngine.add_lora` / `remove_lora` / `list_loras`)."""

    def __init__(
        self,
        model: CausalLM,
        slots: LoRAManager | None,
        workers: TensorParallelWorkers | None,
        max_rank: int,
    ) -> None:
        self.model = model
        self.slots = slots  # None: the engine was started without LoRA
        self.workers = workers
        self.max_rank = max_rank
        self._by_id: dict[int, LoRARequest] = {}

    def add(self, lora_request: LoRARequest) -> int:
        """Load adapter `lora_request` once per id; returns its id. ValueError (ModelLoadError)
        for an engine without LoRA, an id already taken by another adapter, or an adapter that
        does not fit the model (the message names what)."""
        if self.slots is None:
            raise ValueError("LoRA adapters need an engine started with enable_lora=True")
        lora_id = lora_request.lora_int_id
        known = self._by_id.get(lora_id)
        if known is not None:
            if known != lora_request:
                raise ValueError(
                    f"lora_int_id {lora_id} is already {known.lora_name!r} ({known.lora_path})"
                )
            return lora_id
        name, path = lora_request.lora_name, lora_request.lora_path
        adapter = load_lora_adapter(name, path, self.model, self.max_rank)
        if self.workers is not None:  # each rank keeps its part of every slot
            self.workers.add_lora(lora_id, name, path, self.max_rank)
        self.slots.add(lora_id, adapter)
        self._by_id[lora_id] = lora_request
        logger.info(
            "LoRA adapter %r (id %d, rank %d, %d layers) from %s",
            name,
            lora_id,
            adapter.rank,
            len(adapter.weights),
            path,
        )
        return lora_id

    def remove(self, lora_int_id: int, users: int) -> None:
        """Forget adapter `lora_int_id`; ValueError for an unknown id or while `users`
        (unfinished sequences running or waiting with it) is not 0."""
        known = self._by_id.get(lora_int_id)
        if known is None:
            raise ValueError(f"no LoRA adapter with id {lora_int_id}")
        if users:
            raise ValueError(
                f"LoRA adapter {known.lora_name!r} is in use by {users} unfinished sequence(s)"
            )
        assert self.slots is not None
        if self.workers is not None:
            self.workers.remove_lora(lora_int_id)
        self.slots.remove(lora_int_id)
        del self._by_id[lora_int_id]

    def list(self) -> list[LoRARequest]:
        """The adapters loaded so far, by id."""
        return [self._by_id[i] for i in sorted(self._by_id)]
