"""Scheduler policy with exact block ids; no model, tokens are fed by hand."""
import itertools

from engine_fakes import ByteTokenizer

from memlm.engine.request import Request, RequestStatus
from memlm.engine.config import SchedulerConfig
from memlm.engine.scheduler import Scheduler
from memlm.kv.manager import KVCacheManager
from memlm.sampling import SamplingParams


def make(num_blocks=8, block_size=4, max_seqs=3, budget=6, max_len=64, headroom=0):
    """headroom=0: admission takes any free block, the policy most tests here pin down."""
    kv = KVCacheManager(num_blocks, block_size)
    return Scheduler(SchedulerConfig(max_seqs, budget, max_len, admission_headroom=headroom), kv), kv


def req(i, prompt_len, max_tokens=8, n=1):
    r = Request(str(i), None, list(range(1, prompt_len + 1)),
                SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, n=n),
                ByteTokenizer(), arrival=i)
    r.assign_seq_ids(itertools.count(100 * i))     # what an engine's add_request does
    return r


def step(sched, token=65):
    out = sched.schedule()
    sampled = {s.seq.seq_id: (token, None) for s in out.scheduled if s.samples}
    sched.update(out, sampled)
    return out


def plan(out):
    return [(s.seq.request.request_id, s.start, s.num_tokens) for s in out.scheduled]


def test_chunked_prefill_mixed_with_decodes_fcfs():
    sched, kv = make()
    a, b = req(0, 5), req(1, 3)
    sched.add(a), sched.add(b)
    out = step(sched)
    assert plan(out) == [("0", 0, 5), ("1", 0, 1)]          # b's prompt is chunked by the budget
    assert kv.block_table(a.sequences[0]) == [0, 1] and kv.block_table(b.sequences[0]) == [2]
    out = step(sched)
    assert plan(out) == [("0", 5, 1), ("1", 1, 2)]          # a decodes while b finishes its prefill
    assert a.sequences[0].num_output_tokens == 2 and b.sequences[0].num_output_tokens == 1


def test_max_num_seqs_caps_admission():
    sched, _ = make(num_blocks=16, max_seqs=2, budget=100)
    for i in range(3):
        sched.add(req(i, 2))
    out = step(sched)
    assert [r for r, *_ in plan(out)] == ["0", "1"] and sched.num_waiting == 1


def test_preemption_frees_newest_and_resumes_by_recompute():
    sched, kv = make(num_blocks=4, block_size=4, budget=16, max_seqs=4)
    a, b = req(0, 7, max_tokens=6), req(1, 7, max_tokens=6)
    sched.add(a), sched.add(b)
    step(sched)                                # a: blocks [0, 1], b: [2, 3]
    step(sched)                                # 8 tokens computed each: both blocks full
    assert kv.num_free_blocks == 0
    out = step(sched)                          # a needs a 3rd block: b (newest) is preempted
    assert out.preempted_seq_ids == [b.sequences[0].seq_id]
    assert plan(out) == [("0", 8, 1)]
    sb = b.sequences[0]
    assert sb.status is RequestStatus.PREEMPTED and sb.num_computed_tokens == 0
    assert kv.block_table(sb) == [] and sb.num_output_tokens == 2 and sched.num_preemptions == 1
    assert kv.block_table(a.sequences[0]) == [0, 1, 3]
    while not a.finished:
        step(sched)
    out = step(sched)                          # b is readmitted and recomputes prompt + output
    assert plan(out) == [("1", 0, 9)]
    while sched.has_unfinished():
        step(sched)
    assert b.sequences[0].completion.token_ids == [65] * 6 and kv.num_free_blocks == 4


def test_admission_keeps_headroom_for_running_growth():
    """The preemption workload above, with headroom: b waits until a's next tokens are covered
    (a still needs 2 more blocks for its 6 outputs), so nothing is preempted or recomputed."""
    sched, kv = make(num_blocks=4, block_size=4, budget=16, max_seqs=4, headroom=64)
    a, b = req(0, 7, max_tokens=6), req(1, 7, max_tokens=6)
    sched.add(a), sched.add(b)
    out = step(sched)
    assert plan(out) == [("0", 0, 7)] and sched.num_waiting == 1
    while not a.finished:
        out = step(sched)
        assert [r for r, *_ in plan(out)] == ["0"]
    out = step(sched)
    assert plan(out) == [("1", 0, 7)]
    while sched.has_unfinished():
        step(sched)
    assert sched.num_preemptions == 0 and b.sequences[0].completion.token_ids == [65] * 6
    assert kv.num_free_blocks == 4


def test_long_prompt_waits_until_all_of_it_fits_instead_of_thrashing():
    """A prompt chunked over several steps is admitted beside running work only when its whole
    rest fits: admitted on its first chunk alone, it would be the newest sequence, preempt itself
    when a later chunk found no blocks, and redo that chunk every time it came back."""
    sched, kv = make(num_blocks=8, block_size=4, budget=8, max_seqs=4, headroom=64)
    a, b = req(0, 8, max_tokens=6), req(1, 20, max_tokens=2)   # b: 20 + 2 tokens = 6 blocks
    sched.add(a)
    step(sched)                                # a: blocks [0, 1], decoding
    sched.add(b)
    out = step(sched)                          # 5 free: b's first chunk fits, all of b does not
    assert plan(out) == [("0", 8, 1)] and sched.num_waiting == 1
    while not a.finished:
        step(sched)
    while sched.has_unfinished():
        step(sched)
    assert sched.num_preemptions == 0 and b.sequences[0].completion.token_ids == [65] * 2
    assert kv.num_free_blocks == 8


def test_headroom_never_blocks_an_idle_pool():
    """With nothing running there is no growth to protect: the head of the queue is admitted."""
    sched, _ = make(num_blocks=4, block_size=4, budget=16, headroom=1000)
    r = req(0, 15, max_tokens=1)
    sched.add(r)
    assert plan(step(sched)) == [("0", 0, 15)]


def test_prompt_that_never_fits_fails_alone():
    sched, kv = make(num_blocks=2, block_size=4)
    big, ok = req(0, 9), req(1, 3, max_tokens=2)
    sched.add(big), sched.add(ok)
    assert big.finished and big.error and "KV pool" in big.error
    while sched.has_unfinished():
        step(sched)
    assert ok.sequences[0].completion.finish_reason == "length"


def test_alone_and_out_of_blocks_finishes_with_length():
    sched, kv = make(num_blocks=2, block_size=4, budget=16)
    r = req(0, 6, max_tokens=50)
    sched.add(r)
    while sched.has_unfinished():
        step(sched)
    s = r.sequences[0]
    assert s.completion.finish_reason == "length" and s.num_tokens == 9 and kv.num_free_blocks == 2


def test_n_forks_share_full_prompt_blocks():
    sched, kv = make(num_blocks=16, block_size=4, budget=32)
    r = req(0, 10, max_tokens=3, n=3)
    sched.add(r)
    step(sched)                                # parent computes 10 tokens: blocks 0, 1, 2
    s0, s1, s2 = r.sequences
    assert kv.block_table(s0) == [0, 1, 2]
    assert kv.block_table(s1) == [0, 1] and kv.block_table(s2) == [0, 1] and s1.num_computed_tokens == 8
    assert kv.pool.ref_counts[:3] == [3, 3, 1]
    out = step(sched)                          # siblings recompute only the last partial block
    assert plan(out) == [("0", 10, 1), ("0", 8, 2), ("0", 8, 2)]
    while sched.has_unfinished():
        step(sched)
    assert kv.num_free_blocks == 16 and all(c == 0 for c in kv.pool.ref_counts)


def test_abort_frees_blocks():
    sched, kv = make()
    r = req(0, 5)
    sched.add(r)
    step(sched)
    sched.abort(r)
    assert r.finished and r.sequences[0].completion.finish_reason == "abort"
    assert kv.num_free_blocks == 8 and not sched.has_unfinished()


def test_running_stays_in_arrival_order_so_forks_are_not_victims_before_newer_requests():
    sched, kv = make(num_blocks=16, block_size=4, budget=64, max_seqs=4)
    a, b = req(0, 6, max_tokens=20, n=2), req(1, 3, max_tokens=20)
    sched.add(a), sched.add(b)
    step(sched)                                # a's first completion and b run; a's fork waits
    step(sched)                                # the fork is admitted after b ...
    order = [(s.request.request_id, s.index) for s in sched.running]
    assert order == [("0", 0), ("0", 1), ("1", 0)]   # ... but runs ahead of it: b is the next victim


def test_scheduler_defaults_are_the_engine_defaults():
    from memlm.engine.config import EngineConfig
    s, e = SchedulerConfig(), EngineConfig()
    assert (s.max_num_seqs, s.max_num_batched_tokens, s.max_model_len, s.admission_headroom) == (
        e.max_num_seqs, e.max_num_batched_tokens, e.max_model_len, e.admission_headroom)


def test_sequence_ids_come_from_the_accepting_engine():
    r = Request("r", None, [1, 2], SamplingParams(n=3), ByteTokenizer())
    assert [s.seq_id for s in r.sequences] == [None] * 3
    r.assign_seq_ids(itertools.count(7))
    assert [s.seq_id for s in r.sequences] == [7, 8, 9]
