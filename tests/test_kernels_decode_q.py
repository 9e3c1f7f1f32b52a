"""The 8-bit-activation block kernels (csrc/decode_q.c): `qmatmul` through `gemv.block_matmul`
and the two fused decoder steps (`memlm.kernels.block_layer`) against dequantize-then-matmul
in fp32, within the bound that rounding x to 8 bits per block of 32 allows, over odd shapes
(K not a multiple of 32, an odd number of blocks, odd N, 1..8 rows and more); the whole layer
step (`decode_layers`: both steps around the cache write and the native paged attention) against
the fp32 layer; and a block-weight model whose decode steps take the fused path (and, in the
engine, the whole layer step) giving the per-projection path's tokens."""
import pytest
import torch
import torch.nn.functional as F

from helpers import random_rope

from memlm.kernels import block_layer, gemv

pytestmark = pytest.mark.skipif(gemv.DECODE_LIBRARY.lib is None, reason="no C compiler / MEMLM_NATIVE=0")


@pytest.fixture(autouse=True)
def int8_on(monkeypatch):
    monkeypatch.setenv("MEMLM_INT8_ACTIVATIONS", "1")    # the plain C path where VNNI is missing


def rounding_bound(x: torch.Tensor, held: gemv.BlockWeight) -> torch.Tensor:
    """|y - x W^T| <= sum over blocks of max|x_block| / 254 * sum |w_block| (+ fp32 sums)."""
    kp = held.padded_in
    xp = F.pad(x.double(), (0, kp - x.shape[1]))
    w = F.pad(gemv.dequantize(held).double(), (0, kp - held.in_features)).abs()
    g = kp // gemv.QK
    amax = xp.view(x.shape[0], g, gemv.QK).abs().amax(-1)                     # (M, G)
    return amax / 254 @ w.view(w.shape[0], g, gemv.QK).sum(-1).t() + 1e-5 * (1 + w.sum(1))


@pytest.mark.parametrize("codec", gemv.CODECS)
@pytest.mark.parametrize("n, k, m", [(1, 32, 1), (7, 64, 1), (33, 96, 5), (17, 50, 8), (40, 128, 3),
                                     (9, 1000, 2), (64, 576, 4), (5, 160, 7)])
def test_qmatmul_is_within_the_activation_rounding_bound(codec, n, k, m):
    torch.manual_seed(n * k + m)
    held = gemv.quantize(torch.randn(n, k) * torch.rand(n, 1), codec)
    x = torch.randn(m, k) * torch.rand(1, k) * 4
    assert gemv.int8_activations()
    y = gemv.block_matmul(x, held)
    exact = x.double() @ gemv.dequantize(held).double().t()
    err = (y.double() - exact).abs()
    assert y.shape == (m, n) and y.dtype == torch.float32
    assert bool((err <= rounding_bound(x, held)).all()), float((err / rounding_bound(x, held)).max())
    assert float(err.max()) > 0          # it did round: this is not the fp32 kernel


def test_zero_rows_more_rows_the_head_and_the_switch(monkeypatch):
    held = gemv.quantize(torch.randn(8, 64), "q4_1")
    y = gemv.block_matmul(torch.zeros(2, 64), held)
    assert torch.equal(y, torch.zeros(2, 8))
    x = torch.randn(3, 64)               # the head: fp32 activations (more rows: test_kernels_gemm_q)
    torch.testing.assert_close(gemv.block_matmul(x, held, exact=True), x @ gemv.dequantize(held).t(),
                               rtol=1e-5, atol=1e-4)
    monkeypatch.setenv("MEMLM_INT8_ACTIVATIONS", "0")
    assert not gemv.int8_activations() and not block_layer.usable(1)
    x = torch.randn(1, 64)
    torch.testing.assert_close(gemv.block_matmul(x, held), x @ gemv.dequantize(held).t(), rtol=1e-5, atol=1e-4)


def _layer(codec, h=96, nh=3, nkv=1, hd=32, inter=160, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = lambda n, k: gemv.quantize(torch.randn(n, k, generator=g) * 0.2, codec)
    return dict(qkv=q((nh + 2 * nkv) * hd, h), o=q(h, nh * hd), gu=q(2 * inter, h), down=q(h, inter),
                an=torch.rand(h, generator=g) + 0.5, mn=torch.rand(h, generator=g) + 0.5, nh=nh, nkv=nkv, hd=hd)


@pytest.mark.parametrize("codec", gemv.CODECS)
@pytest.mark.parametrize("m", [1, 3, 8])
@pytest.mark.parametrize("rope, bias", [(True, False), (True, True), (False, False)])
def test_fused_attention_input_step(codec, m, rope, bias):
    p = _layer(codec)
    x = torch.randn(m, 96)
    n_rot = p["nh"] + p["nkv"]
    b = torch.randn(p["qkv"].out_features) if bias else None
    cos, sin = random_rope(m, p["hd"]) if rope else (None, None)
    y = block_layer.attn_in(x, p["an"], 1e-5, p["qkv"], b, cos, sin, n_rot, p["hd"])
    ref = block_layer.attn_in_reference(x, p["an"], 1e-5, p["qkv"], b, cos, sin, n_rot, p["hd"])
    assert y.dtype == torch.bfloat16 and y.shape == ref.shape
    h = F.rms_norm(x, (96,), p["an"], 1e-5)
    bound = rounding_bound(h, p["qkv"]).float()
    if rope:     # a rotation mixes outputs d and d + hd/2 of a head: each gets both bounds
        t = bound[:, :n_rot * p["hd"]].reshape(m, n_rot, 2, p["hd"] // 2)
        bound = torch.cat([t.sum(2, keepdim=True).expand_as(t).reshape(m, -1), bound[:, n_rot * p["hd"]:]], 1)
    tol = bound + ref.float().abs() * 2 ** -7                      # + bf16 rounding of the output
    assert bool(((y.float() - ref.float()).abs() <= tol).all())


@pytest.mark.parametrize("codec", gemv.CODECS)
@pytest.mark.parametrize("m", [1, 2, 8])
def test_fused_attention_output_and_mlp_step(codec, m):
    p = _layer(codec, seed=m)
    x = torch.randn(m, 96)
    attn = torch.randn(m, p["nh"] * p["hd"]).to(torch.bfloat16)
    ref = block_layer.attn_out_mlp_reference(x, attn, p["mn"], 1e-5, p["o"], p["gu"], p["down"])
    x_in = x.clone()
    y = block_layer.attn_out_mlp_(x_in, attn, p["mn"], 1e-5, p["o"], p["gu"], p["down"])
    assert y.data_ptr() == x_in.data_ptr()                                       # in place
    exact_delta = (ref - x).abs().amax()
    assert float((y - ref).abs().max()) <= 0.05 * float(exact_delta)   # 8-bit activations, 3 matmuls
    assert not torch.equal(y, x)


@pytest.fixture(scope="module")
def q4_1_file(tmp_path_factory):
    from gguf import GGMLQuantizationType as T
    from helpers import make_tiny_hf_llama, write_tiny_llama_gguf
    root = tmp_path_factory.mktemp("decode_q")
    names = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
    path = root / "tiny_q4_1.gguf"
    write_tiny_llama_gguf(path, make_tiny_hf_llama(root / "hf", tie=True),
                          types={f"{n}.weight": T.Q4_1 for n in names} | {"token_embd.weight": T.Q8_0})
    return path


@pytest.mark.parametrize("rows", [1, 5, 8])
def test_a_block_model_takes_the_fused_steps_and_computes_the_dequantized_model(q4_1_file, rows, monkeypatch):
    from memlm.loading import load_model
    kept, reference = load_model(q4_1_file, weight_dtype="int4").model, load_model(q4_1_file).model
    assert all(layer.block_step for layer in kept.layers)
    calls = []
    real = block_layer.attn_out_mlp_
    monkeypatch.setattr(block_layer, "attn_out_mlp_", lambda *a: calls.append(1) or real(*a))
    ids = torch.arange(3, 3 + rows).view(1, -1)
    with torch.inference_mode():
        a = kept.compute_logits(kept.forward_dense(ids)[0])
        b = reference.compute_logits(reference.forward_dense(ids)[0])
    assert len(calls) == len(kept.layers)
    # measured 1.5-3.3% (8-bit activations in every matmul, the head's too; the per-projection
    # bf16 path 0.7-1.2%) on this random model with K = 64 (two blocks per row)
    assert (a - b).norm() < 0.06 * b.norm()
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.8     # near-ties of a random model may flip
    monkeypatch.setenv("MEMLM_INT8_ACTIVATIONS", "0")                   # the per-projection path
    with torch.inference_mode():
        c = kept.compute_logits(kept.forward_dense(ids)[0])
    assert len(calls) == len(kept.layers) and (c - b).norm() < 0.03 * b.norm()


def _rope(y: torch.Tensor, cos, sin, n_rot: int, hd: int) -> torch.Tensor:
    m, half = y.shape[0], hd // 2
    t = y[:, :n_rot * hd].view(m, n_rot, hd)
    rotated = torch.cat((-t[..., half:], t[..., :half]), dim=-1)
    return torch.cat([(t * cos[:, None] + rotated * sin[:, None]).reshape(m, -1), y[:, n_rot * hd:]], dim=1)


@pytest.mark.parametrize("codec", gemv.CODECS)
@pytest.mark.parametrize("m", [1, 3, 8])
@pytest.mark.parametrize("cache_dtype, hd, bs", [(torch.float16, 64, 16), (torch.float32, 32, 8),
                                                 (torch.float16, 32, 4)])
def test_the_whole_layer_step_writes_the_cache_attends_and_matches_fp32(codec, m, cache_dtype, hd, bs):
    from memlm.kernels import attention
    if not attention.available():
        pytest.skip("no native attention kernel")
    nh, nkv, h = 4, 2, 128
    p = _layer(codec, h=h, nh=nh, nkv=nkv, hd=hd, inter=96, seed=m)
    g = torch.Generator().manual_seed(m)
    bias = torch.randn(p["qkv"].out_features, generator=g) * 0.1
    lens = torch.randint(1, 5 * bs, (m,), generator=g)
    max_nb = int((lens.max() + bs - 1) // bs)
    tables = torch.randperm(m * max_nb, generator=g).view(m, max_nb)       # scattered, disjoint blocks
    kc = (torch.randn(m * max_nb * bs, nkv, hd, generator=g)).to(cache_dtype)
    vc = (torch.randn(m * max_nb * bs, nkv, hd, generator=g)).to(cache_dtype)
    slots = torch.stack([tables[b, (lens[b] - 1) // bs] * bs + (lens[b] - 1) % bs for b in range(m)])
    x = torch.randn(m, h)
    cos, sin = random_rope(m, hd)
    # the fp32 reference: q|k|v, the new rows in the cache, attention, then o_proj and the MLP
    hn = F.rms_norm(x, (h,), p["an"], 1e-5)
    y = _rope(hn @ gemv.dequantize(p["qkv"]).t() + bias, cos, sin, nh + nkv, hd)
    q, k, v = y.split([nh * hd, nkv * hd, nkv * hd], dim=1)
    kr, vr = kc.float().clone(), vc.float().clone()
    kr[slots], vr[slots] = k.view(m, nkv, hd), v.view(m, nkv, hd)
    attn = attention.decode_attention_reference(q.reshape(m, nh, hd), kr, vr, tables, lens, bs)
    ref = block_layer.attn_out_mlp_reference(x, attn.reshape(m, -1), p["mn"], 1e-5, p["o"], p["gu"], p["down"])

    args = block_layer.layer_args(p["an"], 1e-5, p["qkv"], bias, p["mn"], 1e-5, p["o"], p["gu"], p["down"],
                                  nh, nkv, hd, True)
    direct = (kc.data_ptr(), vc.data_ptr(), int(cache_dtype == torch.float16), slots.data_ptr(),
              tables.data_ptr(), lens.data_ptr(), max_nb, bs, attention.kernel_address(cache_dtype, hd, bs))
    before_k, x0 = kc.clone(), x.clone()
    out = block_layer.decode_layers([args], x, (cos[:, None], sin[:, None]), lambda depth: direct)
    assert torch.equal(x, x0)                                          # the input stays
    # the new k / v rows went to their slots (8-bit activations, then the cache's rounding) ...
    bound = rounding_bound(hn, p["qkv"])[:, nh * hd:]
    t = bound[:, :nkv * hd].reshape(m, nkv, 2, hd // 2)              # RoPE mixes the two halves' bounds
    kb = t.sum(2, keepdim=True).expand_as(t).reshape(m, nkv, hd)
    tol_k = kb + k.view(m, nkv, hd).abs() * 2 ** -10 + 1e-6
    assert bool(((kc[slots].float() - k.view(m, nkv, hd)).abs() <= tol_k * 1.01).all())
    tol_v = bound[:, nkv * hd:].reshape(m, nkv, hd) + v.view(m, nkv, hd).abs() * 2 ** -10 + 1e-6
    assert bool(((vc[slots].float() - v.view(m, nkv, hd)).abs() <= tol_v * 1.01).all())
    others = torch.ones(kc.shape[0], dtype=torch.bool)
    others[slots] = False
    assert torch.equal(kc[others], before_k[others])                   # ... and nowhere else
    # ... and the layer's output is the fp32 layer's up to 8-bit activations in four matmuls
    assert float((out - ref).abs().max()) <= 0.05 * float((ref - x0).abs().max())


@pytest.mark.parametrize("kv_dtype", ["fp16", "fp32"])
def test_the_engine_decodes_through_the_whole_layer_step(q4_1_file, kv_dtype, monkeypatch):
    """Decode steps of a block model in the engine take `decode_layers` (one native call per
    layer) on a float cache and give the 3-call path's tokens: the same model and cache, other
    roundings."""
    from memlm import LLM
    from helpers import whole_layer_decodes
    llm = LLM(str(q4_1_file), kv_dtype=kv_dtype, max_num_seqs=4, verbose=False)
    fused, apart, steps = whole_layer_decodes(llm, monkeypatch)
    assert steps >= 5                                                  # every decode step
    same = sum(a == b for f, p in zip(fused, apart) for a, b in zip(f, p))
    assert same >= 0.8 * sum(map(len, fused)), (fused, apart)     # near-ties of a random model may flip
