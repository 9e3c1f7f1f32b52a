"""KV block bookkeeping: block ids, the free queue and reference counts. Pure Python, no torch.

Owns: which fixed-size KV blocks are free, how many references each holds, and the order in
which freed blocks are reused. With a `PrefixCache`, a cached block whose last reference goes is
handed to the cache (evictable, its K/V kept) instead of the free queue, and allocation reclaims
evictable blocks only once the free queue is empty; evictable blocks count as free.
Does not know: what a block contains (the tensors live in `store.py`), which sequence holds
which block (`manager.py`), hashes or eviction order (`prefix_cache.py`), or scheduling policy.

    ids:        0    1    2    3    4    5
    ref count: [1]  [2]  [0]  [1]  [0]  [0]      block 1 shared by two sequences (n > 1 fork)
    free queue: 2 -> 4                           allocate() pops from the left;
                                                 free() appends released blocks on the right
    evictable:  5 (cached)                       allocate() evicts once the queue is empty;
                                                 touch() takes it back on a prefix hit
"""
from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from memlm.kv.prefix_cache import PrefixCache


class BlockPool:
    """A fixed number of KV blocks of `block_size` token slots each."""

    def __init__(self, num_blocks: int, block_size: int, cache: PrefixCache | None = None):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"BlockPool needs num_blocks >= 1 and block_size >= 1, "
                             f"got {num_blocks} and {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.cache = cache
        self.ref_counts = [0] * num_blocks
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation can take: the free queue plus evictable cached blocks."""
        return len(self._free) + (self.cache.num_evictable if self.cache is not None else 0)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold `num_tokens` token slots."""
        return -(-num_tokens // self.block_size)

    def allocate(self, n: int) -> list[int] | None:
        """Take `n` free blocks (ref count 1 each), all or nothing; None when too few are free."""
        if n > self.num_free_blocks:
            return None
        out = [self._free.popleft() if self._free else self.cache.evict() for _ in range(n)]
        for b in out:
            self.ref_counts[b] = 1
        return out

    def touch(self, block_ids: list[int]) -> list[int]:
        """Add one reference to each cached block a prefix hit reuses (evictable ones included)."""
        for b in block_ids:
            if self.ref_counts[b] == 0:
                if self.cache is None or not self.cache.is_evictable(b):
                    raise RuntimeError(f"block {b} is free and holds no cached prefix")
                self.cache.reuse(b)
            self.ref_counts[b] += 1
        return list(block_ids)

    def share(self, block_ids: list[int]) -> list[int]:
        """Add one reference to each block (a forked sequence reading the same KV)."""
        for b in block_ids:
            if self.ref_counts[b] <= 0:
                raise RuntimeError(f"block {b} is free and cannot be shared")
            self.ref_counts[b] += 1
        return list(block_ids)

    def free(self, block_ids: list[int]) -> None:
        """Drop one reference to each block; blocks reaching zero go to the free queue.

        Blocks are released last-to-first, so a sequence's tail blocks are reused first and its
        (possibly shared) prompt blocks stay untouched longest. Cached blocks reaching zero go
        to the prefix cache (evictable) instead.
        """
        for b in reversed(block_ids):
            if self.ref_counts[b] <= 0:
                raise RuntimeError(f"block {b} freed twice")
            self.ref_counts[b] -= 1
            if self.ref_counts[b] == 0:
                if self.cache is not None and self.cache.is_cached(b):
                    self.cache.release(b)
                else:
                    self._free.append(b)
