"""Native kernels and the bf16 weight codec against plain torch: decode attention over paged KV,
the fused elementwise ops (native and fallback), prepacked bf16 weights, the fused layer."""
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
import engine_fakes as ef  # noqa: E402
from engine_fakes import one_torch_thread  # noqa: E402,F401  (autouse)

from memlm.memory import fused_ops, paged_attention  # noqa: E402
from memlm.memory.weights import Bf16Linear, _CastCache, num_parameters, use_bf16_matmuls, weight_bytes  # noqa: E402,E501
from memlm.models.kv import DenseView  # noqa: E402

needs_attention_kernel = pytest.mark.skipif(not paged_attention.available(),
                                            reason="no C compiler / MEMLM_NATIVE=0")
needs_fused_kernels = pytest.mark.skipif(not fused_ops.available(), reason="no C compiler / MEMLM_NATIVE=0")


@needs_attention_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.int8])
@pytest.mark.parametrize("B,nh,nkv,hd,bs", [(1, 6, 2, 16, 4), (5, 6, 2, 16, 4), (40, 6, 2, 16, 4),
                                            (7, 4, 4, 16, 4), (3, 9, 3, 64, 16), (9, 9, 3, 64, 16),
                                            (4, 4, 4, 64, 16), (2, 10, 1, 64, 16)])
def test_decode_attention_matches_dense_softmax(dtype, B, nh, nkv, hd, bs):
    """Both task layouts (one KV head per task for few sequences, whole rows for many), GQA and
    MHA, the generic and the head-64 / block-16 kernels (AVX-512 where built, and its fallback
    for more than 8 query heads per KV head), shuffled block tables, lengths that end mid-block."""
    g = torch.Generator().manual_seed(B * 10 + nh)
    num_blocks = 800
    if dtype == torch.int8:
        kc = torch.randint(-127, 128, (num_blocks * bs, nkv, hd), generator=g, dtype=torch.int8)
        vc = torch.randint(-127, 128, (num_blocks * bs, nkv, hd), generator=g, dtype=torch.int8)
        ks, vs = torch.rand(num_blocks * bs, nkv, generator=g) / 60, torch.rand(num_blocks * bs, nkv, generator=g) / 60
    else:
        kc = torch.randn(num_blocks * bs, nkv, hd, generator=g).to(dtype)
        vc = torch.randn(num_blocks * bs, nkv, hd, generator=g).to(dtype)
        ks = vs = None
    lens = torch.randint(1, 15 * bs, (B,), generator=g)
    max_nb = int(-(-lens.max() // bs))
    tables = torch.randperm(num_blocks, generator=g)[:B * max_nb].view(B, max_nb)
    q = torch.randn(B, nh, hd, generator=g)
    out = paged_attention.decode_attention(q, kc, vc, tables, lens, bs, ks, vs)
    kf = kc.float() if ks is None else kc.float() * ks[..., None]
    vf = vc.float() if vs is None else vc.float() * vs[..., None]
    for b in range(B):
        slots = (tables[b, :, None] * bs + torch.arange(bs)).flatten()[:lens[b]]
        k = kf[slots].transpose(0, 1).repeat_interleave(nh // nkv, 0)   # (nh, L, hd)
        v = vf[slots].transpose(0, 1).repeat_interleave(nh // nkv, 0)
        p = torch.softmax(q[b, :, None] @ k.transpose(1, 2) * hd ** -0.5, dim=-1)
        torch.testing.assert_close(out[b], (p @ v)[:, 0], rtol=1e-4, atol=1e-5)


def _rope_ref(t, n, hd, cos, sin):
    x = t[:, :n * hd].float().view(t.shape[0], n, hd)
    half = hd // 2
    rot = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None] + rot * sin[:, None]


@pytest.mark.parametrize("native", [True, False])
def test_fused_ops_match_unfused_math(native, monkeypatch):
    if native and not fused_ops.available():
        pytest.skip("no C compiler / MEMLM_NATIVE=0")
    if not native:
        monkeypatch.setattr(fused_ops, "_native", lambda *t: False)
    g = torch.Generator().manual_seed(0)
    M, H, I, hd = 37, 48, 80, 16
    x, w = torch.randn(M, H, generator=g), torch.randn(H, generator=g)
    y = torch.randn(M, H, generator=g).bfloat16()
    tol = dict(rtol=1.6e-2, atol=1e-2)                      # one bf16 rounding of the result

    torch.testing.assert_close(fused_ops.rms_norm_bf16(x, w, 1e-5).float(),
                               F.rms_norm(x, (H,), w, 1e-5), **tol)
    s, n = fused_ops.add_rms_norm_bf16(x, y, w, 1e-5)
    torch.testing.assert_close(s, x + y.float())
    torch.testing.assert_close(n.float(), F.rms_norm(x + y.float(), (H,), w, 1e-5), **tol)

    gu = (torch.randn(M, 2 * I, generator=g) * 3).bfloat16()
    gate, up = gu.float().chunk(2, dim=-1)
    torch.testing.assert_close(fused_ops.silu_mul_bf16(gu).float(), F.silu(gate) * up, **tol)

    wide = torch.randn(M, 5 * hd + 3, generator=g).bfloat16()[:, :4 * hd + 8]   # strided rows
    before = wide.clone()
    ang = torch.randn(M, hd // 2, generator=g)
    cos, sin = torch.cat((ang, ang), -1).cos(), torch.cat((ang, ang), -1).sin()
    fused_ops.rope_bf16_(wide, 3, hd, cos, sin)
    torch.testing.assert_close(wide[:, :3 * hd].float().view(M, 3, hd), _rope_ref(before, 3, hd, cos, sin), **tol)
    assert torch.equal(wide[:, 3 * hd:], before[:, 3 * hd:])                     # other heads untouched


def test_bf16_linear_packed_equals_dense():
    g = torch.Generator().manual_seed(1)
    lin = torch.nn.Linear(40, 72, bias=True)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(72, 40, generator=g))
    layer = Bf16Linear(lin.weight, lin.bias, _CastCache())
    x = torch.randn(5, 40, generator=g)
    expected = F.linear(x.bfloat16(), lin.weight.bfloat16()).float() + lin.bias
    torch.testing.assert_close(layer(x), expected, rtol=1e-2, atol=1e-2)
    assert (layer.packed is None) == (layer.weight is not None)     # exactly one copy is held
    dense = Bf16Linear(lin.weight, lin.bias, _CastCache(), pack=False)  # what a GPU-bound model gets
    assert dense.packed is None and dense.weight.dtype == torch.bfloat16
    torch.testing.assert_close(dense(x), layer(x), rtol=0, atol=0)


def test_fused_bf16_layers_stay_close_to_fp32():
    """The whole codec on a tiny Llama (fused q/k/v, gate/up, fused layer forward) vs fp32."""
    loaded = ef.tiny_loaded(ef.llama_config(), seed=5)
    model = loaded.model
    ids = torch.randint(0, model.cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(2))
    fp32_bytes, params = model.weight_bytes(), model.num_parameters()
    with torch.inference_mode():
        ref = model.forward_dense(ids)
        use_bf16_matmuls(model)
        assert 0.45 * fp32_bytes < weight_bytes(model) < 0.55 * fp32_bytes   # packed copies counted
        assert num_parameters(model) == params
        assert all(layer.attn.qkv_proj is not None and "forward" in vars(layer) for layer in model.layers)
        out = model.forward_dense(ids)
    assert out.dtype == torch.float32
    rel = (out - ref).norm() / ref.norm()
    assert rel < 3e-2, rel


def test_bf16_linear_fused_bias_and_gelu_post_op():
    g = torch.Generator().manual_seed(3)
    w, b = torch.randn(96, 32, generator=g) * 0.2, torch.randn(96, generator=g)
    layer = Bf16Linear(w, b, _CastCache(), out_dtype=torch.bfloat16)
    if layer.packed is None:
        pytest.skip("oneDNN weight packing is not available here")
    x = torch.randn(7, 32, generator=g)
    expected = F.linear(x.bfloat16().float(), w.bfloat16().float(), b)
    torch.testing.assert_close(layer(x).float(), expected, rtol=2e-2, atol=2e-2)
    layer.post_op = ("gelu", "tanh")
    torch.testing.assert_close(layer(x).float(), F.gelu(expected, approximate="tanh"), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("tie", [True, False])
def test_bf16_logits_recompute_the_top_candidates_in_fp32(tie):
    """bf16 matmul output rounds logits to a coarse step; the top REFINE_TOP of each row must be
    the fp32 dot products of the unrounded hidden state with the (bf16) head rows."""
    from memlm.memory import weights
    loaded = ef.tiny_loaded(ef.llama_config(tie_word_embeddings=tie), seed=7)
    model = use_bf16_matmuls(loaded.model)
    hidden = torch.randn(5, model.cfg.hidden_size, generator=torch.Generator().manual_seed(4)) * 8
    with torch.inference_mode():
        logits = model.compute_logits(hidden)
    head = model.embed.weight if tie else model.lm_head.weight
    exact = hidden @ head.float().T
    top = logits.topk(weights.REFINE_TOP, dim=-1).indices
    torch.testing.assert_close(logits.gather(1, top), exact.gather(1, top), rtol=1e-5, atol=1e-4)
    assert torch.equal(logits.argmax(-1), exact.argmax(-1))


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("n,V", [(0, 100), (1, 37), (5, 1000), (3, 16)])
def test_bf16_logits_refine_widens_and_recomputes_each_rows_top_k(native, n, V, monkeypatch):
    """Entries strictly above a row's k-th largest bf16 value are exact fp32 dot products,
    exactly k entries are recomputed (ties at the k-th place may pick either), the rest are the
    bf16 values widened."""
    if native and not fused_ops.available():
        pytest.skip("no C compiler / MEMLM_NATIVE=0")
    if not native:
        monkeypatch.setattr(fused_ops, "_native", lambda *t: False)
    g = torch.Generator().manual_seed(n * 1000 + V)
    H, k = 48, min(16, V)
    hidden = torch.randn(n, H, generator=g) * 4
    w = torch.randn(V, H, generator=g).to(torch.bfloat16)
    exact = hidden @ w.float().T
    y = exact.to(torch.bfloat16)
    out = fused_ops.bf16_logits_refine(y, hidden, w, k)
    assert out.shape == (n, V) and out.dtype == torch.float32
    widened = y.float()
    for r in range(n):
        changed = out[r] != widened[r]
        refined = changed | (out[r] == exact[r])
        kth = widened[r].topk(k).values[-1]
        above = widened[r] > kth
        torch.testing.assert_close(out[r][above], exact[r][above], rtol=1e-5, atol=1e-5)
        assert int(changed.sum()) <= k and bool(refined[above].all())
        assert torch.equal(out[r][~refined], widened[r][~refined])


@pytest.mark.parametrize("native", [True, False])
def test_row_argmax_is_torch_argmax(native, monkeypatch):
    """First maximum per row, ties across and within vector lanes, NaN as the maximum, -inf rows,
    widths below, at and off the 16-lane vector."""
    if native and not fused_ops.available():
        pytest.skip("no C compiler / MEMLM_NATIVE=0")
    if not native:
        monkeypatch.setattr(fused_ops, "_native", lambda *t: False)
    g = torch.Generator().manual_seed(3)
    cases = [torch.randn(n, V, generator=g) for n, V in ((64, 4099), (3, 17), (5, 16), (2, 1))]
    cases.append(torch.randint(0, 3, (50, 100), generator=g).float())
    special = torch.randn(6, 100, generator=g)
    special[1, 40] = special[5, 99] = float("nan")
    special[3, 7] = float("inf")
    special[4] = float("-inf")
    cases.append(special)
    for x in cases:
        assert torch.equal(fused_ops.row_argmax(x), x.argmax(-1))
