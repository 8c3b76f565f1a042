"""Tensor-parallel ranks as processes: rank 0 is the engine's process, ranks 1..size-1 are
started here and mirror its forward passes.

All ranks join one torch.distributed process group (NCCL on CUDA, one GPU per rank; gloo on
the CPU) whose all-reduces sum the row-parallel projections (`layers.parallel`), plus a gloo
group with no idle timeout that carries rank 0's commands (`broadcast_object_list`): build
the runner (and capture its graphs, in the same order as rank 0), run a profile forward, load
a LoRA adapter, run a step's forward pass (`ModelRunner.forward` of the step's `HostBatch`),
stop. The scheduler, the sampler and the outputs live on rank 0 only: the other ranks hold no
request state, so their own sampled values never matter.
"""

from __future__ import annotations

import atexit
import logging
import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tokenmill.config import cuda_kv_budget
from tokenmill.errors import ModelLoadError
from tokenmill.layers.lora import LoRASlots
from tokenmill.layers.parallel import TensorParallel
from tokenmill.loader.load import load_model, rank_arch, read_model_info
from tokenmill.loader.lora import load_lora_adapter
from tokenmill.loader.resolve import ModelSource
from tokenmill.worker.model_runner import ModelRunner
from tokenmill.worker.profile import profile_forward

logger = logging.getLogger(__name__)

# Ranks wait for rank 0's next command for as long as the server idles.
COMMAND_TIMEOUT = timedelta(days=3650)
STOP_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class RankSpec:
    """What every rank needs to load its part of the model (picklable)."""

    source: ModelSource
    dtype: torch.dtype
    max_model_len: int | None
    device: torch.device  # rank 0's; rank r uses the r-th GPU after it
    quantization: str
    load_format: str
    seed: int
    num_threads: int  # torch threads per rank on the CPU
    lora: tuple[int, int] | None  # (max_loras, max_lora_rank) with LoRA slots, else None

    def device_of(self, rank: int) -> torch.device:
        if self.device.type != "cuda":
            return self.device
        return torch.device("cuda", (self.device.index or 0) + rank)


def threads_per_rank(size: int, num_threads: int | None) -> int:
    """CPU threads for each of `size` ranks: the option, else the cores shared out evenly."""
    if num_threads:
        return num_threads
    return max(1, len(os.sched_getaffinity(0)) // size)


def start_ranks(
    args: Any, source: ModelSource, device: torch.device, dtype: torch.dtype
) -> TensorParallelWorkers | None:
    """The other ranks of `args.tensor_parallel_size` (None for 1), started after the
    checkpoint's headers show the size splits the model (otherwise ModelLoadError, and no
    process starts). Sets this process's CPU threads to its share (`threads_per_rank`)."""
    size = args.tensor_parallel_size
    if size == 1:
        return None
    rank_arch(read_model_info(source, args.load_format)[0].arch, size)
    torch.set_num_threads(threads_per_rank(size, args.num_threads))
    spec = RankSpec(
        source,
        dtype,
        args.max_model_len,
        device,
        args.quantization,
        args.load_format,
        args.seed,
        torch.get_num_threads(),
        (args.max_loras, args.max_lora_rank) if args.lora_enabled else None,
    )
    return TensorParallelWorkers(size, spec)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _join(rank: int, size: int, init_method: str, device: torch.device) -> tuple[Any, Any]:
    """Join the ranks: (the compute group, the command group)."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=size)
    if device.type == "cuda":  # NCCL's communicator now, not inside a first graph capture
        dist.all_reduce(torch.zeros(1, device=device))
    commands = dist.new_group(backend="gloo", timeout=COMMAND_TIMEOUT)
    return dist.group.WORLD, commands


def _min_over_ranks(commands: Any, value: float) -> float:
    """The smallest of every rank's `value`, on every rank."""
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=commands)
    return float(t.item())


def _gather_errors(commands: Any, error: str | None, size: int) -> list[str]:
    """Every rank's load error (None where it loaded), gathered on every rank."""
    errors: list[Any] = [None] * size
    dist.all_gather_object(errors, error, group=commands)
    return [f"rank {r}: {e}" for r, e in enumerate(errors) if e is not None]


class TensorParallelWorkers:
    """Rank 0's handle on ranks 1..size-1: starts their processes, joins the process groups
    (`tp` is rank 0's place among them), then sends them commands."""

    def __init__(self, size: int, spec: RankSpec) -> None:
        if spec.device.type == "cuda":
            first = spec.device.index or 0
            if torch.cuda.device_count() < first + size:
                raise ValueError(
                    f"tensor_parallel_size {size} needs GPUs {first}..{first + size - 1}; "
                    f"{torch.cuda.device_count()} visible"
                )
        if dist.is_initialized():
            raise RuntimeError(
                "this process already runs a tensor-parallel engine: close() it first"
            )
        self.size = size
        init = f"tcp://127.0.0.1:{_free_port()}"
        context = mp.get_context("spawn")
        self.processes = [
            context.Process(
                target=_rank_main,
                args=(rank, size, init, spec),
                name=f"tokenmill-tp-rank{rank}",
                daemon=True,
            )
            for rank in range(1, size)
        ]
        for p in self.processes:
            p.start()
        group, self.commands = _join(0, size, init, spec.device_of(0))
        self.tp = TensorParallel(0, size, group)
        self._open = True
        atexit.register(self.close)
        logger.info("tensor parallel: %d ranks (%s)", size, dist.get_backend(group))

    def loaded(self, error: str | None) -> None:
        """After rank 0's load (`error`: its failure, if any): raise ModelLoadError naming
        every rank that failed (the ranks are stopped), else return."""
        errors = _gather_errors(self.commands, error, self.size)
        if errors:
            self.close(stopping=False)
            raise ModelLoadError("; ".join(errors))

    def _send(self, *command: Any) -> None:
        dist.broadcast_object_list([command], src=0, group=self.commands)

    def build_runner(self, *args: Any) -> None:
        """The ranks build their ModelRunner (KV pool, graphs) with `ModelRunner`'s arguments
        after the model and device: call it just before rank 0 builds its own."""
        self._send("runner", *args)

    def profile(self, *args: Any) -> None:
        """The ranks run `profile_budget(*args)`: call it just before rank 0 runs its own."""
        self._send("profile", *args)

    def step(self, batch: Any, size: int | None) -> None:
        """The ranks run `ModelRunner.forward(batch, size)`: rank 0 runs its own right after."""
        self._send("step", batch, size)

    def add_lora(self, lora_id: int, name: str, path: str, max_rank: int) -> None:
        """The ranks load LoRA adapter `lora_id` (`loader.lora.load_lora_adapter`) into their
        runner; ModelLoadError naming each rank that failed."""
        self._send("lora", lora_id, name, path, max_rank)
        errors = _gather_errors(self.commands, None, self.size)
        if errors:
            raise ModelLoadError("; ".join(errors))

    def remove_lora(self, lora_id: int) -> None:
        """The ranks forget LoRA adapter `lora_id`."""
        self._send("unlora", lora_id)

    def min_over_ranks(self, value: float) -> float:
        """The smallest of every rank's `value` (each rank passes its own)."""
        return _min_over_ranks(self.commands, value)

    def close(self, stopping: bool = True) -> None:
        """Stop the ranks' processes and leave the process groups (idempotent)."""
        if not self._open:
            return
        self._open = False
        atexit.unregister(self.close)
        if stopping:
            try:
                self._send("stop")
            except RuntimeError:  # a rank already died: its peers' links are closed
                pass
        for p in self.processes:
            p.join(STOP_TIMEOUT_S)
            if p.is_alive():
                p.terminate()
                p.join()
        dist.destroy_process_group()


def profile_budget(
    model: Any,
    device: torch.device,
    num_tokens: int,
    num_sampled: int,
    block_size: int,
    kv_dtype: torch.dtype,
    max_model_len: int,
    utilization: float,
) -> float:
    """This rank's KV budget on its GPU (`config.cuda_kv_budget`, `utilization` of its
    memory) after a profile forward of the largest step (`profile_forward`)."""
    peak = profile_forward(
        model, num_tokens, num_sampled, block_size, kv_dtype, device, max_model_len
    )
    torch.cuda.empty_cache()
    return cuda_kv_budget(
        str(device), peak, "a memory profile", f"peak of a {num_tokens}-token step", utilization
    )


def _rank_main(rank: int, size: int, init_method: str, spec: RankSpec) -> None:
    """A rank's process: join, load its part, then run rank 0's commands until "stop"."""
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(spec.num_threads)
    torch.manual_seed(spec.seed)
    device = spec.device_of(rank)
    group, commands = _join(rank, size, init_method, device)
    tp = TensorParallel(rank, size, group)
    error = None
    try:
        model, _ = load_model(
            spec.source,
            spec.dtype,
            spec.max_model_len,
            device,
            progress=False,
            quantization=spec.quantization,
            load_format=spec.load_format,
            seed=spec.seed,
            tp=tp,
            lora=None if spec.lora is None else LoRASlots(*spec.lora),
        )
    except Exception as e:  # reported by rank 0 (ModelLoadError, out of memory, ...)
        error = f"{type(e).__name__}: {e}"
    if _gather_errors(commands, error, size):
        dist.destroy_process_group()
        return
    runner = None
    with torch.inference_mode():
        while True:
            received: list[Any] = [None]
            dist.broadcast_object_list(received, src=0, group=commands)
            command, *args = received[0]
            if command == "step":
                runner.forward(*args)
            elif command == "runner":
                runner = ModelRunner(model, args[0], args[1], args[2], device, *args[3:])
            elif command == "lora":
                lora_id, name, path, max_rank = args
                lora_error = None
                try:
                    runner.lora.add(lora_id, load_lora_adapter(name, path, model, max_rank))
                except Exception as e:  # reported by rank 0
                    lora_error = f"{type(e).__name__}: {e}"
                _gather_errors(commands, lora_error, size)
            elif command == "unlora":
                runner.lora.remove(args[0])
            elif command == "profile":
                _min_over_ranks(commands, profile_budget(model, device, *args))
            elif command == "stop":
                break
    dist.destroy_process_group()
