"""ggml K-quant weights (Q4_K, Q5_K, Q6_K) kept as GGUF stores them, and their matmul.

Owns: `KQuantWeight` (N rows of K/256 super-blocks, the bytes of a GGUF tensor), their sizes,
the exact torch dequantization (the reference `csrc/kquant.c` is tested against, the fallback
when `MEMLM_NATIVE=0`, and the row lookup of an embedding), a round-to-nearest quantizer from
fp32 (gguf-py has none for K-quants: tests and benchmarks write K-quant files with it), and
`matmul`, which runs `csrc/kquant.c`: below TILE_MIN_ROWS rows its fp32 kernel, or where
`gemv.int8_activations()` (AVX-512 VNNI) and at most INT8_MAX_ROWS rows its 8-bit-activation
kernel (x quantized per row and super-block, ggml's Q8_K); from TILE_MIN_ROWS rows on, tiles of
W dequantized to bf16 (fp32 where bf16 matmuls are slow) through torch's GEMM.

    Q4_K  {fp16 d, dmin; u8 scales[12]; u8 qs[128]}          144 B / 256   w = d sc_j q - dmin m_j
    Q5_K  {fp16 d, dmin; u8 scales[12]; u8 qh[32]; qs[128]}  176 B / 256   (q has 5 bits)
    Q6_K  {u8 ql[128]; u8 qh[64]; int8 scales[16]; fp16 d}   210 B / 256   w = d sc_j (q - 32)

(bit layouts in csrc/kquant.c's header, as ggml-common.h / gguf-py's quants.py.)
Workspace outside torch, per call: the 8-bit activations (M K + 68 M K / 256 bytes) and one
tile of at most gemv.TILE_ELEMENTS weights (8 MiB of bf16). Does not know: layers, which method
keeps which codec (`memlm.models.linear.weight_only`), or GGUF files (`memlm.loading.gguf`).
"""
from __future__ import annotations

import ctypes
import functools
import sys
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from memlm.kernels import gemv, native
from memlm.kernels.cpu import row_bucket

QK_K = 256
BLOCK_BYTES = {"q4_k": 144, "q5_k": 176, "q6_k": 210}
CODECS = tuple(BLOCK_BYTES)
GGML_TYPE_IDS = {"q4_k": 12, "q5_k": 13, "q6_k": 14}
TILE_MIN_ROWS = gemv.TILE_MIN_ROWS      # from here on: dequantized tiles through torch's GEMM
INT8_MAX_ROWS = 8                       # kq_matmul_q8 up to this many rows

_P, _I = ctypes.c_void_p, ctypes.c_int
_LIBRARY = native.Library("kquant", "kquant.c", {
    "kq_dequant_f32": [_I, _P, _P, _I, _I],
    "kq_dequant_bf16": [_I, _P, _P, _I, _I],
    "kq_matmul_f32": [_I, _P, _P, _P, _I, _I, _I],
    "kq_matmul_q8": [_I, _P, _P, _P, _I, _I, _I, _P],
})


def available() -> bool:
    """True when kquant.c is built and loadable (built on first call)."""
    return _LIBRARY.lib is not None


@dataclass
class KQuantWeight:
    blocks: torch.Tensor      # (N, K / 256 * block bytes) uint8, contiguous
    codec: str                # "q4_k" | "q5_k" | "q6_k"
    in_features: int          # K, a multiple of 256
    out_features: int         # N

    @property
    def padded_in(self) -> int:
        return self.in_features


def kernels_for(codec: str):
    """The kernel module that holds GGUF blocks of `codec` as loaded: this one for the K-quants,
    `gemv` for Q8_0 / Q4_0 / Q4_1, None for a codec no kernel keeps (it is dequantized)."""
    if codec in CODECS:
        return sys.modules[__name__]
    return gemv if codec in gemv.CODECS else None


def check_codec(codec: str) -> str:
    if codec not in BLOCK_BYTES:
        raise ValueError(f"K-quant codec must be one of {', '.join(CODECS)}, got {codec!r}")
    return codec


def block_bytes(n: int, k: int, codec: str) -> int:
    """Bytes of an (n, k) weight in `codec` (k rounded up to whole super-blocks)."""
    return n * (-(-k // QK_K)) * BLOCK_BYTES[check_codec(codec)]


def from_gguf_bytes(raw: np.ndarray | torch.Tensor, codec: str, out_features: int, in_features: int) -> KQuantWeight:
    """A GGUF tensor's bytes ((N, K/256 * block bytes) uint8) as a `KQuantWeight`; a numpy array
    (a view of the mapped file) is copied once, a tensor is kept."""
    data = torch.from_numpy(np.array(raw, copy=True)) if isinstance(raw, np.ndarray) else raw.contiguous()
    blocks = data.reshape(out_features, -1)
    if (blocks.dtype != torch.uint8 or in_features % QK_K
            or blocks.shape[1] != block_bytes(1, in_features, codec)):
        raise ValueError(f"{codec} bytes of shape {tuple(raw.shape)} do not hold a ({out_features}, "
                         f"{in_features}) weight (rows must be whole {QK_K}-weight super-blocks)")
    return KQuantWeight(blocks, codec, in_features, out_features)


@dataclass
class StackedBlocks:
    """Rows of block weights in different codecs fused into one projection (a Q4_K_M file's
    q|k|v: Q4_K q and k, a Q6_K v), each part kept as loaded and run by its own kernel, the
    outputs side by side. `codec` "stacked"; the parts are `KQuantWeight`s / `gemv.BlockWeight`s."""
    parts: list
    in_features: int
    out_features: int
    codec: str = "stacked"

    @property
    def padded_in(self) -> int:
        return self.in_features


# ---- exact dequantization (torch) --------------------------------------------------------
def _half(b: torch.Tensor, at: int) -> torch.Tensor:
    return b[..., at:at + 2].contiguous().view(torch.float16).float()          # (R, G, 1)


def _scale_min_k4(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(R, G, 12) packed 6-bit scales -> sc, m (R, G, 8) int32 (ggml's get_scale_min_k4)."""
    s = s.int()
    lo_d, lo_m, hi = s[..., 0:4], s[..., 4:8], s[..., 8:12]
    sc = torch.cat([lo_d & 63, (hi & 15) | ((lo_d >> 6) << 4)], dim=-1)
    m = torch.cat([lo_m & 63, (hi >> 4) | ((lo_m >> 6) << 4)], dim=-1)
    return sc, m


def _codes(b: torch.Tensor, codec: str) -> torch.Tensor:
    """(R, G, bytes) super-blocks -> (R, G, 256) unsigned codes as int32."""
    r, g = b.shape[:2]
    if codec == "q6_k":
        ql, qh = b[..., :128].int().view(r, g, 2, 64), b[..., 128:192].int().view(r, g, 2, 32)
        low = torch.cat([ql & 15, ql >> 4], dim=-1)                                # e = 128h + 64s + l
        high = torch.cat([(qh >> (2 * t)) & 3 for t in range(4)], dim=-1)          # e = 128h + 32t + l
        return (low | (high << 4)).reshape(r, g, QK_K)
    qs = b[..., 48:] if codec == "q5_k" else b[..., 16:]
    qs = qs.int().view(r, g, 4, 32)
    q = torch.stack([qs & 15, qs >> 4], 3).reshape(r, g, QK_K)                 # sub-block 2c, 2c+1
    if codec == "q5_k":
        qh = b[..., 16:48].int()
        q = q | torch.cat([((qh >> i) & 1) << 4 for i in range(8)], dim=-1)
    return q


def dequantize_rows(blocks: torch.Tensor, codec: str, in_features: int) -> torch.Tensor:
    """(R, row bytes) uint8 rows of super-blocks -> (R, in_features) fp32, exactly what they
    encode (gguf-py's order of fp32 operations, so bit-equal to `gguf.quants.dequantize`)."""
    r = blocks.shape[0]
    b = blocks.view(r, -1, BLOCK_BYTES[check_codec(codec)])                  # (R, G, bytes)
    g = b.shape[1]
    q = _codes(b, codec).float()
    if codec == "q6_k":
        sc = b[..., 192:208].contiguous().view(torch.int8).float()           # (R, G, 16)
        dl = _half(b, 208) * sc
        w = dl.unsqueeze(-1) * (q.view(r, g, 16, 16) - 32)
    else:
        sc, m = _scale_min_k4(b[..., 4:16])
        d = (_half(b, 0) * sc.float()).unsqueeze(-1)                          # (R, G, 8, 1)
        dm = (_half(b, 2) * m.float()).unsqueeze(-1)
        w = d * q.view(r, g, 8, 32) - dm
    return w.reshape(r, -1)[:, :in_features]


def dequantize(weight: KQuantWeight) -> torch.Tensor:
    """The fp32 (N, K) weight the kernels multiply by."""
    return dequantize_rows(weight.blocks, weight.codec, weight.in_features)


# ---- quantizing fp32 (round to nearest; for tests and benchmarks) -------------------------
def _fp16(a: np.ndarray) -> np.ndarray:
    return a.astype(np.float16)


def _pack_scales_k4(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """(B, 8) 6-bit sc and m -> (B, 12) bytes, the inverse of ggml's get_scale_min_k4."""
    sc, m = sc.astype(np.uint8), m.astype(np.uint8)
    out = np.zeros((sc.shape[0], 12), np.uint8)
    out[:, 0:4] = (sc[:, :4] & 63) | ((sc[:, 4:] >> 4) << 6)
    out[:, 4:8] = (m[:, :4] & 63) | ((m[:, 4:] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:] & 15) | ((m[:, 4:] & 15) << 4)
    return out


def quantize(w: torch.Tensor, codec: str) -> KQuantWeight:
    """fp32 (N, K), K a multiple of 256 -> super-blocks, rounding each level to nearest: per
    sub-block min/max (Q4/5_K) or max|w| (Q6_K) scales, 6/8-bit scales of those, then codes."""
    check_codec(codec)
    n, k = w.shape
    if k % QK_K:
        raise ValueError(f"{codec} needs rows of whole {QK_K}-weight super-blocks, got {k} columns")
    x = w.detach().float().numpy().reshape(-1, QK_K).astype(np.float32)     # (B, 256)
    nb = x.shape[0]
    if codec == "q6_k":
        sub = x.reshape(nb, 16, 16)
        amax_i = np.abs(sub).argmax(-1)
        vmax = np.take_along_axis(sub, amax_i[..., None], -1)[..., 0]          # signed extreme
        s = vmax / -32.0                                                       # q - 32 in [-32, 31]
        d = _fp16(np.abs(s).max(-1) / 127.0)
        df = d.astype(np.float32)
        with np.errstate(divide="ignore", invalid="ignore"):
            sc = np.clip(np.nan_to_num(np.rint(s / df[:, None])), -128, 127).astype(np.int8)
            dl = df[:, None] * sc.astype(np.float32)
            q = np.nan_to_num(np.rint(sub / dl[..., None])) + 32
        q = np.clip(q, 0, 63).astype(np.uint8).reshape(nb, 2, 4, 32)           # (half, t, l)
        ql = np.zeros((nb, 2, 64), np.uint8)
        ql[:, :, :32] = (q[:, :, 0] & 15) | ((q[:, :, 2] & 15) << 4)
        ql[:, :, 32:] = (q[:, :, 1] & 15) | ((q[:, :, 3] & 15) << 4)
        qh = (q[:, :, 0] >> 4) | ((q[:, :, 1] >> 4) << 2) | ((q[:, :, 2] >> 4) << 4) | ((q[:, :, 3] >> 4) << 6)
        raw = np.concatenate([ql.reshape(nb, 128), qh.reshape(nb, 64), sc.view(np.uint8),
                              d.reshape(nb, 1).view(np.uint8)], axis=1)
    else:
        top = 15 if codec == "q4_k" else 31
        sub = x.reshape(nb, 8, 32)
        lo = np.minimum(sub.min(-1), 0.0)
        scale = (sub.max(-1) - lo) / top                                       # (B, 8) >= 0
        d, dmin = _fp16(scale.max(-1) / 63.0), _fp16(-lo.min(-1) / 63.0)
        df, dmf = d.astype(np.float32), dmin.astype(np.float32)
        with np.errstate(divide="ignore", invalid="ignore"):
            sc = np.clip(np.nan_to_num(np.rint(scale / df[:, None])), 0, 63)
            m = np.clip(np.nan_to_num(np.rint(-lo / dmf[:, None])), 0, 63)
            a, c = df[:, None] * sc, dmf[:, None] * m
            q = np.nan_to_num(np.rint((sub + c[..., None]) / a[..., None]))
        q = np.clip(q, 0, top).astype(np.uint8)                                # (B, 8, 32)
        qs = ((q[:, 0::2] & 15) | ((q[:, 1::2] & 15) << 4)).reshape(nb, 128)
        parts = [d.reshape(nb, 1).view(np.uint8), dmin.reshape(nb, 1).view(np.uint8), _pack_scales_k4(sc, m)]
        if codec == "q5_k":
            parts.append(np.bitwise_or.reduce((q >> 4) << np.arange(8, dtype=np.uint8)[None, :, None], axis=1))
        raw = np.concatenate(parts + [qs], axis=1)
    blocks = torch.from_numpy(np.ascontiguousarray(raw)).view(n, -1)
    return KQuantWeight(blocks, codec, k, n)


# ---- matmul -------------------------------------------------------------------------------
def matmul(x: torch.Tensor, weight: KQuantWeight, exact: bool = False) -> torch.Tensor:
    """x (M, K) float -> (M, N) fp32 = x @ W.T. Below TILE_MIN_ROWS rows: kquant.c's 8-bit
    kernel where `gemv.int8_activations()` and M <= INT8_MAX_ROWS and not `exact` (the LM head),
    else its fp32 kernel; from TILE_MIN_ROWS rows on, dequantized tiles through torch's GEMM.
    Without the native library: x @ dequantize(W).T in fp32."""
    x = x.float()
    if not (available() and x.device.type == "cpu"):
        return x @ dequantize(weight).t()
    x = x.contiguous()
    m, n, k = x.shape[0], weight.out_features, weight.in_features
    if m >= TILE_MIN_ROWS:
        return _tiled_matmul(x, weight)
    y = torch.empty(m, n, dtype=torch.float32)
    t = GGML_TYPE_IDS[weight.codec]
    if m <= INT8_MAX_ROWS and not exact and gemv.int8_activations():
        status = torch.zeros(1, dtype=torch.int32)
        _LIBRARY.lib.kq_matmul_q8(t, weight.blocks.data_ptr(), x.data_ptr(), y.data_ptr(), m, n, k,
                                  status.data_ptr())
        if int(status[0]) != 0:
            raise MemoryError(f"the K-quant kernel could not allocate {m * k * 5 // 4} bytes of 8-bit "
                              "activations: free memory or set MEMLM_INT8_ACTIVATIONS=0")
        return y
    _LIBRARY.lib.kq_matmul_f32(t, weight.blocks.data_ptr(), x.data_ptr(), y.data_ptr(), m, n, k)
    return y


@functools.cache
def _bf16_tiles() -> bool:
    from memlm.kernels.cpu import bf16_matmul_is_fast
    return bf16_matmul_is_fast(torch.device("cpu"))


def _tiled_matmul(x: torch.Tensor, weight: KQuantWeight) -> torch.Tensor:
    """x (M, K) fp32 -> (M, N) fp32 through tiles of W (at most gemv.TILE_ELEMENTS each), bf16
    where bf16 matmuls are fast (x rounded to bf16 too, like the bf16 method), else fp32."""
    m, n, k = x.shape[0], weight.out_features, weight.in_features
    bf16 = _bf16_tiles()
    dtype = torch.bfloat16 if bf16 else torch.float32
    xt = F.pad(x.to(dtype), (0, 0, 0, row_bucket(m) - m))      # bounded oneDNN shapes (row_bucket)
    y = torch.empty(m, n, dtype=torch.float32)
    rows = max(1, min(n, gemv.TILE_ELEMENTS // k))
    tile = torch.empty(rows, k, dtype=dtype)
    fn = _LIBRARY.lib.kq_dequant_bf16 if bf16 else _LIBRARY.lib.kq_dequant_f32
    for n0 in range(0, n, rows):
        r = min(rows, n - n0)
        fn(GGML_TYPE_IDS[weight.codec], weight.blocks[n0].data_ptr(), tile.data_ptr(), r, k)
        y[:, n0:n0 + r] = F.linear(xt, tile[:r])[:m]
    return y


def dequantize_native(weight: KQuantWeight) -> torch.Tensor:
    """kquant.c's fp32 dequantization of the whole weight (tests compare it to `dequantize`)."""
    out = torch.empty(weight.out_features, weight.in_features)
    _LIBRARY.lib.kq_dequant_f32(GGML_TYPE_IDS[weight.codec], weight.blocks.data_ptr(), out.data_ptr(),
                                weight.out_features, weight.in_features)
    return out


def warm_up(weight: KQuantWeight, m: int, exact: bool = False) -> None:
    """Create the oneDNN state `matmul` of `m` rows needs (the tiles' shapes: one full tile and
    the last partial one, each run as a weight of its own) without its (m, N) output."""
    if m < TILE_MIN_ROWS:
        return
    k, n = weight.in_features, weight.out_features
    rows = max(1, min(n, gemv.TILE_ELEMENTS // k))
    x = torch.zeros(m, k)
    for r in sorted({rows, n % rows} - {0}):
        matmul(x, KQuantWeight(weight.blocks[:r], weight.codec, k, r), exact)
