"""Hostile and malformed input against a real server: every case gets its 4xx in OpenAI's error
shape (never a 500), and the server keeps serving. Auth covers the docs and metrics; the key
never appears in the output; the Host header is checked."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import httpx
import pytest

from tests.server_utils import ServerProcess

MODEL = "SmolLM2-135M-Instruct"
KEY = "sekrit-key-abcd"
LIMIT = 200_000  # --max-request-bytes
C, H, T, D = "/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"


@pytest.fixture(scope="module")
def srv():
    s = ServerProcess(
        "--allowed-hosts",
        "127.0.0.1,localhost",
        "--max-request-bytes",
        str(LIMIT),
        "--body-timeout",
        "2",
        "--max-header-bytes",
        "8192",
        api_key=KEY,
    )
    yield s
    s.stop()


def completion(**patch) -> bytes:
    return json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": 2, **patch}).encode()


def chat(**patch) -> bytes:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    return json.dumps({**body, **patch}).encode()


def raw(text: str) -> bytes:
    return text.encode()


SURROGATE = "\\ud800"  # a JSON escape of a lone surrogate: valid JSON, invalid Unicode
MSG = '{"role": "user", "content": "hi"}'

CASES = [
    # (id, path, body bytes, expected status, expected param or None)
    # unpaired surrogates anywhere
    ("surrogate prompt", C, raw(f'{{"model": "{MODEL}", "prompt": "{SURROGATE}"}}'), 400, None),
    ("surrogate model", C, raw(f'{{"model": "{SURROGATE}", "prompt": "x"}}'), 400, None),
    (
        "surrogate key",
        C,
        raw(f'{{"model": "{MODEL}", "prompt": "x", "{SURROGATE}": 1}}'),
        400,
        None,
    ),
    (
        "surrogate stop",
        C,
        raw(f'{{"model": "{MODEL}", "prompt": "x", "stop": ["{SURROGATE}"]}}'),
        400,
        None,
    ),
    (
        "surrogate list prompt",
        C,
        raw(f'{{"model": "{MODEL}", "prompt": ["a", "{SURROGATE}"]}}'),
        400,
        None,
    ),
    (
        "surrogate chat content",
        H,
        raw(f'{{"model": "{MODEL}", "messages": [{{"role": "user", "content": "{SURROGATE}"}}]}}'),
        400,
        None,
    ),
    (
        "surrogate content part",
        H,
        raw(
            f'{{"model": "{MODEL}", "messages": [{{"role": "user", "content": '
            f'[{{"type": "text", "text": "a{SURROGATE}"}}]}}]}}'
        ),
        400,
        None,
    ),
    (
        "surrogate name",
        H,
        raw(
            f'{{"model": "{MODEL}", "messages": [{{"role": "user", "content": "x", '
            f'"name": "{SURROGATE}"}}]}}'
        ),
        400,
        None,
    ),
    ("surrogate tokenize", T, raw(f'{{"prompt": "{SURROGATE}"}}'), 400, None),
    (
        "surrogate user",
        C,
        raw(f'{{"model": "{MODEL}", "prompt": "x", "user": "{SURROGATE}"}}'),
        400,
        None,
    ),
    # invalid UTF-8
    (
        "invalid utf-8 prompt",
        C,
        b'{"model": "' + MODEL.encode() + b'", "prompt": "\xff\xfe"}',
        400,
        None,
    ),
    (
        "invalid utf-8 chat",
        H,
        b'{"model": "m", "messages": [{"role": "user", "content": "\xc3"}]}',
        400,
        None,
    ),
    ("invalid utf-8 key", C, b'{"\xff": 1}', 400, None),
    # NaN and infinities
    (
        "nan temperature",
        C,
        raw(f'{{"model": "{MODEL}", "prompt": "x", "temperature": NaN}}'),
        400,
        None,
    ),
    (
        "inf temperature",
        C,
        raw(f'{{"model": "{MODEL}", "prompt": "x", "temperature": Infinity}}'),
        400,
        None,
    ),
    ("nan top_p", C, raw(f'{{"model": "{MODEL}", "prompt": "x", "top_p": NaN}}'), 400, None),
    (
        "-inf repetition_penalty",
        C,
        raw(f'{{"model": "{MODEL}", "prompt": "x", "repetition_penalty": -Infinity}}'),
        400,
        None,
    ),
    (
        "nan presence_penalty",
        C,
        raw(f'{{"model": "{MODEL}", "prompt": "x", "presence_penalty": NaN}}'),
        400,
        None,
    ),
    (
        "inf frequency_penalty",
        H,
        raw(f'{{"model": "{MODEL}", "messages": [{MSG}], "frequency_penalty": Infinity}}'),
        400,
        None,
    ),
    ("nan min_p", C, raw(f'{{"model": "{MODEL}", "prompt": "x", "min_p": NaN}}'), 400, None),
    (
        "1e400 temperature",
        C,
        raw(f'{{"model": "{MODEL}", "prompt": "x", "temperature": 1e400}}'),
        400,
        None,
    ),
    # non-integers where integers belong
    ("fractional max_tokens", C, completion(max_tokens=1.5), 400, None),
    ("string n", C, completion(n="two"), 400, None),
    ("fractional logprobs", C, completion(logprobs=1.5), 400, None),
    ("1e400 seed", C, raw(f'{{"model": "{MODEL}", "prompt": "x", "seed": 1e400}}'), 400, None),
    (
        "5000-digit max_tokens",
        C,
        raw(f'{{"model": "{MODEL}", "prompt": "x", "max_tokens": {"9" * 5000}}}'),
        400,
        None,
    ),
    ("fractional stop_token_ids", C, completion(stop_token_ids=[1.5]), 400, None),
    ("fractional top_k", C, completion(top_k=2.5), 400, None),
    # token ids out of range
    ("huge prompt id", C, completion(prompt=[10**9]), 400, None),
    ("negative prompt id", C, completion(prompt=[-1]), 400, None),
    ("huge id in second prompt", C, completion(prompt=[[1, 2], [10**9]]), 400, None),
    ("negative detokenize", D, raw('{"tokens": [-5]}'), 400, "tokens"),
    ("huge detokenize", D, raw('{"tokens": [1000000000]}'), 400, "tokens"),
    ("negative stop_token_ids", C, completion(stop_token_ids=[-1]), 400, "stop_token_ids"),
    # prompt shapes
    ("triple-nested prompt", C, completion(prompt=[[[1]]]), 400, None),
    ("nested string prompt", C, completion(prompt=[["a"]]), 400, None),
    ("empty prompt list", C, completion(prompt=[]), 400, None),
    ("mixed prompt list", C, completion(prompt=[1, "a"]), 400, None),
    ("empty prompt", C, completion(prompt=""), 400, None),
    (
        "deep nesting",
        C,
        raw(f'{{"model": "{MODEL}", "prompt": ' + "[" * 5000 + "]" * 5000 + "}"),
        400,
        None,
    ),
    # roles and messages
    ("unknown role", H, chat(messages=[{"role": "wizard", "content": "x"}]), 400, None),
    (
        "tool call arguments not a JSON string",
        H,
        chat(
            messages=[
                {
                    "role": "assistant",
                    "tool_calls": [
                        {"id": "c", "type": "function", "function": {"name": "f", "arguments": {}}}
                    ],
                }
            ]
        ),
        400,
        None,
    ),
    (
        "tool message with a list as tool_call_id",
        H,
        chat(messages=[{"role": "tool", "content": "x", "tool_call_id": []}]),
        400,
        None,
    ),
    ("missing role", H, chat(messages=[{"content": "x"}]), 400, None),
    ("numeric content", H, chat(messages=[{"role": "user", "content": 5}]), 400, None),
    ("messages not a list", H, chat(messages="hi"), 400, None),
    ("no messages", H, chat(messages=[]), 400, "messages"),
    # caps
    ("n over cap", C, completion(n=17), 400, "n"),
    ("n zero", C, completion(n=0), 400, "n"),
    ("logprobs over 20", C, completion(logprobs=21), 400, "logprobs"),
    ("top_logprobs over 20", H, chat(logprobs=True, top_logprobs=21), 400, "top_logprobs"),
    ("17 stop strings", C, completion(stop=[f"s{i}" for i in range(17)]), 400, "stop"),
    ("long stop string", C, completion(stop=["x" * 257]), 400, "stop"),
    ("65 stop_token_ids", C, completion(stop_token_ids=list(range(65))), 400, "stop_token_ids"),
    ("1025 messages", H, chat(messages=[{"role": "user", "content": "x"}] * 1025), 400, "messages"),
    ("257 prompts", C, completion(prompt=["x"] * 257), 400, "prompt"),
    ("token budget", C, completion(n=16, max_tokens=10000, prompt=["a"] * 2), 400, "max_tokens"),
    ("chat token budget", H, chat(n=16, max_completion_tokens=9000), 400, "max_tokens"),
    (
        "1025 messages to tokenize",
        T,
        json.dumps({"messages": [{"role": "user", "content": "x"}] * 1025}).encode(),
        400,
        "messages",
    ),
    # malformed bodies
    ("not json", C, b"{not json", 400, None),
    ("json array", C, b"[]", 400, None),
    ("json null", C, b"null", 400, None),
    ("empty body", C, b"", 400, None),
    ("missing model", C, raw('{"prompt": "x"}'), 400, None),
    ("numeric model", C, raw('{"model": 5, "prompt": "x"}'), 400, None),
    ("unknown field", C, completion(bogus=1), 400, "bogus"),
    ("unknown model", C, completion(model="gpt-9"), 404, "model"),
    (
        "stream_options without stream",
        C,
        completion(stream_options={"include_usage": True}),
        400,
        "stream_options",
    ),
]


def _check_error(r: httpx.Response, status: int, param: str | None) -> dict:
    assert r.status_code == status, (r.status_code, r.text[:300])
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"], err
    assert len(err["message"]) < 2000  # a summary, never one entry per item
    if param is not None:
        assert err["param"] == param, err
    return err


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_hostile_input(srv, case):
    _, path, body, status, param = case
    r = httpx.post(
        srv.url + path,
        content=body,
        timeout=60,
        headers={"content-type": "application/json", **srv.headers},
    )
    _check_error(r, status, param)


def test_oversized_bodies_get_413(srv):
    big = completion(prompt="x" * (LIMIT + 10))
    headers = {"content-type": "application/json", **srv.headers}
    err = _check_error(httpx.post(srv.url + C, content=big, headers=headers), 413, None)
    assert err["code"] == "request_too_large"

    def chunks():  # no Content-Length: chunked transfer encoding
        for i in range(0, len(big), 8192):
            yield big[i : i + 8192]

    err = _check_error(httpx.post(srv.url + C, content=chunks(), headers=headers), 413, None)
    assert err["code"] == "request_too_large"


@pytest.mark.parametrize("path", ["/metrics", "/docs", "/redoc", "/openapi.json", "/v1/models"])
def test_key_guards_docs_and_metrics(srv, path):
    _check_error(httpx.get(srv.url + path), 401, None)
    _check_error(httpx.get(srv.url + path, headers={"Authorization": "Bearer nope"}), 401, None)
    assert httpx.get(srv.url + path, headers=srv.headers).status_code == 200


def test_routes_and_methods_errors_in_openai_shape(srv):
    _check_error(httpx.get(srv.url + "/v1/nope", headers=srv.headers), 404, None)
    _check_error(httpx.get(srv.url + C, headers=srv.headers), 405, None)
    _check_error(
        httpx.post(
            srv.url + T, content=b"{}", headers={"content-type": "application/json", **srv.headers}
        ),
        400,
        "prompt",
    )


def test_host_header_is_checked(srv):
    assert httpx.get(srv.url + "/health").status_code == 200  # 127.0.0.1 is allowed
    r = httpx.get(srv.url + "/health", headers={"Host": "evil.example"})
    assert _check_error(r, 400, None)["code"] == "invalid_host"


def test_server_survives_and_key_never_printed(srv):
    r = httpx.post(
        srv.url + C,
        content=completion(max_tokens=3, temperature=0),
        headers={"content-type": "application/json", **srv.headers},
        timeout=60,
    )
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    assert httpx.get(srv.url + "/health").status_code == 200
    out = srv.output()
    assert KEY not in out and "...abcd" in out
    assert "Traceback" not in out and "unhandled error" not in out


def test_empty_api_key_is_an_error_at_start():
    r = subprocess.run(
        [sys.executable, "-m", "tokenmill", "serve", "--api-key", ""],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode != 0 and "API key" in r.stderr


def _raw_exchange(srv, head: bytes, wait: float) -> bytes:
    with socket.create_connection(("127.0.0.1", srv.port), timeout=30) as sock:
        sock.sendall(head)
        time.sleep(wait)
        return sock.recv(65536)


def test_slow_body_gets_408_and_big_headers_are_refused(srv):
    head = (
        f"POST {C} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {KEY}\r\nContent-Length: 100\r\n\r\n{{"
    ).encode()
    reply = _raw_exchange(srv, head, 0)  # one byte of 100, then nothing: the timeout answers
    assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
    big = (f"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Pad: {'a' * 20000}\r\n\r\n").encode()
    reply = _raw_exchange(srv, big, 0.2)
    assert reply.startswith(b"HTTP/1.1 431"), reply[:200]
    assert httpx.get(srv.url + "/health").status_code == 200
