"""Command line: `tokenmill serve | generate | chat | info | perplexity | bench serve`."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from collections.abc import Sequence
from dataclasses import fields

from tokenmill.config import EngineArgs
from tokenmill.engine.generation_defaults import CONFIG_KEYS
from tokenmill.errors import TokenmillError
from tokenmill.sampling_params import SamplingParams

logger = logging.getLogger("tokenmill")

# SamplingParams fields exposed as flags: name -> (type, help)
SAMPLING_FLAGS = {
    "max_tokens": (int, "maximum new tokens"),
    "temperature": (float, "0 = greedy"),
    "top_p": (float, "nucleus sampling mass"),
    "top_k": (int, "keep the k most likely tokens (-1: off)"),
    "min_p": (float, "drop tokens below min_p * max prob"),
    "repetition_penalty": (float, "CTRL-style repetition penalty"),
    "presence_penalty": (float, "OpenAI presence penalty"),
    "frequency_penalty": (float, "OpenAI frequency penalty"),
    "seed": (int, "per-request seed"),
    "n": (int, "number of samples"),
    "min_tokens": (int, "minimum new tokens before EOS/stop ids"),
    "logprobs": (int, "print top-k log-probabilities per token"),
}


# Flags whose default is the model's recommendation (`--generation-config`), when it has one.
MODEL_DEFAULTS = CONFIG_KEYS

# Flags that mean the per-request value in generate/chat (the engine keeps its default).
SAMPLING_ONLY = ("seed",)


def _add_sampling_args(p: argparse.ArgumentParser, max_tokens: int) -> None:
    defaults = {f.name: f.default for f in fields(SamplingParams)}
    defaults["max_tokens"] = max_tokens
    for name, (typ, help_) in SAMPLING_FLAGS.items():
        if name in MODEL_DEFAULTS:  # left out: the model's recommendation, if it has one
            help_ += f" (default: the model's, else {defaults[name]})"
            default = None
        else:
            default = defaults[name]
        p.add_argument("--" + name.replace("_", "-"), type=typ, default=default, help=help_)
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", help="keep going after EOS")


def _sampling_params(ns: argparse.Namespace, base: SamplingParams) -> SamplingParams:
    """The flags' SamplingParams, over `base` (the model's recommended settings) for the
    settings the flags leave out."""
    kw = {name: getattr(ns, name) for name in SAMPLING_FLAGS if getattr(ns, name) is not None}
    return dataclasses.replace(base, **kw, stop=ns.stop, ignore_eos=ns.ignore_eos)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokenmill", description=__doc__)
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ERROR")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="complete one prompt and print the result")
    gen.add_argument("prompt", help="the prompt text ('-' reads standard input)")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    gen.add_argument("--no-stream", action="store_true", help="print only when finished")
    _add_sampling_args(gen, max_tokens=128)
    EngineArgs.add_cli_args(gen, skip=SAMPLING_ONLY)

    chat = sub.add_parser("chat", help="interactive chat that streams tokens")
    chat.add_argument("--system", default=None, help="system message")
    _add_sampling_args(chat, max_tokens=512)
    EngineArgs.add_cli_args(chat, skip=SAMPLING_ONLY)

    from tokenmill.server.serve import add_serve_args

    serve = sub.add_parser("serve", help="OpenAI-compatible HTTP server")
    add_serve_args(serve)

    from tokenmill.bench.serve import add_bench_serve_args

    bench = sub.add_parser("bench", help="benchmarks")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    add_bench_serve_args(
        bench_sub.add_parser("serve", help="load-test any OpenAI-compatible endpoint")
    )

    info = sub.add_parser("info", help="architecture, parameters, format, memory, KV capacity")
    info.add_argument("model_path", nargs="?", default=None, metavar="MODEL")
    EngineArgs.add_cli_args(info, skip=("model",))

    est = sub.add_parser(
        "estimate", help="memory needed at full use, and how many sequences of each length fit"
    )
    est.add_argument("model_path", nargs="?", default=None, metavar="MODEL")
    est.add_argument(
        "--memory-gib",
        type=float,
        default=None,
        help="the memory to fit in, per device (default: the CPU's available memory, or 90%% "
        "of the GPU's; needed for a GPU that is not here: --device cuda)",
    )
    EngineArgs.add_cli_args(est, skip=("model",))

    ppl = sub.add_parser("perplexity", help="perplexity of a text file (sliding windows)")
    ppl.add_argument(
        "model_path",
        nargs="?",
        default=None,
        metavar="MODEL",
        help="GGUF file, HF folder or Hub id (default: the embedded model)",
    )
    ppl.add_argument("file", metavar="FILE", help="UTF-8 text file ('-' reads standard input)")
    ppl.add_argument(
        "--context-length",
        type=int,
        default=None,
        help="window length in tokens (default: min(max model length, 512))",
    )
    ppl.add_argument(
        "--stride",
        type=int,
        default=None,
        help="tokens between window starts (default: half the window)",
    )
    ppl.add_argument(
        "--max-tokens", type=int, default=None, help="score only the file's first T tokens"
    )
    EngineArgs.add_cli_args(ppl, skip=("model",))
    return parser


def cmd_generate(ns: argparse.Namespace) -> int:
    from tokenmill.engine.llm import LLM

    prompt = sys.stdin.read() if ns.prompt == "-" else ns.prompt
    _sampling_params(ns, SamplingParams())  # a bad flag fails before the model loads
    llm = LLM(**vars(EngineArgs.from_cli(ns, skip=SAMPLING_ONLY)))
    params = _sampling_params(ns, llm.get_default_sampling_params())
    token_ids = llm.encode_chat([{"role": "user", "content": prompt}])[1] if ns.chat else None
    if ns.no_stream or params.n > 1:
        out = llm.generate(prompt if token_ids is None else token_ids, params)[0]
        for o in out.outputs:
            if params.n > 1:
                print(f"--- sample {o.index} ({o.finish_reason}) ---")
            print(o.text)
        return 0
    finish = None
    for out in llm.stream(prompt, params, prompt_token_ids=token_ids):
        o = out.outputs[0]
        sys.stdout.write(o.delta_text)
        sys.stdout.flush()
        finish = o
    sys.stdout.write("\n")
    if params.logprobs is not None and finish is not None and finish.logprobs:
        tok = llm.get_tokenizer()
        for t, lp in zip(finish.token_ids, finish.logprobs):
            alts = ", ".join(f"{v.decoded_token!r}:{v.logprob:.3f}" for v in lp.values())
            print(f"{tok.decode([t], False)!r}\t{alts}")
    logger.info(
        "finish_reason=%s, %d tokens",
        finish.finish_reason if finish else None,
        len(finish.token_ids) if finish else 0,
    )
    return 0


def cmd_chat(ns: argparse.Namespace) -> int:
    from tokenmill.engine.llm import LLM

    _sampling_params(ns, SamplingParams())
    llm = LLM(**vars(EngineArgs.from_cli(ns, skip=SAMPLING_ONLY)))
    params = _sampling_params(ns, llm.get_default_sampling_params())
    history: list[dict[str, str]] = []
    if ns.system:
        history.append({"role": "system", "content": ns.system})
    print("tokenmill chat: type a message; Ctrl-D or /exit to quit, /reset to clear history.")
    while True:
        try:
            line = input(">>> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if line.strip() in ("/exit", "/quit"):
            return 0
        if line.strip() == "/reset":
            history = history[:1] if ns.system else []
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        _, ids = llm.encode_chat(history)
        reply = ""
        try:
            for out in llm.stream("", params, prompt_token_ids=ids):
                delta = out.outputs[0].delta_text
                reply += delta
                sys.stdout.write(delta)
                sys.stdout.flush()
        except KeyboardInterrupt:
            pass
        except ValueError as e:  # e.g. the conversation outgrew the context
            print(f"error: {e}")
            history.pop()
            continue
        print()
        history.append({"role": "assistant", "content": reply})


def cmd_info(ns: argparse.Namespace) -> int:
    from tokenmill.loader.inspect import describe_model

    args = EngineArgs.from_cli(argparse.Namespace(**{**vars(ns), "model": ns.model_path}))
    for key, value in describe_model(args).items():
        print(f"{key:<28}{value}")
    return 0


def cmd_estimate(ns: argparse.Namespace) -> int:
    from tokenmill.loader.estimate import estimate_memory
    from tokenmill.loader.estimate_report import describe_estimate

    args = EngineArgs.from_cli(argparse.Namespace(**{**vars(ns), "model": ns.model_path}))
    e = estimate_memory(args, ns.memory_gib)
    print("\n".join(describe_estimate(e, args.model or "the embedded default model")))
    return 0


def cmd_perplexity(ns: argparse.Namespace) -> int:
    from tokenmill.engine.llm import LLM
    from tokenmill.engine.perplexity import perplexity

    if ns.file == "-":
        text = sys.stdin.read()
    else:
        try:
            with open(ns.file, encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            raise ValueError(f"cannot read {ns.file}: {e.strerror or e}") from None
    args = EngineArgs.from_cli(argparse.Namespace(**{**vars(ns), "model": ns.model_path}))
    llm = LLM(**vars(args))
    res = perplexity(
        llm,
        text,
        context_length=ns.context_length,
        stride=ns.stride,
        max_tokens=ns.max_tokens,
        use_tqdm=sys.stderr.isatty(),
    )
    print(f"{'perplexity':<16}{res.perplexity:.4f}")
    print(f"{'tokens scored':<16}{res.num_scored_tokens}")
    print(f"{'tokens/s':<16}{res.tokens_per_second:.1f}")
    print(
        f"{'windows':<16}{res.num_windows} x {res.context_length} tokens, stride "
        f"{res.stride} ({res.num_evaluated_tokens} tokens evaluated in {res.seconds:.2f}s)"
    )
    return 0


def cmd_serve(ns: argparse.Namespace) -> int:
    from tokenmill.server.serve import run_server

    return run_server(ns)


def cmd_bench(ns: argparse.Namespace) -> int:
    from tokenmill.bench.serve import run_bench_serve

    return run_bench_serve(ns)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, ns.log_level.upper(), logging.INFO),
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    commands = {
        "generate": cmd_generate,
        "chat": cmd_chat,
        "info": cmd_info,
        "estimate": cmd_estimate,
        "perplexity": cmd_perplexity,
        "serve": cmd_serve,
        "bench": cmd_bench,
    }
    try:
        return commands[ns.command](ns)
    except (TokenmillError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
