"""The engine's state of each request, and how a validated request becomes it.

A request of n samples is one `RequestState` holding n `SampleState`s, each of which wraps one
core `Request` (what the scheduler sees) with what only the engine needs: its detokenizer, its
logprobs so far, the text and ids not yet returned, its place in a grammar."""

from __future__ import annotations

import concurrent.futures
import time
from dataclasses import dataclass, field

import torch

from tokenmill.core.request import Request
from tokenmill.engine.detokenizer import IncrementalDetokenizer
from tokenmill.engine.structured_output import Matcher
from tokenmill.engine.tokenizer import Tokenizer
from tokenmill.outputs import Logprob, PromptLogprobList
from tokenmill.pooling_params import PoolingParams
from tokenmill.sampling_params import SamplingParams


@dataclass
class SampleState:
    """Engine-side state of one of a request's n samples (one core Request)."""

    group_id: str
    index: int
    request: Request
    detok: IncrementalDetokenizer
    logprobs: list[dict[int, Logprob]] | None
    cumulative_logprob: float = 0.0
    pending_text: str = ""
    pending_ids: list[int] = field(default_factory=list)
    matcher: Matcher | None = None  # structured output: the sample's place in its grammar
    # the token the grammar starts after (StructuredOutputsParams.after_token_id) until it is
    # sampled; None once it was (or when the grammar applies from the start)
    grammar_after: int | None = None


@dataclass
class RequestState:
    """Engine-side state of one request (as given to `add_request`): its prompt and samples."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    samples: list[SampleState]
    # [None, then one entry per scored prompt position]; filled by the first sample's request
    prompt_logprobs: PromptLogprobList | None = None
    # structured output: the grammar being compiled; the samples wait outside the scheduler
    grammar: concurrent.futures.Future | None = None
    error: str | None = None  # why the request failed (its grammar did not compile)
    final_only: bool = False  # `step` returns its output only once it has finished
    # an embedding request: its parameters, and the sum of the hidden states pooled so far
    pooling: PoolingParams | None = None
    pooled: torch.Tensor | None = None
    pooled_positions: int = 0

    @property
    def finished(self) -> bool:
        return all(s.request.is_finished for s in self.samples)


class RequestBuilder:
    """What `LLMEngine.add_request` is given -> a RequestState: tokenizes the prompt and checks
    the request against the model's limits (vocabulary, context, max_num_seqs), raising
    ValueError (with what is wrong) before anything reaches the scheduler."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        vocab_size: int,
        max_model_len: int,
        max_num_seqs: int,
        pooling_type: str,
    ) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.max_num_seqs = max_num_seqs
        self.pooling_type = pooling_type

    def encode_prompt(self, prompt: str | list[int]) -> tuple[str | None, list[int]]:
        """(text or None, token ids) of a text prompt or a list of token ids."""
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt is empty")
            return prompt, self.tokenizer.encode(prompt)
        ids = list(prompt)
        if not ids:
            raise ValueError("prompt is empty")
        vocab = self.vocab_size
        bad = [t for t in ids if not isinstance(t, int) or not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token ids out of range [0, {vocab}): {bad[:5]}")
        return None, ids

    def _check_params(self, params: SamplingParams) -> None:
        """Limits that depend on the model: caught here so a bad value never reaches a step."""
        vocab = self.vocab_size
        bad = [t for t in params.stop_token_ids if t >= vocab]
        if bad:
            raise ValueError(f"stop_token_ids out of range [0, {vocab}): {bad[:5]}")
        bad = [t for t in params.logit_bias or {} if t >= vocab]
        if bad:
            raise ValueError(f"logit_bias token ids out of range [0, {vocab}): {bad[:5]}")
        bad = [t for t in params.allowed_token_ids or [] if t >= vocab]
        if bad:
            raise ValueError(f"allowed_token_ids out of range [0, {vocab}): {bad[:5]}")
        if params.logprobs is not None and params.logprobs > vocab:
            raise ValueError(f"logprobs must be <= the vocabulary size ({vocab})")
        if params.prompt_logprobs is not None and params.prompt_logprobs > vocab:
            raise ValueError(f"prompt_logprobs must be <= the vocabulary size ({vocab})")
        so = params.structured_outputs
        if so is not None and so.after_token_id is not None and so.after_token_id >= vocab:
            raise ValueError(
                f"structured outputs: after_token_id {so.after_token_id} is out of range "
                f"[0, {vocab})"
            )
        if params.n > self.max_num_seqs:
            raise ValueError(f"n ({params.n}) exceeds max_num_seqs ({self.max_num_seqs})")

    def _bad_words_token_ids(self, words: list[str] | None) -> tuple[tuple[int, ...], ...]:
        """Each bad word as the token sequences that spell it: as written (stripped on the
        left) and after a space, which byte-level and sentencepiece vocabularies spell apart."""
        seqs: dict[tuple[int, ...], None] = {}
        for word in words or []:
            for text in (word.lstrip(), " " + word.lstrip()):
                ids = tuple(self.tokenizer.encode(text, add_special_tokens=False))
                if ids:
                    seqs[ids] = None
        return tuple(seqs)

    def generation(
        self,
        request_id: str,
        text: str | None,
        ids: list[int],
        params: SamplingParams,
        final_only: bool,
        lora_id: int | None,
    ) -> RequestState:
        """A generation request of `params.n` samples over prompt `ids`, each a core Request
        with its detokenizer; the prompt is scored (prompt_logprobs) by the first sample only.
        Raises ValueError for parameters beyond the model's limits or a prompt that leaves no
        room in the context."""
        self._check_params(params)
        max_len = self.max_model_len
        # A prompt-scoring request (max_tokens 0) may fill the whole context.
        if len(ids) > max_len or (len(ids) == max_len and params.max_tokens != 0):
            raise ValueError(
                f"prompt has {len(ids)} tokens, but the context is {max_len} tokens "
                "(it must leave room for at least one generated token)"
            )
        room = max_len - len(ids)
        max_tokens = room if params.max_tokens is None else min(params.max_tokens, room)
        eos = set() if params.ignore_eos else self.tokenizer.eos_token_ids
        children = (
            [params] if params.n == 1 else [params.clone_for_child(i) for i in range(params.n)]
        )
        for child in children[1:]:
            child.prompt_logprobs = None  # the prompt is scored once, by the first sample
        bad_words = self._bad_words_token_ids(params.bad_words)
        samples = []
        for i, p in enumerate(children):
            req = Request(
                f"{request_id}#{i}",
                ids,
                p,
                eos,
                max_tokens,
                time.monotonic(),
                bad_words,
                lora_id=lora_id,
            )
            detok = IncrementalDetokenizer(
                self.tokenizer,
                ids,
                p.skip_special_tokens,
                p.stop,
                p.include_stop_str_in_output,
                deferred=final_only and not p.stop,
            )
            samples.append(
                SampleState(request_id, i, req, detok, [] if p.logprobs is not None else None)
            )
        return RequestState(
            request_id,
            text,
            ids,
            samples,
            [None] if params.prompt_logprobs is not None else None,
            final_only=final_only,
        )

    def pooling(
        self,
        request_id: str,
        text: str | None,
        ids: list[int],
        params: PoolingParams,
        lora_id: int | None,
    ) -> RequestState:
        """An embedding request: one sequence that computes its prompt (which may fill the
        whole context) and generates nothing (max_tokens 0); the runner pools its hidden
        states by the model's pooling type."""
        if len(ids) > self.max_model_len:
            raise ValueError(
                f"prompt has {len(ids)} tokens, but the context is {self.max_model_len} tokens"
            )
        req = Request(
            f"{request_id}#0",
            ids,
            SamplingParams(),
            (),
            0,
            time.monotonic(),
            pooling=self.pooling_type,
            lora_id=lora_id,
        )
        detok = IncrementalDetokenizer(self.tokenizer, ids, deferred=True)
        return RequestState(
            request_id, text, ids, [SampleState(request_id, 0, req, detok, None)], pooling=params
        )
