"""The ggml block codecs (Q8_0 / Q4_0 / Q4_1) and their matmul: dequantization bit-exact with
`gguf.quants`, the native kernel against dequantize-then-matmul over odd shapes and batch
sizes, and the torch fallback (MEMLM_NATIVE=0) the same."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, quants

from memlm.kernels import gemv


@pytest.fixture(params=["native", "torch"])
def backend(request, monkeypatch):
    if request.param == "native" and not gemv.available():
        pytest.skip("no C compiler / MEMLM_NATIVE=0")
    if request.param == "torch":
        monkeypatch.setattr(gemv, "available", lambda: False)
    monkeypatch.setenv("MEMLM_INT8_ACTIVATIONS", "0")   # the fp32 kernel: exact up to fp32 sums
    return request.param


@pytest.mark.parametrize("codec", gemv.CODECS)
def test_dequantize_is_gguf_dequantize(codec):
    w = torch.randn(9, 96) * torch.rand(9, 1) * 3
    held = gemv.quantize(w, codec)
    expected = quants.dequantize(held.blocks.numpy(), GGMLQuantizationType[codec.upper()]).reshape(9, 96)
    assert torch.equal(gemv.dequantize(held), torch.from_numpy(np.ascontiguousarray(expected)))
    assert held.blocks.numel() == gemv.block_bytes(9, 96, codec)


@pytest.mark.parametrize("codec, bound", [("q8_0", 1 / 254), ("q4_0", 1 / 8), ("q4_1", 1 / 30)])
def test_round_trip_error_is_within_half_a_step(codec, bound):
    w = torch.randn(64, 256)
    err = (gemv.dequantize(gemv.quantize(w, codec)) - w).abs().view(64, 8, 32)
    span = w.view(64, 8, 32).abs().amax(-1, keepdim=True) * (2 if codec == "q4_1" else 1)
    assert bool((err <= span * bound * 1.15 + 1e-6).all())     # + the fp16 rounding of d and m


@pytest.mark.parametrize("codec", gemv.CODECS)
@pytest.mark.parametrize("n, k, m", [(1, 32, 1), (7, 64, 1), (33, 96, 5), (17, 50, 8), (40, 128, 15),
                                     (3, 1000, 2)])
def test_block_matmul_is_dequantize_then_matmul(backend, codec, n, k, m):
    torch.manual_seed(n * k + m)
    held = gemv.quantize(torch.randn(n, k), codec)
    x = torch.randn(m, k)
    y = gemv.block_matmul(x, held)
    expected = x.double() @ gemv.dequantize(held).double().t()
    assert y.shape == (m, n) and y.dtype == torch.float32
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-4 * k ** 0.5)


def test_bf16_input_and_a_gguf_tensor_as_stored(backend):
    """GGUF bytes are taken as stored (no re-quantization); bf16 activations are widened."""
    w = np.random.default_rng(0).standard_normal((24, 64)).astype(np.float32)
    raw = quants.quantize(w, GGMLQuantizationType.Q4_1)
    held = gemv.from_gguf_bytes(raw, "q4_1", 24, 64)
    x = torch.randn(3, 64).to(torch.bfloat16)
    expected = x.float() @ torch.from_numpy(quants.dequantize(raw, GGMLQuantizationType.Q4_1)).t()
    torch.testing.assert_close(gemv.block_matmul(x, held), expected, rtol=1e-5, atol=1e-4)


def test_wrong_bytes_and_unknown_codec_are_one_line_errors():
    raw = quants.quantize(np.zeros((4, 64), np.float32), GGMLQuantizationType.Q8_0)
    with pytest.raises(ValueError, match=r"do not hold a \(4, 96\) weight"):
        gemv.from_gguf_bytes(raw, "q8_0", 4, 96)
    with pytest.raises(ValueError, match="block codec must be one of q8_0, q4_0, q4_1"):
        gemv.quantize(torch.zeros(2, 32), "q5_0")


@pytest.mark.parametrize("codec", gemv.CODECS)
@pytest.mark.parametrize("n, k, m", [(40, 128, 19), (33, 96, 32), (50, 70, 64), (7, 1000, 40)])
def test_many_rows_multiply_bf16_tiles_of_the_exact_weights(monkeypatch, codec, n, k, m):
    """From TILE_MIN_ROWS rows on, W is dequantized to bf16 tiles (here 3 rows each, so N is
    split unevenly) for the bf16 GEMM: bf16 rounding of x and W only."""
    if not gemv.available():
        pytest.skip("no C compiler / MEMLM_NATIVE=0")
    monkeypatch.setattr(gemv, "_bf16_gemm_is_fast", lambda: True)
    monkeypatch.setenv("MEMLM_INT8_ACTIVATIONS", "0")      # else the 8-bit GEMM (test_kernels_gemm_q)
    monkeypatch.setenv("MEMLM_AMX", "0")                   # else, with AMX, gemm_amx.c
    monkeypatch.setattr(gemv, "TILE_ELEMENTS", 3 * (-(-k // gemv.QK) * gemv.QK))
    torch.manual_seed(n + k + m)
    held = gemv.quantize(torch.randn(n, k), codec)
    x = torch.randn(m, k)
    w = gemv.dequantize(held)
    expected = x.bfloat16().double() @ w.bfloat16().double().t()
    y = gemv.block_matmul(x, held)
    assert y.shape == (m, n) and y.dtype == torch.float32
    torch.testing.assert_close(y.double(), expected, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(y.double(), x.double() @ w.double().t(), rtol=0.05, atol=0.05 * k ** 0.5)


def test_warm_up_runs_one_full_and_one_partial_tile_not_the_whole_weight(monkeypatch):
    """gemv.warm_up makes the tile shapes of an m-row block_matmul with weights of at most one tile:
    warming the LM head at 2048 rows must not allocate its (2048, N) output before the plan exists."""
    monkeypatch.setattr(gemv, "TILE_ELEMENTS", 5 * 64)          # 5 rows of K=64 per tile
    held = gemv.quantize(torch.randn(23, 64), "q8_0")           # 4 full tiles + 3 rows
    seen = []
    monkeypatch.setattr(gemv, "block_matmul", lambda x, w, exact=False: seen.append((x.shape, w.out_features, exact)))
    monkeypatch.setattr(gemv, "int8_gemm", lambda rows=None: False)      # no 8-bit GEMM: bf16 tiles
    monkeypatch.setenv("MEMLM_AMX", "0")                                 # and no AMX GEMM
    gemv.warm_up(held, 40, exact=True)                          # the LM head: bf16 tiles at 40 rows
    assert sorted(seen) == [((40, 64), 3, True), ((40, 64), 5, True)]
    seen.clear()
    gemv.warm_up(held, 40)
    assert sorted(seen) == [((40, 64), 3, False), ((40, 64), 5, False)]
    seen.clear()
    monkeypatch.setattr(gemv, "int8_gemm", lambda rows=None: True)       # projections and the head
    monkeypatch.setattr(gemv, "GEMM_LIBRARY", SimpleNamespace(lib=object()))   # on the GEMM: no state
    gemv.warm_up(held, 40)
    gemv.warm_up(held, 40, exact=True)
    assert seen == []
