"""Which evictable cached block the prefix cache reclaims first: plain LRU or cost-aware GDSF.

Owns: `CachedBlock` (what the cache records of a block, and what a policy ranks), the
`EvictionPolicy` protocol and its two implementations, and `make_policy` (the names of
`--prefix-cache-policy`). Pure Python, no torch.
Does not know: hashes, ref counts or the free queue (`prefix_cache.py` tells a policy when a
block becomes evictable, is reused, or gains / loses its last cached child; it asks for a victim
only when the pool has no free block left), nor priorities across kinds of memory (running >
swapped-out > cached prefix > idle session: the tiers' cost model).

    LRU (vLLM's baseline): evict the block that became evictable longest ago; a finished
        sequence's blocks are released tail first, so its last block goes before its first.
    GDSF (GreedyDual-Size-Frequency, cost-aware): priority = clock + frequency x recompute
        cost; evict the lowest priority, then set clock to it (so blocks not used for a while
        age out); only leaves (no cached child) are candidates, so a block shared by many
        chains is worth its whole chain and stays while any of them does.
"""
from __future__ import annotations

import heapq
import itertools
from collections import OrderedDict
from dataclasses import dataclass
from typing import Protocol

POLICIES = ("lru", "cost")


@dataclass
class CachedBlock:
    """What the cache knows about one cached block."""

    block_id: int
    block_hash: bytes
    parent_hash: bytes | None     # None for a sequence's first block
    depth: int                    # index of the block in its chain (0 = first)
    token_ids: tuple[int, ...]    # the block's own tokens (what a tier needs to re-key it)
    hits: int = 0                 # times a new sequence found it (not counting who computed it)


class EvictionPolicy(Protocol):
    """Told about evictable blocks; picks the victim."""

    name: str

    def add(self, block: CachedBlock, is_leaf: bool) -> None:
        """`block` became evictable (its last reference went)."""

    def remove(self, block: CachedBlock) -> None:
        """`block` is referenced again (a hit) and no longer evictable."""

    def update(self, block: CachedBlock, is_leaf: bool) -> None:
        """An evictable `block` gained its first, or lost its last, cached child."""

    def pop(self) -> CachedBlock:
        """Remove and return the next victim (only called while some block is evictable)."""


class LRUPolicy:
    """Least recently released first (vLLM's free-queue order)."""

    name = "lru"

    def __init__(self):
        self._order: OrderedDict[int, CachedBlock] = OrderedDict()

    def add(self, block: CachedBlock, is_leaf: bool) -> None:
        self._order[block.block_id] = block

    def remove(self, block: CachedBlock) -> None:
        del self._order[block.block_id]

    def update(self, block: CachedBlock, is_leaf: bool) -> None:
        pass                                  # LRU ignores the chain structure

    def pop(self) -> CachedBlock:
        return self._order.popitem(last=False)[1]


class CostAwarePolicy:
    """GreedyDual-Size-Frequency over leaf blocks (all blocks have the same size: one block).

    Recompute cost of a block at depth d (its tokens attend to d + 1/2 blocks before them):
    1 + (d + 1/2) * block_size / attention_scale, where `attention_scale` is the context length
    at which a token's attention costs as much as its matmuls (about 6 x hidden size).
    """

    name = "cost"

    def __init__(self, block_size: int, attention_scale: float):
        if attention_scale <= 0:
            raise ValueError(f"attention_scale must be > 0, got {attention_scale}")
        self.block_size, self.attention_scale = block_size, attention_scale
        self.clock = 0.0
        self._priority: dict[int, float] = {}        # evictable block id -> priority
        self._heap: list[tuple[float, int, int]] = []  # (priority, order, block id): leaves only
        self._entry: dict[int, int] = {}               # block id -> order of its live heap entry
        self._blocks: dict[int, CachedBlock] = {}
        self._order = itertools.count()

    def cost(self, block: CachedBlock) -> float:
        return 1.0 + (block.depth + 0.5) * self.block_size / self.attention_scale

    def add(self, block: CachedBlock, is_leaf: bool) -> None:
        b = block.block_id
        self._priority[b] = self.clock + (1 + block.hits) * self.cost(block)
        self._blocks[b] = block
        if is_leaf:
            self._push(b)

    def remove(self, block: CachedBlock) -> None:
        b = block.block_id
        del self._priority[b], self._blocks[b]
        self._entry.pop(b, None)

    def update(self, block: CachedBlock, is_leaf: bool) -> None:
        b = block.block_id
        if not is_leaf:
            self._entry.pop(b, None)
            return
        # Exposed by its last child's eviction: worth at least what that child was (the clock).
        self._priority[b] = max(self._priority[b], self.clock)
        self._push(b)

    def pop(self) -> CachedBlock:
        while self._heap:
            priority, order, b = heapq.heappop(self._heap)
            if self._entry.get(b) == order:          # else a stale entry: skip it
                del self._entry[b]
                self.clock = priority
                block = self._blocks.pop(b)
                del self._priority[b]
                return block
        raise RuntimeError("no evictable leaf block (the cache's chain counts are inconsistent)")

    def _push(self, b: int) -> None:
        if len(self._heap) > 2 * len(self._entry) + 64:     # mostly stale entries: rebuild
            self._heap = [(self._priority[k], o, k) for k, o in self._entry.items()]
            heapq.heapify(self._heap)
        order = next(self._order)
        self._entry[b] = order
        heapq.heappush(self._heap, (self._priority[b], order, b))


def make_policy(name: str, block_size: int, attention_scale: float) -> EvictionPolicy:
    """The policy named by `--prefix-cache-policy` (`lru` or `cost`)."""
    if name == "lru":
        return LRUPolicy()
    if name == "cost":
        return CostAwarePolicy(block_size, attention_scale)
    raise ValueError(f"unknown prefix cache policy {name!r}; choose one of {', '.join(POLICIES)}")
