"""The learning inside federated distillation, without Flower: what a client does to its student
on its own tokens, how the server combines students (FedAvg) and fuses them by ensemble
distillation on public text (FedDF), and held-out scoring. The baselines of
`benchmarks/federated.py` (local-only students, centralized training) run the same functions.

Owns: the local update (AdamW, constant LR, optionally continuing the client's own moments
from its previous round, a step offset so each round draws new windows), the weighted parameter average, and the FedDF server step
(Lin et al. 2020, "Ensemble Distillation for Robust Model Fusion in Federated Learning": start
from the FedAvg average, then distill the clients' averaged logits on unlabeled public text).
Does not know: Flower messages (`federated.py`), corpora or partitions (`fed_data.py`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from memlm.training.data import WindowSampler, eval_windows
from memlm.training.distill import DistillConfig, DistillObjective
from memlm.training.trainer import TrainConfig, Trainer, evaluate_loss


@dataclass(frozen=True)
class LocalConfig:
    """One local update: `steps` AdamW steps of `batch_size` windows of `seq_len` tokens."""
    steps: int = 20
    batch_size: int = 8
    seq_len: int = 64
    lr: float = 3e-3
    seed: int = 0

    def loop(self, steps: int | None = None) -> TrainConfig:
        return TrainConfig(steps=steps or self.steps, batch_size=self.batch_size, seq_len=self.seq_len,
                           lr=self.lr, schedule="constant", warmup=0, eval_every=0, seed=self.seed,
                           progress=False)


class _Offset:
    """Batches of a sampler from step `offset` on (round r of a client draws windows no earlier
    round drew: its steps are r*steps .. r*steps+steps-1 of one seeded stream)."""

    def __init__(self, batches, offset: int):
        self.batches, self.offset = batches, offset

    def batch(self, i: int) -> dict:
        return self.batches.batch(self.offset + i)


def _flat_optimizer_state(optimizer) -> dict[str, torch.Tensor]:
    """AdamW's per-parameter state as flat tensors "<param#>.<name>" (its param groups are
    rebuilt from the config every round, so only this needs keeping)."""
    return {f"{pid}.{name}": (v if torch.is_tensor(v) else torch.tensor(v)).detach().clone()
            for pid, st in optimizer.state_dict()["state"].items() for name, v in st.items()}


def _load_flat_optimizer_state(optimizer, flat: dict[str, torch.Tensor]) -> None:
    state: dict[int, dict] = {}
    for key, t in flat.items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = t
    optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})


def local_update(model, tokens: np.ndarray, cfg: LocalConfig, *, seed: int, step_offset: int = 0,
                 steps: int | None = None, teacher=None, alpha: float = 1.0,
                 optimizer_state: dict[str, torch.Tensor] | None = None, optimizer: str = "adamw") -> dict:
    """Train `model` in place on `tokens`; with `teacher`, distill it (KL + CE) on the same windows.

    optimizer_state: AdamW moments this client kept from its previous round (None: fresh). We
    measured keeping them worth 117 -> 105 held-out perplexity on 4 Shakespeare clients x 6
    rounds (a fresh Adam per round restarts its moment estimates every 25 steps).
    Returns: {"loss": mean training loss, "tokens": tokens trained on, "optimizer_state": the
    moments after the update}.
    """
    from memlm.training.teacher_cache import LiveTeacherBatches
    loop = cfg.loop(steps)
    sampler = WindowSampler(tokens, loop.batch_size, loop.seq_len, seed=seed)
    batches = _Offset(sampler, step_offset)
    objective = None
    if teacher is not None:
        batches = _Offset(LiveTeacherBatches(sampler, teacher), step_offset)
        objective = DistillObjective(DistillConfig(alpha=alpha, beta=1.0))
    trainer = Trainer(model, loop, batches, objective=objective)
    if optimizer == "sgd":               # plain SGD: the client sends lr x (sum of its clipped gradients)
        trainer.optimizer = torch.optim.SGD([p for g in trainer.optimizer.param_groups for p in g["params"]],
                                            lr=cfg.lr)
    elif optimizer != "adamw":
        raise ValueError(f"client optimizer must be adamw or sgd, got {optimizer!r}")
    if optimizer_state:
        _load_flat_optimizer_state(trainer.optimizer, optimizer_state)
    losses = [trainer.train_step()["loss"] for _ in range(loop.steps)]
    return {"loss": float(np.mean(losses)), "tokens": loop.steps * loop.batch_size * loop.seq_len,
            "optimizer_state": _flat_optimizer_state(trainer.optimizer)}


def fedavg(states: list[dict[str, torch.Tensor]], weights: list[float]) -> dict[str, torch.Tensor]:
    """The weighted mean of state dicts (weights: e.g. tokens each client trained on)."""
    if not states or len(states) != len(weights) or sum(weights) <= 0:
        raise ValueError("fedavg needs one positive weight per state dict")
    total = float(sum(weights))
    return {k: sum(s[k].double() * (w / total) for s, w in zip(states, weights)).to(states[0][k].dtype)
            for k in states[0]}


@torch.no_grad()
def ensemble_logits(models, inputs: torch.Tensor) -> torch.Tensor:
    """(B, T) -> (B*T, V): the mean of the models' logits (FedDF's averaged-logit teacher)."""
    out = None
    for m in models:
        m.eval()
        h = m.forward_dense(inputs)                                   # (B, T, H)
        z = m.compute_logits(h.reshape(-1, h.shape[-1])).float()      # (B*T, V)
        out = z if out is None else out + z
    return out / len(models)


class _EnsembleBatches:
    """Public windows with the clients' ensemble logits attached (a teacher for DistillObjective)."""

    def __init__(self, sampler, models):
        self.sampler, self.models = sampler, models

    def batch(self, i: int) -> dict:
        b = self.sampler.batch(i)
        return {**b, "teacher_ids": None, "teacher_logits": ensemble_logits(self.models, b["input"])}


def ensemble_distill(student, client_models, public_tokens: np.ndarray, cfg: LocalConfig, *, steps: int,
                     seed: int, step_offset: int = 0, temperature: float = 1.0) -> dict:
    """FedDF's server step: KL(ensemble || student) on public windows, `student` updated in place.

    Returns: {"kl": mean KL over the steps}.
    """
    loop = cfg.loop(steps)
    sampler = WindowSampler(public_tokens, loop.batch_size, loop.seq_len, seed=seed)
    objective = DistillObjective(DistillConfig(alpha=1.0, beta=0.0, temperature=temperature))
    trainer = Trainer(student, loop, _Offset(_EnsembleBatches(sampler, client_models), step_offset),
                      objective=objective)
    kls = [trainer.train_step()["kl"] for _ in range(loop.steps)]
    return {"kl": float(np.mean(kls))}


def heldout_loss(model, tokens: np.ndarray, seq_len: int, max_tokens: int) -> float:
    """Mean next-token cross-entropy (nats) on the first `max_tokens` held-out tokens."""
    return evaluate_loss(model, eval_windows(tokens, seq_len, max_tokens))
