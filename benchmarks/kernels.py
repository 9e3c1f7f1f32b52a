"""Micro-benchmarks of memlm's native kernels against what they replace, in one process.

- decode attention over a paged KV cache, SmolLM2's shape (9 query / 3 KV heads of 64, 16-token
  blocks, 30 layers of 64 sequences x 272 tokens, each layer in its own cache region so nothing
  stays in cache between layers): the kernel memlm uses (AVX-512 where built) against the
  generic C body and against gather + SDPA; block tables in order or shuffled.
- the bf16 LM head's logits (64 rows x 49,152): native widening + exact top-16 against the torch
  version; greedy argmax: native against torch.

    python benchmarks/kernels.py [--threads 1]
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F


def timed(fn, repeats: int = 3) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def decode_attention(shuffled: bool) -> None:
    from memlm.kernels import attention as pa
    B, ctx, nh, nkv, hd, bs, layers = 64, 272, 9, 3, 64, 16, 30
    nb = -(-ctx // bs)
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(B * nb * layers, generator=g) if shuffled else torch.arange(B * nb * layers)
    tables = [order[i * B * nb:(i + 1) * B * nb].view(B, nb).contiguous() for i in range(layers)]
    q = torch.randn(B, nh, hd, generator=g)
    lens = torch.full((B,), ctx, dtype=torch.long)
    slots = B * nb * bs * layers
    print(f"decode attention, {layers} layers x {B} sequences x {ctx} tokens, "
          f"{'shuffled' if shuffled else 'in-order'} blocks (ms per 30 layers):")
    for name, dt in (("fp16", torch.float16), ("int8", torch.int8), ("fp32", torch.float32)):
        if dt == torch.int8:
            kc = torch.randint(-127, 128, (slots, nkv, hd), dtype=torch.int8, generator=g)
        else:
            kc = torch.randn(slots, nkv, hd, generator=g).to(dt)
        vc = kc.clone()
        ks = torch.rand(slots, nkv, generator=g) / 64
        vs = ks.clone()
        kind = {torch.float16: "f16", torch.float32: "f32", torch.int8: "i8"}[dt]
        generic = getattr(pa._LIBRARY.lib, f"decode_generic_{kind}_hd64", None)

        def run_generic():
            out = torch.empty_like(q)
            for t in tables:
                generic(q.data_ptr(), kc.data_ptr(), vc.data_ptr(), ks.data_ptr(), vs.data_ptr(), t.data_ptr(),
                        lens.data_ptr(), out.data_ptr(), B, nh, nkv, hd, bs, nb, hd ** -0.5)

        def run_kernel():
            for t in tables:
                pa.decode_attention(q, kc, vc, t, lens, bs, ks, vs)

        def gather(cache, scales, t):              # what kv.store.KVStore.gather does
            x = cache.view(-1, bs, nkv, hd)[t].view(B, nb * bs, nkv, hd).float()
            if dt == torch.int8:
                x = x * scales.view(-1, bs, nkv)[t].view(B, nb * bs, nkv, 1)
            return x.transpose(1, 2)

        def run_sdpa():
            for t in tables[:3]:                     # 3 layers, scaled x10: it is slow
                F.scaled_dot_product_attention(q.view(B, nkv, nh // nkv, hd), gather(kc, ks, t), gather(vc, vs, t))

        kernel = timed(run_kernel) * 1e3
        line = f"  {name}: memlm kernel {kernel:6.1f}"
        if generic is not None:
            generic.restype, generic.argtypes = None, pa._SIGNATURE
            base = timed(run_generic) * 1e3
            line += f" | generic C {base:6.1f} ({base / kernel:.2f}x)"
        sdpa = timed(run_sdpa, 1) * 1e4
        line += f" | gather + SDPA {sdpa:6.1f} ({sdpa / kernel:.2f}x)"
        bytes_read = 2 * B * ctx * layers * nkv * hd * kc.element_size()
        print(line + f" | {bytes_read / kernel / 1e6:.1f} GB/s of K/V")


def logits() -> None:
    from memlm.kernels import fused_ops
    g = torch.Generator().manual_seed(1)
    n, V, H = 64, 49152, 576
    hidden = torch.randn(n, H, generator=g)
    w = (torch.randn(V, H, generator=g) / 24).to(torch.bfloat16)
    y = (hidden.to(torch.bfloat16) @ w.T)
    native = timed(lambda: fused_ops.bf16_logits_refine(y, hidden, w, 16)) * 1e3

    def torch_version():
        out = y.float()
        top = out.topk(16, dim=-1).indices
        return out.scatter_(1, top, torch.einsum("nh,nkh->nk", hidden, w[top].float()))
    base = timed(torch_version) * 1e3
    x = torch.randn(n, V, generator=g)
    am = timed(lambda: fused_ops.row_argmax(x)) * 1e3
    am_t = timed(lambda: x.argmax(-1)) * 1e3
    print(f"bf16 logits, {n} x {V}: widen + exact top-16 native {native:.2f} ms | torch {base:.2f} ms "
          f"({base / native:.2f}x); argmax native {am:.2f} ms | torch {am_t:.2f} ms ({am_t / am:.2f}x)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from memlm.kernels import attention as paged_attention, fused_ops
    if not (paged_attention.available() and fused_ops.available()):
        raise SystemExit("error: the native kernels did not build (no C compiler?); nothing to measure")
    print(f"threads {args.threads}")
    decode_attention(shuffled=False)
    decode_attention(shuffled=True)
    logits()


if __name__ == "__main__":
    main()
