"""The training loop: AdamW with clipping and accumulation, periodic evaluation, checkpoints
that resume bit-identically, and a tqdm bar showing loss, learning rate and tokens/s.

Owns: the order of operations in a step and when to evaluate/save. Does not know: what the loss
is (an objective from `distill.py`), where batches come from (anything with `batch(i) -> dict`,
whose i-th batch depends only on i), or file formats (`checkpoint.py`).

One optimizer step `s` consumes micro-batches s*accum .. s*accum+accum-1, so the data position
is the step counter and a resumed run draws exactly the batches the straight run would have.

Data-parallel runs pass `dist` (a `memlm.distributed.ddp.DataParallel`, duck-typed here: this
module does not import the distributed package): the loss runs through its DDP wrapper, the
reported loss and validation are means over ranks, and only the main rank logs and writes.
"""
from __future__ import annotations

import contextlib
import json
import math
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from memlm.errors import MemlmError
from memlm.training import checkpoint
from memlm.training.data import eval_windows
from memlm.training.distill import DistillConfig, DistillObjective
from memlm.training.schedules import make_schedule


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 200
    batch_size: int = 8
    seq_len: int = 128
    accum: int = 1
    lr: float = 3e-3
    schedule: str = "cosine"          # constant | cosine | wsd | adaptive
    warmup: int = 20
    min_ratio: float = 0.1            # cosine/wsd floor as a fraction of lr
    plateau_patience: int = 2         # adaptive: evaluations without progress before a cut
    plateau_factor: float = 0.5
    plateau_threshold: float = 0.01  # adaptive: relative improvement per evaluation that counts
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    clip: float = 1.0
    shared_lr_scale: bool = False     # a block run at n depths trains at lr/n (see `param_groups`)
    layer_lr_scale: float = 1.0       # lr multiplier of every layer block (not embeddings/final norm)
    eval_every: int = 50
    eval_tokens: int = 16384
    checkpoint_every: int = 0         # 0: only at the end (when an out dir is given)
    seed: int = 0
    progress: bool | None = None      # None: a bar only when stderr is a terminal

    def __post_init__(self):
        for name in ("steps", "batch_size", "seq_len", "accum"):
            if getattr(self, name) <= 0:
                raise MemlmError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.lr <= 0:
            raise MemlmError(f"--lr must be positive, got {self.lr}")
        if self.layer_lr_scale <= 0:
            raise MemlmError(f"layer_lr_scale must be positive, got {self.layer_lr_scale}")

    def make_schedule(self):
        extra = ({"patience": self.plateau_patience, "factor": self.plateau_factor,
                  "threshold": self.plateau_threshold}
                 if self.schedule == "adaptive" else {"min_ratio": self.min_ratio})
        try:
            return make_schedule(self.schedule, lr=self.lr, total=self.steps, warmup=self.warmup, **extra)
        except ValueError as e:
            raise MemlmError(str(e)) from None


@dataclass
class TrainResult:
    history: list[dict] = field(default_factory=list)   # one entry per evaluation
    steps: int = 0
    tokens: int = 0
    wall_s: float = 0.0

    @property
    def final_val_loss(self) -> float:
        return self.history[-1]["val_loss"] if self.history else math.nan

    def steps_to(self, target: float) -> int | None:
        """First evaluated step whose validation loss is <= target."""
        return next((h["step"] for h in self.history if h["val_loss"] <= target), None)


def layer_uses(model) -> dict[int, int]:
    """Unique layer index -> how many depths run it (from `cfg.layer_order`; 1 when unshared)."""
    order = getattr(getattr(model, "cfg", None), "layer_order", None) or ()
    return {i: order.count(i) for i in set(order)}


def param_groups(modules, weight_decay: float, shared_lr_scale: bool = False,
                 layer_lr_scale: float = 1.0) -> list[dict]:
    """Decay matrices only; norms, biases and 1-D vectors are not decayed.

    shared_lr_scale: a layer block run at n depths (cross-layer sharing) gets its own groups with
    "lr_scale" 1/n. Adam normalizes the summed gradient, so without it one step moves a shared
    weight as far as an unshared one, but that weight acts n times on every token: the function
    changes ~n times as much per step. The trainer multiplies each group's lr by its lr_scale.
    layer_lr_scale: a further multiplier for every `layers.*` parameter (shared or not), the
    control that separates "shared blocks want a lower lr" from "all blocks do". Neither scale
    applies to per-depth parameters inside a layer (`Transformer.per_depth_parameter_names`:
    depth norms and gates act at one depth each, like the embedding).
    """
    groups: dict[tuple[bool, float], list] = {}
    for m in modules:
        uses = layer_uses(m) if shared_lr_scale else {}
        per_depth = m.per_depth_parameter_names() if hasattr(m, "per_depth_parameter_names") else set()
        for name, p in m.named_parameters():
            if not p.requires_grad:
                continue
            scale = 1.0
            if name.startswith("layers.") and name not in per_depth:
                scale = layer_lr_scale / (max(1, uses.get(int(name.split(".")[1]), 1)) if uses else 1)
            groups.setdefault((p.dim() >= 2, scale), []).append(p)
    if not shared_lr_scale and layer_lr_scale == 1.0:   # the two-group layout of plain runs
        return [{"params": groups.get((True, 1.0), []), "weight_decay": weight_decay},
                {"params": groups.get((False, 1.0), []), "weight_decay": 0.0}]
    return [{"params": ps, "weight_decay": weight_decay if decay else 0.0, "lr_scale": scale}
            for (decay, scale), ps in sorted(groups.items(), key=lambda kv: (not kv[0][0], -kv[0][1]))]


def _to_device(batch: dict, device: torch.device) -> dict:
    if device.type == "cpu":
        return batch
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


@torch.no_grad()
def evaluate_loss(model, windows: torch.Tensor, batch_size: int = 8) -> float:
    """Mean next-token cross-entropy over (n, T+1) windows."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(windows), batch_size):
        w = windows[i:i + batch_size]
        h = model.forward_dense(w[:, :-1])                                   # (b, T, H)
        logits = model.compute_logits(h.reshape(-1, h.shape[-1]))           # (b*T, V)
        total += float(torch.nn.functional.cross_entropy(logits, w[:, 1:].reshape(-1), reduction="sum"))
        count += w[:, 1:].numel()
    model.train(was_training)
    return total / count


class Trainer:
    """Trains `model` on `batches` with `objective`; evaluates CE on held-out tokens."""

    def __init__(self, model, cfg: TrainConfig, batches, val_tokens: np.ndarray | None = None,
                 objective: DistillObjective | None = None, out_dir: str | Path | None = None,
                 tokenizer=None, dist=None, log_path: str | Path | None = None):
        """dist: a `DataParallel` (the batches must then be this rank's shard of each global
        batch); log_path: append one JSON line per step (step, loss, lr, grad_norm) to this file."""
        self.model, self.cfg, self.batches, self.tokenizer = model, cfg, batches, tokenizer
        self.objective = objective or DistillObjective(DistillConfig(alpha=0.0, beta=1.0))
        self.out_dir = Path(out_dir) if out_dir else None
        self.dist = dist
        self.is_main = dist is None or dist.is_main
        self.log_path = Path(log_path) if log_path and self.is_main else None
        self.device = dist.device if dist is not None else torch.device("cpu")
        if dist is not None:
            self.model.to(self.device)
            self.objective.to(self.device)
            self.loss_fn = dist.wrap(self.model, self.objective)     # its backward all-reduces
        else:
            self.loss_fn = lambda batch: self.objective(self.model, batch)
        self.val = eval_windows(val_tokens, cfg.seq_len, cfg.eval_tokens) if val_tokens is not None else None
        self.schedule = cfg.make_schedule()
        self.optimizer = torch.optim.AdamW(param_groups([model, self.objective], cfg.weight_decay,
                                                        cfg.shared_lr_scale, cfg.layer_lr_scale),
                                           lr=cfg.lr, betas=cfg.betas, eps=1e-8)
        self.step = 0
        self.result = TrainResult()
        torch.manual_seed(cfg.seed)

    def evaluate(self) -> float:
        if self.val is None:
            raise MemlmError("no validation tokens to evaluate on")
        if self.dist is None:
            return evaluate_loss(self.model, self.val, self.cfg.batch_size)
        mine = self.val[self.dist.rank::self.dist.world_size]          # each rank scores its share
        n = mine[:, 1:].numel()
        part = evaluate_loss(self.model, mine.to(self.device), self.cfg.batch_size) * n if len(mine) else 0.0
        total, count = self.dist.all_sum([part, float(n)])
        return total / count

    def train_step(self) -> dict:
        """One optimizer step over `accum` micro-batches; returns its metrics."""
        cfg = self.cfg
        lr = self.schedule.lr_at(self.step)
        for g in self.optimizer.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)
        self.model.train()
        total, parts = 0.0, {}
        for i in range(cfg.accum):
            batch = _to_device(self.batches.batch(self.step * cfg.accum + i), self.device)
            # DDP all-reduces on the last micro-batch's backward only
            sync = self.dist is None or i == cfg.accum - 1
            with (contextlib.nullcontext() if sync else self.loss_fn.no_sync()):
                loss, metrics = self.loss_fn(batch)
                (loss / cfg.accum).backward()
            total += float(loss.detach()) / cfg.accum
            for k, v in metrics.items():
                parts[k] = parts.get(k, 0.0) + v / cfg.accum
        if self.dist is not None:                 # report the global batch's loss, as one process would
            total, *rest = self.dist.all_mean([total, *parts.values()])
            parts = dict(zip(parts, rest))
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.clip)) if cfg.clip > 0 else math.nan
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        if not math.isfinite(total):
            raise MemlmError(f"training diverged at step {self.step} (loss {total}): lower --lr")
        out = {"loss": total, "lr": lr, "grad_norm": grad_norm, **parts}
        if self.log_path is not None:
            with open(self.log_path, "a") as f:
                f.write(json.dumps({"step": self.step, **out, "time": time.time()}) + "\n")
        return out

    def train(self, steps: int | None = None) -> TrainResult:
        """Run until step `steps` (default cfg.steps), evaluating and checkpointing on schedule;
        the checkpoint (when an out dir is set) is also written at `steps`."""
        cfg, end = self.cfg, steps if steps is not None else self.cfg.steps
        tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.accum
        show = (cfg.progress if cfg.progress is not None else sys.stderr.isatty()) and self.is_main
        from tqdm import tqdm
        bar = tqdm(total=end, initial=self.step, disable=not show, unit="step", dynamic_ncols=True)
        t0, start_step = time.perf_counter(), self.step
        while self.step < end:
            m = self.train_step()
            self.result.tokens += tokens_per_step
            rate = (self.step - start_step) * tokens_per_step / max(1e-9, time.perf_counter() - t0)
            bar.update(1)
            bar.set_postfix(loss=f"{m['loss']:.3f}", lr=f"{m['lr']:.2e}", tok_s=f"{rate:.0f}")
            # evaluate on the fixed cadence and at the run's end (not at a partial `end`: a resumed
            # run must see exactly the evaluations, and so controller updates, of a straight one)
            last = self.step == end
            if self.val is not None and cfg.eval_every and (self.step % cfg.eval_every == 0
                                                            or self.step == cfg.steps):
                val = self.evaluate()
                cut = self.schedule.observe(val)
                self.result.history.append({"step": self.step, "val_loss": val, "train_loss": m["loss"],
                                            "lr": m["lr"], "tokens": self.step * tokens_per_step,
                                            "lr_cut": cut})
                if show:
                    bar.write(f"step {self.step}: train {m['loss']:.4f} val {val:.4f} "
                              f"(ppl {math.exp(min(val, 50)):.2f}) lr {m['lr']:.2e}")
            if self.out_dir and ((cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0) or last):
                if self.is_main:
                    self.save(self.out_dir)
                if self.dist is not None:          # no rank runs ahead of the checkpoint it may resume from
                    self.dist.barrier()
        bar.close()
        self.result.steps = self.step
        self.result.wall_s += time.perf_counter() - t0
        return self.result

    def save(self, directory: str | Path) -> Path:
        """Model dir + training state, written beside then swapped in (a crash keeps the old one)."""
        directory = Path(directory)
        tmp = directory.with_name(directory.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        checkpoint.save_model(self.model, tmp, self.tokenizer)
        checkpoint.save_train_state(tmp, step=self.step, optimizer=self.optimizer, objective=self.objective,
                                    schedule=self.schedule,
                                    extra={"seed": self.cfg.seed, "history": self.result.history,
                                           "tokens": self.result.tokens})
        shutil.rmtree(directory, ignore_errors=True)
        tmp.rename(directory)
        return directory

    def resume(self, directory: str | Path) -> None:
        """Load weights, optimizer, schedule, RNG and data position from a checkpoint dir.

        A run killed between removing the old checkpoint and renaming the new one into place
        left the new one, complete, as `<dir>.tmp`: it is used then."""
        directory = Path(directory)
        tmp = directory.with_name(directory.name + ".tmp")
        if not directory.exists() and (tmp / "train_state" / "state.json").exists():
            directory = tmp
        saved = checkpoint.load_model_dir(directory)
        if saved.cfg != self.model.cfg:
            raise MemlmError(f"checkpoint {directory} holds a different architecture than this run")
        self.model.load_state_dict(saved.state_dict())      # copies into the (possibly CUDA) params
        meta = checkpoint.load_train_state(directory, optimizer=self.optimizer, objective=self.objective,
                                           schedule=self.schedule)
        self.step = meta["step"]
        self.result.history = meta["extra"].get("history", [])
        self.result.tokens = meta["extra"].get("tokens", 0)
