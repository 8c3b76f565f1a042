"""Error responses: OpenAI's error body (`APIError`, `error_response`) and the middleware that
gives Anthropic's paths Anthropic's error shape (`AnthropicErrors`)."""

from __future__ import annotations

import json
from typing import Any

from fastapi.responses import JSONResponse


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
