"""Prefix-aware admission: compute a prompt prefix shared by sequences admitted together once.

Owns: which full prompt blocks a running sequence is computing right now ("in flight", by the
prefix-cache hash that names each block), and the decision to hold a waiting sequence back for
a step because the next block it would compute is one of them. When the owner has computed
those blocks they are in the prefix cache, and the held-back sequence is admitted with a hit
instead of computing the same system prompt again in the same steps (SGLang computes a shared
prefix once the same way, by its radix tree).

    step 1: A [sys0 sys1 sys2 a3]  admitted, computes all 4 blocks; sys0..sys2 are in flight
            B [sys0 sys1 sys2 b3]  its first uncached block (sys0) is in flight: held back
    step 2: B is admitted with a hit of 3 blocks and computes b3 only

Never starves: a sequence is held back only while its next block's owner is running and has
not computed it yet (a running owner is scheduled before any admission, so it progresses), the
entry is dropped when the owner is preempted, aborted or finished, no sequence is held back for
more than `max_deferred_steps` steps in all (counted from its arrival to its admission, not "in a
row": waiting on a second owner after the first does not start the count again, so the bound is on
the time to first token that holding back may add), and a held-back sequence keeps its place in
line (the scheduler leaves it its sequence slot and blocks while newer prompts are admitted past it).
Does not know: block tables or the cache itself (it asks the `KVCacheManager` for hashes and
hits), the step's token budget or preemption (`scheduler.py`), tensors.
"""
from __future__ import annotations

import os

from memlm.engine.request import Sequence
from memlm.kv.manager import KVCacheManager, PrefixHit

# Steps a sequence may wait on a shared prefix before it computes it. Off (0) by default: on
# benchmarks/multiturn.py (20 x 3, quiet, 2026-12-02 08:46 UTC, one run per bound, not alternated)
# holding back cost more than the repeated prefill it saves (TTFT p50 641 ms off, 745 ms at 2
# steps, 844 ms at 64 steps). Not yet re-measured after a held-back prompt keeps its place in line
# (that fix does not change that workload: its 20 conversations never fill the 128 sequence slots).
# MEMLM_MAX_DEFERRED_STEPS=N sets it for a process (a server, benchmarks/multiturn.py).
MAX_DEFERRED_STEPS = 0
ENV_MAX_DEFERRED_STEPS = "MEMLM_MAX_DEFERRED_STEPS"


def default_max_deferred_steps() -> int:
    """`MEMLM_MAX_DEFERRED_STEPS` when set (a whole number >= 0), else `MAX_DEFERRED_STEPS`."""
    raw = os.environ.get(ENV_MAX_DEFERRED_STEPS, "").strip()
    if not raw:
        return MAX_DEFERRED_STEPS
    if not raw.isdigit():
        raise ValueError(f"{ENV_MAX_DEFERRED_STEPS}={raw!r} is not a whole number of steps >= 0; "
                         "set it to e.g. 0 (off) or 2, or unset it")
    return int(raw)


class SharedPrefixes:
    """The in-flight full prompt blocks of one scheduler's running sequences."""

    def __init__(self, kv: KVCacheManager, max_deferred_steps: int | None = None):
        self.kv = kv
        if max_deferred_steps is None:
            max_deferred_steps = default_max_deferred_steps()
        if max_deferred_steps < 0:
            raise ValueError(f"max_deferred_steps must be >= 0 (0: never hold back), got {max_deferred_steps}")
        self.max_deferred_steps = max_deferred_steps
        self._owner: dict[bytes, Sequence] = {}            # block hash -> sequence computing it
        self._owned: dict[int, tuple[list[bytes], int]] = {}  # seq_id -> (its hashes, end token)
        self._deferred: dict[int, int] = {}                 # seq_id -> steps held back in all
        self.num_deferrals = 0                              # (sequence, step) pairs held back

    @property
    def enabled(self) -> bool:
        return self.kv.cache is not None and self.max_deferred_steps > 0

    def admitted(self, seq: Sequence, first_block: int) -> None:
        """`seq` was admitted and will compute its blocks from `first_block` on: its full
        blocks become in flight (where no older owner computes them already)."""
        self._deferred.pop(seq.seq_id, None)
        if not self.enabled:
            return
        end_block = seq.num_tokens // self.kv.block_size
        if end_block <= first_block:
            return
        hashes = self.kv.prefix_hashes(seq, end_block)[first_block:]
        mine = [h for h in hashes if self._owner.setdefault(h, seq) is seq]
        if mine:
            self._owned[seq.seq_id] = (mine, end_block * self.kv.block_size)

    def progressed(self, seq: Sequence) -> None:
        """After a step: once `seq` has computed all its in-flight blocks (they are cached now),
        it owns none."""
        owned = self._owned.get(seq.seq_id)
        if owned is not None and seq.num_computed_tokens >= owned[1]:
            self.release(seq)

    def release(self, seq: Sequence) -> None:
        """`seq` no longer computes its blocks (done, preempted, aborted or finished)."""
        owned = self._owned.pop(seq.seq_id, None)
        self._deferred.pop(seq.seq_id, None)
        if owned is None:
            return
        for h in owned[0]:
            if self._owner.get(h) is seq:
                del self._owner[h]

    def waits_on_owner(self, seq: Sequence, hit: PrefixHit) -> bool:
        """True when the first block `seq` would compute after its cached prefix `hit` is being
        computed by another running sequence now (no side effects)."""
        if not self.enabled or not self._owner:
            return False
        bs = self.kv.block_size
        nxt = hit.num_blocks
        if nxt >= (seq.num_tokens - 1) // bs:      # nothing shareable left to wait for
            return False
        owner = self._owner.get(self.kv.prefix_hashes(seq, nxt + 1)[nxt])
        return not (owner is None or owner is seq or owner.finished
                    or owner.num_computed_tokens >= (nxt + 1) * bs)

    def should_defer(self, seq: Sequence, hit: PrefixHit) -> bool:
        """`waits_on_owner`, within the bound of `max_deferred_steps` (counts this step as one
        held back when True)."""
        if not self.waits_on_owner(seq, hit):
            return False
        steps = self._deferred.get(seq.seq_id, 0)
        if steps >= self.max_deferred_steps:
            return False
        self._deferred[seq.seq_id] = steps + 1
        self.num_deferrals += 1
        return True
