"""Generation speed of trained students vs the teacher through memlm's engine (LLM.generate):
greedy, one sequence, a short prompt, `--new` tokens with EOS ignored. Prints a sample too.

    python benchmarks/train_genspeed.py /tmp/bench/distilled-student --threads 1 --new 64 --memory-budget 2GiB

One model per invocation gives the cleanest memory picture (each LLM reserves KV up to its budget).
"""
from __future__ import annotations

import argparse
import gc
import time

import torch

from memlm import LLM, SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("models", nargs="+")
    ap.add_argument("--prompt", default="ROMEO.\nWhat light through yonder window")
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--engine", default="paged", choices=["paged", "reference"])
    ap.add_argument("--memory-budget", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    for name in args.models:
        llm = LLM(name, memory_budget=args.memory_budget, engine=args.engine, verbose=False)
        params = SamplingParams(temperature=0.0, max_tokens=args.new, ignore_eos=True)
        llm.generate(args.prompt, SamplingParams(temperature=0.0, max_tokens=4), use_tqdm=False)  # warm-up
        t0 = time.perf_counter()
        out = llm.generate(args.prompt, params, use_tqdm=False)[0].outputs[0]
        dt = time.perf_counter() - t0
        print(f"{name}: {len(out.token_ids)} tokens in {dt:.2f} s = {len(out.token_ids) / dt:.1f} tokens/s "
              f"(batch 1, greedy, {args.engine} engine, {torch.get_num_threads()} threads)")
        print("  sample:", repr(out.text[:200]))
        del llm                      # the engine reserves KV up to its budget: free it first
        gc.collect()


if __name__ == "__main__":
    main()
