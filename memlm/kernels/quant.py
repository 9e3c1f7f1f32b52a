"""Weight-only quantized matmuls: the int8 and 4-bit codecs and the kernels that read them.

Owns: quantizing an fp32 weight (N, K) into each codec, the exact dequantization each kernel
computes (the reference the tests hold the kernels to), and the calls into torch's CPU kernels:

    int8   symmetric, one scale per output row:   w[n, k] ~= q[n, k] * s[n]          q in -127..127
           `aten._weight_int8pack_mm(x, q (N, K), s (N,))`
    int4   asymmetric, one (scale, zero) per row and group of G inputs (G = 32/64/128/256),
           round to nearest:                      w[n, k] ~= (q[n, k] - 8) * s + z    q in 0..15
           `aten._convert_weight_to_int4pack_for_cpu` once, `aten._weight_int4pack_mm_for_cpu`

Scales are stored in the activation dtype the kernel runs in (it requires them to match), and
the codes are computed against the *rounded* scales, so rounding a scale never adds error.
Shapes the kernels refuse are padded at pack time: the 4-bit kernel needs N % 16 == 0 and
K % G == 0 (extra output rows are zero and sliced off; extra input columns repeat the last one,
so group ranges do not change, and meet zero activations), and the int8 kernel with bf16
activations needs K % 16 == 0 (other K crashed it or gave wrong sums, measured on torch 2.13;
padded likewise). `x` is padded to the packed K where needed.
Does not know: layers, models or which method uses which codec (`memlm.models.linear`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

INT4_GROUP_SIZES = (32, 64, 128, 256)
INT4_DEFAULT_GROUP = 32
INT4_N_MULTIPLE = 16        # `_convert_weight_to_int4pack_for_cpu`: "expect N to be dividable by 16"
INT8_K_MULTIPLE = 16        # `_weight_int8pack_mm` with bf16 x: other K segfault or sum wrong
_BLOCK_ELEMENTS = 1 << 18   # weights quantized at once: ~1 MiB fp32 per temporary (3 of them)


def _pad_columns(w: torch.Tensor, k: int) -> torch.Tensor:
    """w (N, K) -> (N, k) with the last column repeated (no new extremes in any group)."""
    extra = k - w.shape[1]
    return w if extra == 0 else torch.cat([w, w[:, -1:].expand(-1, extra)], dim=1)


def pad_input(x: torch.Tensor, k: int) -> torch.Tensor:
    """x (M, K) -> (M, k) with zero columns appended (the packed weight's padded inputs)."""
    extra = k - x.shape[-1]
    return x if extra == 0 else F.pad(x, (0, extra))


# ---- int8, per output row --------------------------------------------------------------------
@dataclass
class Int8Weight:
    qweight: torch.Tensor     # (N, Kp) int8
    scales: torch.Tensor      # (N,) activation dtype
    in_features: int          # K before padding


def _int8_padded(k: int, act_dtype: torch.dtype) -> int:
    return k if act_dtype == torch.float32 else -(-k // INT8_K_MULTIPLE) * INT8_K_MULTIPLE


def quantize_int8(w: torch.Tensor, act_dtype: torch.dtype) -> Int8Weight:
    """fp32 (N, K) -> int8 codes and per-row scales (symmetric, round to nearest).

    Done in blocks of rows of about `_BLOCK_ELEMENTS` weights, so neither a large table (an
    embedding) nor a fused projection needs full-size temporaries (4096-row blocks left 20 MiB
    of them per SmolLM2 layer while loading: the int8 load peak).
    """
    n, k = w.shape
    kp = _int8_padded(k, act_dtype)
    q = torch.empty(n, kp, dtype=torch.int8)
    scales = torch.empty(n, dtype=act_dtype)
    rows = max(1, _BLOCK_ELEMENTS // max(1, k))
    for r in range(0, n, rows):
        blk = w[r:r + rows].detach().float()
        s = (blk.abs().amax(dim=1) / 127).clamp_min(1e-12).to(act_dtype)            # (rows,)
        scales[r:r + rows] = s
        q[r:r + rows, :k] = torch.round(blk / s.float()[:, None]).clamp_(-127, 127)
    if kp > k:
        q[:, k:] = 0                 # meets the zero columns `pad_input` appends to x
    return Int8Weight(q, scales, k)


def int8_bytes(n: int, k: int, act_dtype: torch.dtype) -> int:
    """Bytes `quantize_int8` holds for an (n, k) weight: codes (padded K) and scales."""
    kp = _int8_padded(k, act_dtype)
    return n * kp + n * torch.empty((), dtype=act_dtype).element_size()


def dequantize_int8(qweight: torch.Tensor, scales: torch.Tensor, in_features: int) -> torch.Tensor:
    """The fp32 weight (N, K) the int8 kernel multiplies by (rows may be a gathered subset)."""
    return qweight[..., :in_features].float() * scales.float()[..., None]


def int8_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x (M, K) in scales' dtype -> (M, N) = x @ (q * s).T, in that dtype."""
    return torch.ops.aten._weight_int8pack_mm(pad_input(x, qweight.shape[1]), qweight, scales)


# ---- int4, per row and group ------------------------------------------------------------------
@dataclass
class Int4Weight:
    packed: torch.Tensor          # the kernel's tiled layout (uint8), Np x Kp codes
    scales_zeros: torch.Tensor    # (Kp / G, Np, 2) activation dtype: [..., 0] scale, [..., 1] zero
    group_size: int
    in_features: int              # K before padding
    out_features: int             # N before padding


def check_group_size(group_size: int) -> int:
    if group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"int4 group size must be one of {', '.join(map(str, INT4_GROUP_SIZES))} "
                         f"(torch's 4-bit CPU kernel), got {group_size!r}")
    return group_size


def _int4_padded(n: int, k: int, group_size: int) -> tuple[int, int]:
    return -(-n // INT4_N_MULTIPLE) * INT4_N_MULTIPLE, -(-k // group_size) * group_size


def int4_bytes(n: int, k: int, group_size: int, act_dtype: torch.dtype) -> int:
    """Bytes `quantize_int4` holds for an (n, k) weight: packed codes and scales_zeros."""
    np_, kp = _int4_padded(n, k, group_size)
    return np_ * kp // 2 + (kp // group_size) * np_ * 2 * torch.empty((), dtype=act_dtype).element_size()


def quantize_int4_codes(w: torch.Tensor, group_size: int, act_dtype: torch.dtype):
    """fp32 (N, K) -> (codes (Np, Kp) int32 0..15, scales_zeros (Kp/G, Np, 2)), padded as above."""
    check_group_size(group_size)
    w = w.detach().float()
    n, k = w.shape
    np_, kp = _int4_padded(n, k, group_size)
    w = F.pad(_pad_columns(w, kp), (0, 0, 0, np_ - n))                               # (Np, Kp)
    g = w.view(np_, kp // group_size, group_size)
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)                                          # (Np, Kp/G)
    scale = ((hi - lo) / 15).clamp_min(1e-12).to(act_dtype)
    zero = (lo + 8 * scale.float()).to(act_dtype)
    q = torch.round((g - zero.float()[..., None]) / scale.float()[..., None] + 8).clamp_(0, 15)
    sz = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous()             # (Kp/G, Np, 2)
    return q.to(torch.int32).view(np_, kp), sz


def quantize_int4(w: torch.Tensor, group_size: int, act_dtype: torch.dtype) -> Int4Weight:
    """fp32 (N, K) -> the packed 4-bit weight (asymmetric per group, round to nearest)."""
    codes, sz = quantize_int4_codes(w, group_size, act_dtype)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    return Int4Weight(packed, sz, group_size, w.shape[1], w.shape[0])


def dequantize_int4_codes(codes: torch.Tensor, scales_zeros: torch.Tensor, group_size: int,
                          in_features: int, out_features: int) -> torch.Tensor:
    """The fp32 weight (N, K) that codes and scales_zeros stand for (padding dropped)."""
    np_, kp = codes.shape
    s = scales_zeros[..., 0].float().transpose(0, 1)[..., None]                     # (Np, Kp/G, 1)
    z = scales_zeros[..., 1].float().transpose(0, 1)[..., None]
    w = (codes.float().view(np_, kp // group_size, group_size) - 8) * s + z
    return w.view(np_, kp)[:out_features, :in_features]


def int4_matmul(x: torch.Tensor, packed: torch.Tensor, scales_zeros: torch.Tensor, group_size: int,
                out_features: int) -> torch.Tensor:
    """x (M, K) in scales_zeros' dtype -> (M, N) in that dtype (N = out_features)."""
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(pad_input(x, scales_zeros.shape[0] * group_size),
                                                   packed, group_size, scales_zeros)
    return y if y.shape[1] == out_features else y[:, :out_features].contiguous()
