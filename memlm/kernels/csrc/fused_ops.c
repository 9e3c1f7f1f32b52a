/* Fused elementwise kernels of the bf16-matmul decoder layer (CPU), each one pass over its
   rows: rms_norm_bf16, add_rms_norm_bf16, rope_bf16, silu_mul_bf16, bf16_logits_refine,
   row_argmax. Wrapped by memlm/kernels/fused_ops.py, which holds the torch code each one is
   tested against and falls back to. */
#include "common.h"

#include <math.h>
#include <stdint.h>
#include <string.h>
#include <xmmintrin.h>
#include <immintrin.h>

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
            int d = 0;
#if defined(__AVX512F__)
            for (; d + 16 <= I; d += 16) {
                const __m512 a = bf16x16_load(g + d), b = bf16x16_load(u + d);
                const __m512 den = _mm512_add_ps(_mm512_set1_ps(1.f), exp512(_mm512_sub_ps(_mm512_setzero_ps(), a)));
                __m512 r = _mm512_rcp14_ps(den);                    /* 1/den: 2^-14, then */
                r = _mm512_mul_ps(r, _mm512_fnmadd_ps(den, r, _mm512_set1_ps(2.f)));   /* Newton */
                bf16x16_store(o + d, _mm512_mul_ps(_mm512_mul_ps(a, b), r));
            }
#endif
            for (; d < I; d++) {
                const float a = bf2f(g[d]);
                o[d] = f2bf(a * bf2f(u[d]) / (1.f + exp_approx(-a)));
            }
        }
        _mm_setcsr(csr);
    }
}

/* Logits of a bf16 LM head: widen each bf16 row to fp32 into `out`, find its K largest entries
   (a sorted list of K; a 16-wide compare skips the many entries below the current K-th), then
   recompute those K exactly in fp32 from the unrounded hidden state and the head's bf16 rows. */
#define TOPK_MAX 64
static inline void topk_insert(float* tv, int* ti, int* cnt, int K, float v, int i) {
    int p = *cnt < K ? (*cnt)++ : K - 1;
    while (p > 0 && tv[p - 1] < v) { tv[p] = tv[p - 1]; ti[p] = ti[p - 1]; p--; }
    tv[p] = v; ti[p] = i;
}

void bf16_logits_refine(const uint16_t* y, const float* hid, const uint16_t* w, float* out,
                        int n, int V, int H, int K) {
    #pragma omp parallel for schedule(static) if (n > 1)
    for (int r = 0; r < n; r++) {
        const uint16_t* yr = y + (int64_t)r * V;
        float* o = out + (int64_t)r * V;
        float tv[TOPK_MAX]; int ti[TOPK_MAX]; int cnt = 0;
        float thr = -INFINITY;
        int v = 0;
#if defined(__AVX512F__)
        for (; v + 16 <= V; v += 16) {
            const __m512 x = _mm512_castsi512_ps(_mm512_slli_epi32(
                _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(yr + v))), 16));
            _mm512_storeu_ps(o + v, x);
            __mmask16 mk = _mm512_cmp_ps_mask(x, _mm512_set1_ps(thr), _CMP_GT_OQ);
            while (mk) {
                const int l = __builtin_ctz(mk); mk &= mk - 1;
                if (o[v + l] > thr) {
                    topk_insert(tv, ti, &cnt, K, o[v + l], v + l);
                    if (cnt == K) thr = tv[K - 1];
                }
            }
        }
#endif
        for (; v < V; v++) {
            o[v] = bf2f(yr[v]);
            if (o[v] > thr) { topk_insert(tv, ti, &cnt, K, o[v], v); if (cnt == K) thr = tv[K - 1]; }
        }
        const float* h = hid + (int64_t)r * H;
        for (int c = 0; c < cnt; c++) {
            const uint16_t* wr = w + (int64_t)ti[c] * H;
            float d = 0.f;
            #pragma omp simd reduction(+:d)
            for (int k = 0; k < H; k++) d += h[k] * bf2f(wr[k]);
            o[ti[c]] = d;
        }
    }
}

/* Index of each row's first maximum; -1 for a row holding a NaN (the caller defers to torch,
   whose argmax treats NaN as the maximum). One pass: each lane keeps its max and first index. */
void row_argmax(const float* x, int64_t* out, int n, int V) {
    #pragma omp parallel for schedule(static) if ((int64_t)n * V >= 4 * PAR_MIN)
    for (int r = 0; r < n; r++) {
        const float* xr = x + (int64_t)r * V;
        float best = -INFINITY; int64_t bi = 0; int nan = 0; int v = 0;
#if defined(__AVX512F__)
        if (V >= 16) {
            __m512 bv = _mm512_loadu_ps(xr);
            __m512i bidx = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
            __m512i idx = bidx;
            __mmask16 unord = _mm512_cmp_ps_mask(bv, bv, _CMP_UNORD_Q);
            for (v = 16; v + 16 <= V; v += 16) {
                idx = _mm512_add_epi32(idx, _mm512_set1_epi32(16));
                const __m512 xv = _mm512_loadu_ps(xr + v);
                unord |= _mm512_cmp_ps_mask(xv, xv, _CMP_UNORD_Q);
                const __mmask16 gt = _mm512_cmp_ps_mask(xv, bv, _CMP_GT_OQ);
                bv = _mm512_mask_mov_ps(bv, gt, xv);
                bidx = _mm512_mask_mov_epi32(bidx, gt, idx);
            }
            nan = unord != 0;
            float lv[16]; int32_t li[16];
            _mm512_storeu_ps(lv, bv); _mm512_storeu_si512(li, bidx);
            best = lv[0]; bi = li[0];
            for (int l = 1; l < 16; l++)
                if (lv[l] > best || (lv[l] == best && li[l] < bi)) { best = lv[l]; bi = li[l]; }
        }
#endif
        for (; v < V; v++) {
            if (xr[v] != xr[v]) nan = 1;
            if (xr[v] > best || (v == 0 && !(xr[v] < best))) { best = xr[v]; bi = v; }
        }
        out[r] = nan ? -1 : bi;
    }
}
