"""Restore-versus-recompute: when moving KV to a tier and back pays, and who keeps memory first.

Owns: `Priority` (running > swapped-out request > cached prefix > idle session: the order in
which tiers give room), `Tier`, and `CostModel`: predicted seconds to recompute `t` tokens
(from the engine's measured prefill tokens/s) against seconds to save and restore their bytes
(export + compress, then decompress + copy for warm, + file read for cold), each rate starting
at a default and replaced by moving averages of what this process measured. A tier is used only
when restoring is predicted cheaper than recomputing (a disk hit slower than recompute is the
failure SGLang #26305 and LMCache #970 report).
Does not know: blocks, tensors, files (`offload.py` measures and asks; `tiers.py` stores).

    swap out + in:  save(raw) + restore(tier, raw)   <  recompute(tokens)   -> swap, else recompute
    resume session:          restore(tier, raw)   <  recompute(tokens)   -> restore, else recompute
"""
from __future__ import annotations

import enum
from dataclasses import dataclass

# Defaults until this process has measured its own rates (2 vCPU Zen 5 magnitudes, conservative).
PREFILL_TOKENS_PER_S = 1000.0       # replaced by the engine's measured prefill rate
SAVE_BYTES_PER_S = 400e6            # raw KV bytes exported + zstd-compressed per second
WARM_RESTORE_BYTES_PER_S = 800e6    # raw KV bytes decompressed + copied into the pool per second
COLD_RESTORE_BYTES_PER_S = 300e6    # the same, reading the compressed file first
EMA = 0.3                           # weight of a new measurement once one exists
MIN_SECONDS = 1e-4                  # measurements shorter than this are too noisy to learn from


class Priority(enum.IntEnum):
    """Who keeps memory first; a tier evicts lower priorities to make room for higher ones."""

    IDLE_SESSION = 0
    CACHED_PREFIX = 1
    SWAPPED = 2
    RUNNING = 3


class Tier(enum.Enum):
    WARM = "warm"      # compressed blobs in RAM, inside the memory budget
    COLD = "cold"      # checksummed files, inside the disk budget


@dataclass
class CostModel:
    """Rates in tokens or raw (uncompressed) KV bytes per second; see the module docstring."""

    prefill_tokens_per_s: float = PREFILL_TOKENS_PER_S
    save_bytes_per_s: float = SAVE_BYTES_PER_S
    warm_restore_bytes_per_s: float = WARM_RESTORE_BYTES_PER_S
    cold_restore_bytes_per_s: float = COLD_RESTORE_BYTES_PER_S
    learn: bool = True            # False: keep the rates as set (a known machine; tests)

    def __post_init__(self):
        self._measured: set[str] = set()

    # ---- predictions ---------------------------------------------------------------------
    def recompute_seconds(self, tokens: int) -> float:
        return tokens / self.prefill_tokens_per_s

    def restore_seconds(self, tier: Tier, raw_bytes: int) -> float:
        rate = self.warm_restore_bytes_per_s if tier is Tier.WARM else self.cold_restore_bytes_per_s
        return raw_bytes / rate

    def save_seconds(self, raw_bytes: int) -> float:
        return raw_bytes / self.save_bytes_per_s

    def worth_swapping(self, tier: Tier, tokens: int, raw_bytes: int) -> bool:
        """True when saving to `tier` and restoring later beats recomputing `tokens`."""
        return self.save_seconds(raw_bytes) + self.restore_seconds(tier, raw_bytes) \
            < self.recompute_seconds(tokens)

    def worth_restoring(self, tier: Tier, tokens: int, raw_bytes: int) -> bool:
        """True when restoring already saved KV from `tier` beats recomputing `tokens`."""
        return self.restore_seconds(tier, raw_bytes) < self.recompute_seconds(tokens)

    # ---- measurements --------------------------------------------------------------------
    def observe_prefill(self, tokens: int, seconds: float) -> None:
        self._learn("prefill_tokens_per_s", tokens, seconds)

    def observe_save(self, raw_bytes: int, seconds: float) -> None:
        self._learn("save_bytes_per_s", raw_bytes, seconds)

    def observe_restore(self, tier: Tier, raw_bytes: int, seconds: float) -> None:
        self._learn("warm_restore_bytes_per_s" if tier is Tier.WARM else "cold_restore_bytes_per_s",
                    raw_bytes, seconds)

    def _learn(self, name: str, amount: int, seconds: float) -> None:
        if not self.learn or amount <= 0 or seconds < MIN_SECONDS:
            return
        rate = amount / seconds
        if name in self._measured:
            rate = (1 - EMA) * getattr(self, name) + EMA * rate
        self._measured.add(name)
        setattr(self, name, rate)
