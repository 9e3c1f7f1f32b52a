"""The `memlm distill` pipeline: teacher -> student config -> token files -> teacher cache ->
trainer -> checkpoint.

Owns: the order of those steps and what is printed about them. Does not know: argparse (the CLI
builds the `DistillRun`), the loss math (`distill.py`), the cache format (`teacher_cache.py`) or
the loop (`trainer.py`).
"""
from __future__ import annotations

import re

from memlm.training.runs import DistillRun, finish, load


def student_config(run: DistillRun, teacher_cfg, tokenizer):
    """-> (ModelConfig, initial model or None for a fresh one, description)."""
    from memlm.training.students import (DEFAULT_STUDENT, STUDENT_POSITIONS, describe_fit, fit_student,
                                         parse_student)
    common = {"eos_token_ids": tuple(getattr(tokenizer, "eos_token_ids", ()) or ()),
              "bos_token_id": getattr(tokenizer, "bos_token_id", None)}
    if run.fit:
        choice, _ = fit_student(run.fit, teacher_cfg.vocab_size, run.fit_context, run.weight_dtype, **common)
        return choice.cfg, None, describe_fit(choice, run.fit, run.fit_context, run.weight_dtype)
    if run.init:
        from memlm.training.distill import check_tokenizers
        lm = load(run.init)
        check_tokenizers(tokenizer, lm.tokenizer, teacher_cfg.vocab_size, lm.config.vocab_size)
        return lm.model.cfg, lm.model.float().requires_grad_(True), f"student initialised from {run.init}"
    spec = run.student or DEFAULT_STUDENT
    positions = max(STUDENT_POSITIONS, run.loop.seq_len)
    cfg = parse_student(spec, teacher_cfg.vocab_size, max_position_embeddings=positions, **common)
    return cfg, None, f"student {spec}"


def build_cache(dist, **kwargs):
    """The teacher cache; in a data-parallel run each rank runs the teacher on its share of the
    chunks (rank 0 begins and finishes the cache, barriers between)."""
    from memlm.training.teacher_cache import TeacherCache
    if dist is None:
        return TeacherCache.build(**kwargs, progress=True)
    shard = (dist.rank, dist.world_size)
    if dist.is_main:
        TeacherCache.build(**kwargs, shard=shard, stage="begin")
    dist.barrier()
    done = TeacherCache.build(**kwargs, shard=shard, stage="chunks", progress=dist.is_main)
    dist.barrier()
    if dist.is_main and done is None:
        TeacherCache.build(**kwargs, shard=shard, stage="finish")
    dist.barrier()
    return TeacherCache.open(kwargs["directory"], kwargs["tokens"], kwargs["seq_len"], kwargs["fingerprint"])


def run_distill(run: DistillRun, dist=None) -> int:
    """Distill `run.teacher` into the student `run` describes; prints the plan, then trains.

    dist: a `memlm.distributed.ddp.DataParallel` under torchrun: the teacher runs on every rank
    for that rank's rows (live) or chunks (cache); rank 0 prints and writes.
    """
    import torch

    from memlm.models import Transformer
    from memlm.training.data import WindowSampler, tokenizer_fingerprint
    from memlm.training.distill import DistillObjective, check_tokenizers
    from memlm.training.students import count_parameters, init_weights
    from memlm.training.teacher_cache import CachedTeacherBatches, LiveTeacherBatches
    from memlm.training.train_run import shared_tokens
    from memlm.training.trainer import Trainer

    say = print if dist is None or dist.is_main else (lambda *a, **k: None)
    teacher = load(run.teacher)
    tmodel, tok = teacher.model.float().eval(), teacher.tokenizer
    cfg, student, how = student_config(run, tmodel.cfg, tok)
    say(how)
    say(f"student: {count_parameters(cfg) / 1e6:.2f}M params, depth {cfg.depth}, hidden {cfg.hidden_size}, "
        f"mixers {''.join(m[0].upper() for m in cfg.mixers)}, layer order {list(cfg.layer_order)}, "
        f"teacher {run.teacher} ({tmodel.num_parameters() / 1e6:.1f}M params)")
    if run.plan:
        return 0
    check_tokenizers(tok, None, tmodel.cfg.vocab_size, cfg.vocab_size)
    torch.manual_seed(run.loop.seed)
    if student is None:
        student = Transformer(cfg)
        init_weights(student)
    dcfg, seq_len = run.objective, run.loop.seq_len
    splits = shared_tokens(run, tok, dist)
    shard = (dist.rank, dist.world_size) if dist else (0, 1)
    sampler = WindowSampler(splits.train, run.loop.batch_size, seq_len, seed=run.loop.seed, aligned=True,
                            num_windows=run.teacher_windows, shard=shard)
    if dist is not None:
        tmodel.to(dist.device)
    if run.no_cache:
        batches = LiveTeacherBatches(sampler, tmodel, hidden=dcfg.gamma > 0)
    else:
        temps = tuple(sorted({1.0, 2.0, float(dcfg.temperature)}))
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(run.teacher))[-40:]
        cache_dir = run.cache_dir or (splits.directory / f"teacher-{slug}-T{seq_len}-k{run.top_k}"
                                      f"-w{sampler.num_windows}-t{'_'.join(f'{t:g}' for t in temps)}"
                                      f"{'-h' if dcfg.gamma > 0 else ''}")
        say(f"teacher cache {cache_dir}: {sampler.num_windows} windows x {seq_len} tokens, top-{run.top_k}")
        cache = build_cache(dist, teacher=tmodel, tokens=splits.train, directory=cache_dir, seq_len=seq_len,
                            k=run.top_k, num_windows=sampler.num_windows, store_hidden=dcfg.gamma > 0,
                            teacher_name=str(run.teacher), fingerprint=tokenizer_fingerprint(tok),
                            temperatures=temps)
        batches = CachedTeacherBatches(sampler, cache, dcfg.temperature)
    objective = DistillObjective(dcfg, cfg.hidden_size, tmodel.cfg.hidden_size)
    trainer = Trainer(student, run.loop, batches, splits.val, objective, run.out, tok, dist=dist,
                      log_path=run.log_file)
    if run.resume:
        trainer.resume(run.out)
    trainer.train()
    finish(trainer, run, tok, "distill")
    return 0
