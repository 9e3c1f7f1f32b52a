"""Decode attention straight from the paged KV cache (CPU): the native kernel and its torch reference.

Owns: `decode_attention(...)` over `csrc/paged_attention.c` (built and loaded by `native.py`;
the kernel's design notes and timings head that file) and `decode_attention_reference(...)`,
the plain-torch math it is tested against and falls back to. Both can add each key's softmax
weight into a `mass` buffer as they compute (H2O's accumulated attention, `kv/policies.py`). Where no compiler is found, the
build fails, or MEMLM_NATIVE=0, `available()` is False; `kv.paged_view.PagedView` then uses its own
batched gather + SDPA instead (same results up to float rounding).
Does not know: block ownership or scheduling.
"""
from __future__ import annotations

import ctypes

import torch

from memlm.kernels import native

_SIGNATURE = [ctypes.c_void_p] * 9 + [ctypes.c_int] * 6 + [ctypes.c_float]
_LIBRARY = native.Library("paged_attention", "paged_attention.c",
                          {f"paged_decode_attention_{t}{h}": _SIGNATURE
                           for t in ("f32", "f16", "i8") for h in ("", "_hd64")})
_KINDS = {torch.float16: "f16", torch.float32: "f32", torch.int8: "i8"}


def available() -> bool:
    """True when the native kernel is built and loadable (built on first call)."""
    return _LIBRARY.lib is not None


def kernel_address(cache_dtype: torch.dtype, head_dim: int, block_size: int) -> int | None:
    """The address of the native kernel `decode_attention` calls for this cache (for a native
    caller: `block_layer.decode_layers`), or None where it is not built."""
    if not available():
        return None
    fn = getattr(_LIBRARY.lib, f"paged_decode_attention_{_KINDS[cache_dtype]}"
                               f"{'_hd64' if (head_dim, block_size) == (64, 16) else ''}")
    return ctypes.cast(fn, ctypes.c_void_p).value


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     block_tables: torch.Tensor, lens: torch.Tensor, block_size: int,
                     k_scales: torch.Tensor | None = None, v_scales: torch.Tensor | None = None,
                     mass: torch.Tensor | None = None) -> torch.Tensor:
    """One query token per sequence attending to its whole cached context.

    Args:
        q: (B, nh, hd) fp32 contiguous.
        k_cache, v_cache: (slots, nkv, hd) fp32, fp16 or int8, contiguous (one layer of the KVStore).
        block_tables: (B, max_nb) int64; lens: (B,) int64 context lengths (incl. this token).
        k_scales, v_scales: (slots, nkv) fp32 row scales, int8 caches only.
        mass: (B, nkv, max_nb * block_size) fp32 contiguous, or None: each key's attention
            weight, summed over the query heads of its KV head, is added to it.
    Returns:
        (B, nh, hd) fp32.
    """
    if k_cache.dtype == torch.int8 and (k_scales is None or v_scales is None):
        raise ValueError("an int8 KV cache needs its k/v scales")
    if not available() or k_cache.device.type != "cpu":
        return decode_attention_reference(q, k_cache, v_cache, block_tables, lens, block_size,
                                          k_scales, v_scales, mass)
    B, nh, hd = q.shape
    nkv = k_cache.shape[1]
    if mass is not None and (mass.dtype != torch.float32 or not mass.is_contiguous()
                             or tuple(mass.shape) != (B, nkv, block_tables.shape[1] * block_size)):
        raise ValueError(f"mass must be a contiguous fp32 (B, nkv, max_nb * block_size) tensor, "
                         f"got {tuple(mass.shape)} {mass.dtype}")
    out = torch.empty_like(q)
    kind = _KINDS[k_cache.dtype]
    fn = getattr(_LIBRARY.lib, f"paged_decode_attention_{kind}{'_hd64' if (hd, block_size) == (64, 16) else ''}")
    fn(q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
       0 if k_scales is None else k_scales.data_ptr(), 0 if v_scales is None else v_scales.data_ptr(),
       block_tables.data_ptr(), lens.data_ptr(), out.data_ptr(),
       0 if mass is None else mass.data_ptr(), B, nh, nkv, hd, block_size, block_tables.shape[1], hd ** -0.5)
    return out


def decode_attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               block_tables: torch.Tensor, lens: torch.Tensor, block_size: int,
                               k_scales: torch.Tensor | None = None,
                               v_scales: torch.Tensor | None = None,
                               mass: torch.Tensor | None = None) -> torch.Tensor:
    """`decode_attention` in plain torch, one sequence at a time (same arguments and result)."""
    B, nh, hd = q.shape
    nkv = k_cache.shape[1]
    out = torch.empty(B, nh, hd, dtype=torch.float32, device=q.device)
    offsets = torch.arange(block_size, device=block_tables.device)
    for b in range(B):
        L = int(lens[b])
        slots = (block_tables[b, :, None] * block_size + offsets).flatten()[:L]      # (L,)
        k, v = k_cache[slots].float(), v_cache[slots].float()                        # (L, nkv, hd)
        if k_scales is not None:
            k, v = k * k_scales[slots, :, None], v * v_scales[slots, :, None]
        k = k.transpose(0, 1).repeat_interleave(nh // nkv, 0)                          # (nh, L, hd)
        v = v.transpose(0, 1).repeat_interleave(nh // nkv, 0)
        p = torch.softmax(q[b, :, None].float() @ k.transpose(1, 2) * hd ** -0.5, dim=-1)  # (nh, 1, L)
        out[b] = (p @ v)[:, 0]
        if mass is not None:
            mass[b, :, :L] += p[:, 0].view(nkv, nh // nkv, L).sum(1)                     # (nkv, L)
    return out
