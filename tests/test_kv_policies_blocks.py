"""Block-granular eviction for block KV codecs (int4 / int2 KIVI): `window` drops whole blocks."""
import engine_fakes as ef
import pytest
import torch

from memlm.engine.config import EngineConfig
from memlm.engine.llm_engine import LLMEngine
from memlm.engine.request import Request, Sequence
from memlm.kv.manager import KVCacheManager
from memlm.kv.policies import KVPolicySpec, KVPolicyState, plan_block_eviction, plan_block_relief
from memlm.sampling import SamplingParams


def state(spec, n):
    st = KVPolicyState(spec)
    st.append(0, n)
    return st


def test_block_window_drops_the_fewest_oldest_whole_blocks_never_the_last():
    win = KVPolicySpec("window", 32, 0, 32)
    assert plan_block_eviction(state(win, 31), 1, 8) is None              # 32 fits
    assert plan_block_eviction(state(win, 32), 1, 8) == [0]               # one block for one token
    assert plan_block_eviction(state(win, 32), 12, 8) == [0, 1]           # 12 over: two blocks
    assert plan_block_eviction(state(win, 17), 24, 8) == [0, 1]           # entry 16's block stays
    assert plan_block_eviction(state(KVPolicySpec("sinks", 28, 4, 32), 32), 1, 8) is None   # not block-granular
    # relief: down to budget - block (24) entries, the incoming ones included
    assert plan_block_relief(state(win, 30), 8) == [0]
    assert plan_block_relief(state(win, 20), 8) is None
    assert plan_block_relief(state(win, 20), 8, incoming=6) == [0]


def test_dropping_blocks_keeps_the_other_entries_in_order():
    st = state(KVPolicySpec("h2o", 4, 0, 12), 12)
    st.add_mass(torch.arange(12, dtype=torch.float32))
    st.drop_blocks([0, 2], 4)
    assert st.positions == [4, 5, 6, 7] and st.mass[:4].tolist() == [4, 5, 6, 7]
    assert st.mass[4:].abs().sum() == 0 and st.num_evicted == 4


def _seq(sid, n):
    req = Request(f"r{sid}", None, list(range(1, n + 1)), SamplingParams(max_tokens=1), ef.ByteTokenizer())
    seq = req.sequences[0]
    seq.seq_id = sid
    return seq


def test_manager_drops_full_blocks_to_the_pool_and_refuses_the_last_or_shared():
    kv = KVCacheManager(16, 4)
    seq = _seq(0, 14)
    assert kv.allocate_slots(seq, 14)
    seq.num_computed_tokens = 14
    table = kv.block_table(seq)
    with pytest.raises(RuntimeError, match="kept private"):
        kv.drop_blocks(seq, [0])
    kv.keep_private(seq)
    with pytest.raises(ValueError, match="only full blocks before the last"):
        kv.drop_blocks(seq, [3])                                             # the partial last block
    assert kv.drop_blocks(seq, [0, 2]) == 2
    assert kv.block_table(seq) == [table[1], table[3]] and kv.num_free_blocks == 14
    assert kv.num_cached_tokens(seq) == 6                                    # 14 - 2 * 4


def _engine(loaded, **kw):
    cfg = dict(max_num_seqs=4, num_kv_blocks=32, block_size=16, max_model_len=64, kv_dtype="int4")
    cfg.update(kw)
    return LLMEngine(loaded.model, EngineConfig(**cfg))


def _run(eng, prompts, **params):
    reqs = [Request(f"r{i}", None, p, SamplingParams(temperature=0, ignore_eos=True, **params),
                    ef.ByteTokenizer()) for i, p in enumerate(prompts)]
    for r in reqs:
        eng.add_request(r)
    peak, cached = 0, {}
    while eng.has_unfinished():
        eng.step()
        peak = max(peak, eng.kv.num_used_blocks)
        for r in reqs:
            s = r.sequences[0]
            if s.kv_state is not None and s.kv_state.positions:
                cached[r.request_id] = max(cached.get(r.request_id, 0), s.kv_state.num_cached)
    return reqs, peak, cached


@pytest.fixture(scope="module")
def loaded():
    return ef.tiny_loaded(ef.llama_config(max_position_embeddings=64))


@pytest.mark.parametrize("kv_dtype, native", [("int4", True), ("int4", False), ("int2", True)])
def test_kivi_window_generates_past_the_context_in_flat_memory(loaded, kv_dtype, native):
    eng = _engine(loaded, kv_dtype=kv_dtype)
    eng.runner.store.native_decode = native and eng.runner.store.native_decode
    seen = []
    reqs = [Request(f"r{i}", None, p, SamplingParams(temperature=0, ignore_eos=True, max_tokens=120,
                                                     kv_policy="window", kv_window=40), ef.ByteTokenizer())
            for i, p in enumerate([list(range(1, 11)), list(range(1, 101))])]          # 100 > the 64 context
    for r in reqs:
        eng.add_request(r)
    peak = 0
    while eng.has_unfinished():
        eng.step()
        peak = max(peak, eng.kv.num_used_blocks)
        for r in reqs:
            st = r.sequences[0].kv_state
            if st.positions:
                seen.append((st.num_cached, st.positions[0] % 16, st.positions == list(range(
                    st.positions[0], st.positions[0] + st.num_cached))))
    assert [r.error for r in reqs] == [None, None]
    assert [len(r.sequences[0].output_token_ids) for r in reqs] == [120, 120]        # past 64
    assert max(n for n, _, _ in seen) <= 40 and peak <= 2 * 3                       # 3 blocks each at most
    assert all(first == 0 and contiguous for _, first, contiguous in seen)           # whole blocks, text order
    assert eng.kv.num_free_blocks == 32


def test_block_granular_window_equals_the_token_path_when_it_drops_the_same_tokens(loaded):
    """Prompts within the window, then decode: both paths evict the oldest block each time, so
    an fp32 engine told to evict whole blocks must generate what the token path generates."""
    prompts = [list(range(3, 20)), list(range(40, 70))]
    outs = []
    for block_mode in (False, True):
        eng = _engine(loaded, kv_dtype="fp32", block_size=4)
        eng.scheduler.policy.per_token_kv = not block_mode
        reqs, peak, cached = _run(eng, prompts, max_tokens=90, kv_policy="window", kv_window=32)
        assert [r.error for r in reqs] == [None, None] and max(cached.values()) == 32
        outs.append([r.sequences[0].output_token_ids for r in reqs])
        assert eng.kv.num_free_blocks == 32
    assert outs[0] == outs[1]


def test_block_codecs_refuse_sinks_and_sizes_that_split_blocks_per_request(loaded):
    eng = _engine(loaded)
    bad = [Request(f"b{i}", None, [1, 2, 3], SamplingParams(max_tokens=4, **kw), ef.ByteTokenizer())
           for i, kw in enumerate([dict(kv_policy="sinks", kv_window=60, kv_sinks=4),
                                   dict(kv_policy="window", kv_window=31),
                                   dict(kv_policy="h2o", kv_budget=63),
                                   dict(kv_policy="snap", kv_budget=64, kv_sinks=17, kv_window=20)])]
    ok = Request("ok", None, [1, 2, 3], SamplingParams(temperature=0, ignore_eos=True, max_tokens=4,
                                                       kv_policy="window", kv_window=32), ef.ByteTokenizer())
    for r in bad + [ok]:
        eng.add_request(r)
    while eng.has_unfinished():
        eng.step()
    assert "kv_policy=sinks evicts single tokens" in bad[0].error and "window, h2o or snap" in bad[0].error
    assert "kv_window (31) must be at least 2 blocks (32 tokens)" in bad[1].error
    assert "kv_budget (63) must be at least 4 blocks (64 tokens) for kv_policy=h2o" in bad[2].error
    assert "kv_sinks (17) must fit one block (16)" in bad[3].error
    assert ok.error is None and len(ok.sequences[0].output_token_ids) == 4


def test_block_h2o_drops_the_lightest_blocks_outside_sinks_and_recent():
    spec = KVPolicySpec("h2o", 6, 2, 20)                 # 2 sinks, 6 recent, budget 20, blocks of 4
    st = state(spec, 22)
    #         block: 0 (sinks)  1           2           3           4 (recent)  5 (last, partial)
    st.add_mass(torch.tensor([9, 9, 9, 9, 1, 1, 1, 1, 5, 5, 5, 5, 0, 0, 0, 2, 3, 3, 3, 3, 0, 0.]))
    assert plan_block_eviction(st, 1, 4) == [3]           # 3 over: one block, the lightest (3: mass 2)
    st2 = state(spec, 22)
    st2.add_mass(torch.tensor([9, 9, 9, 9, 1, 1, 1, 1, 5, 5, 5, 5, 0, 0, 0, 2, 3, 3, 3, 3, 0, 0.]))
    assert plan_block_eviction(st2, 6, 4) == [1, 3]       # 8 over: the two lightest, 3 (2) and 1 (4)
    st3 = state(spec, 22)                                 # no mass yet: the oldest candidates first
    assert plan_block_eviction(st3, 10, 4) == [1, 2, 3]
    assert plan_block_eviction(st3, 14, 4) == [1, 2, 3, 4]   # then the oldest recent block; never 0 or 5
    assert plan_block_eviction(state(spec, 19), 1, 4) is None


def test_block_snap_compresses_the_cached_prompt_once():
    spec = KVPolicySpec("snap", 4, 1, 12)
    st = state(spec, 20)
    st.add_mass(torch.tensor([1.0] * 4 + [0.0] * 4 + [3.0] * 4 + [0.0] * 8))
    assert plan_block_eviction(st, 1, 4, prompt_len=24) is None          # the prompt is not cached yet
    assert plan_block_eviction(st, 1, 4, prompt_len=20) == [1, 3]        # 8 over: the two lightest
    assert st.snapped and plan_block_eviction(st, 1, 4, prompt_len=20) is None


def test_pool_pressure_drops_a_kivi_window_block_before_preempting(loaded):
    # two window-48 sequences (3 blocks each at most) in a pool of 5: each gives a block back
    # when the other needs one, and nobody is preempted
    eng = _engine(loaded, num_kv_blocks=5, admission_headroom=0)
    reqs, peak, _ = _run(eng, [list(range(1, 10)), list(range(5, 14))], max_tokens=80, kv_policy="window",
                         kv_window=48)
    assert [len(r.sequences[0].output_token_ids) for r in reqs] == [80, 80] and peak == 5
    assert eng.scheduler.num_preemptions == 0 and eng.scheduler.policy.num_relieved >= 1
    assert eng.kv.num_free_blocks == 5


def _kept_positions(eng, prompts, **params):
    reqs = [Request(f"r{i}", None, p, SamplingParams(temperature=0, ignore_eos=True, **params),
                    ef.ByteTokenizer()) for i, p in enumerate(prompts)]
    for r in reqs:
        eng.add_request(r)
    most, kept = 0, {}
    while eng.has_unfinished():
        eng.step()
        for r in reqs:
            st = r.sequences[0].kv_state
            if st.positions:
                most = max(most, st.num_cached)
                kept[r.request_id] = list(st.positions)
    assert [r.error for r in reqs] == [None] * len(reqs)
    return reqs, most, kept


@pytest.fixture(scope="module")
def roomy():
    return ef.tiny_loaded(ef.llama_config(max_position_embeddings=256))


@pytest.mark.parametrize("kv_dtype", ["int4", "int2"])
def test_kivi_h2o_scores_blocks_by_kernel_mass_native_or_torch_alike(roomy, kv_dtype):
    runs = []
    for native in (True, False):
        eng = _engine(roomy, kv_dtype=kv_dtype, max_model_len=256)
        eng.runner.store.native_decode = native and eng.runner.store.native_decode
        reqs, most, kept = _kept_positions(eng, [list(range(1, 41)), list(range(7, 30))], max_tokens=50,
                                           kv_policy="h2o", kv_budget=64, kv_window=16, kv_sinks=2)
        assert most <= 64 and eng.kv.num_free_blocks == 32
        for pos in kept.values():
            assert pos[:16] == list(range(16))                            # the sinks' block stays
            runs_of = [pos[i:i + 16] for i in range(0, len(pos) - 16, 16)]  # whole blocks of text
            assert all(b == list(range(b[0], b[0] + 16)) and b[0] % 16 == 0 for b in runs_of)
        assert float(reqs[0].sequences[0].kv_state.mass.sum()) > 0
        assert kept["r0"][-1] + 1 - len(kept["r0"]) >= 16                   # 90 tokens in at most 64
        assert [len(r.sequences[0].output_token_ids) for r in reqs] == [50, 50]
        runs.append((kept, [r.sequences[0].output_token_ids for r in reqs]))
    assert runs[0] == runs[1]                                             # kernel mass = reference mass


def test_kivi_snap_compresses_a_long_prompt_to_whole_blocks(roomy):
    eng = _engine(roomy, max_model_len=256)
    (req,), most, kept = _kept_positions(eng, [list(range(1, 61))], max_tokens=8, kv_policy="snap",
                                         kv_budget=32, kv_window=8, kv_sinks=1)
    pos = kept["r0"]
    assert len(req.sequences[0].output_token_ids) == 8 and most == 60
    # 60 -> 28 (blocks 1 and 2 gone), then 7 generated tokens written (the 8th is only sampled)
    assert len(pos) == 16 + 12 + 7 and pos[:16] == list(range(16))
    assert pos[-19:] == list(range(48, 67))                               # the last block and the new tokens
