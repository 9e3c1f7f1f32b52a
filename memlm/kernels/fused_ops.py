"""Fused elementwise kernels for the bf16-matmul decoder layer (CPU), with torch fallbacks.

Owns: the wrappers of `csrc/fused_ops.c` (built and loaded by `native.py`) and their torch
code: memory-bound steps of a Llama-style layer, each done in one pass over its rows instead of
the 3-6 separate torch ops (and fp32<->bf16 copies) they take otherwise:

    rms_norm_bf16(x, w)          fp32 residual -> normalized, scaled, rounded to bf16
    add_rms_norm_bf16(x, y, w)   x + y (fp32) and its bf16 norm, in one pass
    rope_bf16_(t, n, cos, sin)   rotary embedding of the first n heads of a bf16 row, in place
    silu_mul_bf16(gu)            silu(gate) * up of a fused [gate | up] bf16 row
    bf16_logits_refine(y, h, w)  a bf16 LM head's logits widened, each row's top k exact
    row_argmax(x)                first maximum of each fp32 row

Measured on the 2-vCPU AMX machine: the torch versions of these took ~40% of a 512-token
bf16 prefill step after the matmuls went bf16. Every function gives the same result (up to
bf16 rounding of intermediates) with or without the native library; `MEMLM_NATIVE=0` or a
missing C compiler selects the torch code.
Does not know: which layer calls it (the bf16 linear method's fused decoder-layer path).
"""
from __future__ import annotations

import ctypes

import torch
import torch.nn.functional as F

from memlm.kernels import native

_P, _I, _F = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
_SIGNATURES = {
    "rms_norm_bf16": [_P, _P, _P, _I, _I, _F],
    "add_rms_norm_bf16": [_P, _P, _P, _P, _P, _I, _I, _F],
    "rope_bf16": [_P, _P, _P, _I, _I, _I, _I],
    "silu_mul_bf16": [_P, _P, _I, _I],
    "bf16_logits_refine": [_P, _P, _P, _P, _I, _I, _I, _I],
    "row_argmax": [_P, _P, _I, _I],
}
_LIBRARY = native.Library("fused_ops", "fused_ops.c", _SIGNATURES)


def available() -> bool:
    """True when the native library is built and loadable (built on first call)."""
    return _LIBRARY.lib is not None


def _native(*tensors: torch.Tensor) -> bool:
    return all(t.device.type == "cpu" for t in tensors) and available()


def rms_norm_bf16(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """x (M, H) fp32 contiguous, w (H,) fp32 -> (M, H) bf16."""
    if not _native(x):
        return F.rms_norm(x, (x.shape[-1],), w, eps).to(torch.bfloat16)
    M, H = x.shape
    out = torch.empty(M, H, dtype=torch.bfloat16)
    _LIBRARY.lib.rms_norm_bf16(x.data_ptr(), w.data_ptr(), out.data_ptr(), M, H, eps)
    return out


def add_rms_norm_bf16(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, eps: float):
    """x (M, H) fp32, y (M, H) bf16, both contiguous -> (x + y fp32, rms_norm(x + y) bf16)."""
    if not _native(x):
        s = x + y
        return s, F.rms_norm(s, (s.shape[-1],), w, eps).to(torch.bfloat16)
    M, H = x.shape
    s = torch.empty(M, H, dtype=torch.float32)
    out = torch.empty(M, H, dtype=torch.bfloat16)
    _LIBRARY.lib.add_rms_norm_bf16(x.data_ptr(), y.data_ptr(), w.data_ptr(), s.data_ptr(), out.data_ptr(), M, H, eps)
    return s, out


def rope_bf16_(t: torch.Tensor, n_heads: int, head_dim: int, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Rotate heads 0..n_heads-1 at the start of each row of t (M, C) bf16 in place.

    t's rows may be strided (a column slice of a fused projection); its last dim is contiguous.
    cos, sin: (M, head_dim) fp32 contiguous.
    """
    M = t.shape[0]
    if not _native(t):
        x = t[:, :n_heads * head_dim].view(M, n_heads, head_dim)
        half = head_dim // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        x.copy_(x * cos[:, None].to(x.dtype) + rotated * sin[:, None].to(x.dtype))
        return
    assert t.stride(1) == 1
    _LIBRARY.lib.rope_bf16(t.data_ptr(), cos.data_ptr(), sin.data_ptr(), M, t.stride(0), n_heads, head_dim)


def silu_mul_bf16(gu: torch.Tensor) -> torch.Tensor:
    """gu (M, 2I) bf16 contiguous = [gate | up] -> silu(gate) * up, (M, I) bf16."""
    M, I2 = gu.shape
    if not _native(gu):
        g, u = gu.chunk(2, dim=-1)
        return F.silu(g) * u
    out = torch.empty(M, I2 // 2, dtype=torch.bfloat16)
    _LIBRARY.lib.silu_mul_bf16(gu.data_ptr(), out.data_ptr(), M, I2 // 2)
    return out


def bf16_logits_refine(y: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, k: int,
                       bias: torch.Tensor | None = None) -> torch.Tensor:
    """Logits from a bf16 LM head's rounded output, with each row's k largest recomputed exactly.

    y (n, V) = hidden @ weight.T (+ bias), rounded to bf16 by the matmul (held as bf16 or fp32);
    hidden (n, H) fp32 contiguous; weight (V, H) bf16. Returns (n, V) fp32: y widened, except
    the k largest entries of each row, which are hidden . weight[i] (+ bias[i]) in fp32.
    """
    n, V = y.shape
    native = (_native(y) and y.dtype == weight.dtype == torch.bfloat16 and bias is None and 1 <= k <= 64
              and y.is_contiguous() and weight.is_contiguous())
    if not native:
        out = y.float()
        if n == 0 or k < 1:
            return out
        top = out.topk(min(k, V), dim=-1).indices                                      # (n, k)
        exact = torch.einsum("nh,nkh->nk", hidden.float(), weight[top].float())         # (n, k)
        if bias is not None:
            exact = exact + bias.float()[top]
        return out.scatter_(1, top, exact)
    out = torch.empty(n, V, dtype=torch.float32)
    _LIBRARY.lib.bf16_logits_refine(y.data_ptr(), hidden.data_ptr(), weight.data_ptr(), out.data_ptr(),
                                    n, V, hidden.shape[1], min(k, V))
    return out


def row_argmax(x: torch.Tensor) -> torch.Tensor:
    """x (n, V) fp32 -> (n,) int64 index of each row's first maximum, as `x.argmax(-1)` (NaN
    counts as the maximum), in one vectorized pass (torch's argmax took 3.9 ms on 64 x 49152)."""
    if not (_native(x) and x.dtype == torch.float32 and x.dim() == 2 and x.is_contiguous()) or x.shape[1] == 0:
        return x.argmax(dim=-1)
    out = torch.empty(x.shape[0], dtype=torch.int64)
    _LIBRARY.lib.row_argmax(x.data_ptr(), out.data_ptr(), x.shape[0], x.shape[1])
    bad = out < 0
    if bool(bad.any()):
        out[bad] = x[bad].argmax(dim=-1)
    return out
