"""The FastAPI application: OpenAI-compatible endpoints, auth, limits, metrics, errors."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Awaitable
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from tokenmill.engine.async_engine import AsyncEngine, EngineDeadError, EngineOverloadedError
from tokenmill.engine.chat_template import template_variables
from tokenmill.errors import ChatTemplateError
from tokenmill.lora_request import LoRARequest
from tokenmill.server.chat_protocol import ChatCompletionRequest, DetokenizeRequest, TokenizeRequest
from tokenmill.server.completions_protocol import CompletionRequest
from tokenmill.server.embeddings import embedding_response
from tokenmill.server.errors import AnthropicErrors, APIError, error_response
from tokenmill.server.handlers import ContextLengthError, OpenAIServing
from tokenmill.server.messages import (
    CountTokensRequest,
    MessagesRequest,
    count_tokens_response,
    messages_response,
)
from tokenmill.server.metrics import ServerMetrics
from tokenmill.server.middleware import BodySizeLimit, Gate
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
from tokenmill.server.streams import chat_response, completion_response

logger = logging.getLogger(__name__)


async def drain(app: FastAPI, timeout: float) -> None:
    """The first SIGTERM: /health and new requests get 503, queued requests end at once (503,
    or an error event on a stream); running ones have `timeout` seconds to finish, then end
    with an error event. Returns when no request is left."""
    engine: AsyncEngine = app.state.engine
    app.state.draining = True
    stop = EngineDeadError("the server is shutting down")
    engine.fail_requests(stop, queued_only=True)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not engine.is_idle and loop.time() < deadline:
        await asyncio.sleep(0.05)
    if not engine.is_idle:
        logger.warning("drain timeout (%.0f s): ending the requests still running", timeout)
        engine.fail_requests(stop)
        while not engine.is_idle and loop.time() < deadline + 5:
            await asyncio.sleep(0.05)


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


# Paths that need the key when one is set (besides /v1/*): the API's own description and docs,
# and the metrics unless `public_metrics`.
_KEYED_PATHS = (
    "/tokenize",
    "/detokenize",
    "/docs",
    "/redoc",
    "/openapi.json",
    "/docs/oauth2-redirect",
)


def build_app(
    engine: AsyncEngine,
    model_name: str,
    api_key: str | None = None,
    max_body_bytes: int = 1 << 20,
    extra_model_names: tuple[str, ...] = (),
    limits: RequestLimits | None = None,
    public_metrics: bool = False,
    allowed_hosts: tuple[str, ...] = (),
    body_timeout: float = 30.0,
    max_header_bytes: int = 16384,
    tool_call_parser: str = "auto",
    allow_runtime_lora_updating: bool = False,
) -> FastAPI:
    """The app. `api_key`: required as a Bearer token on the API, docs and (unless
    `public_metrics`) /metrics; /health stays open. `allowed_hosts`: Host header values
    accepted (anything else: 400), against DNS rebinding; empty = any.
    `allow_runtime_lora_updating`: serve POST /v1/load_lora_adapter and /v1/unload_lora_adapter
    (vLLM's), which load a server-side path: for trusted clients only."""
    if api_key is not None and not api_key:
        raise ValueError("the API key is empty: pass a non-empty key or none")
    limits = limits or RequestLimits()
    metrics = ServerMetrics(engine, model_name)
    serving = OpenAIServing(engine, model_name, metrics, tool_call_parser)
    names = {model_name, *extra_model_names, *serving.loras}
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        if not engine.is_running:
            engine.start()
        yield
        engine.shutdown()

    app = FastAPI(title="tokenmill", lifespan=lifespan)
    app.state.engine, app.state.metrics = engine, metrics
    app.state.draining = False

    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError) -> JSONResponse:
        return error_response(e.status, e.message, e.type, e.param, e.code)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        # e.g. a body that is not valid UTF-8 / JSON, or an unknown route
        kind = "invalid_request_error" if e.status_code < 500 else "server_error"
        return error_response(e.status_code, str(e.detail), kind)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, e: RequestValidationError) -> JSONResponse:
        errors = e.errors()  # only the first is reported (a summary, never one per item)
        err = errors[0] if errors else {}
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        param = loc[0] if loc else None
        where = ".".join(loc)
        return error_response(
            400, f"{where}: {err.get('msg', 'invalid request')}".lstrip(": "), param=param
        )

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, e: Exception) -> JSONResponse:
        logger.exception("unhandled error")
        return error_response(500, f"internal error: {type(e).__name__}", "server_error")

    keyed = _KEYED_PATHS + (() if public_metrics else ("/metrics",))
    hosts = {h.lower() for h in allowed_hosts}

    app.add_middleware(Gate, state=app.state, api_key=api_key, hosts=hosts, keyed=keyed)
    app.add_middleware(
        BodySizeLimit,
        max_bytes=max_body_bytes,
        timeout=body_timeout,
        max_header_bytes=max_header_bytes,
    )
    app.add_middleware(AnthropicErrors)  # outermost: it sees every error of those paths

    def check_model(name: str | None) -> None:
        if name is not None and name not in names:
            raise APIError(
                404,
                f"The model `{name}` does not exist. Available: {', '.join(sorted(names))}",
                param="model",
                code="model_not_found",
            )

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

    async def respond(request: Request, body: Any, builder) -> Response:
        check_model(body.model)
        try:
            body.check_limits(limits)
        except UnsupportedParameter as e:
            raise APIError(400, str(e), param=e.param) from None
        result = await guarded(builder, serving, body)
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

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await respond(request, body, completion_response)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await respond(request, body, chat_response)

    responses_store = ResponseStore()

    async def create_response(serving: OpenAIServing, body: ResponsesRequest):
        return await responses_response(serving, body, responses_store, limits)

    @app.post("/v1/responses")
    async def responses(body: ResponsesRequest, request: Request) -> Response:
        """OpenAI's Responses API (server/responses.py)."""
        return await respond(request, body, create_response)

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

    async def create_message(serving: OpenAIServing, body: MessagesRequest):
        return await messages_response(serving, body, limits)

    @app.post("/v1/messages")
    async def messages(body: MessagesRequest, request: Request) -> Response:
        """Anthropic's Messages API (server/messages.py)."""
        return await respond(request, body, create_message)

    @app.post("/v1/messages/count_tokens")
    async def count_tokens(body: CountTokensRequest) -> dict:
        """The input tokens a Messages request would take (its rendered conversation)."""
        check_model(body.model)
        try:
            body.check_limits(limits)
        except UnsupportedParameter as e:
            raise APIError(400, str(e), param=e.param) from None
        return await guarded(count_tokens_response, serving, body)

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest, request: Request) -> Response:
        return await respond(request, body, embedding_response)

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
        return {"object": "list", "data": [model_card(n) for n in sorted(names)]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str) -> dict:
        """One model (OpenAI's retrieve): its card, or 404 as for a request naming it."""
        check_model(name)
        return model_card(name)

    if allow_runtime_lora_updating:
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
            return PlainTextResponse(
                f"Success: LoRA adapter '{lora.lora_name}' added successfully."
            )

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
            return PlainTextResponse(
                f"Success: LoRA adapter '{lora.lora_name}' removed successfully."
            )

    @app.get("/health")
    async def health() -> Response:
        if app.state.draining:
            return error_response(
                503, "the server is draining (shutting down)", "server_error", code="shutting_down"
            )
        if engine.is_running:
            return JSONResponse({"status": "ok"})
        return error_response(503, "engine is not running", "server_error")

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus() -> Response:
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict:
        check_model(body.model)
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
        check_model(body.model)
        bad = [t for t in body.tokens if not 0 <= t < serving.vocab_size]
        if bad:
            raise APIError(
                400, f"token ids out of range [0, {serving.vocab_size}): {bad[:5]}", param="tokens"
            )
        return {"prompt": serving.tokenizer.decode(body.tokens)}

    return app
