"""KV entries: a run of one sequence's KV blocks and the tokens they hold, as checksummed bytes.

Owns: `KVEntry` (token ids + the block tensors a `KVStore` exported + the fingerprint of the
model, codec and layout that wrote them), its byte format and validation: a blob whose magic,
length, checksum or fingerprint does not match is refused with `EntryError`, never turned into
KV. `fingerprint()` of the facts that make KV interchangeable.
Does not know: where blobs live (`tiers.py`), which blocks they came from or go to
(`offload.py`), or what the tensors mean (`store.py` exports and imports them).

    b"MEMLMKV2" | u32 header length | header (JSON) | payload (zstd) | CRC-32 of all before
    header:  {"fingerprint", "tokens", "num_blocks", "tensors": [[name, dtype, shape], ...]}
    payload: each tensor's bytes in header order, byte-planes split ("shuffled") for multi-byte
             dtypes so that zstd sees the slowly varying high bytes of fp16 / fp32 together

Compression is lossless: the bytes the hot pool stores (fp16, int8 + scales, ...) come back
bit for bit, so a restored sequence continues exactly as if it had never left the pool.
"""
from __future__ import annotations

import hashlib
import json
import struct
import zlib
from dataclasses import dataclass

import numpy as np
import torch
import zstandard

# Version 2: CRC-32 (a resumed turn checks its whole entry on the critical path; blake2b cost
# ~25x more) and byte-planes split with numpy (torch's uint8 transpose was the slowest step).
# Version 1 files fail the magic check and are recomputed.
MAGIC = b"MEMLMKV2"
DIGEST_BYTES = 4
ZSTD_LEVEL = 1            # fast: compression runs on the preempting step's critical path


class EntryError(ValueError):
    """A stored KV blob is corrupt, truncated or from another model / codec: recompute."""


def fingerprint(**facts) -> str:
    """A short stable id of the facts (model config, weight dtype, kv dtype, block size, ...)."""
    text = json.dumps(facts, sort_keys=True, default=str)
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


@dataclass
class KVEntry:
    """Tokens 0 .. len(tokens) - 1 of a sequence and the KV blocks that hold them."""

    tokens: list[int]
    tensors: dict[str, torch.Tensor]    # KVStore.export_blocks: name -> (layers, 2, n * bs, ...)
    num_blocks: int

    def encode(self, fp: str) -> bytes:
        """The entry as one checksummed blob (see the module docstring)."""
        specs, planes = [], []
        for name, t in self.tensors.items():
            t = t.contiguous()
            specs.append([name, str(t.dtype).removeprefix("torch."), list(t.shape)])
            planes.append(_split_planes(t))
        header = json.dumps({"fingerprint": fp, "tokens": self.tokens, "num_blocks": self.num_blocks,
                             "tensors": specs}).encode()
        payload = zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(b"".join(planes))
        body = MAGIC + struct.pack("<I", len(header)) + header + payload
        return body + _digest(body)

    @property
    def raw_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


def read_header(blob: bytes, fp: str) -> dict:
    """Validate `blob` (magic, checksum, fingerprint) and return its header; raises EntryError."""
    if len(blob) < len(MAGIC) + 4 + DIGEST_BYTES or not blob.startswith(MAGIC):
        raise EntryError("not a memlm KV entry (bad magic or truncated)")
    body, digest = memoryview(blob)[:-DIGEST_BYTES], blob[-DIGEST_BYTES:]
    if _digest(body) != digest:
        raise EntryError("checksum mismatch (corrupt or truncated)")
    (hlen,) = struct.unpack_from("<I", body, len(MAGIC))
    try:
        header = json.loads(bytes(body[len(MAGIC) + 4:len(MAGIC) + 4 + hlen]))
    except ValueError as e:
        raise EntryError(f"unreadable header: {e}") from None
    if header.get("fingerprint") != fp:
        raise EntryError("written by another model, weight dtype, KV codec or block size")
    return header


def decode(blob: bytes, fp: str) -> KVEntry:
    """The entry in `blob`, validated against fingerprint `fp`; raises EntryError."""
    header = read_header(blob, fp)
    start = len(MAGIC) + 4 + int(struct.unpack_from("<I", blob, len(MAGIC))[0])
    try:
        raw = zstandard.ZstdDecompressor().decompress(memoryview(blob)[start:-DIGEST_BYTES])
    except zstandard.ZstdError as e:
        raise EntryError(f"payload does not decompress: {e}") from None
    tensors, offset = {}, 0
    for name, dtype_name, shape in header["tensors"]:
        dtype = getattr(torch, dtype_name, None)
        if not isinstance(dtype, torch.dtype):
            raise EntryError(f"unknown tensor dtype {dtype_name!r}")
        elem = torch.empty((), dtype=dtype).element_size()
        n = elem * int(torch.Size(shape).numel())
        if offset + n > len(raw):
            raise EntryError("payload shorter than its header says")
        planes = np.frombuffer(raw, dtype=np.uint8, count=n, offset=offset).reshape(elem, -1)
        tensors[name] = _join_planes(planes).view(dtype).view(shape)
        offset += n
    if offset != len(raw):
        raise EntryError("payload longer than its header says")
    return KVEntry([int(t) for t in header["tokens"]], tensors, int(header["num_blocks"]))


def _digest(body) -> bytes:
    return struct.pack("<I", zlib.crc32(body))


def _split_planes(t: torch.Tensor) -> bytes:
    """A contiguous tensor's bytes as byte-planes: byte k of every element, for k = 0, 1, ..."""
    elem = t.element_size()
    u8 = t.view(torch.uint8).numpy().reshape(-1, elem)       # (elements, bytes per element)
    if elem == 1:
        return u8.tobytes()
    planes = np.empty((elem, u8.shape[0]), dtype=np.uint8)
    for k in range(elem):
        planes[k] = u8[:, k]
    return planes.tobytes()


def _join_planes(planes: np.ndarray) -> torch.Tensor:
    """The inverse of `_split_planes`: (bytes per element, elements) -> (elements, bytes) uint8."""
    elem = planes.shape[0]
    out = np.empty((planes.shape[1], elem), dtype=np.uint8)
    for k in range(elem):
        out[:, k] = planes[k]
    return torch.from_numpy(out)
