"""KV codecs (fp32 / fp16 / bf16 / int8 / KIVI int4, int2), the fp16 window of partial blocks,
decode attention over each codec (native kernel and torch reference), the engine with them."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import engine_fakes as ef

from memlm import LLM, SamplingParams
from memlm.kernels import attention_kivi
from memlm.kv import codecs
from memlm.kv.store import KVStore

ROOT = Path(__file__).resolve().parents[1]
ALL = ["fp32", "fp16", "bf16", "int8", "int4", "int2"]


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def filled_store(name, L, nkv=2, hd=64, bs=16, table=(5, 2, 9, 0, 7, 3, 11), steps=None, seed=0, stages=4):
    """A one-layer store holding L random tokens at `table`'s blocks, written as one 20-token
    prefill chunk then one token per step (so the last block is partial when L % bs)."""
    st = KVStore((0,), 12, bs, nkv, hd, name, window_stages=stages)
    k, v = randn(L, nkv, hd, seed=seed) * 2 + 0.5, randn(L, nkv, hd, seed=seed + 1)
    table = torch.tensor(table[:-(-L // bs)])
    slots = (table[:, None] * bs + torch.arange(bs)).flatten()[:L]
    cuts = steps or [0, min(L, 20), *range(21, L + 1)]
    for a, b in zip(cuts, cuts[1:]):
        st.write(0, slots[a:b].clone(), k[a:b], v[a:b])
    return st, k, v, table


def exact_attention(q, k, v):
    """q (nh, hd), k, v (L, nkv, hd) -> (nh, hd) fp32."""
    g = q.shape[0] // k.shape[1]
    kr, vr = k.transpose(0, 1).repeat_interleave(g, 0), v.transpose(0, 1).repeat_interleave(g, 0)
    p = torch.softmax((q[:, None] @ kr.transpose(1, 2))[:, 0] * q.shape[1] ** -0.5, dim=-1)   # (nh, L)
    return (p[:, None] @ vr)[:, 0]


def test_pack_unpack_round_trip():
    for bits in (4, 2):
        codes = torch.randint(0, 1 << bits, (3, 5, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(bits))
        packed = codecs.pack(codes, bits)
        assert packed.shape == (3, 5, 32 * bits // 8) and torch.equal(codecs.unpack(packed, bits), codes)
    # the documented bit order: int4 byte = c0 | c1 << 4, int2 byte = c0 | c1 << 2 | c2 << 4 | c3 << 6
    assert codecs.pack(torch.tensor([[1, 2]], dtype=torch.uint8), 4).item() == 0x21
    assert codecs.pack(torch.tensor([[1, 2, 3, 0]], dtype=torch.uint8), 2).item() == 0b00111001


@pytest.mark.parametrize("name", ALL)
def test_round_trip_error_bounds(name):
    L, bs = 80, 16                                     # five whole blocks: every block encoded
    st, k, v, table = filled_store(name, L)
    kk, vv = st.gather_kv(0, table[None])              # (1, nkv, L, hd)
    got_k, got_v = kk[0].transpose(0, 1), vv[0].transpose(0, 1)
    if name in ("fp32",):
        assert torch.equal(got_k, k) and torch.equal(got_v, v)
        return
    if name in ("fp16", "bf16"):
        rel = 2 ** -11 if name == "fp16" else 2 ** -8
        assert ((got_k - k).abs() <= rel * k.abs() + 1e-7).all() and ((got_v - v).abs() <= rel * v.abs() + 1e-7).all()
        return
    if name == "int8":                                  # half a step of max|row| / 127
        for x, y in ((k, got_k), (v, got_v)):
            step = x.abs().amax(-1, keepdim=True) / 127
            assert ((y - x).abs() <= step / 2 * 1.001 + 1e-6).all()
        return
    levels = (1 << codecs.dtypes.BITS[name]) - 1
    kb = k.view(-1, bs, *k.shape[1:])                                       # keys: per channel and block
    kstep = (kb.amax(1, keepdim=True) - kb.amin(1, keepdim=True)) / levels
    assert ((got_k.view_as(kb) - kb).abs() <= kstep * 0.502 + 2e-3).all()
    group = codecs.value_group(name, 64)
    vg = v.view(L, 2, -1, group)                                            # values: per token and group
    vstep = (vg.amax(-1, keepdim=True) - vg.amin(-1, keepdim=True)) / levels
    assert ((got_v.view_as(vg) - vg).abs() <= vstep * 0.502 + 2e-3).all()


def test_bytes_per_token_are_exact_and_meet_the_ratios():
    nkv, hd, bs = 3, 64, 16                            # SmolLM2-135M's KV shape
    per = {n: codecs.bytes_per_token(n, bs, nkv, hd) for n in ALL}
    assert per == {"fp32": 1536, "fp16": 768, "bf16": 768, "int8": 408,
                   "int4": 192 + 48 + 12, "int2": 96 + 48 + 24}
    assert per["fp32"] / per["int8"] >= 3.5 and per["fp32"] / per["int4"] >= 6 and per["fp32"] / per["int2"] >= 9
    for n in ALL:                                      # the store's tensors are exactly that
        st = KVStore((0, 1), 10, bs, nkv, hd, n, window_stages=2)
        kivi = n in ("int4", "int2")
        assert st.codec.nbytes == 2 * 10 * bs * per[n]
        window = KVStore.window_bytes(2, 2, bs, nkv, hd, n)
        assert window == (2 * 2 * 2 * bs * nkv * hd * 2 if kivi else 0)      # layers, K/V, stages, fp16
        assert st.nbytes == 10 * KVStore.bytes_per_block(2, bs, nkv, hd, n) + window   # + int32 stage map


def test_partial_block_lives_in_the_window_until_it_fills():
    st, k, v, table = filled_store("int4", 37)          # blocks 5, 2 encoded; block 9 holds 5 tokens
    stage = int(st.window.stage_of_block[9])
    assert stage >= 0 and (st.window.stage_of_block >= 0).sum() == 1
    kk, vv = st.gather_kv(0, table[None])
    assert torch.equal(kk[0, :, 32:37].transpose(0, 1), k[32:37].half().float())     # fp16, not codes
    slots = (9 * 16 + torch.arange(5, 16))
    st.write(0, slots, randn(11, 2, 64, seed=5), randn(11, 2, 64, seed=6))          # fills block 9
    assert (st.window.stage_of_block < 0).all() and len(st.window._free) == st.window.num_stages
    kk, _ = st.gather_kv(0, table[None])
    err = (kk[0, :, 32:37].transpose(0, 1) - k[32:37]).abs()
    assert 0 < err.max() < 0.6                          # now 4-bit codes of the whole block


def test_full_window_flushes_the_oldest_stage_and_reopens_it():
    bs, nkv, hd = 16, 1, 32
    st = KVStore((0,), 8, bs, nkv, hd, "int4", window_stages=2)
    data = {b: (randn(bs, nkv, hd, seed=b), randn(bs, nkv, hd, seed=b + 50)) for b in (1, 2, 3)}

    def put(b, lo, hi):
        st.write(0, torch.arange(b * bs + lo, b * bs + hi), data[b][0][lo:hi], data[b][1][lo:hi])
    put(1, 0, 4)
    put(2, 0, 4)
    put(3, 0, 4)                                        # no stage free: block 1 (oldest) is flushed
    assert int(st.window.stage_of_block[1]) == -1 and int(st.window.stage_of_block[3]) >= 0
    put(1, 4, 16)                                       # block 1 reopens from its codes and fills
    kk, vv = st.gather_kv(0, torch.tensor([[1]]))
    k1 = data[1][0]
    assert (kk[0].transpose(0, 1) - k1).abs().max() < 0.8 and (st.window.stage_of_block[1] == -1)
    # reopening block 1 took the stage of block 2 (now the oldest); block 3 is still fp16
    assert int(st.window.stage_of_block[2]) == -1 and int(st.window.stage_of_block[3]) >= 0
    assert torch.equal(st.gather_kv(0, torch.tensor([[3]]))[0][0, :, :4].transpose(0, 1), data[3][0][:4].half().float())
    assert (st.gather_kv(0, torch.tensor([[2]]))[0][0, :, :4].transpose(0, 1) - data[2][0][:4]).abs().max() < 0.8


def test_export_import_keeps_partial_blocks():
    src, k, v, table = filled_store("int4", 37)
    blocks = table.tolist()
    blob = src.export_blocks(blocks)                    # the partial block is encoded first
    assert (src.window.stage_of_block < 0).all()
    dst = KVStore((0,), 12, 16, 2, 64, "int4", window_stages=4)
    dst.import_blocks([0, 1, 2], blob)
    a, b = src.gather_kv(0, table[None]), dst.gather_kv(0, torch.tensor([[0, 1, 2]]))
    assert torch.equal(a[0][:, :, :37], b[0][:, :, :37]) and torch.equal(a[1][:, :, :37], b[1][:, :, :37])


# relative error of the output (Frobenius) on Gaussian K/V, the codecs' worst case (no outlier
# channels for per-channel keys to exploit); the kernels are held to the reference exactly
@pytest.mark.parametrize("name,tol", [("fp32", 1e-5), ("fp16", 2e-3), ("int8", 3e-2), ("int4", 0.16), ("int2", 0.85)])
@pytest.mark.parametrize("L,nh,nkv,hd", [(37, 6, 2, 64), (16, 2, 1, 24), (5, 4, 4, 8), (61, 4, 2, 16)])
def test_decode_attention_close_to_fp32_native_and_reference(name, tol, L, nh, nkv, hd):
    if name in ("int4", "int2") and hd % (8 // codecs.dtypes.BITS[name]):
        pytest.skip("head size not packable")
    st, k, v, table = filled_store(name, L, nkv=nkv, hd=hd)
    q = randn(1, nh, hd, seed=9)
    exact = exact_attention(q[0], k, v)
    lens = torch.tensor([L])
    keys, vals = st.gather_kv(0, table[None])
    g = nh // nkv                                       # the torch path: gather + SDPA (PagedView's)
    sdpa = torch.nn.functional.scaled_dot_product_attention(
        q.view(1, nkv, g, hd), keys[:, :, :L], vals[:, :, :L]).reshape(nh, hd)
    assert (sdpa - exact).norm() / exact.norm() < tol
    if name in ("int4", "int2"):
        c, w = st.codec, st.window
        args = (q, c.codes[0, 0], c.codes[0, 1], c.key_params(0), c.v_params[0, 0], w.kv[0, 0], w.kv[0, 1],
                w.stage_of_block, table[None], lens, 16, c.bits, c.group)
        ref = attention_kivi.decode_attention_reference(*args)
        torch.testing.assert_close(ref[0], sdpa, rtol=1e-5, atol=1e-5)
        if attention_kivi.available():
            torch.testing.assert_close(attention_kivi.decode_attention(*args), ref, rtol=1e-5, atol=2e-5)
    if st.native_decode:
        torch.testing.assert_close(st.decode_attention(0, q, table[None], lens)[0], sdpa, rtol=1e-4, atol=2e-4)


def test_kivi_kernel_batches_sequences_of_mixed_lengths():
    if not attention_kivi.available():
        pytest.skip("no C compiler / MEMLM_NATIVE=0")
    st = KVStore((0,), 16, 16, 2, 64, "int4", window_stages=4)
    tables = torch.tensor([[0, 1, 2], [3, 4, 0], [5, 0, 0]])
    lens = torch.tensor([40, 32, 3])
    for b, L in enumerate(lens.tolist()):
        slots = (tables[b, :, None] * 16 + torch.arange(16)).flatten()[:L]
        st.write(0, slots, randn(L, 2, 64, seed=b), randn(L, 2, 64, seed=b + 10))
    q = randn(3, 8, 64, seed=4)
    c, w = st.codec, st.window
    args = (q, c.codes[0, 0], c.codes[0, 1], c.key_params(0), c.v_params[0, 0], w.kv[0, 0], w.kv[0, 1],
            w.stage_of_block, tables, lens, 16, 4, c.group)
    torch.testing.assert_close(attention_kivi.decode_attention(*args),
                               attention_kivi.decode_attention_reference(*args), rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("name", ["int4", "int2"])
def test_kivi_mass_from_the_kernel_equals_the_reference_and_the_gathered_softmax(name):
    st = KVStore((0,), 16, 16, 2, 64, name, window_stages=4)
    tables = torch.tensor([[0, 1, 2], [3, 4, 0], [5, 0, 0]])
    lens = torch.tensor([40, 32, 3])                       # partial (staged) and whole blocks
    for b, L in enumerate(lens.tolist()):
        slots = (tables[b, :, None] * 16 + torch.arange(16)).flatten()[:L]
        st.write(0, slots, randn(L, 2, 64, seed=b), randn(L, 2, 64, seed=b + 10))
    q = randn(3, 8, 64, seed=4)
    c, w = st.codec, st.window
    args = (q, c.codes[0, 0], c.codes[0, 1], c.key_params(0), c.v_params[0, 0], w.kv[0, 0], w.kv[0, 1],
            w.stage_of_block, tables, lens, 16, c.bits, c.group)
    want = torch.ones(3, 2, 48)                            # mass accumulates
    out = attention_kivi.decode_attention_reference(*args, mass=want)
    keys, _ = st.gather_kv(0, tables)                      # (B, nkv, 48, hd), decoded
    for b, L in enumerate(lens.tolist()):
        p = torch.softmax(q[b].view(2, 4, 64) @ keys[b, :, :L].transpose(1, 2) / 8, -1)   # (nkv, 4, L)
        torch.testing.assert_close(want[b, :, :L] - 1, p.sum(1), rtol=1e-5, atol=1e-6)
        assert bool((want[b, :, L:] == 1).all())           # nothing past a sequence's length
    if attention_kivi.available():
        got = torch.ones(3, 2, 48)
        torch.testing.assert_close(attention_kivi.decode_attention(*args, mass=got), out, rtol=1e-5, atol=2e-5)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=2e-6)
        with pytest.raises(ValueError, match="mass must be a contiguous fp32"):
            attention_kivi.decode_attention(*args, mass=torch.zeros(3, 2, 16))


@pytest.fixture(scope="module")
def tiny():
    return ef.tiny_loaded(ef.llama_config(hidden_size=128, num_heads=4, num_kv_heads=2), seed=3)


@pytest.mark.parametrize("kv_dtype,native,min_same", [("int4", True, 0.9), ("int4", False, 0.9),
                                                      ("int2", True, 0.5), ("int2", False, 0.5)])
def test_engine_generates_with_kivi_kv(tiny, kv_dtype, native, min_same):
    prompts = ef.random_prompts(6, 5, 70, seed=1)
    sp = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    ref = [o.outputs[0].token_ids for o in LLM(tiny, engine="reference").generate(prompts, sp)]
    llm = LLM(tiny, engine="paged", verbose=False, num_kv_blocks=64, max_num_batched_tokens=48,
              max_num_seqs=8, kv_dtype=kv_dtype)
    llm.engine.runner.store.native_decode &= native
    out = llm.generate(prompts, sp)
    got = [o.outputs[0].token_ids for o in out]
    same = sum(a == b for x, y in zip(got, ref) for a, b in zip(x, y)) / sum(map(len, ref))
    assert all(o.outputs[0].finish_reason == "length" and len(o.outputs[0].token_ids) == 24 for o in out)
    assert same >= min_same and llm.metrics.kv_blocks_used == 0


def test_memory_plan_counts_the_window(tiny):
    llm = LLM(tiny, engine="paged", verbose=False, memory_budget="1GiB", max_num_seqs=4, kv_dtype="int4")
    plan, store = llm.engine.plan, llm.engine.runner.store
    assert plan.kv_dtype == "int4" and plan.kv_window == store.window.nbytes > 0
    assert plan.kv_pool + plan.kv_window == store.nbytes and "KV fp16 window" in plan.describe()
    assert store.window.num_stages == 5
    explicit = LLM(tiny, engine="paged", verbose=False, num_kv_blocks=32, kv_dtype="int2")
    assert explicit.engine.plan.num_blocks == 32        # the window never eats an explicit pool


def test_native_off_uses_the_kivi_reference():
    script = """
import sys; sys.path.insert(0, "tests")
import torch, engine_fakes as ef
from memlm import LLM, SamplingParams
from memlm.kernels import attention_kivi
assert not attention_kivi.available()
llm = LLM(ef.tiny_loaded(ef.llama_config(), seed=3), engine="paged", verbose=False, num_kv_blocks=32,
          max_num_batched_tokens=32, kv_dtype="int4")
assert not llm.engine.runner.store.native_decode
out = llm.generate([{"prompt_token_ids": list(range(40))}], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
assert len(out[0].outputs[0].token_ids) == 8
print("kivi fallback ok")
"""
    env = {**os.environ, "MEMLM_NATIVE": "0"}
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and "kivi fallback ok" in done.stdout, done.stderr


def test_bad_head_size_for_int2_is_one_clear_error():
    with pytest.raises(ValueError, match="kv_dtype int2 needs a head size divisible by 4"):
        KVStore((0,), 4, 16, 1, 6, "int2")
    with pytest.raises(ValueError, match="kv_dtype must be one of"):
        KVStore((0,), 4, 16, 1, 8, "int3")
