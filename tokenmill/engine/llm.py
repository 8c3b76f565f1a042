"""LLM: the offline Python API (`LLM(model).generate(prompts, params)`)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from tqdm.auto import tqdm

from tokenmill.config import EngineArgs
from tokenmill.engine.chat_template import template_variables
from tokenmill.engine.llm_engine import LLMEngine
from tokenmill.engine.tokenizer import Tokenizer
from tokenmill.lora_request import LoRARequest
from tokenmill.outputs import EmbeddingRequestOutput, RequestOutput
from tokenmill.pooling_params import PoolingParams
from tokenmill.sampling_params import SamplingParams

# A text, its token ids, or vLLM's dict forms: {"prompt": text} / {"prompt_token_ids": ids}
Prompt = str | list[int] | dict[str, Any]
Messages = list[dict[str, Any]]


def _is_token_ids(x: Any) -> bool:
    return isinstance(x, list) and bool(x) and all(isinstance(t, int) for t in x)


def _unwrap(prompt: Any) -> str | list[int]:
    """A prompt as a text or token ids; vLLM's TextPrompt / TokensPrompt dicts are unwrapped,
    any other dict is an error that says what it holds."""
    if not isinstance(prompt, dict):
        return prompt
    if set(prompt) == {"prompt"}:
        return prompt["prompt"]
    if set(prompt) == {"prompt_token_ids"}:
        return prompt["prompt_token_ids"]
    raise ValueError(
        "a dict prompt needs exactly one key, 'prompt' (a text) or 'prompt_token_ids' (token "
        f"ids); got {sorted(prompt)}"
    )


class LLM:
    """Load a model once, then generate for batches of prompts with continuous batching.

    `model` is a GGUF file, a Hugging Face folder or Hub id, or None for the embedded default.
    Other keyword arguments are EngineArgs fields (dtype, max_model_len, kv_cache_memory_gib,
    max_num_seqs, max_num_batched_tokens, ...); unknown ones are an error.
    """

    def __init__(self, model: str | None = None, **kwargs: Any) -> None:
        self.engine = LLMEngine(EngineArgs.from_kwargs(model=model, **kwargs))

    def get_tokenizer(self) -> Tokenizer:
        return self.engine.tokenizer

    def close(self) -> None:
        """Stop the tensor-parallel ranks' processes, if any (they also stop at exit); the
        object is unusable afterwards."""
        self.engine.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def get_default_sampling_params(self) -> SamplingParams:
        """The sampling settings of a call without any: the model's recommended ones
        (`--generation-config`, vLLM's), else SamplingParams' defaults."""
        return SamplingParams(**self.engine.default_sampling)

    def _normalize(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | Sequence[SamplingParams] | None,
    ) -> tuple[list[Prompt], list[SamplingParams]]:
        if isinstance(prompts, (str, dict)) or _is_token_ids(prompts):
            prompts = [prompts]
        prompts = [_unwrap(p) for p in prompts]
        if params is None:
            params = self.get_default_sampling_params()
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        params = list(params)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(params)} sampling params")
        return prompts, params

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = False,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
    ) -> list[RequestOutput]:
        """Generate for every prompt; results in input order. Bad input raises ValueError and
        nothing is left queued. `lora_request`: the LoRA adapter of every prompt, or one per
        prompt (None: the base model)."""
        prompts, params = self._normalize(prompts, sampling_params)
        return self._run([(p, None) for p in prompts], params, use_tqdm, lora_request)

    def embed(
        self,
        prompts: Prompt | Sequence[Prompt],
        pooling_params: PoolingParams | None = None,
        use_tqdm: bool = False,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
    ) -> list[EmbeddingRequestOutput]:
        """One embedding per prompt (`outputs.embedding`), in input order: the prompt's final
        hidden states pooled by the model's pooling type (the `pooling_type` option, else the
        checkpoint's, else the last token's), unit-normalized unless `pooling_params` says
        otherwise."""
        if isinstance(prompts, (str, dict)) or _is_token_ids(prompts):
            prompts = [prompts]
        params = pooling_params or PoolingParams()
        return self._run(
            [(_unwrap(p), None) for p in prompts], [params] * len(prompts), use_tqdm, lora_request
        )

    def chat(
        self,
        messages: Messages | Sequence[Messages],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        add_generation_prompt: bool = True,
        use_tqdm: bool = False,
        continue_final_message: bool = False,
        chat_template_kwargs: dict[str, Any] | None = None,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
    ) -> list[RequestOutput]:
        """Apply the model's chat template to each conversation, then generate.
        `continue_final_message=True` (with `add_generation_prompt=False`) continues the last
        message instead of starting a reply; `chat_template_kwargs` are the template's own
        variables (e.g. `enable_thinking`)."""
        convs = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prepared = [
            self.encode_chat(c, add_generation_prompt, continue_final_message, chat_template_kwargs)
            for c in convs
        ]
        _, params = self._normalize([p[0] for p in prepared], sampling_params)
        return self._run(prepared, params, use_tqdm, lora_request)

    def encode_chat(
        self,
        messages: Messages,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        chat_template_kwargs: dict[str, Any] | None = None,
    ) -> tuple[str, list[int]]:
        """A conversation's prompt text and token ids (see `chat`)."""
        tok = self.engine.tokenizer
        text = tok.apply_chat_template(
            messages,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            **template_variables(chat_template_kwargs),
        )
        return text, tok.encode(text, add_special_tokens=False)

    def _compile_constraints(self, params: Sequence[SamplingParams | PoolingParams]) -> None:
        """Compile the structured-output constraints first, so one that does not compile is
        a ValueError before anything is queued (the engine then finds them cached)."""
        for p in params:
            if isinstance(p, SamplingParams) and p.structured_outputs is not None:
                self.engine.structured_outputs.compile(p.structured_outputs)

    def _run(
        self,
        prompts: list[tuple[Prompt, list[int] | None]],
        params: Sequence[SamplingParams | PoolingParams],
        use_tqdm: bool,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
    ) -> list[Any]:
        engine = self.engine
        self._compile_constraints(params)
        if lora_request is None or isinstance(lora_request, LoRARequest):
            loras = [lora_request] * len(prompts)
        else:
            loras = list(lora_request)
            if len(loras) != len(prompts):
                raise ValueError(f"{len(loras)} lora_request entries for {len(prompts)} prompts")
        ids: list[str] = []
        try:
            for (prompt, token_ids), p, lora in zip(prompts, params, loras):
                ids.append(
                    engine.add_request(
                        None,
                        prompt,
                        p,
                        prompt_token_ids=token_ids,
                        final_only=True,
                        lora_request=lora,
                    )
                )
        except Exception:
            engine.abort_request(ids)
            raise
        results: dict[str, RequestOutput | EmbeddingRequestOutput] = {}
        wanted = set(ids)
        bar = tqdm(total=len(ids), desc="Generating", disable=not use_tqdm)
        try:
            while len(results) < len(ids) and engine.has_unfinished_requests():
                for out in engine.step():
                    if out.finished and out.request_id in wanted:
                        results[out.request_id] = out
                        bar.update(1)
        finally:
            bar.close()
            engine.abort_request([i for i in ids if i not in results])
        return [results[i] for i in ids]

    def stream(
        self,
        prompt: Prompt,
        sampling_params: SamplingParams | None = None,
        prompt_token_ids: list[int] | None = None,
    ) -> Iterator[RequestOutput]:
        """Yield this request's outputs as they are produced (delta_text / delta_token_ids hold
        what is new). Other queued requests advance too. Closing the iterator aborts it."""
        engine = self.engine
        self._compile_constraints([sampling_params] if sampling_params else [])
        rid = engine.add_request(None, _unwrap(prompt), sampling_params, prompt_token_ids)
        finished = False
        try:
            while not finished:
                for out in engine.step():
                    if out.request_id == rid:
                        finished = out.finished
                        yield out
        finally:
            if not finished:
                engine.abort_request(rid)
