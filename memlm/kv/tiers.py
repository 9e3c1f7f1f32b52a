"""The warm and cold KV tiers: where compressed KV entries wait while they are not in the pool.

Owns: `WarmTier` (entry blobs in RAM under a byte capacity that the memory plan reserves inside
the budget; eviction by `Priority`, then least recently used) and `ColdTier` (one file per
entry in a directory, under its own disk budget, written off the critical path by one
background thread fed by a bounded queue). Cold writes are atomic — temp file, fsync, rename,
fsync of the directory — so a process killed mid-write leaves at most a `*.tmp` file, which is
never read and is deleted at the next start; every read is validated by the entry's checksum
and fingerprint (`entry.py`) by the caller, and a rejected file is removed.
Does not know: what an entry holds (`entry.py`), which sequence it belongs to or when moving
it pays (`offload.py`, `cost.py`).

    put(key) ─▶ pending[key] ─▶ queue (bounded) ─▶ writer: evict oldest until it fits,
                                                    .<key>.<rand>.tmp ─fsync─▶ rename <key>.kv
    get(key) ─▶ pending[key] if still queued, else read <key>.kv
"""
from __future__ import annotations

import atexit
import os
import queue
import re
import threading
import weakref
from collections import OrderedDict
from pathlib import Path

from memlm.kv.cost import Priority

KEY_RE = re.compile(r"^[A-Za-z0-9_-]{1,96}$")
SUFFIX = ".kv"
COLD_QUEUE = 16            # entries waiting for the writer; a full queue refuses (non-blocking)


def check_key(key: str) -> str:
    if not isinstance(key, str) or not KEY_RE.match(key):
        raise ValueError(f"invalid KV tier key {key!r}: use 1-96 of A-Z a-z 0-9 _ -")
    return key


class WarmTier:
    """Blobs in RAM, at most `capacity` bytes in all."""

    def __init__(self, capacity: int):
        self.capacity = int(capacity)
        self._blobs: OrderedDict[str, tuple[bytes, Priority]] = OrderedDict()   # LRU first
        self.nbytes = 0
        self.evictions = 0

    def __contains__(self, key: str) -> bool:
        return key in self._blobs

    def __len__(self) -> int:
        return len(self._blobs)

    def keys(self) -> list[str]:
        """Keys held, least recently used first."""
        return list(self._blobs)

    def put(self, key: str, blob: bytes, priority: Priority) -> bool:
        """Store `blob` under `key` (replacing it), evicting lower-priority entries — and, for
        idle sessions and cached prefixes, older ones of the same priority — to make room.

        Returns:
            False, with nothing evicted, when that cannot free enough room.
        """
        self.pop(key)
        need = len(blob) - (self.capacity - self.nbytes)
        victims = []
        if need > 0:
            shared = priority <= Priority.CACHED_PREFIX   # losing one only costs a recompute
            for p in sorted({p for _, p in self._blobs.values()}):
                if p > priority or (p == priority and not shared):
                    break
                for k, (b, bp) in self._blobs.items():
                    if bp == p and need > 0:
                        victims.append(k)
                        need -= len(b)
            if need > 0:
                return False
        for k in victims:
            self.pop(k)
            self.evictions += 1
        self._blobs[key] = (blob, priority)
        self.nbytes += len(blob)
        return True

    def get(self, key: str) -> bytes | None:
        item = self._blobs.get(key)
        if item is None:
            return None
        self._blobs.move_to_end(key)
        return item[0]

    def pop(self, key: str) -> bytes | None:
        item = self._blobs.pop(key, None)
        if item is None:
            return None
        self.nbytes -= len(item[0])
        return item[0]


class ColdTier:
    """Checksummed entry files in `directory`, at most `capacity` bytes on disk."""

    def __init__(self, directory: str | os.PathLike, capacity: int, queue_size: int = COLD_QUEUE):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.capacity = int(capacity)
        self._lock = threading.Lock()
        self._pending: dict[str, bytes] = {}
        self._index: OrderedDict[str, int] = OrderedDict()     # key -> file bytes, oldest first
        for tmp in self.dir.glob(".*.tmp"):                     # a writer killed mid-write
            tmp.unlink(missing_ok=True)
        files = sorted(self.dir.glob("*" + SUFFIX), key=lambda p: p.stat().st_mtime)
        for p in files:
            if KEY_RE.match(p.stem):
                self._index[p.stem] = p.stat().st_size
        self.evictions = 0
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._writer = threading.Thread(target=self._write_loop, name="memlm-cold-tier", daemon=True)
        self._writer.start()
        atexit.register(_drain_at_exit, weakref.ref(self))

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(self._index.values())

    def keys(self) -> list[str]:
        with self._lock:
            return list(self._index) + [k for k in self._pending if k not in self._index]

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return key in self._pending or key in self._index

    def put(self, key: str, blob: bytes) -> bool:
        """Queue `blob` for writing as `key`; False (nothing queued) if it is larger than the
        disk budget or the writer is `queue_size` entries behind."""
        check_key(key)
        if len(blob) > self.capacity:
            return False
        with self._lock:
            self._pending[key] = blob
        try:
            self._queue.put_nowait((key, blob))
        except queue.Full:
            with self._lock:
                if self._pending.get(key) is blob:
                    del self._pending[key]
            return False
        return True

    def get(self, key: str) -> bytes | None:
        """The blob stored as `key` (still queued or on disk), unvalidated; None if absent."""
        check_key(key)
        with self._lock:
            if key in self._pending:
                return self._pending[key]
            if key not in self._index:
                return None
            self._index.move_to_end(key)
        try:
            return (self.dir / (key + SUFFIX)).read_bytes()
        except OSError:
            return None

    def discard(self, key: str) -> None:
        """Forget `key` and remove its file (a rejected or superseded entry)."""
        check_key(key)
        with self._lock:
            self._pending.pop(key, None)
            self._index.pop(key, None)
        (self.dir / (key + SUFFIX)).unlink(missing_ok=True)

    def flush(self) -> None:
        """Wait until every queued entry is on disk."""
        self._queue.join()

    def close(self) -> None:
        self.flush()
        self._queue.put(None)
        self._writer.join()

    # ---- the writer thread ---------------------------------------------------------------
    def _write_loop(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                self._write(*item)
            except OSError:
                pass      # a failed write loses only this entry: it is recomputed when needed
            finally:
                self._queue.task_done()

    def _write(self, key: str, blob: bytes) -> None:
        with self._lock:
            if self._pending.get(key) is not blob:   # superseded or discarded while queued
                return
            self._index.pop(key, None)
            victims = []
            used = sum(self._index.values())
            for k, size in self._index.items():
                if used + len(blob) <= self.capacity:
                    break
                victims.append(k)
                used -= size
            for k in victims:
                del self._index[k]
        for k in victims:
            (self.dir / (k + SUFFIX)).unlink(missing_ok=True)
            self.evictions += 1
        final = self.dir / (key + SUFFIX)
        tmp = self.dir / f".{key}.{os.getpid()}.{threading.get_ident()}.tmp"
        with open(tmp, "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
        fd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        with self._lock:
            if self._pending.get(key) is blob:
                del self._pending[key]
                self._index[key] = len(blob)
            else:     # discarded while it was being written
                final.unlink(missing_ok=True)


def _drain_at_exit(ref) -> None:
    tier = ref()
    if tier is not None and tier._writer.is_alive():
        tier.flush()
