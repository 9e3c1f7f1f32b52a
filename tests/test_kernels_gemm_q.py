"""The blocked 8-bit-activation GEMM on block weights (csrc/gemm_q.c) through `gemv.block_matmul`:
against dequantize-then-matmul in fp64 within the bound that rounding x to 8 bits per block of 32
allows, over odd shapes (K = 32 k and K padded, odd N, M = 9 .. 513, more rows than one chunk of
the kernel's activation workspace), all three codecs; its integer sums are decode_q.c's (the two
kernels agree to fp32 rounding); and the dispatch: the switch, the `exact` head, MEMLM_NATIVE=0."""
import pytest
import torch
import torch.nn.functional as F

from memlm.kernels import gemv

needs_gemm = pytest.mark.skipif(gemv.GEMM_LIBRARY.lib is None or gemv.DECODE_LIBRARY.lib is None,
                                reason="no C compiler / MEMLM_NATIVE=0")


@pytest.fixture(autouse=True)
def int8_on(monkeypatch):
    monkeypatch.delenv("MEMLM_GEMM_PLANES", raising=False)   # the default: auto planes
    monkeypatch.setenv("MEMLM_INT8_ACTIVATIONS", "1")    # the plain C path where VNNI is missing
    monkeypatch.setenv("MEMLM_INT8_GEMM", "1")           # every row count (auto: up to GEMM_AUTO_MAX_ROWS)
    monkeypatch.setenv("MEMLM_AMX", "0")                 # CPUs with AMX: gemm_amx.c (test_kernels_gemm_amx)


def rounding_bound(x: torch.Tensor, held: gemv.BlockWeight, planes: int = 1) -> torch.Tensor:
    """|y - x W^T| <= sum over blocks of max|x_block| / 254 * sum |w_block| (+ fp32 sums) with one
    8-bit plane; with two, the second plane carries what the first left at 256 times the
    resolution (its code clamped to 127 of a possible 128): max|x_block| / (127 * 256) per weight."""
    kp = held.padded_in
    xp = F.pad(x.double(), (0, kp - x.shape[1]))
    w = F.pad(gemv.dequantize(held).double(), (0, kp - held.in_features)).abs()
    g = kp // gemv.QK
    amax = xp.view(x.shape[0], g, gemv.QK).abs().amax(-1)                     # (M, G)
    step = 254 if planes == 1 else 127 * 256
    return amax / step @ w.view(w.shape[0], g, gemv.QK).sum(-1).t() + 1e-5 * (1 + w.sum(1))


def _case(codec, n, k, m, seed):
    g = torch.Generator().manual_seed(seed)
    held = gemv.quantize(torch.randn(n, k, generator=g) * torch.rand(n, 1, generator=g), codec)
    x = torch.randn(m, k, generator=g) * torch.rand(1, k, generator=g) * 4
    return held, x


def _qmatmul(x: torch.Tensor, held: gemv.BlockWeight) -> torch.Tensor:
    xp = F.pad(x, (0, held.padded_in - x.shape[1])).contiguous()
    y = torch.empty(x.shape[0], held.out_features)
    gemv.DECODE_LIBRARY.lib.qmatmul(gemv.GGML_TYPE_IDS[held.codec], held.blocks.data_ptr(), xp.data_ptr(),
                                    y.data_ptr(), x.shape[0], held.out_features, held.padded_in)
    return y


@needs_gemm
@pytest.mark.parametrize("planes", [1, 2])
@pytest.mark.parametrize("codec", gemv.CODECS)
@pytest.mark.parametrize("n, k, m", [(1, 32, 9), (17, 64, 16), (33, 96, 17), (47, 160, 33), (5, 50, 100),
                                     (100, 576, 100), (31, 1000, 513), (64, 288, 8)])
def test_gemm_is_within_the_activation_rounding_bound(codec, n, k, m, planes, monkeypatch):
    monkeypatch.setenv("MEMLM_GEMM_PLANES", str(planes))
    held, x = _case(codec, n, k, m, n * k + m)
    assert gemv.int8_gemm() and m >= gemv.GEMM_MIN_ROWS and gemv.gemm_planes() == (planes, 0.0)
    y = gemv.block_matmul(x, held)
    exact = x.double() @ gemv.dequantize(held).double().t()
    err = (y.double() - exact).abs()
    assert y.shape == (m, n) and y.dtype == torch.float32
    bound = rounding_bound(x, held, planes)
    assert bool((err <= bound).all()), float((err / bound).max())
    if planes == 1:
        assert float(err.max()) > 0          # it did round: not the fp32 kernel
        # the same integer sums as decode_q.c's qmatmul: only the fp32 summation order differs
        torch.testing.assert_close(y, _qmatmul(x, held), rtol=1e-5, atol=1e-5 * float(exact.abs().max()))
    else:                                    # 256 times finer than one plane's rounding
        assert bool((err <= rounding_bound(x, held, 1) / 64).all())


@needs_gemm
@pytest.mark.parametrize("planes", [1, 2])
@pytest.mark.parametrize("codec", gemv.CODECS)
def test_more_rows_than_one_activation_chunk(codec, planes, monkeypatch):
    """K = 4096: the kernel quantizes as many rows as fit its 2 MiB workspace at a time (512 with
    one plane, 256 with two), so 1030 rows take three or five chunks, the last of 6 rows: not a
    whole register tile."""
    monkeypatch.setenv("MEMLM_GEMM_PLANES", str(planes))
    held, x = _case(codec, 37, 4096, 1030, 7)
    assert 1030 * 4096 > 2 * gemv.GEMM_CHUNK_BYTES
    y = gemv.block_matmul(x, held)
    err = (y.double() - x.double() @ gemv.dequantize(held).double().t()).abs()
    assert bool((err <= rounding_bound(x, held, planes)).all())
    if planes == 1:
        torch.testing.assert_close(y[-6:], _qmatmul(x[-6:], held), rtol=1e-5, atol=1e-3)


def _selective(x: torch.Tensor, kp: int, ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
    """gemm_q.c's `auto` activations in torch: per block of 32, d0 = max|x| / 127, q0 = round(x / d0);
    blocks whose max exceeds `ratio` x the row's rms add q1 = round((x - d0 q0) 256 / d0) (clamped
    to 127). Returns (x as the kernel sees it, fp64; which blocks took the second plane)."""
    xp = F.pad(x.float(), (0, kp - x.shape[1])).view(x.shape[0], -1, gemv.QK)     # fp32, as the C
    amax = xp.abs().amax(-1, keepdim=True)
    d0 = amax / 127
    q0 = torch.round(xp * torch.where(amax > 0, 127 / amax, 0))
    q1 = torch.round((xp - d0 * q0) * torch.where(d0 > 0, 256 / d0, 0)).clamp(-127, 127)
    rms = xp.pow(2).mean((1, 2), keepdim=True).sqrt()
    two = amax > ratio * rms
    d0, q0, q1 = d0.double(), q0.double(), q1.double()
    return (d0 * q0 + torch.where(two, d0 / 256 * q1, 0)).view(x.shape[0], kp), two.squeeze(-1)


@needs_gemm
@pytest.mark.parametrize("codec", gemv.CODECS)
@pytest.mark.parametrize("n, k, m", [(100, 576, 100), (31, 1000, 513), (40, 1536, 9), (17, 2050, 33)])
@pytest.mark.parametrize("ratio", [None, 3.0])
def test_auto_planes_add_the_second_plane_to_outlier_blocks_only(codec, n, k, m, ratio, monkeypatch):
    """Rows with a massive channel, as SmolLM2's hidden states have, beside plain rows: the
    kernel's result is the exact product of the activations the simulation above forms (a second
    plane in the outlier blocks, one elsewhere), and much closer than one plane's in those rows.
    `auto:3` moves the line: many plain rows' blocks then take the second plane too."""
    held, x = _case(codec, n, k, m, n + k + m)
    g = torch.Generator().manual_seed(m)
    hot = torch.rand(m, generator=g) < 0.5
    x[hot, k // 3] = 250.0                   # one massive channel: > 16 x the row's rms from K = 576 on
    x[hot, 2 * k // 3 + 5] *= 10.0
    if ratio is not None:
        monkeypatch.setenv("MEMLM_GEMM_PLANES", f"auto:{ratio}")
    xs, two = _selective(x, held.padded_in, ratio or gemv.OUTLIER_RATIO)
    assert bool(two[hot].any()) and bool(two[~hot].any()) == (ratio is not None)
    y = gemv.block_matmul(x, held)
    w = F.pad(gemv.dequantize(held).double(), (0, held.padded_in - held.in_features))
    want = xs @ w.t()
    tol = 2e-5 * (xs.abs() @ w.abs().t()) + rounding_bound(x, held, 2)   # fp32 sums, a tie's rounding
    assert bool(((y.double() - want).abs() <= tol).all())
    monkeypatch.setenv("MEMLM_GEMM_PLANES", "1")
    one = gemv.block_matmul(x, held)
    exact = x.double() @ gemv.dequantize(held).double().t()
    err_auto = (y.double() - exact)[hot].norm()
    err_one = (one.double() - exact)[hot].norm()
    assert float(err_auto) < 0.5 * float(err_one)
    plain = ~two.any(1)                      # rows without a second plane: one plane's result
    assert bool(plain.any()) or ratio is not None      # at 3 x the rms every plain row may have one
    torch.testing.assert_close(y[plain], one[plain], rtol=1e-5, atol=1e-5 * float(exact.abs().max()))


@pytest.mark.parametrize("bad", ["3", "auto:", "auto:0", "auto:-2", "auto:x", "auto:inf", "2:4"])
def test_a_bad_plane_setting_is_refused(monkeypatch, bad):
    monkeypatch.setenv("MEMLM_GEMM_PLANES", bad)
    with pytest.raises(ValueError, match="MEMLM_GEMM_PLANES must be 1, 2, auto or auto:R"):
        gemv.gemm_planes()


def test_auto_planes_take_an_outlier_ratio(monkeypatch):
    monkeypatch.setenv("MEMLM_GEMM_PLANES", "auto:4")
    assert gemv.gemm_planes() == (2, 4.0)
    monkeypatch.setenv("MEMLM_GEMM_PLANES", "auto")
    assert gemv.gemm_planes() == (2, gemv.OUTLIER_RATIO)


@needs_gemm
def test_zero_rows_and_extreme_values_stay_finite():
    held = gemv.quantize(torch.randn(40, 64), "q4_1")
    x = torch.zeros(20, 64)
    x[3] = 1e30                                     # one huge row: its own scales, no overflow
    x[5, :32] = -1e-30
    y = gemv.block_matmul(x, held)
    assert torch.equal(y[0], torch.zeros(40)) and bool(torch.isfinite(y).all())
    exact = x[3:4].double() @ gemv.dequantize(held).double().t()
    assert bool(((y[3:4].double() - exact).abs() <= rounding_bound(x[3:4], held)).all())


@needs_gemm
def test_the_switch_and_the_exact_head_take_the_other_paths(monkeypatch):
    held, x = _case("q8_0", 24, 128, 40, 3)
    exact = x @ gemv.dequantize(held).t()
    calls = []
    real = gemv._int8_gemm
    monkeypatch.setattr(gemv, "_int8_gemm", lambda *a: calls.append(a[2:]) or real(*a))
    gemv.block_matmul(x, held)
    assert calls == [()]                                        # the default planes
    monkeypatch.setenv("MEMLM_GEMM_PLANES", "1")
    head = gemv.block_matmul(x, held, exact=True)               # the LM head: auto planes, whatever the env
    monkeypatch.delenv("MEMLM_GEMM_PLANES")
    assert calls == [(), ((2, gemv.OUTLIER_RATIO),)]
    assert torch.equal(head, gemv.block_matmul(x, held))        # = the projections' default
    gemv.block_matmul(x[:gemv.TILE_MIN_ROWS - 1], held, exact=True)   # fewer rows: fp32 kernel
    gemv.block_matmul(x[:gemv.GEMM_MIN_ROWS - 1], held)         # a few rows: decode_q.c
    assert len(calls) == 3
    monkeypatch.setenv("MEMLM_INT8_ACTIVATIONS", "0")
    assert not gemv.int8_gemm()
    y = gemv.block_matmul(x, held)                              # bf16 tiles or the fp32 kernel
    gemv.block_matmul(x, held, exact=True)
    assert len(calls) == 3
    torch.testing.assert_close(y, exact, rtol=0.02, atol=0.02 * float(exact.abs().max()))


def test_without_the_native_library_it_is_dequantize_then_matmul(monkeypatch):
    """MEMLM_NATIVE=0 (or no compiler): the torch reference, exact, whatever the switch says."""
    monkeypatch.setattr(gemv, "available", lambda: False)
    held, x = _case("q4_0", 19, 96, 33, 5)
    torch.testing.assert_close(gemv.block_matmul(x, held), x @ gemv.dequantize(held).t(), rtol=1e-5, atol=1e-4)


def test_the_gemm_is_on_by_default_at_every_row_count_with_auto_planes(monkeypatch):
    built = gemv.GEMM_LIBRARY.lib is not None
    monkeypatch.setenv("MEMLM_INT8_ACTIVATIONS", "1")
    monkeypatch.delenv("MEMLM_INT8_GEMM", raising=False)
    assert gemv.gemm_planes() == (2, gemv.OUTLIER_RATIO)
    assert gemv.int8_gemm(gemv.GEMM_MIN_ROWS) == built and gemv.int8_gemm(4096) == built
    monkeypatch.setenv("MEMLM_GEMM_PLANES", "2")                 # two planes: up to the auto row count
    assert gemv.int8_gemm(gemv.GEMM_AUTO_MAX_ROWS) == built and not gemv.int8_gemm(gemv.GEMM_AUTO_MAX_ROWS + 1)
    monkeypatch.setenv("MEMLM_GEMM_PLANES", "1")                 # one plane: never unless asked
    assert not gemv.int8_gemm(16)
    monkeypatch.setenv("MEMLM_INT8_GEMM", "1")                   # every row count, any plane setting
    assert gemv.int8_gemm(4096) == built
    monkeypatch.setenv("MEMLM_INT8_GEMM", "0")
    assert not gemv.int8_gemm(16)
    monkeypatch.setenv("MEMLM_INT8_GEMM", "yes")
    with pytest.raises(ValueError, match="MEMLM_INT8_GEMM must be auto, 0 or 1"):
        gemv.int8_gemm(16)
