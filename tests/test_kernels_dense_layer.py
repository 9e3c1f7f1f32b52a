"""The native bf16 decode kernels (csrc/decode_bf16.c through `memlm.kernels.dense_layer`):
`matmul` and the exact `head` against fp64 products of the same bf16 values, the two fused
decoder steps against their torch references (the same bf16 roundings) over odd shapes (K and
widths not multiples of 32, odd N, 1..8 rows and more), and a bf16 model whose decode steps take
the fused native path giving the torch path's logits and greedy tokens."""
import pytest
import torch

from helpers import random_rope

from memlm.kernels import dense_layer

pytestmark = pytest.mark.skipif(not dense_layer.available(), reason="no C compiler / MEMLM_NATIVE=0")


def _fp32_sum_bound(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """What fp32 sums of exact products can be off by: K ulps of sum |x_k w_k| (a loose bound)."""
    return (x.double().abs() @ w.double().abs().t()) * x.shape[1] * 2 ** -23 + 1e-30


@pytest.mark.parametrize("m, n, k", [(1, 1, 1), (1, 7, 33), (3, 13, 64), (5, 17, 100), (8, 9, 31),
                                     (4, 40, 576), (9, 5, 96), (13, 33, 160), (2, 3, 1537)])
def test_matmul_and_head_are_fp32_sums_of_exact_products(m, n, k):
    torch.manual_seed(m * 1000 + n * 10 + k)
    x = torch.randn(m, k) * torch.rand(1, k) * 3
    w = (torch.randn(n, k) * torch.rand(n, 1)).to(torch.bfloat16)
    y = dense_layer.matmul(x, w)
    xb = x.to(torch.bfloat16)
    exact = xb.double() @ w.double().t()             # bf16 x bf16 products are exact in fp32
    assert y.shape == (m, n) and y.dtype == torch.float32
    assert bool(((y.double() - exact).abs() <= _fp32_sum_bound(xb, w)).all())
    h = dense_layer.head(x, w)                       # x unrounded
    exact = x.double() @ w.double().t()
    assert bool(((h.double() - exact).abs() <= _fp32_sum_bound(x, w)).all())
    if not torch.equal(x, xb.float()):
        assert not torch.equal(h, y)                 # the head did not round x


def test_a_non_bf16_weight_is_refused():
    with pytest.raises(ValueError, match="contiguous 2-D bf16 CPU weight"):
        dense_layer.matmul(torch.randn(1, 4), torch.randn(3, 4))


def _layer(h=96, nh=3, nkv=1, hd=32, inter=160, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = lambda n, k: (torch.randn(n, k, generator=g) * 0.2).to(torch.bfloat16)
    return dict(qkv=w((nh + 2 * nkv) * hd, h), o=w(h, nh * hd), gu=w(2 * inter, h), down=w(h, inter),
                an=torch.rand(h, generator=g) + 0.5, mn=torch.rand(h, generator=g) + 0.5, nh=nh, nkv=nkv, hd=hd)


def _ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a - b| in units of b's bf16 spacing (one ulp: a neighbouring fp32 sum rounded the other way)."""
    spacing = torch.where(b.float() == 0, torch.full_like(b.float(), 2 ** -126),
                          2.0 ** (torch.floor(torch.log2(b.float().abs())) - 7))
    return (a.float() - b.float()).abs() / spacing


@pytest.mark.parametrize("m", [1, 3, 8])
@pytest.mark.parametrize("shape", [dict(), dict(h=70, nh=2, nkv=1, hd=22, inter=45)])
@pytest.mark.parametrize("rope, bias", [(True, False), (True, True), (False, False)])
def test_fused_attention_input_step_matches_its_reference(m, shape, rope, bias):
    p = _layer(**shape, seed=m)
    h = p["an"].shape[0]
    x = torch.randn(m, h)
    n_rot = p["nh"] + p["nkv"]
    b = torch.randn(p["qkv"].shape[0]).to(torch.bfloat16).float() if bias else None
    cos, sin = random_rope(m, p["hd"]) if rope else (None, None)
    y = dense_layer.attn_in(x, p["an"], 1e-5, p["qkv"], b, cos, sin, n_rot, p["hd"])
    ref = dense_layer.attn_in_reference(x, p["an"], 1e-5, p["qkv"], b, cos, sin, n_rot, p["hd"])
    assert y.dtype == torch.bfloat16 and y.shape == ref.shape == (m, p["qkv"].shape[0])
    # the same roundings; only fp32 summation order differs: a few values one bf16 step apart
    # (two after RoPE, which mixes two rounded values), the rest bit-identical
    assert float(_ulps(y, ref).max()) <= 2.01
    assert (y == ref).float().mean() >= 0.9


@pytest.mark.parametrize("m", [1, 2, 5, 8])
@pytest.mark.parametrize("shape", [dict(), dict(h=70, nh=2, nkv=1, hd=22, inter=45)])
def test_fused_attention_output_and_mlp_step_matches_its_reference(m, shape):
    p = _layer(**shape, seed=10 + m)
    h = p["an"].shape[0]
    x = torch.randn(m, h)
    attn = torch.randn(m, p["nh"] * p["hd"]).to(torch.bfloat16)
    ref = dense_layer.attn_out_mlp_reference(x, attn, p["mn"], 1e-5, p["o"], p["gu"], p["down"])
    x_in = x.clone()
    y = dense_layer.attn_out_mlp_(x_in, attn, p["mn"], 1e-5, p["o"], p["gu"], p["down"])
    assert y.data_ptr() == x_in.data_ptr()                                       # in place
    delta = (ref - x).abs()
    # bf16 roundings at the same places; a sum rounded the other way moves what follows by ~2^-8
    assert float((y - ref).abs().max()) <= 2 ** -6 * float(delta.max())
    assert float((y - ref).abs().mean()) <= 2 ** -9 * float(delta.mean())
    assert not torch.equal(y, x)


@pytest.fixture(scope="module")
def f16_file(tmp_path_factory):
    from helpers import make_tiny_hf_llama, write_tiny_llama_gguf
    root = tmp_path_factory.mktemp("decode_bf16")
    path = root / "tiny.gguf"
    write_tiny_llama_gguf(path, make_tiny_hf_llama(root / "hf", tie=True))
    return path


@pytest.mark.parametrize("rows", [1, 5, 8, 12])
def test_a_bf16_model_takes_the_native_steps_and_matches_the_torch_path(f16_file, rows, monkeypatch):
    from memlm.loading import load_model
    from memlm.kernels.cpu import cpu_flags
    if "amx_bf16" in cpu_flags():
        pytest.skip("with AMX, MEMLM_BF16_DECODE=auto keeps oneDNN's packed weights")
    monkeypatch.setenv("MEMLM_BF16_DECODE", "auto")                            # opt-in
    native = load_model(f16_file, weight_dtype="bf16").model
    assert all(layer.block_step and layer._step_kind == "dense" for layer in native.layers)
    monkeypatch.setattr(dense_layer, "available", lambda: False)               # the torch path
    torch_path = load_model(f16_file, weight_dtype="bf16").model
    assert not any(layer.block_step for layer in torch_path.layers)
    monkeypatch.undo()
    monkeypatch.delenv("MEMLM_BF16_DECODE", raising=False)                    # the default: packed
    assert not any(layer.block_step for layer in load_model(f16_file, weight_dtype="bf16").model.layers)
    monkeypatch.undo()
    calls, heads = [], []
    real, real_head = dense_layer.attn_out_mlp_, dense_layer.head
    monkeypatch.setattr(dense_layer, "attn_out_mlp_", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(dense_layer, "head", lambda *a: heads.append(1) or real_head(*a))
    ids = torch.arange(3, 3 + rows).view(1, -1)
    with torch.inference_mode():
        a = native.compute_logits(native.forward_dense(ids)[0])
        b = torch_path.compute_logits(torch_path.forward_dense(ids)[0])
    fused = rows <= dense_layer.MAX_ROWS
    assert len(calls) == (len(native.layers) if fused else 0) and len(heads) == (1 if fused else 0)
    assert (a - b).norm() < 0.01 * b.norm()                 # bf16 roundings at the same places
    assert torch.equal(a.argmax(-1), b.argmax(-1))


def test_a_bad_opt_in_value_is_refused(monkeypatch):
    from memlm.models.linear.bf16 import Bf16Method
    monkeypatch.setenv("MEMLM_BF16_DECODE", "yes")
    with pytest.raises(ValueError, match="MEMLM_BF16_DECODE"):
        Bf16Method("cpu")


@pytest.mark.parametrize("kv_dtype", ["fp16", "fp32"])
def test_small_engines_decode_bf16_weights_through_the_whole_layer_step(f16_file, kv_dtype, monkeypatch):
    """By default an `LLM` of at most MAX_ROWS sequences holds bf16 weights plain and runs each
    decode step's layers as one native call each (`dense_layer_step`); its tokens are the two-call
    path's, bit for bit (the same roundings); a larger engine keeps oneDNN's packed weights."""
    from memlm import LLM
    from helpers import whole_layer_decodes
    monkeypatch.delenv("MEMLM_BF16_DECODE", raising=False)
    assert not any(layer.block_step for layer in
                   LLM(str(f16_file), weight_dtype="bf16", max_num_seqs=16, verbose=False).model.layers)
    llm = LLM(str(f16_file), weight_dtype="bf16", kv_dtype=kv_dtype, max_num_seqs=4, verbose=False)
    assert all(layer.block_step and layer._step_kind == "dense" for layer in llm.model.layers)
    whole, apart, steps = whole_layer_decodes(llm, monkeypatch)
    assert steps >= 5 and whole == apart                               # every decode step, the same tokens
    monkeypatch.undo()
    monkeypatch.setenv("MEMLM_BF16_DECODE", "0")                                  # packed, whatever the engine
    assert not any(layer.block_step for layer in
                   LLM(str(f16_file), weight_dtype="bf16", max_num_seqs=1, verbose=False).model.layers)
