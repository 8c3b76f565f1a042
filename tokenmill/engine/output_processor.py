"""OutputProcessor: what the engine returns from a step's results. It detokenizes each sample's
new tokens (stop strings included), builds the logprob entries (sampled and prompt), sums an
embedding request's pooled hidden states, and makes the RequestOutput / EmbeddingRequestOutput
objects. It changes only the request states it is given; ending a request in the scheduler is
the engine's business (`add_tokens` says when)."""

from __future__ import annotations

import torch

from tokenmill.core.outputs import PooledChunk, PromptLogprobsChunk, SampleLogprobs
from tokenmill.core.request import RequestStatus
from tokenmill.engine.request_state import RequestState, SampleState
from tokenmill.engine.tokenizer import Tokenizer
from tokenmill.outputs import (
    CompletionOutput,
    EmbeddingOutput,
    EmbeddingRequestOutput,
    Logprob,
    RequestOutput,
)


class OutputProcessor:
    """Turns the runner's per-request results into the engine's outputs (see the module)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self._token_text: dict[int, str] = {}  # token id -> its text alone (logprob entries)

    def _text_of(self, token_id: int) -> str:
        text = self._token_text.get(token_id)
        if text is None:
            text = self._token_text[token_id] = self.tokenizer.decode([token_id], False)
        return text

    def _logprob_entry(
        self, token_ids: list[int], logprobs: list[float], rank: int | None
    ) -> dict[int, Logprob]:
        """{token: Logprob} of one position: the chosen token first, then the top-k."""
        entry = {token_ids[0]: Logprob(logprobs[0], rank, self._text_of(token_ids[0]))}
        for r, (tid, val) in enumerate(zip(token_ids[1:], logprobs[1:]), start=1):
            entry.setdefault(tid, Logprob(val, r, self._text_of(tid)))
        return entry

    def add_prompt_logprobs(self, group: RequestState, chunk: PromptLogprobsChunk) -> None:
        """Append a step's prompt logprobs to the request's (which asked for them)."""
        plps = group.prompt_logprobs
        assert plps is not None
        # Entry p + 1 holds position p's logprobs. Positions already held were recomputed after
        # a preemption: they are skipped, so each prompt token is reported exactly once.
        skip = len(plps) - 1 - chunk.first_position
        if skip < 0:
            raise RuntimeError(
                f"{group.request_id}: prompt logprobs from position "
                f"{chunk.first_position}, expected {len(plps) - 1}"
            )
        for ids, lps, rank in zip(
            chunk.token_ids[skip:], chunk.logprobs[skip:], chunk.ranks[skip:]
        ):
            plps.append(self._logprob_entry(ids, lps, rank))

    @staticmethod
    def add_pooled(group: RequestState, chunk: PooledChunk) -> None:
        """Add a step's pooled hidden states to the request's sum. A chunk from position 0
        starts the sum again: the prompt is being recomputed after a preemption."""
        if group.pooled is None or chunk.first_position == 0:
            group.pooled, group.pooled_positions = chunk.total, chunk.num_positions
        else:
            group.pooled = group.pooled + chunk.total
            group.pooled_positions += chunk.num_positions

    def add_tokens(
        self, sample: SampleState, new_ids: list[int], lp: SampleLogprobs | None
    ) -> bool:
        """Detokenize a sample's new tokens (several after a multi-step round, fed one at a time:
        a stop string ends the output at the token that completes it, later ones are dropped).
        True when a stop string ends a request the scheduler still runs: the caller finishes
        it (FINISHED_STOPPED)."""
        req = sample.request
        if lp is not None and sample.logprobs is not None:
            sample.logprobs.append(self._logprob_entry(lp.token_ids, lp.logprobs, lp.sampled_rank))
            sample.cumulative_logprob += lp.logprobs[0]
        detok, dropped = sample.detok, 0
        for i, token in enumerate(new_ids):
            sample.pending_text += detok.add_tokens([token])
            if detok.stop_reason is not None:
                dropped = len(new_ids) - 1 - i
                if dropped:
                    del req.output_token_ids[-dropped:]
                    new_ids = new_ids[: i + 1]
                break
        sample.pending_ids.extend(new_ids)
        if detok.stop_reason is None or not (dropped or not req.is_finished):
            return False
        req.stop_reason = detok.stop_reason
        if req.is_finished:  # by a dropped token of the round (eos, length): the string won
            req.status = RequestStatus.FINISHED_STOPPED
            return False
        return True

    @staticmethod
    def _embedding_output(group: RequestState) -> EmbeddingRequestOutput:
        """The finished embedding request's vector: the pooled sum (a mean's divided by its
        count), unit-normalized if asked."""
        assert group.pooling is not None
        req = group.samples[0].request
        expected = req.num_prompt_tokens if req.pooling == "mean" else 1
        if group.pooled is None or group.pooled_positions != expected:
            raise RuntimeError(
                f"{group.request_id}: pooled {group.pooled_positions} positions, "
                f"expected {expected} ({req.pooling} pooling)"
            )
        vector = group.pooled / group.pooled_positions
        if group.pooling.normalize:
            vector = torch.nn.functional.normalize(vector, dim=0)
        return EmbeddingRequestOutput(
            group.request_id, group.prompt, group.prompt_token_ids, EmbeddingOutput(vector.tolist())
        )

    def make_output(self, group: RequestState) -> RequestOutput | EmbeddingRequestOutput:
        """The request's output now: each sample's text and ids so far, with the text and ids
        new since the last output as its delta (which this resets)."""
        if group.pooling is not None:
            return self._embedding_output(group)
        outs = []
        for s in group.samples:
            req = s.request
            outs.append(
                CompletionOutput(
                    index=s.index,
                    text=s.detok.text,
                    token_ids=list(req.output_token_ids),
                    cumulative_logprob=s.cumulative_logprob if s.logprobs is not None else None,
                    logprobs=list(s.logprobs) if s.logprobs is not None else None,
                    finish_reason=req.finish_reason,
                    stop_reason=req.stop_reason,
                    delta_text=s.pending_text,
                    delta_token_ids=s.pending_ids,
                )
            )
            s.pending_text, s.pending_ids = "", []
        return RequestOutput(
            group.request_id,
            group.prompt,
            group.prompt_token_ids,
            outs,
            group.finished,
            num_cached_tokens=group.samples[0].request.num_cached_tokens,
            prompt_logprobs=group.prompt_logprobs,
            error=group.error,
        )
