/* Matmuls that read ggml block-quantized weights directly: y (M, N) = x (M, K) . W^T, fp32 x
   and y, W as N rows of K/32 blocks of 32 weights (the GGUF layouts, kept as loaded):

     Q8_0  {fp16 d; int8 q[32]}           34 bytes   w = d q
     Q4_0  {fp16 d; uint8 qs[16]}         18 bytes   w = d (q - 8)
     Q4_1  {fp16 d; fp16 m; uint8 qs[16]} 20 bytes   w = d q + m
   (4-bit: qs[j] & 15 is element j, qs[j] >> 4 element j + 16.)

   Per block and row of x: d * sum(q x) + m * sum(x) (Q4_0: m = -8 d), accumulated in fp32;
   the per-block sums of x are computed once per call. Rows of x are taken 8 at a time, so each
   weight block is decoded once per 8 rows; threads split the output columns (OpenMP).
   Wrapped by memlm/kernels/gemv.py, whose torch code (dequantize, then matmul) is the reference
   and the fallback. AVX-512 where the compiler targets it, plain C otherwise. */
#include "common.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum { QK = 32, TYPE_Q4_0 = 2, TYPE_Q4_1 = 3, TYPE_Q8_0 = 8, MT = 8 };

static inline float half_to_float(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1Fu, mant = h & 0x3FFu, bits;
    if (exp == 0x1F) {
        bits = sign | 0x7F800000u | (mant << 13);                       /* inf / nan */
    } else if (exp != 0) {
        bits = sign | ((exp + 112u) << 23) | (mant << 13);               /* normal */
    } else if (mant == 0) {
        bits = sign;                                                     /* zero */
    } else {                                                             /* subnormal */
        exp = 113u;
        while (!(mant & 0x400u)) { mant <<= 1; exp--; }
        bits = sign | (exp << 23) | ((mant & 0x3FFu) << 13);
    }
    float f; memcpy(&f, &bits, 4);
    return f;
}

#if defined(__F16C__)
#include <immintrin.h>
static inline float block_scale(const uint8_t* b) { uint16_t h; memcpy(&h, b, 2); return _cvtsh_ss(h); }
#else
static inline float block_scale(const uint8_t* b) { uint16_t h; memcpy(&h, b, 2); return half_to_float(h); }
#endif

static int block_bytes(int type) {
    return type == TYPE_Q8_0 ? 34 : type == TYPE_Q4_0 ? 18 : type == TYPE_Q4_1 ? 20 : 0;
}

/* acc[r] += dot(block b of row n, x rows r0.. r0+mr, block g); m terms are added by the caller */
#if defined(__AVX512F__)
#include <immintrin.h>

static inline float hsum(__m512 v) { return _mm512_reduce_add_ps(v); }

static inline __attribute__((always_inline)) void row_dot(int type, const uint8_t* w, const float* x,
                                                         const float* xs, float* out, int mr, int K, int G) {
    __m512 acc[MT];
    float msum[MT];
    for (int r = 0; r < mr; r++) { acc[r] = _mm512_setzero_ps(); msum[r] = 0.f; }
    const int bb = block_bytes(type);
    for (int g = 0; g < G; g++) {
        const uint8_t* b = w + (int64_t)g * bb;
        const float d = block_scale(b);
        __m512 lo, hi;
        float m = 0.f;
        if (type == TYPE_Q8_0) {
            lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(b + 2))));
            hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(b + 18))));
        } else {
            const uint8_t* qs = b + (type == TYPE_Q4_1 ? 4 : 2);
            m = type == TYPE_Q4_1 ? block_scale(b + 2) : -8.f * d;
            const __m512i e = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)qs));
            lo = _mm512_cvtepi32_ps(_mm512_and_si512(e, _mm512_set1_epi32(15)));
            hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(e, 4));
        }
        const __m512 dv = _mm512_set1_ps(d);
        for (int r = 0; r < mr; r++) {
            const float* xr = x + (int64_t)r * K + (int64_t)g * QK;
            __m512 t = _mm512_mul_ps(lo, _mm512_loadu_ps(xr));
            t = _mm512_fmadd_ps(hi, _mm512_loadu_ps(xr + 16), t);
            acc[r] = _mm512_fmadd_ps(dv, t, acc[r]);
            msum[r] += m * xs[(int64_t)r * G + g];
        }
    }
    for (int r = 0; r < mr; r++) out[r] = hsum(acc[r]) + msum[r];
}
#else
static inline __attribute__((always_inline)) void row_dot(int type, const uint8_t* w, const float* x,
                                                         const float* xs, float* out, int mr, int K, int G) {
    float acc[MT], msum[MT], q[QK];
    for (int r = 0; r < mr; r++) { acc[r] = 0.f; msum[r] = 0.f; }
    const int bb = block_bytes(type);
    for (int g = 0; g < G; g++) {
        const uint8_t* b = w + (int64_t)g * bb;
        const float d = block_scale(b);
        float m = 0.f;
        if (type == TYPE_Q8_0) {
            for (int j = 0; j < QK; j++) q[j] = (float)(int8_t)b[2 + j];
        } else {
            const uint8_t* qs = b + (type == TYPE_Q4_1 ? 4 : 2);
            m = type == TYPE_Q4_1 ? block_scale(b + 2) : -8.f * d;
            for (int j = 0; j < QK / 2; j++) { q[j] = (float)(qs[j] & 15); q[j + 16] = (float)(qs[j] >> 4); }
        }
        for (int r = 0; r < mr; r++) {
            const float* xr = x + (int64_t)r * K + (int64_t)g * QK;
            float t = 0.f;
            for (int j = 0; j < QK; j++) t += q[j] * xr[j];
            acc[r] += d * t;
            msum[r] += m * xs[(int64_t)r * G + g];
        }
    }
    for (int r = 0; r < mr; r++) out[r] = acc[r] + msum[r];
}
#endif

/* W: N rows of K/32 blocks of `type`; x (M, K) fp32; y (M, N) fp32. K % 32 == 0 (the wrapper
   pads). Unknown types leave y untouched (the wrapper only passes the three above). */
void gemv_q(int type, const uint8_t* W, const float* x, float* y, int M, int N, int K) {
    const int bb = block_bytes(type), G = K / QK;
    if (bb == 0 || M <= 0 || N <= 0) return;
    const int64_t row_bytes = (int64_t)G * bb;
    float* xs = (float*)malloc(sizeof(float) * (size_t)M * (size_t)G);   /* per-block sums of x */
    if (xs == NULL) return;
    for (int64_t i = 0; i < (int64_t)M * G; i++) {
        const float* p = x + i * QK;
        float s = 0.f;
        for (int j = 0; j < QK; j++) s += p[j];
        xs[i] = s;
    }
    _Pragma("omp parallel for schedule(static) if((int64_t)N * K * M >= 65536)")
    for (int n = 0; n < N; n++) {
        float out[MT];
        prefetch_row(W + (int64_t)n * row_bytes, row_bytes);
        for (int r0 = 0; r0 < M; r0 += MT) {
            const int mr = M - r0 < MT ? M - r0 : MT;
            const uint8_t* w = W + (int64_t)n * row_bytes;
            const float *xr = x + (int64_t)r0 * K, *xsr = xs + (int64_t)r0 * G;
            /* constant types and row counts: one specialised loop each, accumulators in registers */
#define ROWS(T, R) case R: row_dot(T, w, xr, xsr, out, R, K, G); break;
#define TYPE(T) case T: switch (mr) { ROWS(T, 1) ROWS(T, 2) ROWS(T, 3) ROWS(T, 4) ROWS(T, 5) \
                                      ROWS(T, 6) ROWS(T, 7) ROWS(T, 8) } break;
            switch (type) { TYPE(TYPE_Q8_0) TYPE(TYPE_Q4_0) TYPE(TYPE_Q4_1) }
#undef TYPE
#undef ROWS
            for (int r = 0; r < mr; r++) y[(int64_t)(r0 + r) * N + n] = out[r];
        }
    }
    free(xs);
}

/* Dequantize W (N rows of K/32 blocks of `type`) into out (N, K) bf16 (round to nearest even):
   the tile a large-M matmul multiplies with the bf16 GEMM, where reusing each weight over
   many rows beats decoding blocks per 8 rows. Threads split the rows. */
static inline uint16_t float_to_bf16(float f) {
    uint32_t bits; memcpy(&bits, &f, 4);
    if ((bits & 0x7F800000u) == 0x7F800000u) return (uint16_t)(bits >> 16);   /* inf / nan */
    return (uint16_t)((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
}

/* one block of 32 weights -> o[0..32) bf16 */
static inline void dequant_block_bf16(int type, const uint8_t* w, uint16_t* o) {
    const float d = block_scale(w);
#if defined(__AVX512F__)
    const __m512 vd = _mm512_set1_ps(d);
    if (type == TYPE_Q8_0) {
        const __m128i* q = (const __m128i*)(w + 2);
        for (int h = 0; h < 2; h++)
            bf16x16_store(o + 16 * h, _mm512_mul_ps(vd, _mm512_cvtepi32_ps(
                _mm512_cvtepi8_epi32(_mm_loadu_si128(q + h)))));
        return;
    }
    const __m512 vm = _mm512_set1_ps(type == TYPE_Q4_1 ? block_scale(w + 2) : -8.f * d);
    const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(w + (type == TYPE_Q4_1 ? 4 : 2))));
    const __m512i lo = _mm512_and_si512(b, _mm512_set1_epi32(15)), hi = _mm512_srli_epi32(b, 4);
    bf16x16_store(o, _mm512_fmadd_ps(vd, _mm512_cvtepi32_ps(lo), vm));
    bf16x16_store(o + 16, _mm512_fmadd_ps(vd, _mm512_cvtepi32_ps(hi), vm));
#else
    if (type == TYPE_Q8_0) {
        const int8_t* q = (const int8_t*)(w + 2);
        for (int j = 0; j < QK; j++) o[j] = float_to_bf16(d * (float)q[j]);
        return;
    }
    const float m = type == TYPE_Q4_1 ? block_scale(w + 2) : -8.f * d;
    const uint8_t* qs = w + (type == TYPE_Q4_1 ? 4 : 2);
    for (int j = 0; j < QK / 2; j++) {
        o[j] = float_to_bf16(d * (float)(qs[j] & 15) + m);
        o[j + QK / 2] = float_to_bf16(d * (float)(qs[j] >> 4) + m);
    }
#endif
}

void dequant_q_bf16(int type, const uint8_t* W, uint16_t* out, int N, int K) {
    const int bb = block_bytes(type), G = K / QK;
    if (bb == 0 || N <= 0) return;
    const int64_t row_bytes = (int64_t)G * bb;
    _Pragma("omp parallel for schedule(static) if((int64_t)N * K >= 65536)")
    for (int n = 0; n < N; n++) {
        const uint8_t* w = W + (int64_t)n * row_bytes;
        uint16_t* o = out + (int64_t)n * K;
        for (int g = 0; g < G; g++) dequant_block_bf16(type, w + (int64_t)g * bb, o + g * QK);
    }
}

/* Streaming read bandwidth probe for the benchmark: sum of n floats (the bytes-per-token
   figure is compared against it). Threads split the array. */
void stream_sum(const float* a, int64_t n, float* out) {
    float total = 0.f;
    _Pragma("omp parallel for simd reduction(+:total) schedule(static)")
    for (int64_t i = 0; i < n; i++) total += a[i];
    *out = total;
}
