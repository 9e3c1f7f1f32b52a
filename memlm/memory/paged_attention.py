"""A small native kernel for decode attention straight from the paged KV cache (CPU).

Owns: the C source, building it once per machine with the system C compiler into a cache
directory, loading it with ctypes, and `decode_attention(...)`. Where no compiler is found,
the build fails, the cache is not fp32/fp16 on CPU, or MEMLM_NATIVE=0, `available()` is False and
`kv_store.PagedView` uses gather + SDPA instead (same results up to float rounding).
Does not know: block ownership or scheduling.

Why: gather + SDPA moves every K/V byte three times (gather read, gather write, SDPA read);
decode attention is memory-bound, so reading each cached row once, in place, through the block
table is about 3x less traffic. One (sequence, kv head) pair per OpenMP task; the query heads
of a GQA group share each K/V row load; online softmax one block at a time.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import subprocess
import tempfile
from pathlib import Path

import torch

_SOURCE = r"""
#include <math.h>
#include <stdint.h>
#include <string.h>
#include <immintrin.h>

static inline void widen_f32(const float* src, float* dst, int n) { memcpy(dst, src, n * sizeof(float)); }

static inline void widen_f16(const _Float16* src, float* dst, int n) {
    int d = 0;
#ifdef __F16C__
    for (; d + 8 <= n; d += 8)
        _mm256_storeu_ps(dst + d, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(src + d))));
#endif
    for (; d < n; d++) dst[d] = (float)src[d];
}

/* One kernel body, instantiated for fp32 and fp16 caches (fp16 rows are widened on load). */
#define DEFINE_DECODE(NAME, KV_T, WIDEN)                                                            \
void NAME(const float* q, const KV_T* kc, const KV_T* vc, const int64_t* tables,              \
          const int64_t* lens, float* out, int B, int nh, int nkv, int hd, int bs,            \
          int max_nb, float scale)                                                             \
{                                                                                              \
    const int g = nh / nkv;                                                                    \
    _Pragma("omp parallel for collapse(2) schedule(dynamic, 1)")                              \
    for (int b = 0; b < B; b++) {                                                              \
        for (int kh = 0; kh < nkv; kh++) {                                                     \
            float m[g], l[g], acc[g][hd], s[g][bs], row[hd];                                   \
            const float* qb = q + ((int64_t)b * nh + (int64_t)kh * g) * hd;                    \
            for (int gi = 0; gi < g; gi++) {                                                   \
                m[gi] = -INFINITY; l[gi] = 0.f;                                                \
                for (int d = 0; d < hd; d++) acc[gi][d] = 0.f;                                 \
            }                                                                                  \
            const int64_t L = lens[b];                                                         \
            for (int64_t start = 0; start < L; start += bs) {                                  \
                const int n = (L - start) < bs ? (int)(L - start) : bs;                        \
                const int64_t base = tables[(int64_t)b * max_nb + start / bs] * bs;            \
                for (int t = 0; t < n; t++) {                                                  \
                    const KV_T* kr = kc + ((base + t) * nkv + kh) * hd;                        \
                    WIDEN(kr, row, hd);                                                        \
                    for (int gi = 0; gi < g; gi++) {                                           \
                        const float* qr = qb + gi * hd;                                        \
                        float dot = 0.f;                                                       \
                        _Pragma("omp simd reduction(+:dot)")                                   \
                        for (int d = 0; d < hd; d++) dot += qr[d] * row[d];                    \
                        s[gi][t] = dot * scale;                                                \
                    }                                                                          \
                }                                                                              \
                for (int gi = 0; gi < g; gi++) {                                               \
                    float bm = m[gi];                                                          \
                    for (int t = 0; t < n; t++) bm = s[gi][t] > bm ? s[gi][t] : bm;            \
                    const float corr = expf(m[gi] - bm);                                       \
                    l[gi] *= corr;                                                             \
                    for (int d = 0; d < hd; d++) acc[gi][d] *= corr;                           \
                    for (int t = 0; t < n; t++) { s[gi][t] = expf(s[gi][t] - bm); l[gi] += s[gi][t]; } \
                    m[gi] = bm;                                                                \
                }                                                                              \
                for (int t = 0; t < n; t++) {                                                  \
                    const KV_T* vr = vc + ((base + t) * nkv + kh) * hd;                        \
                    WIDEN(vr, row, hd);                                                        \
                    for (int gi = 0; gi < g; gi++) {                                           \
                        const float p = s[gi][t];                                              \
                        _Pragma("omp simd")                                                    \
                        for (int d = 0; d < hd; d++) acc[gi][d] += p * row[d];                 \
                    }                                                                          \
                }                                                                              \
            }                                                                                  \
            for (int gi = 0; gi < g; gi++) {                                                   \
                float* o = out + ((int64_t)b * nh + (int64_t)kh * g + gi) * hd;                \
                const float inv = 1.f / l[gi];                                                 \
                for (int d = 0; d < hd; d++) o[d] = acc[gi][d] * inv;                          \
            }                                                                                  \
        }                                                                                      \
    }                                                                                          \
}

DEFINE_DECODE(paged_decode_attention_f32, float, widen_f32)
DEFINE_DECODE(paged_decode_attention_f16, _Float16, widen_f16)
"""

_FLAGS = ["-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-std=c11"]
_lib = None
_tried = False


def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "memlm" / "kernels"


def _cpu_key() -> str:
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = ""
    return hashlib.sha256((_SOURCE + " ".join(_FLAGS) + flags).encode()).hexdigest()[:16]


def _build() -> ctypes.CDLL | None:
    if os.environ.get("MEMLM_NATIVE", "1") == "0":
        return None
    cc = os.environ.get("CC", "cc")
    target = _cache_dir() / f"paged_attention_{_cpu_key()}.so"
    try:
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory() as tmp:
                src = Path(tmp) / "paged_attention.c"
                src.write_text(_SOURCE)
                built = Path(tmp) / "out.so"
                subprocess.run([cc, *_FLAGS, str(src), "-o", str(built), "-lm"], check=True,
                               capture_output=True, timeout=120)
                os.replace(built, target)     # atomic: concurrent builders never see half a file
        lib = ctypes.CDLL(str(target))
    except (OSError, subprocess.SubprocessError):
        return None
    for fn in (lib.paged_decode_attention_f32, lib.paged_decode_attention_f16):
        fn.restype = None
        fn.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_int] * 6 + [ctypes.c_float]
    return lib


def available() -> bool:
    """True when the native kernel is built and loadable (built on first call)."""
    global _lib, _tried
    if not _tried:
        _tried = True
        _lib = _build()
    return _lib is not None


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     block_tables: torch.Tensor, lens: torch.Tensor, block_size: int) -> torch.Tensor:
    """One query token per sequence attending to its whole cached context.

    Args:
        q: (B, nh, hd) fp32 contiguous.
        k_cache, v_cache: (slots, nkv, hd) fp32 or fp16, contiguous (one layer of the KVStore).
        block_tables: (B, max_nb) int64; lens: (B,) int64 context lengths (incl. this token).
    Returns:
        (B, nh, hd) fp32.
    """
    B, nh, hd = q.shape
    nkv = k_cache.shape[1]
    out = torch.empty_like(q)
    fn = _lib.paged_decode_attention_f16 if k_cache.dtype == torch.float16 else _lib.paged_decode_attention_f32
    fn(q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
                                block_tables.data_ptr(), lens.data_ptr(), out.data_ptr(),
                                B, nh, nkv, hd, block_size, block_tables.shape[1], hd ** -0.5)
    return out
