"""The server's optimizer in federated training: how the global student moves, given the mean of
the students the clients sent back.

Owns: `ServerOptimizer`, the server update of Reddi et al. 2021 ("Adaptive Federated
Optimization"): the pseudo-gradient is delta = (weighted mean of the client students) - global,
and the global student takes one step of a server optimizer on it, with state (momentum, second
moments, step count) that the server keeps from round to round:

    fedavg:  x <- x + delta                                        (no state; plain FedAvg)
    fedavgm: m <- beta1 m + delta;           x <- x + lr m          (server momentum, Hsu et al. 2019)
    fedadam: m <- beta1 m + (1 - beta1) delta
             v <- beta2 v + (1 - beta2) delta^2
             x <- x + lr m / (sqrt(v) + tau)                       (no bias correction, as in the paper)

Only floating-point entries move; integer buffers are taken from the mean as FedAvg does. Does
not know: Flower (`federated.py`), how clients train (`fed_train.py`) or FedDF's distillation.
"""
from __future__ import annotations

import math

import torch

from memlm.errors import MemlmError

SERVER_OPTIMIZERS = ("fedavg", "fedavgm", "fedadam")


def check_server_optimizer(kind: str, lr: float, beta1: float, beta2: float, tau: float) -> None:
    """Raises MemlmError (one line, naming the flag) when a server setting is out of range."""
    if kind not in SERVER_OPTIMIZERS:
        raise MemlmError(f"server optimizer must be one of {', '.join(SERVER_OPTIMIZERS)}, got {kind!r}")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise MemlmError(f"--server-lr must be a positive number, got {lr}")
    if not 0.0 <= beta1 < 1.0:
        raise MemlmError(f"--server-momentum must be in [0, 1), got {beta1}")
    if not 0.0 <= beta2 < 1.0:
        raise MemlmError(f"--server-beta2 must be in [0, 1), got {beta2}")
    if not (math.isfinite(tau) and tau > 0):
        raise MemlmError(f"--server-tau must be positive, got {tau}")


class ServerOptimizer:
    """One server step per round on the pseudo-gradient (see the module docstring)."""

    def __init__(self, kind: str = "fedavg", lr: float = 1.0, beta1: float = 0.9, beta2: float = 0.99,
                 tau: float = 1e-3):
        check_server_optimizer(kind, lr, beta1, beta2, tau)
        self.kind, self.lr, self.beta1, self.beta2, self.tau = kind, float(lr), beta1, beta2, tau
        self.steps = 0
        self.m: dict[str, torch.Tensor] = {}
        self.v: dict[str, torch.Tensor] = {}

    def step(self, global_state: dict[str, torch.Tensor], mean_state: dict[str, torch.Tensor]) -> dict:
        """The new global state from the current one and the clients' mean; updates the state.

        Returns: {"state": the new global state dict, "delta_norm": ||delta||, "step_norm": ||x' - x||}.
        Raises:
            MemlmError: the mean does not have the global student's entries and shapes.
        """
        if set(mean_state) != set(global_state):
            raise MemlmError("the clients' mean does not have the global student's parameters")
        out, delta_sq, step_sq = {}, 0.0, 0.0
        for k, x in global_state.items():
            avg = mean_state[k]
            if tuple(avg.shape) != tuple(x.shape):
                raise MemlmError(f"the clients' mean of {k!r} has shape {tuple(avg.shape)}, not {tuple(x.shape)}")
            if not x.is_floating_point():
                out[k] = avg.clone()
                continue
            delta = avg.double() - x.double()
            delta_sq += float(delta.pow(2).sum())
            move = self._move(k, delta)
            step_sq += float(move.pow(2).sum())
            out[k] = (x.double() + move).to(x.dtype)
        self.steps += 1
        return {"state": out, "delta_norm": math.sqrt(delta_sq), "step_norm": math.sqrt(step_sq)}

    def _move(self, key: str, delta: torch.Tensor) -> torch.Tensor:
        if self.kind == "fedavg":
            return delta
        if self.kind == "fedavgm":
            m = self.m[key] = self.beta1 * self.m[key] + delta if key in self.m else delta.clone()
            return self.lr * m
        m = self.m.get(key, torch.zeros_like(delta))
        v = self.v.get(key, torch.zeros_like(delta))
        m = self.m[key] = self.beta1 * m + (1 - self.beta1) * delta
        v = self.v[key] = self.beta2 * v + (1 - self.beta2) * delta.pow(2)
        return self.lr * m / (v.sqrt() + self.tau)

    def state_summary(self) -> dict:
        """Numbers for the round log: step count and the norms of the kept moments."""
        def norm(d):
            return math.sqrt(sum(float(t.pow(2).sum()) for t in d.values()))
        return {"server_steps": self.steps, "momentum_norm": norm(self.m), "second_moment_norm": norm(self.v)}
