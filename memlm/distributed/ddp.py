"""Data-parallel training under torchrun: the process group, and what the trainer asks of it.

Owns: reading the torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT), the
process group (gloo on CPU, nccl when each rank has a CUDA device), wrapping the loss in torch
DDP so gradients are all-reduced, the collectives a run needs (mean of a metric vector, a
barrier, "rank 0 first", agreement checks) and which rank prints and writes. Does not know: the
loop (`memlm.training.trainer` takes a `DataParallel` as a duck-typed `dist`), the data
(`WindowSampler(shard=...)` draws a rank's rows) or argparse.

    global batch of step s: B windows drawn from (seed, s)        (as a single process draws)
    rank r of W reads rows r, r+W, r+2W, ...  (B/W rows: disjoint, DistributedSampler-style)
    loss_r = mean over its rows; DDP averages the gradients over ranks = gradient of the
    global mean, so W ranks step exactly as one process with batch B would (up to rounding).

Checkpoints are written by rank 0 only; every rank reads the same checkpoint on resume, so the
checkpoint directory must be on a filesystem all nodes see (one node: any local path).
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as torch_dist
from torch import nn

from memlm.errors import MemlmError

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass(frozen=True)
class DistEnv:
    """One rank's place in the job, as torchrun describes it."""
    rank: int
    world_size: int
    local_rank: int

    def __post_init__(self):
        if self.world_size < 1 or not 0 <= self.rank < self.world_size or self.local_rank < 0:
            raise MemlmError(f"inconsistent torchrun environment: RANK={self.rank} WORLD_SIZE={self.world_size} "
                             f"LOCAL_RANK={self.local_rank}")


def env_from(environ=os.environ) -> DistEnv | None:
    """The torchrun environment, or None when the process was not started by torchrun."""
    if "WORLD_SIZE" not in environ:
        return None
    try:
        values = {k: int(environ.get(k, "0")) for k in TORCHRUN_VARS}
    except ValueError:
        raise MemlmError("RANK / WORLD_SIZE / LOCAL_RANK must be integers (start the run with torchrun)") from None
    return DistEnv(values["RANK"], values["WORLD_SIZE"], values["LOCAL_RANK"])


class _LossModule(nn.Module):
    """student + objective as one module, so DDP sees the forward that produces the loss (the
    objective calls the student's forward_dense/compute_logits, not its __call__)."""

    def __init__(self, model, objective):
        super().__init__()
        self.model, self.objective = model, objective

    def forward(self, batch: dict):
        return self.objective(self.model, batch)


class DataParallel:
    """The process group of one torchrun job, seen from one rank.

    Use `setup()` to create it from the environment; `close()` destroys the group.
    """

    def __init__(self, env: DistEnv, backend: str, device: torch.device):
        self.env, self.backend, self.device = env, backend, device

    @classmethod
    def setup(cls, env: DistEnv, backend: str = "auto", timeout_s: float = 1800.0) -> "DataParallel":
        """Join the job: gloo on CPU, nccl when CUDA is available (`backend="auto"`)."""
        if backend == "auto":
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend not in ("gloo", "nccl"):
            raise MemlmError(f"--ddp-backend must be auto, gloo or nccl, got {backend!r}")
        if backend == "nccl":
            if not torch.cuda.is_available():
                raise MemlmError("--ddp-backend nccl needs CUDA devices; use gloo on CPU")
            device = torch.device("cuda", env.local_rank % torch.cuda.device_count())
            torch.cuda.set_device(device)
        else:
            device = torch.device("cpu")
        if not torch_dist.is_initialized():
            for var in ("MASTER_ADDR", "MASTER_PORT"):
                if var not in os.environ:
                    raise MemlmError(f"{var} is not set: start the run with torchrun (it sets the rendezvous address)")
            torch_dist.init_process_group(backend, rank=env.rank, world_size=env.world_size,
                                          timeout=timedelta(seconds=timeout_s))
        return cls(env, backend, device)

    def close(self) -> None:
        if torch_dist.is_initialized():
            torch_dist.destroy_process_group()

    @property
    def rank(self) -> int:
        return self.env.rank

    @property
    def world_size(self) -> int:
        return self.env.world_size

    @property
    def is_main(self) -> bool:
        return self.env.rank == 0

    def local_batch_size(self, global_batch: int) -> int:
        """Rows per rank of a global batch (refused unless it divides evenly)."""
        if global_batch % self.world_size:
            raise MemlmError(f"--batch-size {global_batch} is the global batch: it must be divisible by the "
                             f"{self.world_size} ranks (each reads batch/{self.world_size} rows)")
        return global_batch // self.world_size

    def wrap(self, model, objective) -> nn.Module:
        """A DDP module whose forward(batch) returns (loss, metrics); its backward all-reduces."""
        module = _LossModule(model, objective).to(self.device)
        kwargs = {"device_ids": [self.device.index]} if self.device.type == "cuda" else {}
        return nn.parallel.DistributedDataParallel(module, find_unused_parameters=False, **kwargs)

    def all_mean(self, values: list[float]) -> list[float]:
        """The mean over ranks of each value (one all-reduce)."""
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch_dist.all_reduce(t)
        return (t / self.world_size).tolist()

    def all_sum(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch_dist.all_reduce(t)
        return t.tolist()

    def barrier(self) -> None:
        if self.backend == "nccl":
            torch_dist.barrier(device_ids=[self.device.index])
        else:
            torch_dist.barrier()

    @contextlib.contextmanager
    def main_first(self):
        """Rank 0 runs the block first (e.g. writes token files), then the others (which reuse them)."""
        if not self.is_main:
            self.barrier()
        try:
            yield
        finally:
            if self.is_main:
                self.barrier()

    def check_same(self, what: str, value: str) -> None:
        """Refuse to go on when ranks disagree on `value` (e.g. a tokenizer fingerprint)."""
        values: list = [None] * self.world_size
        torch_dist.all_gather_object(values, value)
        if len(set(values)) != 1:
            raise MemlmError(f"ranks disagree on the {what} ({sorted(set(values))}): every rank must see the "
                             "same files and settings")


def describe(dist: DataParallel) -> str:
    return (f"data-parallel: {dist.world_size} ranks ({dist.backend}), this is rank {dist.rank} "
            f"on {dist.device}")
