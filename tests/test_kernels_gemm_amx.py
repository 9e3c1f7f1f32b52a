"""The AMX bf16 GEMM on block weights (csrc/gemm_amx.c) through `gemv.block_matmul`: against the
bf16-rounded product in fp64 (W decoded exactly, then W and x rounded to bf16; fp32 sums) over odd
shapes (K padded, odd N, partial 16-row and 32-column tiles, more rows than one activation chunk),
all three codecs; and the dispatch (`MEMLM_AMX`, the `exact` head, its row threshold). Needs a CPU
with AMX: elsewhere only the dispatch and the kernel's refusal are checked."""
import pytest
import torch

from memlm.kernels import gemv

has_amx = gemv.AMX_LIBRARY.lib is not None and gemv._amx_ready()
needs_amx = pytest.mark.skipif(not has_amx, reason="no AMX here (or no C compiler / MEMLM_NATIVE=0)")


def _case(codec, n, k, m, seed):
    g = torch.Generator().manual_seed(seed)
    held = gemv.quantize(torch.randn(n, k, generator=g) * torch.rand(n, 1, generator=g), codec)
    x = torch.randn(m, k, generator=g) * torch.rand(1, k, generator=g) * 4
    return held, x


@needs_amx
@pytest.mark.parametrize("codec", gemv.CODECS)
@pytest.mark.parametrize("n, k, m", [(1, 32, 1), (17, 64, 16), (33, 96, 17), (47, 160, 33), (5, 50, 100),
                                     (100, 576, 31), (64, 288, 48), (31, 1000, 1100)])
def test_amx_gemm_equals_the_bf16_rounded_product(codec, n, k, m, monkeypatch):
    monkeypatch.setenv("MEMLM_AMX", "1")
    held, x = _case(codec, n, k, m, n * k + m)
    y = gemv.block_matmul(x, held)
    assert y.shape == (m, n) and y.dtype == torch.float32
    w = gemv.dequantize(held)
    want = x.bfloat16().double() @ w.bfloat16().double().t()
    scale = x.bfloat16().double().abs() @ w.bfloat16().double().abs().t()
    assert ((y.double() - want).abs() <= 1e-4 * scale + 1e-6).all()     # fp32 sums only
    exact = x.double() @ w.double().t()
    assert ((y.double() - exact).abs() <= 2 ** -7 * scale + 1e-6).all()  # bf16: 2^-8 on each side


@needs_amx
@pytest.mark.parametrize("x_dtype, out_dtype", [(torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32),
                                                (torch.float32, torch.bfloat16), (torch.float16, torch.float32)])
def test_bf16_activations_are_read_and_written_as_they_are(x_dtype, out_dtype, monkeypatch):
    """The model's bf16 activations go in without a conversion and y can come out in bf16: the
    same sums as from fp32 x (x is rounded to bf16 either way), y rounded once to bf16."""
    monkeypatch.setenv("MEMLM_AMX", "1")
    held, x = _case("q4_1", 70, 200, 45, 3)
    x = x.to(x_dtype)
    y = gemv.block_matmul(x, held, out_dtype=out_dtype)
    assert y.dtype == out_dtype and y.shape == (45, 70)
    ref = gemv.block_matmul(x.float().bfloat16().float(), held)            # fp32 in, fp32 out
    torch.testing.assert_close(y, ref.to(out_dtype), rtol=0, atol=0)


@needs_amx
def test_rows_past_the_first_chunk_and_a_huge_n_are_computed():
    """More rows than one 2 MiB activation chunk (K = 1536: 672 rows) and N over one thread's share."""
    held, x = _case("q4_1", 2050, 1536, 700, 7)
    y = gemv._amx_gemm(x.contiguous(), held)
    want = x.bfloat16().double() @ gemv.dequantize(held).bfloat16().double().t()
    torch.testing.assert_close(y.double(), want, rtol=1e-4, atol=1e-3)


def test_dispatch_follows_memlm_amx(monkeypatch):
    calls = []
    monkeypatch.setattr(gemv, "_amx_ready", lambda: True)
    monkeypatch.setattr(gemv, "_amx_gemm", lambda x, w, out_dtype: calls.append(x.shape[0]) or torch.zeros(x.shape[0], w.out_features))
    held = gemv.quantize(torch.randn(8, 64), "q8_0")
    monkeypatch.setenv("MEMLM_AMX", "auto")
    assert not gemv.amx_gemm(gemv.AMX_MIN_ROWS - 1) and gemv.amx_gemm(gemv.AMX_MIN_ROWS)
    gemv.block_matmul(torch.randn(gemv.AMX_MIN_ROWS, 64), held)
    gemv.block_matmul(torch.randn(gemv.AMX_MIN_ROWS, 64), held, exact=True)   # the head: bf16 like tiles
    assert calls == [gemv.AMX_MIN_ROWS] * 2
    monkeypatch.setenv("MEMLM_AMX", "1")
    assert gemv.amx_gemm(1)
    monkeypatch.setenv("MEMLM_AMX", "0")
    assert not gemv.amx_gemm(4096)
    monkeypatch.setenv("MEMLM_AMX", "yes")
    with pytest.raises(ValueError, match="MEMLM_AMX must be auto, 0 or 1, got 'yes'"):
        gemv.amx_gemm(32)
    monkeypatch.setattr(gemv, "_amx_ready", lambda: False)      # a CPU without AMX: never
    monkeypatch.setenv("MEMLM_AMX", "1")
    assert not gemv.amx_gemm(4096)


def test_the_kernel_refuses_without_amx_and_reports_it():
    """Where the build or the process has no AMX the kernel writes nothing and answers status 2;
    `amx_ready` agrees with `gemv._amx_ready`."""
    if gemv.AMX_LIBRARY.lib is None:
        pytest.skip("no C compiler / MEMLM_NATIVE=0")
    out = torch.zeros(1, dtype=torch.int32)
    gemv.AMX_LIBRARY.lib.amx_ready(out.data_ptr())
    assert bool(out[0]) == gemv._amx_ready()
    held, x = _case("q8_0", 8, 64, 4, 1)
    y = torch.full((4, 8), 7.0)
    status = torch.zeros(1, dtype=torch.int32)
    gemv.AMX_LIBRARY.lib.amx_gemm(gemv.GGML_TYPE_IDS["q8_0"], held.blocks.data_ptr(), x.contiguous().data_ptr(),
                                  y.data_ptr(), 4, 8, 64, 0, status.data_ptr())
    if has_amx:
        assert int(status[0]) == 0 and not torch.equal(y, torch.full((4, 8), 7.0))
    else:
        assert int(status[0]) == 2 and torch.equal(y, torch.full((4, 8), 7.0))
