"""Benchmarks that talk to servers: `tokenmill bench serve` drives any OpenAI-compatible endpoint.

The modules here talk HTTP through httpx (matplotlib draws plots) and never call the engine, so
they measure tokenmill, llama.cpp's server or vLLM the same way. The entry points live in
`tokenmill.bench.serve` (`add_bench_serve_args`, `run_bench_serve`, `main`); they are not
re-exported here so that `python -m tokenmill.bench.serve` runs without a double import.
"""
