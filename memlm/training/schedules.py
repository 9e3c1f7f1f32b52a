"""Learning-rate schedules as pure functions of the step, and an adaptive controller.

Owns: the learning rate at each optimizer step. Does not know: optimizers, models or data;
the trainer asks `lr_at(step)` and reports measured losses to the controller.

    constant       lr (after an optional linear warmup)
    cosine         linear warmup, then cosine from lr down to min_ratio*lr at `total`
    wsd            warmup, stable at lr, then linear decay to min_ratio*lr over the last
                   `decay_fraction` of `total` (warmup-stable-decay)
    adaptive       `PlateauController`: warmup, then hold lr; cut it by `factor` each time the
                   validation loss fails to improve by `threshold` for `patience` evaluations.
                   It needs no run length, and can be re-warmed when the data shifts.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass


def _warmup(step: int, warmup: int) -> float:
    return min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0


def constant(step: int, *, lr: float, warmup: int = 0, **_) -> float:
    """lr, after a linear warmup of `warmup` steps (step 0 gets lr/warmup)."""
    return lr * _warmup(step, warmup)


def cosine(step: int, *, lr: float, total: int, warmup: int = 0, min_ratio: float = 0.1, **_) -> float:
    """Linear warmup, then cosine decay from lr (step=warmup) to min_ratio*lr (step=total)."""
    if step < warmup:
        return lr * _warmup(step, warmup)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def wsd(step: int, *, lr: float, total: int, warmup: int = 0, decay_fraction: float = 0.2,
        min_ratio: float = 0.0, **_) -> float:
    """Warmup-stable-decay: flat at lr until the last `decay_fraction` of steps, then linear."""
    if step < warmup:
        return lr * _warmup(step, warmup)
    decay_start = total - int(round(decay_fraction * total))
    if step < decay_start:
        return lr
    progress = min(1.0, (step - decay_start) / max(1, total - decay_start))
    return lr * (1 - (1 - min_ratio) * progress)


SCHEDULES = {"constant": constant, "cosine": cosine, "wsd": wsd}
SCHEDULE_NAMES = (*SCHEDULES, "adaptive")     # what `make_schedule` accepts (and `--schedule`)


@dataclass
class PlateauController:
    """Reduce-on-plateau with warmup and re-warming; its whole state is its fields (JSON-able).

    Call `lr_at(step)` before each optimizer step and `observe(loss)` after each evaluation.
    """
    lr: float
    warmup: int = 0
    factor: float = 0.5
    patience: int = 2
    threshold: float = 0.005        # relative improvement that counts as progress
    min_ratio: float = 0.01
    scale: float = 1.0              # current multiplier (1 until the first plateau)
    best: float = math.inf
    bad_evals: int = 0
    warmup_start: int = 0           # step at which the current (re)warmup began

    def lr_at(self, step: int) -> float:
        ramp = _warmup(step - self.warmup_start, self.warmup) if step >= self.warmup_start else 1.0
        return self.lr * self.scale * ramp

    def observe(self, loss: float) -> bool:
        """Record a validation loss; returns True when it cut the learning rate."""
        if loss < self.best * (1 - self.threshold):
            self.best, self.bad_evals = loss, 0
            return False
        self.bad_evals += 1
        if self.bad_evals >= self.patience and self.scale > self.min_ratio:
            self.scale = max(self.min_ratio, self.scale * self.factor)
            self.bad_evals = 0
            self.best = min(self.best, loss)
            return True
        return False

    def rewarm(self, step: int, warmup: int | None = None, scale: float = 1.0) -> None:
        """Restart from a fresh warmup at `step` (new data): the plateau memory is cleared."""
        self.warmup_start, self.scale = step, scale
        if warmup is not None:
            self.warmup = warmup
        self.best, self.bad_evals = math.inf, 0

    def state_dict(self) -> dict:
        d = asdict(self)
        d["best"] = None if math.isinf(self.best) else self.best
        return d

    def load_state_dict(self, d: dict) -> None:
        for k, v in d.items():
            setattr(self, k, math.inf if (k == "best" and v is None) else v)


class FixedSchedule:
    """A pure schedule with its arguments bound, with the controller's interface."""

    def __init__(self, name: str, **kwargs):
        if name not in SCHEDULES:
            raise ValueError(f"unknown schedule {name!r}: use one of {list(SCHEDULE_NAMES)}")
        self.name, self.kwargs = name, kwargs

    def lr_at(self, step: int) -> float:
        return SCHEDULES[self.name](step, **self.kwargs)

    def observe(self, loss: float) -> bool:
        return False

    def rewarm(self, step: int, warmup: int | None = None, scale: float = 1.0) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, d: dict) -> None:
        pass


def make_schedule(name: str, *, lr: float, total: int, warmup: int = 0, **kwargs):
    """Build `FixedSchedule` or `PlateauController` by name ("constant", "cosine", "wsd", "adaptive")."""
    if name == "adaptive":
        return PlateauController(lr=lr, warmup=warmup, **kwargs)
    return FixedSchedule(name, lr=lr, total=total, warmup=warmup, **kwargs)
