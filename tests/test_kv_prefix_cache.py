"""Automatic prefix caching: the hash chain, hits by ref count, eviction order of each policy
with exact block ids, pool accounting, and the engine's outputs with the cache on and off."""
import json
import re
import time
from dataclasses import dataclass, field

import pytest

import engine_fakes as ef

from memlm import LLM, SamplingParams
from memlm.kv.manager import NO_HIT, KVCacheManager
from memlm.kv.prefix_cache import PrefixCache, hash_block
from memlm.kv.prefix_eviction import CostAwarePolicy, LRUPolicy, make_policy

BS = 4


@dataclass
class Seq:
    seq_id: int
    tokens: list[int]
    num_computed_tokens: int = 0
    tables: list = field(default_factory=list)

    def token_ids_slice(self, start, end):
        return self.tokens[start:end]


def manager(num_blocks, policy, on_evict=None):
    return KVCacheManager(num_blocks, BS, PrefixCache(BS, policy, on_evict=on_evict))


def serve(kv, seq):
    """Admit `seq` at its cached prefix, compute all its tokens, cache them, free it (one
    request start to end). Returns (cached tokens, its block table)."""
    hit = kv.find_cached_prefix(seq, len(seq.tokens))
    cached = hit.num_blocks * BS
    assert kv.allocate_slots(seq, len(seq.tokens) - cached, hit)
    seq.num_computed_tokens = len(seq.tokens)
    kv.cache_computed_blocks(seq)
    table = kv.block_table(seq)
    kv.free(seq)
    return cached, table


def toks(start, n=9):
    return list(range(start, start + n))


def test_hash_chain_names_the_whole_prefix():
    a, b = toks(0, 8), toks(0, 4) + toks(50, 4)
    cache = PrefixCache(BS, LRUPolicy())
    ha, hb = cache.hashes(a), cache.hashes(b)
    assert len(ha) == 2 and ha[0] == hb[0] and ha[1] != hb[1]
    assert ha[1] == hash_block(ha[0], a[4:8])
    # same block tokens behind a different parent: a different hash
    assert hash_block(hb[0], a[4:8]) != hash_block(None, a[4:8])
    assert cache.hashes(a[4:] + [7], ha[:1]) == ha          # extending known hashes; partial blocks ignored
    assert PrefixCache(BS, LRUPolicy(), salt=b"int8").hashes(a) != ha


def test_hit_shares_blocks_by_ref_count_and_never_covers_the_last_token():
    kv = manager(8, LRUPolicy())
    a = Seq(0, toks(0, 10))
    assert kv.allocate_slots(a, 10, kv.find_cached_prefix(a, 10))
    a.num_computed_tokens = 10
    kv.cache_computed_blocks(a)                             # blocks 0, 1 full; block 2 partial
    assert kv.block_table(a) == [0, 1, 2] and kv.cache.num_cached_blocks == 2
    b = Seq(1, toks(0, 8) + [99, 98, 97])
    hit = kv.find_cached_prefix(b, 11)
    assert hit.block_ids == (0, 1) and hit.num_evictable == 0  # still held by a
    assert kv.num_blocks_needed(b, 3, hit) == 1
    assert kv.allocate_slots(b, 3, hit)
    assert kv.block_table(b) == [0, 1, 3] and kv.pool.ref_counts[:4] == [2, 2, 1, 1]
    c = Seq(2, toks(0, 8))                                  # exactly two blocks: the last token is computed
    assert kv.find_cached_prefix(c, 8).block_ids == (0,)
    kv.free(a)
    assert kv.pool.ref_counts[:4] == [1, 1, 0, 1] and kv.cache.num_evictable == 0
    kv.free(b)                                              # cached blocks 0, 1 stay, evictable
    assert kv.cache.num_evictable == 2 and kv.num_free_blocks == 8 and kv.num_used_blocks == 0
    assert kv.find_cached_prefix(c, 8).num_evictable == 1
    assert (kv.cache.num_queried_tokens, kv.cache.num_hit_tokens) == (21, 8)
    held = Seq(3, [1])
    held.num_computed_tokens = 1
    assert kv.find_cached_prefix(held, 9) is NO_HIT        # computed tokens: no lookup


def test_pool_uses_free_blocks_before_evicting_and_lru_evicts_tails_first():
    evicted = []
    kv = manager(6, LRUPolicy(), on_evict=evicted.append)
    assert serve(kv, Seq(0, toks(0))) == (0, [0, 1, 2])    # caches 0, 1; 2 was partial
    assert serve(kv, Seq(1, toks(100))) == (0, [3, 4, 5])  # caches 3, 4
    assert kv.cache.num_evictable == 4 and kv.num_free_blocks == 6
    # free queue 2, 5 first, then evict in release order: 1 (seq 0's tail), 0, 4, 3
    assert serve(kv, Seq(2, toks(200))) == (0, [2, 5, 1])
    assert [b.block_id for b in evicted] == [1]
    assert evicted[0].token_ids == tuple(range(4, 8)) and evicted[0].depth == 1
    assert serve(kv, Seq(3, toks(300, 3))) == (0, [1])     # a partial block went back to the queue
    assert serve(kv, Seq(4, toks(400))) == (0, [1, 0, 4])
    assert [b.block_id for b in evicted] == [1, 0, 4] and kv.cache.num_evictions == 3
    # seq 1's first block is left: a hit takes it back before block 5 (next in LRU) is evicted
    assert serve(kv, Seq(5, toks(100))) == (4, [3, 4, 5])
    assert [b.block_id for b in evicted] == [1, 0, 4, 5] and kv.pool.ref_counts == [0] * 6


def _hot_then_one_offs(policy):
    """A hot prompt served twice, then two one-off prompts, then the hot prompt again."""
    evicted = []
    kv = manager(6, policy, on_evict=lambda b: evicted.append(b.block_id))
    hot = toks(0)
    tables = [serve(kv, Seq(0, hot)), serve(kv, Seq(1, hot)),
              serve(kv, Seq(2, toks(100))), serve(kv, Seq(3, toks(200))), serve(kv, Seq(4, hot))]
    return tables, evicted, kv


def test_lru_evicts_the_hot_prompt_for_one_offs():
    tables, evicted, kv = _hot_then_one_offs(LRUPolicy())
    assert tables[:4] == [(0, [0, 1, 2]), (8, [0, 1, 3]), (0, [4, 5, 2]), (0, [3, 2, 1])]
    assert evicted[0] == 1                                  # the hot prompt's second block
    assert tables[4][0] == 4                                # only its first block is left


def test_cost_policy_keeps_the_hot_prompt_and_evicts_leaves_first():
    tables, evicted, kv = _hot_then_one_offs(CostAwarePolicy(BS, attention_scale=1e9))
    assert tables[:4] == [(0, [0, 1, 2]), (8, [0, 1, 3]), (0, [4, 5, 2]), (0, [3, 2, 5])]
    # one-off leaf 5 (priority 1) goes before the hot leaf 1 (priority 2: hit once); 4, the
    # one-off parent, was no candidate while 5 was cached (it is a leaf now)
    assert evicted == [5] and kv.cache.policy._entry.keys() == {1, 4, 2}
    assert tables[4] == (8, [0, 1, 5])                      # the whole hot prefix hit
    assert kv.cache.num_hit_tokens == 16


def test_cost_policy_prices_deeper_blocks_higher_and_names_are_checked():
    p = CostAwarePolicy(16, attention_scale=64)
    cache = PrefixCache(16, p)
    cache.insert(0, b"a" * 16, None, 0, range(16))
    cache.insert(1, b"b" * 16, b"a" * 16, 3, range(16))
    assert p.cost(cache.get(1)) == pytest.approx(1 + 3.5 * 16 / 64) and p.cost(cache.get(0)) < p.cost(cache.get(1))
    assert make_policy("lru", 16, 1.0).name == "lru" and make_policy("cost", 16, 1.0).name == "cost"
    with pytest.raises(ValueError, match="lru, cost"):
        make_policy("lfu", 16, 1.0)
    with pytest.raises(ValueError, match="prefix_cache_policy"):
        from memlm.engine.config import EngineConfig
        EngineConfig(prefix_cache_policy="random")


def test_duplicate_block_stays_private_and_goes_back_to_the_free_queue():
    kv = manager(8, LRUPolicy())
    a, b = Seq(0, toks(0, 5)), Seq(1, toks(0, 5))
    for s in (a, b):                                        # both computed the same prefix at once
        assert kv.allocate_slots(s, 5, kv.find_cached_prefix(s, 5))
    for s in (a, b):
        s.num_computed_tokens = 5
        kv.cache_computed_blocks(s)
    assert kv.block_table(a) == [0, 1] and kv.block_table(b) == [2, 3] and kv.cache.num_cached_blocks == 1
    kv.free(b)
    kv.free(a)
    assert kv.cache.num_evictable == 1 and kv.pool.num_free_blocks == 8


# ---- the engine ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def loaded():
    return ef.tiny_loaded(ef.llama_config(), seed=3)


def paged(loaded, **kw):
    kw.setdefault("num_kv_blocks", 64)
    kw.setdefault("max_num_batched_tokens", 48)
    kw.setdefault("max_num_seqs", 8)
    return LLM(loaded, engine="paged", verbose=False, kv_dtype="float32", **kw)


def shared_prefix_prompts(n, prefix_len, seed):
    prefix = ef.random_prompts(1, prefix_len, prefix_len, seed=seed)[0]["prompt_token_ids"]
    tails = ef.random_prompts(n, 1, 30, seed=seed + 1)
    return [{"prompt_token_ids": prefix + t["prompt_token_ids"]} for t in tails]


def tokens(outputs):
    return [[c.token_ids for c in o.outputs] for o in outputs]


@pytest.mark.parametrize("policy", ["lru", "cost"])
def test_engine_greedy_outputs_identical_with_and_without_cache(loaded, policy):
    prompts = shared_prefix_prompts(10, 40, seed=7)
    sp = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    off = paged(loaded, enable_prefix_caching=False)
    on = paged(loaded, prefix_cache_policy=policy)
    ref = [off.generate([p], sp)[0] for p in prompts]
    got = [on.generate([p], sp)[0] for p in prompts]        # one at a time: later ones hit
    assert tokens(got) == tokens(ref)
    assert [o.num_cached_tokens for o in got] == [0] + [32] * 9   # 2 full blocks of the 40-token prefix
    assert all(o.num_cached_tokens == 0 for o in ref)
    m = on.metrics
    assert m.prefix_cache_hits == 9 * 32 and m.prefix_cache_queries == sum(
        len(p["prompt_token_ids"]) for p in prompts)
    assert m.prefix_cache_blocks > 0 and m.kv_blocks_used == 0
    assert off.metrics.prefix_cache_queries == 0
    assert tokens(on.generate(prompts, sp)) == tokens(ref)  # batched, all hitting


def test_engine_cache_survives_preemption_forks_and_prompt_logprobs(loaded):
    prompts = shared_prefix_prompts(12, 36, seed=11)
    sp = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    ample = paged(loaded, num_kv_blocks=200, enable_prefix_caching=False).generate(prompts, sp)
    small_llm = paged(loaded, num_kv_blocks=12, max_num_batched_tokens=32, admission_headroom=0)
    small = small_llm.generate(prompts, sp)
    assert small_llm.metrics.num_preemptions > 0 and small_llm.metrics.prefix_cache_evictions > 0
    assert small_llm.metrics.prefix_cache_hits > 0
    same = sum(a == b for a, b in zip(tokens(ample), tokens(small)))
    assert same >= len(prompts) - 1                          # preemption recomputes; fp32 ties aside
    # n > 1 beside the cache, and a prompt-logprob request gets every prompt position
    spn = SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=6, ignore_eos=True, prompt_logprobs=1)
    on, off = paged(loaded), paged(loaded, enable_prefix_caching=False)
    on.generate(prompts[:1], sp)                             # cache the prefix
    a, b = on.generate(prompts[1:2], spn)[0], off.generate(prompts[1:2], spn)[0]
    assert tokens([a]) == tokens([b]) and len(a.prompt_logprobs) == len(a.prompt_token_ids)
    assert a.num_cached_tokens == 0                          # prompt logprobs compute the whole prompt
    assert on.metrics.kv_blocks_used == 0


def test_engine_disables_the_cache_for_recurrent_models():
    rec = ef.tiny_loaded(ef.llama_config(mixers=("attention", "recurrent")), seed=1)
    llm = paged(rec)
    prompts = shared_prefix_prompts(3, 40, seed=3)
    sp = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    outs = [llm.generate([p], sp)[0] for p in prompts]
    assert llm.metrics.prefix_cache_queries == 0 and all(o.num_cached_tokens == 0 for o in outs)


def test_server_reports_cached_tokens_and_prefix_cache_counters(loaded):
    from fastapi.testclient import TestClient

    from memlm.entrypoints.openai.app import ServerState, build_app
    state = ServerState(lambda: paged(loaded), "tiny")
    system = "You are a terse assistant who answers in one word. " * 2     # 102 bytes: 6 full blocks
    with TestClient(build_app(state)) as client:
        for _ in range(200):
            if client.get("/health").status_code == 200:
                break
            time.sleep(0.05)
        body = {"model": "tiny", "max_tokens": 3, "temperature": 0}
        first = client.post("/v1/completions", json={**body, "prompt": system + "Q1"}).json()
        second = client.post("/v1/completions", json={**body, "prompt": system + "Q2"}).json()
        chat = client.post("/v1/chat/completions", json={
            **body, "stream": True, "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": system + "Q3"}]})
        metrics = client.get("/metrics").text
    assert first["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
    assert second["usage"]["prompt_tokens_details"] == {"cached_tokens": 96}
    events = [json.loads(line[6:]) for line in chat.text.splitlines()
              if line.startswith("data: {")]
    assert events[-1]["usage"]["prompt_tokens_details"]["cached_tokens"] == 0   # "<user>" first
    hits = re.search(r"^memlm:prefix_cache_hits_total (\S+)$", metrics, re.M)
    assert hits and float(hits.group(1)) == 96.0
    assert re.search(r"^memlm:prefix_cache_queries_total \S+$", metrics, re.M)


def test_cli_flags_reach_the_engine_config():
    import argparse

    from memlm.entrypoints.cli.args import add_model_args, engine_kwargs
    p = argparse.ArgumentParser()
    add_model_args(p)
    assert "enable_prefix_caching" not in engine_kwargs(p.parse_args([]))
    got = engine_kwargs(p.parse_args(["--no-prefix-caching", "--prefix-cache-policy", "lru"]))
    assert got["enable_prefix_caching"] is False and got["prefix_cache_policy"] == "lru"
    with pytest.raises(SystemExit):
        p.parse_args(["--prefix-cache-policy", "lfu"])
