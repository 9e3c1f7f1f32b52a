"""What the process holds resident, by kind of mapping, and dropping the clean text pages.

Owns: reading `/proc/self/smaps` into resident bytes per kind (`resident_by_kind`: code of
shared libraries, their read-only and writable data, the heap, anonymous memory, memory-mapped
model files, stacks) and `drop_text_pages`, which unmaps the resident pages of clean,
file-backed executable mappings (`madvise(MADV_DONTNEED)`).

Why dropping text is safe and what it buys: an `r-xp` mapping of a shared library that was
never written to (smaps: no Anonymous and no dirty pages) holds only copies of the file's
pages. Dropping them from this process's page tables frees nothing the process needs: the
pages stay in the kernel's page cache (shared with other processes), and the next call into
that code maps them back with a minor fault, no disk read. `import torch` maps ~60 MiB of
such code, most of which a decode loop never runs again, so its RSS falls by that much.
Never touched: writable or read-only data mappings (`rw-p`, `r--p`: relocated data that was
written once at load time; dropping it would lose the relocations), anonymous memory, and any
text mapping with a private (copy-on-write) page. Linux only; elsewhere both functions do
nothing. `MEMLM_TRIM_TEXT=0` switches the drop off.
Does not know: budgets or engines (the engine calls `drop_text_pages` once its start-up is
done, before the memory plan measures the floor).
"""
from __future__ import annotations

import ctypes
import os
import sys
from dataclasses import dataclass

MADV_DONTNEED = 4
SMAPS = "/proc/self/smaps"
KINDS = ("text", "lib_ro", "lib_rw", "file_shared", "heap", "anon", "stack", "other")


@dataclass(frozen=True)
class Mapping:
    """One entry of smaps: its range, permissions, backing file, and page counts in bytes."""

    start: int
    end: int
    perms: str        # e.g. "r-xp"
    inode: int
    path: str         # "" for anonymous memory, "[heap]" / "[stack]" / ... for special ones
    rss: int
    anonymous: int    # pages this process wrote (copy-on-write copies for file mappings)
    private_dirty: int
    shared_dirty: int

    @property
    def file_backed(self) -> bool:
        return self.inode != 0 and bool(self.path) and not self.path.startswith("[")

    @property
    def kind(self) -> str:
        """One of KINDS."""
        if self.path == "[heap]":
            return "heap"
        if self.path.startswith("[stack"):
            return "stack"
        if self.file_backed:
            if self.perms[3] == "s":
                return "file_shared"
            if "x" in self.perms:
                return "text"
            return "lib_rw" if "w" in self.perms else "lib_ro"
        if not self.path or self.path.startswith("[anon"):
            return "anon"
        return "other"        # [vdso], [vvar], ...

    @property
    def clean_text(self) -> bool:
        """File-backed, executable, never written: its resident pages are page-cache copies."""
        return (self.file_backed and self.perms.startswith("r-xp") and self.anonymous == 0
                and self.private_dirty == 0 and self.shared_dirty == 0)


def read_mappings(path: str = SMAPS) -> list[Mapping]:
    """The mappings of this process (or of the smaps file at `path`); [] where there is none."""
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    out: list[Mapping] = []
    head: list[str] | None = None
    fields: dict[str, int] = {}

    def close() -> None:
        if head is not None:
            lo, hi = (int(x, 16) for x in head[0].split("-"))
            out.append(Mapping(lo, hi, head[1], int(head[4]), head[5] if len(head) > 5 else "",
                               fields.get("Rss", 0), fields.get("Anonymous", 0),
                               fields.get("Private_Dirty", 0), fields.get("Shared_Dirty", 0)))
    for line in lines:
        parts = line.split(None, 5)
        if not parts:
            continue
        if "-" in parts[0] and not parts[0].endswith(":"):
            close()
            head, fields = parts, {}
        elif len(parts) >= 3 and parts[2] == "kB":
            fields[parts[0].rstrip(":")] = int(parts[1]) * 1024
    close()
    return out


def resident_by_kind(path: str = SMAPS) -> dict[str, int]:
    """Resident bytes per kind of mapping (KINDS, all present; zeros where smaps is missing)."""
    out = dict.fromkeys(KINDS, 0)
    for m in read_mappings(path):
        out[m.kind] += m.rss
    return out


def trim_text_enabled() -> bool:
    """MEMLM_TRIM_TEXT=0 (or false / off / no) switches `drop_text_pages` off."""
    return os.environ.get("MEMLM_TRIM_TEXT", "1").strip().lower() not in ("0", "false", "off", "no")


def drop_text_pages(force: bool = False) -> int:
    """Unmap the resident pages of clean file-backed executable mappings (see the module
    docstring); they stay in the page cache and fault back in on their next use.

    Args:
        force: drop even when MEMLM_TRIM_TEXT switches it off (tests).
    Returns:
        the resident bytes of the mappings advised (0 off Linux, when switched off, or when
        the kernel refused every range).
    """
    if not sys.platform.startswith("linux") or not (force or trim_text_enabled()):
        return 0
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        madvise = libc.madvise
    except (OSError, AttributeError):
        return 0
    madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    madvise.restype = ctypes.c_int
    dropped = 0
    for m in read_mappings():
        if m.clean_text and m.rss and madvise(m.start, m.end - m.start, MADV_DONTNEED) == 0:
            dropped += m.rss
    return dropped
