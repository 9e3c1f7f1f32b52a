"""The warm and cold KV tiers: where compressed KV entries wait while they are not in the pool.

Owns: `WarmTier` (entry blobs in RAM under a byte capacity that the memory plan reserves inside
the budget; eviction by `Priority`, then least recently used) and `ColdTier` (one file per
entry in a directory, under its own disk budget that counts files still being written). An
entry's bytes are written into a temp file as they are produced, on the caller's thread (into
the page cache: no copy of the entry stays in this process's memory); one background thread,
fed by a bounded queue, makes it durable off the critical path — fsync, rename, fsync of the
directory — so a process killed mid-write leaves at most a `*.tmp` file, which is never read
after a restart and is deleted at the next start; every read is validated by the entry's
checksum and fingerprint (`entry.py`) by the caller, and a rejected file is removed.
Does not know: what an entry holds (`entry.py`), which sequence it belongs to or when moving
it pays (`offload.py`, `cost.py`).

    writer(key, max) ─ reserve max on disk (evict oldest) ─▶ .<key>.<pid>.<n>.tmp ◀─ write pieces
    commit ─▶ pending[key] ─▶ queue ─▶ thread: fsync ─▶ rename <key>.kv ─▶ fsync dir ─▶ index
    get(key) ─▶ the temp file while pending, else <key>.kv
"""
from __future__ import annotations

import atexit
import itertools
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

    def make_room(self, nbytes: int, priority: Priority) -> bool:
        """Evict what `put` of `nbytes` at `priority` would, before the entry is even encoded
        (so that encoding it never takes the tier over its capacity); False, with nothing
        evicted, when that cannot free enough room."""
        need = nbytes - (self.capacity - self.nbytes)
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
        return True

    def put(self, key: str, blob: bytes, priority: Priority) -> bool:
        """Store `blob` under `key` (replacing it), evicting lower-priority entries — and, for
        idle sessions and cached prefixes, older ones of the same priority — to make room.

        Returns:
            False, with nothing evicted, when that cannot free enough room.
        """
        self.pop(key)
        if not self.make_room(len(blob), priority):
            return False
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
    """Checksummed entry files in `directory`, at most `capacity` bytes on disk.

    An entry's bytes go into its temp file on the caller's thread, piece by piece as they are
    produced (`writer`; the page cache, not this process's memory, holds them), and the
    background thread makes them durable (fsync, rename, fsync of the directory) and indexes
    them: the cold tier holds no entry in RAM, and disk use counts files still being written."""

    def __init__(self, directory: str | os.PathLike, capacity: int, queue_size: int = COLD_QUEUE):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.capacity = int(capacity)
        self._lock = threading.Lock()
        self._pending: dict[str, tuple[Path, int]] = {}          # key -> (temp file, bytes)
        self._writing: dict[int, int] = {}                        # writer id -> bytes reserved
        self._index: OrderedDict[str, int] = OrderedDict()       # key -> file bytes, oldest first
        self._ids = itertools.count()
        for tmp in self.dir.glob(".*.tmp"):                       # a writer killed mid-write
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
        """Bytes on disk: indexed files, files waiting to be made durable, files being written."""
        with self._lock:
            return self._used()

    def _used(self) -> int:
        return sum(self._index.values()) + sum(n for _, n in self._pending.values()) + sum(self._writing.values())

    def keys(self) -> list[str]:
        with self._lock:
            return list(self._index) + [k for k in self._pending if k not in self._index]

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return key in self._pending or key in self._index

    def writer(self, key: str, max_bytes: int) -> "ColdWrite | None":
        """A temp file for an entry of at most `max_bytes` (disk room reserved now, evicting the
        oldest files); None when it cannot fit the disk budget."""
        check_key(key)
        if max_bytes > self.capacity:
            return None
        wid = next(self._ids)
        with self._lock:
            victims = []
            used = self._used()
            for k, size in self._index.items():
                if used + max_bytes <= self.capacity:
                    break
                victims.append(k)
                used -= size
            if used + max_bytes > self.capacity:     # only files still being written are left
                return None
            for k in victims:
                del self._index[k]
            self._writing[wid] = max_bytes
        for k in victims:
            (self.dir / (k + SUFFIX)).unlink(missing_ok=True)
            self.evictions += 1
        tmp = self.dir / f".{key}.{os.getpid()}.{wid}.tmp"
        try:
            return ColdWrite(self, key, wid, tmp, max_bytes)
        except OSError:
            self._release(wid)
            return None

    def put(self, key: str, blob: bytes) -> bool:
        """Write `blob` as `key` (durable once the background thread gets to it); False if it is
        larger than the disk budget or cannot be written."""
        w = self.writer(key, len(blob))
        if w is None:
            return False
        try:
            w.write(blob)
        except OSError:
            w.abort()
            return False
        return w.commit()

    def get(self, key: str) -> bytes | None:
        """The blob stored as `key` (being made durable or on disk), unvalidated; None if absent."""
        check_key(key)
        with self._lock:
            pending = self._pending.get(key)
            if pending is None and key not in self._index:
                return None
            if key in self._index:
                self._index.move_to_end(key)
        for path in ((pending[0],) if pending else ()) + (self.dir / (key + SUFFIX),):
            try:
                return path.read_bytes()
            except OSError:
                continue          # renamed meanwhile: the final file follows
        return None

    def discard(self, key: str) -> None:
        """Forget `key` and remove its file (a rejected or superseded entry)."""
        check_key(key)
        with self._lock:
            pending = self._pending.pop(key, None)
            self._index.pop(key, None)
        if pending is not None:
            pending[0].unlink(missing_ok=True)
        (self.dir / (key + SUFFIX)).unlink(missing_ok=True)

    def flush(self) -> None:
        """Wait until every committed entry is durable and indexed."""
        self._queue.join()

    def close(self) -> None:
        self.flush()
        self._queue.put(None)
        self._writer.join()

    def _release(self, wid: int) -> None:
        with self._lock:
            self._writing.pop(wid, None)

    def _committed(self, key: str, wid: int, tmp: Path, size: int) -> bool:
        with self._lock:
            self._writing.pop(wid, None)
            old = self._pending.get(key)
            self._pending[key] = (tmp, size)
        if old is not None:                 # superseded before it was made durable
            old[0].unlink(missing_ok=True)
        try:
            self._queue.put_nowait((key, tmp))
        except queue.Full:                  # the writer is behind: make this one durable here
            try:
                self._finish(key, tmp)
            except OSError:
                self.discard(key)
                return False
        return True

    # ---- the writer thread ---------------------------------------------------------------
    def _write_loop(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                self._finish(*item)
            except OSError:
                pass      # a failed write loses only this entry: it is recomputed when needed
            finally:
                self._queue.task_done()

    def _finish(self, key: str, tmp: Path) -> None:
        with self._lock:
            if self._pending.get(key, (None,))[0] != tmp:    # superseded or discarded meanwhile
                return
        final = self.dir / (key + SUFFIX)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        with self._lock:                    # the rename and the index change together
            item = self._pending.get(key)
            if item is None or item[0] != tmp:
                return
            os.replace(tmp, final)
            del self._pending[key]
            self._index.pop(key, None)
            self._index[key] = item[1]
        fd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class ColdWrite:
    """One entry being written to its temp file (`ColdTier.writer`): `write` pieces, then
    `commit` (queued to be made durable) or `abort`; more than the reserved bytes is refused."""

    def __init__(self, tier: ColdTier, key: str, wid: int, tmp: Path, max_bytes: int):
        self.tier, self.key, self.wid, self.tmp, self.max_bytes = tier, key, wid, tmp, max_bytes
        self.size = 0
        self._f = open(tmp, "wb")

    def write(self, piece) -> None:
        self.size += len(piece)
        if self.size > self.max_bytes:
            raise OSError(f"cold entry {self.key!r} exceeds the {self.max_bytes} bytes reserved for it")
        self._f.write(piece)

    def commit(self) -> bool:
        try:
            self._f.close()
        except OSError:
            self.abort()
            return False
        return self.tier._committed(self.key, self.wid, self.tmp, self.size)

    def abort(self) -> None:
        self._f.close()
        self.tmp.unlink(missing_ok=True)
        self.tier._release(self.wid)


def _drain_at_exit(ref) -> None:
    tier = ref()
    if tier is not None and tier._writer.is_alive():
        tier.flush()
