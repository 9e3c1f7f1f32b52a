"""`memlm train`, `memlm distill` and `memlm eval`: argument parsing and the glue between
loading, data, students, the trainer and online learning.

Owns: the command-line surface of training. Does not know: the math (it calls the modules of
this package) or how models are read (`memlm.loading.load_model`).
Handlers take the parsed `args` and return an exit code; user errors raise `MemlmError`.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

from memlm.errors import MemlmError

DEFAULT_TEACHER = "smollm2-135m-instruct"


def _load(name: str):
    from memlm.loading import load_model        # imported late: loading pulls in gguf etc.
    return load_model(name)


def _add_train_args(p: argparse.ArgumentParser, steps: int, lr: float) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--corpus", default="shakespeare",
                   help="shakespeare | bible | pydocs | a text file | a directory of .txt files")
    g.add_argument("--data-dir", default=None, help="token/teacher cache root (default ~/.cache/memlm/data)")
    g.add_argument("--val-fraction", type=float, default=0.1, help="share of documents held out")
    g.add_argument("--steps", type=int, default=steps)
    g.add_argument("--batch-size", type=int, default=8)
    g.add_argument("--seq-len", type=int, default=256)
    g.add_argument("--accum", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--lr", type=float, default=lr)
    g.add_argument("--schedule", default="cosine", choices=["constant", "cosine", "wsd", "adaptive"])
    g.add_argument("--warmup", type=int, default=20)
    g.add_argument("--plateau-patience", type=int, default=2,
                   help="adaptive: evaluations without enough progress before the LR is halved")
    g.add_argument("--plateau-threshold", type=float, default=0.01,
                   help="adaptive: relative validation-loss improvement per evaluation that counts as progress")
    g.add_argument("--weight-decay", type=float, default=0.1)
    g.add_argument("--clip", type=float, default=1.0)
    g.add_argument("--eval-every", type=int, default=50)
    g.add_argument("--eval-tokens", type=int, default=16384)
    g.add_argument("--checkpoint-every", type=int, default=0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--out", default=None, help="checkpoint directory (a model dir `memlm generate --model` reads)")
    g.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    g.add_argument("--export-hf", default=None, help="also write a transformers-readable copy here")
    g.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")


def _train_config(args):
    from memlm.training.trainer import TrainConfig
    return TrainConfig(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, accum=args.accum,
                       lr=args.lr, schedule=args.schedule, warmup=args.warmup, weight_decay=args.weight_decay,
                       plateau_patience=args.plateau_patience, plateau_threshold=args.plateau_threshold,
                       clip=args.clip, eval_every=args.eval_every, eval_tokens=args.eval_tokens,
                       checkpoint_every=args.checkpoint_every, seed=args.seed)


def add_commands(subparsers) -> None:
    """Register train, distill and eval on the main CLI's subparsers."""
    p = subparsers.add_parser("train", help="train a student from scratch or a model online from a stream")
    p.add_argument("--student", default="tiny", help="preset or spec, e.g. layers=6,hidden=256,heads=4,mixers=AR,share=repeat2")
    p.add_argument("--model", default=None, help="start from this model (name or dir) instead of a new student")
    p.add_argument("--tokenizer", default=DEFAULT_TEACHER,
                   help="tokenizer of a new student: a model name/dir, or bpe:N to train an N-token BPE")
    _add_train_args(p, steps=500, lr=3e-3)
    o = p.add_argument_group("online learning")
    o.add_argument("--online", action="store_true", help="test-then-train on a text stream (needs --model)")
    o.add_argument("--stream", default="-", help="a file being appended to, or - for stdin")
    o.add_argument("--max-chunks", type=int, default=None)
    o.add_argument("--chunk-chars", type=int, default=4000)
    o.add_argument("--poll-s", type=float, default=0.5)
    o.add_argument("--max-wait-s", type=float, default=5.0, help="stop after this long without new text")
    o.add_argument("--steps-per-chunk", type=int, default=4)
    o.add_argument("--replay-windows", type=int, default=512)
    o.add_argument("--replay-fraction", type=float, default=0.875, help="share of each batch replayed")
    o.add_argument("--online-lr", type=float, default=1e-5,
                   help="peak LR of online updates (benchmarks/RESULTS-train.md: 1e-5 kept forgetting < 2%%)")
    o.add_argument("--replay-corpus", default=None, help="seed the replay buffer with this corpus's train split")
    p.set_defaults(func=cmd_train)

    d = subparsers.add_parser("distill", help="distill a teacher into a smaller student")
    d.add_argument("--teacher", default=DEFAULT_TEACHER)
    d.add_argument("--student", default=None, help="preset or spec (vocabulary is the teacher's)")
    d.add_argument("--init", default=None, help="start the student from this model (must share the tokenizer)")
    d.add_argument("--fit", default=None, help="pick the largest student whose weights + KV fit, e.g. 64MiB")
    d.add_argument("--fit-context", type=int, default=2048, help="tokens of KV (batch 1) --fit reserves")
    d.add_argument("--weight-dtype", default="fp32", help="bytes per weight assumed by --fit")
    d.add_argument("--plan", action="store_true", help="print the student that would be trained and exit")
    d.add_argument("--alpha", type=float, default=1.0, help="weight of KL(teacher||student) at temperature T")
    d.add_argument("--beta", type=float, default=1.0, help="weight of cross-entropy on the data")
    d.add_argument("--gamma", type=float, default=0.0, help="weight of the projected hidden-state cosine")
    d.add_argument("--temperature", type=float, default=1.0, help="KL temperature (T=1 measured best)")
    d.add_argument("--reverse-kl", action="store_true", help="KL(student||teacher) (MiniLLM) instead")
    d.add_argument("--top-k", type=int, default=32, help="teacher logits kept per position in the cache")
    d.add_argument("--no-cache", action="store_true", help="run the teacher live on full logits")
    d.add_argument("--cache-dir", default=None, help="teacher cache (default: under --data-dir)")
    d.add_argument("--teacher-windows", type=int, default=None,
                   help="windows of --seq-len the teacher pass covers (default: all training tokens)")
    _add_train_args(d, steps=500, lr=2e-3)
    d.set_defaults(func=cmd_distill)

    e = subparsers.add_parser("eval", help="perplexity of a model on a text file")
    e.add_argument("--model", required=True)
    e.add_argument("--text-file", required=True)
    e.add_argument("--context", type=int, default=512)
    e.add_argument("--stride", type=int, default=None, help="window step (default: = context)")
    e.add_argument("--max-tokens", type=int, default=None, help="score only the first N tokens")
    e.set_defaults(func=cmd_eval)


def cmd_eval(args) -> int:
    import torch

    from memlm.training.evaluate import perplexity
    path = Path(args.text_file)
    if not path.is_file():
        raise MemlmError(f"--text-file {path} does not exist")
    lm = _load(args.model)
    ids = lm.tokenizer.encode(path.read_text(encoding="utf-8", errors="replace"))[:args.max_tokens]
    with torch.inference_mode():
        r = perplexity(lm.model, ids, context=args.context, stride=args.stride)
    print(f"{args.model} on {path.name}: perplexity {r.ppl:.3f} (nll {r.nll:.4f} nats/token over "
          f"{r.tokens} tokens, context {args.context}, stride {args.stride or args.context})")
    return 0


def _tokenizer(spec: str, corpus: str):
    from memlm.training.data import TextTokenizer, load_corpus, split_documents
    if spec.startswith("bpe:"):
        train_docs, _ = split_documents(load_corpus(corpus))
        return TextTokenizer.train([d.text for d in train_docs], int(spec[4:]))
    if Path(spec, "tokenizer.json").is_file() and not Path(spec, "memlm_config.json").exists() \
            and not Path(spec, "config.json").exists():
        return TextTokenizer.from_file(Path(spec, "tokenizer.json"))
    return _load(spec).tokenizer


def _finish(trainer, args, tokenizer, label: str) -> None:
    from memlm.training import checkpoint
    r = trainer.result
    val = r.final_val_loss
    print(f"{label}: {r.steps} steps, {r.tokens} tokens, {r.wall_s:.0f} s; "
          f"validation loss {val:.4f} (perplexity {math.exp(min(val, 50)):.2f})")
    if args.out:
        print(f"saved {args.out} (run it: memlm generate --model {args.out})")
    if args.export_hf:
        checkpoint.export_hf(trainer.model, args.export_hf, tokenizer)
        print(f"exported a transformers copy to {args.export_hf}")


def cmd_train(args) -> int:
    import torch

    from memlm.models import Transformer
    from memlm.training.data import WindowSampler, prepare_tokens
    from memlm.training.students import init_weights, parse_student
    from memlm.training.trainer import Trainer
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.online:
        return _cmd_online(args)
    torch.manual_seed(args.seed)
    if args.model:
        lm = _load(args.model)
        model, tok = lm.model.float().requires_grad_(True), lm.tokenizer
    else:
        tok = _tokenizer(args.tokenizer, args.corpus)
        cfg = parse_student(args.student, tok.vocab_size, eos_token_ids=tuple(getattr(tok, "eos_token_ids", ())),
                            bos_token_id=getattr(tok, "bos_token_id", None))
        model = Transformer(cfg)
        init_weights(model)
    splits = prepare_tokens(args.corpus, tok, args.data_dir, args.val_fraction)
    sampler = WindowSampler(splits.train, args.batch_size, args.seq_len, seed=args.seed)
    trainer = Trainer(model, _train_config(args), sampler, splits.val, out_dir=args.out, tokenizer=tok)
    if args.resume:
        if not args.out:
            raise MemlmError("--resume needs --out (the checkpoint to continue)")
        trainer.resume(args.out)
    print(f"training {model.num_parameters() / 1e6:.2f}M params on {len(splits.train)} tokens "
          f"({args.corpus}), validating on {len(splits.val)}")
    trainer.train()
    _finish(trainer, args, tok, "train")
    return 0


def _cmd_online(args) -> int:
    from memlm.training import checkpoint
    from memlm.training.data import prepare_tokens
    from memlm.training.online import OnlineConfig, OnlineLearner, stream_chunks
    if not args.model:
        raise MemlmError("--online needs --model: the model to keep training (e.g. a --out of `memlm train`)")
    lm = _load(args.model)
    replay = prepare_tokens(args.replay_corpus, lm.tokenizer, args.data_dir).train if args.replay_corpus else None
    cfg = OnlineConfig(lr=args.online_lr, warmup=4, steps_per_chunk=args.steps_per_chunk,
                       batch_size=args.batch_size, seq_len=args.seq_len, replay_windows=args.replay_windows,
                       replay_fraction=args.replay_fraction, seed=args.seed)
    learner = OnlineLearner(lm.model.float().requires_grad_(True), lm.tokenizer, cfg, replay)
    for i, chunk in enumerate(stream_chunks(args.stream, args.chunk_chars, args.poll_s, args.max_wait_s,
                                            args.max_chunks)):
        r = learner.process(chunk)
        if r["tokens"]:
            print(f"chunk {i}: {r['tokens']} tokens, test ppl {math.exp(r['test_nll']):.2f} vs frozen "
                  f"{math.exp(r['frozen_nll']):.2f}{' (LR re-warmed)' if r['rewarmed'] else ''}", flush=True)
    rep = learner.report
    if rep.tokens == 0:
        raise MemlmError(f"the stream {args.stream!r} gave no text")
    print(f"online: {rep.chunks} chunks, {rep.tokens} tokens, {rep.steps} steps: test-then-train perplexity "
          f"{rep.ppl_model:.3f} vs frozen {rep.ppl_frozen:.3f} ({100 * (1 - rep.ppl_model / rep.ppl_frozen):+.1f}%)")
    if args.out:
        checkpoint.save_model(learner.model, args.out, lm.tokenizer)
        print(f"saved {args.out}")
    return 0


def cmd_distill(args) -> int:
    import torch

    from memlm.training import distill_run
    if args.threads:
        torch.set_num_threads(args.threads)
    return distill_run.run(args)
