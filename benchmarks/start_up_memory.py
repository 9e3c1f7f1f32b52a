"""What one memlm process holds at each point of its start-up and while it decodes: RSS and the
resident bytes per kind of mapping (`memlm.memory.resident`), for a chat reply on the embedded
SmolLM2 (the same steps as `memlm generate --chat`, taken one at a time so each can be measured).

    python benchmarks/start_up_memory.py                          # --weight-dtype auto, 384MiB
    python benchmarks/start_up_memory.py --weight-dtype int8 --memory-budget 448MiB
    MEMLM_TRIM_TEXT=0 python benchmarks/start_up_memory.py        # without dropping code pages
    python benchmarks/start_up_memory.py --memory-budget 1GiB --batch-tokens 512 --kv-blocks 32
                                                  # single_stream.py's memlm settings
    python benchmarks/start_up_memory.py --model ~/.cache/memlm/bench/SmolLM2-135M-Instruct.Q4_1.Q8_0.gguf \
        --memory-budget 1GiB --batch-tokens 512 --kv-blocks 32    # its Q8_0 copy

Checkpoints: the interpreter alone, after `import torch`, after importing memlm, after the
budget's baseline (`MemoryBudget.create`, which hands clean library code back to the page
cache), after loading the weights and the tokenizer, after the engine's start-up (warm-up,
profile, plan, KV pool), in the middle of the reply, and at its end. "phase peak" is the kernel's
high-water mark (VmHWM) since the row before (reset after each row; the engine's own resets inside
a phase can hide part of it), and the last row is the process's peak across every reset.
Kinds: text (code of shared libraries), lib_ro / lib_rw (their read-only / writable data),
file_shared (shared file maps), heap, anon (anonymous maps: tensors, thread stacks, arenas),
stack, other. Runs in a fresh child process so the parent's imports are not in the figures.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MiB = 2**20


def child(args) -> None:
    sys.path.insert(0, str(ROOT))
    from memlm.memory.resident import resident_by_kind   # stdlib only: measures nothing itself
    rows: list[tuple[str, int, dict]] = []

    def mark(name: str) -> None:
        with open("/proc/self/status") as f:
            status = {k: int(v.split()[0]) * 1024 for k, _, v in (line.partition(":") for line in f)
                      if k in ("VmRSS", "VmHWM")}
        rows.append((name, status["VmRSS"], status["VmHWM"], resident_by_kind()))
        with open("/proc/self/clear_refs", "w") as f:    # the next row's peak is its phase's own
            f.write("5")

    mark("interpreter")
    import torch  # noqa: F401
    mark("import torch")
    from memlm.engine.config import EngineConfig
    from memlm.engine.llm_engine import LLMEngine
    from memlm.loading import estimate_load_bytes, load_model
    from memlm.memory import budget as mem
    from memlm.runtime import configure_process
    from memlm.sampling import SamplingParams
    from memlm.engine.request import Request
    mark("import memlm")
    configure_process(args.threads)
    budget = mem.MemoryBudget.create(args.memory_budget, verbose=False)
    mark("budget baseline")
    name = args.model
    weight_dtype = args.weight_dtype
    if weight_dtype == "auto":
        from memlm.loading import native_weight_dtype
        weight_dtype = native_weight_dtype(name) or "bf16"
    options = {"small_batches": True} if weight_dtype == "bf16" else {}   # as LLM(max_num_seqs=1)
    with budget.loading():
        budget.check_load_fits(*estimate_load_bytes(name, weight_dtype, **options), what=name)
        loaded = load_model(name, weight_dtype=weight_dtype, **options)
    mark("weights + tokenizer")
    knobs = {k: v for k, v in (("max_num_batched_tokens", args.batch_tokens), ("num_kv_blocks", args.kv_blocks))
             if v is not None}
    cfg = EngineConfig(max_model_len=loaded.config.max_position_embeddings, max_num_seqs=1, **knobs)
    from memlm.engine.runner import ModelRunner
    warm_up, warm = ModelRunner.warm_up, {}

    def measured_warm_up(runner, *a):      # the engine's start-up peak is its warm-up's or its profile's
        with mem.phase_peak() as phase:
            warm["before"] = mem.current_rss()
            warm_up(runner, *a)
        warm["peak"], warm["after"] = phase.peak, mem.current_rss()
    ModelRunner.warm_up = measured_warm_up
    engine = LLMEngine(loaded.model, cfg, budget, "cpu", verbose=True)
    mark("engine start-up")
    tok = loaded.tokenizer
    text = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    params = SamplingParams(temperature=0, max_tokens=args.new_tokens, ignore_eos=True)
    engine.add_request(Request("0", text, tok.encode(text), params, tok))
    steps = 0
    while engine.has_unfinished():
        engine.step()
        steps += 1
        if steps == args.new_tokens // 2:
            mark("mid-reply (decode)")
    mark("reply done")
    peak = max(mem.peak_rss(), *(hwm for _, _, hwm, _ in rows))   # each row reset the mark
    print(json.dumps({"rows": rows, "peak": peak, "weight_dtype": weight_dtype, "warm_up": warm,
                      "plan": engine.describe_plan()}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct", help="a preset or a model path")
    ap.add_argument("--weight-dtype", default="auto")
    ap.add_argument("--memory-budget", default="384MiB")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batch-tokens", type=int, default=None, help="max_num_batched_tokens (engine default)")
    ap.add_argument("--kv-blocks", type=int, default=None, help="num_kv_blocks (default: the plan's)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    cmd = [sys.executable, __file__, "--child", "--model", args.model, "--weight-dtype", args.weight_dtype, "--memory-budget",
           args.memory_budget, "--threads", str(args.threads), "--new-tokens", str(args.new_tokens)]
    cmd += [a for k, v in (("--batch-tokens", args.batch_tokens), ("--kv-blocks", args.kv_blocks)) if v is not None
            for a in (k, str(v))]
    out = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    if out.returncode != 0:
        sys.exit(f"error: the measured process failed:\n{out.stderr.strip()}")
    res = json.loads(out.stdout.strip().splitlines()[-1])
    kinds = list(res["rows"][0][3])
    trim = os.environ.get("MEMLM_TRIM_TEXT", "1")
    print(f"# start-up memory: SmolLM2 chat, --weight-dtype {args.weight_dtype} ({res['weight_dtype']}), "
          f"--memory-budget {args.memory_budget}, step {args.batch_tokens or 'default'}, "
          f"KV blocks {args.kv_blocks or 'planned'}, {args.threads} threads, MEMLM_TRIM_TEXT={trim}; MiB")
    print(f"| checkpoint | RSS | phase peak | " + " | ".join(kinds) + " |")
    print("|---|---:|---:|" + "---:|" * len(kinds))
    for name, rss, hwm, by_kind in res["rows"]:
        print(f"| {name} | {rss / MiB:.1f} | {hwm / MiB:.1f} | " +
              " | ".join(f"{by_kind[k] / MiB:.1f}" for k in kinds) + " |")
    print(f"| peak of the process | | {res['peak'] / MiB:.1f} |" + " |" * len(kinds))
    w = res["warm_up"]
    print(f"engine warm-up (inside its start-up): RSS {w['before'] / MiB:.1f} -> peak {w['peak'] / MiB:.1f} "
          f"-> {w['after'] / MiB:.1f} MiB; the profile's step workspace is in the plan below")
    print("memory plan:\n" + res["plan"])


if __name__ == "__main__":
    main()
