"""Persistent chat sessions: a conversation's KV kept across turns and process restarts.

Owns: session ids (validated: 1-64 of A-Z a-z 0-9 _ -, so an id can never name a path outside
the session directory), `SessionStore` — after a turn, the session's tokens and full KV blocks
as one entry, in the warm tier (RAM) and as a file in the session directory (streamed into a
temp file, made durable by the cold tier's background thread) that survives a restart (the
directory listing is the index) — and
matching a new turn's prompt against what was saved: the longest common prefix in whole
blocks, always leaving the prompt's last token to compute (its logits start the reply); and
the token ids each session saved in this process (`known_tokens`), so a caller whose hot prefix
cache already covers them need not read the entry.
An entry whose checksum, length or fingerprint (model config, weight dtype, KV codec, block
size, layout) does not match at lookup, or whose payload does not decode into the blocks at
restore (`reject`), is removed and recomputed, never served.
Does not know: the pool's blocks or when a turn ends (`offload.py`, asked by the scheduler),
nor whether restoring pays (`cost.py`).

    turn 1  prompt [sys u1]          reply [a1]         saved: [sys u1 a1] (whole blocks)
    turn 2  prompt [sys u1 a1' u2]   common prefix with the saved tokens, rounded down to a
                                     block -> restored; the rest (a1' differs from a1 where the
                                     template re-renders the reply) is computed
"""
from __future__ import annotations

import re
from typing import Callable

from memlm.errors import RequestError
from memlm.kv.cost import Tier
from memlm.kv.entry import EntryError, StoredEntry, open_entry
from memlm.kv.tiers import ColdTier, WarmTier

SESSION_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
KEY_PREFIX = "s-"


def validate_session_id(session_id) -> str:
    """`session_id` if it is safe to use as a file name; raises RequestError otherwise."""
    if not isinstance(session_id, str) or not SESSION_ID_RE.match(session_id):
        raise RequestError(f"invalid session_id {session_id!r}: use 1-64 characters of "
                           "A-Z a-z 0-9 _ -")
    return session_id


def resumable_tokens(saved: list[int], prompt: list[int], block_size: int) -> int:
    """Tokens of `prompt` whose KV `saved` holds: the common prefix in whole blocks, short of
    the prompt's last token."""
    limit = min(len(saved), len(prompt) - 1)
    n = 0
    while n < limit and saved[n] == prompt[n]:
        n += 1
    return n // block_size * block_size


class SessionStore:
    """Saved session entries over a warm tier (RAM) and a cold tier (files), either optional."""

    def __init__(self, fingerprint: str, block_size: int, warm: WarmTier | None = None,
                 cold: ColdTier | None = None):
        if warm is None and cold is None:
            raise ValueError("SessionStore needs a warm tier or a cold tier (session directory)")
        self.fp, self.block_size = fingerprint, block_size
        self.warm, self.cold = warm, cold
        self.saved = self.hits = self.rejected = 0
        self._tokens: dict[str, list[int]] = {}    # tokens saved by this process, by session id

    def save(self, session_id: str, tokens: list[int], save: Callable[[str], bool]) -> bool:
        """Keep the session's KV (an entry holding `tokens`, replacing the previous turn's):
        `save(key)` encodes it into the tiers (`KVOffload._save`: warm and cold); True if any
        tier took it."""
        key = KEY_PREFIX + validate_session_id(session_id)
        self._tokens[session_id] = list(tokens)
        kept = save(key)
        self.saved += kept
        return kept

    def known_tokens(self, session_id: str, prompt: list[int]) -> int | None:
        """Tokens of `prompt` the session's last save in this process holds, without reading the
        entry (None: saved by another process, or never): lets a caller whose hot prefix cache
        already covers them skip decoding it."""
        saved = self._tokens.get(validate_session_id(session_id))
        return None if saved is None else resumable_tokens(saved, prompt, self.block_size)

    def lookup(self, session_id: str, prompt: list[int]) -> tuple[StoredEntry, int, Tier] | None:
        """(entry, tokens of `prompt` it holds, tier it came from), or None when nothing usable is
        saved; a corrupt or foreign entry is deleted from both tiers (and counted). The whole
        blob is checked (checksum) here; its KV is decompressed only by the restore."""
        key = KEY_PREFIX + validate_session_id(session_id)
        for tier, store in ((Tier.WARM, self.warm), (Tier.COLD, self.cold)):
            blob = store.get(key) if store is not None else None
            if blob is None:
                continue
            try:
                entry = open_entry(blob, self.fp)
            except EntryError:
                self.reject(session_id)
                return None
            n = resumable_tokens(entry.tokens, prompt, self.block_size)
            return (entry, n, tier) if n else None
        return None

    def reject(self, session_id: str) -> None:
        """A saved entry turned out corrupt or foreign (at lookup or while restoring): count it
        and delete it from both tiers."""
        self.rejected += 1
        self.forget(session_id)

    def forget(self, session_id: str) -> None:
        key = KEY_PREFIX + validate_session_id(session_id)
        self._tokens.pop(session_id, None)
        if self.warm is not None:
            self.warm.pop(key)
        if self.cold is not None:
            self.cold.discard(key)
