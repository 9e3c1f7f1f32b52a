"""What one scheduling step hands the runner: `ScheduledSeq` (one sequence's share of the step)
and `SchedulerOutput` (the step: scheduled sequences in batch order, preempted and freed ids, the
KV policy's slot moves).

Owns: these two records. Does not know: how they are chosen (`scheduler.py`) or computed
(`runner.py`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from memlm.engine.eviction import SlotMoves
from memlm.engine.request import Sequence


@dataclass
class ScheduledSeq:
    """One sequence's share of a step."""

    seq: Sequence
    start: int                 # first position computed this step (= tokens already computed)
    num_tokens: int            # tokens computed this step
    token_ids: list[int]       # (num_tokens,) their ids
    block_table: list[int]     # blocks covering cache entries 0 .. cache_start + num_tokens - 1
    cache_start: int = -1      # cache entry of the first (= start unless a KV policy evicted)

    def __post_init__(self):
        if self.cache_start < 0:
            self.cache_start = self.start

    @property
    def samples(self) -> bool:
        """True when this chunk reaches the sequence's end, so its last row is sampled."""
        return self.start + self.num_tokens == self.seq.num_tokens

    @property
    def is_decode(self) -> bool:
        return self.num_tokens == 1 and self.start > 0


@dataclass
class SchedulerOutput:
    """What the runner must compute this step."""

    scheduled: list[ScheduledSeq]                             # in batch order
    preempted_seq_ids: list[int] = field(default_factory=list)  # KV dropped; state must reset
    freed_seq_ids: list[int] = field(default_factory=list)      # finished since the last step
    kv_moves: SlotMoves = field(default_factory=SlotMoves)      # KV policy packing, before the forward

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled
