"""Shared set-up of the small-vocabulary training benchmarks (schedules, sharing, online):
a 2048-token byte-level BPE trained on Shakespeare's training plays, the token files, and a
helper that trains one student. Not a benchmark itself.
"""
from __future__ import annotations

import platform
import time
from pathlib import Path

import torch

from memlm.models import Transformer
from memlm.training.data import DEFAULT_DATA_DIR, TextTokenizer, load_corpus, prepare_tokens, split_documents
from memlm.training.students import count_parameters, init_weights, parse_student
from memlm.training.trainer import TrainConfig, Trainer

MACHINE = "2 vCPU, 24 GiB, torch 2.13 CPU"


def setup(threads: int, vocab: int = 2048, corpus: str = "shakespeare", data_dir: str | None = None):
    """-> (tokenizer, TokenSplits) for `corpus`, with a BPE cached under the data dir."""
    torch.set_num_threads(threads)
    root = Path(data_dir or DEFAULT_DATA_DIR)
    path = root / f"bpe-{corpus}-{vocab}.json"
    if path.exists():
        tok = TextTokenizer.from_file(path)
    else:
        train_docs, _ = split_documents(load_corpus(corpus))        # never fit on validation text
        tok = TextTokenizer.train([d.text for d in train_docs], vocab)
        root.mkdir(parents=True, exist_ok=True)
        tok.save(path)
    return tok, prepare_tokens(corpus, tok, data_dir)


def train_student(spec: str, tok, splits, cfg: TrainConfig, seed: int = 0, out_dir=None):
    """Train a fresh student; returns (model, TrainResult)."""
    from memlm.training.data import WindowSampler
    torch.manual_seed(seed)
    model = Transformer(parse_student(spec, tok.vocab_size, eos_token_ids=tok.eos_token_ids))
    init_weights(model)
    sampler = WindowSampler(splits.train, cfg.batch_size, cfg.seq_len, seed=seed)
    trainer = Trainer(model, cfg, sampler, splits.val, out_dir=out_dir, tokenizer=tok)
    t0 = time.perf_counter()
    result = trainer.train()
    result.wall_s = time.perf_counter() - t0
    return model, result


def describe(spec: str, tok) -> str:
    cfg = parse_student(spec, tok.vocab_size)
    return f"{spec} ({count_parameters(cfg) / 1e6:.2f}M params, depth {cfg.depth}, {cfg.num_layers} unique)"


def header() -> str:
    return f"machine: {MACHINE} ({platform.machine()}), torch threads {torch.get_num_threads()}"
