"""Scheduling for time to first token: prefix-aware admission (a shared prompt prefix computed
once, `engine/shared_prefix.py`), decodes before prefill, the prefill cap while sequences
decode, and small first chunks before long ones. Exact plans with a prefix cache and no model,
then the engine's outputs against running each prompt alone."""

import pytest

import engine_fakes as ef

from memlm import LLM, SamplingParams
from memlm.engine import shared_prefix
from memlm.engine.config import SchedulerConfig
from memlm.engine.request import RequestStatus
from memlm.engine.scheduler import Scheduler
from memlm.kv.manager import KVCacheManager
from memlm.kv.prefix_cache import PrefixCache
from memlm.kv.prefix_eviction import LRUPolicy

BS = 4
PREFIX = list(range(1, 17))                     # 4 full blocks shared by every prompt below


@pytest.fixture(autouse=True)
def hold_back(monkeypatch):
    """Holding back is off by default (it measured slower on benchmarks/multiturn.py); these
    tests switch it on through the module's bound (and ignore MEMLM_MAX_DEFERRED_STEPS)."""
    monkeypatch.delenv(shared_prefix.ENV_MAX_DEFERRED_STEPS, raising=False)
    monkeypatch.setattr(shared_prefix, "MAX_DEFERRED_STEPS", 64)


def make(num_blocks=32, budget=64, max_seqs=4, cap=512, cache=True):
    kv = KVCacheManager(num_blocks, BS, PrefixCache(BS, LRUPolicy()) if cache else None)
    cfg = SchedulerConfig(max_seqs, budget, 256, admission_headroom=0, prefill_tokens_with_decodes=cap)
    return Scheduler(cfg, kv), kv


req, step = ef.scheduler_request, ef.scheduler_step


def plan(out):
    return [(s.seq.request.request_id, s.start, s.num_tokens) for s in out.scheduled]


def test_shared_prefix_is_computed_once_then_hit():
    sched, kv = make()
    a, b = req(0, PREFIX + [40, 41, 42]), req(1, PREFIX + [50, 51])
    sched.add(a), sched.add(b)
    out = step(sched)
    assert plan(out) == [("0", 0, 19)]                    # b waits: a computes the 4 shared blocks
    assert sched.num_waiting == 1 and sched.shared.num_deferrals == 1
    out = step(sched)
    assert plan(out) == [("0", 19, 1), ("1", 16, 2)]      # b starts after the cached prefix
    assert b.num_cached_tokens == 16 and a.num_cached_tokens == 0
    assert kv.block_table(b.sequences[0])[:4] == kv.block_table(a.sequences[0])[:4]
    while sched.has_unfinished():
        step(sched)
    assert kv.num_free_blocks == kv.num_blocks and not sched.shared._owner


def test_unrelated_prompt_is_admitted_past_a_waiting_one():
    sched, _ = make()
    a, b, c = req(0, PREFIX + [40]), req(1, PREFIX + [50]), req(2, [90] * 9)
    for r in (a, b, c):
        sched.add(r)
    assert plan(step(sched)) == [("0", 0, 17), ("2", 0, 9)]   # c shares nothing: no wait
    assert plan(step(sched)) == [("0", 17, 1), ("2", 9, 1), ("1", 16, 1)]


def test_no_wait_once_the_owner_is_aborted():
    sched, kv = make(budget=8)                           # a needs 3 steps for its prompt
    a, b = req(0, PREFIX + [40]), req(1, PREFIX + [50])
    sched.add(a), sched.add(b)
    assert plan(step(sched)) == [("0", 0, 8)]            # a has computed 2 of the 4 shared blocks
    sched.abort(a)
    out = step(sched)
    assert plan(out) == [("1", 8, 8)]                    # b takes the 2 cached blocks, computes on
    assert b.num_cached_tokens == 8 and a.sequences[0].status is RequestStatus.FINISHED
    while sched.has_unfinished():
        step(sched)
    assert b.sequences[0].num_output_tokens == 4 and kv.num_free_blocks == kv.num_blocks


def test_no_wait_once_the_owner_is_preempted():
    sched, kv = make(num_blocks=8, budget=8, max_seqs=3)
    old = req(0, [70] * 8, max_tokens=20)                # oldest: grows and preempts the owner
    a, b = req(1, PREFIX + [40]), req(2, PREFIX + [50])
    for r in (old, a, b):
        sched.add(r)
    step(sched)                                          # old: 8 tokens (2 blocks)
    step(sched)                                          # old decodes, a admitted on 7 tokens
    assert sched.num_running == 2 and sched.shared._owned
    seq_a, seq_b = a.sequences[0], b.sequences[0]
    assert seq_b.status is RequestStatus.WAITING
    for _ in range(40):                                  # bounded: old preempts the newest, a
        step(sched)
        if seq_a.num_preemptions:
            break
    assert seq_a.num_preemptions == 1 and seq_a.seq_id not in sched.shared._owned
    for _ in range(200):
        if not sched.has_unfinished():
            break
        step(sched)
    assert not sched.has_unfinished()
    assert all(r.sequences[0].completion.finish_reason == "length" for r in (old, a, b))
    assert kv.num_free_blocks == kv.num_blocks


def test_waiting_is_bounded_in_steps():
    sched, kv = make()
    shared = sched.shared
    shared.max_deferred_steps = 2
    a, b = req(0, PREFIX + [40]), req(1, PREFIX + [50])
    sa, sb = a.sequences[0], b.sequences[0]
    shared.admitted(sa, 0)                               # sa computes the 4 shared blocks
    hit = kv.find_cached_prefix(sb, sb.num_tokens)
    assert [shared.should_defer(sb, hit) for _ in range(3)] == [True, True, False]
    assert shared.waits_on_owner(sb, hit)                # still computing, but the bound is reached
    sa.num_computed_tokens = 8                           # sa computed blocks 0 and 1 ...
    kv.allocate_slots(sa, 8)
    kv.cache_computed_blocks(sa)
    hit = kv.find_cached_prefix(sb, sb.num_tokens)
    assert hit.num_blocks == 2 and shared.waits_on_owner(sb, hit)    # ... block 2 is not done
    shared.release(sa)                                   # preempted / aborted / finished
    assert not shared.waits_on_owner(sb, hit) and not shared._owner


def test_decodes_go_first_and_prefill_is_capped_while_decoding():
    sched, _ = make(budget=40, cap=5)
    a, c = req(0, [7] * 3, max_tokens=6), req(1, [8] * 2, max_tokens=6)
    sched.add(a), sched.add(c)
    assert plan(step(sched)) == [("0", 0, 3), ("1", 0, 2)]   # nothing decodes: no cap
    b = req(2, [9] * 40)
    sched.add(b)
    # two decode: b's prefill gets max(cap 5, 8 per decoding sequence) = 16 tokens a step
    assert plan(step(sched)) == [("0", 3, 1), ("1", 2, 1), ("2", 0, 16)]
    sched.abort(c)
    assert plan(step(sched)) == [("0", 4, 1), ("2", 16, 8)]   # one decodes: 8
    sched2, _ = make(budget=6, cap=0)                    # cap 0: prefill takes what decodes leave
    old, new = req(0, [5] * 30, max_tokens=3), req(1, [6] * 2, max_tokens=8)
    sched2.add(old), sched2.add(new)
    assert plan(step(sched2)) == [("0", 0, 6)]
    # new's 2 tokens are a small first chunk: the long chunk of old leaves them room ...
    assert plan(step(sched2)) == [("0", 6, 4), ("1", 0, 2)]
    # ... and once new decodes, its token comes off the budget before old's chunk
    assert plan(step(sched2)) == [("0", 10, 5), ("1", 2, 1)]


def test_small_first_chunks_before_a_long_running_chunk():
    sched, _ = make(num_blocks=64, budget=40, cap=20)
    d = req(0, [3] * 2, max_tokens=30)
    sched.add(d)
    step(sched)                                          # d decodes from now on
    long = req(1, [4] * 100)
    sched.add(long)
    assert plan(step(sched)) == [("0", 2, 1), ("1", 0, 20)]
    turn = req(2, [8] * 6)                               # a small new prompt arrives
    sched.add(turn)
    out = step(sched)
    # the long chunk leaves the turn its 6 tokens (at most half of the 20 prefill tokens)
    assert plan(out) == [("0", 3, 1), ("1", 20, 14), ("2", 0, 6)]


# ---- the engine --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def loaded():
    return ef.tiny_loaded(ef.llama_config(), seed=5)


def paged(loaded, **kw):
    kw.setdefault("num_kv_blocks", 96)
    kw.setdefault("max_num_batched_tokens", 256)
    kw.setdefault("max_num_seqs", 8)
    return LLM(loaded, engine="paged", verbose=False, kv_dtype="float32", block_size=16, **kw)


def test_engine_shared_prefix_outputs_equal_running_alone(loaded):
    prefix = ef.random_prompts(1, 64, 64, seed=2)[0]["prompt_token_ids"]       # 4 blocks of 16
    tails = ef.random_prompts(6, 3, 20, seed=4)
    prompts = [{"prompt_token_ids": prefix + t["prompt_token_ids"]} for t in tails]
    sp = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    alone = [paged(loaded, enable_prefix_caching=False).generate([p], sp)[0] for p in prompts]
    llm = paged(loaded)
    together = llm.generate(prompts, sp)                 # all submitted at once
    assert [o.outputs[0].token_ids for o in together] == [o.outputs[0].token_ids for o in alone]
    assert [o.num_cached_tokens for o in together] == [0] + [64] * 5
    assert llm.engine.scheduler.shared.num_deferrals == 5
    assert llm.metrics.prefill_tokens == sum(len(p["prompt_token_ids"]) for p in prompts) - 5 * 64
    assert llm.metrics.kv_blocks_used == 0


def test_holding_back_is_off_by_default(loaded, monkeypatch):
    monkeypatch.setattr(shared_prefix, "MAX_DEFERRED_STEPS", 0)
    prefix = ef.random_prompts(1, 64, 64, seed=2)[0]["prompt_token_ids"]
    prompts = [{"prompt_token_ids": prefix + t["prompt_token_ids"]} for t in ef.random_prompts(3, 3, 20, seed=4)]
    sp = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    llm = paged(loaded)
    together = llm.generate(prompts, sp)
    alone = [paged(loaded, enable_prefix_caching=False).generate([p], sp)[0] for p in prompts]
    assert [o.outputs[0].token_ids for o in together] == [o.outputs[0].token_ids for o in alone]
    assert llm.engine.scheduler.shared.num_deferrals == 0
