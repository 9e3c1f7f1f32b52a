"""KV entries: a run of one sequence's KV blocks and the tokens they hold, as checksummed bytes.

Owns: `KVEntry` (token ids + the block tensors a `KVStore` exported + the fingerprint of the
model, codec and layout that wrote them), its byte format and validation: a blob whose magic,
length, checksum or fingerprint does not match is refused with `EntryError`, never turned into
KV. `fingerprint()` of the facts that make KV interchangeable. Encoding and decoding stream in
chunks of at most `CHUNK_BYTES` of raw KV (`encode_stream`, `decode_into`): a session is
compressed straight from the pool's blocks into its destination (bytes or a file) and restored
straight from the blob into the pool's blocks, so neither side ever holds a whole raw
(uncompressed) copy; a blob being restored is held whole (its checksum is checked first).
Does not know: where blobs live (`tiers.py`), which blocks they came from or go to
(`offload.py`), or what the tensors mean (`store.py` reads and writes the chunks).

    b"MEMLMKV3" | u32 header length | header (JSON) | payload (one zstd frame) | CRC-32 of all before
    header:  {"fingerprint", "tokens", "num_blocks", "chunk_bytes", "tensors": [[name, dtype, shape]]}
    payload: for each tensor (shape (A, B, slots, ...): rows = A * B), chunk after chunk (`chunks`:
             whole rows while a row is at most chunk_bytes, else slot ranges of one row), each
             chunk's bytes split into byte-planes ("shuffled") for multi-byte dtypes so that zstd
             sees the slowly varying high bytes of fp16 / fp32 together

Compression is lossless: the bytes the hot pool stores (fp16, int8 + scales, ...) come back
bit for bit, so a restored sequence continues exactly as if it had never left the pool.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import struct
import zlib
from dataclasses import dataclass
from typing import Callable, Iterator, Protocol

import numpy as np
import torch
import zstandard

# Version 3: chunked payload (bounded memory on both sides). Version 2 added CRC-32 (blake2b
# cost ~25x more on the critical path) and numpy byte-planes. Older files fail the magic check
# and are recomputed.
MAGIC = b"MEMLMKV3"
DIGEST_BYTES = 4
ZSTD_LEVEL = 1            # fast: compression runs on the preempting step's critical path
CHUNK_BYTES = 1 << 20     # raw KV per chunk: the scratch of one save or restore is a few of these
Spec = tuple[str, torch.dtype, tuple[int, ...]]


class EntryError(ValueError):
    """A stored KV blob is corrupt, truncated or from another model / codec: recompute."""


class ChunkSource(Protocol):
    """What `encode_stream` reads: the tensors' specs and contiguous chunks of them."""

    def specs(self) -> list[Spec]: ...

    def read(self, name: str, r0: int, r1: int, s0: int, s1: int) -> torch.Tensor: ...


def fingerprint(**facts) -> str:
    """A short stable id of the facts (model config, weight dtype, kv dtype, block size, ...)."""
    text = json.dumps(facts, sort_keys=True, default=str)
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def chunks(shape, elem: int, chunk_bytes: int) -> Iterator[tuple[int, int, int, int]]:
    """(r0, r1, s0, s1) row and slot ranges of a (A, B, slots, ...) tensor, in payload order."""
    rows, slots = shape[0] * shape[1], shape[2]
    slot_bytes = max(1, elem * math.prod(shape[3:]))
    row_bytes = slots * slot_bytes
    if row_bytes <= chunk_bytes:
        per = max(1, chunk_bytes // max(1, row_bytes))
        for r in range(0, rows, per):
            yield r, min(rows, r + per), 0, slots
        return
    per = max(1, chunk_bytes // slot_bytes)
    for r in range(rows):
        for s in range(0, slots, per):
            yield r, r + 1, s, min(slots, s + per)


class TensorSource:
    """A `ChunkSource` over tensors in memory (a `KVEntry`)."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = {name: t.contiguous() for name, t in tensors.items()}

    def specs(self) -> list[Spec]:
        return [(name, t.dtype, tuple(t.shape)) for name, t in self.tensors.items()]

    def read(self, name, r0, r1, s0, s1):
        t = self.tensors[name]
        return t.reshape(-1, *t.shape[2:])[r0:r1, s0:s1].contiguous()


def _header(tokens: list[int], num_blocks: int, specs: list[Spec], fp: str, chunk_bytes: int) -> bytes:
    return json.dumps({"fingerprint": fp, "tokens": [int(t) for t in tokens], "num_blocks": int(num_blocks),
                       "chunk_bytes": int(chunk_bytes),
                       "tensors": [[n, str(d).removeprefix("torch."), list(s)] for n, d, s in specs]}).encode()


def _raw_bytes(specs: list[Spec]) -> int:
    return sum(math.prod(shape) * torch.empty((), dtype=d).element_size() for _, d, shape in specs)


def encode_stream(tokens: list[int], num_blocks: int, source: ChunkSource, fp: str,
                  write: Callable[[bytes], object], chunk_bytes: int = CHUNK_BYTES) -> int:
    """Write the entry to `write` piece by piece (see the module docstring); returns its size,
    at most `max_size` of the same arguments. Memory besides the output: one chunk of `source`
    and its byte-planes, and zstd's state."""
    specs = source.specs()
    for _, _, shape in specs:
        if len(shape) < 3:
            raise ValueError(f"KV entry tensors need (A, B, slots, ...) shapes, got {tuple(shape)}")
    header = _header(tokens, num_blocks, specs, fp, chunk_bytes)
    crc, size = 0, 0

    def out(piece: bytes) -> None:
        nonlocal crc, size
        if piece:
            crc, size = zlib.crc32(piece, crc), size + len(piece)
            write(piece)

    out(MAGIC + struct.pack("<I", len(header)) + header)
    cobj = zstandard.ZstdCompressor(level=ZSTD_LEVEL).compressobj()
    for name, dtype, shape in specs:
        elem = torch.empty((), dtype=dtype).element_size()
        for r0, r1, s0, s1 in chunks(shape, elem, chunk_bytes):
            out(cobj.compress(_split_planes(source.read(name, r0, r1, s0, s1))))
    out(cobj.flush())
    write(struct.pack("<I", crc))
    return size + DIGEST_BYTES


def max_size(tokens: list[int], num_blocks: int, source: ChunkSource, fp: str,
             chunk_bytes: int = CHUNK_BYTES) -> int:
    """The most bytes `encode_stream` of these arguments can write, before it runs (a tier makes
    that much room first): the exact header, and zstd's bound of the raw bytes (ZSTD_COMPRESSBOUND:
    the input, 1/256 of it for incompressible blocks, a margin for small inputs; plus the frame)."""
    raw = _raw_bytes(source.specs())
    small = (128 * 1024 - raw) >> 11 if raw < 128 * 1024 else 0
    header = _header(tokens, num_blocks, source.specs(), fp, chunk_bytes)
    return len(MAGIC) + 4 + len(header) + raw + (raw >> 8) + small + 64 + DIGEST_BYTES


@dataclass
class KVEntry:
    """Tokens 0 .. len(tokens) - 1 of a sequence and the KV blocks that hold them."""

    tokens: list[int]
    tensors: dict[str, torch.Tensor]    # KVStore.export_blocks: name -> (layers, 2, n * bs, ...)
    num_blocks: int

    def encode(self, fp: str) -> bytes:
        """The entry as one checksummed blob (see the module docstring)."""
        buf = io.BytesIO()
        encode_stream(self.tokens, self.num_blocks, TensorSource(self.tensors), fp, buf.write)
        return buf.getvalue()

    @property
    def raw_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


def read_header(blob, fp: str) -> dict:
    """Validate `blob` (magic, checksum, fingerprint) and return its header; raises EntryError."""
    if len(blob) < len(MAGIC) + 4 + DIGEST_BYTES or bytes(blob[:len(MAGIC)]) != MAGIC:
        raise EntryError("not a memlm KV entry (bad magic or truncated)")
    body = memoryview(blob)[:-DIGEST_BYTES]
    if struct.pack("<I", zlib.crc32(body)) != bytes(blob[-DIGEST_BYTES:]):
        raise EntryError("checksum mismatch (corrupt or truncated)")
    (hlen,) = struct.unpack_from("<I", body, len(MAGIC))
    try:
        header = json.loads(bytes(body[len(MAGIC) + 4:len(MAGIC) + 4 + hlen]))
    except ValueError as e:
        raise EntryError(f"unreadable header: {e}") from None
    if header.get("fingerprint") != fp:
        raise EntryError("written by another model, weight dtype, KV codec or block size")
    header["payload_start"] = len(MAGIC) + 4 + hlen
    return header


def header_specs(header: dict) -> list[Spec]:
    specs = []
    for name, dtype_name, shape in header["tensors"]:
        dtype = getattr(torch, dtype_name, None)
        if not isinstance(dtype, torch.dtype) or len(shape) < 3:
            raise EntryError(f"unknown tensor dtype {dtype_name!r} or shape {shape}")
        specs.append((name, dtype, tuple(int(s) for s in shape)))
    return specs


def decode_into(blob, header: dict, write: Callable[[str, int, int, int, int, torch.Tensor], None]) -> None:
    """Decompress the payload of `blob` (validated by `read_header` into `header`) chunk by
    chunk, handing each to `write(name, r0, r1, s0, s1, tensor (r1 - r0, s1 - s0, ...))`."""
    payload = memoryview(blob)[header["payload_start"]:-DIGEST_BYTES]
    chunk_bytes = int(header.get("chunk_bytes", CHUNK_BYTES))
    try:
        reader = zstandard.ZstdDecompressor().stream_reader(payload, read_across_frames=False)
        for name, dtype, shape in header_specs(header):
            elem = torch.empty((), dtype=dtype).element_size()
            for r0, r1, s0, s1 in chunks(shape, elem, chunk_bytes):
                n = (r1 - r0) * (s1 - s0) * math.prod(shape[3:]) * elem
                raw = _read_exact(reader, n)
                planes = np.frombuffer(raw, dtype=np.uint8).reshape(elem, -1)
                write(name, r0, r1, s0, s1, _join_planes(planes).view(dtype).view(r1 - r0, s1 - s0, *shape[3:]))
        if reader.read(1):
            raise EntryError("payload longer than its header says")
    except zstandard.ZstdError as e:
        raise EntryError(f"payload does not decompress: {e}") from None


@dataclass
class StoredEntry:
    """A blob validated by `open_entry` (checksum, fingerprint), not yet decompressed: its
    tokens are known at once, its KV goes chunk by chunk into the pool (`restore_into`)."""

    blob: bytes
    header: dict

    @property
    def tokens(self) -> list[int]:
        return self.header["tokens"]

    @property
    def num_blocks(self) -> int:
        return int(self.header["num_blocks"])

    def restore_into(self, rows) -> None:
        """Write the KV into `rows` (a `store.BlockRows` of the destination blocks, which may be
        fewer than the entry holds); raises EntryError / ValueError (another layout)."""
        specs = header_specs(self.header)
        rows.check(specs)
        decode_into(self.blob, self.header, rows.write)


def open_entry(blob, fp: str) -> StoredEntry:
    """`blob` validated against fingerprint `fp` (checksum over all of it); raises EntryError."""
    header = read_header(blob, fp)
    header["tokens"] = [int(t) for t in header["tokens"]]
    header_specs(header)
    return StoredEntry(blob, header)


def decode(blob, fp: str) -> KVEntry:
    """The entry in `blob`, validated against fingerprint `fp`; raises EntryError."""
    header = read_header(blob, fp)
    specs = header_specs(header)
    raw = {name: np.empty((s[0] * s[1], s[2], math.prod(s[3:]) * torch.empty((), dtype=d).element_size()),
                          dtype=np.uint8) for name, d, s in specs}

    def put(name, r0, r1, s0, s1, t):      # numpy copies: no torch thread pool for small chunks
        raw[name][r0:r1, s0:s1] = t.view(torch.uint8).numpy().reshape(r1 - r0, s1 - s0, -1)

    decode_into(blob, header, put)
    tensors = {name: torch.from_numpy(raw[name]).view(d).view(s) for name, d, s in specs}
    return KVEntry([int(t) for t in header["tokens"]], tensors, int(header["num_blocks"]))


def _read_exact(reader, n: int) -> bytearray:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = reader.readinto(view[got:])
        if not k:
            raise EntryError("payload shorter than its header says")
        got += k
    return buf


_UINT = {2: np.uint16, 4: np.uint32, 8: np.uint64}


def _split_planes(t: torch.Tensor) -> bytes:
    """A contiguous tensor's bytes as byte-planes: byte k of every element, for k = 0, 1, ...
    (shifts of the elements as unsigned integers: a strided byte transpose costs ~20x more)."""
    elem = t.element_size()
    u8 = t.reshape(-1).view(torch.uint8).numpy()
    if elem == 1:
        return u8.tobytes()
    u = u8.view(_UINT[elem])
    planes = np.empty((elem, u.size), dtype=np.uint8)
    for k in range(elem):
        np.copyto(planes[k], u >> (8 * k) if k else u, casting="unsafe")
    return planes.tobytes()


def _join_planes(planes: np.ndarray) -> torch.Tensor:
    """The inverse of `_split_planes`: (bytes per element, elements) -> the elements' bytes,
    uint8, in a new array."""
    elem = planes.shape[0]
    if elem == 1:
        return torch.from_numpy(planes.reshape(-1).copy())
    kind = _UINT[elem]
    out = planes[0].astype(kind)
    for k in range(1, elem):
        out |= planes[k].astype(kind) << kind(8 * k)
    return torch.from_numpy(out.view(np.uint8))
