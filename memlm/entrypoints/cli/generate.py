"""`memlm generate` (one prompt streamed, or a prompts file in batch to JSONL) and `memlm chat`.

Owns: these commands' flags, reading a prompts file, writing its JSONL (rows from
`memlm.entrypoints.batch`, here or, with --ray, from `memlm.distributed.ray_data` actors), and
printing replies as they stream.
Does not know: how generation works (it calls `memlm.LLM`, built by `cli/args.py`).
Handlers take the parsed `args` and return an exit code; user errors raise `MemlmError`.
"""
from __future__ import annotations

import sys

from memlm.entrypoints.cli import args as args_mod
from memlm.errors import MemlmError


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


def _write_rows(rows, path: str | None) -> None:
    import json
    out = open(path, "w", encoding="utf-8") if path else sys.stdout
    try:
        for row in rows:
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
    finally:
        if out is not sys.stdout:
            out.close()


def cmd_generate_file(args) -> int:
    """Offline batch: every prompt of --prompts-file through the engine, JSONL out."""
    from memlm.entrypoints.batch import output_row, run_prompts
    prompts, params = _read_prompts_file(args.prompts_file, args_mod.sampling_params(args))
    if args.ray:
        return _cmd_generate_file_ray(args, prompts, params)
    llm = args_mod.make_llm(args, num_seqs=sum(p.n for p in params))
    outputs = run_prompts(llm, prompts, params, args.chat)
    _write_rows((output_row(p, o) for p, o in zip(prompts, outputs)), args.output)
    if llm.metrics is not None:
        from memlm.engine.llm_engine import format_metrics
        print(f"memlm: {len(outputs)} requests; {format_metrics(llm.metrics)}", file=sys.stderr)
    return 0


def _cmd_generate_file_ray(args, prompts: list, params: list) -> int:
    """--ray: the same rows from --actors Ray Data actors, each inside --memory-budget."""
    import time

    from memlm.distributed import ray_data
    ray_data.require_ray_data()
    engine = {"model": args.model, **args_mod.engine_kwargs(args)}
    for key in ("memory_budget", "device"):
        if getattr(args, key) is not None:
            engine[key] = getattr(args, key)
    start = time.perf_counter()
    rows = ray_data.generate_rows(prompts, params, engine, chat=args.chat, actors=args.actors,
                                  batch_size=args.batch_size, actor_cpus=args.actor_cpus,
                                  address=args.ray_address)
    _write_rows(rows, args.output)
    tokens = sum(len(r["token_ids"]) for r in rows)
    print(f"memlm: {len(rows)} requests on {args.actors} Ray Data actors; {tokens} tokens in "
          f"{time.perf_counter() - start:.1f} s", file=sys.stderr)
    return 0


def cmd_generate(args) -> int:
    if not args.prompts_file and (args.ray or args.actors is not None):
        raise MemlmError("--ray and --actors need --prompts-file "
                         "(memlm generate --prompts-file F --ray --actors N)")
    if args.prompts_file is not None:
        if args.prompt is not None:
            raise MemlmError("give either PROMPT or --prompts-file, not both")
        return cmd_generate_file(args)
    if args.prompt is None:
        raise MemlmError("no prompt given: pass PROMPT (e.g. memlm generate \"Hello\") or --prompts-file F")
    params = args_mod.sampling_params(args)
    llm = args_mod.make_llm(args, num_seqs=1)
    if args.chat:
        prompt = [{"role": "user", "content": args.prompt}]
        _stream_to_stdout(llm.stream(prompt, params, chat=True))
    else:
        _stream_to_stdout(llm.stream(args.prompt, params))
    return 0


def cmd_chat(args) -> int:
    params = args_mod.sampling_params(args)
    llm = args_mod.make_llm(args, num_seqs=1)
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


def add_commands(subparsers) -> None:
    g = subparsers.add_parser("generate", help="generate text from a prompt")
    g.add_argument("prompt", nargs="?", default=None)
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    g.add_argument("--prompts-file", default=None,
                   help="batch mode: one prompt per line, or JSONL with \"prompt\" and optional sampling fields")
    g.add_argument("--output", "-o", default=None, help="batch mode: write JSONL here (default stdout)")
    g.add_argument("--ray", action="store_true",
                   help="batch mode on Ray Data actors (pip install 'memlm[distributed]')")
    g.add_argument("--actors", type=int, default=None,
                   help="with --ray: actors, each loading the model inside --memory-budget (default 1)")
    g.add_argument("--batch-size", type=int, default=None,
                   help="with --ray: prompts per actor call (default: the prompts split evenly, at most 64)")
    g.add_argument("--actor-cpus", type=float, default=1.0,
                   help="with --ray: CPUs Ray reserves per actor (default %(default)s)")
    g.add_argument("--ray-address", default=None,
                   help="with --ray: join this Ray cluster (default: start a local one)")
    args_mod.add_model_args(g)
    args_mod.add_sampling_args(g)
    g.set_defaults(func=cmd_generate)

    c = subparsers.add_parser("chat", help="interactive chat that streams replies")
    c.add_argument("--system", default=None, help="system prompt")
    args_mod.add_model_args(c)
    args_mod.add_sampling_args(c)
    c.set_defaults(func=cmd_chat)
