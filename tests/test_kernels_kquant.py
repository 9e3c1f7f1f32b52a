"""K-quant (Q4_K / Q5_K / Q6_K) blocks: the torch dequantization is bit-equal to gguf-py's, the
native one to it, the quantizer's round trip is bounded, and each matmul path (fp32 kernel,
8-bit-activation kernel, dequantized tiles, the MEMLM_NATIVE=0 fallback) matches
dequantize-then-matmul over odd shapes."""
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf import quants

from memlm.kernels import gemv, kquant

native = pytest.mark.skipif(not kquant.available(), reason="no C compiler / MEMLM_NATIVE=0")


def _random_blocks(codec: str, n: int, k: int, seed: int = 0) -> kquant.KQuantWeight:
    """Every code and scale byte random, the fp16 super-block scales small and finite."""
    g = np.random.default_rng(seed)
    bb = kquant.BLOCK_BYTES[codec]
    raw = g.integers(0, 256, size=(n * k // 256, bb), dtype=np.uint8)
    scales = g.uniform(1e-3, 2e-2, size=(raw.shape[0], 2)).astype(np.float16).view(np.uint8)
    if codec == "q6_k":
        raw[:, 208:210] = scales[:, :2]
    else:
        raw[:, 0:4] = scales
    return kquant.KQuantWeight(torch.from_numpy(raw.reshape(n, -1).copy()), codec, k, n)


def _gguf(w: kquant.KQuantWeight) -> torch.Tensor:
    back = quants.dequantize(w.blocks.numpy(), T[w.codec.upper()])
    return torch.from_numpy(np.ascontiguousarray(back)).view(w.out_features, w.in_features)


@pytest.mark.parametrize("codec", kquant.CODECS)
def test_dequantize_is_bit_equal_to_gguf(codec):
    w = _random_blocks(codec, 5, 768)
    ref = _gguf(w)
    assert torch.equal(kquant.dequantize(w), ref)
    assert torch.equal(kquant.dequantize_rows(w.blocks[[4, 1]], codec, 768), ref[[4, 1]])
    if kquant.available():
        assert torch.equal(kquant.dequantize_native(w), ref)


@pytest.mark.parametrize("codec, bound", [("q4_k", 0.09), ("q5_k", 0.045), ("q6_k", 0.022)])
def test_quantize_round_trip(codec, bound):
    torch.manual_seed(0)
    w = torch.randn(33, 512)
    q = kquant.quantize(w, codec)
    assert q.blocks.shape == (33, 2 * kquant.BLOCK_BYTES[codec])
    back = _gguf(q)                                   # gguf-py reads what the quantizer wrote
    assert torch.equal(kquant.dequantize(q), back)
    assert float((back - w).norm() / w.norm()) < bound
    # every element within one code step (plus the 6-bit scale's rounding) of the original
    step = (w.view(33, -1, 32).amax(-1) - w.view(33, -1, 32).amin(-1).clamp(max=0)).repeat_interleave(32, -1)
    assert bool(((back - w).abs() <= step.view(33, 512) * 0.2).all())
    with pytest.raises(ValueError, match="256"):
        kquant.quantize(torch.zeros(2, 100), codec)


def test_bad_bytes_and_codec():
    with pytest.raises(ValueError, match=r"do not hold a \(3, 256\) weight"):
        kquant.from_gguf_bytes(np.zeros((3, 100), np.uint8), "q4_k", 3, 256)
    with pytest.raises(ValueError, match="q4_k, q5_k, q6_k"):
        kquant.block_bytes(1, 256, "q3_k")


def _exact(x, w):
    return (x.double() @ _gguf(w).double().t()).float()


@native
@pytest.mark.parametrize("codec", kquant.CODECS)
@pytest.mark.parametrize("m", [1, 2, 3, 5, 8, 11])
def test_fp32_kernel_matches_dequantize_then_matmul(codec, m, monkeypatch):
    monkeypatch.setenv("MEMLM_INT8_ACTIVATIONS", "0")
    w = _random_blocks(codec, 37, 768, seed=m)
    x = torch.randn(m, 768, generator=torch.Generator().manual_seed(m))
    y, ref = kquant.matmul(x, w), _exact(x, w)
    assert y.shape == (m, 37)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    torch.testing.assert_close(kquant.matmul(x, w, exact=True), y, rtol=0, atol=0)


@native
@pytest.mark.parametrize("codec", kquant.CODECS)
@pytest.mark.parametrize("m", [1, 4, 8])
def test_int8_kernel_within_the_activation_rounding(codec, m, monkeypatch):
    """|y - exact| <= sum over super-blocks of d_x / 2 * sum |w| (x rounded to d_x = max|x| / 127)."""
    monkeypatch.setenv("MEMLM_INT8_ACTIVATIONS", "1")
    if not gemv.int8_activations():
        pytest.skip("decode_q library not built")
    w = _random_blocks(codec, 29, 512, seed=m)
    x = torch.randn(m, 512, generator=torch.Generator().manual_seed(10 + m))
    y, ref = kquant.matmul(x, w), _exact(x, w)
    dx = x.view(m, -1, 256).abs().amax(-1) / 127                                      # (M, 2)
    wabs = _gguf(w).abs().view(29, -1, 256).sum(-1)                                    # (N, 2)
    bound = (dx / 2) @ wabs.t() + 1e-4 * ref.abs().max()
    assert bool(((y - ref).abs() <= bound).all())
    assert float((y - ref).norm() / ref.norm()) < 0.02
    # the LM head (`exact`) keeps fp32 activations
    torch.testing.assert_close(kquant.matmul(x, w, exact=True), ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


@native
@pytest.mark.parametrize("codec", kquant.CODECS)
@pytest.mark.parametrize("m", [kquant.TILE_MIN_ROWS, 45])
def test_tiles_match_the_rounded_product(codec, m, monkeypatch):
    monkeypatch.setattr(gemv, "TILE_ELEMENTS", 7 * 512)    # several tiles, the last one partial
    w = _random_blocks(codec, 19, 512, seed=m)
    x = torch.randn(m, 512, generator=torch.Generator().manual_seed(m))
    dtype = torch.bfloat16 if kquant._bf16_tiles() else torch.float32
    ref = (x.to(dtype).double() @ _gguf(w).to(dtype).double().t()).float()
    torch.testing.assert_close(kquant.matmul(x, w), ref, rtol=1e-2, atol=1e-2 * float(ref.abs().max()))


@pytest.mark.parametrize("codec", kquant.CODECS)
def test_fallback_without_native(codec, monkeypatch):
    monkeypatch.setattr(kquant, "available", lambda: False)
    w = _random_blocks(codec, 7, 256)
    for m in (1, 8, 20):
        x = torch.randn(m, 256)
        assert torch.equal(kquant.matmul(x, w), x @ _gguf(w).t())
