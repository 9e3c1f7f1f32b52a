"""KV tiers: entry format, warm / cold tiers, block export / import, the cost model, and
preemption by swap against preemption by recompute on a tiny model."""
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

import engine_fakes as ef

from memlm import LLM, SamplingParams
from memlm.kv.cost import CostModel, Priority, Tier
from memlm.kv.entry import EntryError, KVEntry, decode, fingerprint
from memlm.kv.store import KVStore
from memlm.kv.tiers import ColdTier, WarmTier

FP = fingerprint(model="tiny", kv_dtype="fp16", block_size=4)


def entry(seed=0, blocks=3, dtype=torch.float16):
    g = torch.Generator().manual_seed(seed)
    kv = torch.randn(2, 2, blocks * 4, 2, 8, generator=g).to(dtype)          # (layers, 2, slots, nkv, hd)
    scales = torch.rand(2, 2, blocks * 4, 2, generator=g)
    return KVEntry(list(range(seed, seed + blocks * 4)), {"kv": kv, "scales": scales}, blocks)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.int8, torch.bfloat16])
def test_entry_round_trip_is_lossless(dtype):
    if dtype is torch.int8:
        e = KVEntry([1, 2], {"kv": torch.randint(-127, 128, (2, 2, 8, 2, 8), dtype=torch.int8)}, 2)
    else:
        e = entry(dtype=dtype)
    back = decode(e.encode(FP), FP)
    assert back.tokens == e.tokens and back.num_blocks == e.num_blocks
    for name, t in e.tensors.items():
        assert back.tensors[name].dtype == t.dtype and torch.equal(back.tensors[name], t)


def test_entry_rejects_corrupt_truncated_and_foreign_blobs():
    blob = entry().encode(FP)
    flipped = bytearray(blob)
    flipped[len(blob) // 2] ^= 0x40
    for bad in (bytes(flipped), blob[:-1], blob[: len(blob) // 2], b"", b"MEMLMKV1" + b"\0" * 40):
        with pytest.raises(EntryError):
            decode(bad, FP)
    with pytest.raises(EntryError, match="another model"):
        decode(blob, fingerprint(model="tiny", kv_dtype="int8", block_size=4))


def test_warm_tier_evicts_by_priority_then_lru():
    blob = b"x" * 100
    warm = WarmTier(350)
    assert warm.put("s1", blob, Priority.IDLE_SESSION) and warm.put("s2", blob, Priority.IDLE_SESSION)
    assert warm.put("w1", blob, Priority.SWAPPED)
    assert warm.get("s1") == blob                       # s1 is now the more recently used session
    assert warm.put("w2", blob, Priority.SWAPPED)       # evicts the older idle session, s2
    assert "s2" not in warm and "s1" in warm and warm.nbytes == 300
    assert warm.put("w3", blob, Priority.SWAPPED)       # evicts s1; swapped entries never evict each other
    assert not warm.put("w4", blob, Priority.SWAPPED)
    assert sorted(k for k in ("s1", "s2", "w1", "w2", "w3") if k in warm) == ["w1", "w2", "w3"]
    assert not warm.put("s3", blob, Priority.IDLE_SESSION) and warm.evictions == 2
    assert warm.pop("w1") == blob and warm.nbytes == 200


def test_cold_tier_round_trip_restart_and_disk_budget(tmp_path):
    blobs = {f"k{i}": entry(seed=i).encode(FP) for i in range(4)}
    size = len(blobs["k0"])
    cold = ColdTier(tmp_path, capacity=int(size * 2.5))
    for key, blob in blobs.items():
        assert cold.put(key, blob)
        cold.flush()          # one at a time, so eviction order is the write order
    assert cold.nbytes <= cold.capacity and cold.evictions == 2
    assert cold.get("k0") is None and cold.get("k1") is None and cold.get("k3") == blobs["k3"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k2.kv", "k3.kv"]
    assert not cold.put("huge", b"x" * (cold.capacity + 1))
    cold.close()
    again = ColdTier(tmp_path, capacity=int(size * 2.5))           # a restart: the files are the index
    assert again.keys() == ["k2", "k3"] and decode(again.get("k2"), FP).tokens == entry(seed=2).tokens
    again.discard("k2")
    assert not (tmp_path / "k2.kv").exists() and again.get("k2") is None
    with pytest.raises(ValueError, match="invalid KV tier key"):
        again.get("../etc/passwd")
    again.close()


KILLED_WRITER = textwrap.dedent("""
    import sys, torch
    from memlm.kv.entry import KVEntry
    from memlm.kv.tiers import ColdTier
    cold = ColdTier(sys.argv[1], capacity=1 << 40)
    for i in range(10_000):
        g = torch.Generator().manual_seed(i)
        e = KVEntry([i], {"kv": torch.randn(4, 2, 64, 4, 64, generator=g).half()}, 1)
        while not cold.put(f"k{i}", e.encode(sys.argv[2])):
            pass
        print(i, flush=True)
""")


def test_sigkilled_writer_leaves_nothing_that_is_served(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(tmp_path), FP],
                            stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    for _ in range(8):                      # let it write a while, then kill it mid-stream
        proc.stdout.readline()
    time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    cold = ColdTier(tmp_path, capacity=1 << 40)
    assert not list(tmp_path.glob(".*.tmp"))            # partial writes are cleared, never indexed
    keys = cold.keys()
    assert keys
    for key in keys:
        e = decode(cold.get(key), FP)                    # every file that is served is whole
        g = torch.Generator().manual_seed(int(key[1:]))
        assert torch.equal(e.tensors["kv"], torch.randn(4, 2, 64, 4, 64, generator=g).half())
    cold.close()


@pytest.mark.parametrize("dtype", [torch.float32, torch.int8])
def test_store_export_import_round_trip(dtype):
    store = KVStore((0, 1), num_blocks=6, block_size=4, n_kv_heads=2, head_dim=8, dtype=dtype)
    k, v = torch.randn(24, 2, 8), torch.randn(24, 2, 8)
    for depth in (0, 1):
        store.write(depth, torch.arange(24), k, v)
    out = store.export_blocks([4, 1])
    assert set(out) == set(store.block_tensors()) == ({"kv", "scales"} if dtype == torch.int8 else {"kv"})
    other = KVStore((0, 1), num_blocks=6, block_size=4, n_kv_heads=2, head_dim=8, dtype=dtype)
    other.import_blocks([0, 2], out)
    for name, t in store.block_tensors().items():
        o = other.block_tensors()[name]
        assert torch.equal(o[:, :, 0:4], t[:, :, 16:20]) and torch.equal(o[:, :, 8:12], t[:, :, 4:8])
    with pytest.raises(ValueError, match="do not match"):
        other.import_blocks([0], out)


def test_cost_model_swaps_only_when_restoring_beats_recomputing():
    cost = CostModel(prefill_tokens_per_s=1000, save_bytes_per_s=1e9, warm_restore_bytes_per_s=1e9,
                     cold_restore_bytes_per_s=1e8)
    # 100 tokens: recompute 0.1 s. 10 MB: warm 0.01 + 0.01 s, cold 0.01 + 0.1 s.
    assert cost.worth_swapping(Tier.WARM, 100, 10_000_000)
    assert not cost.worth_swapping(Tier.COLD, 100, 10_000_000)
    assert cost.worth_restoring(Tier.COLD, 100, 5_000_000) and not cost.worth_restoring(Tier.COLD, 100, 20_000_000)
    cost.observe_prefill(1000, 0.1)          # measured 10k tok/s replaces the default at once
    assert cost.prefill_tokens_per_s == pytest.approx(10_000)
    cost.observe_prefill(1000, 1.0)          # later measurements are averaged in
    assert cost.prefill_tokens_per_s == pytest.approx(0.7 * 10_000 + 0.3 * 1000)
    cost.observe_prefill(1000, 0.0)          # too short to learn from
    assert cost.prefill_tokens_per_s == pytest.approx(7300)


def _tokens(outputs):
    return [o.outputs[0].token_ids for o in outputs]


@pytest.mark.parametrize("kv_dtype,prefix_caching", [("fp32", False), ("fp16", True)])
def test_swap_and_recompute_preemption_give_identical_greedy_outputs(kv_dtype, prefix_caching):
    loaded = ef.tiny_loaded(ef.llama_config(), seed=3)
    prompts = ef.random_prompts(16, 4, 90, seed=2)
    sp = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    kw = dict(engine="paged", verbose=False, kv_dtype=kv_dtype, num_kv_blocks=10, max_num_batched_tokens=32,
              max_num_seqs=16, admission_headroom=0, enable_prefix_caching=prefix_caching)
    recompute = LLM(loaded, **kw)
    swap = LLM(loaded, warm_fraction=0.5, **kw)
    ample = LLM(loaded, **{**kw, "num_kv_blocks": 400})
    want = _tokens(ample.generate(prompts, sp))
    got_recompute, got_swap = _tokens(recompute.generate(prompts, sp)), _tokens(swap.generate(prompts, sp))
    assert recompute.metrics.num_preemptions > 0 and recompute.metrics.num_swaps == 0
    m = swap.metrics
    # most preemptions swap (the rest: warm tier full, or the measured rates said recompute)
    assert m.num_preemptions > 0 and m.num_swaps > 0
    # every swapped-out entry came back; what is left are evicted cached-prefix blocks
    assert not [k for k in swap.engine.offload.warm.keys() if not k.startswith("p-")]
    assert (m.warm_bytes > 0) == (m.prefix_tier_demotions - m.prefix_tier_restored_blocks > 0)
    assert m.compression_ratio > 1.0
    assert got_swap == got_recompute
    assert sum(a == b for a, b in zip(want, got_swap)) >= 0.98 * len(prompts)


def test_cost_model_declines_swap_when_recompute_is_cheaper():
    loaded = ef.tiny_loaded(ef.llama_config(), seed=3)
    llm = LLM(loaded, engine="paged", verbose=False, kv_dtype="fp32", num_kv_blocks=10, max_num_seqs=16,
              max_num_batched_tokens=32, admission_headroom=0, warm_fraction=0.5, enable_prefix_caching=False)
    llm.engine.cost.save_bytes_per_s = 1.0     # saving would take forever: recompute (never measured)
    llm.generate(ef.random_prompts(12, 4, 90, seed=2), SamplingParams(temperature=0, max_tokens=32, ignore_eos=True))
    assert llm.metrics.num_preemptions > 0 and llm.metrics.num_swaps == 0


def test_memory_plan_reserves_the_warm_tier_inside_the_budget():
    from memlm.memory.budget import MemoryBudget
    from memlm.memory.plan import StepProfile, plan_memory
    mib = 1 << 20
    budget = MemoryBudget(total=1024 * mib, baseline=200 * mib, load_overhead=300 * mib)
    prof = StepProfile(matmul_state=0, workspace=100 * mib, left_resident=0, resident_after=500 * mib)
    cold = plan_memory(budget, prof, 0, mib, 16, "fp16")
    warm = plan_memory(budget, prof, 0, mib, 16, "fp16", warm_fraction=0.25)
    left = cold.num_blocks * mib                        # what the KV memory is without a warm tier
    assert warm.warm_bytes == pytest.approx(0.25 * left, abs=mib)
    assert warm.num_blocks * mib + warm.warm_bytes <= left + mib and warm.num_blocks < cold.num_blocks
    assert "warm KV tier" in warm.describe() and "warm KV tier" not in cold.describe()


# ---- evicted prefix-cache blocks in the tiers (kv/prefix_tier.py) ---------------------------
def _prefix_prompts(prefix_len, tails, seed):
    prefix = ef.random_prompts(1, prefix_len, prefix_len, seed=seed)[0]["prompt_token_ids"]
    return [{"prompt_token_ids": prefix + t["prompt_token_ids"]}
            for t in ef.random_prompts(tails, 3, 12, seed=seed + 1)]


def _fixed_cost(llm, prefill_tokens_per_s):
    cost = llm.engine.cost
    cost.learn = False          # the test decides what pays, not this machine's load
    cost.prefill_tokens_per_s = prefill_tokens_per_s


def test_evicted_prefix_blocks_wait_in_the_warm_tier_and_a_later_hit_restores_them():
    loaded = ef.tiny_loaded(ef.llama_config(), seed=3)
    a, b, c = _prefix_prompts(48, 3, seed=21)          # 48 tokens = 3 full blocks shared
    one_offs = ef.random_prompts(6, 150, 170, seed=5)    # each fills most of the 12-block pool
    sp = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    kw = dict(engine="paged", verbose=False, kv_dtype="fp32", num_kv_blocks=12, max_num_seqs=1)
    tiers, plain = LLM(loaded, warm_fraction=0.5, **kw), LLM(loaded, **kw)
    ref = LLM(loaded, **{**kw, "enable_prefix_caching": False})
    _fixed_cost(tiers, prefill_tokens_per_s=100.0)       # recompute is dear: demote and restore
    outs = {}
    for name, llm in (("tiers", tiers), ("plain", plain), ("ref", ref)):
        llm.generate([a], sp)
        llm.generate([b], sp)                               # hits the prefix: its blocks are reused
        for p in one_offs:
            llm.generate([p], sp)                           # evict it from the hot cache
        outs[name] = llm.generate([c], sp)[0]
    m = tiers.metrics
    assert m.prefix_cache_evictions > 0 and m.prefix_tier_demotions >= 3
    assert m.prefix_tier_restored_blocks == 3 and outs["tiers"].num_cached_tokens == 48
    assert outs["plain"].num_cached_tokens == 0             # without a tier it was recomputed
    assert outs["tiers"].outputs[0].token_ids == outs["ref"].outputs[0].token_ids
    assert outs["plain"].outputs[0].token_ids == outs["ref"].outputs[0].token_ids
    assert plain.metrics.prefix_tier_demotions == 0 and m.kv_blocks_used == 0
    # Evicted again (restored blocks count as reused); the middle block's entry is lost: only
    # the first block comes back, the rest is computed, and the reply is still the same.
    from memlm.kv.prefix_tier import key_of
    for p in one_offs:
        tiers.generate([p], sp)
    warm = tiers.engine.offload.warm
    hashes = tiers.engine.kv.cache.hashes(a["prompt_token_ids"][:48])
    assert all(key_of(h) in warm for h in hashes)
    warm.pop(key_of(hashes[1]))
    d = _prefix_prompts(48, 4, seed=21)[3]
    got, want = tiers.generate([d], sp)[0], ref.generate([d], sp)[0]
    assert got.num_cached_tokens == 16 and tiers.metrics.prefix_tier_restored_blocks == 4
    assert got.outputs[0].token_ids == want.outputs[0].token_ids


def test_prefix_tier_demotes_only_reused_blocks_that_pay_and_checks_what_it_restores():
    from memlm.kv.prefix_cache import hash_block
    from memlm.kv.prefix_eviction import CachedBlock
    from memlm.kv.prefix_tier import PrefixTier, key_of
    store = KVStore([0, 1], 4, 4, 2, 8, torch.float16, "cpu")
    for t in store.block_tensors().values():
        t.copy_(torch.randn(t.shape).to(t.dtype))
    cost = CostModel(prefill_tokens_per_s=10.0, learn=False)
    warm = WarmTier(1 << 20)
    tier = PrefixTier(store, cost, FP, warm=warm)
    h0, h1 = hash_block(None, [1, 2, 3, 4]), hash_block(hash_block(None, [1, 2, 3, 4]), [5, 6, 7, 8])
    assert not tier.demote(CachedBlock(0, h0, None, 0, (1, 2, 3, 4), hits=0))      # never reused
    assert tier.demote(CachedBlock(0, h0, None, 0, (1, 2, 3, 4), hits=2))
    assert tier.demote(CachedBlock(1, h1, h0, 1, (5, 6, 7, 8), hits=1))
    assert tier.available([h0, h1], 0) == 2 and tier.available([h0, h1], 1) == 1
    assert tier.available([h1, h0], 0) == 2 and tier.available([h0, b"x" * 16], 0) == 1
    want = store.export_blocks([0, 1])
    assert tier.restore([h0, h1], [1, 2, 3, 4, 5, 6, 7, 8], [2, 3]) == 2
    got = store.export_blocks([2, 3])
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert warm.keys() == []                              # restored blocks leave the warm tier
    # a corrupt entry and one holding other tokens are skipped, never imported
    assert tier.demote(CachedBlock(0, h0, None, 0, (1, 2, 3, 4), hits=1))
    blob = bytearray(warm.pop(key_of(h0)))
    blob[len(blob) // 2] ^= 0x10
    warm.put(key_of(h0), bytes(blob), Priority.CACHED_PREFIX)
    assert tier.restore([h0], [1, 2, 3, 4], [3]) == 0 and tier.rejected == 1
    assert tier.demote(CachedBlock(1, h1, h0, 1, (5, 6, 7, 8), hits=1))
    assert tier.restore([h1], [5, 6, 7, 9], [3]) == 0
    # recomputing is cheap: nothing demoted
    cheap = PrefixTier(store, CostModel(prefill_tokens_per_s=1e12, learn=False), FP, warm=WarmTier(1 << 20))
    assert not cheap.demote(CachedBlock(0, h0, None, 0, (1, 2, 3, 4), hits=5))


def test_warm_make_room_evicts_before_an_entry_exists_and_never_past_capacity():
    warm = WarmTier(300)
    for k in ("s1", "s2"):
        assert warm.put(k, b"x" * 100, Priority.IDLE_SESSION)
    assert warm.put("w1", b"x" * 100, Priority.SWAPPED)
    assert not warm.make_room(301, Priority.SWAPPED) and warm.evictions == 0 and len(warm.keys()) == 3
    assert warm.make_room(150, Priority.SWAPPED)                   # the two idle sessions go
    assert warm.keys() == ["w1"] and warm.nbytes == 100 and warm.evictions == 2
    assert not warm.make_room(250, Priority.SWAPPED)               # swapped entries never evict each other
    assert warm.put("w2", b"x" * 200, Priority.SWAPPED) and warm.nbytes == 300 <= warm.capacity


def test_cold_writer_reserves_its_room_streams_pieces_and_never_exceeds_the_budget(tmp_path):
    cold = ColdTier(tmp_path, capacity=1000)
    assert cold.put("old", b"o" * 300)
    cold.flush()
    w = cold.writer("a", 600)                  # 300 + 600 fit: nothing evicted yet
    assert w is not None and cold.nbytes == 900 and "old" in cold
    assert cold.writer("b", 500) is None and "old" in cold and cold.nbytes == 900   # evicting is not enough
    b = cold.writer("b", 400)                  # evicts "old": reservations count as used
    assert b is not None and "old" not in cold and cold.nbytes == 1000 and "a" not in cold
    b.abort()
    w.write(b"a" * 250)
    w.write(b"b" * 250)
    with pytest.raises(OSError, match="exceeds the 600 bytes reserved"):
        w.write(b"c" * 200)
    w.abort()
    assert not list(tmp_path.glob(".*.tmp")) and cold.nbytes <= cold.capacity
    w = cold.writer("a", 600)
    w.write(b"a" * 400)
    assert w.commit() and cold.get("a") == b"a" * 400      # readable before it is durable
    cold.flush()
    assert (tmp_path / "a.kv").read_bytes() == b"a" * 400 and cold.nbytes <= cold.capacity
    assert cold.writer("huge", 1001) is None
    cold.discard("a")
    assert cold.nbytes == sum(p.stat().st_size for p in tmp_path.glob("*.kv")) <= cold.capacity
    cold.close()


def test_cold_writer_refuses_when_only_entries_being_written_hold_the_room(tmp_path):
    cold = ColdTier(tmp_path, capacity=1000)
    first = cold.writer("a", 700)
    assert cold.writer("b", 400) is None and cold.nbytes == 700     # nothing of "a" can be evicted
    first.write(b"a" * 10)
    assert first.commit()
    cold.flush()
    second = cold.writer("b", 995)                                  # now "a" (10 bytes) is evicted
    assert second is not None and "a" not in cold and cold.nbytes == 995 and cold.evictions == 1
    second.abort()
    assert cold.nbytes == 0
    cold.close()
