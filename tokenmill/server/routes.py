"""The API's routes, registered by group on the app that server/app.py builds: OpenAI's
completions and chat, the Responses API, Anthropic's Messages API, embeddings and the model
list, the runtime LoRA adapters, and /tokenize and /detokenize. What they share is `Endpoints`
(the served model names, the request limits, the respond path) and `guarded` (engine and
validation exceptions as OpenAI errors)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import Awaitable
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Query, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from tokenmill.engine.async_engine import AsyncEngine, EngineDeadError, EngineOverloadedError
from tokenmill.engine.chat_template import template_variables
from tokenmill.errors import ChatTemplateError
from tokenmill.lora_request import LoRARequest
from tokenmill.server.chat import chat_response
from tokenmill.server.chat_protocol import ChatCompletionRequest, DetokenizeRequest, TokenizeRequest
from tokenmill.server.completions_protocol import CompletionRequest
from tokenmill.server.embeddings import embedding_response
from tokenmill.server.errors import APIError
from tokenmill.server.handlers import ContextLengthError, OpenAIServing
from tokenmill.server.messages import count_tokens_response, messages_response
from tokenmill.server.messages_protocol import CountTokensRequest, MessagesRequest
from tokenmill.server.protocol import (
    EmbeddingRequest,
    LoadLoRAAdapterRequest,
    RequestLimits,
    UnloadLoRAAdapterRequest,
    UnsupportedParameter,
)
from tokenmill.server.responses import responses_response
from tokenmill.server.responses_protocol import ResponsesRequest
from tokenmill.server.responses_store import ResponseStore
from tokenmill.server.streams import completion_response


async def run_or_disconnect(request: Request, work: Awaitable[Any]) -> tuple[bool, Any]:
    """Await `work` unless the client disconnects first (then cancel it). -> (done, result)."""
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        while True:
            if (await request.receive())["type"] == "http.disconnect":
                return

    watcher = asyncio.ensure_future(watch())
    done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        watcher.cancel()
        return True, task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task
    return False, None


async def guarded(fn, *args):
    """Map engine/validation exceptions to OpenAI errors."""
    try:
        return await fn(*args)
    except UnsupportedParameter as e:
        raise APIError(400, str(e), param=e.param) from None
    except ContextLengthError as e:
        raise APIError(400, str(e), param=e.param, code="context_length_exceeded") from None
    except ChatTemplateError as e:
        raise APIError(400, str(e), param="messages") from None
    except EngineOverloadedError as e:
        raise APIError(503, str(e), "server_overloaded", code="overloaded") from None
    except EngineDeadError as e:
        raise APIError(503, str(e), "server_error") from None
    except ValueError as e:
        raise APIError(400, str(e)) from None


class Endpoints:
    """What the route groups share: the serving layer, the request limits and the served model
    names (`names`, which the LoRA routes change), with the model check and the respond path of
    the generating endpoints (a JSON body, or an SSE stream; a client that disconnects first
    gets 499)."""

    def __init__(self, serving: OpenAIServing, limits: RequestLimits, names: set[str]) -> None:
        self.serving, self.limits, self.names = serving, limits, names

    def check_model(self, name: str | None) -> None:
        if name is not None and name not in self.names:
            raise APIError(
                404,
                f"The model `{name}` does not exist. Available: {', '.join(sorted(self.names))}",
                param="model",
                code="model_not_found",
            )

    def check_request(self, body: Any) -> None:
        """The body's model and size limits (400 or 404 before anything runs)."""
        self.check_model(body.model)
        try:
            body.check_limits(self.limits)
        except UnsupportedParameter as e:
            raise APIError(400, str(e), param=e.param) from None

    async def respond(self, request: Request, body: Any, builder) -> Response:
        self.check_request(body)
        result = await guarded(builder, self.serving, body)
        if body.stream:
            return StreamingResponse(
                result, media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
            )
        try:
            done, payload = await run_or_disconnect(request, result)
        except EngineDeadError as e:  # e.g. still queued when the server began to drain
            raise APIError(503, str(e), "server_error", code="shutting_down") from None
        if not done:
            return Response(status_code=499)
        return JSONResponse(payload)


def add_openai_routes(app: FastAPI, api: Endpoints) -> None:
    """POST /v1/completions and /v1/chat/completions."""

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await api.respond(request, body, completion_response)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await api.respond(request, body, chat_response)


def add_responses_routes(app: FastAPI, api: Endpoints) -> None:
    """OpenAI's Responses API: POST /v1/responses, and GET / DELETE of the stored responses."""
    responses_store = ResponseStore()

    async def create_response(serving: OpenAIServing, body: ResponsesRequest):
        return await responses_response(serving, body, responses_store, api.limits)

    @app.post("/v1/responses")
    async def responses(body: ResponsesRequest, request: Request) -> Response:
        """OpenAI's Responses API (server/responses.py)."""
        return await api.respond(request, body, create_response)

    def stored_response(response_id: str):
        stored = responses_store.get(response_id)
        if stored is None:
            raise APIError(
                404,
                f"Response with id '{response_id}' not found.",
                param="response_id",
                code="not_found",
            )
        return stored

    @app.get("/v1/responses/{response_id}")
    async def get_response(response_id: str) -> dict:
        """A stored response (one created with store: true, among the newest kept)."""
        return stored_response(response_id).response

    @app.get("/v1/responses/{response_id}/input_items")
    async def response_input_items(
        response_id: str,
        limit: Annotated[int, Query(ge=1, le=100)] = 20,
        order: Literal["asc", "desc"] = "desc",
        after: str | None = None,
    ) -> dict:
        """A stored response's input items (OpenAI's list, newest first by default; `include`
        adds nothing: no item here has more to show)."""
        try:
            return stored_response(response_id).list_items(limit, order, after)
        except UnsupportedParameter as e:
            raise APIError(400, str(e), param=e.param) from None

    @app.delete("/v1/responses/{response_id}")
    async def delete_response(response_id: str) -> dict:
        stored_response(response_id)
        responses_store.delete(response_id)
        return {"id": response_id, "object": "response", "deleted": True}


def add_messages_routes(app: FastAPI, api: Endpoints) -> None:
    """Anthropic's Messages API: POST /v1/messages and /v1/messages/count_tokens."""

    async def create_message(serving: OpenAIServing, body: MessagesRequest):
        return await messages_response(serving, body, api.limits)

    @app.post("/v1/messages")
    async def messages(body: MessagesRequest, request: Request) -> Response:
        """Anthropic's Messages API (server/messages.py)."""
        return await api.respond(request, body, create_message)

    @app.post("/v1/messages/count_tokens")
    async def count_tokens(body: CountTokensRequest) -> dict:
        """The input tokens a Messages request would take (its rendered conversation)."""
        api.check_request(body)
        return await guarded(count_tokens_response, api.serving, body)


def add_embedding_and_model_routes(app: FastAPI, api: Endpoints) -> None:
    """POST /v1/embeddings, and the served models: GET /v1/models and /v1/models/{name}."""
    serving = api.serving
    created = int(time.time())

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest, request: Request) -> Response:
        return await api.respond(request, body, embedding_response)

    def model_card(name: str) -> dict:
        return {
            "id": name,
            "object": "model",
            "created": created,
            "owned_by": "tokenmill",
            "max_model_len": serving.max_model_len,
        }

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [model_card(n) for n in sorted(api.names)]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str) -> dict:
        """One model (OpenAI's retrieve): its card, or 404 as for a request naming it."""
        api.check_model(name)
        return model_card(name)


def add_lora_routes(app: FastAPI, api: Endpoints, engine: AsyncEngine) -> None:
    """vLLM's runtime LoRA updates: POST /v1/load_lora_adapter and /v1/unload_lora_adapter."""
    serving, names = api.serving, api.names
    lora_lock = asyncio.Lock()  # one change at a time: names and ids stay unique
    taken = [r.lora_int_id for r in serving.loras.values()]
    next_lora_id = itertools.count(max(taken, default=0) + 1)

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(body: LoadLoRAAdapterRequest) -> Response:
        """Load a PEFT adapter folder on the server and serve it as model `lora_name`."""
        async with lora_lock:
            if body.lora_name in names:
                raise APIError(
                    400, f"The model `{body.lora_name}` already exists", param="lora_name"
                )
            lora = LoRARequest(body.lora_name, next(next_lora_id), body.lora_path)
            await guarded(engine.call, engine.engine.add_lora, lora)
            serving.loras[lora.lora_name] = lora
            names.add(lora.lora_name)
        return PlainTextResponse(f"Success: LoRA adapter '{lora.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(body: UnloadLoRAAdapterRequest) -> Response:
        """Stop serving adapter `lora_name` (400 while requests use it)."""
        async with lora_lock:
            lora = serving.loras.get(body.lora_name)
            if lora is None:
                raise APIError(
                    404,
                    f"The LoRA adapter `{body.lora_name}` does not exist",
                    param="lora_name",
                    code="model_not_found",
                )
            await guarded(engine.call, engine.engine.remove_lora, lora.lora_int_id)
            del serving.loras[lora.lora_name]
            names.discard(lora.lora_name)
        return PlainTextResponse(f"Success: LoRA adapter '{lora.lora_name}' removed successfully.")


def add_tokenizer_routes(app: FastAPI, api: Endpoints) -> None:
    """POST /tokenize (a prompt, or chat messages rendered by the template) and /detokenize."""
    serving, limits = api.serving, api.limits

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict:
        api.check_model(body.model)
        tok = serving.tokenizer
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "pass exactly one of prompt or messages", param="prompt")
        if body.messages is not None:
            if len(body.messages) > limits.max_messages:
                raise APIError(400, f"at most {limits.max_messages} messages", param="messages")
            try:
                text = tok.apply_chat_template(
                    [m.as_template_message() for m in body.messages],
                    add_generation_prompt=body.add_generation_prompt,
                    continue_final_message=body.continue_final_message,
                    **template_variables(body.chat_template_kwargs),
                )
            except ChatTemplateError as e:
                raise APIError(400, str(e), param="messages") from None
            ids = tok.encode(text, add_special_tokens=False)
        else:
            ids = tok.encode(body.prompt, add_special_tokens=body.add_special_tokens)
        return {"tokens": ids, "count": len(ids), "max_model_len": serving.max_model_len}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict:
        api.check_model(body.model)
        bad = [t for t in body.tokens if not 0 <= t < serving.vocab_size]
        if bad:
            raise APIError(
                400, f"token ids out of range [0, {serving.vocab_size}): {bad[:5]}", param="tokens"
            )
        return {"prompt": serving.tokenizer.decode(body.tokens)}
