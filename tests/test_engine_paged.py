"""The paged engine against the reference path, on tiny random GPT-2- and Llama-shaped models."""

import pytest
import torch

import engine_fakes as ef

from memlm import LLM, SamplingParams


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def loaded(request):
    cfg = ef.llama_config() if request.param == "llama" else ef.gpt2_config()
    return ef.tiny_loaded(cfg, seed=3)


@pytest.fixture(scope="module")
def reference(loaded):
    return LLM(loaded, engine="reference")


def paged(loaded, **kw):
    kw.setdefault("num_kv_blocks", 64)
    kw.setdefault("max_num_batched_tokens", 48)
    kw.setdefault("max_num_seqs", 8)
    kw.setdefault("kv_dtype", "float32")      # exact equality with the fp32 reference
    return LLM(loaded, engine="paged", verbose=False, **kw)


def tokens(outputs):
    return [[c.token_ids for c in o.outputs] for o in outputs]


def test_greedy_equals_reference_on_mixed_lengths(loaded, reference):
    prompts = ef.random_prompts(24, 1, 120, seed=1)
    sp = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    llm = paged(loaded)
    assert tokens(llm.generate(prompts, sp)) == tokens(reference.generate(prompts, sp))
    m = llm.metrics
    assert m.kv_blocks_used == 0 and m.num_running == 0 and m.decode_tokens > 0
    # decode-only steps: at most every sequence at once, and never more tokens than decoded overall
    assert 0 < m.decode_step_tokens <= m.decode_tokens and 1 <= m.mean_decode_batch <= 24
    assert m.decode_steps <= m.num_steps


def test_tiny_pool_preempts_and_matches_ample_pool(loaded):
    prompts = ef.random_prompts(30, 4, 90, seed=2)
    sp = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    ample = paged(loaded, num_kv_blocks=400, max_num_seqs=32).generate(prompts, sp)
    # no admission headroom: decodes outgrow the pool and the newest sequences are preempted
    small_llm = paged(loaded, num_kv_blocks=10, max_num_batched_tokens=32, max_num_seqs=16,
                      admission_headroom=0)
    small = small_llm.generate(prompts, sp)
    assert small_llm.metrics.num_preemptions > 0
    same = sum(a == b for a, b in zip(tokens(ample), tokens(small)))
    assert same >= 0.98 * len(prompts)
    assert all(o.finished and o.outputs[0].finish_reason == "length" for o in small)


def test_never_fitting_prompt_errors_only_itself(loaded, reference):
    prompts = ef.random_prompts(4, 5, 30, seed=3)
    prompts.insert(2, {"prompt_token_ids": list(range(200))})     # > 8 blocks * 16 tokens
    sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    out = paged(loaded, num_kv_blocks=8).generate(prompts, sp)
    assert out[2].error and "KV pool" in out[2].error and out[2].outputs[0].finish_reason == "error"
    ref = reference.generate([p for i, p in enumerate(prompts) if i != 2], sp)
    assert tokens([o for i, o in enumerate(out) if i != 2]) == tokens(ref)


def test_seeded_sampling_same_alone_and_in_batch(loaded, reference):
    prompts = ef.random_prompts(6, 3, 60, seed=4)
    sp = SamplingParams(temperature=0.9, top_p=0.95, top_k=40, min_p=0.02, seed=11, max_tokens=16,
                        ignore_eos=True, repetition_penalty=1.1, frequency_penalty=0.2)
    llm = paged(loaded)
    batch = tokens(llm.generate(prompts, sp))
    alone = [tokens(llm.generate([p], sp))[0] for p in prompts]
    assert batch == alone == tokens(reference.generate(prompts, sp))


def test_n_samples_share_prompt_and_match_reference(loaded, reference):
    prompts = ef.random_prompts(3, 20, 70, seed=5)
    sp = SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=12, ignore_eos=True, logprobs=2,
                        prompt_logprobs=1)
    llm = paged(loaded)
    out = llm.generate(prompts, sp)
    ref = reference.generate(prompts, sp)
    assert tokens(out) == tokens(ref)
    assert all(len(o.outputs) == 3 and len(set(map(tuple, t))) > 1 for o, t in zip(out, tokens(out)))
    for o, r in zip(out, ref):
        assert len(o.prompt_logprobs) == len(o.prompt_token_ids)
        tok = o.prompt_token_ids[5]
        assert o.prompt_logprobs[5][tok] == pytest.approx(r.prompt_logprobs[5][tok], abs=1e-4)
        assert len(o.outputs[1].logprobs) == 12
    assert llm.metrics.kv_blocks_used == 0


def test_stop_strings_and_stream(loaded):
    llm = paged(loaded)
    prompt = ef.random_prompts(1, 10, 10, seed=6)[0]
    full = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))[0]
    text = full.outputs[0].text
    stop = text[5:8] if len(text) >= 8 else None
    if stop:
        cut = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True,
                                                    stop=[stop]))[0].outputs[0]
        assert cut.finish_reason == "stop" and cut.text == text[:text.index(stop)]
    chunks = list(llm.stream(prompt, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)))
    assert "".join(c.text for c in chunks) == text
    assert sum((c.token_ids for c in chunks), []) == full.outputs[0].token_ids
    assert chunks[-1].finish_reason == "length"


def test_abandoned_stream_frees_its_blocks(loaded):
    llm = paged(loaded)
    gen = llm.stream(ef.random_prompts(1, 40, 40)[0], SamplingParams(max_tokens=50, ignore_eos=True))
    next(gen)
    gen.close()
    assert llm.metrics.kv_blocks_used == 0 and not llm.engine.has_unfinished()


def test_torch_fallback_decode_path_equals_reference(loaded, reference):
    prompts = ef.random_prompts(10, 1, 120, seed=7)
    sp = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    llm = paged(loaded)
    llm.engine.runner.store.native_decode = False      # gather + SDPA, grouped by length
    llm.engine.runner.gather_cap = 256                  # force several decode groups
    assert tokens(llm.generate(prompts, sp)) == tokens(reference.generate(prompts, sp))


@pytest.mark.parametrize("kv_dtype,native", [("float16", True), ("int8", True), ("int8", False)])
def test_compressed_kv_cache_stays_close_to_reference(loaded, reference, kv_dtype, native):
    prompts = ef.random_prompts(8, 10, 100, seed=8)
    sp = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    llm = paged(loaded, kv_dtype=kv_dtype)
    llm.engine.runner.store.native_decode &= native
    out = llm.generate(prompts, sp)
    ref = reference.generate(prompts, sp)
    # fp16 K/V round at ~1e-3 relative, int8 at ~4e-3 of each row's largest value; greedy
    # paths may part only at near-ties
    agree = sum(a.outputs[0].token_ids[:4] == b.outputs[0].token_ids[:4] for a, b in zip(out, ref))
    assert agree >= 6


def test_int8_kv_nearly_doubles_the_tokens_a_pool_holds():
    from memlm.kv.store import KVStore
    args = (30, 16, 3, 64)                    # SmolLM2's attention layers, block, KV heads, head
    assert KVStore.bytes_per_block(*args, dtype=torch.int8) == 30 * 2 * 16 * 3 * (64 + 4)
    assert KVStore.bytes_per_block(*args, dtype=torch.int8) / KVStore.bytes_per_block(*args, dtype=torch.float16) == 68 / 128


def test_bf16_weight_codec_halves_weights_and_stays_close(loaded, reference):
    from memlm.loading.base import LoadedModel
    from memlm.models.transformer import Transformer
    copy = Transformer(loaded.config).eval().requires_grad_(False)
    copy.load_state_dict(loaded.model.state_dict())
    lm = LoadedModel(loaded.config, copy, loaded.tokenizer, "random", "memlm", copy.weight_bytes())
    llm = paged(lm, dtype="bfloat16")
    assert lm.weight_bytes < 0.6 * loaded.weight_bytes
    prompts = ef.random_prompts(8, 10, 100, seed=10)
    sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    out, ref = llm.generate(prompts, sp), reference.generate(prompts, sp)
    assert sum(a.outputs[0].token_ids[:2] == b.outputs[0].token_ids[:2] for a, b in zip(out, ref)) >= 6


def test_kv_pool_never_exceeds_what_the_sequences_can_use(loaded):
    llm = LLM(loaded, engine="paged", verbose=False, memory_budget="4GiB", max_num_seqs=2)
    max_len = min(llm.max_model_len, loaded.config.max_position_embeddings)
    assert llm.metrics.num_kv_blocks == 2 * -(-max_len // 16)


def test_heap_is_trimmed_when_rss_nears_the_budget(loaded, monkeypatch):
    """Between steps, RSS above budget - margin - half the workspace trims the heap (every step,
    not only every TRIM_EVERY_STEPS); below it the heap keeps its freed activations."""
    from memlm.engine import llm_engine
    from memlm.memory.plan import TRIM_ROOM
    llm = LLM(loaded, engine="paged", verbose=False, memory_budget="4GiB", max_num_seqs=2)
    plan, eng = llm.engine.plan, llm.engine
    assert eng._trim_above == plan.total - plan.margin - int(plan.workspace * TRIM_ROOM)
    trims = []
    monkeypatch.setattr(llm_engine.mem, "release_free_heap", lambda: trims.append(1))
    sp = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    llm.generate(ef.random_prompts(2, 4, 8, seed=1), sp)
    assert trims == []                                   # far below a 4 GiB budget
    monkeypatch.setattr(eng, "_trim_above", 0)
    steps = llm.metrics.num_steps
    llm.generate(ef.random_prompts(2, 4, 8, seed=1), sp)
    assert len(trims) == llm.metrics.num_steps - steps > 0


def test_reference_engine_runs_bf16_models(loaded):
    """dtype="bfloat16" with the reference engine: bf16 q/k/v into its fp32 cache (this raised a
    dtype mismatch in SDPA); greedy first tokens mostly agree with the fp32 reference."""
    sp = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    prompts = ef.random_prompts(3, 4, 20, seed=5)
    def fresh():                          # the bf16 codec rewrites a model in place
        return ef.tiny_loaded(loaded.config, seed=3)
    bf16 = LLM(fresh(), engine="reference", dtype="bfloat16", verbose=False).generate(prompts, sp)
    assert all(len(o.outputs[0].token_ids) == 6 for o in bf16)
    fp32 = LLM(fresh(), engine="reference", verbose=False).generate(prompts, sp)
    assert sum(a.outputs[0].token_ids[0] == b.outputs[0].token_ids[0] for a, b in zip(bf16, fp32)) >= 2
