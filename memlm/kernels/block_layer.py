"""A decoder layer's two fused decode steps on GGUF block weights, one native call each.

Owns: the wrappers of `csrc/decode_q.c`'s `block_attn_in` (rms_norm -> q|k|v projection (+ bias)
-> RoPE -> bf16) and `block_attn_out_mlp` (x += o_proj(attn); x += down(silu(gate) * up) of
rms_norm(x), in place), with their torch reference (`*_reference`: the same math through
`gemv.dequantize` and fp32 matmuls, what the tests compare against), and `usable`, the check
that a step of M rows may take this path: the native library is built, 8-bit activations are
chosen (`gemv.int8_activations`: AVX-512 VNNI, or `MEMLM_INT8_ACTIVATIONS=1`) and M is at most
MAX_ROWS. Activations are quantized to 8 bits per block of 32 inside (see decode_q.c); scratch
is a few rows of the layer's widths (under 0.2 MiB at MAX_ROWS rows for SmolLM2), allocated per call.
`decode_layers` runs every layer of a decode step as one native call each (`block_layer_step`:
both steps around the new k / v rows written into a float paged cache and the native paged
attention, called by address) where the cache offers it (`kv.paged_view.PagedView.direct_decode`);
each layer's constants are packed once (`LayerArgs`).
Does not know: layers or which cache layouts exist (`memlm.models.blocks` calls the two steps
around `kv.attend`; `memlm.models.transformer` hands `decode_layers` the cache's `direct_decode`),
or how the blocks were loaded (`memlm.kernels.gemv.BlockWeight`).
"""
from __future__ import annotations

import ctypes

import torch
import torch.nn.functional as F

from memlm.kernels import gemv

MAX_ROWS = 8       # decode batches up to this many rows; more go through the per-projection path


def usable(rows: int) -> bool:
    return 0 < rows <= MAX_ROWS and gemv.int8_activations()


def weights_fit(*weights: gemv.BlockWeight) -> bool:
    """True when each weight is a Q8_0 / Q4_0 / Q4_1 `BlockWeight` (K-quants take their own kernels)
    whose K is a whole number of blocks (no padding: x is passed as is)."""
    return all(w.codec in gemv.CODECS and w.padded_in == w.in_features for w in weights)


def _type(w: gemv.BlockWeight) -> int:
    return gemv.GGML_TYPE_IDS[w.codec]


def attn_in(x: torch.Tensor, norm_w: torch.Tensor, eps: float, qkv: gemv.BlockWeight,
            bias: torch.Tensor | None, cos: torch.Tensor | None, sin: torch.Tensor | None,
            n_rot: int, head_dim: int) -> torch.Tensor:
    """x (M, H) fp32 contiguous -> (M, Nqkv) bf16: rope(rms_norm(x) @ W.T + bias) where the first
    n_rot heads of head_dim are rotated by cos / sin (M, head_dim) fp32 (None: no RoPE)."""
    m, h = x.shape
    out = torch.empty(m, qkv.out_features, dtype=torch.bfloat16)
    if cos is None:
        n_rot, cos_p, sin_p = 0, None, None
    else:
        cos_p, sin_p = cos.data_ptr(), sin.data_ptr()
    gemv.DECODE_LIBRARY.lib.block_attn_in(
        x.data_ptr(), norm_w.data_ptr(), eps, _type(qkv), qkv.blocks.data_ptr(),
        None if bias is None else bias.data_ptr(), cos_p, sin_p, out.data_ptr(),
        m, h, qkv.out_features, n_rot, head_dim)
    return out


def attn_out_mlp_(x: torch.Tensor, attn: torch.Tensor, norm_w: torch.Tensor, eps: float,
                  o: gemv.BlockWeight, gate_up: gemv.BlockWeight, down: gemv.BlockWeight) -> torch.Tensor:
    """x (M, H) fp32 contiguous, updated in place and returned; attn (M, Ko) bf16 contiguous."""
    m, h = x.shape
    gemv.DECODE_LIBRARY.lib.block_attn_out_mlp(
        x.data_ptr(), attn.data_ptr(), norm_w.data_ptr(), eps, _type(o), o.blocks.data_ptr(),
        _type(gate_up), gate_up.blocks.data_ptr(), _type(down), down.blocks.data_ptr(),
        m, h, o.in_features, down.in_features)
    return x


class LayerArgs(ctypes.Structure):
    """decode_q.c's layer_args: one decoder layer's constants. Holds the tensors it points into."""
    _fields_ = [(n, ctypes.c_void_p) for n in ("attn_norm", "qkv_bias", "mlp_norm", "Wqkv", "Wo", "Wgu", "Wd")] \
        + [(n, ctypes.c_float) for n in ("attn_eps", "mlp_eps", "scale")] \
        + [(n, ctypes.c_int) for n in ("type_qkv", "type_o", "type_gu", "type_d", "H", "n_heads", "n_kv",
                                       "hd", "I", "rope")]


def layer_args(attn_norm: torch.Tensor, attn_eps: float, qkv: gemv.BlockWeight, bias: torch.Tensor | None,
               mlp_norm: torch.Tensor, mlp_eps: float, o: gemv.BlockWeight, gate_up: gemv.BlockWeight,
               down: gemv.BlockWeight, n_heads: int, n_kv: int, head_dim: int, rope: bool) -> LayerArgs | None:
    """Norm weights fp32 contiguous, bias fp32 contiguous or None; None without the library."""
    if gemv.DECODE_LIBRARY.lib is None:
        return None
    args = LayerArgs(attn_norm.data_ptr(), None if bias is None else bias.data_ptr(), mlp_norm.data_ptr(),
                     qkv.blocks.data_ptr(), o.blocks.data_ptr(), gate_up.blocks.data_ptr(),
                     down.blocks.data_ptr(), attn_eps, mlp_eps, head_dim ** -0.5, _type(qkv), _type(o),
                     _type(gate_up), _type(down), attn_norm.shape[0], n_heads, n_kv, head_dim,
                     down.in_features, int(rope))
    args.held, args.step, args.usable = (attn_norm, bias, mlp_norm, qkv, o, gate_up, down), gemv.DECODE_LIBRARY.lib.block_layer_step, usable
    return args


def decode_layers(args: list, x: torch.Tensor, rope: tuple | None, direct) -> torch.Tensor | None:
    """Every layer of a decode step through its whole-layer native call (`block_layer_step`, or
    `dense_layer.LayerArgs`'s `dense_layer_step`), the loop kept to one call a layer: x (M, H) the
    embedded tokens (not modified), args the layers' `LayerArgs` in depth order (each knows its
    `step`), `direct` the cache's `direct_decode`. None (nothing run) when the cache does not offer
    the step; else the residual stream after the last layer."""
    if direct(0) is None:
        return None
    m = x.shape[0]
    x = x.float().clone(memory_format=torch.contiguous_format)
    cos = sin = None
    if rope is not None:
        cos, sin = (t.reshape(m, -1).contiguous() for t in rope)
    xp, cp, sp = x.data_ptr(), None if cos is None else cos.data_ptr(), None if sin is None else sin.data_ptr()
    for depth, a in enumerate(args):
        a.step(ctypes.byref(a), xp, cp, sp, m, *direct(depth))
    return x


def attn_in_reference(x, norm_w, eps, qkv: gemv.BlockWeight, bias, cos, sin, n_rot: int,
                      head_dim: int) -> torch.Tensor:
    """`attn_in` in fp32 torch on the dequantized weight (no activation rounding)."""
    y = F.rms_norm(x, (x.shape[-1],), norm_w, eps) @ gemv.dequantize(qkv).t()
    if bias is not None:
        y = y + bias.float()
    if cos is not None and n_rot:
        m, half = x.shape[0], head_dim // 2
        t = y[:, :n_rot * head_dim].view(m, n_rot, head_dim)
        rotated = torch.cat((-t[..., half:], t[..., :half]), dim=-1)
        y = torch.cat([(t * cos[:, None] + rotated * sin[:, None]).reshape(m, -1), y[:, n_rot * head_dim:]], dim=1)
    return y.to(torch.bfloat16)


def attn_out_mlp_reference(x, attn, norm_w, eps, o: gemv.BlockWeight, gate_up: gemv.BlockWeight,
                           down: gemv.BlockWeight) -> torch.Tensor:
    """`attn_out_mlp_` in fp32 torch on the dequantized weights, returning a new tensor."""
    x = x + attn.float() @ gemv.dequantize(o).t()
    g, u = (F.rms_norm(x, (x.shape[-1],), norm_w, eps) @ gemv.dequantize(gate_up).t()).chunk(2, dim=-1)
    return x + (F.silu(g) * u) @ gemv.dequantize(down).t()
