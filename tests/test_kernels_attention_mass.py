"""H2O attention mass from the decode kernel (and the torch path) against the torch reference."""
import pytest
import torch

from memlm.kernels import attention as A
from memlm.kv.paged_view import DecodeGroup, PagedBatch, PagedView
from memlm.kv.store import KVStore


def _cache(dt, slots, nkv, hd):
    kc, vc = torch.randn(slots, nkv, hd), torch.randn(slots, nkv, hd)
    if dt != torch.int8:
        return kc.to(dt), vc.to(dt), None, None
    ks, vs = kc.abs().amax(-1) / 127, vc.abs().amax(-1) / 127
    return (torch.round(kc / ks[..., None]).to(torch.int8), torch.round(vc / vs[..., None]).to(torch.int8),
            ks, vs)


@pytest.mark.parametrize("hd, bs, nh, nkv, dt", [
    (64, 16, 9, 3, torch.float16),     # SmolLM2's shape: the AVX-512 head-64 body accumulates mass itself
    (64, 16, 4, 2, torch.int8),
    (64, 16, 8, 1, torch.float32),     # a group of 8 query heads (the AVX-512 body's widest)
    (64, 16, 2, 2, torch.float16),     # no grouping
    (32, 4, 4, 2, torch.float32),
])
def test_kernel_mass_equals_the_reference(hd, bs, nh, nkv, dt):
    torch.manual_seed(0)
    B, nb = 3, 5
    kc, vc, ks, vs = _cache(dt, 40 * bs, nkv, hd)
    q = torch.randn(B, nh, hd)
    tables = torch.randperm(40)[:B * nb].view(B, nb)
    lens = torch.tensor([nb * bs, nb * bs - 5, 7])
    got, want = torch.ones(B, nkv, nb * bs), torch.ones(B, nkv, nb * bs)     # accumulates
    o1 = A.decode_attention(q, kc, vc, tables, lens, bs, ks, vs, got)
    o2 = A.decode_attention_reference(q, kc, vc, tables, lens, bs, ks, vs, want)
    torch.testing.assert_close(o1, o2, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)
    # each query head's weights sum to 1; nothing lands past a sequence's length
    assert (got - 1).sum(-1).sum(-1).tolist() == pytest.approx([nh] * B, abs=1e-4)
    assert bool((got[2, :, 7:] == 1).all())
    o3 = A.decode_attention(q, kc, vc, tables, lens, bs, ks, vs)             # no mass: same output
    torch.testing.assert_close(o1, o3, atol=2e-5, rtol=1e-4)


def test_bad_mass_buffer_is_refused():
    kc, vc, _, _ = _cache(torch.float32, 64, 2, 32)
    q, tables, lens = torch.randn(1, 4, 32), torch.tensor([[0, 1]]), torch.tensor([20])
    if A.available():
        with pytest.raises(ValueError, match="mass must be a contiguous fp32"):
            A.decode_attention(q, kc, vc, tables, lens, 16, mass=torch.zeros(1, 2, 16))


@pytest.mark.parametrize("native", [True, False])
def test_paged_view_reports_the_same_mass_native_or_torch(native):
    torch.manual_seed(1)
    store = KVStore((0,), 8, 4, 2, 16, "fp32")
    store.native_decode = native and store.native_decode
    k, v = torch.randn(12, 2, 16), torch.randn(12, 2, 16)
    store.write(0, torch.arange(12), k, v)
    q = torch.randn(2, 4, 16)
    tables, lens = torch.tensor([[0, 1, 2], [2, 0, 0]]), torch.tensor([11, 3])
    mask = (torch.arange(12)[None, :] < lens[:, None])[:, None, None, :]
    group = DecodeGroup(0, 2, tables, lens, mask, [0, 1], torch.zeros(2, 2, 12))
    view = PagedView(store, PagedBatch(torch.tensor([10, 2]), [], [group]))
    kc, vc, _, _ = store.layer(0)
    view.attend(0, q, kc[torch.tensor([10, 2])].clone(), vc[torch.tensor([10, 2])].clone())
    want = torch.zeros(2, 2, 12)
    A.decode_attention_reference(q, kc, vc, tables, lens, 4, mass=want)
    torch.testing.assert_close(group.mass, want, atol=2e-6, rtol=1e-5)
