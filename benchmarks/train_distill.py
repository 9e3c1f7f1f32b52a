"""Acceptance experiment 1: a distilled student vs the same architecture trained with
cross-entropy only, on the same tokens and steps; held-out perplexity next to the teacher's.

Teacher: the embedded SmolLM2-135M (its tokenizer, vocab 49152). Corpus: shakespeare, split by
play; the teacher's top-k logits over the first --windows training windows are cached once
(zstd) and both students train on exactly those windows, in the same order.

    python benchmarks/train_distill.py --stage cache --windows 800 --threads 1   # teacher pass only
    python benchmarks/train_distill.py --windows 800 --steps 300 --threads 1     # CE-only vs distilled

The distilled loss is alpha * T^2 * KL_top-32 (with the "rest" bucket) + beta * CE; the
defaults (T = 1, alpha 1, beta 1) are the setting reported in benchmarks/RESULTS-train.md.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from memlm.loading import load_model
from memlm.models import Transformer
from memlm.models.kv import ContiguousCache
from memlm.training.checkpoint import save_model
from memlm.training.data import WindowSampler, eval_windows, prepare_tokens, tokenizer_fingerprint
from memlm.training.distill import DistillConfig, DistillObjective
from memlm.training.students import count_parameters, init_embedding_from_teacher, init_weights, parse_student
from memlm.training.teacher_cache import CachedTeacherBatches, TeacherCache
from memlm.training.trainer import TrainConfig, Trainer, evaluate_loss


@torch.inference_mode()
def decode_tokens_per_s(model, prompt: list[int], new: int = 64) -> float:
    """Greedy single-sequence decode on the reference path (ContiguousCache), tokens/s."""
    cfg = model.cfg
    cache = ContiguousCache(cfg.num_kv_heads, cfg.head_dim, cfg.depth, len(prompt) + new + 1)
    ids = torch.tensor(prompt)
    cache.begin_step(len(ids))
    h = model.forward(ids, torch.arange(len(ids)), cache)
    cache.end_step()
    nxt = int(model.compute_logits(h[-1:]).argmax())
    t0 = time.perf_counter()
    for i in range(new):
        cache.begin_step(1)
        h = model.forward(torch.tensor([nxt]), torch.tensor([len(prompt) + i]), cache)
        cache.end_step()
        nxt = int(model.compute_logits(h).argmax())
    return new / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--stage", default="all", choices=["cache", "all"])
    ap.add_argument("--student", default="layers=4,hidden=128,heads=4,kv_heads=2,ffn=344")
    ap.add_argument("--windows", type=int, default=240)
    ap.add_argument("--train-windows", type=int, default=None,
                    help="train on only the first N cached windows (a data-limited run; default: all)")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--temperature", type=float, default=1.0,
                    help="distillation temperature (the cache stores the normalizers of T=1 and T=2)")
    ap.add_argument("--alpha", type=float, default=1.0, help="weight of T^2 * KL_top-k in the distilled loss")
    ap.add_argument("--beta", type=float, default=1.0, help="weight of the data CE in the distilled loss")
    ap.add_argument("--init", default="random", choices=["random", "teacher-pca"],
                    help="teacher-pca: start the student's embedding from the teacher's top principal "
                         "directions (see students.init_embedding_from_teacher); both runs use it")
    ap.add_argument("--eval-every", type=int, default=None, help="evaluate every N steps (default: at the end)")
    ap.add_argument("--save", default=None, help="save the distilled student here (fp32 + training state)")
    ap.add_argument("--ship", default=None,
                    help="also write the distilled student here as a self-contained bf16 model directory "
                         "(weights, memlm_config.json, tokenizer), no training state")
    ap.add_argument("--json", default=None)
    ap.add_argument("--runs", default="ce_only,distilled", help="which students to train")
    ap.add_argument("--no-teacher-eval", action="store_true", help="skip the teacher's perplexity (measured once)")
    ap.add_argument("--threads", type=int, default=2, help="1 is faster while other jobs share the 2 cores")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    lm = load_model("smollm2-135m-instruct")
    teacher, tok = lm.model.float().eval(), lm.tokenizer
    splits = prepare_tokens("shakespeare", tok, args.data_dir)
    T = args.seq_len
    t0 = time.perf_counter()
    cache = TeacherCache.build(teacher, splits.train, splits.directory / f"teacher-bench-T{T}-k32-w{args.windows}-lse",
                               seq_len=T, k=32, num_windows=args.windows, chunk_windows=16, batch_size=8,
                               teacher_name="smollm2-135m-instruct", fingerprint=tokenizer_fingerprint(tok),
                               progress=True)
    print(f"teacher cache: {args.windows} windows x {T} = {args.windows * T} tokens, {time.perf_counter() - t0:.0f} s")
    if args.stage == "cache":
        return
    val = eval_windows(splits.val, T, args.eval_tokens)
    results = {"student": args.student, "init": args.init, "train_tokens_available": (args.train_windows or args.windows) * T,
               "eval_tokens": int(val[:, 1:].numel())}
    runs = {"ce_only": (0.0, 1.0), "distilled": (args.alpha, args.beta)}
    results["distill_loss"] = (f"{args.alpha} * T^2 * KL_top32(T={args.temperature}, with rest bucket) "
                               f"+ {args.beta} * CE")
    for name in args.runs.split(","):
        alpha, beta = runs[name]
        torch.manual_seed(0)
        cfg = parse_student(args.student, tok.vocab_size, eos_token_ids=tok.eos_token_ids,
                            bos_token_id=tok.bos_token_id)
        student = Transformer(cfg)
        init_weights(student)
        if args.init == "teacher-pca":
            init_embedding_from_teacher(student, teacher.embed.weight)
        sampler = WindowSampler(splits.train, args.batch_size, T, seed=0, aligned=True,
                                num_windows=args.train_windows or args.windows)
        tcfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, seq_len=T, lr=args.lr, schedule="cosine",
                           warmup=max(1, args.steps // 20), eval_every=args.eval_every or args.steps,
                           eval_tokens=args.eval_tokens, progress=True)
        objective = DistillObjective(DistillConfig(alpha=alpha, beta=beta, temperature=args.temperature))
        batches = CachedTeacherBatches(sampler, cache, temperature=args.temperature)
        trainer = Trainer(student, tcfg, batches, splits.val, objective,
                          out_dir=args.save if (args.save and name == "distilled") else None, tokenizer=tok)
        r = trainer.train()
        loss = evaluate_loss(student, val)
        results[name] = {"val_loss": loss, "val_ppl": math.exp(loss), "steps": r.steps, "tokens": r.tokens,
                         "wall_s": round(r.wall_s, 1), "params": count_parameters(cfg),
                         "weight_bytes": student.weight_bytes(),
                         "curve": [(h["step"], round(h["val_loss"], 4)) for h in r.history],
                         "decode_tok_s": decode_tokens_per_s(student, splits.val[:128].tolist())}
        print(name, json.dumps(results[name]), flush=True)
        if args.json:                                   # after every run: a stopped job keeps its results
            Path(args.json).write_text(json.dumps(results, indent=1))
        if args.ship and name == "distilled":
            ship = save_model(student, args.ship, tok, dtype="bf16")
            print(f"shipped {ship}: {sum(f.stat().st_size for f in ship.iterdir()) / 1e6:.1f} MB "
                  f"(bf16 weights {(ship / 'model.safetensors').stat().st_size / 1e6:.1f} MB)", flush=True)
    if {"distilled", "ce_only"} <= set(results):
        gain = 1 - results["distilled"]["val_ppl"] / results["ce_only"]["val_ppl"]
        results["ppl_reduction"] = gain
        print(f"distilled vs CE-only: held-out perplexity {results['distilled']['val_ppl']:.2f} vs "
              f"{results['ce_only']['val_ppl']:.2f} ({100 * gain:.1f}% lower; target >= 5%)", flush=True)
    if not args.no_teacher_eval:
        t0 = time.perf_counter()
        tl = evaluate_loss(teacher, val, batch_size=4)
        results["teacher"] = {"val_loss": tl, "val_ppl": math.exp(tl), "eval_s": round(time.perf_counter() - t0, 1),
                              "params": teacher.num_parameters(),
                              "decode_tok_s": decode_tokens_per_s(teacher, splits.val[:128].tolist(), new=32)}
        print("teacher", json.dumps(results["teacher"]))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
