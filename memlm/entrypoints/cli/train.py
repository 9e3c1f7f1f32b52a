"""`memlm train`, `memlm distill` and `memlm eval`: flags -> typed run configs -> the pipelines.

Owns: the command-line surface of training: the flags (their defaults and help read the run
configs' defaults in `memlm.training.runs`), turning parsed flags into a `TrainRun`,
`OnlineRun`, `DistillRun` or `EvalRun`, and the process-wide settings of a run (threads).
Does not know: what a run does (`memlm.training.train_run`, `memlm.training.distill_run`,
`memlm.entrypoints.evaluate` for eval); no
`argparse.Namespace` goes below this module.
Handlers take the parsed `args` and return an exit code; user errors raise `MemlmError`.

Under torchrun (RANK / WORLD_SIZE / LOCAL_RANK set) `train` and `distill` join the job's process
group (`memlm.distributed.ddp`, imported only then) and train data-parallel:
`torchrun --nproc-per-node 2 -m memlm train ...` takes the same flags, --batch-size is the
global batch, and each rank reads batch/world rows of it.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace

from memlm import dtypes, runtime
from memlm.engine.config import KV_DTYPES
from memlm.entrypoints.cli.args import add_kv_policy_args, kv_policy_fields
from memlm.errors import MemlmError
from memlm.training.distill_run import run_distill
from memlm.training.runs import DistillRun, EvalRun, LoopRun, OnlineRun, TrainRun
from memlm.training.schedules import SCHEDULE_NAMES
from memlm.training.students import FIT_DTYPES
from memlm.training.train_run import run_online, run_train

# flags of the training group that are `TrainConfig` fields of the same name
_LOOP_FLAGS = ("steps", "batch_size", "seq_len", "accum", "lr", "schedule", "warmup", "weight_decay",
               "plateau_patience", "plateau_threshold", "clip", "eval_every", "eval_tokens",
               "checkpoint_every", "seed")


def _add_train_args(p: argparse.ArgumentParser, run: type[LoopRun]) -> None:
    """The training group; defaults are those of `run` (TrainRun or DistillRun)."""
    loop = run.loop
    g = p.add_argument_group("training")
    g.add_argument("--corpus", default=run.corpus,
                   help="shakespeare | bible | pydocs | a text file | a directory of .txt files")
    g.add_argument("--data-dir", default=run.data_dir, help="token/teacher cache root (default ~/.cache/memlm/data)")
    g.add_argument("--val-fraction", type=float, default=run.val_fraction, help="share of documents held out")
    g.add_argument("--steps", type=int, default=loop.steps)
    g.add_argument("--batch-size", type=int, default=loop.batch_size,
                   help="the global batch: under torchrun each of N ranks reads batch/N rows of it")
    g.add_argument("--seq-len", type=int, default=loop.seq_len)
    g.add_argument("--accum", type=int, default=loop.accum, help="micro-batches per optimizer step")
    g.add_argument("--lr", type=float, default=loop.lr)
    g.add_argument("--schedule", default=loop.schedule, choices=SCHEDULE_NAMES)
    g.add_argument("--warmup", type=int, default=loop.warmup)
    g.add_argument("--plateau-patience", type=int, default=loop.plateau_patience,
                   help="adaptive: evaluations without enough progress before the LR is halved")
    g.add_argument("--plateau-threshold", type=float, default=loop.plateau_threshold,
                   help="adaptive: relative validation-loss improvement per evaluation that counts as progress")
    g.add_argument("--weight-decay", type=float, default=loop.weight_decay)
    g.add_argument("--clip", type=float, default=loop.clip)
    g.add_argument("--eval-every", type=int, default=loop.eval_every)
    g.add_argument("--eval-tokens", type=int, default=loop.eval_tokens)
    g.add_argument("--checkpoint-every", type=int, default=loop.checkpoint_every)
    g.add_argument("--seed", type=int, default=loop.seed)
    g.add_argument("--out", default=run.out, help="checkpoint directory (a model dir `memlm generate --model` reads)")
    g.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    g.add_argument("--export-hf", default=run.export_hf, help="also write a transformers-readable copy here")
    g.add_argument("--log-file", default=run.log_file, help="append one JSON line per step (loss, lr, grad norm)")
    g.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's; per rank under torchrun)")
    g.add_argument("--ddp-backend", default="auto", choices=("auto", "gloo", "nccl"),
                   help="process-group backend under torchrun (auto: nccl with CUDA, else gloo)")


def add_commands(subparsers) -> None:
    """Register train, distill and eval on the main CLI's subparsers."""
    p = subparsers.add_parser("train", help="train a student from scratch or a model online from a stream")
    p.add_argument("--student", default=TrainRun.student,
                   help="preset or spec, e.g. layers=6,hidden=256,heads=4,mixers=AR,share=repeat2")
    p.add_argument("--model", default=TrainRun.model,
                   help="start from this model (name or dir) instead of a new student")
    p.add_argument("--tokenizer", default=TrainRun.tokenizer,
                   help="tokenizer of a new student: a model name/dir, or bpe:N to train an N-token BPE")
    _add_train_args(p, TrainRun)
    learner = OnlineRun.learner
    o = p.add_argument_group("online learning")
    o.add_argument("--online", action="store_true", help="test-then-train on a text stream (needs --model)")
    o.add_argument("--stream", default=OnlineRun.stream, help="a file being appended to, or - for stdin")
    o.add_argument("--max-chunks", type=int, default=OnlineRun.max_chunks)
    o.add_argument("--chunk-chars", type=int, default=OnlineRun.chunk_chars)
    o.add_argument("--poll-s", type=float, default=OnlineRun.poll_s)
    o.add_argument("--max-wait-s", type=float, default=OnlineRun.max_wait_s,
                   help="stop after this long without new text")
    o.add_argument("--steps-per-chunk", type=int, default=learner.steps_per_chunk)
    o.add_argument("--replay-windows", type=int, default=learner.replay_windows)
    o.add_argument("--replay-fraction", type=float, default=learner.replay_fraction,
                   help="share of each batch replayed")
    o.add_argument("--online-lr", type=float, default=learner.lr,
                   help="peak LR of online updates (benchmarks/RESULTS-train.md: 1e-5 kept forgetting < 2%%)")
    o.add_argument("--replay-corpus", default=OnlineRun.replay_corpus,
                   help="seed the replay buffer with this corpus's train split")
    p.set_defaults(func=cmd_train)

    d = subparsers.add_parser("distill", help="distill a teacher into a smaller student")
    objective = DistillRun.objective
    d.add_argument("--teacher", default=DistillRun.teacher)
    d.add_argument("--student", default=DistillRun.student, help="preset or spec (vocabulary is the teacher's)")
    d.add_argument("--init", default=DistillRun.init,
                   help="start the student from this model (must share the tokenizer)")
    d.add_argument("--fit", default=DistillRun.fit, help="pick the largest student whose weights + KV fit, e.g. 64MiB")
    d.add_argument("--fit-context", type=int, default=DistillRun.fit_context,
                   help="tokens of KV (batch 1) --fit reserves")
    d.add_argument("--weight-dtype", default=DistillRun.weight_dtype,
                   help=f"bytes per weight assumed by --fit: {' | '.join(FIT_DTYPES)} (default %(default)s)")
    d.add_argument("--plan", action="store_true", help="print the student that would be trained and exit")
    d.add_argument("--alpha", type=float, default=objective.alpha,
                   help="weight of KL(teacher||student) at temperature T")
    d.add_argument("--beta", type=float, default=objective.beta, help="weight of cross-entropy on the data")
    d.add_argument("--gamma", type=float, default=objective.gamma, help="weight of the projected hidden-state cosine")
    d.add_argument("--temperature", type=float, default=objective.temperature,
                   help="KL temperature (T=1 measured best)")
    d.add_argument("--reverse-kl", action="store_true", help="KL(student||teacher) (MiniLLM) instead")
    d.add_argument("--top-k", type=int, default=DistillRun.top_k, help="teacher logits kept per position in the cache")
    d.add_argument("--no-cache", action="store_true", help="run the teacher live on full logits")
    d.add_argument("--cache-dir", default=DistillRun.cache_dir, help="teacher cache (default: under --data-dir)")
    d.add_argument("--teacher-windows", type=int, default=DistillRun.teacher_windows,
                   help="windows of --seq-len the teacher pass covers (default: all training tokens)")
    _add_train_args(d, DistillRun)
    d.set_defaults(func=cmd_distill)

    e = subparsers.add_parser("eval", help="perplexity of a model on a text file, through the paged engine")
    e.add_argument("--model", required=True, help="model name, .gguf file or directory")
    e.add_argument("--text-file", required=True)
    e.add_argument("--context", type=int, default=EvalRun.context, help="tokens per window (default %(default)s)")
    e.add_argument("--stride", type=int, default=EvalRun.stride, help="window step (default: = context)")
    e.add_argument("--max-tokens", type=int, default=EvalRun.max_tokens, help="score only the first N tokens")
    e.add_argument("--chunk", type=int, default=EvalRun.chunk,
                   help="prefill tokens per engine step: later chunks read K/V back from the cache (default %(default)s)")
    e.add_argument("--kv-dtype", default=EvalRun.kv_dtype, choices=dtypes.choices(KV_DTYPES, allow_auto=True),
                   metavar="{" + ",".join([dtypes.AUTO, *KV_DTYPES]) + "}", help="KV cache codec (default %(default)s)")
    e.add_argument("--weight-dtype", "--dtype", dest="weight_dtype", default=EvalRun.weight_dtype,
                   help="weights and matmuls, as for generation (default %(default)s)")
    e.add_argument("--memory-budget", default=EvalRun.memory_budget, help="bound on the process's memory, e.g. 1GiB")
    e.add_argument("--json", action="store_true", help="print one JSON object (perplexity, tokens, ...)")
    add_kv_policy_args(e)      # with --chunk 1 every token is a decode step through the policy's cache
    e.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    e.set_defaults(func=cmd_eval)


def _loop_fields(args, run: type[LoopRun]) -> dict:
    """The `LoopRun` fields of parsed train/distill flags (loop settings without a flag keep
    `run`'s defaults)."""
    return {"corpus": args.corpus, "data_dir": args.data_dir, "val_fraction": args.val_fraction,
            "loop": replace(run.loop, **{name: getattr(args, name) for name in _LOOP_FLAGS}),
            "out": args.out, "resume": args.resume, "export_hf": args.export_hf, "log_file": args.log_file}


def train_run(args) -> TrainRun:
    """The `TrainRun` of parsed `memlm train` flags."""
    return TrainRun(student=args.student, model=args.model, tokenizer=args.tokenizer,
                    **_loop_fields(args, TrainRun))


def online_run(args) -> OnlineRun:
    """The `OnlineRun` of parsed `memlm train --online` flags."""
    learner = replace(OnlineRun.learner, lr=args.online_lr, steps_per_chunk=args.steps_per_chunk,
                      batch_size=args.batch_size, seq_len=args.seq_len, replay_windows=args.replay_windows,
                      replay_fraction=args.replay_fraction, seed=args.seed)
    return OnlineRun(model=args.model, stream=args.stream, max_chunks=args.max_chunks, chunk_chars=args.chunk_chars,
                     poll_s=args.poll_s, max_wait_s=args.max_wait_s, replay_corpus=args.replay_corpus,
                     data_dir=args.data_dir, learner=learner, out=args.out)


def distill_run(args) -> DistillRun:
    """The `DistillRun` of parsed `memlm distill` flags."""
    objective = replace(DistillRun.objective, alpha=args.alpha, beta=args.beta, gamma=args.gamma,
                        temperature=args.temperature, reverse=args.reverse_kl)
    return DistillRun(teacher=args.teacher, student=args.student, init=args.init, fit=args.fit,
                      fit_context=args.fit_context, weight_dtype=args.weight_dtype, plan=args.plan,
                      objective=objective, top_k=args.top_k, no_cache=args.no_cache, cache_dir=args.cache_dir,
                      teacher_windows=args.teacher_windows, **_loop_fields(args, DistillRun))


def eval_run(args) -> EvalRun:
    """The `EvalRun` of parsed `memlm eval` flags."""
    return EvalRun(model=args.model, text_file=args.text_file, context=args.context, stride=args.stride,
                   max_tokens=args.max_tokens, chunk=args.chunk, kv_dtype=args.kv_dtype,
                   weight_dtype=args.weight_dtype, memory_budget=args.memory_budget, json=args.json,
                   kv_policy=kv_policy_fields(args))


def _start(work, run, threads: int | None, ddp_backend: str | None = None) -> int:
    """Apply the process-wide settings of a training command, then do the work (data-parallel
    when torchrun started this process and `ddp_backend` is given)."""
    runtime.set_num_threads(threads)
    env = None
    if ddp_backend is not None and "WORLD_SIZE" in os.environ:     # started by torchrun
        from memlm.distributed.ddp import env_from
        env = env_from()
    if env is None:
        return work(run)
    from memlm.distributed.ddp import DataParallel, describe
    dist = DataParallel.setup(env, ddp_backend)
    try:
        if dist.is_main:
            print(describe(dist))
        code = work(run, dist=dist)
        # every rank reaches the end before any tears the group down: a rank destroying gloo's
        # group while its peer still talks to it aborted the peer ("terminate called without an
        # active exception", seen once in CI)
        dist.barrier()
    finally:
        dist.close()
    # A torchrun worker whose run succeeded leaves without the interpreter's finalization: gloo
    # work still referenced there can abort it after the run (the same message, seen again in CI
    # with the barrier in place), turning a finished run into exit code -6. Its files are closed
    # by now; the streams and logging are flushed here.
    import logging
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)


def cmd_train(args) -> int:
    if args.online:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise MemlmError("memlm train --online runs in one process: start it without torchrun")
        return _start(run_online, online_run(args), args.threads)
    return _start(run_train, train_run(args), args.threads, args.ddp_backend)


def cmd_distill(args) -> int:
    return _start(run_distill, distill_run(args), args.threads, args.ddp_backend)


def cmd_eval(args) -> int:
    from memlm.entrypoints import evaluate          # imported late: it builds an engine
    return _start(evaluate.run, eval_run(args), args.threads)
