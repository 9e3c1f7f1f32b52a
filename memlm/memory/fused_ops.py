"""Fused elementwise kernels for the bf16-matmul decoder layer (CPU), with torch fallbacks.

Owns: four memory-bound steps of a Llama-style layer, each done in one pass over its rows
instead of the 3-6 separate torch ops (and fp32<->bf16 copies) they take otherwise:

    rms_norm_bf16(x, w)          fp32 residual -> normalized, scaled, rounded to bf16
    add_rms_norm_bf16(x, y, w)   x + y (fp32) and its bf16 norm, in one pass
    rope_bf16_(t, n, cos, sin)   rotary embedding of the first n heads of a bf16 row, in place
    silu_mul_bf16(gu)            silu(gate) * up of a fused [gate | up] bf16 row

Measured on the 2-vCPU AMX machine: the torch versions of these took ~40% of a 512-token
bf16 prefill step after the matmuls went bf16. Every function gives the same result (up to
bf16 rounding of intermediates) with or without the native library; `MEMLM_NATIVE=0` or a
missing C compiler selects the torch code.
Does not know: which layer calls it (`weights.py` installs the fused layer forward).
"""
from __future__ import annotations

import ctypes

import torch
import torch.nn.functional as F

from memlm.memory import native

_SOURCE = native.COMMON_C + r"""
#include <math.h>
#include <stdint.h>
#include <string.h>
#include <xmmintrin.h>

static inline float bf2f(uint16_t h) { uint32_t u = (uint32_t)h << 16; float f; memcpy(&f, &u, 4); return f; }
static inline uint16_t f2bf(float f) {                 /* round to nearest even */
    uint32_t u; memcpy(&u, &f, 4);
    u += 0x7FFFu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}
#define PAR_MIN 32768   /* elements below which a kernel stays on one thread */

void rms_norm_bf16(const float* x, const float* w, uint16_t* out, int M, int H, float eps) {
    _Pragma("omp parallel for if((int64_t)M * H >= PAR_MIN)")
    for (int i = 0; i < M; i++) {
        const float* xr = x + (int64_t)i * H;
        float ss = 0.f;
        _Pragma("omp simd reduction(+:ss)")
        for (int d = 0; d < H; d++) ss += xr[d] * xr[d];
        const float r = 1.f / sqrtf(ss / H + eps);
        uint16_t* o = out + (int64_t)i * H;
        _Pragma("omp simd")
        for (int d = 0; d < H; d++) o[d] = f2bf(xr[d] * r * w[d]);
    }
}

void add_rms_norm_bf16(const float* x, const uint16_t* y, const float* w, float* sum, uint16_t* out,
                       int M, int H, float eps) {
    _Pragma("omp parallel for if((int64_t)M * H >= PAR_MIN)")
    for (int i = 0; i < M; i++) {
        const float* xr = x + (int64_t)i * H;
        const uint16_t* yr = y + (int64_t)i * H;
        float* sr = sum + (int64_t)i * H;
        float ss = 0.f;
        _Pragma("omp simd reduction(+:ss)")
        for (int d = 0; d < H; d++) { const float v = xr[d] + bf2f(yr[d]); sr[d] = v; ss += v * v; }
        const float r = 1.f / sqrtf(ss / H + eps);
        uint16_t* o = out + (int64_t)i * H;
        _Pragma("omp simd")
        for (int d = 0; d < H; d++) o[d] = f2bf(sr[d] * r * w[d]);
    }
}

/* t: M rows of `stride` bf16; heads 0..n-1 of width hd at the row start are rotated in place
   ("rotate half" layout). cos, sin: (M, hd) fp32. */
void rope_bf16(uint16_t* t, const float* cos_, const float* sin_, int M, int stride, int n, int hd) {
    const int half = hd / 2;
    _Pragma("omp parallel for if((int64_t)M * n * hd >= PAR_MIN)")
    for (int i = 0; i < M; i++) {
        const float* c = cos_ + (int64_t)i * hd;
        const float* s = sin_ + (int64_t)i * hd;
        for (int h = 0; h < n; h++) {
            uint16_t* r = t + (int64_t)i * stride + (int64_t)h * hd;
            _Pragma("omp simd")
            for (int d = 0; d < half; d++) {
                const float a = bf2f(r[d]), b = bf2f(r[d + half]);
                r[d] = f2bf(a * c[d] - b * s[d]);
                r[d + half] = f2bf(b * c[d + half] + a * s[d + half]);
            }
        }
    }
}

/* Runs with denormals flushed to zero (MXCSR FTZ/DAZ, restored after): without it this loop
   measured 5-9x slower on typical activations from floating-point assists. */
void silu_mul_bf16(const uint16_t* restrict gu, uint16_t* restrict out, int M, int I) {
    _Pragma("omp parallel if((int64_t)M * I >= PAR_MIN)")
    {
        const unsigned int csr = _mm_getcsr();
        _mm_setcsr(csr | 0x8040);
        _Pragma("omp for")
        for (int i = 0; i < M; i++) {
            const uint16_t* restrict g = gu + (int64_t)i * 2 * I;
            const uint16_t* restrict u = g + I;
            uint16_t* restrict o = out + (int64_t)i * I;
            for (int d = 0; d < I; d++) {
                const float a = bf2f(g[d]);
                o[d] = f2bf(a * bf2f(u[d]) / (1.f + exp_approx(-a)));
            }
        }
        _mm_setcsr(csr);
    }
}
"""

_P, _I, _F = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
_SIGNATURES = {
    "rms_norm_bf16": [_P, _P, _P, _I, _I, _F],
    "add_rms_norm_bf16": [_P, _P, _P, _P, _P, _I, _I, _F],
    "rope_bf16": [_P, _P, _P, _I, _I, _I, _I],
    "silu_mul_bf16": [_P, _P, _I, _I],
}
_LIBRARY = native.Library("fused_ops", _SOURCE, _SIGNATURES)


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
