"""The memory plan: one function turns the budget, the measured step profile and the model's KV
shape into a typed, frozen `MemoryPlan` that the engine applies and `memlm info` prints.

    budget = runtime baseline (RSS after imports, measured)
           + weights + tokenizer (resident after loading, measured)
           + matmul state (what the warm-up left for good: oneDNN per-shape state, measured)
           + step workspace (peak of two warm-up steps of the largest shape, measured)
           + safety margin (MIN_MARGIN + what the profile steps left resident + ALLOCATOR_SLACK)
           + KV memory (whatever is left): the warm tier's share (EngineConfig.warm_fraction:
             compressed KV of swapped-out requests and idle sessions) + the hot pool, in whole blocks

Owns: that arithmetic, the cap on useful blocks, the refusal (`OutOfBudgetError` with the size
to ask for) when not even a minimal KV cache fits, and the heap-trim threshold derived from it.
Does not know: how the profile is measured (the engine runs the steps, `memory/budget.py`
reads RSS) or what a block holds (the KV store says how many bytes one takes).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from memlm.config import format_size
from memlm.errors import OutOfBudgetError
from memlm.memory.budget import MIN_MARGIN, MemoryBudget, round_up

MIN_KV_TOKENS = 256             # a pool smaller than this is not worth starting
# Heap growth from many small, interleaved allocations (token lists, strings, per-step index
# tensors) that the warm-up step cannot show. Measured: 64 chat requests under a 2 GiB budget
# peaked 36 MiB (1.8%) above the plan without it; 3% keeps a margin over that.
ALLOCATOR_SLACK = 0.03
# The heap keeps freed activations for the next step (runtime.pin_malloc_thresholds). Across
# steps of varying shapes it can hold more than the two profiled steps did, so once RSS between
# steps leaves less than this fraction of the workspace plus the margin, the engine trims it.
TRIM_ROOM = 0.5
# The "budget too small" advice is rounded up to this (the bisection in
# benchmarks/single_stream.py --min-budget confirms sizes to 16 MiB as well).
NEED_STEP = 16 * 2**20
# ...after adding this headroom: the need is measured (RSS of the load, the profiled steps), and
# a second process at the named size measures again. CI saw the same chat need 1.1 MiB more at
# the named 400 MiB than the refused run had measured, so the advice keeps a margin over it.
NEED_HEADROOM = 8 * 2**20


@dataclass(frozen=True)
class StepProfile:
    """What the engine's warm-up measured, in bytes."""

    matmul_state: int       # resident for good after the first warm-up step
    workspace: int          # peak above the pre-step RSS of the largest step
    left_resident: int      # what the profile steps left resident after a heap trim
    resident_after: int     # RSS once profiling is done (the figure the pool is planned from)
    text_dropped: int = 0   # library code pages handed back to the page cache (memory/resident.py)


@dataclass(frozen=True)
class MemoryPlan:
    """Where every byte of the budget goes. `total` None: no budget (GPU memory, tests)."""

    block_size: int
    block_bytes: int
    num_blocks: int
    kv_dtype: str
    total: int | None = None
    baseline: int = 0
    weights: int = 0
    load_overhead: int = 0
    matmul_state: int = 0
    workspace: int = 0
    margin: int = 0
    warm_bytes: int = 0       # the warm KV tier's capacity (compressed blobs in RAM)
    kv_window: int = 0        # int4 / int2 KV: fp16 window of partial blocks (kv/window.py)
    text_dropped: int = 0     # code pages handed back to the page cache after warm-up
    step_tokens: int = 0      # the step the plan was profiled at (max_num_batched_tokens) ...
    step_seqs: int = 0        # ... and its max_num_seqs

    @property
    def kv_pool(self) -> int:
        return self.num_blocks * self.block_bytes

    @property
    def kv_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def trim_above(self) -> int | None:
        """RSS between steps above which the engine trims the heap (None without a budget)."""
        if self.total is None:
            return None
        return self.total - self.margin - int(self.workspace * TRIM_ROOM)

    def describe(self) -> str:
        """A few lines for `memlm info --memory-budget` and verbose start-up."""
        blocks = (f"  {'KV blocks':<32}{self.num_blocks:>12} x {self.block_size} tokens = "
                  f"{self.kv_tokens} tokens ({self.kv_dtype})")
        if self.total is None:
            return f"  KV pool: {self.num_blocks} blocks x {self.block_size} tokens ({self.kv_dtype}), no budget"
        rows = [("budget", self.total), ("runtime baseline", self.baseline),
                ("weights + tokenizer (resident)", self.load_overhead),
                ("matmul state (warm-up)", self.matmul_state)]
        if self.text_dropped:      # negative: resident before, handed back after the warm-up
            rows.append(("code pages dropped (page cache)", -self.text_dropped))
        rows += [("step workspace (profiled)", self.workspace), ("safety margin", self.margin),
                 ("KV pool", self.kv_pool)]
        if self.kv_window:
            rows.append(("KV fp16 window", self.kv_window))
        if self.warm_bytes:
            rows.append(("warm KV tier", self.warm_bytes))
        step = ([f"  {'step (profiled)':<32}{self.step_tokens:>12} tokens, {self.step_seqs} sequences"]
                if self.step_tokens else [])
        return "\n".join([f"  {name:<32}{_signed(v):>12}" for name, v in rows] + [blocks] + step)


def _signed(n: int) -> str:
    return "-" + format_size(-n) if n < 0 else format_size(n)


def min_budget(profile: StepProfile, kv_bytes: int) -> int:
    """The smallest budget whose plan (the arithmetic of `plan_memory`) holds `profile` and
    `kv_bytes` of KV memory: the margin grows with the budget (ALLOCATOR_SLACK), so solve for it."""
    fixed = profile.resident_after + profile.workspace + MIN_MARGIN + profile.left_resident + kv_bytes
    return -(-fixed * 1000 // (1000 - int(ALLOCATOR_SLACK * 1000)))


def fit_step(room: int, candidates: list[tuple[int, int]],
             estimate: Callable[[int, int], int]) -> tuple[int, int]:
    """The first (largest) (tokens, seqs) step whose `estimate` of its memory (resident state +
    workspace) fits `room` bytes; the last (the floor) when none does. Candidates go from the
    configured step down, so a budget that holds the configured step keeps it unchanged."""
    for tokens, seqs in candidates:
        if estimate(tokens, seqs) <= room:
            return tokens, seqs
    return candidates[-1]


def plan_memory(budget: MemoryBudget, profile: StepProfile, weights: int, block_bytes: int,
                block_size: int, kv_dtype: str, max_blocks: int | None = None,
                min_tokens: int = MIN_KV_TOKENS, warm_fraction: float = 0.0,
                kv_window: int = 0) -> MemoryPlan:
    """The plan for `budget` after loading and profiling; raises if not even `min_tokens` fit.

    Args:
        weights: bytes of the weights as stored (reported; the resident figure is measured).
        block_bytes: bytes of one KV block across all layers.
        max_blocks: blocks the engine can ever use (every sequence at full length) or an
            explicit override; the plan never exceeds it, nor what the budget leaves.
        warm_fraction: share of the KV memory reserved for the warm tier, taken before blocks.
        kv_window: bytes of the fp16 window of int4 / int2 KV (`kv/window.py`), taken before blocks.
    """
    margin = MIN_MARGIN + profile.left_resident + int(budget.total * ALLOCATOR_SLACK)
    left = budget.total - profile.resident_after - profile.workspace - margin - kv_window
    warm = int(max(0, left) * warm_fraction)
    blocks = max(0, (left - warm) // block_bytes)
    min_blocks = -(-min_tokens // block_size)
    if blocks < min_blocks:
        kv_need = int(min_blocks * block_bytes / (1 - warm_fraction))
        need = min_budget(profile, kv_window + kv_need)
        raise OutOfBudgetError(f"memory budget {format_size(budget.total)} cannot hold the model and a "
                               f"minimal KV cache ({min_tokens} tokens): needs at least "
                               f"{format_size(need)}; use --memory-budget {round_up(need + NEED_HEADROOM, NEED_STEP)}")
    if max_blocks is not None:
        blocks = min(blocks, max_blocks)
    return MemoryPlan(block_size=block_size, block_bytes=block_bytes, num_blocks=max(1, int(blocks)),
                      kv_dtype=kv_dtype, total=budget.total, baseline=budget.baseline, weights=weights,
                      load_overhead=budget.load_overhead, matmul_state=profile.matmul_state,
                      workspace=profile.workspace, margin=margin, warm_bytes=warm, kv_window=kv_window,
                      text_dropped=profile.text_dropped)
