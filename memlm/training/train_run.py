"""The `memlm train` pipelines: a run config in, printed results and a checkpoint out.

Owns: the order of the steps of a training run (tokenizer -> student -> token files -> trainer ->
checkpoint), of an online run (model -> replay seed -> test-then-train per chunk -> save), and what is printed
about them (`memlm eval` runs through the engine: `memlm.entrypoints.evaluate`). Does not know: argparse or process-wide settings
(the CLI builds the run config and sets threads), the loop (`trainer.py`), online learning
(`online.py`) or the scoring (`evaluate.py`).
Each function returns an exit code; user errors raise `MemlmError`.
"""
from __future__ import annotations

import math
from pathlib import Path

from memlm.errors import MemlmError
from memlm.training.runs import OnlineRun, TrainRun, finish, load


def make_tokenizer(spec: str, corpus: str):
    """The tokenizer of a new student: bpe:N trains one on `corpus`; a tokenizer.json directory
    or a model (name or dir) gives its own."""
    from memlm.training.data import TextTokenizer, load_corpus, split_documents
    if spec.startswith("bpe:"):
        train_docs, _ = split_documents(load_corpus(corpus))
        return TextTokenizer.train([d.text for d in train_docs], int(spec[4:]))
    if Path(spec, "tokenizer.json").is_file() and not Path(spec, "memlm_config.json").exists() \
            and not Path(spec, "config.json").exists():
        return TextTokenizer.from_file(Path(spec, "tokenizer.json"))
    return load(spec).tokenizer


def shared_tokens(run, tok, dist):
    """The run's token files; in a data-parallel run rank 0 writes them first, and every rank
    must have the same tokenizer and files (checked)."""
    from memlm.training.data import prepare_tokens, tokenizer_fingerprint
    if dist is None:
        return prepare_tokens(run.corpus, tok, run.data_dir, run.val_fraction)
    dist.check_same("tokenizer", tokenizer_fingerprint(tok))
    with dist.main_first():
        splits = prepare_tokens(run.corpus, tok, run.data_dir, run.val_fraction)
    dist.check_same("token files", str(splits.directory.name))
    return splits


def run_train(run: TrainRun, dist=None) -> int:
    """Train a new student (or `run.model`) on `run.corpus`; checkpoints go to `run.out`.

    dist: a `memlm.distributed.ddp.DataParallel` when started under torchrun: each rank reads its
    rows of every global batch (`run.loop.batch_size`), rank 0 prints and writes.
    """
    import torch

    from memlm.models import Transformer
    from memlm.training.data import WindowSampler
    from memlm.training.students import init_weights, parse_student
    from memlm.training.trainer import Trainer
    torch.manual_seed(run.loop.seed)
    if run.model:
        lm = load(run.model)
        model, tok = lm.model.float().requires_grad_(True), lm.tokenizer
    else:
        tok = make_tokenizer(run.tokenizer, run.corpus)
        cfg = parse_student(run.student, tok.vocab_size, eos_token_ids=tuple(getattr(tok, "eos_token_ids", ())),
                            bos_token_id=getattr(tok, "bos_token_id", None))
        model = Transformer(cfg)
        init_weights(model)
    splits = shared_tokens(run, tok, dist)
    shard = (dist.rank, dist.world_size) if dist else (0, 1)
    sampler = WindowSampler(splits.train, run.loop.batch_size, run.loop.seq_len, seed=run.loop.seed, shard=shard)
    trainer = Trainer(model, run.loop, sampler, splits.val, out_dir=run.out, tokenizer=tok, dist=dist,
                      log_path=run.log_file)
    if run.resume:
        trainer.resume(run.out)
    if trainer.is_main:
        ranks = f", {dist.world_size} ranks x {run.loop.batch_size // dist.world_size} rows" if dist else ""
        print(f"training {model.num_parameters() / 1e6:.2f}M params on {len(splits.train)} tokens "
              f"({run.corpus}), validating on {len(splits.val)}; global batch {run.loop.batch_size}{ranks}")
    trainer.train()
    finish(trainer, run, tok, "train")
    return 0


def run_online(run: OnlineRun) -> int:
    """Test-then-train `run.model` on the chunks of `run.stream`; prints per-chunk and total perplexity."""
    from memlm.training import checkpoint
    from memlm.training.data import prepare_tokens
    from memlm.training.online import OnlineLearner, stream_chunks
    lm = load(run.model)
    replay = prepare_tokens(run.replay_corpus, lm.tokenizer, run.data_dir).train if run.replay_corpus else None
    learner = OnlineLearner(lm.model.float().requires_grad_(True), lm.tokenizer, run.learner, replay)
    for i, chunk in enumerate(stream_chunks(run.stream, run.chunk_chars, run.poll_s, run.max_wait_s,
                                            run.max_chunks)):
        r = learner.process(chunk)
        if r["tokens"]:
            print(f"chunk {i}: {r['tokens']} tokens, test ppl {math.exp(r['test_nll']):.2f} vs frozen "
                  f"{math.exp(r['frozen_nll']):.2f}{' (LR re-warmed)' if r['rewarmed'] else ''}", flush=True)
    rep = learner.report
    if rep.tokens == 0:
        raise MemlmError(f"the stream {run.stream!r} gave no text")
    print(f"online: {rep.chunks} chunks, {rep.tokens} tokens, {rep.steps} steps: test-then-train perplexity "
          f"{rep.ppl_model:.3f} vs frozen {rep.ppl_frozen:.3f} ({100 * (1 - rep.ppl_model / rep.ppl_frozen):+.1f}%)")
    if run.out:
        checkpoint.save_model(learner.model, run.out, lm.tokenizer)
        print(f"saved {run.out}")
    return 0
