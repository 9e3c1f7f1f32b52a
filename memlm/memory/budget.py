"""MemoryBudget: the one number the whole process must stay under, its plan and its probes.

Owns: parsing/defaulting the budget, measuring the process (RSS, kernel peak RSS, resetting
the peak), the ledger (runtime baseline, weights, workspace, safety margin, KV pool) and the
arithmetic that turns what is left into a number of KV blocks. Fails with `OutOfBudgetError`
and one line saying how much is needed when the model cannot fit.
Does not know: models, tensors or scheduling; the engine measures a profile step and reports
the figures here.

    budget = baseline (RSS after imports + tokenizer, measured)
           + weights (bytes as stored)            + load overhead (measured)
           + workspace (peak of a warm-up step, measured)
           + safety margin (what the warm-up left resident + MIN_MARGIN + ALLOCATOR_SLACK)
           + KV pool (whatever is left, in whole blocks)
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import sys
from dataclasses import dataclass

from memlm.config import format_size, parse_size
from memlm.errors import OutOfBudgetError

DEFAULT_FRACTION = 0.5          # of available RAM when no budget is given
MIN_MARGIN = 24 * 2**20         # floor of the safety margin (Python objects, allocator slack)
MIN_KV_TOKENS = 256             # a pool smaller than this is not worth starting
# Heap growth from many small, interleaved allocations (token lists, strings, per-step index
# tensors) that the warm-up step cannot show. Measured: 64 chat requests under a 2 GiB budget
# peaked 36 MiB (1.8%) above the plan without it; 3% keeps a margin over that.
ALLOCATOR_SLACK = 0.03


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def current_rss() -> int:
    """Resident set size of this process now, in bytes."""
    v = _status_kib("VmRSS")
    if v is None:
        import psutil
        v = psutil.Process().memory_info().rss
    return v


def peak_rss() -> int:
    """The kernel's high-water mark of RSS (what `/usr/bin/time -v` reports), in bytes."""
    v = _status_kib("VmHWM")
    if v is None:
        import resource
        v = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return v


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux clear_refs); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


MMAP_THRESHOLD = 64 * 2**20     # allocations above this get their own mapping (the KV pool)
TRIM_THRESHOLD = 2**30          # free heap top glibc keeps instead of trimming on every free


def pin_malloc_thresholds() -> None:
    """Fix glibc's heap policy so that a step's tensors reuse the pages of the last step's.

    glibc's default moves its mmap threshold with every big free, so RSS drifts with the
    allocation history. A small fixed threshold (256 KiB, the first design) kept RSS equal to
    live data but put every activation on a fresh mapping: each step page-faulted and zeroed
    all of its activations again, 45% of a 4096-token bf16 prefill (2548 -> 1407 ms measured).
    Now everything below 64 MiB lives in the heap and stays resident between steps; RSS is then
    bounded by the peak of a step, which the warm-up profile measures (twice in a row, so the
    heap's reuse is in the figure), and the engine trims the heap every few dozen steps.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, MMAP_THRESHOLD)     # M_MMAP_THRESHOLD
        libc.mallopt(-1, TRIM_THRESHOLD)     # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


def release_free_heap() -> None:
    """Give freed heap pages back to the OS (glibc keeps them otherwise), so RSS = live data."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def available_ram() -> int:
    import psutil
    return int(psutil.virtual_memory().available)


@dataclass
class MemoryBudget:
    """The plan and the ledger. All figures in bytes; `None` until measured."""

    total: int
    baseline: int
    defaulted: bool = False
    weights: int = 0
    load_overhead: int = 0
    matmul_state: int = 0          # oneDNN per-shape state created by the warm-up, resident for good
    workspace: int = 0
    margin: int = MIN_MARGIN
    kv_pool: int = 0
    load_peak: int = 0

    @classmethod
    def create(cls, budget: str | int | None, verbose: bool = True) -> "MemoryBudget":
        """Measure the baseline now and check it fits. budget None: DEFAULT_FRACTION of free RAM."""
        pin_malloc_thresholds()
        defaulted = budget is None
        total = int(available_ram() * DEFAULT_FRACTION) if defaulted else parse_size(budget)
        if defaulted and verbose:
            print(f"memlm: memory budget {format_size(total)} ({DEFAULT_FRACTION:.0%} of available RAM; "
                  "set --memory-budget to change)", file=sys.stderr, flush=True)
        release_free_heap()        # freed heap pages are not part of the baseline
        b = cls(total=total, baseline=current_rss(), defaulted=defaulted)
        if b.baseline + MIN_MARGIN >= total:
            raise OutOfBudgetError(f"memory budget {format_size(total)} is below the runtime's own "
                                   f"{format_size(b.baseline + MIN_MARGIN)}; use at least "
                                   f"{format_size(b.baseline + MIN_MARGIN + 64 * 2**20)}")
        return b

    def check_load_fits(self, weights: int, largest_tensor: int, what: str = "the model") -> None:
        """Refuse, before reading any weight, a load whose peak could not fit the budget.

        The load peak is the runtime baseline, the weights as loaded, and the loader's
        temporary copy of the tensor being dequantized or converted (measured on SmolLM2: peak
        629 MiB above baseline for 513 MiB of weights whose largest tensor is 108 MiB).
        A load that passes this check is still measured (`loading`).
        """
        need = current_rss() + weights + largest_tensor
        if need > self.total:
            raise OutOfBudgetError(f"loading {what} needs about {format_size(need)} "
                                   f"({format_size(weights)} of weights), over the "
                                   f"{format_size(self.total)} budget; use --memory-budget "
                                   f"{_round_up(need + 256 * 2**20)} or more")

    @contextlib.contextmanager
    def loading(self):
        """Wrap model loading: records weights + overhead and fails if loading broke the budget."""
        before = current_rss()
        reset_peak_rss()
        yield self
        self.load_peak = peak_rss()
        release_free_heap()
        after = current_rss()
        self.load_overhead = max(0, after - before)     # weights + tokenizer as resident now
        if self.load_peak > self.total:
            raise OutOfBudgetError(f"loading the model peaked at {format_size(self.load_peak)}, over the "
                                   f"{format_size(self.total)} budget; use --memory-budget "
                                   f"{_round_up(self.load_peak + 256 * 2**20)} or more")

    @property
    def used_before_kv(self) -> int:
        """Everything but the KV pool: what is resident now plus the step workspace and margin."""
        return self.baseline + self.load_overhead + self.matmul_state + self.workspace + self.margin

    def plan_kv_blocks(self, resident_now: int, bytes_per_block: int, block_size: int,
                       min_tokens: int = MIN_KV_TOKENS) -> int:
        """How many KV blocks fit in what is left; raises if not even `min_tokens` fit.

        Args:
            resident_now: RSS measured after loading and profiling (freed workspace excluded).
        """
        blocks = max(0, (self.total - resident_now - self.workspace - self.margin) // bytes_per_block)
        min_blocks = -(-min_tokens // block_size)
        if blocks < min_blocks:
            need = resident_now + self.workspace + self.margin + min_blocks * bytes_per_block
            raise OutOfBudgetError(f"memory budget {format_size(self.total)} cannot hold the model and a "
                                   f"minimal KV cache ({min_tokens} tokens): needs at least "
                                   f"{format_size(need)}; use --memory-budget {_round_up(need)}")
        self.kv_pool = blocks * bytes_per_block
        return int(blocks)

    def describe(self, block_size: int, num_blocks: int) -> str:
        """A few lines for `memlm info --memory-budget` and verbose start-up."""
        rows = [("budget", self.total), ("runtime baseline", self.baseline),
                ("weights + tokenizer (resident)", self.load_overhead),
                ("matmul state (warm-up)", self.matmul_state),
                ("step workspace (profiled)", self.workspace), ("safety margin", self.margin),
                ("KV pool", self.kv_pool)]
        lines = [f"  {name:<32}{format_size(v):>12}" for name, v in rows]
        lines.append(f"  {'KV blocks':<32}{num_blocks:>12} x {block_size} tokens = "
                     f"{num_blocks * block_size} tokens")
        return "\n".join(lines)


def _round_up(n: int) -> str:
    """A size a user can type: n rounded up to 64 MiB, as MiB or GiB."""
    step = 64 * 2**20
    n = -(-n // step) * step
    return f"{n / 2**30:g}GiB" if n % 2**30 == 0 else f"{n // 2**20}MiB"
