"""Native kernels against plain torch: decode attention over paged KV and the fused elementwise
ops (native and fallback); building them from csrc/ (fresh cache, rebuild on edit, compiler
errors, MEMLM_NATIVE=0); the CPU probe."""

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from memlm.kernels import attention, cpu, fused_ops
from memlm.kernels import native as kernel_build


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.int8])
@pytest.mark.parametrize("B,nh,nkv,hd,bs", [(1, 6, 2, 16, 4), (5, 6, 2, 16, 4), (40, 6, 2, 16, 4),
                                            (7, 4, 4, 16, 4), (3, 9, 3, 64, 16), (9, 9, 3, 64, 16),
                                            (4, 4, 4, 64, 16), (2, 10, 1, 64, 16)])
def test_decode_attention_matches_dense_softmax(native, dtype, B, nh, nkv, hd, bs):
    """Both task layouts (one KV head per task for few sequences, whole rows for many), GQA and
    MHA, the generic and the head-64 / block-16 kernels (AVX-512 where built, and its fallback
    for more than 8 query heads per KV head), shuffled block tables, lengths that end mid-block;
    and the torch reference the wrapper falls back to, on the same cases."""
    if native and not attention.available():
        pytest.skip("no C compiler / MEMLM_NATIVE=0")
    decode = attention.decode_attention if native else attention.decode_attention_reference
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
    out = decode(q, kc, vc, tables, lens, bs, ks, vs)
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


ROOT = Path(__file__).resolve().parents[1]
needs_compiler = pytest.mark.skipif(not kernel_build.enabled() or shutil.which(kernel_build.compiler()) is None,
                                    reason="no C compiler / MEMLM_NATIVE=0")


def test_c_sources_ship_as_files_and_as_package_data():
    """Each library compiles a real file under memlm/kernels/csrc, which the wheel ships;
    no kernel source is left inside a Python string."""
    csrc = ROOT / "memlm" / "kernels" / "csrc"
    assert kernel_build.CSRC == csrc
    for library in (attention._LIBRARY, fused_ops._LIBRARY):
        assert library.source.parent == csrc and library.source.suffix == ".c"
        assert '#include "common.h"' in library.source.read_text()
    assert (csrc / "common.h").is_file()
    shipped = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert set(shipped["memlm.kernels"]) >= {"csrc/*.c", "csrc/*.h"}
    for py in (ROOT / "memlm").rglob("*.py"):
        assert "#include <" not in py.read_text(), py


@needs_compiler
def test_a_fresh_cache_builds_a_loadable_library_from_csrc(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    library = kernel_build.Library("fused_ops", "fused_ops.c", fused_ops._SIGNATURES)
    assert not library.target().exists()
    lib = library.lib
    assert lib is not None, library.error
    assert library.target().parent == tmp_path / "memlm" / "kernels" and library.target().is_file()
    x = torch.tensor([[0.0, 3.0, 3.0, -1.0], [5.0, 1.0, 2.0, 7.0]])
    out = torch.empty(2, dtype=torch.int64)
    lib.row_argmax(x.data_ptr(), out.data_ptr(), 2, 4)
    assert out.tolist() == [1, 3]


def test_the_build_key_follows_the_sources(tmp_path):
    """Editing a .c or a header beside it names a new cache file, so the next load rebuilds."""
    csrc = tmp_path / "csrc"
    shutil.copytree(kernel_build.CSRC, csrc)
    key = kernel_build.build_key(csrc / "fused_ops.c")
    assert kernel_build.build_key(csrc / "fused_ops.c") == key
    with open(csrc / "common.h", "a") as f:
        f.write("/* edited */\n")
    edited_header = kernel_build.build_key(csrc / "fused_ops.c")
    with open(csrc / "fused_ops.c", "a") as f:
        f.write("/* edited */\n")
    assert len({key, edited_header, kernel_build.build_key(csrc / "fused_ops.c")}) == 3


@needs_compiler
def test_compiler_errors_name_the_real_file_and_line(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    bad = tmp_path / "broken.c"
    bad.write_text("#include <stdint.h>\n\nvoid f(void) { undeclared_name = 1; }\n")
    with pytest.raises(kernel_build.BuildError, match=r"broken\.c:3"):
        kernel_build.build(bad, tmp_path / "broken.so")
    library = kernel_build.Library("broken", bad, {"f": []})
    assert library.lib is None and "broken.c:3" in library.error      # kernels off, reason kept
    assert not library.target().exists()


def test_native_off_selects_the_torch_fallbacks():
    """MEMLM_NATIVE=0 (read when a library is first used): nothing is built or loaded, and
    every wrapper returns its torch result."""
    script = """
import torch, torch.nn.functional as F
from memlm.kernels import attention, fused_ops, native
assert not native.enabled() and not attention.available() and not fused_ops.available()
assert attention._LIBRARY.lib is None and fused_ops._LIBRARY.lib is None
g = torch.Generator().manual_seed(0)
x, w = torch.randn(5, 32, generator=g), torch.randn(32, generator=g)
assert torch.equal(fused_ops.rms_norm_bf16(x, w, 1e-5), F.rms_norm(x, (32,), w, 1e-5).bfloat16())
gu = torch.randn(5, 64, generator=g).bfloat16()
assert torch.equal(fused_ops.silu_mul_bf16(gu), F.silu(gu[:, :32]) * gu[:, 32:])
logits = torch.randn(4, 100, generator=g)
assert torch.equal(fused_ops.row_argmax(logits), logits.argmax(-1))
kc, vc = torch.randn(32, 2, 16, generator=g), torch.randn(32, 2, 16, generator=g)
q, tables, lens = torch.randn(3, 4, 16, generator=g), torch.tensor([[0, 1], [2, 3], [7, 4]]), torch.tensor([5, 8, 2])
args = (q, kc, vc, tables, lens, 4)
assert torch.equal(attention.decode_attention(*args), attention.decode_attention_reference(*args))
print("fallbacks ok")
"""
    env = {**os.environ, "MEMLM_NATIVE": "0"}
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and "fallbacks ok" in done.stdout, done.stderr


def test_bf16_matmul_decision_reads_the_one_cpu_probe(monkeypatch):
    assert cpu.cpu_flags() == cpu.cpu_flags() and isinstance(cpu.cpu_flags(), frozenset)
    assert cpu.bf16_matmul_is_fast(torch.device("cuda"))
    assert not cpu.bf16_matmul_is_fast(torch.device("meta"))
    monkeypatch.setattr(cpu, "cpu_flags", lambda: frozenset({"avx2", "amx_bf16"}))
    assert cpu.bf16_matmul_is_fast(torch.device("cpu"))
    monkeypatch.setattr(cpu, "cpu_flags", lambda: frozenset({"avx2", "avx512f"}))
    assert not cpu.bf16_matmul_is_fast(torch.device("cpu"))
