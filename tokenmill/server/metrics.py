"""Prometheus metrics of the server (one registry per app, so tests can run several)."""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)

from tokenmill.engine.async_engine import AsyncEngine

_LATENCY_BUCKETS = (
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
_TPOT_BUCKETS = (
    0.005,
    0.01,
    0.015,
    0.02,
    0.025,
    0.03,
    0.04,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
)


class ServerMetrics:
    def __init__(self, engine: AsyncEngine, model_name: str) -> None:
        self.registry = CollectorRegistry()
        labels = {"model_name": model_name}
        reg = self.registry
        self.requests = Counter(
            "tokenmill_requests",
            "Finished requests by status (stop, length, abort, error)",
            ["model_name", "status"],
            registry=reg,
        )
        self.prompt_tokens = Counter(
            "tokenmill_prompt_tokens", "Prompt tokens processed", ["model_name"], registry=reg
        ).labels(**labels)
        self.generation_tokens = Counter(
            "tokenmill_generation_tokens", "Tokens generated", ["model_name"], registry=reg
        ).labels(**labels)
        self.ttft = Histogram(
            "tokenmill_time_to_first_token_seconds",
            "Time to first token",
            ["model_name"],
            buckets=_LATENCY_BUCKETS,
            registry=reg,
        ).labels(**labels)
        self.tpot = Histogram(
            "tokenmill_time_per_output_token_seconds",
            "Time per output token after the first",
            ["model_name"],
            buckets=_TPOT_BUCKETS,
            registry=reg,
        ).labels(**labels)
        self.e2e = Histogram(
            "tokenmill_e2e_request_latency_seconds",
            "End-to-end latency",
            ["model_name"],
            buckets=_LATENCY_BUCKETS,
            registry=reg,
        ).labels(**labels)
        # Gauges read the engine's stats at scrape time (benign cross-thread reads of sizes).
        core = engine.engine

        def gauge(name: str, doc: str, read) -> None:
            Gauge(name, doc, ["model_name"], registry=reg).labels(**labels).set_function(read)

        gauge(
            "tokenmill_num_requests_running",
            "Sequences in the running batch",
            lambda: core.stats().num_running,
        )
        gauge(
            "tokenmill_num_requests_waiting",
            "Sequences waiting to be scheduled",
            lambda: engine.num_waiting,
        )
        gauge(
            "tokenmill_kv_cache_usage_perc",
            "Fraction of KV-cache blocks in use (0-1)",
            lambda: core.stats().kv_cache_usage,
        )
        gauge(
            "tokenmill_num_preemptions",
            "Preemptions since start (recomputed requests)",
            lambda: core.stats().num_preemptions,
        )
        gauge(
            "tokenmill_prefix_cache_queries_tokens",
            "Prompt tokens looked up in the prefix cache (since start)",
            lambda: core.stats().prefix_cache_query_tokens,
        )
        gauge(
            "tokenmill_prefix_cache_hits_tokens",
            "Prompt tokens found in the prefix cache (since start)",
            lambda: core.stats().prefix_cache_hit_tokens,
        )
        # Speculative decoding (vLLM's spec_decode_* counters): accepted / draft tokens is the
        # acceptance rate, 1 + accepted / drafts the tokens a drafted step emits on average.
        gauge(
            "tokenmill_spec_decode_num_drafts",
            "Decode steps of a sequence that carried draft tokens (since start)",
            lambda: core.stats().spec_drafts,
        )
        gauge(
            "tokenmill_spec_decode_num_draft_tokens",
            "Draft tokens proposed and checked (since start)",
            lambda: core.stats().spec_draft_tokens,
        )
        gauge(
            "tokenmill_spec_decode_num_accepted_tokens",
            "Draft tokens accepted (since start)",
            lambda: core.stats().spec_accepted_tokens,
        )
        # Memory: the process (process_resident_memory_bytes, ...) next to the KV pool's
        # reserved and committed sizes (the pool's pages are committed as blocks are written).
        ProcessCollector(registry=reg)
        gauge(
            "tokenmill_kv_cache_reserved_bytes",
            "Bytes reserved for the KV cache",
            lambda: core.stats().kv_cache_reserved_bytes,
        )
        gauge(
            "tokenmill_kv_cache_resident_bytes",
            "Bytes of the KV cache the OS has committed (written at least once)",
            lambda: core.stats().kv_cache_resident_bytes,
        )
        self._labels = labels

    def request_finished(self, status: str) -> None:
        self.requests.labels(status=status, **self._labels).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
