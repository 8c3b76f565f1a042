"""`tokenmill serve`: build the engine, print the banner, run uvicorn, shut down cleanly."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys

from tokenmill.config import EngineArgs
from tokenmill.engine.reasoning import REASONING_PARSERS
from tokenmill.engine.tool_parsers import PARSERS
from tokenmill.server.protocol import RequestLimits

logger = logging.getLogger(__name__)


def add_serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "model_path",
        nargs="?",
        default=None,
        metavar="MODEL",
        help="GGUF file, HF folder or Hub id (default: the embedded model)",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--api-key",
        default=os.environ.get("TOKENMILL_API_KEY"),
        help="require 'Authorization: Bearer KEY' on the API, docs and metrics "
        "(env TOKENMILL_API_KEY; an empty key is an error)",
    )
    p.add_argument(
        "--public-metrics", action="store_true", help="serve /metrics without the API key"
    )
    p.add_argument(
        "--allowed-hosts",
        default="",
        help="comma-separated Host header values to accept (DNS-rebinding "
        "protection; default: any)",
    )
    p.add_argument(
        "--allowed-origins",
        default="",
        help="comma-separated origins (https://app.example) whose web pages may call the API "
        "(CORS; * for any, as vLLM and llama.cpp allow; also a JSON list, vLLM's form); "
        "default: pages served from this machine only",
    )
    p.add_argument(
        "--allow-credentials",
        action="store_true",
        help="let those pages send cookies and HTTP authentication (CORS credentials)",
    )
    defaults = RequestLimits()
    for field, help_ in (
        ("max_n", "largest n (samples per prompt)"),
        ("max_stop_strings", "most stop strings per request"),
        ("max_stop_length", "longest stop string, in characters"),
        ("max_stop_token_ids", "most stop_token_ids per request"),
        ("max_messages", "most chat messages per request"),
        ("max_prompts", "most prompts per completions request"),
        ("max_tools", "most tools per chat request"),
        ("max_logit_bias", "most logit_bias entries per request"),
        ("max_allowed_token_ids", "most allowed_token_ids per request"),
        ("max_request_tokens", "largest n x max_tokens x prompts of a request"),
    ):
        p.add_argument(
            "--" + field.replace("_", "-"), type=int, default=getattr(defaults, field), help=help_
        )
    p.add_argument(
        "--tool-call-parser",
        default="auto",
        choices=("auto", *sorted(PARSERS)),
        help="how models write tool calls (auto: detected from the chat template; hermes "
        "when the template cannot render tools and the fallback system prompt is used)",
    )
    p.add_argument(
        "--reasoning-parser",
        default=None,
        choices=REASONING_PARSERS,
        help="give chat replies' reasoning (<think> ... </think>) as the message's `reasoning` "
        "(and `reasoning_content`) instead of in its content: deepseek_r1 (DeepSeek-R1 and its "
        "distills, QwQ) or qwen3",
    )
    p.add_argument(
        "--served-model-name",
        default=None,
        help="model id clients send (default: the model's name)",
    )
    p.add_argument(
        "--max-queued-requests", type=int, default=1024, help="waiting requests beyond this get 503"
    )
    p.add_argument(
        "--max-request-bytes", type=int, default=4 << 20, help="larger request bodies get 413"
    )
    p.add_argument(
        "--body-timeout",
        type=float,
        default=30.0,
        help="seconds a request body may take to arrive (then 408)",
    )
    p.add_argument(
        "--keep-alive-timeout",
        type=float,
        default=5.0,
        help="seconds an idle keep-alive connection stays open",
    )
    p.add_argument(
        "--max-header-bytes",
        type=int,
        default=16384,
        help="largest request head (request line and headers)",
    )
    p.add_argument(
        "--max-connections",
        type=int,
        default=2048,
        help="concurrent connections; more get 503 from the transport",
    )
    p.add_argument(
        "--stream-stall-timeout",
        type=float,
        default=60.0,
        help="abort a request whose client has not read its stream for this long",
    )
    p.add_argument(
        "--shutdown-timeout",
        type=float,
        default=30.0,
        help="seconds running requests may take to finish after SIGTERM (queued "
        "ones get 503 at once; a second SIGTERM exits now)",
    )
    p.add_argument(
        "--allow-runtime-lora-updating",
        action="store_true",
        help="serve POST /v1/load_lora_adapter and /v1/unload_lora_adapter (they load "
        "server-side paths: for trusted clients; needs --enable-lora)",
    )
    p.add_argument(
        "--uvicorn-log-level",
        default="warning",
        choices=("critical", "error", "warning", "info", "debug", "trace"),
        help="uvicorn's own log level (info: one line per request)",
    )
    _add_vllm_flags(p)
    EngineArgs.add_cli_args(p, skip=("model",))


# vLLM's serve flags that scripts pass by habit, and what they mean here: accepted, so that a
# command line written for vLLM runs unchanged.
VLLM_FLAGS = {
    "--trust-remote-code": "no effect: no model code is ever run here, only its weights",
    "--enable-auto-tool-choice": "no effect: tool_choice auto is always served",
    "--disable-log-requests": "no effect: requests are not logged",
    "--disable-log-stats": "no effect: no periodic stats are logged (see /metrics)",
}


def _add_vllm_flags(p: argparse.ArgumentParser) -> None:
    group = p.add_argument_group("vLLM's flags, accepted for its command lines")
    for flag, help_ in VLLM_FLAGS.items():
        group.add_argument(flag, action="store_true", help=help_)


def banner(engine, name: str, host: str, port: int, api_key: str | None) -> str:
    info = engine.model_info
    url = f"http://{host}:{port}"
    # the key itself is never printed: its last 4 characters identify it
    auth = ' -H "Authorization: Bearer $TOKENMILL_API_KEY"' if api_key else ""
    return "\n".join(
        [
            f"tokenmill serving {name}",
            f"  model         {info.arch.architecture} from {info.source.path}",
            f"  weights       {info.weight_format}, computing in "
            f"{str(engine.dtype).removeprefix('torch.')} on {engine.device}"
            + (f" (native {info.native_weights})" if info.native_weights else ""),
            f"  KV cache      {engine.kv_capacity_tokens} tokens; max concurrency "
            f"{engine.kv_capacity_tokens / engine.max_model_len:.1f} at full context "
            f"({engine.max_model_len} tokens)",
            f"  URL           {url}/v1  (metrics {url}/metrics, health {url}/health)",
            *([f"  auth          API key ...{api_key[-4:]} required"] if api_key else []),
            f"  try           curl {url}/v1/chat/completions{auth}"
            " -H 'Content-Type: application/json'"
            f' -d \'{{"model": "{name}", "messages": [{{"role": "user", '
            f'"content": "Hello!"}}]}}\'',
        ]
    )


def _draining_server(config, drain_timeout: float):
    """A uvicorn server whose first SIGTERM/SIGINT drains (`server.app.drain`) before exiting,
    and whose second one exits at once."""
    import asyncio

    import uvicorn

    from tokenmill.server.app import drain

    class DrainingServer(uvicorn.Server):
        drain_requested = False
        drain_task = None

        def handle_exit(self, sig, frame) -> None:
            if self.drain_requested:  # the second signal: stop now
                self.force_exit = self.should_exit = True
            self.drain_requested = True

        async def on_tick(self, counter: int) -> bool:
            if self.drain_requested and self.drain_task is None:
                self.drain_task = asyncio.create_task(self._drain())
            return await super().on_tick(counter)

        async def _drain(self) -> None:
            await drain(self.config.app, drain_timeout)
            self.should_exit = True

    return DrainingServer(config)


def run_server(ns: argparse.Namespace) -> int:
    import uvicorn

    from tokenmill.engine.async_engine import AsyncEngine
    from tokenmill.engine.llm_engine import LLMEngine
    from tokenmill.server.app import build_app

    if ns.api_key is not None and not ns.api_key.strip():
        raise SystemExit(
            "tokenmill serve: the API key (--api-key / TOKENMILL_API_KEY) is empty; "
            "pass a key, or unset it to serve without auth"
        )
    limits = RequestLimits(**{f: getattr(ns, f) for f in RequestLimits.__dataclass_fields__})
    args = EngineArgs.from_cli(argparse.Namespace(**{**vars(ns), "model": ns.model_path}))
    engine = LLMEngine(args)
    name = ns.served_model_name or engine.model_info.source.name
    async_engine = AsyncEngine(
        engine,
        max_waiting_requests=ns.max_queued_requests,
        stream_stall_timeout=ns.stream_stall_timeout,
    )
    app = build_app(
        async_engine,
        name,
        api_key=ns.api_key,
        max_body_bytes=ns.max_request_bytes,
        limits=limits,
        public_metrics=ns.public_metrics,
        allowed_hosts=tuple(h.strip() for h in ns.allowed_hosts.split(",") if h.strip()),
        body_timeout=ns.body_timeout,
        max_header_bytes=ns.max_header_bytes,
        tool_call_parser=ns.tool_call_parser,
        allow_runtime_lora_updating=ns.allow_runtime_lora_updating,
        reasoning_parser=ns.reasoning_parser,
        allowed_origins=_origins(ns.allowed_origins),
        allow_credentials=ns.allow_credentials,
    )
    config = uvicorn.Config(
        app,
        host=ns.host,
        port=ns.port,
        log_level=ns.uvicorn_log_level,
        timeout_graceful_shutdown=ns.shutdown_timeout,
        access_log=False,
        timeout_keep_alive=ns.keep_alive_timeout,
        limit_concurrency=ns.max_connections,
        h11_max_incomplete_event_size=ns.max_header_bytes,
    )
    server = _draining_server(config, ns.shutdown_timeout)
    print(banner(engine, name, ns.host, ns.port, ns.api_key), file=sys.stderr, flush=True)
    # uvicorn re-raises the signal it caught once it has shut down; with these handlers in
    # place that re-raise is a no-op, so a SIGTERM/SIGINT shutdown exits with status 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    try:
        server.run()
    finally:
        # A second signal makes uvicorn skip the app's lifespan shutdown, which stops the engine
        # thread. Left running, that (daemon) thread may be inside a torch op when the
        # interpreter finalizes: its forced exit unwinds through C++ frames and aborts the
        # process (SIGABRT, seen as exit status -6). Stop it here in every case.
        async_engine.shutdown()
    logger.info("server stopped")
    return 0


def _origins(value: str) -> tuple[str, ...]:
    """`--allowed-origins`: comma-separated, or a JSON list (vLLM's form)."""
    if value.strip().startswith("["):
        origins = json.loads(value)
        if not isinstance(origins, list) or not all(isinstance(o, str) for o in origins):
            raise ValueError("--allowed-origins: a JSON list must hold strings")
        return tuple(origins)
    return tuple(o.strip() for o in value.split(",") if o.strip())
