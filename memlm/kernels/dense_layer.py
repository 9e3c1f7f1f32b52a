"""Decode on plain bf16 weights: a native matmul, an exact LM head and a decoder layer's two fused
steps, one native call each (`csrc/decode_bf16.c`), with their torch references.

Owns: the wrappers of decode_bf16.c —

    matmul(x, w)                      (M, K) fp32 . w (N, K) bf16 -> (M, N) fp32 (x rounded to bf16)
    head(x, w)                        the same with x unrounded: fp32 products and sums (greedy
                                      picks as exact as an fp32 head over the bf16 rows)
    attn_in(x, ...)                   rms_norm -> q|k|v projection (+ bias) -> RoPE -> (M, Nqkv) bf16
    attn_out_mlp_(x, attn, ...)       x += o_proj(attn); x += down(silu(gate) * up) of rms_norm(x)

— their torch references (`*_reference`, the same math and bf16 roundings in torch: what the
tests compare against), and `usable`, whether a step of M rows may take this path (the
library is built and M <= MAX_ROWS). The fused steps round to bf16 where the bf16 method's
torch path (`DecoderLayer._forward_fused`) rounds, so the two agree up to fp32 summation order.
Scratch: a few rows of the layer's widths per call (under 50 KiB at MAX_ROWS rows for SmolLM2).
`LayerArgs` packs a layer's constants once for the whole-layer call (`dense_layer_step`: both steps
around the cache write and the native paged attention, the same roundings), which
`block_layer.decode_layers` runs for every layer of a decode step.
Does not know: layers, attention or the KV cache (`memlm.models.blocks` calls these around
`kv.attend`), or how the weights were loaded (`memlm.models.linear.bf16` holds them plain).
"""
from __future__ import annotations

import ctypes

import torch
import torch.nn.functional as F

from memlm.kernels import native

MAX_ROWS = 8       # decode batches up to this many rows; more go through oneDNN's bf16 matmul

_P, _I, _F = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
LIBRARY = native.Library("decode_bf16", "decode_bf16.c", {
    "dense_matmul": [_P, _P, _P, _I, _I, _I],
    "dense_head": [_P, _P, _P, _I, _I, _I],
    "dense_attn_in": [_P, _P, _F, _P, _P, _P, _P, _P, _I, _I, _I, _I, _I],
    "dense_attn_out_mlp": [_P, _P, _P, _F, _P, _P, _P, _I, _I, _I, _I],
    "dense_layer_step": [_P, _P, _P, _P, _I, _P, _P, _I, _P, _P, _P, _I, _I, _P],
})


class LayerArgs(ctypes.Structure):
    """decode_bf16.c's dense_args: one decoder layer's constants. Holds the tensors it points
    into; `step` is the native whole-layer call (`block_layer.decode_layers` runs it)."""
    _fields_ = [(n, ctypes.c_void_p) for n in ("attn_norm", "qkv_bias", "mlp_norm", "Wqkv", "Wo", "Wgu", "Wd")] \
        + [(n, ctypes.c_float) for n in ("attn_eps", "mlp_eps", "scale")] \
        + [(n, ctypes.c_int) for n in ("H", "n_heads", "n_kv", "hd", "I", "rope")]


def layer_args(attn_norm: torch.Tensor, attn_eps: float, qkv: torch.Tensor, bias: torch.Tensor | None,
               mlp_norm: torch.Tensor, mlp_eps: float, o: torch.Tensor, gate_up: torch.Tensor,
               down: torch.Tensor, n_heads: int, n_kv: int, head_dim: int, rope: bool) -> LayerArgs | None:
    """Norm weights and bias fp32 contiguous, the weights plain bf16; None without the library."""
    if not available():
        return None
    for w in (qkv, o, gate_up, down):
        _check(w)
    args = LayerArgs(attn_norm.data_ptr(), None if bias is None else bias.data_ptr(), mlp_norm.data_ptr(),
                     qkv.data_ptr(), o.data_ptr(), gate_up.data_ptr(), down.data_ptr(), attn_eps, mlp_eps,
                     head_dim ** -0.5, attn_norm.shape[0], n_heads, n_kv, head_dim, down.shape[1], int(rope))
    args.held, args.step, args.usable = (attn_norm, bias, mlp_norm, qkv, o, gate_up, down), LIBRARY.lib.dense_layer_step, usable
    return args


def available() -> bool:
    """True when the native library is built and loadable (built on first call)."""
    return LIBRARY.lib is not None


def usable(rows: int) -> bool:
    return 0 < rows <= MAX_ROWS and available()


def _check(w: torch.Tensor) -> None:
    if w.dtype != torch.bfloat16 or w.dim() != 2 or not w.is_contiguous() or w.device.type != "cpu":
        raise ValueError(f"dense_layer needs a contiguous 2-D bf16 CPU weight, got {w.dtype} {tuple(w.shape)} "
                         f"on {w.device}: hold the layer with the bf16 method unpacked")


def matmul(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x (M, K) float -> (M, N) fp32 = bf16(x) @ w.T, fp32 accumulation."""
    _check(w)
    x = x.float().contiguous()
    if not available():
        return F.linear(x.bfloat16().float(), w.float())
    y = torch.empty(x.shape[0], w.shape[0], dtype=torch.float32)
    LIBRARY.lib.dense_matmul(w.data_ptr(), x.data_ptr(), y.data_ptr(), x.shape[0], w.shape[0], w.shape[1])
    return y


def head(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x (M, K) fp32 -> (M, N) fp32 = x @ w.float().T: exact products, fp32 sums (the LM head)."""
    _check(w)
    x = x.float().contiguous()
    if not available():
        return F.linear(x, w.float())
    y = torch.empty(x.shape[0], w.shape[0], dtype=torch.float32)
    LIBRARY.lib.dense_head(w.data_ptr(), x.data_ptr(), y.data_ptr(), x.shape[0], w.shape[0], w.shape[1])
    return y


def attn_in(x: torch.Tensor, norm_w: torch.Tensor, eps: float, qkv: torch.Tensor, bias: torch.Tensor | None,
            cos: torch.Tensor | None, sin: torch.Tensor | None, n_rot: int, head_dim: int) -> torch.Tensor:
    """x (M, H) fp32 contiguous -> (M, Nqkv) bf16: rope(rms_norm(x) @ qkv.T + bias) where the first
    n_rot heads of head_dim are rotated by cos / sin (M, head_dim) fp32 (None: no RoPE); bias fp32."""
    m, h = x.shape
    out = torch.empty(m, qkv.shape[0], dtype=torch.bfloat16)
    cos_p, sin_p = (None, None) if cos is None else (cos.data_ptr(), sin.data_ptr())
    LIBRARY.lib.dense_attn_in(x.data_ptr(), norm_w.data_ptr(), eps, qkv.data_ptr(),
                              None if bias is None else bias.data_ptr(), cos_p, sin_p, out.data_ptr(),
                              m, h, qkv.shape[0], n_rot if cos is not None else 0, head_dim)
    return out


def attn_out_mlp_(x: torch.Tensor, attn: torch.Tensor, norm_w: torch.Tensor, eps: float, o: torch.Tensor,
                  gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """x (M, H) fp32 contiguous, updated in place and returned; attn (M, Ko) bf16 contiguous."""
    m, h = x.shape
    LIBRARY.lib.dense_attn_out_mlp(x.data_ptr(), attn.data_ptr(), norm_w.data_ptr(), eps, o.data_ptr(),
                                   gate_up.data_ptr(), down.data_ptr(), m, h, o.shape[1], down.shape[1])
    return x


def _bf16_out(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """A bf16 matmul as the bf16 method's: fp32 sums of bf16 products (+ bias), rounded to bf16."""
    y = x.float() @ w.float().t()
    return (y if bias is None else y + bias.float()).to(torch.bfloat16)


def _rms_norm_bf16(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return F.rms_norm(x.float(), (x.shape[-1],), w, eps).to(torch.bfloat16)


def attn_in_reference(x, norm_w, eps, qkv: torch.Tensor, bias, cos, sin, n_rot: int, head_dim: int) -> torch.Tensor:
    """`attn_in` in torch: bf16 norm, an fp32-accumulated matmul rounded to bf16, then RoPE in fp32
    on the rounded heads (fused_ops.c's rope_bf16), rounded again."""
    y = _bf16_out(_rms_norm_bf16(x, norm_w, eps), qkv, bias)
    if cos is not None and n_rot:
        m, half = x.shape[0], head_dim // 2
        t = y[:, :n_rot * head_dim].float().view(m, n_rot, head_dim)
        rotated = torch.cat((-t[..., half:], t[..., :half]), dim=-1)
        y[:, :n_rot * head_dim] = (t * cos[:, None] + rotated * sin[:, None]).reshape(m, -1).to(torch.bfloat16)
    return y


def attn_out_mlp_reference(x, attn, norm_w, eps, o: torch.Tensor, gate_up: torch.Tensor,
                           down: torch.Tensor) -> torch.Tensor:
    """`attn_out_mlp_` in torch with the same bf16 roundings, returning a new tensor."""
    x = x + _bf16_out(attn, o).float()
    g, u = _bf16_out(_rms_norm_bf16(x, norm_w, eps), gate_up).float().chunk(2, dim=-1)
    return x + _bf16_out((F.silu(g) * u).to(torch.bfloat16), down).float()
