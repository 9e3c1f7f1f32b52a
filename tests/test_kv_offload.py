"""KVOffload (kv/offload.py) on a bare store: sessions saved straight from the blocks into warm
and cold without either tier ever holding more than its capacity, restored bit for bit, and an
entry that passes its checksum but does not decode rejected, deleted and recomputed."""
import io
import json
import struct
import zlib
from types import SimpleNamespace

import torch

from memlm.kv import entry as E
from memlm.kv.cost import CostModel
from memlm.kv.entry import fingerprint
from memlm.kv.offload import KVOffload
from memlm.kv.sessions import KEY_PREFIX
from memlm.kv.store import KVStore
from memlm.kv.tiers import ColdTier, WarmTier

FP = fingerprint(model="tiny", kv_dtype="fp16", block_size=4)
BLOCKS = 16


def store(seed=0):
    s = KVStore((0, 1), num_blocks=BLOCKS, block_size=4, n_kv_heads=2, head_dim=8, dtype="fp16")
    g = torch.Generator().manual_seed(seed)
    for t in s.block_tensors().values():
        t.copy_(torch.randn(t.shape, generator=g).to(t.dtype))
    return s


def seq(seq_id, session_id, tokens, computed=None):
    return SimpleNamespace(seq_id=seq_id, index=0, prompt_token_ids=list(tokens),
                           num_computed_tokens=len(tokens) if computed is None else computed,
                           request=SimpleNamespace(session_id=session_id),
                           completion=SimpleNamespace(finish_reason="length"),
                           token_ids_slice=lambda a, b, t=list(tokens): t[a:b])


def offload(tmp_path, warm_bytes, disk_bytes, seed=0):
    cost = CostModel(prefill_tokens_per_s=1.0, learn=False)      # restoring always pays here
    return KVOffload(store(seed), cost, FP, WarmTier(warm_bytes) if warm_bytes else None,
                     ColdTier(tmp_path, disk_bytes))


def entry_bytes(tokens: int) -> int:
    """Size of one saved session of `tokens` tokens of `store()`'s blocks 0.."""
    buf = io.BytesIO()
    s = store()
    E.encode_stream(list(range(tokens)), tokens // 4, s.block_rows(list(range(tokens // 4))), FP, buf.write)
    return len(buf.getvalue())


def test_sessions_never_take_a_tier_past_its_capacity(tmp_path):
    one = entry_bytes(16)
    off = offload(tmp_path, warm_bytes=int(one * 2.5), disk_bytes=int(one * 3.5))
    for i in range(8):
        tokens = list(range(i, i + 16))
        off.keep_session(seq(i, f"s{i}", tokens), [(i + b) % BLOCKS for b in range(4)])
        assert off.warm.nbytes <= off.warm.capacity and off.cold.nbytes <= off.cold.capacity
        off.cold.flush()
        assert off.cold.nbytes <= off.cold.capacity
    assert len(off.warm.keys()) <= 2 and len(off.cold.keys()) == 3     # the newest ones
    assert sorted(off.cold.keys()) == [f"{KEY_PREFIX}s{i}" for i in (5, 6, 7)]
    disk = sum(p.stat().st_size for p in tmp_path.glob("*.kv"))
    assert disk == off.cold.nbytes <= off.cold.capacity
    off.cold.close()


def test_a_session_restores_bit_for_bit_into_other_blocks_after_a_restart(tmp_path):
    first = offload(tmp_path, warm_bytes=0, disk_bytes=1 << 20)
    tokens = list(range(100, 118))                       # 18 computed: 4 full blocks are saved
    first.keep_session(seq(1, "chat", tokens), [3, 7, 1, 9, 12])
    first.cold.flush()
    first.cold.close()
    want = first.store.export_blocks([3, 7, 1, 9])
    second = offload(tmp_path, warm_bytes=0, disk_bytes=1 << 20, seed=5)   # a new process
    nxt = seq(2, "chat", tokens + [5, 6, 7], computed=0)
    assert second.restorable_tokens(nxt) == 16
    assert second.restore(nxt, [0, 2, 4, 6, 8])
    got = second.store.export_blocks([0, 2, 4, 6])
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert second.stats["session_hits"] == 1 and second.stats["session_tokens_restored"] == 16
    assert second.stats["restore_cpu_seconds"] > 0
    second.cold.close()


def test_an_entry_that_passes_its_checksum_but_does_not_decode_is_rejected(tmp_path):
    first = offload(tmp_path, warm_bytes=0, disk_bytes=1 << 20)
    tokens = list(range(16))
    first.keep_session(seq(1, "chat", tokens), [0, 1, 2, 3])
    first.cold.flush()
    first.cold.close()
    path = tmp_path / f"{KEY_PREFIX}chat.kv"
    blob = path.read_bytes()
    (hlen,) = struct.unpack_from("<I", blob, len(E.MAGIC))
    start = len(E.MAGIC) + 4
    header = json.loads(blob[start:start + hlen])
    header["tensors"][0][2][2] += 64                     # claims more slots than the payload holds
    text = json.dumps(header).encode()
    body = E.MAGIC + struct.pack("<I", len(text)) + text + blob[start + hlen:-4]
    path.write_bytes(body + struct.pack("<I", zlib.crc32(body)))
    second = offload(tmp_path, warm_bytes=0, disk_bytes=1 << 20, seed=5)
    nxt = seq(2, "chat", tokens + [1], computed=0)
    assert second.restorable_tokens(nxt) == 16           # the checksum and header pass
    assert not second.restore(nxt, [4, 5, 6, 7])         # the caller recomputes
    assert second.sessions.rejected == 1 and second.stats["session_hits"] == 0
    assert not path.exists() and second.sessions.lookup("chat", tokens + [1]) is None
    assert second.stats["swaps_in"] == 0
    second.cold.close()
