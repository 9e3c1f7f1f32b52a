"""Automatic prefix caching: full KV blocks found again by a hash of everything before them.

Owns: the block hash chain, the map hash -> cached block, per-block reuse statistics (hits,
depth, cached children), the set of *evictable* blocks (cached, ref count 0) and the choice of
which one to reclaim, made by an `EvictionPolicy` (`prefix_eviction.py`), the hit / query /
eviction counters, and the `on_evict` hook a tier can use to demote a victim instead of
dropping it. Pure Python, no torch.
Does not know: ref counts or the free queue (`block_pool.py` calls `release` when a cached
block's last reference goes and `evict` when it runs out of free blocks), sequences or their
tables (`manager.py`), the tensors behind a block (`store.py`), or scheduling.

    hash(b_i) = H(hash(b_{i-1}) | token ids of b_i | salt)     only full blocks are hashed
    prompt A: [sys0][sys1][a2]      blocks 3, 7, 9      hashes h0, h1, hA2
    prompt B: [sys0][sys1][b2][b3]  lookup -> 3, 7      computes b2, b3 only (+ caches them)
A block's hash names its whole prefix, so equal hashes mean equal K/V (same engine, same model,
same KV dtype). `salt` separates caches whose K/V differ for the same tokens (a tier on disk
shared by several models).
"""
from __future__ import annotations

import hashlib
from array import array
from collections.abc import Callable, Sequence

from memlm.kv.prefix_eviction import CachedBlock, EvictionPolicy


def hash_block(parent: bytes | None, token_ids: Sequence[int], salt: bytes = b"") -> bytes:
    """The chained hash of one full block (16-byte BLAKE2b: collisions are not a concern)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(parent or b"\0" * 16)
    h.update(array("q", token_ids).tobytes())
    h.update(salt)
    return h.digest()


# Called with the victim just before its block id is handed out again: the K/V tensors are
# still intact, so a tier can copy them (and re-key them by `block_hash`) instead of losing them.
EvictHook = Callable[[CachedBlock], None]


class PrefixCache:
    """The cached full blocks of one engine's pool and the policy that reclaims them."""

    def __init__(self, block_size: int, policy: EvictionPolicy, salt: bytes = b"",
                 on_evict: EvictHook | None = None):
        self.block_size = block_size
        self.policy = policy
        self.salt = salt
        self.on_evict = on_evict
        self._by_hash: dict[bytes, CachedBlock] = {}
        self._by_block: dict[int, CachedBlock] = {}
        self._children: dict[bytes, int] = {}    # parent hash -> cached blocks directly under it
        self._evictable: set[int] = set()
        self.num_queried_tokens = 0              # prompt tokens looked up
        self.num_hit_tokens = 0                  # of those, found cached
        self.num_evictions = 0

    # ---- hashing and lookup ----------------------------------------------------------------
    def hashes(self, token_ids: Sequence[int], known: Sequence[bytes] = ()) -> list[bytes]:
        """`known` (the hashes of a sequence's first blocks) extended by the full blocks of
        `token_ids`, the tokens that follow them."""
        bs, out = self.block_size, list(known)
        for i in range(len(token_ids) // bs):
            out.append(hash_block(out[-1] if out else None, token_ids[i * bs:(i + 1) * bs], self.salt))
        return out

    def lookup(self, hashes: Sequence[bytes]) -> list[int]:
        """Block ids of the longest cached chain starting at the first hash (no side effects)."""
        found = []
        for h in hashes:
            block = self._by_hash.get(h)
            if block is None:
                break
            found.append(block.block_id)
        return found

    def record_query(self, num_tokens: int, hit_block_ids: Sequence[int]) -> None:
        """Count a lookup that was acted on: `num_tokens` asked for, the hit blocks reused."""
        self.num_queried_tokens += num_tokens
        self.num_hit_tokens += len(hit_block_ids) * self.block_size
        for b in hit_block_ids:
            self._by_block[b].hits += 1

    # ---- block states ----------------------------------------------------------------------
    @property
    def num_cached_blocks(self) -> int:
        """Blocks findable by hash, in use or evictable."""
        return len(self._by_block)

    @property
    def num_evictable(self) -> int:
        return len(self._evictable)

    def is_cached(self, block_id: int) -> bool:
        return block_id in self._by_block

    def is_evictable(self, block_id: int) -> bool:
        return block_id in self._evictable

    def get(self, block_id: int) -> CachedBlock | None:
        return self._by_block.get(block_id)

    def insert(self, block_id: int, block_hash: bytes, parent_hash: bytes | None, depth: int,
               token_ids: Sequence[int]) -> bool:
        """Make a just-filled block (held by its sequence) findable by `block_hash`.

        Returns:
            False when another block already holds that hash (two sequences computed the same
            prefix at once): this one stays private and goes back to the free queue when freed.
        """
        if block_hash in self._by_hash or block_id in self._by_block:
            return False
        block = CachedBlock(block_id, block_hash, parent_hash, depth, tuple(token_ids))
        self._by_hash[block_hash] = block
        self._by_block[block_id] = block
        if parent_hash is not None:
            self._children[parent_hash] = self._children.get(parent_hash, 0) + 1
            parent = self._by_hash.get(parent_hash)
            if parent is not None and parent.block_id in self._evictable:
                self.policy.update(parent, is_leaf=False)
        return True

    def release(self, block_id: int) -> None:
        """The block's last reference went: keep its K/V, make it evictable."""
        self._evictable.add(block_id)
        block = self._by_block[block_id]
        self.policy.add(block, is_leaf=self._is_leaf(block))

    def reuse(self, block_id: int) -> None:
        """An evictable block is referenced again (a hit): it is no longer a candidate."""
        self._evictable.remove(block_id)
        self.policy.remove(self._by_block[block_id])

    def evict(self) -> int:
        """Reclaim one evictable block chosen by the policy; returns its id (now uncached)."""
        if not self._evictable:
            raise RuntimeError("no evictable block to reclaim")
        victim = self.policy.pop()
        self._evictable.remove(victim.block_id)
        if self.on_evict is not None:
            self.on_evict(victim)
        self._forget(victim)
        self.num_evictions += 1
        return victim.block_id

    def _forget(self, block: CachedBlock) -> None:
        del self._by_hash[block.block_hash]
        del self._by_block[block.block_id]
        if block.parent_hash is not None:
            left = self._children[block.parent_hash] - 1
            if left:
                self._children[block.parent_hash] = left
            else:
                del self._children[block.parent_hash]
                parent = self._by_hash.get(block.parent_hash)
                if parent is not None and parent.block_id in self._evictable:
                    self.policy.update(parent, is_leaf=True)

    def _is_leaf(self, block: CachedBlock) -> bool:
        return block.block_hash not in self._children

    @property
    def hit_rate(self) -> float:
        """Prompt tokens found cached / prompt tokens looked up."""
        return self.num_hit_tokens / self.num_queried_tokens if self.num_queried_tokens else 0.0
