"""`memlm bench --plot memory.png`: where the memory went, step by step, drawn with matplotlib.

Owns: the timeline workload (chat sessions sharing a system prompt, turn after turn, mixed with
one-off prompts that push the pool), sampling the engine after every step (`sample`: measured
RSS, hot KV blocks in use, cached-prefix blocks, the warm tier's bytes, the cold tier's files)
beside the memory plan's fixed parts (runtime + weights, matmul state + step workspace), and
the figure: stacked memory against the budget on top, disk against the disk budget below.
Does not know: how the engine schedules or moves KV (it only reads `engine.plan`, `engine.kv`,
`engine.offload` and `memlm.memory.budget.current_rss`).

    for each turn: every conversation's next turn (session_id) + one-off prompts
        engine.step() -> sample() -> ... -> draw(samples) -> PNG
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time

from memlm.entrypoints.cli import args as args_mod
from memlm.errors import MemlmError

SYSTEM = "You are a concise assistant. Answer in one or two sentences, with one concrete example."
TOPICS = ("rivers", "volcanoes", "bread", "bridges", "owls", "comets", "glass", "tea", "maps", "bees")
MiB = 1 << 20
# Stacked in this order, bottom first: (sample key, label, colour).
LAYERS = (("resident", "runtime + weights", "#7f7f7f"), ("workspace", "matmul state + workspace", "#bcbd22"),
          ("hot", "hot KV (in use)", "#d62728"), ("prefix", "prefix cache (evictable)", "#ff7f0e"),
          ("pool_free", "KV pool, free", "#f7c6c7"), ("warm", "warm tier (zstd in RAM)", "#1f77b4"))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="memlm bench --plot", description=__doc__.split("\n")[0])
    p.add_argument("--plot", required=True, metavar="PNG", help="where to write the figure")
    args_mod.add_model_args(p)
    p.add_argument("--conversations", type=int, default=4, help="chat sessions (default %(default)s)")
    p.add_argument("--turns", type=int, default=3, help="turns per session (default %(default)s)")
    p.add_argument("--one-off", type=int, default=4,
                   help="one-off prompts submitted with each turn (default %(default)s)")
    p.add_argument("--max-tokens", type=int, default=16, help="tokens per reply (default %(default)s)")
    return p


def sample(engine, t0: float) -> dict:
    """One point of the timeline: bytes held by each part right after a step."""
    from memlm.memory import budget as mem
    plan, kv, off = engine.plan, engine.kv, engine.offload
    evictable = kv.cache.num_evictable if kv.cache is not None else 0
    used = kv.num_used_blocks
    return dict(t=time.perf_counter() - t0, rss=mem.current_rss(),
                resident=plan.baseline + plan.load_overhead, workspace=plan.matmul_state + plan.workspace,
                hot=used * plan.block_bytes, prefix=evictable * plan.block_bytes,
                pool_free=(kv.num_blocks - used - evictable) * plan.block_bytes,
                warm=off.warm.nbytes if off is not None and off.warm is not None else 0,
                cold=off.cold.nbytes if off is not None and off.cold is not None else 0)


def run_timeline(llm, conversations: int, turns: int, one_off: int, max_tokens: int) -> list[dict]:
    """Run the workload on `llm`'s engine, sampling after every step."""
    from memlm.sampling import SamplingParams
    engine = llm.engine
    if getattr(engine, "plan", None) is None or getattr(engine, "kv", None) is None:
        raise MemlmError("--plot needs the paged engine (the reference engine keeps no KV pool)")
    sp = SamplingParams(temperature=0, max_tokens=max_tokens)
    ids = [f"plot-{c}" for c in range(conversations)] if engine.offload is not None else None
    history = [[{"role": "system", "content": SYSTEM}] for _ in range(conversations)]
    samples, t0 = [sample(engine, time.perf_counter())], time.perf_counter()
    for turn in range(turns):
        for c, msgs in enumerate(history):
            msgs.append({"role": "user", "content": f"Tell me fact {turn + 1} about {TOPICS[c % len(TOPICS)]}."})
        items = [llm.processor.chat(m, i) for i, m in enumerate(history)]
        items += [llm.processor.prompt(f"One-off question {turn}-{k}: describe {TOPICS[k % len(TOPICS)]} "
                                       "in detail. " * 4, len(items) + k) for k in range(one_off)]
        requests = llm.processor.make_requests(items, sp)
        for i, r in enumerate(requests):
            r.session_id = ids[i] if ids is not None and i < conversations else None
            engine.add_request(r)
        while engine.has_unfinished():
            engine.step()
            samples.append(sample(engine, t0))
        for c in range(conversations):
            out = requests[c].to_output()
            history[c].append({"role": "assistant", "content": out.outputs[0].text})
    return samples


def draw(samples: list[dict], path: str, budget: int | None, disk_budget: int | None) -> None:
    """Stacked memory per step against the budget (top) and the cold tier's disk use (bottom)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    steps = list(range(len(samples)))
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 7), sharex=True,
                                      gridspec_kw={"height_ratios": [3, 1]})
    top.stackplot(steps, *[[s[k] / MiB for s in samples] for k, _, _ in LAYERS],
                  labels=[label for _, label, _ in LAYERS], colors=[c for _, _, c in LAYERS], alpha=0.85)
    top.plot(steps, [s["rss"] / MiB for s in samples], color="black", lw=1.2, label="measured RSS")
    if budget:
        top.axhline(budget / MiB, color="crimson", ls="--", lw=1.5, label="memory budget")
    top.set_ylabel("MiB")
    top.set_title("memlm memory by tier, sampled after every engine step")
    top.legend(loc="upper left", fontsize=8, ncol=2)
    cold = [s["cold"] / MiB for s in samples]
    bottom.plot(steps, cold, color="#9467bd", label="cold tier (disk)")
    if disk_budget and disk_budget / MiB <= 4 * max(max(cold), 1e-9):
        bottom.axhline(disk_budget / MiB, color="crimson", ls="--", lw=1.0, label="disk budget")
    elif disk_budget:          # far above the data: name it rather than flatten the curve
        bottom.set_title(f"disk budget {disk_budget / MiB:.0f} MiB (off the scale)", fontsize=9)
    bottom.set_ylabel("MiB on disk")
    bottom.set_xlabel("engine step")
    bottom.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary(samples: list[dict], budget: int | None) -> str:
    """A few lines: the largest value each part reached."""
    rows = [("measured RSS", "rss"), *((label, k) for k, label, _ in LAYERS), ("cold tier (disk)", "cold")]
    lines = [f"  {label:<28}{max(s[k] for s in samples) / MiB:>10.1f} MiB (max)" for label, k in rows]
    if budget:
        lines.insert(0, f"  {'memory budget':<28}{budget / MiB:>10.1f} MiB")
    return "\n".join(lines)


def cmd_plot(argv: list[str]) -> int:
    """`memlm bench --plot PNG [model flags] [--conversations N --turns T --one-off K]`."""
    args = parser().parse_args(argv)
    if min(args.conversations, args.turns, args.max_tokens) < 1 or args.one_off < 0:
        raise MemlmError("--conversations, --turns and --max-tokens must be >= 1, --one-off >= 0")
    if not args.plot.lower().endswith((".png", ".svg", ".pdf")):
        raise MemlmError(f"--plot {args.plot}: give a file name ending in .png, .svg or .pdf")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise MemlmError("--plot needs matplotlib: pip install 'memlm[plot]'") from None
    tmp = None
    if args.session_dir is None:
        tmp = args.session_dir = tempfile.mkdtemp(prefix="memlm-plot-")
    if args.warm_fraction is None:
        args.warm_fraction = 0.2
    try:
        llm = args_mod.make_llm(args, num_seqs=args.conversations + args.one_off)
        samples = run_timeline(llm, args.conversations, args.turns, args.one_off, args.max_tokens)
        plan, off = llm.engine.plan, llm.engine.offload
        disk = off.cold.capacity if off is not None and off.cold is not None else None
        if disk is not None:
            off.cold.flush()              # its writer is done before the directory goes
        draw(samples, args.plot, plan.total, disk)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"wrote {args.plot}: {len(samples) - 1} steps\n{summary(samples, plan.total)}")
    return 0
