"""KV eviction policies: kept-token sets, packing, block accounting, positions, past-context runs."""
import re

import engine_fakes as ef
import pytest
import torch

from memlm.engine.config import EngineConfig
from memlm.engine.llm_engine import LLMEngine
from memlm.engine.request import Request
from memlm.kv.manager import KVCacheManager
from memlm.kv.policies import KVPolicySpec, KVPolicyState, compaction_moves, plan_eviction, plan_relief
from memlm.models.blocks import Rotary
from memlm.sampling import SamplingParams, SamplingParamsError


def state(spec, n, mass=None):
    st = KVPolicyState(spec)
    st.append(0, n)
    if mass is not None:
        st.add_mass(torch.tensor(mass, dtype=torch.float32))
    return st


# ---- parameters ------------------------------------------------------------------------------
@pytest.mark.parametrize("kw, words", [
    (dict(policy="window", window=0, budget=0), "kv_window must be >= 1"),
    (dict(policy="sinks", window=4, sinks=4, budget=8), "kv_sinks (4) must be smaller than kv_window (4)"),
    (dict(policy="h2o", window=2, sinks=3, budget=3), "kv_sinks (3) must be smaller than kv_window (2)"),
    (dict(policy="h2o", window=4, sinks=2, budget=2), "kv_budget (2) must be at least kv_sinks + 1 (3)"),
    (dict(policy="h2o", window=6, sinks=2, budget=8), "must be below kv_budget (8)"),
    (dict(policy="lru"), "unknown kv_policy 'lru'"),
])
def test_bad_parameters_name_the_problem(kw, words):
    with pytest.raises(ValueError, match=re.escape(words)):
        KVPolicySpec(**kw)


def test_bad_request_fields_are_sampling_errors_and_engine_defaults_validate():
    with pytest.raises(SamplingParamsError, match="kv_policy must be one of full, window"):
        SamplingParams(kv_policy="lru")
    with pytest.raises(SamplingParamsError, match="kv_window must be a positive integer"):
        SamplingParams(kv_window=0)
    with pytest.raises(SamplingParamsError, match="n must be 1 with kv_policy=sinks"):
        SamplingParams(kv_policy="sinks", n=2)
    with pytest.raises(ValueError, match="kv_sinks .* must be smaller than kv_window"):
        EngineConfig(kv_policy="sinks", kv_window=4, kv_sinks=4)


def test_resolve_fills_each_policy_from_the_defaults():
    d = EngineConfig()
    assert KVPolicySpec.resolve("sinks", None, None, None, d) == KVPolicySpec("sinks", 1020, 4, 1024)
    assert KVPolicySpec.resolve("window", 8, 3, None, d) == KVPolicySpec("window", 8, 0, 8)
    assert KVPolicySpec.resolve("h2o", None, 0, 400, d) == KVPolicySpec("h2o", 200, 0, 400)
    assert KVPolicySpec.resolve("full", 3, 3, 3, d) == KVPolicySpec()


# ---- kept sets on hand-built patterns -----------------------------------------------------------
def test_window_and_sinks_keep_recent_tokens_a_stride_at_a_time():
    win = state(KVPolicySpec("window", 8, 0, 8), 8)
    assert plan_eviction(win, 1, 4, prompt_len=3) == [4, 5, 6, 7]      # 8 + 1 > 8: drop 4 at once
    assert plan_eviction(state(KVPolicySpec("window", 8, 0, 8), 7), 1, 4, 3) is None
    sinks = state(KVPolicySpec("sinks", 6, 2, 8), 8)
    assert plan_eviction(sinks, 1, 4, 3) == [0, 1, 6, 7]              # keep 8 - 1 - 3: 2 sinks + 2


def test_h2o_keeps_sinks_recent_and_the_heaviest_of_the_rest():
    #          pos: 0    1    2    3    4    5    6    7    8    9
    mass = [9.0, 0.1, 5.0, 0.2, 4.0, 0.3, 0.0, 0.0, 0.0, 0.0]
    st = state(KVPolicySpec("h2o", 3, 1, 7), 10, mass)
    # keep 7 - 1 - (stride 1 - 1) = 6: sink 0, recent 7 8 9, heavy 2 and 4
    assert plan_eviction(st, 1, 1, prompt_len=10) == [0, 2, 4, 7, 8, 9]
    st.apply([0, 2, 4, 7, 8, 9])
    assert st.positions == [0, 7, 2, 8, 4, 9] and st.mass[:6].tolist() == pytest.approx([9, 0, 5, 0, 4, 0])


def test_snap_compresses_a_long_prompt_once_by_its_observation_window():
    mass = [1.0, 0.0, 3.0, 0.0, 2.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    st = state(KVPolicySpec("snap", 2, 1, 5), 10, mass)
    assert plan_eviction(st, 1, 4, prompt_len=12) is None               # prompt not cached yet
    assert plan_eviction(st, 1, 4, prompt_len=10) == [0, 2, 4, 8, 9]    # sink, 2 heavy, window 2
    assert plan_eviction(st, 1, 4, prompt_len=10) is None                # once
    short = state(KVPolicySpec("snap", 2, 1, 5), 12)
    assert plan_eviction(short, 1, 4, prompt_len=4) is None              # prompt fits: no snap


def test_relief_evicts_to_the_low_end_of_the_policy_range():
    sinks = state(KVPolicySpec("sinks", 10, 2, 12), 11)                # 11 entries: 3 blocks of 4
    assert plan_relief(sinks, 4) == [0, 1, 5, 6, 7, 8, 9, 10]          # 12 - 4: 2 sinks + 6 recent
    assert plan_relief(state(KVPolicySpec("sinks", 10, 2, 12), 8), 4) is None    # frees no block
    assert plan_relief(sinks, 4, incoming=6) == [0, 1, 7, 8, 9, 10]    # room for this step's 6
    assert plan_relief(state(KVPolicySpec(), 40), 4) is None           # full never shrinks
    snap = state(KVPolicySpec("snap", 2, 1, 5), 10, [1.0, 0, 3.0, 0, 2.0, 0, 0, 0, 0, 0])
    assert plan_relief(snap, 4) is None                                # before its one compression
    snap.snapped = True                                                # ... generation appended past 5
    assert plan_relief(snap, 4) == [0, 2, 4, 8, 9]                     # back to its budget by mass


def test_compaction_fills_front_holes_from_the_tail():
    assert compaction_moves([0, 1, 5, 6, 7], 8) == [(5, 2), (6, 3), (7, 4)]
    assert compaction_moves([0, 2, 3], 4) == [(3, 1)]
    assert compaction_moves([0, 1, 2], 6) == []
    with pytest.raises(ValueError, match="distinct indices below the cache length"):
        compaction_moves([0, 9], 4)


# ---- blocks --------------------------------------------------------------------------------------
class Seq:
    def __init__(self, seq_id):
        self.seq_id, self.num_computed_tokens = seq_id, 0

    def token_ids_slice(self, a, b):
        return list(range(a, b))


def test_eviction_frees_tail_blocks_to_the_pool_at_once():
    kv = KVCacheManager(8, 4)
    s = Seq(0)
    kv.keep_private(s)
    assert kv.allocate_slots(s, 12)
    s.num_computed_tokens = 12
    assert kv.block_table(s) == [0, 1, 2] and kv.num_free_blocks == 5
    assert kv.evict(s, 5) == 1                                   # entries 0..4 stay: blocks 0, 1
    assert kv.block_table(s) == [0, 1] and kv.num_free_blocks == 6
    assert kv.num_cached_tokens(s) == 5 and kv.num_blocks_needed(s, 3) == 0   # 5 + 3 <= 8 slots
    s.num_computed_tokens = 15
    assert kv.num_cached_tokens(s) == 8 and kv.num_blocks_needed(s, 1) == 1
    kv.free(s)
    assert kv.num_free_blocks == 8
    with pytest.raises(RuntimeError, match="kept private"):
        kv.evict(Seq(1), 0)


# ---- through the engine ------------------------------------------------------------------------
def _engine(loaded, **kw):
    cfg = dict(max_num_seqs=4, num_kv_blocks=64, block_size=4, max_model_len=64, kv_dtype="fp32")
    cfg.update(kw)
    return LLMEngine(loaded.model, EngineConfig(**cfg))


def _run(eng, prompts, **params):
    return _drive(eng, [Request(f"r{i}", None, p, SamplingParams(temperature=0, ignore_eos=True, **params),
                                ef.ByteTokenizer()) for i, p in enumerate(prompts)])


def _drive(eng, reqs):
    """Add `reqs` and step `eng` until they finish: (reqs, the peak of KV blocks in use)."""
    for r in reqs:
        eng.add_request(r)
    peak = 0
    while eng.has_unfinished():
        eng.step()
        peak = max(peak, eng.kv.num_used_blocks)
    return reqs, peak


@pytest.fixture(scope="module")
def loaded():
    return ef.tiny_loaded(ef.llama_config(max_position_embeddings=64))


@pytest.mark.parametrize("native", [True, False])
def test_sinks_and_window_generate_past_the_context_in_flat_memory(loaded, native):
    eng = _engine(loaded)
    eng.runner.store.native_decode = native and eng.runner.store.native_decode
    reqs, peak = _run(eng, [list(range(1, 11)), list(range(1, 31))], max_tokens=150,
                      kv_policy="sinks", kv_window=16, kv_sinks=4)
    assert [len(r.sequences[0].output_token_ids) for r in reqs] == [150, 150]      # past 64
    assert peak == 2 * 5 and eng.kv.num_free_blocks == 64                         # 20 entries each
    full, _ = _run(_engine(loaded), [list(range(1, 11))], max_tokens=150)
    assert full[0].sequences[0].completion.finish_reason == "length"
    assert len(full[0].sequences[0].output_token_ids) == 64 - 10


def test_long_prompts_need_a_bounded_policy_or_truncation(loaded):
    long = list(range(1, 101)) * 1                                 # 100 tokens > the 64 context
    (full,), _ = _run(_engine(loaded), [long], max_tokens=4)
    assert "does not fit the model's 64-token context" in full.error and "truncate_prompt_tokens" in full.error
    (win,), _ = _run(_engine(loaded), [long], max_tokens=4, kv_policy="window", kv_window=24)
    assert win.error is None and len(win.sequences[0].output_token_ids) == 4
    (cut,), _ = _run(_engine(loaded), [long], max_tokens=4, truncate_prompt_tokens=40)
    assert cut.error is None and cut.prompt_token_ids == long[-40:]


class StreamingOracle:
    """StreamingLLM literally, one token at a time: keys kept before RoPE in text order, each
    rotated by its place in the cache at every step (and the query by its own place)."""

    def __init__(self, model, spec, stride):
        self.model, self.state, self.stride = model, KVPolicyState(spec), stride
        self.k: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}
        self.rot = Rotary(model.cfg.head_dim, model.cfg.rope_theta)

    def step(self, token, pos):
        kept = plan_eviction(self.state, 1, self.stride, prompt_len=0)
        if kept is not None:                          # same entries, kept in text order
            order = sorted(kept, key=self.state.positions.__getitem__)
            self.state.positions = [self.state.positions[i] for i in order]
            for d in self.k:
                self.k[d], self.v[d] = self.k[d][order], self.v[d][order]
        self.pos = pos
        h = self.model(torch.tensor([token]), torch.tensor([pos]), self)
        self.state.append(pos, 1)
        return int(self.model.compute_logits(h).argmax())

    def attend(self, depth, q, k, v):
        cos, sin = self.rot.cos_sin(torch.tensor([self.pos]))
        raw_k = Rotary.apply(k, cos, -sin)                                   # undo R(pos)
        raw_q = Rotary.apply(q, cos, -sin)
        self.k[depth] = torch.cat([self.k.get(depth, raw_k[:0]), raw_k])    # (L, nkv, hd)
        self.v[depth] = torch.cat([self.v.get(depth, v[:0]), v])
        L = self.k[depth].shape[0]
        c, s = self.rot.cos_sin(torch.arange(L))
        keys = Rotary.apply(self.k[depth], c, s).transpose(0, 1)            # (nkv, L, hd)
        qr = Rotary.apply(raw_q, c[-1:], s[-1:]).transpose(0, 1)            # (nh, 1, hd)
        out = torch.nn.functional.scaled_dot_product_attention(
            qr[None], keys[None], self.v[depth].transpose(0, 1)[None], enable_gqa=True)
        return out[0].transpose(0, 1)


@pytest.mark.parametrize("native", [True, False])
def test_sinks_positions_match_streamingllm_by_place_in_the_cache(loaded, native):
    spec = KVPolicySpec("sinks", 12, 3, 15)
    prompt = [5, 17, 3, 99, 42, 7]
    eng = _engine(loaded)
    eng.runner.store.native_decode = native and eng.runner.store.native_decode
    (req,), _ = _run(eng, [prompt], max_tokens=80, kv_policy="sinks", kv_window=12, kv_sinks=3)
    got = req.sequences[0].output_token_ids
    oracle = StreamingOracle(loaded.model, spec, stride=4)
    with torch.inference_mode():
        for i, t in enumerate(prompt):
            nxt = oracle.step(t, i)
        want = [nxt]
        for i in range(len(prompt), len(prompt) + 79):
            want.append(oracle.step(want[-1], i))
    assert got == want


def test_h2o_decode_mass_reaches_the_policy_and_bounds_the_cache(loaded):
    eng = _engine(loaded)
    (req,), peak = _run(eng, [list(range(1, 9))], max_tokens=40, kv_policy="h2o", kv_budget=16,
                        kv_window=6, kv_sinks=1)
    st = req.sequences[0].kv_state
    assert len(req.sequences[0].output_token_ids) == 40 and peak == 4       # 16 entries
    assert st.num_cached <= 16 and 0 in st.positions and float(st.mass.sum()) > 0


def test_pool_pressure_shrinks_an_evicting_sequence_before_preempting(loaded):
    # a full request grows while a snap request generates past its budget of 8: the pool of 14
    # blocks cannot hold both (18 at peak with room); the snap request is compressed back to
    # its budget instead of anyone being preempted
    def run(blocks):
        eng = _engine(loaded, num_kv_blocks=blocks, admission_headroom=0)
        reqs = [Request("full", None, list(range(1, 6)), SamplingParams(temperature=0, ignore_eos=True,
                                                                       max_tokens=40), ef.ByteTokenizer()),
                Request("snap", None, list(range(1, 21)), SamplingParams(
                    temperature=0, ignore_eos=True, max_tokens=30, kv_policy="snap", kv_sinks=1,
                    kv_window=2, kv_budget=8), ef.ByteTokenizer())]
        _, peak = _drive(eng, reqs)
        assert [len(r.sequences[0].output_token_ids) for r in reqs] == [40, 30]
        return eng.scheduler, peak
    roomy, peak = run(20)
    assert (roomy.num_preemptions, roomy.policy.num_relieved, peak) == (0, 0, 18)
    tight, peak = run(14)
    assert (tight.num_preemptions, tight.policy.num_relieved, peak) == (0, 1, 14)
    assert tight.policy.kv.num_free_blocks == 14


@pytest.mark.parametrize("kv_dtype", ["int4", "int2"])
def test_kivi_codecs_refuse_evicting_policies_per_request(loaded, kv_dtype):
    eng = _engine(loaded, kv_dtype=kv_dtype, block_size=16)
    bad = Request("bad", None, [1, 2, 3], SamplingParams(kv_policy="sinks", kv_window=16, kv_sinks=2,
                                                         max_tokens=4), ef.ByteTokenizer())
    ok = Request("ok", None, [1, 2, 3], SamplingParams(temperature=0, ignore_eos=True, max_tokens=4),
                 ef.ByteTokenizer())
    eng.add_request(bad)
    eng.add_request(ok)
    while eng.has_unfinished():
        eng.step()
    assert "kv_policy=sinks evicts single tokens" in bad.error and "kv_dtype fp16, fp32 or int8" in bad.error
    assert ok.error is None and len(ok.sequences[0].output_token_ids) == 4


def test_cli_flags_become_sampling_params():
    import argparse

    from memlm.entrypoints.cli import args as cli_args
    p = argparse.ArgumentParser()
    cli_args.add_sampling_args(p)
    params = cli_args.sampling_params(p.parse_args(["--kv-policy", "sinks", "--kv-window", "64", "--kv-sinks", "2"]))
    assert (params.kv_policy, params.kv_window, params.kv_sinks, params.kv_budget) == ("sinks", 64, 2, None)
    assert cli_args.sampling_params(p.parse_args([])).kv_policy is None          # the engine's default


def test_eval_scores_token_by_token_through_the_policy_cache(loaded):
    from memlm.entrypoints.evaluate import eval_llm, perplexity
    llm = eval_llm(loaded, 1, kv_dtype="fp32", num_kv_blocks=64, block_size=4)
    ids = [(i * 7) % 250 + 1 for i in range(150)]                   # longer than the 64 context
    r = perplexity(llm, ids, context=150, kv_policy=dict(kv_policy="sinks", kv_window=16, kv_sinks=4))
    assert (r.windows, r.tokens) == (1, 149) and r.perplexity > 1
    w = perplexity(llm, ids, context=150, kv_policy=dict(kv_policy="window", kv_window=16))
    assert w.tokens == 149 and w.nll != r.nll                          # the sinks change the scores
    full = perplexity(llm, ids, context=60)                            # full: windows within the context
    assert full.context == 60 and full.windows == 3


def test_reference_engine_refuses_an_evicting_policy(loaded):
    from memlm.engine.reference import ReferenceEngine
    eng = ReferenceEngine(loaded.model, 64)
    r = Request("r", None, [1, 2, 3], SamplingParams(kv_policy="window", kv_window=8), ef.ByteTokenizer())
    eng.add_request(r)
    assert "needs the paged engine" in r.error
