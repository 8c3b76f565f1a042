"""The FastAPI application: OpenAI-compatible endpoints, auth, limits, metrics, errors."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import secrets
import time
from collections.abc import Awaitable
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException

from tokenmill.engine.async_engine import AsyncEngine, EngineDeadError, EngineOverloadedError
from tokenmill.engine.chat_template import template_variables
from tokenmill.errors import ChatTemplateError
from tokenmill.lora_request import LoRARequest
from tokenmill.server.embeddings import embedding_response
from tokenmill.server.handlers import ContextLengthError, OpenAIServing
from tokenmill.server.messages import (
    CountTokensRequest,
    MessagesRequest,
    count_tokens_response,
    messages_response,
)
from tokenmill.server.metrics import ServerMetrics
from tokenmill.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    EmbeddingRequest,
    LoadLoRAAdapterRequest,
    RequestLimits,
    TokenizeRequest,
    UnloadLoRAAdapterRequest,
    UnsupportedParameter,
)
from tokenmill.server.responses import ResponsesRequest, ResponseStore, responses_response
from tokenmill.server.streams import chat_response, completion_response

logger = logging.getLogger(__name__)


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status,
            message,
            type_,
            param,
            code,
        )


def _printable(text: str) -> str:
    """Text safe to put in a JSON response (unpaired surrogates escaped)."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def error_response(
    status: int,
    message: str,
    type_: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
) -> JSONResponse:
    return JSONResponse(
        status_code=status,
        content={
            "error": {
                "message": _printable(message),
                "type": type_,
                "param": None if param is None else _printable(param),
                "code": code,
            }
        },
    )


class BodySizeLimit:
    """ASGI middleware: 413 for request bodies over `max_bytes`, declared (Content-Length) or
    streamed (chunked); 408 when the whole body takes longer than `timeout` seconds to arrive
    (a slow-body client holds no worker for long). The body is read here, up to the limit,
    before the app sees it, so the app never meets a half-read body."""

    def __init__(
        self, app: Any, max_bytes: int, timeout: float = 30.0, max_header_bytes: int = 16384
    ) -> None:
        self.app, self.max_bytes, self.timeout = app, max_bytes, timeout
        self.max_header_bytes = max_header_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        # (the transport bounds a head that arrives in pieces; a whole one is checked here)
        if sum(len(k) + len(v) for k, v in scope.get("headers") or []) > self.max_header_bytes:
            big = error_response(
                431,
                f"request headers exceed {self.max_header_bytes} bytes",
                code="headers_too_large",
            )
            return await big(scope, receive, send)
        if scope.get("method") in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        too_big = error_response(
            413, f"request body exceeds {self.max_bytes} bytes", code="request_too_large"
        )
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await too_big(scope, receive, send)
        chunks, seen = [], 0
        deadline = asyncio.get_running_loop().time() + self.timeout
        while True:
            try:
                msg = await asyncio.wait_for(
                    receive(), deadline - asyncio.get_running_loop().time()
                )
            except asyncio.TimeoutError:
                slow = error_response(
                    408,
                    f"the request body did not arrive within {self.timeout:.0f} s",
                    code="request_timeout",
                )
                return await slow(scope, receive, send)
            if msg["type"] != "http.request":  # the client went away
                return
            seen += len(msg.get("body", b""))
            if seen > self.max_bytes:
                return await too_big(scope, receive, send)
            chunks.append(msg.get("body", b""))
            if not msg.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # later: the disconnect watcher's wait

        await self.app(scope, replay, send)


class Gate:
    """ASGI middleware in front of every route: 503 while draining (but /health), 400 for a Host
    header not in `hosts` (when not empty), 401 without the API key on the /v1/ API and the
    `keyed` paths (when a key is set).

    A plain ASGI callable, not Starlette's BaseHTTPMiddleware (`@app.middleware`), which passes
    every chunk of a streamed response through a memory stream and another task: event-loop work
    per token and stream, taken from the engine's cores (on 2 cores, a stream beside two n=2
    streams: 11.3 ms a token with this gate, 13.5 ms with the old one, medians of 6 rounds)."""

    def __init__(
        self,
        app: Any,
        state: Any,
        api_key: str | None,
        hosts: set[str],
        keyed: tuple[str, ...],
    ) -> None:
        self.app, self.state, self.api_key = app, state, api_key
        self.hosts, self.keyed = hosts, keyed

    def refusal(self, scope: dict) -> JSONResponse | None:
        path = scope["path"]
        if self.state.draining and path != "/health":
            return error_response(
                503, "the server is shutting down", "server_error", code="shutting_down"
            )
        headers = Headers(scope=scope)
        if self.hosts:
            host = headers.get("host", "").lower()
            name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
            if host not in self.hosts and name not in self.hosts:
                return error_response(400, "Host header not allowed", code="invalid_host")
        if self.api_key and (path.startswith("/v1/") or path in self.keyed):
            given = headers.get("authorization", "")
            # Anthropic's clients send the key as x-api-key
            token = (
                given[7:] if given.lower().startswith("bearer ") else headers.get("x-api-key", "")
            )
            if not secrets.compare_digest(token.encode(), self.api_key.encode()):
                return error_response(
                    401,
                    "Incorrect or missing API key. Pass it as 'Authorization: Bearer <key>' "
                    "(or 'x-api-key: <key>').",
                    code="invalid_api_key",
                )
        return None

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        refusal = self.refusal(scope) if scope["type"] == "http" else None
        if refusal is not None:
            return await refusal(scope, receive, send)
        await self.app(scope, receive, send)


# Anthropic's error type for each status (its API's shapes, for /v1/messages)
_ANTHROPIC_ERRORS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
}


class AnthropicErrors:
    """ASGI middleware: error responses on Anthropic's paths (/v1/messages...) in Anthropic's
    shape, {"type": "error", "error": {"type", "message"}}, whichever layer produced them (the
    gate, the body limit, validation, the engine). Successful responses, streams included, pass
    through untouched."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/messages"):
            return await self.app(scope, receive, send)
        start: dict | None = None
        chunks: list[bytes] = []

        async def rewrite(message: dict) -> None:
            nonlocal start
            if message["type"] == "http.response.start" and message["status"] >= 400:
                start = message  # held until the body is complete
                return
            if start is None:
                return await send(message)
            chunks.append(message.get("body", b""))
            if message.get("more_body", False):
                return
            status = start["status"]
            try:
                error = json.loads(b"".join(chunks))["error"]
                text = error["message"]
            except (ValueError, KeyError, TypeError):
                text = b"".join(chunks).decode("utf-8", "replace")
            kind = _ANTHROPIC_ERRORS.get(
                status, "api_error" if status >= 500 else "invalid_request_error"
            )
            body = json.dumps({"type": "error", "error": {"type": kind, "message": text}}).encode()
            headers = [(k, v) for k, v in start["headers"] if k.lower() != b"content-length"]
            headers.append((b"content-length", str(len(body)).encode()))
            await send({**start, "headers": headers})
            await send({"type": "http.response.body", "body": body})

        await self.app(scope, receive, rewrite)


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
