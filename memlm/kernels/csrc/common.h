/* Helpers shared by memlm's C kernels; each kernel source includes this first.

   Owns: a branch-free scalar e^x (exp_approx), the software prefetch of the weight rows ahead
   (prefetch_row), the paged attention kernel's signature (paged_attend_fn) and, on AVX-512, e^x's 16-lane form (exp512) and bf16x16 load / store (round
   to nearest even).
   Does not know: any kernel; keep only code that more than one kernel family uses. */
#ifndef MEMLM_KERNELS_COMMON_H
#define MEMLM_KERNELS_COMMON_H

#include <stdint.h>
#include <string.h>

/* e^x, branch-free so loops over it vectorize (libm's expf does not without -ffast-math):
   2^(x log2 e) = 2^i * 2^f, 2^f by its degree-6 Taylor polynomial on [0, 1]; relative error
   < 2e-5 (measured 8e-6 on [-4, 4]), below the fp16 / bf16 rounding of what it multiplies.
   Inputs below -87 (including -inf) give ~1e-38, not 0. */
static inline float exp_approx(float x) {
    x = x < -87.f ? -87.f : x;
    x = x > 88.f ? 88.f : x;
    const float t = x * 1.44269504f;
    const int i = (int)t - (t < 0.f ? 1 : 0);
    const float f = t - (float)i;
    const float p = 1.f + f * (0.693147181f + f * (0.240226507f + f * (0.0555041087f
                  + f * (0.00961812911f + f * (0.00133335581f + f * 0.000154035304f)))));
    const uint32_t bits = (uint32_t)(i + 127) << 23;
    float scale; memcpy(&scale, &bits, 4);
    return p * scale;
}

/* Weight rows are streamed once per step; ask for the bytes PREFETCH_AHEAD past the row about to
   be read. The hardware prefetchers alone left the decode kernels over weights not in L2 at a
   third of their in-cache speed on the VMs measured (BENCHMARKS.md, eighth round). */
enum { PREFETCH_AHEAD = 2048 };
static inline void prefetch_row(const void* row, int64_t bytes) {
    const char* p = (const char*)row + PREFETCH_AHEAD;
    for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(p + o, 0, 3);
}

/* paged_attention.c's paged_decode_attention_* (q, kc, vc, ks, vs, tables, lens, out, mass, B,
   nh, nkv, hd, block size, max_nb, scale), as the whole-layer decode steps call it by address */
typedef void (*paged_attend_fn)(const float*, const void*, const void*, const float*, const float*,
                                const int64_t*, const int64_t*, float*, float*, int, int, int, int, int,
                                int, float);

#if defined(__AVX512F__)
#include <immintrin.h>
/* 16 lanes of e^x: 2^n * p(f) with n = round(x log2 e), |f| <= 1/2, p the degree-6 Taylor
   polynomial of 2^f (error < 2e-8 relative on that interval); x clamped to [-87, 88]. */
static inline __m512 exp512(__m512 x) {
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.f)), _mm512_set1_ps(88.f));
    const __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504f));
    const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_sub_ps(t, n);
    __m512 p = _mm512_set1_ps(0.000154035304f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.00133335581f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.00961812911f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.0555041087f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.240226507f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.693147181f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
    return _mm512_scalef_ps(p, n);
}

/* 16 bf16 <-> 16 fp32 (round to nearest even, as f2bf) */
static inline __m512 bf16x16_load(const uint16_t* p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}
static inline void bf16x16_store(uint16_t* p, __m512 v) {
    __m512i u = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    u = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
    _mm256_storeu_si256((__m256i*)p, _mm512_cvtepi32_epi16(_mm512_srli_epi32(u, 16)));
}
#endif
#endif  /* MEMLM_KERNELS_COMMON_H */
