"""KVOffload: moves sequences' KV between the hot pool and the warm / cold tiers.

Owns: the four moves the scheduler asks for, each decided by the `CostModel` and measured to
teach it — `swap_out` (a preempted sequence's blocks to warm, else cold, when saving and
restoring them is predicted cheaper than recomputing; otherwise the scheduler recomputes),
`restorable_tokens` + `restore` (at admission: a swapped-out sequence's blocks, or the saved
history of its chat session, copied into the blocks just allocated for it, so it starts with
`num_computed_tokens` already covered), `keep_session` (after a session's turn) and `discard`;
and it hands the prefix cache's evicted blocks to `PrefixTier` (`attach_prefix_cache`).
Swapped-out entries belong to this process only: leftovers in the cold directory from a killed
process are deleted at start.
Does not know: who is preempted or admitted (`engine/scheduler.py`), block bookkeeping
(`manager.py`), the store's layout (it moves whatever `KVStore.export_blocks` returns).

    preempt:  table ─chunks─▶ encode_stream (zstd) ─▶ warm bytes (or the cold file)  computed := 0
    admit:    restorable_tokens(seq) = t  (entry read, checksum checked) -> allocate t + chunk
              restore(seq, table) ─decode_into, chunk by chunk─▶ table[:blocks(t)]  computed := t
"""
from __future__ import annotations

import io
import itertools
import time

from memlm.kv.cost import CostModel, Priority, Tier
from memlm.kv.entry import EntryError, StoredEntry, encode_stream, fingerprint, max_size, open_entry
from memlm.kv.prefix_tier import PrefixTier
from memlm.kv.sessions import SessionStore
from memlm.kv.store import KVStore
from memlm.kv.tiers import ColdTier, WarmTier

SWAP_PREFIX = "w-"
_engine_ids = itertools.count()


def build_offload(model, store: KVStore, kv_dtype: str, cost: CostModel, warm_bytes: int,
                  session_dir: str | None, disk_budget: int) -> "KVOffload | None":
    """The engine's offload: a warm tier of `warm_bytes` (0: none) and a cold tier in
    `session_dir` (None: none); None when neither exists or the model carries recurrent state
    (which the tiers do not hold). The fingerprint covers everything that makes stored KV
    interchangeable: model config, linear method, KV codec, block size and the store's layout."""
    if "recurrent" in model.cfg.mixers or (not warm_bytes and session_dir is None):
        return None
    layout = {name: [str(t.dtype), list(t.shape[:2]), list(t.shape[3:])]
              for name, t in store.block_tensors().items()}
    fp = fingerprint(model=repr(model.cfg), weights=type(model.linear_method).__name__,
                     kv_dtype=kv_dtype, block_size=store.block_size, layout=layout)
    warm = WarmTier(warm_bytes) if warm_bytes else None
    cold = ColdTier(session_dir, disk_budget) if session_dir is not None else None
    return KVOffload(store, cost, fp, warm, cold)


class KVOffload:
    """The scheduler's way to the tiers for one engine's `KVStore`."""

    def __init__(self, store: KVStore, cost: CostModel, fingerprint: str,
                 warm: WarmTier | None = None, cold: ColdTier | None = None):
        self.store, self.cost, self.fp = store, cost, fingerprint
        self.block_size = store.block_size
        self.warm, self.cold = warm, cold
        self.block_bytes = sum(t[:, :, :store.block_size].nbytes for t in store.block_tensors().values())
        self.sessions = SessionStore(fingerprint, self.block_size, warm, cold) \
            if warm is not None or cold is not None else None
        self.prefix = PrefixTier(store, cost, fingerprint, warm, cold) \
            if warm is not None or cold is not None else None
        self._prefix = f"{SWAP_PREFIX}{next(_engine_ids)}-"
        self._swapped: dict[int, tuple[str, int, Tier]] = {}    # seq_id -> (key, tokens, tier)
        self._resume: dict[int, tuple[StoredEntry, int, Tier]] = {} # seq_id -> session entry found
        self.stats = dict(swaps_out=0, swaps_in=0, swap_declined=0, session_hits=0,
                          session_tokens_restored=0, raw_bytes_saved=0, blob_bytes_saved=0,
                          restore_seconds=0.0, restore_cpu_seconds=0.0)   # reads + restores
        if cold is not None:
            for key in cold.keys():
                if key.startswith(SWAP_PREFIX):
                    cold.discard(key)

    # ---- swap ----------------------------------------------------------------------------
    def swap_out(self, seq, block_ids: list[int]) -> bool:
        """Save the KV of `seq`'s computed tokens from `block_ids` to a tier.

        Returns:
            True when saved (it is restored at readmission); False when recomputing is
            predicted cheaper or no tier has room (nothing kept).
        """
        tokens = seq.num_computed_tokens
        nb = -(-tokens // self.block_size)
        raw = nb * self.block_bytes
        tiers = [(t, s) for t, s in ((Tier.WARM, self.warm), (Tier.COLD, self.cold))
                 if s is not None and self.cost.worth_swapping(t, tokens, raw)]
        if not tokens or not tiers:
            self.stats["swap_declined"] += 1
            return False
        key = f"{self._prefix}{seq.seq_id}"
        tier = self._save(key, seq.token_ids_slice(0, tokens), block_ids[:nb], Priority.SWAPPED,
                          [t for t, _ in tiers], both=False)
        if tier is None:
            self.stats["swap_declined"] += 1
            return False
        self._swapped[seq.seq_id] = (key, tokens, tier)
        self.stats["swaps_out"] += 1
        return True

    # ---- admission -----------------------------------------------------------------------
    def restorable_tokens(self, seq, hot_tokens: int = 0) -> int:
        """Tokens of `seq` whose KV a tier holds and restoring pays for (0: compute them).

        Args:
            hot_tokens: what the hot prefix cache already holds of it; a session saved by this
                process that holds no more is not read at all (it stays hot while there is room).
        """
        if seq.seq_id in self._swapped:
            return self._swapped[seq.seq_id][1]
        if seq.seq_id in self._resume:
            return self._resume[seq.seq_id][1]
        sid = seq.request.session_id
        if sid is None or self.sessions is None or seq.index != 0:
            return 0
        known = self.sessions.known_tokens(sid, seq.prompt_token_ids)
        if known is not None and known <= hot_tokens:
            return 0
        t0, c0 = time.perf_counter(), time.thread_time()
        found = self.sessions.lookup(sid, seq.prompt_token_ids)       # read + checksum
        self._timed(t0, c0)
        if found is None:
            return 0
        _, tokens, tier = found
        if not self.cost.worth_restoring(tier, tokens, tokens // self.block_size * self.block_bytes):
            return 0
        self._resume[seq.seq_id] = found
        return tokens

    def restore(self, seq, block_ids: list[int]) -> bool:
        """Copy the KV `restorable_tokens` promised into `block_ids` (the first blocks of `seq`'s
        new table). False when the entry is gone or rejected: the caller recomputes."""
        t0, c0 = time.perf_counter(), time.thread_time()
        swapped = seq.seq_id in self._swapped
        if swapped:
            key, tokens, tier = self._swapped.pop(seq.seq_id)
            blob = self.warm.pop(key) if tier is Tier.WARM else self.cold.get(key)
            if tier is Tier.COLD:
                self.cold.discard(key)
            try:
                entry = open_entry(blob, self.fp) if blob is not None else None
            except EntryError:
                entry = None
            if entry is None or entry.tokens != seq.token_ids_slice(0, tokens):
                return False
        elif seq.seq_id in self._resume:
            entry, tokens, tier = self._resume.pop(seq.seq_id)
        else:
            return False
        nb = -(-tokens // self.block_size)
        try:        # straight from the (checked) blob into the blocks, chunk by chunk
            entry.restore_into(self.store.block_rows(block_ids[:nb], flush=False))
        except (EntryError, ValueError):
            # a payload that passed the checksum yet does not decode (or another layout): the
            # blocks written so far are recomputed by the caller; a session's file is dropped
            if not swapped:
                self.sessions.reject(seq.request.session_id)
            self._timed(t0, c0)
            return False
        if swapped:
            self.stats["swaps_in"] += 1
        else:
            self.stats["session_hits"] += 1
            self.stats["session_tokens_restored"] += tokens
        self.cost.observe_restore(tier, nb * self.block_bytes, self._timed(t0, c0))
        return True

    # ---- evicted prefix-cache blocks (prefix_tier.py) --------------------------------------
    def attach_prefix_cache(self, cache) -> None:
        """Keep the blocks `cache` (a `PrefixCache`) evicts in the tiers when that pays."""
        if self.prefix is not None:
            cache.on_evict = self.prefix.demote

    # ---- sessions and cleanup ------------------------------------------------------------
    def keep_session(self, seq, block_ids: list[int]) -> None:
        """After a turn of a session's first completion: save its full blocks for the next turn."""
        sid = seq.request.session_id
        if sid is None or self.sessions is None or seq.index != 0 \
                or seq.completion.finish_reason in ("abort", "error"):
            return
        nb = seq.num_computed_tokens // self.block_size
        if nb:
            tokens = seq.token_ids_slice(0, nb * self.block_size)
            tiers = [t for t, s in ((Tier.WARM, self.warm), (Tier.COLD, self.cold)) if s is not None]
            self.sessions.save(sid, tokens, lambda key: self._save(key, tokens, block_ids[:nb],
                                                                 Priority.IDLE_SESSION, tiers, both=True) is not None)

    def discard(self, seq) -> None:
        """Drop whatever is kept for `seq` (it finished or was aborted while swapped out)."""
        self._resume.pop(seq.seq_id, None)
        item = self._swapped.pop(seq.seq_id, None)
        if item is not None:
            key, _, tier = item
            if tier is Tier.WARM:
                self.warm.pop(key)
            else:
                self.cold.discard(key)

    def metrics(self) -> dict:
        """The tier figures of `EngineMetrics` (bytes held, session hits, compression ratio)."""
        st = self.stats
        return dict(warm_bytes=self.warm.nbytes if self.warm is not None else 0,
                    warm_capacity=self.warm.capacity if self.warm is not None else 0,
                    cold_bytes=self.cold.nbytes if self.cold is not None else 0,
                    session_hits=st["session_hits"], session_tokens_restored=st["session_tokens_restored"],
                    prefix_tier_demotions=self.prefix.demoted if self.prefix is not None else 0,
                    prefix_tier_restored_blocks=self.prefix.restored if self.prefix is not None else 0,
                    compression_ratio=st["raw_bytes_saved"] / st["blob_bytes_saved"]
                    if st["blob_bytes_saved"] else 0.0)

    def _timed(self, t0: float, c0: float) -> float:
        dt = time.perf_counter() - t0
        self.stats["restore_seconds"] += dt
        self.stats["restore_cpu_seconds"] += time.thread_time() - c0
        return dt

    def _save(self, key: str, tokens: list[int], block_ids: list[int], priority: Priority,
              tiers: list[Tier], both: bool) -> Tier | None:
        """Encode the blocks straight from the pool (chunk by chunk: `entry.encode_stream`) into
        the warm tier — room for the entry's largest possible size made first, so the tier never
        goes over its capacity — and / or (`both`, or warm refused) the cold tier, streamed into
        its file when warm is not used (no copy of the entry in RAM). The tier that took it."""
        t0 = time.perf_counter()
        raw = len(block_ids) * self.block_bytes
        rows = self.store.block_rows(block_ids)
        bound = max_size(tokens, len(block_ids), rows, self.fp)
        took, size = None, 0
        if Tier.WARM in tiers:
            self.warm.pop(key)          # superseded (a session's previous turn): its room counts
        if Tier.WARM in tiers and self.warm.make_room(bound, priority):
            buf = io.BytesIO()
            size = encode_stream(tokens, len(block_ids), rows, self.fp, buf.write)
            blob = buf.getvalue()
            del buf
            took = Tier.WARM if self.warm.put(key, blob, priority) else None
            if Tier.COLD in tiers and (both or took is None) and self.cold.put(key, blob):
                took = took or Tier.COLD
        elif Tier.COLD in tiers:
            w = self.cold.writer(key, bound)
            if w is not None:
                try:
                    size = encode_stream(tokens, len(block_ids), rows, self.fp, w.write)
                except OSError:
                    w.abort()
                else:
                    took = Tier.COLD if w.commit() else None
        self.cost.observe_save(raw, time.perf_counter() - t0)
        if size:
            self.stats["raw_bytes_saved"] += raw
            self.stats["blob_bytes_saved"] += size
        return took
