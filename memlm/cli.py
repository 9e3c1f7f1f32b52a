"""The `memlm` command line: generate, chat, info (+ train / distill / eval from
`memlm.training.cli`, bench from the engine).

Owns: argument parsing, printing, and turning user errors into one line on stderr with a
non-zero exit code. Does not know: how generation works (it calls `memlm.LLM`).
"""
from __future__ import annotations

import argparse
import sys

from memlm.errors import MemlmError
from memlm.models.registry import DEFAULT_MODEL


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", default=DEFAULT_MODEL,
                   help=f"model name, .gguf file or Hugging Face directory (default: {DEFAULT_MODEL})")
    p.add_argument("--memory-budget", default=None,
                   help="bound on the whole process's memory, e.g. 1GiB (default: a fraction of available RAM)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=256, help="most new tokens per reply (default 256)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--seed", type=int, default=None)


def _sampling_params(args):
    from memlm.sampling import SamplingParams
    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                          top_p=args.top_p, top_k=args.top_k, seed=args.seed)


def _make_llm(args):
    from memlm.llm import LLM
    kwargs = {"model": args.model}
    if args.memory_budget is not None:
        kwargs["memory_budget"] = args.memory_budget
    if args.device is not None:
        kwargs["device"] = args.device
    return LLM(**kwargs)


def _stream_to_stdout(chunks) -> str | None:
    finish = None
    for chunk in chunks:
        sys.stdout.write(chunk.text)
        sys.stdout.flush()
        finish = chunk.finish_reason or finish
    sys.stdout.write("\n")
    return finish


def cmd_generate(args) -> int:
    if args.prompt is None:
        raise MemlmError("no prompt given: pass PROMPT (e.g. memlm generate \"Hello\")")
    params = _sampling_params(args)
    llm = _make_llm(args)
    if args.chat:
        prompt = [{"role": "user", "content": args.prompt}]
        _stream_to_stdout(llm.stream(prompt, params, chat=True))
    else:
        _stream_to_stdout(llm.stream(args.prompt, params))
    return 0


def cmd_chat(args) -> int:
    params = _sampling_params(args)
    llm = _make_llm(args)
    history: list[dict] = []
    if args.system:
        history.append({"role": "system", "content": args.system})
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"memlm chat with {args.model} — /reset clears the history, /exit or Ctrl-D quits.")
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            break
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            break
        if line == "/reset":
            history = history[:1] if args.system else []
            continue
        history.append({"role": "user", "content": line})
        reply: list[str] = []
        for chunk in llm.stream(history, params, chat=True):
            reply.append(chunk.text)
            sys.stdout.write(chunk.text)
            sys.stdout.flush()
        sys.stdout.write("\n")
        history.append({"role": "assistant", "content": "".join(reply)})
    return 0


def cmd_info(args) -> int:
    from memlm.config import format_size
    from memlm.loading import load_model
    loaded = load_model(args.model)
    cfg = loaded.config
    print(f"model:        {args.model}")
    print(f"source:       {loaded.source} ({loaded.format})")
    print(f"architecture: {cfg.arch}: {cfg.depth} layers, hidden {cfg.hidden_size}, "
          f"{cfg.num_heads} heads / {cfg.num_kv_heads} kv heads (head_dim {cfg.head_dim}), "
          f"mlp {cfg.mlp} {cfg.intermediate_size}, {cfg.norm} norm, {cfg.position} positions, "
          f"vocab {cfg.vocab_size}, {'tied' if cfg.tie_word_embeddings else 'untied'} embeddings")
    print(f"parameters:   {loaded.model.num_parameters():,}")
    print(f"weights:      {format_size(loaded.weight_bytes)} as loaded ({loaded.weight_bytes:,} bytes)")
    print(f"kv cache:     {format_size(cfg.kv_bytes_per_token)} per token (fp32)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="memlm", description="Run and distill language models inside a memory budget.")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text from a prompt")
    g.add_argument("prompt", nargs="?", default=None)
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    _add_model_args(g)
    _add_sampling_args(g)
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("chat", help="interactive chat that streams replies")
    c.add_argument("--system", default=None, help="system prompt")
    _add_model_args(c)
    _add_sampling_args(c)
    c.set_defaults(func=cmd_chat)

    i = sub.add_parser("info", help="architecture, parameter count and weight bytes of a model")
    _add_model_args(i)
    i.set_defaults(func=cmd_info)

    try:
        from memlm.training.cli import add_commands as add_training
    except ImportError:
        add_training = None
    if add_training is not None:
        add_training(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except MemlmError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError) as e:
        # Validation errors from dataclasses and file errors are user errors too.
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
