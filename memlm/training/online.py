"""Online learning from a text stream: test-then-train with replay and learning-rate re-warming.

Owns: reading a growing file or stdin in chunks, and for each chunk (1) scoring it with the
current model and with a frozen copy (the test), (2) then training a few steps on it mixed with
a bounded replay buffer of older windows, (3) re-warming the LR when the test loss jumps.
Does not know: how the model was loaded or saved (the CLI does that), or the engine.

    chunk k:  test(model_k, chunk k)  ->  train(model_k, chunk k + replay)  ->  model_{k+1}

Every token is scored before the model has trained on it, so the summed test loss is an honest
held-out measure of learning from the stream (dynamic evaluation).
"""
from __future__ import annotations

import copy
import math
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from memlm.errors import MemlmError
from memlm.training.evaluate import perplexity
from memlm.training.schedules import PlateauController
from memlm.training.trainer import param_groups

CHUNK_CHARS = 4000      # characters per chunk read from the stream
POLL_S = 0.5            # how often a file at its end is polled for new text
MAX_WAIT_S = 5.0        # stop after this long without new text


def stream_chunks(source: str, chunk_chars: int = CHUNK_CHARS, poll_s: float = POLL_S,
                  max_wait_s: float = MAX_WAIT_S, max_chunks: int | None = None) -> Iterator[str]:
    """Yield text chunks of about `chunk_chars` (cut after a newline) from a file or "-" (stdin).

    A file is tailed: at its end we poll every `poll_s` and stop after `max_wait_s` without new
    text (or after `max_chunks`). stdin ends at EOF.
    """
    if source != "-" and not Path(source).is_file():
        raise MemlmError(f"stream {source!r} is not a file: give a text file being appended to, or - for stdin")
    f = sys.stdin if source == "-" else open(source, encoding="utf-8", errors="replace")
    buf, produced, idle_since = "", 0, None
    try:
        while max_chunks is None or produced < max_chunks:
            data = f.read(chunk_chars)
            if data:
                buf, idle_since = buf + data, None
            elif source == "-" or (idle_since is not None and time.monotonic() - idle_since >= max_wait_s):
                break
            else:
                idle_since = idle_since or time.monotonic()
                time.sleep(poll_s)
            while len(buf) >= chunk_chars and (max_chunks is None or produced < max_chunks):
                cut = buf.rfind("\n", 0, chunk_chars) + 1 or chunk_chars
                yield buf[:cut]
                buf, produced = buf[cut:], produced + 1
        if buf.strip() and (max_chunks is None or produced < max_chunks):
            yield buf
    finally:
        if f is not sys.stdin:
            f.close()


@dataclass(frozen=True)
class OnlineConfig:
    lr: float = 3e-4
    warmup: int = 4                  # steps of each (re)warmup
    steps_per_chunk: int = 4
    batch_size: int = 8
    seq_len: int = 128
    replay_windows: int = 512        # replay buffer capacity (windows of seq_len+1 tokens)
    replay_fraction: float = 0.5     # share of each batch drawn from the replay buffer
    shift_threshold: float = 0.2     # re-warm when chunk loss > (1+this) * its running mean
    weight_decay: float = 0.0
    clip: float = 1.0
    seed: int = 0


@dataclass
class OnlineReport:
    chunks: int = 0
    tokens: int = 0
    nll_model: float = 0.0           # summed test (before-train) nll of the adapting model
    nll_frozen: float = 0.0          # summed nll of the frozen starting model on the same tokens
    rewarms: list[int] = field(default_factory=list)   # chunk indices where the LR re-warmed
    steps: int = 0

    @property
    def ppl_model(self) -> float:
        return math.exp(self.nll_model / max(1, self.tokens))

    @property
    def ppl_frozen(self) -> float:
        return math.exp(self.nll_frozen / max(1, self.tokens))


def _windows(ids: list[int], length: int) -> list[torch.Tensor]:
    """Cut ids into windows of `length` tokens overlapping by one (input + shifted target)."""
    t = torch.tensor(ids, dtype=torch.long)
    return [t[i:i + length] for i in range(0, max(1, len(t) - length + 1), length - 1) if len(t[i:i + length]) == length]


class OnlineLearner:
    """Holds the adapting model, its frozen copy, optimizer, LR controller and replay buffer."""

    def __init__(self, model, tokenizer, cfg: OnlineConfig, replay_tokens: np.ndarray | None = None):
        self.model, self.tokenizer, self.cfg = model, tokenizer, cfg
        self.frozen = copy.deepcopy(model).eval()
        self.opt = torch.optim.AdamW(param_groups([model], cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.95))
        self.lr = PlateauController(lr=cfg.lr, warmup=cfg.warmup, patience=1000)  # re-warm only
        self.rng = np.random.default_rng(cfg.seed)
        self.replay: list[torch.Tensor] = []
        self.seen = 0                 # windows offered to the reservoir
        self.step = 0
        self.mean_loss: float | None = None
        self.report = OnlineReport()
        if replay_tokens is not None:   # seed the buffer with old data, so replay mixes it in
            L = cfg.seq_len + 1
            n = (len(replay_tokens) - 1) // L
            for i in self.rng.permutation(n)[:cfg.replay_windows]:
                self._offer(torch.from_numpy(np.asarray(replay_tokens[i * L:(i + 1) * L], dtype=np.int64)))

    def _offer(self, w: torch.Tensor) -> None:
        """Reservoir sampling: the buffer stays a uniform sample of everything offered."""
        self.seen += 1
        if len(self.replay) < self.cfg.replay_windows:
            self.replay.append(w)
        else:
            j = int(self.rng.integers(0, self.seen))
            if j < self.cfg.replay_windows:
                self.replay[j] = w

    def process(self, text: str) -> dict:
        """Test on `text`, then train on it; returns this chunk's figures."""
        cfg = self.cfg
        ids = self.tokenizer.encode(text)
        if len(ids) < 2:
            return {"tokens": 0}
        test = perplexity(self.model, ids, context=cfg.seq_len)
        frozen = perplexity(self.frozen, ids, context=cfg.seq_len)
        rep = self.report
        rep.tokens += test.tokens
        rep.nll_model += test.nll * test.tokens
        rep.nll_frozen += frozen.nll * frozen.tokens
        if self.mean_loss is None or test.nll > (1 + cfg.shift_threshold) * self.mean_loss:
            self.lr.rewarm(self.step)              # new distribution: ramp the LR up again
            rep.rewarms.append(rep.chunks)
            self.mean_loss = test.nll
        else:
            self.mean_loss = 0.7 * self.mean_loss + 0.3 * test.nll
        fresh = _windows(ids, cfg.seq_len + 1) or [torch.tensor(ids, dtype=torch.long)]
        n_replay = int(round(cfg.batch_size * cfg.replay_fraction)) if self.replay else 0
        self.model.train()
        for _ in range(cfg.steps_per_chunk):
            rows = [fresh[int(i)] for i in self.rng.integers(0, len(fresh), cfg.batch_size - n_replay)]
            rows += [self.replay[int(i)] for i in self.rng.integers(0, len(self.replay), n_replay)]
            L = min(len(r) for r in rows)
            x = torch.stack([r[:L] for r in rows])                       # (B, L)
            for g in self.opt.param_groups:
                g["lr"] = self.lr.lr_at(self.step)
            h = self.model.forward_dense(x[:, :-1])                      # (B, L-1, H)
            loss = torch.nn.functional.cross_entropy(self.model.compute_logits(h.reshape(-1, h.shape[-1])),
                                                     x[:, 1:].reshape(-1))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.clip)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            self.step += 1
        for w in fresh:
            if len(w) == cfg.seq_len + 1:
                self._offer(w)
        rep.chunks += 1
        rep.steps = self.step
        return {"tokens": test.tokens, "test_nll": test.nll, "frozen_nll": frozen.nll,
                "rewarmed": rep.rewarms[-1:] == [rep.chunks - 1]}
