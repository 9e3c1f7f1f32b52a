"""KVCacheManager: which KV blocks each sequence holds. Pure Python, no torch.

Owns: every sequence's block table (seq_id -> the block ids covering its positions 0, 1, ...),
allocating slots for a sequence's new tokens (all or nothing: a refusal leaves everything as it
was, so the scheduler can preempt and retry), freeing a sequence, forking (a child shares the
parent's full blocks by reference count), and the usage figures (used / free blocks, usage,
fragmentation). The `BlockPool` below it is reached only from here.
Does not know: scheduling policy (who runs, who is preempted: `engine/scheduler.py`), the tensors
behind a block (`store.py`), or tokens.

    block_size 4; seq 7 computed 10 tokens          table of seq 7: [0, 1, 2]
        block 0: [t0 t1 t2 t3]  block 1: [t4 .. t7]  block 2: [t8 t9 .  . ]
    fork(seq 7 -> seq 8, num_tokens=9)              table of seq 8: [0, 1]  (ref counts 2, 2, 1)
        seq 8 holds the KV of t0 .. t7 and recomputes from t8 into blocks of its own
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from memlm.kv.block_pool import BlockPool


class KVSequence(Protocol):
    """What the manager reads of a sequence (`engine.request.Sequence` has both)."""

    seq_id: int                  # unique within one engine
    num_computed_tokens: int     # positions 0 .. num_computed_tokens - 1 have their KV stored


class KVCacheManager:
    """Block tables of the sequences of one engine over one `BlockPool`."""

    def __init__(self, num_blocks: int, block_size: int):
        self.pool = BlockPool(num_blocks, block_size)   # read its ref counts; do not allocate from it
        self._tables: dict[int, list[int]] = {}

    # ---- sizes and usage -----------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def block_size(self) -> int:
        return self.pool.block_size

    @property
    def capacity_tokens(self) -> int:
        return self.pool.capacity_tokens

    @property
    def num_used_blocks(self) -> int:
        return self.pool.num_used_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def usage(self) -> float:
        """Fraction of the pool's blocks in use (shared blocks counted once)."""
        return self.pool.num_used_blocks / self.pool.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold `num_tokens` token slots."""
        return self.pool.blocks_for(num_tokens)

    def fragmentation(self, seqs: Iterable[KVSequence]) -> float:
        """Allocated-but-unused token slots / allocated slots, shared blocks counted once.

        Args:
            seqs: the sequences whose computed tokens count as used slots (the engine passes the
                running ones); a block's slots are used as far as its fullest holder filled it.
        """
        bs = self.pool.block_size
        allocated = self.pool.num_used_blocks * bs
        if not allocated:
            return 0.0
        filled: dict[int, int] = {}
        for seq in seqs:
            for j, b in enumerate(self._tables.get(seq.seq_id, ())):
                n = min(bs, max(0, seq.num_computed_tokens - j * bs))
                filled[b] = max(filled.get(b, 0), n)
        return 1.0 - sum(filled.values()) / allocated

    # ---- one sequence --------------------------------------------------------------------
    def block_table(self, seq: KVSequence) -> list[int]:
        """A copy of the blocks `seq` holds, in position order (empty if it holds none)."""
        return list(self._tables.get(seq.seq_id, ()))

    def num_blocks_needed(self, seq: KVSequence, num_new_tokens: int) -> int:
        """Free blocks `seq` would take to store `num_new_tokens` more tokens (0 if it has room)."""
        held = len(self._tables.get(seq.seq_id, ()))
        return max(0, self.pool.blocks_for(seq.num_computed_tokens + num_new_tokens) - held)

    def allocate_slots(self, seq: KVSequence, num_new_tokens: int) -> bool:
        """Give `seq` slots for `num_new_tokens` tokens after its computed ones.

        Returns:
            True when its table now covers them; False, with nothing taken, when too few blocks
            are free (the caller may free others, e.g. preempt, and ask again).
        """
        need = self.num_blocks_needed(seq, num_new_tokens)
        if need == 0:
            return True
        blocks = self.pool.allocate(need)
        if blocks is None:
            return False
        self._tables.setdefault(seq.seq_id, []).extend(blocks)
        return True

    def free(self, seq: KVSequence) -> None:
        """Drop every block reference `seq` holds (a no-op when it holds none); tail blocks are
        released first, so they are reused first."""
        blocks = self._tables.pop(seq.seq_id, None)
        if blocks:
            self.pool.free(blocks)

    def fork(self, parent: KVSequence, child: KVSequence, num_tokens: int) -> int:
        """Let `child` share the parent's blocks that are full within its first `num_tokens`
        positions (one more reference each; see the module diagram).

        Returns:
            The number of tokens whose KV `child` now holds: a multiple of block_size.
        """
        if self._tables.get(child.seq_id):
            raise RuntimeError(f"sequence {child.seq_id} already holds blocks and cannot fork")
        shared = self._tables.get(parent.seq_id, [])[:num_tokens // self.pool.block_size]
        if shared:
            self._tables[child.seq_id] = self.pool.share(shared)
        return len(shared) * self.pool.block_size
