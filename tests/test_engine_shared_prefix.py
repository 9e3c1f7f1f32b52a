"""Holding a prompt back for a shared prefix (`engine/shared_prefix.py`) within its guarantees:
a held-back prompt keeps its place in line (newer prompts admitted past it leave it its sequence
slot and blocks), it is held back at most `max_deferred_steps` steps in all, an aborted or
preempted owner releases its waiters at once, and no owner or count outlives its sequence under
random arrivals, aborts and preemptions. The bound is set per process by an environment variable."""
import random

import pytest

import engine_fakes as ef

from memlm import LLM, SamplingParams
from memlm.engine import shared_prefix
from memlm.engine.config import SchedulerConfig
from memlm.engine.scheduler import Scheduler
from memlm.engine.shared_prefix import ENV_MAX_DEFERRED_STEPS, SharedPrefixes
from memlm.kv.manager import KVCacheManager
from memlm.kv.prefix_cache import PrefixCache
from memlm.kv.prefix_eviction import LRUPolicy

BS = 4
PREFIX = list(range(1, 17))                     # 4 full blocks


@pytest.fixture(autouse=True)
def no_env(monkeypatch):
    monkeypatch.delenv(ENV_MAX_DEFERRED_STEPS, raising=False)


def make(num_blocks=32, budget=64, max_seqs=4, bound=64, headroom=0, cap=0, block_size=BS):
    kv = KVCacheManager(num_blocks, block_size, PrefixCache(block_size, LRUPolicy()))
    cfg = SchedulerConfig(max_seqs, budget, 256, admission_headroom=headroom, prefill_tokens_with_decodes=cap)
    sched = Scheduler(cfg, kv)
    sched.shared.max_deferred_steps = bound
    return sched, kv


req, step = ef.scheduler_request, ef.scheduler_step


def first_steps(sched, reqs, steps=40):
    """Request id -> the step its first sequence was first scheduled in."""
    first = {}
    for i in range(steps):
        for s in step(sched).scheduled:
            first.setdefault(s.seq.request.request_id, i)
        if not sched.has_unfinished():
            break
    assert not sched.has_unfinished()
    return first


@pytest.mark.parametrize("bound", [0, 1, 64])
def test_a_held_back_prompt_keeps_its_sequence_slot(bound):
    # Before the fix: w was held back once (step 0), n was admitted past it into the last slot,
    # and w waited for a to finish its 10 tokens: admitted at step 10, not 1.
    sched, _ = make(max_seqs=2, bound=bound)
    a, w, n = req(0, PREFIX + [40], max_tokens=10), req(1, PREFIX + [50]), req(2, [90] * 3, max_tokens=30)
    for r in (a, w, n):
        sched.add(r)
    first = first_steps(sched, (a, w, n))
    if bound:
        assert first == {"0": 0, "1": 1, "2": 5}             # w: one step late, with a 16-token hit
        assert w.num_cached_tokens == 16 and sched.shared.num_deferrals == 1
    else:
        assert first == {"0": 0, "1": 0, "2": 4}             # w computes the prefix itself
        assert w.num_cached_tokens == 0 and sched.shared.num_deferrals == 0


def test_a_held_back_prompt_keeps_its_blocks():
    # a: 5 blocks, w after its hit: 1, n: 2; 7 blocks in all. Before the fix n took w's block in
    # step 0 and w waited for a to finish (step 3).
    sched, kv = make(num_blocks=7)
    a, w, n = req(0, PREFIX + [40], max_tokens=3), req(1, PREFIX + [50], max_tokens=3), req(2, [90] * 5)
    for r in (a, w, n):
        sched.add(r)
    first = first_steps(sched, (a, w, n))
    assert first["1"] == 1 and w.num_cached_tokens == 16
    assert first["2"] > first["1"]
    assert kv.num_free_blocks == kv.num_blocks and not sched.shared._owner


def test_the_bound_counts_steps_in_all_not_in_a_row():
    # w waits on a, a goes (preempted / aborted: released at once), w then waits on c: the count
    # goes on from 1, so w is held back 2 steps in all, not 2 per owner.
    sched, kv = make(bound=2)
    shared = sched.shared
    sa, sw, sc = (req(i, PREFIX + [40 + i]).sequences[0] for i in range(3))
    shared.admitted(sa, 0)
    hit = kv.find_cached_prefix(sw, sw.num_tokens)
    assert shared.should_defer(sw, hit)
    shared.release(sa)
    assert not shared.waits_on_owner(sw, hit)            # released: nothing to wait for at once
    shared.admitted(sc, 0)                               # another owner of the same prefix
    assert [shared.should_defer(sw, hit) for _ in range(2)] == [True, False]
    assert shared.waits_on_owner(sw, hit) and shared.num_deferrals == 2
    shared.admitted(sw, 4)                               # admitted: its count is gone
    assert sw.seq_id not in shared._deferred


def test_the_bound_comes_from_the_environment(monkeypatch):
    kv = KVCacheManager(8, BS, PrefixCache(BS, LRUPolicy()))
    monkeypatch.setattr(shared_prefix, "MAX_DEFERRED_STEPS", 0)
    assert SharedPrefixes(kv).max_deferred_steps == 0
    monkeypatch.setenv(ENV_MAX_DEFERRED_STEPS, "3")
    assert SharedPrefixes(kv).max_deferred_steps == 3 and SharedPrefixes(kv).enabled
    assert SharedPrefixes(kv, max_deferred_steps=1).max_deferred_steps == 1    # explicit wins
    for bad in ("-1", "two", "1.5"):
        monkeypatch.setenv(ENV_MAX_DEFERRED_STEPS, bad)
        with pytest.raises(ValueError, match=ENV_MAX_DEFERRED_STEPS):
            SharedPrefixes(kv)
    monkeypatch.delenv(ENV_MAX_DEFERRED_STEPS)
    with pytest.raises(ValueError, match="max_deferred_steps must be >= 0"):
        SharedPrefixes(kv, max_deferred_steps=-2)


def _random_run(seed: int, bound: int) -> int:
    """Random arrivals (some added between steps, as the server does), shared prefixes, aborts,
    preemptions from small pools; checks the bookkeeping after every step. Returns deferrals."""
    rng = random.Random(seed)
    bs = rng.choice([2, 4, 8])
    sched, kv = make(num_blocks=rng.randint(12, 60), budget=rng.choice([8, 16, 32, 64]),
                     max_seqs=rng.randint(1, 6), bound=bound, headroom=rng.choice([0, 4]),
                     cap=rng.choice([0, 3]), block_size=bs)
    prefixes = [[rng.randint(1, 200) for _ in range(rng.randint(0, 30))] for _ in range(3)]
    reqs, held = [], {}
    for _ in range(600):
        if len(reqs) < 24 and rng.random() < 0.4:
            prompt = rng.choice(prefixes) + [rng.randint(1, 200) for _ in range(rng.randint(1, 12))]
            reqs.append(req(len(reqs), prompt, max_tokens=rng.randint(1, 8)))
            sched.add(reqs[-1])
        if rng.random() < 0.03 and reqs:
            sched.abort(rng.choice(reqs))                    # finished ones: a no-op
        step(sched)
        running = {s.seq_id for s in sched.running}
        waiting = {s.seq_id for s in sched.waiting}
        assert all(o.seq_id in running and not o.finished for o in sched.shared._owner.values())
        assert set(sched.shared._owned) <= running and set(sched.shared._deferred) <= waiting
        for sid, n in sched.shared._deferred.items():
            assert n <= bound
            held[sid] = n
        if len(reqs) == 24 and not sched.has_unfinished():
            break
    assert not sched.has_unfinished(), f"seed {seed}: requests left after 600 steps"
    assert not (sched.shared._owner or sched.shared._owned or sched.shared._deferred)
    assert kv.num_free_blocks == kv.num_blocks
    return sched.shared.num_deferrals


def test_bookkeeping_under_random_arrivals_aborts_and_preemptions():
    deferrals = sum(_random_run(seed, bound) for seed in range(40) for bound in (1, 3))
    assert deferrals > 20                                    # the runs did hold prompts back


def test_an_engine_takes_the_bound_from_the_environment(monkeypatch):
    """What `benchmarks/multiturn.py --max-deferred-steps` relies on: a server process built with
    MEMLM_MAX_DEFERRED_STEPS set holds prompts back though the module's default is off."""
    monkeypatch.setattr(shared_prefix, "MAX_DEFERRED_STEPS", 0)
    monkeypatch.setenv(ENV_MAX_DEFERRED_STEPS, "2")
    llm = LLM(ef.tiny_loaded(ef.llama_config(), seed=5), engine="paged", verbose=False, kv_dtype="float32",
              block_size=16, num_kv_blocks=64, max_num_batched_tokens=256, max_num_seqs=8)
    prefix = ef.random_prompts(1, 64, 64, seed=2)[0]["prompt_token_ids"]
    prompts = [{"prompt_token_ids": prefix + t["prompt_token_ids"]} for t in ef.random_prompts(3, 3, 20, seed=4)]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    assert llm.engine.scheduler.shared.max_deferred_steps == 2
    assert llm.engine.scheduler.shared.num_deferrals == 2
    assert [o.num_cached_tokens for o in outs] == [0, 64, 64]
