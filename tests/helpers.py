"""Test helpers: run a loaded model through the real paged-attention path, chunk by chunk."""

from __future__ import annotations

import torch

from tokenmill.core.outputs import ScheduledRequest, SchedulerOutput
from tokenmill.core.request import Request
from tokenmill.sampling_params import SamplingParams
from tokenmill.worker.batch import plan_batch
from tokenmill.worker.model_runner import ModelRunner


def paged_logits(
    runner: ModelRunner, prompts: list[list[int]], chunk_sizes: list[list[int]]
) -> list[torch.Tensor]:
    """Feed each prompt in the given chunks (all prompts advance together, one step per chunk
    index); returns per prompt the logits at every position, [len(prompt), vocab]."""
    bs = runner.block_size
    reqs, out = [], []
    next_block = 0
    for i, p in enumerate(prompts):
        r = Request(f"r{i}", p, SamplingParams(max_tokens=1), set(), 1)
        nblocks = -(-len(p) // bs)
        r.extra["blocks"] = tuple(range(next_block, next_block + nblocks))
        next_block += nblocks
        reqs.append(r)
        out.append([])
    num_steps = max(len(c) for c in chunk_sizes)
    for step in range(num_steps):
        scheduled = []
        for r, chunks in zip(reqs, chunk_sizes):
            if step < len(chunks):
                scheduled.append(
                    ScheduledRequest(r, r.num_computed_tokens, chunks[step], r.extra["blocks"])
                )
        sched = SchedulerOutput(tuple(scheduled), sum(s.num_scheduled_tokens for s in scheduled))
        with torch.inference_mode():  # the runner's eager forward (on every rank under TP)
            inputs, hidden = runner.forward(plan_batch(sched, bs), None)
            logits = runner.model.compute_logits(hidden)
        start = 0
        for i in inputs.order:  # the runner lays decodes out first
            s = scheduled[i]
            n = s.num_scheduled_tokens
            out[int(s.request_id[1:])].append(logits[start : start + n])
            s.request.num_computed_tokens += n
            start += n
    return [torch.cat(chunks) for chunks in out]


def prompt_logits(
    model: torch.nn.Module,
    prompts: list[list[int]],
    num_blocks: int = 64,
    kv_dtype: torch.dtype = torch.float32,
) -> list[torch.Tensor]:
    """Each prompt prefilled whole by a CPU runner of `model` (blocks of 16, the KV cache in
    `kv_dtype`): `paged_logits` per prompt, [len(prompt), vocab]."""
    runner = ModelRunner(
        model,
        num_blocks=num_blocks,
        block_size=16,
        kv_dtype=kv_dtype,
        device=torch.device("cpu"),
    )
    return paged_logits(runner, prompts, [[len(p)] for p in prompts])
