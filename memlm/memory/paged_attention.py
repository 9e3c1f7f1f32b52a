"""A small native kernel for decode attention straight from the paged KV cache (CPU).

Owns: the C source and `decode_attention(...)`; `native.py` builds and loads it. Where no
compiler is found, the build fails, the cache is not fp32/fp16/int8 on CPU, or MEMLM_NATIVE=0,
`available()` is False and `kv_store.PagedView` uses gather + SDPA instead (same results up to
float rounding).
Does not know: block ownership or scheduling.

Why: gather + SDPA moves every K/V byte three times (gather read, gather write, SDPA read);
decode attention is memory-bound, so reading each cached row once, in place, through the block
table is about 3x less traffic. One sequence per OpenMP task when there are enough of them
(each token's row of all KV heads is one contiguous read), else one (sequence, KV head) pair;
the query heads of a GQA group share each K/V row load; online softmax one block at a time.
"""
from __future__ import annotations

import ctypes

import torch

from memlm.memory import native

_SOURCE = native.COMMON_C + r"""
#include <math.h>
#include <stdint.h>
#include <string.h>
#include <immintrin.h>
#include <omp.h>

/* Widen `heads` cached rows of `hd` values to fp32; `sc` (one scale per head) only for int8. */
static inline void widen_f32(const float* src, const float* sc, float* dst, int heads, int hd) {
    (void)sc; memcpy(dst, src, (size_t)heads * hd * sizeof(float));
}

static inline void widen_i8(const int8_t* src, const float* sc, float* dst, int heads, int hd) {
    for (int h = 0; h < heads; h++) {
        const float s = sc[h];
        for (int d = 0; d < hd; d++) dst[h * hd + d] = s * (float)src[h * hd + d];
    }
}

static inline void widen_f16(const _Float16* src, const float* sc, float* dst, int heads, int hd) {
    (void)sc;
    const int n = heads * hd;
    int d = 0;
#ifdef __F16C__
    for (; d + 8 <= n; d += 8)
        _mm256_storeu_ps(dst + d, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(src + d))));
#endif
    for (; d < n; d++) dst[d] = (float)src[d];
}

/* One kernel body, instantiated for fp32 and fp16 caches (fp16 rows are widened on load).
   A task is one sequence and a range of its KV heads: all heads when there are enough
   sequences to keep every thread busy (then each cached row -- all KV heads of a token -- is
   read as one contiguous run), one KV head per task otherwise. */
#define DEFINE_DECODE(NAME, KV_T, WIDEN, HD, BS)                                                    \
void NAME(const float* q, const KV_T* kc, const KV_T* vc, const float* ks, const float* vs,   \
          const int64_t* tables,                                                               \
          const int64_t* lens, float* out, int B, int nh, int nkv, int hd_arg, int bs_arg,    \
          int max_nb, float scale)                                                             \
{                                                                                              \
    const int hd = HD, bs = BS;                                                                \
    const int g = nh / nkv;                                                                    \
    const int parts = B >= 2 * omp_get_max_threads() ? 1 : nkv;                                \
    const int hp = nkv / parts, nq = hp * g;                                                   \
    _Pragma("omp parallel")                                                                    \
    {                                                                                          \
    const unsigned int csr = _mm_getcsr();                                                     \
    _mm_setcsr(csr | 0x8040);             /* flush denormals: exp() tails hit FP assists */   \
    _Pragma("omp for schedule(dynamic, 1)")                                                    \
    for (int task = 0; task < B * parts; task++) {                                             \
        const int b = task / parts, kh0 = (task % parts) * hp;                                 \
        float m[nq], l[nq], acc[nq][hd], s[nq][bs], row[hp * hd];                              \
        const float* qb = q + ((int64_t)b * nh + (int64_t)kh0 * g) * hd;                       \
        for (int j = 0; j < nq; j++) {                                                         \
            m[j] = -INFINITY; l[j] = 0.f;                                                      \
            for (int d = 0; d < hd; d++) acc[j][d] = 0.f;                                      \
        }                                                                                      \
        const int64_t L = lens[b];                                                             \
        for (int64_t start = 0; start < L; start += bs) {                                      \
            const int n = (L - start) < bs ? (int)(L - start) : bs;                            \
            const int64_t base = tables[(int64_t)b * max_nb + start / bs] * bs;                \
            for (int t = 0; t < n; t++) {                                                      \
                WIDEN(kc + ((base + t) * nkv + kh0) * hd, ks + (base + t) * nkv + kh0, row, hp, hd); \
                for (int j = 0; j < nq; j++) {                                                 \
                    const float* qr = qb + j * hd;                                             \
                    const float* kr = row + (j / g) * hd;                                      \
                    float dot = 0.f;                                                           \
                    _Pragma("omp simd reduction(+:dot)")                                       \
                    for (int d = 0; d < hd; d++) dot += qr[d] * kr[d];                         \
                    s[j][t] = dot * scale;                                                     \
                }                                                                              \
            }                                                                                  \
            for (int j = 0; j < nq; j++) {                                                     \
                float bm = m[j];                                                               \
                for (int t = 0; t < n; t++) bm = s[j][t] > bm ? s[j][t] : bm;                  \
                const float corr = expf(m[j] - bm);                                            \
                l[j] *= corr;                                                                  \
                for (int d = 0; d < hd; d++) acc[j][d] *= corr;                                \
                for (int t = 0; t < n; t++) s[j][t] = exp_approx(s[j][t] - bm);                \
                for (int t = 0; t < n; t++) l[j] += s[j][t];                                   \
                m[j] = bm;                                                                     \
            }                                                                                  \
            for (int t = 0; t < n; t++) {                                                      \
                WIDEN(vc + ((base + t) * nkv + kh0) * hd, vs + (base + t) * nkv + kh0, row, hp, hd); \
                for (int j = 0; j < nq; j++) {                                                 \
                    const float p = s[j][t];                                                   \
                    const float* vr = row + (j / g) * hd;                                      \
                    _Pragma("omp simd")                                                        \
                    for (int d = 0; d < hd; d++) acc[j][d] += p * vr[d];                       \
                }                                                                              \
            }                                                                                  \
        }                                                                                      \
        for (int j = 0; j < nq; j++) {                                                         \
            float* o = out + ((int64_t)b * nh + (int64_t)kh0 * g + j) * hd;                    \
            const float inv = 1.f / l[j];                                                      \
            for (int d = 0; d < hd; d++) o[d] = acc[j][d] * inv;                               \
        }                                                                                      \
    }                                                                                          \
    _mm_setcsr(csr);                                                                           \
    }                                                                                          \
}

/* Generic shapes, plus head size 64 with 16-token blocks as compile-time constants: the
   inner loops unroll (measured 48.6 -> 38.3 ms per SmolLM2 decode step of 64 sequences). */
DEFINE_DECODE(paged_decode_attention_f32, float, widen_f32, hd_arg, bs_arg)
DEFINE_DECODE(paged_decode_attention_f16, _Float16, widen_f16, hd_arg, bs_arg)
DEFINE_DECODE(paged_decode_attention_i8, int8_t, widen_i8, hd_arg, bs_arg)
DEFINE_DECODE(paged_decode_attention_f32_hd64, float, widen_f32, 64, 16)
DEFINE_DECODE(paged_decode_attention_f16_hd64, _Float16, widen_f16, 64, 16)
DEFINE_DECODE(paged_decode_attention_i8_hd64, int8_t, widen_i8, 64, 16)
"""

_SIGNATURE = [ctypes.c_void_p] * 8 + [ctypes.c_int] * 6 + [ctypes.c_float]
_LIBRARY = native.Library("paged_attention", _SOURCE,
                          {f"paged_decode_attention_{t}{h}": _SIGNATURE
                           for t in ("f32", "f16", "i8") for h in ("", "_hd64")})


def available() -> bool:
    """True when the native kernel is built and loadable (built on first call)."""
    return _LIBRARY.lib is not None


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     block_tables: torch.Tensor, lens: torch.Tensor, block_size: int,
                     k_scales: torch.Tensor | None = None, v_scales: torch.Tensor | None = None) -> torch.Tensor:
    """One query token per sequence attending to its whole cached context.

    Args:
        q: (B, nh, hd) fp32 contiguous.
        k_cache, v_cache: (slots, nkv, hd) fp32, fp16 or int8, contiguous (one layer of the KVStore).
        block_tables: (B, max_nb) int64; lens: (B,) int64 context lengths (incl. this token).
        k_scales, v_scales: (slots, nkv) fp32 row scales, int8 caches only.
    Returns:
        (B, nh, hd) fp32.
    """
    B, nh, hd = q.shape
    nkv = k_cache.shape[1]
    out = torch.empty_like(q)
    kind = {torch.float16: "f16", torch.float32: "f32", torch.int8: "i8"}[k_cache.dtype]
    fn = getattr(_LIBRARY.lib, f"paged_decode_attention_{kind}{'_hd64' if (hd, block_size) == (64, 16) else ''}")
    if k_cache.dtype == torch.int8 and (k_scales is None or v_scales is None):
        raise ValueError("an int8 KV cache needs its k/v scales")
    fn(q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
       0 if k_scales is None else k_scales.data_ptr(), 0 if v_scales is None else v_scales.data_ptr(),
       block_tables.data_ptr(), lens.data_ptr(), out.data_ptr(),
       B, nh, nkv, hd, block_size, block_tables.shape[1], hd ** -0.5)
    return out
