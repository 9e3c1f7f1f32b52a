"""`memlm info`: a model's architecture, parameter count and weight bytes, and with
--memory-budget the engine's memory plan (`Engine.describe_plan()`, the object the engine
applies).

Owns: this command's flags and printing. Does not know: how the plan is computed
(`memlm.memory.plan`, `memlm.engine.llm_engine`).
"""
from __future__ import annotations

from memlm.entrypoints.cli import args as args_mod


def cmd_info(args) -> int:
    from memlm.config import format_size
    llm = None
    if args.memory_budget is not None:   # the plan measures the load itself, so load through LLM
        from memlm.entrypoints.llm import LLM
        llm = LLM(args.model, memory_budget=args.memory_budget, device=args.device, verbose=False,
                  **args_mod.engine_kwargs(args))
        loaded = llm.loaded
    else:
        from memlm.loading import load_model
        kwargs = {"weight_dtype": args.weight_dtype} if args.weight_dtype not in (None, "auto") else {}
        loaded = load_model(args.model, group_size=args.weight_group_size, **kwargs)
    cfg = loaded.config
    print(f"model:        {args.model}")
    print(f"source:       {loaded.source} ({loaded.format})")
    print(f"architecture: {cfg.arch}: {cfg.depth} layers, hidden {cfg.hidden_size}, "
          f"{cfg.num_heads} heads / {cfg.num_kv_heads} kv heads (head_dim {cfg.head_dim}), "
          f"mlp {cfg.mlp} {cfg.intermediate_size}, {cfg.norm} norm, {cfg.position} positions, "
          f"vocab {cfg.vocab_size}, {'tied' if cfg.tie_word_embeddings else 'untied'} embeddings")
    print(f"parameters:   {loaded.model.num_parameters():,}")
    print(f"weights:      {format_size(loaded.weight_bytes)} as held in memory ({loaded.weight_bytes:,} bytes)")
    model = loaded.model
    by_codec = sorted(model.linear_method.bytes_by_codec(model).items(), key=lambda kv: -kv[1])
    print("  by codec:   " + ", ".join(f"{label} {format_size(n)}" for label, n in by_codec))
    if llm is not None:     # the pool's own codec, scales included
        plan = llm.engine.plan
        print(f"kv cache:     {format_size(plan.block_bytes / plan.block_size)} per token ({plan.kv_dtype})")
    else:
        print(f"kv cache:     {format_size(cfg.kv_bytes_per_token)} per token (fp32)")
    if llm is not None:
        print(f"memory plan (--memory-budget {args.memory_budget}):")
        print(llm.engine.describe_plan())
    return 0


def add_commands(subparsers) -> None:
    i = subparsers.add_parser("info", help="architecture, parameter count and weight bytes of a model")
    args_mod.add_model_args(i)
    i.set_defaults(func=cmd_info)
