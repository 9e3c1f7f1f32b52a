"""What the process holds at each start-up checkpoint of a SmolLM2 chat reply, by kind of mapping.

    python benchmarks/floor.py                      # --memory-budget 1GiB, text drop on and off
    python benchmarks/floor.py --budget 384MiB

Each run is a child process (`memlm.LLM` as `memlm generate --chat` builds it: the embedded Q4_1
file, `--weight-dtype auto`, one sequence), once with MEMLM_TRIM_TEXT=1 (the default: clean
library code pages handed back to the page cache, `memlm/memory/resident.py`) and once with 0.
Columns: RSS, the kernel's peak (VmHWM) and /proc/self/smaps resident MiB per kind (text = code
of shared libraries, lib_ro / lib_rw = their data, heap, anon = anonymous mappings).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KINDS = ("text", "lib_ro", "lib_rw", "heap", "anon")


def child(budget: str) -> None:
    from memlm.memory.budget import current_rss, peak_rss
    from memlm.memory.resident import resident_by_kind

    def row(tag: str) -> None:
        k = resident_by_kind()
        print(f"| {tag} | {current_rss() / 2**20:.0f} | {peak_rss() / 2**20:.0f} | " +
              " | ".join(f"{k[n] / 2**20:.0f}" for n in KINDS) + " |", flush=True)
    row("start (python)")
    import torch  # noqa: F401
    row("after import torch")
    from memlm import LLM, SamplingParams
    row("after import memlm")
    llm = LLM("smollm2-135m-instruct", memory_budget=budget, verbose=False, max_num_seqs=1)
    row("engine built (load, warm-up, profile, plan, KV pool)")
    n = 0
    for _ in llm.stream([{"role": "user", "content": "Tell me about Paris."}],
                        SamplingParams(max_tokens=48, temperature=0, ignore_eos=True), chat=True):
        n += 1
        if n == 24:
            row("during decode (24th chunk)")
    row("reply done")
    p = llm.engine.plan
    print(f"plan: step {p.step_tokens} tokens x {p.step_seqs}, KV pool {p.kv_pool / 2**20:.0f} MiB, "
          f"code pages dropped {p.text_dropped / 2**20:.0f} MiB", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", default="1GiB")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.budget)
        return
    for trim in ("1", "0"):
        print(f"\nMEMLM_TRIM_TEXT={trim}, --memory-budget {args.budget}\n\n| checkpoint | RSS | peak | " +
              " | ".join(KINDS) + " |\n|---|" + "---|" * (2 + len(KINDS)), flush=True)
        subprocess.run([sys.executable, __file__, "--child", "--budget", args.budget], check=True,
                       env=dict(os.environ, PYTHONPATH=str(ROOT), MEMLM_TRIM_TEXT=trim))


if __name__ == "__main__":
    main()
