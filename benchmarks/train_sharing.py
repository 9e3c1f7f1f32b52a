"""Acceptance experiment 3: cross-layer sharing. A 1-layer model, the same block run at every
depth of an N-deep stack (ALBERT, same parameters as 1 layer), in-place repetition (MobileLLM:
N/2 unique blocks each run twice), and the unshared N-layer model; same tokens and steps.

Target: the fully shared model closes >= 50% of the validation-loss gap between the 1-layer
and the unshared model.

    python benchmarks/train_sharing.py --depth 6 --steps 300 --threads 1
    # the run that meets it (RESULTS-train.md 3a): every model's best block LR at 900 steps is 1e-3
    python benchmarks/train_sharing.py --threads 1 --steps 900 --layer-lr-scale 0.33333333 \
        --variants 1-layer,shared-all,unshared

A variant name may carry per-depth extras for its shared blocks after "+" (the student spec's
`per_depth`): `shared-all+norms`, `shared-all+norms+gates`, ...
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from train_common import describe, header, setup, train_student

from memlm.training.trainer import TrainConfig


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--width", default="hidden=128,heads=4,kv_heads=2,ffn=344")
    ap.add_argument("--depth", type=int, default=6)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--shared-lr-scale", action="store_true",
                    help="train a block run at n depths at lr/n (all variants; no-op without sharing)")
    ap.add_argument("--layer-lr-scale", type=float, default=1.0,
                    help="lr multiplier of every layer block (embedding and final norm keep --lr)")
    ap.add_argument("--seed", type=int, default=0, help="init and batch-order seed")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--variants", default="1-layer,shared-all,repeat2,unshared",
                    help="comma-separated; NAME+norms+gates adds per-depth extras to NAME")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    tok, splits = setup(args.threads)
    print(header())
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr,
                      schedule="cosine", warmup=args.steps // 20, eval_every=args.steps, eval_tokens=16384,
                      shared_lr_scale=args.shared_lr_scale, layer_lr_scale=args.layer_lr_scale)
    d = args.depth
    specs = {"1-layer": f"layers=1,{args.width}", "shared-all": f"layers={d},share=all,{args.width}",
             "repeat2": f"layers={d},share=repeat2,{args.width}", "unshared": f"layers={d},{args.width}"}
    runs = {}
    for name in args.variants.split(","):          # all checked before the first (long) run
        base, *extras = name.split("+")
        if base not in specs:
            ap.error(f"unknown variant {name!r}: use one of {sorted(specs)}, optionally +norms+gates")
        runs[name] = specs[base] + (f",per_depth={'+'.join(extras)}" if extras else "")
        describe(runs[name], tok)                   # raises on a bad per_depth extra
    results = {}
    for name, spec in runs.items():
        _, r = train_student(spec, tok, splits, cfg, seed=args.seed)
        results[name] = {"spec": describe(spec, tok), "lr": args.lr, "shared_lr_scale": args.shared_lr_scale,
                         "layer_lr_scale": args.layer_lr_scale,
                         "val_loss": r.final_val_loss, "steps": r.steps,
                         "tokens": r.tokens, "wall_s": round(r.wall_s, 1)}
        print(f"{name:11s} {describe(spec, tok)}: val loss {r.final_val_loss:.4f} "
              f"(ppl {math.exp(r.final_val_loss):.2f}), {r.steps} steps, {r.tokens} tokens, {r.wall_s:.0f} s", flush=True)
    if {"1-layer", "unshared"} <= set(results):
        one, full = results["1-layer"]["val_loss"], results["unshared"]["val_loss"]
        for name in (n for n in results if n not in ("1-layer", "unshared")):
            closed = (one - results[name]["val_loss"]) / (one - full) if one != full else math.nan
            results[name]["gap_closed"] = closed
            print(f"{name} closes {100 * closed:.0f}% of the 1-layer -> unshared gap (target >= 50% for shared-all)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
