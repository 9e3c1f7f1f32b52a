"""A disk cache of a teacher's top-k logits, so several student runs reuse one teacher pass.

Owns: running the teacher over fixed windows of a token file, keeping the k largest logits per
position, writing them zstd-compressed in chunks, and looking them up by window index.
Does not know: losses or students (see `distill.py`), or how the token file was made.

Layout under the cache directory:

    meta.json          teacher, tokenizer fingerprint, k, seq_len, window count, dtypes,
                       sha1 of the covered tokens (a cache never serves other tokens)
    chunk_00000.zst    windows [0, W): ids (W, T, k) uint16|int32, values (W, T, k) fp16,
    chunk_00001.zst    lse (W, T, n_temps) fp32 = logsumexp(z/t) over the full vocabulary for each
                       cached temperature t, then optionally hidden (W, T, Ht) fp16;
                       all C-order bytes, one zstd frame per chunk

Window w covers tokens [w*T, w*T + T); its targets are the teacher's predictions at those T
positions (the next-token distributions for tokens w*T+1 .. w*T+T).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
import zstandard

from memlm.errors import MemlmError

TOP_K = 32          # teacher logits kept per position


def tokens_digest(tokens: np.ndarray, n: int) -> str:
    return hashlib.sha1(np.ascontiguousarray(tokens[:n]).tobytes()).hexdigest()[:16]


def module_device(module) -> torch.device:
    """Where a module's weights live (parameters or, for packed weights, buffers)."""
    for t in (*module.parameters(), *module.buffers()):
        return t.device
    return torch.device("cpu")


class TeacherCache:
    def __init__(self, directory: Path, meta: dict):
        self.directory, self.meta = Path(directory), meta
        self._chunks: dict[int, tuple] = {}      # decompressed chunks, kept (cache ≈ k*6 B/token)

    @property
    def k(self) -> int:
        return self.meta["k"]

    @property
    def num_windows(self) -> int:
        return self.meta["num_windows"]

    @classmethod
    def build(cls, teacher, tokens: np.ndarray, directory: str | Path, *, seq_len: int, k: int = TOP_K,
              num_windows: int | None = None, chunk_windows: int = 16, batch_size: int = 4,
              store_hidden: bool = False, teacher_name: str = "teacher", fingerprint: str = "",
              temperatures: tuple[float, ...] = (1.0, 2.0), progress: bool = False,
              shard: tuple[int, int] = (0, 1), stage: str = "all") -> "TeacherCache | None":
        """Run `teacher` (a `Transformer`) over windows and write the cache; resumes a partial one.

        Data-parallel runs split the teacher pass by chunk over ranks, in three stages:
        "begin" (rank 0: write meta.json, or find the cache complete), "chunks" (each rank the
        chunks c with c % world == rank), "finish" (rank 0: check every chunk, mark complete),
        with a barrier between stages. "all" (the default) does the three in one process.
        Returns the cache when it is complete, else None.

        Args:
            tokens: (n,) token ids (e.g. `TokenSplits.train`).
            num_windows: how many seq_len windows from the start to cover (default: all).
            temperatures: distillation temperatures whose full-vocabulary normalizer is stored
                (the KL's "rest" bucket, see `distill.py`); other temperatures fall back to
                renormalizing over the top-k.
        """
        directory = Path(directory)
        vocab = teacher.cfg.vocab_size
        max_windows = (len(tokens) - 1) // seq_len
        num_windows = min(num_windows or max_windows, max_windows)
        if num_windows <= 0:
            raise MemlmError(f"{len(tokens)} tokens are too few for one window of {seq_len}")
        meta = {"teacher": teacher_name, "fingerprint": fingerprint, "vocab_size": vocab, "k": int(min(k, vocab)),
                "seq_len": seq_len, "num_windows": num_windows, "chunk_windows": chunk_windows,
                "id_dtype": "uint16" if vocab <= 65535 else "int32",
                "hidden_size": teacher.cfg.hidden_size if store_hidden else 0,
                "temperatures": sorted(float(t) for t in set(temperatures)),
                "tokens_sha1": tokens_digest(tokens, num_windows * seq_len + 1)}
        if stage not in ("all", "begin", "chunks", "finish"):
            raise ValueError(f"unknown cache build stage {stage!r}")
        meta_path = directory / "meta.json"
        n_chunks = -(-num_windows // chunk_windows)
        if stage == "finish":
            missing = [c for c in range(n_chunks) if not (directory / f"chunk_{c:05d}.zst").exists()]
            if missing:
                raise MemlmError(f"teacher cache {directory} misses chunks {missing[:5]}: a rank failed; rerun")
            meta["complete"] = True
            meta_path.write_text(json.dumps(meta, indent=1))
            return cls(directory, meta)
        if stage in ("all", "begin"):
            directory.mkdir(parents=True, exist_ok=True)
        if meta_path.exists():
            old = json.loads(meta_path.read_text())
            if {**old, "complete": None} != {**meta, "complete": None}:
                raise MemlmError(f"teacher cache {directory} was built for other settings/tokens; "
                                 "use another --cache-dir or delete it")
            if old.get("complete"):
                return cls(directory, old)
        elif stage == "chunks":
            raise MemlmError(f"teacher cache {directory} has no meta.json: rank 0 must begin the cache first")
        if stage in ("all", "begin"):
            meta_path.write_text(json.dumps({**meta, "complete": False}, indent=1))
        if stage == "begin":
            return None
        rank, world = shard
        cctx = zstandard.ZstdCompressor(level=3)
        it = range(rank, n_chunks, world)
        if progress:
            from tqdm import tqdm
            it = tqdm(it, desc="teacher", unit="chunk")
        teacher.eval()
        device = module_device(teacher)
        for c in it:
            path = directory / f"chunk_{c:05d}.zst"
            if path.exists():
                continue
            w0, w1 = c * chunk_windows, min(num_windows, (c + 1) * chunk_windows)
            ids_parts, val_parts, lse_parts, hid_parts = [], [], [], []
            for b0 in range(w0, w1, batch_size):
                b1 = min(w1, b0 + batch_size)
                x = torch.from_numpy(np.stack([np.asarray(tokens[w * seq_len:(w + 1) * seq_len], dtype=np.int64)
                                               for w in range(b0, b1)])).to(device)   # (b, T)
                with torch.inference_mode():
                    h = teacher.forward_dense(x)                                     # (b, T, Ht)
                    logits = teacher.compute_logits(h.reshape(-1, h.shape[-1]))      # (b*T, V)
                    vals, ids = logits.topk(meta["k"], dim=-1)                       # (b*T, k)
                    lse = torch.stack([torch.logsumexp(logits / t, dim=-1) for t in meta["temperatures"]],
                                      dim=-1)                                        # (b*T, n_temps)
                shape = (b1 - b0, seq_len, meta["k"])
                ids, vals, lse, h = ids.cpu(), vals.cpu(), lse.cpu(), h.cpu()
                ids_parts.append(ids.numpy().astype(meta["id_dtype"]).reshape(shape))
                val_parts.append(vals.numpy().astype(np.float16).reshape(shape))
                lse_parts.append(lse.numpy().astype(np.float32).reshape(shape[0], seq_len, -1))
                if store_hidden:
                    hid_parts.append(h.numpy().astype(np.float16))
            blob = b"".join(np.concatenate(p).tobytes() for p in (ids_parts, val_parts, lse_parts, hid_parts) if p)
            tmp = path.with_suffix(f".{rank}.tmp")
            tmp.write_bytes(cctx.compress(blob))
            tmp.replace(path)
        if stage == "chunks":
            return None
        meta["complete"] = True
        meta_path.write_text(json.dumps(meta, indent=1))
        return cls(directory, meta)

    @classmethod
    def open(cls, directory: str | Path, tokens: np.ndarray | None = None, seq_len: int | None = None,
             fingerprint: str | None = None) -> "TeacherCache":
        """Open a complete cache and check it was made for these tokens and tokenizer."""
        meta_path = Path(directory) / "meta.json"
        if not meta_path.exists():
            raise MemlmError(f"no teacher cache at {directory}")
        meta = json.loads(meta_path.read_text())
        if not meta.get("complete"):
            raise MemlmError(f"teacher cache {directory} is incomplete: rerun the distill command to finish it")
        if seq_len is not None and meta["seq_len"] != seq_len:
            raise MemlmError(f"teacher cache {directory} uses windows of {meta['seq_len']} tokens, not {seq_len}")
        if fingerprint and meta["fingerprint"] and fingerprint != meta["fingerprint"]:
            raise MemlmError(f"tokenizer mismatch: teacher cache {directory} was made with another tokenizer")
        if tokens is not None and tokens_digest(tokens, meta["num_windows"] * meta["seq_len"] + 1) != meta["tokens_sha1"]:
            raise MemlmError(f"teacher cache {directory} was computed on other tokens")
        return cls(directory, meta)

    def _chunk(self, c: int) -> tuple:
        if c not in self._chunks:
            m = self.meta
            n = min(m["chunk_windows"], m["num_windows"] - c * m["chunk_windows"])
            raw = zstandard.ZstdDecompressor().decompress((self.directory / f"chunk_{c:05d}.zst").read_bytes())
            shape = (n, m["seq_len"], m["k"])
            id_dt = np.dtype(m["id_dtype"])
            n_ids = int(np.prod(shape)) * id_dt.itemsize
            ids = np.frombuffer(raw, dtype=id_dt, count=int(np.prod(shape))).reshape(shape)
            vals = np.frombuffer(raw, dtype=np.float16, count=int(np.prod(shape)), offset=n_ids).reshape(shape)
            n_t = len(m.get("temperatures", []))
            lse = np.frombuffer(raw, dtype=np.float32, count=n * m["seq_len"] * n_t,
                                offset=n_ids + vals.nbytes).reshape(n, m["seq_len"], n_t)
            hid = None
            if m["hidden_size"]:
                hid = np.frombuffer(raw, dtype=np.float16, offset=n_ids + vals.nbytes + lse.nbytes
                                    ).reshape(n, m["seq_len"], -1)
            self._chunks[c] = (ids, vals, lse, hid)
        return self._chunks[c]

    def lookup(self, windows: torch.Tensor, temperature: float | None = None) -> dict:
        """(B,) window indices -> {"teacher_ids" (B,T,k) int64, "teacher_logits" (B,T,k) fp32,
        "teacher_lse" (B,T) fp32 at `temperature` (None if not cached), "teacher_hidden"
        (B,T,Ht) fp32 or None}."""
        cw = self.meta["chunk_windows"]
        temps = self.meta.get("temperatures", [])
        t_idx = temps.index(float(temperature)) if temperature is not None and float(temperature) in temps else None
        ids, vals, lses, hid = [], [], [], []
        for w in windows.tolist():
            if not 0 <= w < self.num_windows:
                raise MemlmError(f"window {w} is outside the teacher cache ({self.num_windows} windows)")
            ci, vi, li, hi = self._chunk(w // cw)
            ids.append(ci[w % cw].astype(np.int64))
            vals.append(vi[w % cw].astype(np.float32))
            if t_idx is not None:
                lses.append(li[w % cw, :, t_idx])
            if hi is not None:
                hid.append(hi[w % cw].astype(np.float32))
        return {"teacher_ids": torch.from_numpy(np.stack(ids)), "teacher_logits": torch.from_numpy(np.stack(vals)),
                "teacher_lse": torch.from_numpy(np.stack(lses)) if lses else None,
                "teacher_hidden": torch.from_numpy(np.stack(hid)) if hid else None}


class CachedTeacherBatches:
    """Batches of aligned windows with the cached teacher targets attached."""

    def __init__(self, sampler, cache: TeacherCache, temperature: float | None = None):
        if not sampler.aligned:
            raise ValueError("a teacher cache needs an aligned WindowSampler")
        self.sampler, self.cache, self.temperature = sampler, cache, temperature

    def batch(self, i: int) -> dict:
        b = self.sampler.batch(i)
        return {**b, **self.cache.lookup(b["windows"], self.temperature)}


class LiveTeacherBatches:
    """Batches with the teacher run on the fly (full-vocabulary logits, no cache)."""

    def __init__(self, sampler, teacher, hidden: bool = False):
        self.sampler, self.teacher, self.hidden = sampler, teacher.eval(), hidden

    def batch(self, i: int) -> dict:
        b = self.sampler.batch(i)
        device = module_device(self.teacher)
        with torch.inference_mode():
            h = self.teacher.forward_dense(b["input"].to(device))             # (B, T, Ht)
            logits = self.teacher.compute_logits(h.reshape(-1, h.shape[-1]))   # (B*T, V)
        return {**b, "teacher_ids": None, "teacher_logits": logits.clone(),
                "teacher_hidden": h.clone() if self.hidden else None}
