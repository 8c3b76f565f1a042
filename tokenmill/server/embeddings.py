"""/v1/embeddings: inputs -> embedding requests on the engine -> OpenAI's list of vectors."""

from __future__ import annotations

import asyncio
import base64
import struct
from collections.abc import Coroutine
from typing import Any

from tokenmill.pooling_params import PoolingParams
from tokenmill.server.handlers import OpenAIServing, PreparedPrompt
from tokenmill.server.protocol import EmbeddingRequest, UnsupportedParameter


def encode_embedding(vector: list[float], encoding_format: str) -> list[float] | str:
    """A vector as OpenAI sends it: a list of floats, or "base64" of its little-endian float32
    bytes (what the openai client asks for by default, and decodes with numpy)."""
    if encoding_format == "float":
        return vector
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")


async def embedding_response(
    serving: OpenAIServing, body: EmbeddingRequest
) -> Coroutine[Any, Any, dict]:
    """Validate and queue one embedding request per input (raising before anything runs),
    then return the coroutine that collects them into the response body. Closing it early
    (a client that went away) aborts the ones still running."""
    body.check_supported(serving.hidden_size)

    def prepare() -> list[PreparedPrompt]:
        prepared = []
        for i, p in enumerate(body.inputs()):
            try:
                prepared.append(
                    serving.prepare(p, body.add_special_tokens, body.truncate_prompt_tokens)
                )
            except ValueError as e:
                raise UnsupportedParameter("input", f"input {i}: {e}") from None
        return prepared

    prompts = await asyncio.to_thread(prepare)  # tokenizing never blocks the event loop
    for p in prompts:
        if len(p.token_ids) > serving.max_model_len:
            raise UnsupportedParameter(
                "input",
                f"This model's maximum context length is {serving.max_model_len} tokens. "
                f"However, you requested {len(p.token_ids)} tokens in the input for embedding "
                "generation. Please reduce the length of the input (or set "
                "truncate_prompt_tokens).",
            )
    _, streams, tracker = await serving.start(
        prompts, PoolingParams(body.normalize), "embd", body.model
    )

    async def collect() -> dict:
        status, data = "abort", []
        try:
            for i, stream in enumerate(streams):
                async for out in stream.outputs():  # one output, when it has finished
                    vector = out.outputs.embedding
                data.append(
                    {
                        "object": "embedding",
                        "index": i,
                        "embedding": encode_embedding(vector, body.encoding_format),
                    }
                )
            status = "ok"
        except Exception:
            status = "error"
            raise
        finally:
            for stream in streams:
                stream.close()
            serving.record_finish(tracker, status)
        n = tracker.prompt_tokens
        return {
            "object": "list",
            "data": data,
            "model": body.model or serving.model_name,
            "usage": {"prompt_tokens": n, "total_tokens": n},
        }

    return collect()
