"""The FastAPI application: OpenAI-compatible endpoints, auth, limits, metrics, errors.

The routes themselves are registered by group from server/routes.py."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from tokenmill.engine.async_engine import AsyncEngine, EngineDeadError
from tokenmill.server.errors import AnthropicErrors, APIError, error_response
from tokenmill.server.handlers import OpenAIServing
from tokenmill.server.metrics import ServerMetrics
from tokenmill.server.middleware import BodySizeLimit, Gate
from tokenmill.server.protocol import RequestLimits
from tokenmill.server.routes import (
    Endpoints,
    add_embedding_and_model_routes,
    add_lora_routes,
    add_messages_routes,
    add_openai_routes,
    add_responses_routes,
    add_tokenizer_routes,
)

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


# The origins of pages served from this machine: the cross-origin callers allowed by default
# (anchored at the end too: older Starlettes `match` it rather than `fullmatch`).
LOCAL_ORIGINS = r"https?://(localhost|127\.0\.0\.1|\[::1\])(:[0-9]+)?\Z"


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
    reasoning_parser: str | None = None,
    allowed_origins: tuple[str, ...] = (),
    allow_credentials: bool = False,
) -> FastAPI:
    """The app. `api_key`: required as a Bearer token on the API, docs and (unless
    `public_metrics`) /metrics; /health stays open. `allowed_hosts`: Host header values
    accepted (anything else: 400), against DNS rebinding; empty = any.
    `allow_runtime_lora_updating`: serve POST /v1/load_lora_adapter and /v1/unload_lora_adapter
    (vLLM's), which load a server-side path: for trusted clients only. `reasoning_parser`: a
    `tokenmill.engine.reasoning` parser name, to give chat replies' reasoning apart.
    `allowed_origins`: the web pages (origins) whose scripts may call the API across origins
    (CORS; "*": any); empty = pages served from this machine (localhost, 127.0.0.1, [::1],
    any port), as Ollama allows by default, so that a website cannot drive a local server."""
    if api_key is not None and not api_key:
        raise ValueError("the API key is empty: pass a non-empty key or none")
    limits = limits or RequestLimits()
    metrics = ServerMetrics(engine, model_name)
    serving = OpenAIServing(engine, model_name, metrics, tool_call_parser, reasoning_parser)
    names = {model_name, *extra_model_names, *serving.loras}

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        if not engine.is_running:
            engine.start()
        yield
        engine.shutdown()

    app = FastAPI(title="tokenmill", lifespan=lifespan)
    app.state.engine, app.state.metrics = engine, metrics
    app.state.draining = False
    add_error_handlers(app)

    keyed = _KEYED_PATHS + (() if public_metrics else ("/metrics",))
    hosts = {h.lower() for h in allowed_hosts}

    app.add_middleware(Gate, state=app.state, api_key=api_key, hosts=hosts, keyed=keyed)
    app.add_middleware(
        BodySizeLimit,
        max_bytes=max_body_bytes,
        timeout=body_timeout,
        max_header_bytes=max_header_bytes,
    )
    app.add_middleware(AnthropicErrors)  # it sees every error of those paths
    app.add_middleware(  # outermost: preflights are answered before the key is asked for
        CORSMiddleware,
        allow_origins=list(allowed_origins),
        allow_origin_regex=None if allowed_origins else LOCAL_ORIGINS,
        allow_methods=["*"],
        allow_headers=["*"],
        allow_credentials=allow_credentials,
    )

    api = Endpoints(serving, limits, names)
    add_openai_routes(app, api)
    add_responses_routes(app, api)
    add_messages_routes(app, api)
    add_embedding_and_model_routes(app, api)
    if allow_runtime_lora_updating:
        add_lora_routes(app, api, engine)
    add_health_routes(app, engine, metrics)
    add_tokenizer_routes(app, api)
    return app


def add_error_handlers(app: FastAPI) -> None:
    """Every error as OpenAI's error body: APIError, Starlette's HTTP errors, a body that fails
    validation (400, its first error only), and anything unexpected (500, logged)."""

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
        if err.get("type") == "json_invalid":  # its loc is the character, not a field
            detail = (err.get("ctx") or {}).get("error", "")
            return error_response(400, f"the body is not valid JSON: {detail}".rstrip(": "))
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        param = loc[0] if loc else None
        where = ".".join(loc)
        message = err.get("msg", "invalid request").removeprefix("Value error, ")
        return error_response(400, f"{where}: {message}".lstrip(": "), param=param)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, e: Exception) -> JSONResponse:
        logger.exception("unhandled error")
        return error_response(500, f"internal error: {type(e).__name__}", "server_error")


def add_health_routes(app: FastAPI, engine: AsyncEngine, metrics: ServerMetrics) -> None:
    """GET /health (503 while draining or when the engine is not running) and /metrics."""

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
