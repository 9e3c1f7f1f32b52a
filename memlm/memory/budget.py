"""MemoryBudget: the one number the whole process must stay under, and the probes that measure it.

Owns: parsing/defaulting the budget, measuring the process (RSS, kernel peak RSS, one phase's
peak without hiding the process's, trimming the heap), the runtime baseline, and guarding the
model load (refused before it starts when the file headers say it cannot fit; measured while
it runs). Fails with
`OutOfBudgetError` and one line saying how much is needed.
Does not know: models, tensors or scheduling. What the rest of the budget buys (workspace,
margin, KV blocks) is `memory/plan.py`'s arithmetic over these measurements.
"""
from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import sys
from dataclasses import dataclass

from memlm.config import format_size, parse_size
from memlm.errors import OutOfBudgetError
from memlm.memory.resident import drop_text_pages

DEFAULT_FRACTION = 0.5          # of available RAM when no budget is given
MIN_MARGIN = 24 * 2**20         # floor of the safety margin (Python objects, allocator slack)
# What a budget needs beyond a load's own peak for the smallest step and KV cache (SmolLM2,
# measured: the load check's 317 MiB vs 367 MiB that the plan needs); the load errors advise the
# load's peak plus this, and the plan's own error (after loading) names the measured figure.
LOAD_ADVICE_REST = 64 * 2**20
ADVICE_STEP = 16 * 2**20


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
    """The kernel's high-water mark of RSS (VmHWM: what wait4 and `/usr/bin/time -v` report at
    exit), in bytes: the process's peak so far, except inside a `phase_peak` block."""
    v = _status_kib("VmHWM")
    if v is None:
        import resource
        v = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return v


@dataclass
class PhasePeak:
    """What `phase_peak` measured, in bytes: the phase's own peak RSS (0 until the block ends)."""

    peak: int = 0
    isolated: bool = False      # False: the reset is unsupported and `peak` is the process's


def _reset_mark() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _raise_mark_to(mark: int) -> None:
    """Touch anonymous pages until RSS reaches `mark`, then unmap them: the kernel's mark is then
    at least `mark` again. RSS never goes above a peak the process had already reached."""
    need = mark - current_rss()
    if need < mmap.PAGESIZE:
        return
    with mmap.mmap(-1, need) as pages:
        for i in range(0, need, mmap.PAGESIZE):
            pages[i] = 1


@contextlib.contextmanager
def phase_peak():
    """Measure the peak RSS of the code in the block, without hiding the process's peak.

    The kernel keeps one high-water mark per process, and it is the one wait4 and
    `/usr/bin/time -v` report at exit: seeing one phase's peak means resetting it (clear_refs).
    So the block starts with a reset and ends by putting the process's mark back (touching
    anonymous pages up to the old mark and unmapping them, a few ms per 100 MiB), and every
    outside tool still reports the process's true peak. Not for concurrent phases.
    """
    mark = peak_rss()
    res = PhasePeak(isolated=_reset_mark())
    try:
        yield res
    finally:
        res.peak = peak_rss()
        if res.isolated and res.peak < mark:
            _raise_mark_to(mark)


_LIBC: list = []


def release_free_heap() -> None:
    """Give freed heap pages back to the OS (glibc keeps them otherwise), so RSS = live data."""
    try:
        if not _LIBC:
            _LIBC.append(ctypes.CDLL("libc.so.6"))
        _LIBC[0].malloc_trim(0)
    except (OSError, AttributeError):
        pass


def available_ram() -> int:
    import psutil
    return int(psutil.virtual_memory().available)


@dataclass
class MemoryBudget:
    """What was measured before the engine plans: the budget, the baseline, the load. Bytes."""

    total: int
    baseline: int
    defaulted: bool = False
    load_overhead: int = 0         # weights + tokenizer as resident after loading (measured)
    load_peak: int = 0             # kernel high-water mark while loading (measured)

    @classmethod
    def create(cls, budget: str | int | None, verbose: bool = True) -> "MemoryBudget":
        """Measure the baseline now and check it fits. budget None: DEFAULT_FRACTION of free RAM."""
        defaulted = budget is None
        total = int(available_ram() * DEFAULT_FRACTION) if defaulted else parse_size(budget)
        if defaulted and verbose:
            print(f"memlm: memory budget {format_size(total)} ({DEFAULT_FRACTION:.0%} of available RAM; "
                  "set --memory-budget to change)", file=sys.stderr, flush=True)
        release_free_heap()        # freed heap pages are not part of the baseline
        drop_text_pages()          # nor library code that start-up ran once (memory/resident.py)
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
                                   f"{round_up(need + LOAD_ADVICE_REST, ADVICE_STEP)} or more")

    @contextlib.contextmanager
    def loading(self):
        """Wrap model loading: records weights + overhead and fails if loading broke the budget."""
        before = current_rss()
        with phase_peak() as load:
            yield self
        self.load_peak = load.peak
        release_free_heap()
        after = current_rss()
        self.load_overhead = max(0, after - before)     # weights + tokenizer as resident now
        drop_text_pages()          # the loaders' code ran once: the engine's warm-up starts lower
        if self.load_peak > self.total:
            raise OutOfBudgetError(f"loading the model peaked at {format_size(self.load_peak)}, over the "
                                   f"{format_size(self.total)} budget; use --memory-budget "
                                   f"{round_up(self.load_peak + LOAD_ADVICE_REST, ADVICE_STEP)} or more")


def round_up(n: int, step: int = 64 * 2**20) -> str:
    """A size a user can type: n rounded up to `step` (64 MiB), as MiB or GiB."""
    n = -(-n // step) * step
    return f"{n / 2**30:g}GiB" if n % 2**30 == 0 else f"{n // 2**20}MiB"
