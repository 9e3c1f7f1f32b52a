"""Decode attention over int4 / int2 KIVI KV blocks (CPU): the native kernel and its torch reference.

Owns: `decode_attention(...)` over `csrc/paged_attention_kivi.c` (built and loaded by
`native.py`; its design notes head that file) and `decode_attention_reference(...)`, the
plain-torch math it is tested against and falls back to (MEMLM_NATIVE=0, no compiler, not CPU);
both add H2O's attention mass when given a buffer.
Does not know: the codec's encoding side or the window's bookkeeping (`kv/codecs.py`,
`kv/window.py`); it reads their tensors as documented there.
"""
from __future__ import annotations

import ctypes

import torch

from memlm.kernels import native
from memlm.kv import codecs

_SIGNATURE = [ctypes.c_void_p] * 12 + [ctypes.c_int] * 8 + [ctypes.c_float]
_LIBRARY = native.Library("paged_attention_kivi", "paged_attention_kivi.c",
                          {f"paged_decode_attention_kivi{b}": _SIGNATURE for b in (4, 2)})


def available() -> bool:
    """True when the native kernel is built and loadable (built on first call)."""
    return _LIBRARY.lib is not None


def decode_attention(q, k_codes, v_codes, k_params, v_params, win_k, win_v, stage_of_block,
                     block_tables, lens, block_size: int, bits: int, group: int,
                     mass: torch.Tensor | None = None) -> torch.Tensor:
    """One query token per sequence attending to its whole cached context, codes read in place.

    Args:
        q: (B, nh, hd) fp32 contiguous.
        k_codes, v_codes: (slots, nkv, hd * bits / 8) uint8 (one layer of a `KiviCodec`).
        k_params: (num_blocks, nkv, 2, hd) fp16 key (scale, min) per block; rows may be strided.
        v_params: (slots, nkv, hd / group, 2) fp16 value (scale, min) per token and group.
        win_k, win_v: (stages * block_size, nkv, hd) fp16 window; stage_of_block (num_blocks,)
            int32, -1 where a block is encoded.
        block_tables: (B, max_nb) int64; lens: (B,) int64 context lengths (incl. this token).
        mass: (B, nkv, max_nb * block_size) fp32 contiguous, or None: each key's attention
            weight, summed over the query heads of its KV head, is added to it (H2O).
    Returns:
        (B, nh, hd) fp32.
    """
    args = (q, k_codes, v_codes, k_params, v_params, win_k, win_v, stage_of_block, block_tables,
            lens, block_size, bits, group)
    B, nh, hd = q.shape
    nkv = k_codes.shape[1]
    if mass is not None and (mass.dtype != torch.float32 or not mass.is_contiguous()
                             or tuple(mass.shape) != (B, nkv, block_tables.shape[1] * block_size)):
        raise ValueError(f"mass must be a contiguous fp32 (B, nkv, max_nb * block_size) tensor, "
                         f"got {tuple(mass.shape)} {mass.dtype}")
    if not available() or q.device.type != "cpu":
        return decode_attention_reference(*args, mass=mass)
    if k_params.stride(1) != 2 * hd or k_params.stride(2) != hd or k_params.stride(3) != 1:
        raise ValueError("k_params rows must be (nkv, 2, hd) contiguous within a block")
    out = torch.empty_like(q)
    fn = getattr(_LIBRARY.lib, f"paged_decode_attention_kivi{bits}")
    tensors = (q, k_codes, v_codes, k_params, v_params, win_k, win_v, stage_of_block, block_tables, lens, out)
    fn(*(t.data_ptr() for t in tensors), 0 if mass is None else mass.data_ptr(), B, nh, nkv, hd, block_size, block_tables.shape[1], group,
       k_params.stride(0), hd ** -0.5)
    return out


def decode_attention_reference(q, k_codes, v_codes, k_params, v_params, win_k, win_v, stage_of_block,
                               block_tables, lens, block_size: int, bits: int, group: int,
                               mass: torch.Tensor | None = None) -> torch.Tensor:
    """`decode_attention` in plain torch, one sequence at a time (same arguments and result)."""
    B, nh, hd = q.shape
    nkv = k_codes.shape[1]
    out = torch.empty(B, nh, hd, dtype=torch.float32, device=q.device)
    wk = win_k.view(-1, block_size, nkv, hd)
    wv = win_v.view(-1, block_size, nkv, hd)
    for b in range(B):
        L = int(lens[b])
        blocks = block_tables[b, :-(-L // block_size)]                                # (nb,)
        kc = k_codes.view(-1, block_size, *k_codes.shape[1:])[blocks]                # (nb, bs, nkv, hb)
        vc = v_codes.view(-1, block_size, *v_codes.shape[1:])[blocks]
        k = codecs.dequantize_keys(kc, k_params[blocks], bits)                        # (nb, bs, nkv, hd)
        vpar = v_params.view(-1, block_size, *v_params.shape[1:])[blocks]
        v = codecs.dequantize_values(vc, vpar, bits, group)
        st = stage_of_block[blocks].long()
        staged = st >= 0
        k[staged], v[staged] = wk[st[staged]].float(), wv[st[staged]].float()
        k = k.flatten(0, 1)[:L].transpose(0, 1).repeat_interleave(nh // nkv, 0)      # (nh, L, hd)
        v = v.flatten(0, 1)[:L].transpose(0, 1).repeat_interleave(nh // nkv, 0)
        p = torch.softmax(q[b, :, None].float() @ k.transpose(1, 2) * hd ** -0.5, dim=-1)  # (nh, 1, L)
        out[b] = (p @ v)[:, 0]
        if mass is not None:                                                         # (nkv, L)
            mass[b, :, :L] += p[:, 0].view(nkv, nh // nkv, L).sum(1)
    return out
