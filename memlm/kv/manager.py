"""KVCacheManager: which KV blocks each sequence holds. Pure Python, no torch.

Owns: every sequence's block table (seq_id -> the block ids covering its positions 0, 1, ...),
allocating slots for a sequence's new tokens (all or nothing: a refusal leaves everything as it
was, so the scheduler can preempt and retry), freeing a sequence, forking (a child shares the
parent's full blocks by reference count), and the usage figures (used / free blocks, usage,
fragmentation). With a `PrefixCache`: finding a new sequence's cached prefix (`find_cached_prefix`,
no side effects, then `allocate_slots(..., hit)` takes it), and making each block that fills
with computed tokens findable (`cache_computed_blocks`); a freed sequence's cached blocks stay
(evictable) until the pool needs them. The `BlockPool` below it is reached only from here.
Does not know: scheduling policy (who runs, who is preempted, who may use the cache:
`engine/scheduler.py`), the tensors behind a block (`store.py`), or eviction order
(`prefix_eviction.py`). Tokens are read only to hash full blocks.

    block_size 4; seq 7 computed 10 tokens          table of seq 7: [0, 1, 2]
        block 0: [t0 t1 t2 t3]  block 1: [t4 .. t7]  block 2: [t8 t9 .  . ]
    fork(seq 7 -> seq 8, num_tokens=9)              table of seq 8: [0, 1]  (ref counts 2, 2, 1)
        seq 8 holds the KV of t0 .. t7 and recomputes from t8 into blocks of its own
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from memlm.kv.block_pool import BlockPool
from memlm.kv.prefix_cache import PrefixCache


class KVSequence(Protocol):
    """What the manager reads of a sequence (`engine.request.Sequence` has all three)."""

    seq_id: int                  # unique within one engine
    num_computed_tokens: int     # positions 0 .. num_computed_tokens - 1 have their KV stored

    def token_ids_slice(self, start: int, end: int) -> list[int]:
        """Token ids at positions start .. end - 1 (read only with a prefix cache)."""


@dataclass(frozen=True)
class PrefixHit:
    """A sequence's cached prefix, found but not yet taken."""

    block_ids: tuple[int, ...]   # cached blocks covering positions 0 .. num_blocks * block_size - 1
    num_evictable: int           # of those, blocks nobody holds (taking them uses free blocks)
    num_queried_tokens: int      # tokens looked up (0: no lookup was made)

    @property
    def num_blocks(self) -> int:
        return len(self.block_ids)


NO_HIT = PrefixHit((), 0, 0)


class KVCacheManager:
    """Block tables of the sequences of one engine over one `BlockPool`."""

    def __init__(self, num_blocks: int, block_size: int, prefix_cache: PrefixCache | None = None):
        if prefix_cache is not None and prefix_cache.block_size != block_size:
            raise ValueError(f"prefix cache block_size {prefix_cache.block_size} != pool's {block_size}")
        self.cache = prefix_cache
        self.pool = BlockPool(num_blocks, block_size, prefix_cache)   # read its ref counts only
        self._tables: dict[int, list[int]] = {}
        self._hashes: dict[int, list[bytes]] = {}   # seq_id -> hashes of its full blocks so far
        self._settled: dict[int, int] = {}          # seq_id -> leading table blocks cached/checked
        self._evicted: dict[int, int] = {}          # seq_id -> computed tokens no longer held
        self._private: set[int] = set()             # seq_ids whose blocks are rewritten in place

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
                n = min(bs, max(0, self.num_cached_tokens(seq) - j * bs))
                filled[b] = max(filled.get(b, 0), n)
        return 1.0 - sum(filled.values()) / allocated

    # ---- one sequence --------------------------------------------------------------------
    def block_table(self, seq: KVSequence) -> list[int]:
        """A copy of the blocks `seq` holds, in position order (empty if it holds none)."""
        return list(self._tables.get(seq.seq_id, ()))

    def num_blocks_needed(self, seq: KVSequence, num_new_tokens: int, hit: PrefixHit = NO_HIT) -> int:
        """Free blocks `seq` would take to store `num_new_tokens` more tokens (0 if it has room).

        With a `hit` (the sequence holds nothing yet), the new tokens follow the cached prefix,
        and its evictable blocks count as taken too.
        """
        held = len(self._tables.get(seq.seq_id, ())) + hit.num_blocks
        start = self.num_cached_tokens(seq) + hit.num_blocks * self.pool.block_size
        return max(0, self.pool.blocks_for(start + num_new_tokens) - held) + hit.num_evictable

    def allocate_slots(self, seq: KVSequence, num_new_tokens: int, hit: PrefixHit = NO_HIT) -> bool:
        """Give `seq` slots for `num_new_tokens` tokens after its computed ones (after the cached
        prefix `hit`, which it then holds; the caller advances its computed count past it).

        Returns:
            True when its table now covers them; False, with nothing taken, when too few blocks
            are free (the caller may free others, e.g. preempt, and ask again).
        """
        need = self.num_blocks_needed(seq, num_new_tokens, hit)
        if need == 0 and not hit.num_queried_tokens:
            return True
        if need > self.pool.num_free_blocks:
            return False
        if hit.num_queried_tokens:
            self.cache.record_query(hit.num_queried_tokens, hit.block_ids)
        if hit.num_blocks:
            if self._tables.get(seq.seq_id) or seq.num_computed_tokens:
                raise RuntimeError(f"sequence {seq.seq_id} already holds KV and cannot take a prefix")
            self._tables[seq.seq_id] = self.pool.touch(list(hit.block_ids))
            self._settled[seq.seq_id] = hit.num_blocks
        blocks = self.pool.allocate(need - hit.num_evictable)
        self._tables.setdefault(seq.seq_id, []).extend(blocks)
        return True

    def free(self, seq: KVSequence) -> None:
        """Drop every block reference `seq` holds (a no-op when it holds none); tail blocks are
        released first, so they are reused first. Cached blocks stay cached (evictable)."""
        self._hashes.pop(seq.seq_id, None)
        self._settled.pop(seq.seq_id, None)
        self._evicted.pop(seq.seq_id, None)
        self._private.discard(seq.seq_id)
        blocks = self._tables.pop(seq.seq_id, None)
        if blocks:
            self.pool.free(blocks)

    # ---- eviction (kv/policies.py decides which tokens; the scheduler calls these) -----------
    def num_cached_tokens(self, seq: KVSequence) -> int:
        """Token slots `seq` fills: its computed tokens less those evicted."""
        return seq.num_computed_tokens - self._evicted.get(seq.seq_id, 0)

    def keep_private(self, seq: KVSequence) -> None:
        """`seq`'s blocks will be rewritten in place (an evicting KV policy packs its kept tokens):
        they are never found in, nor added to, the prefix cache."""
        self._private.add(seq.seq_id)

    def evict(self, seq: KVSequence, num_kept_tokens: int) -> int:
        """`seq` keeps only its first `num_kept_tokens` token slots (its policy packed the kept
        tokens there); the blocks past them go back to the pool at once.

            before: [s0 s1 t9 t10][t11 t12 . .]   ->   after evict(seq, 4): [s0 s1 t9 t10]
        Returns:
            The number of blocks freed.
        """
        if seq.seq_id not in self._private:
            raise RuntimeError(f"sequence {seq.seq_id} must be kept private before it evicts")
        cached = self.num_cached_tokens(seq)
        if not 0 <= num_kept_tokens <= cached:
            raise ValueError(f"cannot keep {num_kept_tokens} of {cached} cached tokens")
        self._evicted[seq.seq_id] = self._evicted.get(seq.seq_id, 0) + cached - num_kept_tokens
        table = self._tables.get(seq.seq_id, [])
        keep = self.pool.blocks_for(num_kept_tokens)
        dropped = table[keep:]
        del table[keep:]
        if dropped:
            self.pool.free(dropped)
        return len(dropped)

    def drop_blocks(self, seq: KVSequence, blocks: list[int]) -> int:
        """`seq` drops whole full blocks (indices into its table; a block KV codec's eviction):
        they go back to the pool at once, the rest keep their order. Returns the number freed."""
        if seq.seq_id not in self._private:
            raise RuntimeError(f"sequence {seq.seq_id} must be kept private before it evicts")
        table, bs = self._tables.get(seq.seq_id, []), self.pool.block_size
        full = self.num_cached_tokens(seq) // bs
        if len(set(blocks)) != len(blocks) or any(not 0 <= j < min(full, len(table) - 1) for j in blocks):
            raise ValueError(f"cannot drop blocks {blocks}: only full blocks before the last of {len(table)}")
        gone = set(blocks)
        dropped = [b for j, b in enumerate(table) if j in gone]
        table[:] = [b for j, b in enumerate(table) if j not in gone]
        self._evicted[seq.seq_id] = self._evicted.get(seq.seq_id, 0) + len(dropped) * bs
        if dropped:
            self.pool.free(dropped)
        return len(dropped)

    # ---- prefix cache ----------------------------------------------------------------------
    def find_cached_prefix(self, seq: KVSequence, num_tokens: int) -> PrefixHit:
        """The cached blocks covering the start of `seq`'s first `num_tokens` tokens, leaving at
        least the last one to compute (its logits sample the next token). No side effects
        beyond remembering the hashes.

        Args:
            num_tokens: all of the sequence's tokens (prompt and any output of a preempted one).
        """
        if self.cache is None or self._tables.get(seq.seq_id) or seq.num_computed_tokens \
                or seq.seq_id in self._private:
            return NO_HIT
        found = self.cache.lookup(self._hashes_of(seq, (num_tokens - 1) // self.pool.block_size))
        return PrefixHit(tuple(found), sum(1 for b in found if self.pool.ref_counts[b] == 0),
                         num_tokens)

    def cache_computed_blocks(self, seq: KVSequence) -> None:
        """Make each block of `seq` that is now full of computed tokens findable by its hash
        (called after every step that advanced the sequence; cheap when no block filled)."""
        if self.cache is None or seq.seq_id in self._private:
            return
        table, bs = self._tables.get(seq.seq_id, ()), self.pool.block_size
        full = min(seq.num_computed_tokens // bs, len(table))
        settled = self._settled.get(seq.seq_id, 0)
        if full <= settled:
            return
        hashes = self._hashes_of(seq, full)
        tokens = seq.token_ids_slice(settled * bs, full * bs)
        for i in range(settled, full):
            self.cache.insert(table[i], hashes[i], hashes[i - 1] if i else None, i,
                              tokens[(i - settled) * bs:(i - settled + 1) * bs])
        self._settled[seq.seq_id] = full

    def prefix_hashes(self, seq: KVSequence, num_blocks: int) -> list[bytes]:
        """Hashes of `seq`'s first `num_blocks` full blocks ([] without a prefix cache): the
        names under which a tier keeps evicted cached blocks."""
        return self._hashes_of(seq, num_blocks) if self.cache is not None else []

    def _hashes_of(self, seq: KVSequence, num_blocks: int) -> list[bytes]:
        """Hashes of `seq`'s first `num_blocks` full blocks (remembered: tokens only grow)."""
        known = self._hashes.get(seq.seq_id, [])
        if len(known) < num_blocks:
            bs = self.pool.block_size
            tail = seq.token_ids_slice(len(known) * bs, num_blocks * bs)
            known = self.cache.hashes(tail, known)
            self._hashes[seq.seq_id] = known
        return known[:num_blocks]

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
            self._settled[child.seq_id] = len(shared)      # the parent's blocks: already settled
            if parent.seq_id in self._hashes:
                self._hashes[child.seq_id] = self._hashes[parent.seq_id][:len(shared)]
        return len(shared) * self.pool.block_size
