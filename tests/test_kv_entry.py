"""KV entries streamed in chunks (kv/entry.py) between a store's blocks (`KVStore.block_rows`)
and bytes: lossless in every chunking, bounded by `max_size`, and anything forged, foreign or of
another layout refused with EntryError / ValueError instead of being written as KV."""
import io
import json
import struct
import zlib

import pytest
import torch

from memlm.kv import entry as E
from memlm.kv.entry import EntryError, KVEntry, decode, encode_stream, fingerprint, max_size, open_entry
from memlm.kv.store import KVStore

FP = fingerprint(model="tiny", kv_dtype="fp16", block_size=4)


def kv_entry(slots=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return KVEntry(list(range(slots)), {"kv": torch.randn(2, 2, slots, 2, 8, generator=g).half(),
                                        "scales": torch.rand(2, 2, slots, 2, generator=g)}, slots // 4)


def encode(e: KVEntry, chunk_bytes: int) -> bytes:
    buf = io.BytesIO()
    n = encode_stream(e.tokens, e.num_blocks, E.TensorSource(e.tensors), FP, buf.write, chunk_bytes)
    assert n == len(buf.getvalue())
    return buf.getvalue()


@pytest.mark.parametrize("chunk_bytes", [1, 40, 100, 384, 1000, E.CHUNK_BYTES])
def test_every_chunking_round_trips_bit_for_bit(chunk_bytes):
    # rows of "kv" are 12 slots x 32 bytes = 384 bytes: below that, slot ranges of one row;
    # above, several whole rows per chunk (the last one short)
    e = kv_entry()
    back = decode(encode(e, chunk_bytes), FP)
    assert back.tokens == e.tokens and back.num_blocks == e.num_blocks
    for name, t in e.tensors.items():
        assert back.tensors[name].dtype == t.dtype and torch.equal(back.tensors[name], t)


def test_chunks_cover_each_tensor_once_in_order():
    seen = [(r, s) for r0, r1, s0, s1 in E.chunks((3, 2, 10, 4), 2, 24) for r in range(r0, r1)
            for s in range(s0, s1)]
    assert seen == [(r, s) for r in range(6) for s in range(10)]


@pytest.mark.parametrize("slots", [1, 40, 300, 3000])
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_max_size_bounds_incompressible_entries_tightly(dtype, slots):
    g = torch.Generator().manual_seed(slots)
    raw = torch.randint(0, 256, (4, 2, slots, 8, 64), dtype=torch.uint8, generator=g)
    e = KVEntry([49151] * slots, {"kv": raw.view(dtype)}, max(1, slots // 4))
    blob = e.encode(FP)
    bound = max_size(e.tokens, e.num_blocks, E.TensorSource(e.tensors), FP)
    assert e.raw_bytes < len(blob) <= bound <= len(blob) + e.raw_bytes // 200 + 200


def forged(blob: bytes, edit) -> bytes:
    """`blob` with its header edited and the checksum made valid again (a forged entry)."""
    (hlen,) = struct.unpack_from("<I", blob, len(E.MAGIC))
    start = len(E.MAGIC) + 4
    header = json.loads(blob[start:start + hlen])
    edit(header)
    text = json.dumps(header).encode()
    body = E.MAGIC + struct.pack("<I", len(text)) + text + blob[start + hlen:-E.DIGEST_BYTES]
    return body + struct.pack("<I", zlib.crc32(body))


def test_forged_entries_with_a_valid_checksum_are_refused_not_written():
    blob = kv_entry().encode(FP)
    assert decode(forged(blob, lambda h: None), FP).tokens == list(range(12))
    longer = open_entry(forged(blob, lambda h: h["tensors"][0][2].__setitem__(2, 16)), FP)
    with pytest.raises(EntryError, match="shorter than its header"):
        decode(longer.blob, FP)
    with pytest.raises(EntryError, match="longer than its header"):
        decode(forged(blob, lambda h: h["tensors"][1][2].__setitem__(2, 8)), FP)
    with pytest.raises(EntryError, match="unknown tensor dtype"):
        open_entry(forged(blob, lambda h: h["tensors"][0].__setitem__(1, "complex_thing")), FP)
    with pytest.raises(EntryError, match="bad magic"):
        open_entry(b"MEMLMKV2" + blob[len(E.MAGIC):], FP)        # the previous format: recomputed


def store_of(dtype, seed=0, num_blocks=6):
    s = KVStore((0, 1), num_blocks=num_blocks, block_size=4, n_kv_heads=2, head_dim=8, dtype=dtype)
    g = torch.Generator().manual_seed(seed)
    for t in s.block_tensors().values():
        t.copy_((torch.randn(t.shape, generator=g) * 20).to(t.dtype))
    return s


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "int8", "int4"])
@pytest.mark.parametrize("chunk_bytes", [64, E.CHUNK_BYTES])
def test_blocks_stream_from_one_store_into_another(dtype, chunk_bytes):
    src, dst = store_of(dtype), store_of(dtype, seed=1)
    want = src.export_blocks([4, 1])
    buf = io.BytesIO()
    encode_stream(list(range(8)), 2, src.block_rows([4, 1]), FP, buf.write, chunk_bytes)
    entry = open_entry(buf.getvalue(), FP)
    untouched = dst.export_blocks([1, 3, 4, 5])
    entry.restore_into(dst.block_rows([2, 0], flush=False))
    got = dst.export_blocks([2, 0])
    assert all(torch.equal(got[k], want[k]) for k in want)
    rest = dst.export_blocks([1, 3, 4, 5])
    assert all(torch.equal(rest[k], untouched[k]) for k in rest)
    # an entry may be restored into fewer blocks than it holds: its first ones
    entry.restore_into(dst.block_rows([5], flush=False))
    first, got5 = src.export_blocks([4]), dst.export_blocks([5])
    assert all(torch.equal(got5[k], first[k]) for k in first)
    # consecutive blocks (read and written as slices) and out-of-order ones agree
    for ids in ([1, 2], [2, 3], [3, 2]):
        buf = io.BytesIO()
        encode_stream(list(range(8)), 2, src.block_rows(ids), FP, buf.write, chunk_bytes)
        open_entry(buf.getvalue(), FP).restore_into(dst.block_rows([3, 4] if ids != [3, 2] else [5, 4], flush=False))
        want, got = src.export_blocks(ids), dst.export_blocks([3, 4] if ids != [3, 2] else [5, 4])
        assert all(torch.equal(got[k], want[k]) for k in want)


def test_restore_into_another_layout_or_more_blocks_is_refused_before_writing():
    src = store_of("int8")
    buf = io.BytesIO()
    encode_stream(list(range(4)), 1, src.block_rows([0]), FP, buf.write)
    entry = open_entry(buf.getvalue(), FP)
    other = store_of("fp32", seed=2)
    before = other.export_blocks([0, 1])
    with pytest.raises(ValueError, match="do not match"):
        entry.restore_into(other.block_rows([0], flush=False))
    same = store_of("int8", seed=3)
    with pytest.raises(ValueError, match="do not match"):
        entry.restore_into(same.block_rows([0, 1], flush=False))       # it holds only one block
    after = other.export_blocks([0, 1])
    assert all(torch.equal(after[k], before[k]) for k in before)
