"""Cached-prefix blocks that the prefix cache evicts, kept in the warm / cold tier by their hash.

Owns: the `on_evict` side of the prefix cache — a victim block that was reused before (a hit, or it
came back from a tier: its expected reuse is not zero) and whose save + restore is predicted cheaper than recomputing its
tokens is encoded as a one-block `KVEntry` and kept under `p-<hash>` in the warm tier (priority
`CACHED_PREFIX`), else the cold tier (through its background writer); and the lookup side —
`available` counts the consecutive blocks after a hot prefix hit that a tier holds and restoring
pays for, and `restore` copies them into the blocks just allocated for the sequence. A restored
block is checked (checksum, fingerprint, its tokens) or skipped, never served unchecked. A
cold-tier file outlives the process: a restart with the same model and codec can hit it.
Does not know: which block the cache evicts (`prefix_eviction.py`), block tables or admission
(`manager.py`, `engine/scheduler.py`), or what the tensors mean (`store.py`).

    evict(block h3) ─▶ demote: hits > 0 and save + restore < recompute ─▶ warm["p-h3"] (or cold)
    prompt h0 h1 h2 h3 h4:  hot hit h0 h1 (+ h2 evicted, dropped)  ->  available = 0
    prompt h0 h1 h2 h3:     hot hit h0 h1 h2, tier holds h3        ->  available = 1 block
"""
from __future__ import annotations

import time
from collections.abc import Sequence

from memlm.kv.cost import CostModel, Priority, Tier
from memlm.kv.entry import EntryError, KVEntry, decode
from memlm.kv.prefix_eviction import CachedBlock
from memlm.kv.store import KVStore
from memlm.kv.tiers import ColdTier, WarmTier

KEY_PREFIX = "p-"


def key_of(block_hash: bytes) -> str:
    return KEY_PREFIX + block_hash.hex()


class PrefixTier:
    """Evicted cached-prefix blocks of one engine's store, in its warm and/or cold tier."""

    def __init__(self, store: KVStore, cost: CostModel, fingerprint: str,
                 warm: WarmTier | None = None, cold: ColdTier | None = None):
        if warm is None and cold is None:
            raise ValueError("PrefixTier needs a warm tier or a cold tier")
        self.store, self.cost, self.fp = store, cost, fingerprint
        self.warm, self.cold = warm, cold
        self.block_size = store.block_size
        self.block_bytes = sum(t[:, :, :store.block_size].nbytes for t in store.block_tensors().values())
        self.demoted = self.declined = self.restored = self.rejected = 0
        self._came_back: set[bytes] = set()   # hashes restored from a tier: reused, by definition

    def _tiers(self):
        return [(t, s) for t, s in ((Tier.WARM, self.warm), (Tier.COLD, self.cold)) if s is not None]

    # ---- eviction: the prefix cache's on_evict hook ----------------------------------------
    def demote(self, block: CachedBlock) -> bool:
        """Keep an evicted block's K/V in a tier (called before its id is handed out again).

        Returns:
            True when a tier took it; False when it was never reused (one-off prompts would
            only fill the tiers), recomputing it is predicted cheaper, or no tier has room.
        """
        tiers = [(t, s) for t, s in self._tiers()
                 if self.cost.worth_swapping(t, self.block_size, self.block_bytes)]
        reused = block.hits >= 1 or block.block_hash in self._came_back
        self._came_back.discard(block.block_hash)
        if not reused or not tiers:
            self.declined += 1
            return False
        t0 = time.perf_counter()
        blob = KVEntry(list(block.token_ids), self.store.export_blocks([block.block_id]), 1).encode(self.fp)
        self.cost.observe_save(self.block_bytes, time.perf_counter() - t0)
        key = key_of(block.block_hash)
        for tier, store in tiers:
            if store.put(key, blob, Priority.CACHED_PREFIX) if tier is Tier.WARM else store.put(key, blob):
                self.demoted += 1
                return True
        self.declined += 1
        return False

    # ---- admission -------------------------------------------------------------------------
    def available(self, hashes: Sequence[bytes], start: int) -> int:
        """Blocks from `hashes[start]` on, consecutive, that a tier holds and restoring pays for."""
        n = 0
        for h in hashes[start:]:
            key = key_of(h)
            tier = Tier.WARM if self.warm is not None and key in self.warm else \
                Tier.COLD if self.cold is not None and key in self.cold else None
            if tier is None or not self.cost.worth_restoring(tier, self.block_size, self.block_bytes):
                break
            n += 1
        return n

    def restore(self, hashes: Sequence[bytes], tokens: Sequence[int], block_ids: Sequence[int]) -> int:
        """Copy the tier blocks named by `hashes` (holding `tokens`, block after block) into
        `block_ids`, in order, stopping at the first one missing or rejected.

        Returns:
            The number of blocks restored (their K/V are now in the pool).
        """
        bs, done = self.block_size, 0
        for i, (h, b) in enumerate(zip(hashes, block_ids)):
            t0 = time.perf_counter()
            key = key_of(h)
            tier = Tier.WARM if self.warm is not None and key in self.warm else Tier.COLD
            blob = self.warm.pop(key) if tier is Tier.WARM else \
                self.cold.get(key) if self.cold is not None else None
            try:
                entry = decode(blob, self.fp) if blob is not None else None
            except EntryError:
                entry = None
                self.rejected += 1
                if self.cold is not None:
                    self.cold.discard(key)
            if entry is None or entry.num_blocks != 1 or entry.tokens != list(tokens[i * bs:(i + 1) * bs]):
                break
            self.store.import_blocks([b], entry.tensors)
            self._came_back.add(h)
            self.cost.observe_restore(tier, self.block_bytes, time.perf_counter() - t0)
            done += 1
        self.restored += done
        return done
