"""Acceptance experiment 2: the adaptive (reduce-on-plateau) schedule vs a constant learning
rate vs warmup + cosine (tuned over peak LR) vs WSD, on the same student, tokens and steps.

Protocol: warmup + cosine is tuned over the peak LR (--cosine-lrs); constant, adaptive and WSD
then use the tuned peak LR. Targets: adaptive reaches a target validation loss in fewer steps
than constant, and ends within 1% of the tuned cosine run. The target is the constant run's
best validation loss.

    python benchmarks/train_schedules.py --threads 1      # 1200 steps, 6 runs of ~90 s on one thread

Adaptive = reduce-on-plateau: halve the LR after `--plateau-patience` evaluations (every
`--eval-every` steps) that fail to improve the best validation loss by `--plateau-threshold`.
"""
from __future__ import annotations

import argparse
import json
import math
from dataclasses import replace
from pathlib import Path

from train_common import describe, header, setup, train_student

from memlm.training.trainer import TrainConfig


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--student", default="layers=2,hidden=64,heads=2,kv_heads=1,ffn=172")
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--cosine-lrs", default="2.5e-3,5e-3,1e-2",
                    help="peak LRs tried for warmup + cosine; the best one is used by the other schedules")
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--plateau-threshold", default="0.005",
                    help="adaptive: halve the LR when an evaluation improves less than this (relative); "
                         "a comma list runs one adaptive variant per value")
    ap.add_argument("--plateau-patience", type=int, default=2)
    ap.add_argument("--eval-tokens", type=int, default=16384)
    ap.add_argument("--runs", default=None, help="comma list of constant,adaptive,wsd to run (default: all)")
    ap.add_argument("--seed", type=int, default=0, help="init and batch-order seed")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    tok, splits = setup(args.threads)
    print(header())
    print(f"student {describe(args.student, tok)}; {len(splits.train)} train / {len(splits.val)} val tokens")
    base = TrainConfig(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=3e-3,
                       warmup=args.steps // 20, eval_every=args.eval_every, eval_tokens=args.eval_tokens,
                       plateau_patience=args.plateau_patience, plateau_factor=0.5)
    # 1) tune warmup + cosine over the peak LR; 2) run the others at the tuned peak LR
    results = {}

    def run(name, cfg):
        _, r = train_student(args.student, tok, splits, cfg, seed=args.seed)
        results[name] = {"lr": cfg.lr, "final_val_loss": r.final_val_loss,
                         "lr_cuts_at": [h["step"] for h in r.history if h.get("lr_cut")],
                         "best_val_loss": min(h["val_loss"] for h in r.history),
                         "curve": [(h["step"], h["val_loss"], h["lr"]) for h in r.history],
                         "steps": r.steps, "tokens": r.tokens, "wall_s": round(r.wall_s, 1)}
        print(f"{name:14s} peak lr {cfg.lr:.1e}: final val loss {r.final_val_loss:.4f} "
              f"(ppl {math.exp(r.final_val_loss):.2f}), {r.steps} steps, {r.tokens} tokens, {r.wall_s:.0f} s",
              flush=True)
        if args.json:                      # after every run: a stopped job keeps what it measured
            Path(args.json).write_text(json.dumps({"runs": results}, indent=1))
    for lr in args.cosine_lrs.split(","):
        run(f"cosine@{lr}", replace(base, schedule="cosine", lr=float(lr), min_ratio=0.1))
    best_lr = min((v for n, v in results.items() if n.startswith("cosine")),
                  key=lambda v: v["final_val_loss"])["lr"]
    thresholds = [float(t) for t in args.plateau_threshold.split(",")]
    variants = {"constant": replace(base, schedule="constant"),
                **{f"adaptive@{t:g}": replace(base, schedule="adaptive", plateau_threshold=t) for t in thresholds},
                "wsd": replace(base, schedule="wsd", min_ratio=0.0)}
    for name, cfg in variants.items():
        if not args.runs or name.split("@")[0] in args.runs.split(","):
            run(name, replace(cfg, lr=best_lr))
    adaptive = [n for n in results if n.startswith("adaptive")]
    if not ("constant" in results and adaptive):
        return
    # the target, fixed before looking at the other runs: the constant-LR run's best validation loss
    target = results["constant"]["best_val_loss"]

    def steps_to(name):
        return next((s for s, v, _ in results[name]["curve"] if v <= target), None)
    cos_name = min((n for n in results if n.startswith("cosine")), key=lambda n: results[n]["final_val_loss"])
    cos = results[cos_name]["final_val_loss"]
    for name in results:
        results[name]["steps_to_target"] = steps_to(name)
    print(f"target val loss {target:.4f} (constant's best): steps to reach it — " +
          ", ".join(f"{n} {results[n]['steps_to_target']}" for n in results))
    for name in adaptive:
        ad = results[name]["final_val_loss"]
        print(f"{name} final {ad:.4f} vs tuned {cos_name} {cos:.4f}: {100 * (ad / cos - 1):+.2f}% (target within 1%); "
              f"steps to target {results[name]['steps_to_target']} vs constant {results['constant']['steps_to_target']}")
    if args.json:
        Path(args.json).write_text(json.dumps({"target": target, "tuned_cosine": cos_name, "runs": results}, indent=1))


if __name__ == "__main__":
    main()
