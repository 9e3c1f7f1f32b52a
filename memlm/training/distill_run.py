"""The `memlm distill` pipeline: teacher -> student config -> token files -> teacher cache ->
trainer -> checkpoint.

Owns: the order of those steps and what is printed about them. Does not know: the loss math
(`distill.py`), the cache format (`teacher_cache.py`) or the loop (`trainer.py`).
"""
from __future__ import annotations

import re

from memlm.errors import MemlmError


def student_config(args, teacher_cfg, tokenizer):
    """-> (ModelConfig or None when --init gives a model, initial model or None, description)."""
    from memlm.training.students import describe_fit, fit_student, parse_student
    common = {"eos_token_ids": tuple(getattr(tokenizer, "eos_token_ids", ()) or ()),
              "bos_token_id": getattr(tokenizer, "bos_token_id", None)}
    given = [n for n, v in (("--fit", args.fit), ("--student", args.student), ("--init", args.init)) if v]
    if len(given) > 1:
        raise MemlmError(f"give only one of --fit, --student, --init (got {' and '.join(given)})")
    if args.fit:
        choice, _ = fit_student(args.fit, teacher_cfg.vocab_size, args.fit_context, args.weight_dtype, **common)
        return choice.cfg, None, describe_fit(choice, args.fit, args.fit_context, args.weight_dtype)
    if args.init:
        from memlm.training.cli import _load
        from memlm.training.distill import check_tokenizers
        lm = _load(args.init)
        check_tokenizers(tokenizer, lm.tokenizer, teacher_cfg.vocab_size, lm.config.vocab_size)
        return lm.model.cfg, lm.model.float().requires_grad_(True), f"student initialised from {args.init}"
    cfg = parse_student(args.student or "tiny", teacher_cfg.vocab_size,
                        max_position_embeddings=max(2048, args.seq_len), **common)
    return cfg, None, f"student {args.student or 'tiny'}"


def run(args) -> int:
    import torch

    from memlm.models import Transformer
    from memlm.training.cli import _finish, _load, _train_config
    from memlm.training.data import WindowSampler, prepare_tokens, tokenizer_fingerprint
    from memlm.training.distill import DistillConfig, DistillObjective, check_tokenizers
    from memlm.training.students import count_parameters, init_weights
    from memlm.training.teacher_cache import CachedTeacherBatches, LiveTeacherBatches, TeacherCache
    from memlm.training.trainer import Trainer

    teacher = _load(args.teacher)
    tmodel, tok = teacher.model.float().eval(), teacher.tokenizer
    cfg, student, how = student_config(args, tmodel.cfg, tok)
    print(how)
    print(f"student: {count_parameters(cfg) / 1e6:.2f}M params, depth {cfg.depth}, hidden {cfg.hidden_size}, "
          f"mixers {''.join(m[0].upper() for m in cfg.mixers)}, layer order {list(cfg.layer_order)}, "
          f"teacher {args.teacher} ({tmodel.num_parameters() / 1e6:.1f}M params)")
    if args.plan:
        return 0
    check_tokenizers(tok, None, tmodel.cfg.vocab_size, cfg.vocab_size)
    torch.manual_seed(args.seed)
    if student is None:
        student = Transformer(cfg)
        init_weights(student)
    dcfg = DistillConfig(alpha=args.alpha, beta=args.beta, gamma=args.gamma, temperature=args.temperature,
                         reverse=args.reverse_kl)
    splits = prepare_tokens(args.corpus, tok, args.data_dir, args.val_fraction)
    sampler = WindowSampler(splits.train, args.batch_size, args.seq_len, seed=args.seed, aligned=True,
                            num_windows=args.teacher_windows)
    if args.no_cache:
        batches = LiveTeacherBatches(sampler, tmodel, hidden=dcfg.gamma > 0)
    else:
        temps = tuple(sorted({1.0, 2.0, float(args.temperature)}))
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(args.teacher))[-40:]
        cache_dir = args.cache_dir or (splits.directory / f"teacher-{slug}-T{args.seq_len}-k{args.top_k}"
                                       f"-w{sampler.num_windows}-t{'_'.join(f'{t:g}' for t in temps)}"
                                       f"{'-h' if dcfg.gamma > 0 else ''}")
        print(f"teacher cache {cache_dir}: {sampler.num_windows} windows x {args.seq_len} tokens, top-{args.top_k}")
        cache = TeacherCache.build(tmodel, splits.train, cache_dir, seq_len=args.seq_len, k=args.top_k,
                                   num_windows=sampler.num_windows, store_hidden=dcfg.gamma > 0,
                                   teacher_name=str(args.teacher), fingerprint=tokenizer_fingerprint(tok),
                                   temperatures=temps, progress=True)
        batches = CachedTeacherBatches(sampler, cache, dcfg.temperature)
    objective = DistillObjective(dcfg, cfg.hidden_size, tmodel.cfg.hidden_size)
    trainer = Trainer(student, _train_config(args), batches, splits.val, objective, args.out, tok)
    if args.resume:
        if not args.out:
            raise MemlmError("--resume needs --out (the checkpoint to continue)")
        trainer.resume(args.out)
    trainer.train()
    _finish(trainer, args, tok, "distill")
    return 0
