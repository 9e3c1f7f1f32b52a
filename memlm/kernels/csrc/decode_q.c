/* Decode-time matmuls on ggml block weights (Q8_0, Q4_0, Q4_1, layouts as in gemv_q.c) with
   8-bit activations, and the two fused steps of a batch-1..8 decoder layer built on them.

   Activations: each row of x is quantized per block of 32 (d = max|x| / 127, q = round(x / d),
   s = d * sum(q)), once per call, as llama.cpp's Q8_1 activations; then per weight block

     Q8_0  d_w d_x sum(q_w q_x)           Q4_1  d_w d_x sum(q_w q_x) + m_w s_x
     Q4_0  d_w d_x sum(q_w q_x) - 8 d_w s_x

   with the integer dot products in int32 (AVX-512 VNNI vpdpbusd on two blocks at a time where
   the compiler targets it, four at a time for the 4-bit types where it has VBMI's byte permutes
   too (q4_rows: 1.25x the two-block loop on the Xeon VM, 2 threads); plain C otherwise, same
   integers). The error against the exact fp32
   product is bounded by sum_g sum_j |w_gj| d_x,g / 2 (the rounding of x), which the tests check.

     qmatmul            y (M, N) fp32 = x (M, K) fp32 . W^T
     block_attn_in      rms_norm(x) -> qkv projection (+ bias) -> RoPE of the q and k heads -> bf16
     block_attn_out_mlp x += o_proj(a); h = rms_norm(x); x += down(silu(gate(h)) * up(h))
     block_layer_step   the two above around the new rows' k / v written into a paged float
                        cache and paged_attention.c's decode kernel (called by address): a
                        whole decoder layer per call, no Python between its parts

   The fused steps run in one OpenMP region each (threads split every projection's output rows,
   with barriers between phases); their scratch (a few rows of the layer's widths) is allocated
   here per call. Wrapped by memlm/kernels/block_layer.py; gemv_q.c's fp32 kernel stays the
   reference path for CPUs without VNNI. */
#include "common.h"
#include "ggml_blocks.h"

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <immintrin.h>

enum { QK = 32, TYPE_Q4_0 = 2, TYPE_Q4_1 = 3, TYPE_Q8_0 = 8, MR = 4 };

static inline float bf2f(uint16_t h) { uint32_t u = (uint32_t)h << 16; float f; memcpy(&f, &u, 4); return f; }
static inline uint16_t f2bf(float f) {
    uint32_t u; memcpy(&u, &f, 4);
    if ((u & 0x7F800000u) == 0x7F800000u) return (uint16_t)(u >> 16);
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

/* M rows of K (K % 32 == 0) quantized activations: q (M, K) int8, d and s (M, G) fp32, and on
   AVX-512 per pair of blocks the 16-lane vectors dp = [d_g x8 | d_g+1 x8], sp = [s_g / 8 x8 | ...]
   (so an 8-lane product sums to the block's term); for the 4-bit kernel (Q4_VBMI), per group of
   four blocks, q4 = their first 16 bytes each then their last 16 each (128 bytes: the order in
   which one byte permute lays out the four blocks' nibbles), d4 = d_(g + l / 4) and s4 =
   s_(g + l / 4) / 4 in lane l. */
typedef struct { int8_t *q, *q4; float *d, *s, *dp, *sp, *d4, *s4; int M, K, G, P; } qact;

#if defined(__AVX512F__) && defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512VBMI__)
#define Q4_VBMI 1
#endif

#if defined(Q4_VBMI)
/* byte j of four consecutive blocks' qs (16 per block) at (j / 16) * block bytes + header + j % 16,
   and their d, d, d, d, m, m, m, m halves (Q4_0's m unused) */
static const uint8_t Q41_QS[64] = {4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 24, 25, 26, 27,
    28, 29, 30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 44, 45, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57,
    58, 59, 64, 65, 66, 67, 68, 69, 70, 71, 72, 73, 74, 75, 76, 77, 78, 79};
static const uint8_t Q41_DM[16] = {0, 1, 20, 21, 40, 41, 60, 61, 2, 3, 22, 23, 42, 43, 62, 63};
static const uint8_t Q40_QS[64] = {2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 20, 21, 22, 23,
    24, 25, 26, 27, 28, 29, 30, 31, 32, 33, 34, 35, 38, 39, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51,
    52, 53, 56, 57, 58, 59, 60, 61, 62, 63, 64, 65, 66, 67, 68, 69, 70, 71};
static const uint8_t Q40_DM[16] = {0, 1, 18, 19, 36, 37, 54, 55, 2, 3, 20, 21, 38, 39, 56, 57};
#endif

static int qact_alloc(qact* a, int M, int K) {
    a->M = M; a->K = K; a->G = K / QK; a->P = (a->G + 1) / 2;
    const size_t nq = ((size_t)M * K + 63) / 64 * 64, ng = (size_t)M * a->G, np = (size_t)M * a->P * 16;
    const size_t n4 = (size_t)M * ((a->G + 3) / 4) * 16, nq4 = n4 * 8;
    char* mem = (char*)aligned_alloc(64, nq + nq4 + 4 * (2 * ng + 2 * np + 2 * n4 + 16));
    if (mem == NULL) return 0;
    a->q = (int8_t*)mem;
    a->q4 = a->q + nq;
    a->dp = (float*)(mem + nq + nq4);
    a->sp = a->dp + np;
    a->d4 = a->sp + np;
    a->s4 = a->d4 + n4;
    a->d = a->s4 + n4;
    a->s = a->d + ng;
    return 1;
}
static void qact_free(qact* a) { free(a->q); }

/* row r of x (K fp32) -> the quantized row r of a */
static void quantize_row(qact* a, int r, const float* x) {
    const int G = a->G;
    int8_t* q = a->q + (int64_t)r * a->K;
    float *d = a->d + (int64_t)r * G, *s = a->s + (int64_t)r * G;
    for (int g = 0; g < G; g++) {
        const float* xb = x + g * QK;
        int8_t* qb = q + g * QK;
#if defined(__AVX512F__)
        const __m512 lo = _mm512_loadu_ps(xb), hi = _mm512_loadu_ps(xb + 16);
        const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi)));
        const float db = amax / 127.f, id = amax > 0.f ? 127.f / amax : 0.f;
        const __m512i ql = _mm512_cvtps_epi32(_mm512_mul_ps(lo, _mm512_set1_ps(id)));
        const __m512i qh = _mm512_cvtps_epi32(_mm512_mul_ps(hi, _mm512_set1_ps(id)));
        _mm_storeu_si128((__m128i*)qb, _mm512_cvtsepi32_epi8(ql));
        _mm_storeu_si128((__m128i*)(qb + 16), _mm512_cvtsepi32_epi8(qh));
        const int sum = _mm512_reduce_add_epi32(_mm512_add_epi32(ql, qh));
#else
        float amax = 0.f;
        for (int j = 0; j < QK; j++) amax = fmaxf(amax, fabsf(xb[j]));
        const float db = amax / 127.f, id = amax > 0.f ? 127.f / amax : 0.f;
        int sum = 0;
        for (int j = 0; j < QK; j++) { const int v = (int)nearbyintf(xb[j] * id); qb[j] = (int8_t)v; sum += v; }
#endif
        d[g] = db;
        s[g] = db * (float)sum;
    }
    float *dp = a->dp + (int64_t)r * a->P * 16, *sp = a->sp + (int64_t)r * a->P * 16;
    for (int p = 0; p < a->P; p++)
        for (int l = 0; l < 16; l++) {
            const int g = 2 * p + l / 8;
            dp[p * 16 + l] = g < G ? d[g] : 0.f;
            sp[p * 16 + l] = g < G ? s[g] * 0.125f : 0.f;
        }
#if defined(Q4_VBMI)
    const int Q = (G + 3) / 4;
    int8_t* q4 = a->q4 + (int64_t)r * Q * 128;
    float *d4 = a->d4 + (int64_t)r * Q * 16, *s4 = a->s4 + (int64_t)r * Q * 16;
    for (int c = 0; c < Q; c++)
        for (int b = 0; b < 4; b++) {
            const int g = 4 * c + b;                   /* blocks past G: zeros */
            if (g < G) {
                memcpy(q4 + c * 128 + b * 16, q + g * QK, 16);
                memcpy(q4 + c * 128 + 64 + b * 16, q + g * QK + 16, 16);
            } else {
                memset(q4 + c * 128 + b * 16, 0, 16);
                memset(q4 + c * 128 + 64 + b * 16, 0, 16);
            }
            for (int l = 0; l < 4; l++) {
                d4[c * 16 + 4 * b + l] = g < G ? d[g] : 0.f;
                s4[c * 16 + 4 * b + l] = g < G ? s[g] * 0.25f : 0.f;
            }
        }
#endif
}

/* the integer dot product of weight block b with activation block qx, and the block's m term */
static inline int block_isum(int type, const uint8_t* b, const int8_t* qx) {
    int sum = 0;
    if (type == TYPE_Q8_0) {
        const int8_t* qw = (const int8_t*)(b + 2);
        for (int j = 0; j < QK; j++) sum += qw[j] * qx[j];
    } else {
        const uint8_t* qs = b + (type == TYPE_Q4_1 ? 4 : 2);
        for (int j = 0; j < QK / 2; j++) sum += (qs[j] & 15) * qx[j] + (qs[j] >> 4) * qx[j + 16];
    }
    return sum;
}
static inline float block_m(int type, const uint8_t* b) {
    return type == TYPE_Q4_1 ? f16(b + 2) : type == TYPE_Q4_0 ? -8.f * f16(b) : 0.f;
}

/* out[r] = row n of W (G blocks at w) . activation rows r0 .. r0 + mr */
static inline __attribute__((always_inline)) void row_dot(int type, const uint8_t* w, const qact* a,
                                                         int r0, int mr, float* out) {
    const int G = a->G, bb = block_bytes(type);
    int g = 0;
#if defined(__AVX512F__) && defined(__AVX512VNNI__) && defined(__AVX512BW__)
    __m512 acc[MR];
    for (int r = 0; r < mr; r++) acc[r] = _mm512_setzero_ps();
    const __m512i idx_d = _mm512_set_epi32(2, 2, 2, 2, 2, 2, 2, 2, 0, 0, 0, 0, 0, 0, 0, 0);
    const __m512i idx_m = _mm512_set_epi32(3, 3, 3, 3, 3, 3, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1);
    const __m512i idx_01 = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
    for (; g + 2 <= G; g += 2) {
        const uint8_t *b0 = w + (int64_t)g * bb, *b1 = b0 + bb;
        __m512i wv;
        __m512 dw, mw = _mm512_setzero_ps();
        __mmask64 neg = 0;
        if (type == TYPE_Q8_0) {
            const __m512i raw = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i*)(b0 + 2))),
                                                   _mm256_loadu_si256((const __m256i*)(b1 + 2)), 1);
            neg = _mm512_movepi8_mask(raw);
            wv = _mm512_abs_epi8(raw);
            uint16_t h0, h1; memcpy(&h0, b0, 2); memcpy(&h1, b1, 2);
            const __m512 dd = _mm512_castps128_ps512(_mm_cvtph_ps(_mm_cvtsi32_si128((int)((uint32_t)h0 | ((uint32_t)h1 << 16)))));
            dw = _mm512_permutexvar_ps(idx_01, dd);
        } else {
            const int off = type == TYPE_Q4_1 ? 4 : 2;
            const __m256i qs = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i*)(b0 + off))),
                                                       _mm_loadu_si128((const __m128i*)(b1 + off)), 1);
            const __m256i m4 = _mm256_set1_epi8(15);
            const __m256i lo = _mm256_and_si256(qs, m4), hi = _mm256_and_si256(_mm256_srli_epi16(qs, 4), m4);
            wv = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);          /* lo0 lo1 hi0 hi1 */
            wv = _mm512_shuffle_i64x2(wv, wv, _MM_SHUFFLE(3, 1, 2, 0));          /* lo0 hi0 lo1 hi1 */
            if (type == TYPE_Q4_1) {
                uint32_t h0, h1; memcpy(&h0, b0, 4); memcpy(&h1, b1, 4);
                const __m512 dm = _mm512_castps128_ps512(_mm_cvtph_ps(_mm_set_epi32(0, 0, (int)h1, (int)h0)));
                dw = _mm512_permutexvar_ps(idx_d, dm);                            /* d0 m0 d1 m1 */
                mw = _mm512_permutexvar_ps(idx_m, dm);
            } else {
                uint16_t h0, h1; memcpy(&h0, b0, 2); memcpy(&h1, b1, 2);
                const __m512 dd = _mm512_castps128_ps512(_mm_cvtph_ps(_mm_cvtsi32_si128((int)((uint32_t)h0 | ((uint32_t)h1 << 16)))));
                dw = _mm512_permutexvar_ps(idx_01, dd);
                mw = _mm512_mul_ps(dw, _mm512_set1_ps(-8.f));
            }
        }
        for (int r = 0; r < mr; r++) {
            const int64_t ro = (int64_t)(r0 + r);
            __m512i xv = _mm512_loadu_si512((const void*)(a->q + ro * a->K + (int64_t)g * QK));
            if (type == TYPE_Q8_0) xv = _mm512_mask_sub_epi8(xv, neg, _mm512_setzero_si512(), xv);
            const __m512i p = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wv, xv);
            const float* dp = a->dp + (ro * a->P + g / 2) * 16;
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), _mm512_mul_ps(dw, _mm512_loadu_ps(dp)), acc[r]);
            if (type != TYPE_Q8_0) {
                const float* sp = a->sp + (ro * a->P + g / 2) * 16;
                acc[r] = _mm512_fmadd_ps(mw, _mm512_loadu_ps(sp), acc[r]);
            }
        }
    }
    for (int r = 0; r < mr; r++) out[r] = _mm512_reduce_add_ps(acc[r]);
#else
    for (int r = 0; r < mr; r++) out[r] = 0.f;
#endif
    for (; g < G; g++) {                            /* the rest (all of it without VNNI) */
        const uint8_t* b = w + (int64_t)g * bb;
        const float dw = f16(b), mw = block_m(type, b);
        for (int r = 0; r < mr; r++) {
            const int64_t ro = (int64_t)(r0 + r);
            const int isum = block_isum(type, b, a->q + ro * a->K + (int64_t)g * QK);
            out[r] += dw * a->d[ro * G + g] * (float)isum + mw * a->s[ro * G + g];
        }
    }
}

#if defined(Q4_VBMI)
/* qgemv_rows for Q4_0 / Q4_1 with VBMI: four blocks (80 / 72 bytes) a step, the last group
   masked to the row's blocks; one two-source byte permute gathers their 64 qs bytes, another
   their d (and m) halves; lane l of the int32 sums belongs to block l / 4 of the group. */
typedef struct { __m512i idx_q, idx_s, idx_d, idx_m; __mmask64 la, lb, full; __mmask16 lanes; int Q, bb, t1; } q4_consts;

/* out[r] = row w . activation rows r0 .. r0 + mr (mr a constant where inlined: the sums stay in
   registers) */
static inline __attribute__((always_inline)) void q4_dot(const uint8_t* w, const qact* a, const q4_consts* k,
                                                        int r0, int mr, float* out) {
    const int Q = k->Q, bb = k->bb;
    const __m512i m4 = _mm512_set1_epi8(15);
    __m512 f[MR], fm[MR];
    for (int r = 0; r < mr; r++) f[r] = fm[r] = _mm512_setzero_ps();
    for (int c = 0; c < Q; c++) {
        const uint8_t* b = w + (int64_t)c * 4 * bb;
        const int end = c == Q - 1;
        const __m512i A = end ? _mm512_maskz_loadu_epi8(k->la, b) : _mm512_loadu_si512((const void*)b);
        const __m512i B = _mm512_maskz_loadu_epi8(end ? k->lb : k->full, b + 64);
        const __m512i qs = _mm512_permutex2var_epi8(A, k->idx_q, B);
        const __m512i lo = _mm512_and_si512(qs, m4), hi = _mm512_and_si512(_mm512_srli_epi16(qs, 4), m4);
        const __m512 ds = _mm512_castps256_ps512(_mm256_cvtph_ps(_mm512_castsi512_si128(
                                                 _mm512_permutex2var_epi8(A, k->idx_s, B))));
        const __mmask16 lanes = end ? k->lanes : (__mmask16)0xFFFF;     /* no 0 x inf past the row */
        const __m512 dw = _mm512_maskz_permutexvar_ps(lanes, k->idx_d, ds);
        const __m512 mw = k->t1 ? _mm512_maskz_permutexvar_ps(lanes, k->idx_m, ds) : _mm512_mul_ps(dw, _mm512_set1_ps(-8.f));
        for (int r = 0; r < mr; r++) {
            const int64_t at = (int64_t)(r0 + r) * Q + c;
            const int8_t* x4 = a->q4 + at * 128;
            const __m512i p = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), lo,
                _mm512_loadu_si512((const void*)x4)), hi, _mm512_loadu_si512((const void*)(x4 + 64)));
            f[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), _mm512_mul_ps(dw, _mm512_loadu_ps(a->d4 + at * 16)), f[r]);
            fm[r] = _mm512_fmadd_ps(mw, _mm512_loadu_ps(a->s4 + at * 16), fm[r]);
        }
    }
    for (int r = 0; r < mr; r++) out[r] = _mm512_reduce_add_ps(_mm512_add_ps(f[r], fm[r]));
}

static void q4_rows(int type, const uint8_t* W, const qact* a, float* y, int64_t ldy, int N, int acc) {
    q4_consts k;
    k.t1 = type == TYPE_Q4_1; k.bb = block_bytes(type); k.Q = (a->G + 3) / 4;
    const int64_t row_bytes = (int64_t)a->G * k.bb;
    k.idx_q = _mm512_loadu_si512((const void*)(k.t1 ? Q41_QS : Q40_QS));
    k.idx_s = _mm512_castsi128_si512(_mm_loadu_si128((const __m128i*)(k.t1 ? Q41_DM : Q40_DM)));
    k.idx_d = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
    k.idx_m = _mm512_add_epi32(k.idx_d, _mm512_set1_epi32(4));
    const int last = a->G - 4 * (k.Q - 1);                     /* blocks in the last group */
    const int64_t lb = (int64_t)last * k.bb;
    k.la = lb >= 64 ? ~(__mmask64)0 : (((__mmask64)1 << lb) - 1);
    k.lb = lb > 64 ? (((__mmask64)1 << (lb - 64)) - 1) : 0;
    k.full = ((__mmask64)1 << (4 * k.bb - 64)) - 1;
    k.lanes = (__mmask16)((1u << (4 * last)) - 1);
    _Pragma("omp for schedule(static)")
    for (int n = 0; n < N; n++) {
        const uint8_t* w = W + (int64_t)n * row_bytes;
        prefetch_row(w, row_bytes);
        float out[MR];
        for (int r0 = 0; r0 < a->M; r0 += MR) {
            const int mr = a->M - r0 < MR ? a->M - r0 : MR;
            switch (mr) {
                case 1: q4_dot(w, a, &k, r0, 1, out); break;
                case 2: q4_dot(w, a, &k, r0, 2, out); break;
                case 3: q4_dot(w, a, &k, r0, 3, out); break;
                default: q4_dot(w, a, &k, r0, 4, out); break;
            }
            for (int r = 0; r < mr; r++) {
                float* o = y + (int64_t)(r0 + r) * ldy + n;
                *o = acc ? *o + out[r] : out[r];
            }
        }
    }
}
#endif

/* y[r * ldy + n] (+)= W row n . activation row r, for n in [n0, n1) and every row of a: called
   inside a parallel region (an orphaned `omp for`) or alone. acc: add into y instead of storing. */
static void qgemv_rows(int type, const uint8_t* W, const qact* a, float* y, int64_t ldy, int N, int acc) {
#if defined(Q4_VBMI)
    if (type != TYPE_Q8_0) { q4_rows(type, W, a, y, ldy, N, acc); return; }
#endif
    const int64_t row_bytes = (int64_t)a->G * block_bytes(type);
    _Pragma("omp for schedule(static)")
    for (int n = 0; n < N; n++) {
        const uint8_t* w = W + (int64_t)n * row_bytes;
        prefetch_row(w, row_bytes);
        float out[MR];
        for (int r0 = 0; r0 < a->M; r0 += MR) {
            const int mr = a->M - r0 < MR ? a->M - r0 : MR;
#define ROWS(T, R) case R: row_dot(T, w, a, r0, R, out); break;
#define TYPE(T) case T: switch (mr) { ROWS(T, 1) ROWS(T, 2) ROWS(T, 3) ROWS(T, 4) } break;
            switch (type) { TYPE(TYPE_Q8_0) TYPE(TYPE_Q4_0) TYPE(TYPE_Q4_1) }
#undef TYPE
#undef ROWS
            for (int r = 0; r < mr; r++) {
                float* o = y + (int64_t)(r0 + r) * ldy + n;
                *o = acc ? *o + out[r] : out[r];
            }
        }
    }
}

void qmatmul(int type, const uint8_t* W, const float* x, float* y, int M, int N, int K) {
    if (block_bytes(type) == 0 || M <= 0 || N <= 0 || K % QK) return;
    qact a;
    if (!qact_alloc(&a, M, K)) return;
    for (int r = 0; r < M; r++) quantize_row(&a, r, x + (int64_t)r * K);
    _Pragma("omp parallel if((int64_t)N * K * M >= 65536)")
    qgemv_rows(type, W, &a, y, N, N, 0);
    qact_free(&a);
}

static void rms_norm_row(const float* x, const float* w, float eps, int H, float* out) {
    float ss = 0.f;
    for (int d = 0; d < H; d++) ss += x[d] * x[d];
    const float r = 1.f / sqrtf(ss / H + eps);
    for (int d = 0; d < H; d++) out[d] = x[d] * r * w[d];
}

/* x (M, H) fp32 -> y (M, Nq) fp32 = rope(rms_norm(x) . Wqkv^T + bias); the first n_rot heads
   of width hd are rotated ("rotate half") by cos / sin (M, hd). bias may be NULL. 0: no memory. */
static int attn_in_f32(const float* x, const float* norm_w, float eps, int type, const uint8_t* W,
                       const float* bias, const float* cos_, const float* sin_, float* y,
                       int M, int H, int Nq, int n_rot, int hd) {
    qact a;
    float* h = (float*)malloc(sizeof(float) * (size_t)M * (size_t)H);
    if (h == NULL) return 0;
    if (!qact_alloc(&a, M, H)) { free(h); return 0; }
    for (int r = 0; r < M; r++) {
        rms_norm_row(x + (int64_t)r * H, norm_w, eps, H, h + (int64_t)r * H);
        quantize_row(&a, r, h + (int64_t)r * H);
    }
    const int half = hd / 2;
    _Pragma("omp parallel if((int64_t)Nq * H * M >= 65536)")
    {
        qgemv_rows(type, W, &a, y, Nq, Nq, 0);
        _Pragma("omp for schedule(static)")
        for (int r = 0; r < M; r++) {
            float* yr = y + (int64_t)r * Nq;
            if (bias) for (int n = 0; n < Nq; n++) yr[n] += bias[n];
            const float *c = cos_ + (int64_t)r * hd, *s = sin_ + (int64_t)r * hd;
            for (int hh = 0; hh < n_rot; hh++) {
                float* t = yr + (int64_t)hh * hd;
                for (int d = 0; d < half; d++) {
                    const float u = t[d], v = t[d + half];
                    t[d] = u * c[d] - v * s[d];
                    t[d + half] = v * c[d + half] + u * s[d + half];
                }
            }
        }
    }
    qact_free(&a);
    free(h);
    return 1;
}

/* attn_in_f32, stored as bf16 into qkv (M, Nq) */
void block_attn_in(const float* x, const float* norm_w, float eps, int type, const uint8_t* W,
                   const float* bias, const float* cos_, const float* sin_, uint16_t* qkv,
                   int M, int H, int Nq, int n_rot, int hd) {
    if (block_bytes(type) == 0 || M <= 0 || H % QK) return;
    float* y = (float*)malloc(sizeof(float) * (size_t)M * (size_t)Nq);
    if (y == NULL) return;
    if (attn_in_f32(x, norm_w, eps, type, W, bias, cos_, sin_, y, M, H, Nq, n_rot, hd))
        for (int64_t e = 0; e < (int64_t)M * Nq; e++) qkv[e] = f2bf(y[e]);
    free(y);
}

/* x (M, H) fp32, updated in place: x += attn (M, Ko) bf16 . Wo^T; h = rms_norm(x);
   x += Wd . (silu(g) * u) with [g | u] = h . Wgu^T (2I outputs). */
static void attn_out_mlp(float* x, const uint16_t* attn, const float* attn_f32, const float* norm_w,
                         float eps, int type_o, const uint8_t* Wo, int type_gu, const uint8_t* Wgu,
                         int type_d, const uint8_t* Wd, int M, int H, int Ko, int I) {
    if (!block_bytes(type_o) || !block_bytes(type_gu) || !block_bytes(type_d) || M <= 0
        || H % QK || Ko % QK || I % QK) return;
    const int Kmax = Ko > I ? (Ko > H ? Ko : H) : (I > H ? I : H);
    float* buf = (float*)malloc(sizeof(float) * (size_t)M * ((size_t)Kmax + 3 * (size_t)I));
    qact a;
    if (buf == NULL) return;
    if (!qact_alloc(&a, M, Kmax)) { free(buf); return; }
    float *t = buf, *gu = buf + (size_t)M * Kmax, *s = gu + (size_t)M * 2 * I;
    const int par = (int64_t)(2 * I) * H * M >= 65536;
    _Pragma("omp parallel if(par)")
    {
        _Pragma("omp single")
        {
            a.K = Ko; a.G = Ko / QK; a.P = (a.G + 1) / 2;
            for (int r = 0; r < M; r++) {
                if (attn_f32 != NULL) { quantize_row(&a, r, attn_f32 + (int64_t)r * Ko); continue; }
                for (int k = 0; k < Ko; k++) t[(int64_t)r * Ko + k] = bf2f(attn[(int64_t)r * Ko + k]);
                quantize_row(&a, r, t + (int64_t)r * Ko);
            }
        }
        qgemv_rows(type_o, Wo, &a, x, H, H, 1);                        /* x += o_proj(attn) */
        _Pragma("omp single")
        {
            a.K = H; a.G = H / QK; a.P = (a.G + 1) / 2;
            for (int r = 0; r < M; r++) {
                rms_norm_row(x + (int64_t)r * H, norm_w, eps, H, t + (int64_t)r * H);
                quantize_row(&a, r, t + (int64_t)r * H);
            }
        }
        qgemv_rows(type_gu, Wgu, &a, gu, 2 * I, 2 * I, 0);
        _Pragma("omp for schedule(static)")
        for (int64_t e = 0; e < (int64_t)M * I; e++) {
            const int64_t r = e / I, j = e % I;
            const float g = gu[r * 2 * I + j], u = gu[r * 2 * I + I + j];
            s[e] = g * u / (1.f + exp_approx(-g));
        }
        _Pragma("omp single")
        {
            a.K = I; a.G = I / QK; a.P = (a.G + 1) / 2;
            for (int r = 0; r < M; r++) quantize_row(&a, r, s + (int64_t)r * I);
        }
        qgemv_rows(type_d, Wd, &a, x, H, H, 1);                        /* x += down(...) */
    }
    qact_free(&a);
    free(buf);
}

void block_attn_out_mlp(float* x, const uint16_t* attn, const float* norm_w, float eps,
                        int type_o, const uint8_t* Wo, int type_gu, const uint8_t* Wgu,
                        int type_d, const uint8_t* Wd, int M, int H, int Ko, int I) {
    attn_out_mlp(x, attn, NULL, norm_w, eps, type_o, Wo, type_gu, Wgu, type_d, Wd, M, H, Ko, I);
}

/* One decoder layer's constants (block_layer.py's LayerArgs mirrors it). */
typedef struct {
    const float *attn_norm, *qkv_bias, *mlp_norm;
    const uint8_t *Wqkv, *Wo, *Wgu, *Wd;
    float attn_eps, mlp_eps, scale;
    int type_qkv, type_o, type_gu, type_d, H, n_heads, n_kv, hd, I, rope;
} layer_args;

/* A whole decoder layer for M decode tokens, one per sequence: attn_in_f32; each row's k and v
   into its cache slot (fp16 or fp32 rows of n_kv * hd); attention through `attend` over the
   block tables; attn_out_mlp on the fp32 attention output. x (M, H) fp32 is updated in place. */
void block_layer_step(const layer_args* L, float* x, const float* cos_, const float* sin_, int M,
                      void* kc, void* vc, int kv_f16, const int64_t* slots, const int64_t* tables,
                      const int64_t* lens, int max_nb, int bs, paged_attend_fn attend) {
    const int nq = L->n_heads * L->hd, kvw = L->n_kv * L->hd, Nq = nq + 2 * kvw;
    if (block_bytes(L->type_qkv) == 0 || M <= 0 || L->H % QK) return;
    float* buf = (float*)malloc(sizeof(float) * (size_t)M * ((size_t)Nq + 2 * (size_t)nq));
    if (buf == NULL) return;
    float *y = buf, *q = y + (size_t)M * Nq, *o = q + (size_t)M * nq;
    if (!attn_in_f32(x, L->attn_norm, L->attn_eps, L->type_qkv, L->Wqkv, L->qkv_bias, cos_, sin_, y,
                     M, L->H, Nq, L->rope ? L->n_heads + L->n_kv : 0, L->hd)) { free(buf); return; }
    for (int r = 0; r < M; r++) {
        const float* yr = y + (int64_t)r * Nq;
        memcpy(q + (int64_t)r * nq, yr, sizeof(float) * (size_t)nq);
        if (kv_f16) {
            _Float16 *kr = (_Float16*)kc + slots[r] * kvw, *vr = (_Float16*)vc + slots[r] * kvw;
            for (int e = 0; e < kvw; e++) { kr[e] = (_Float16)yr[nq + e]; vr[e] = (_Float16)yr[nq + kvw + e]; }
        } else {
            memcpy((float*)kc + slots[r] * kvw, yr + nq, sizeof(float) * (size_t)kvw);
            memcpy((float*)vc + slots[r] * kvw, yr + nq + kvw, sizeof(float) * (size_t)kvw);
        }
    }
    attend(q, kc, vc, NULL, NULL, tables, lens, o, NULL, M, L->n_heads, L->n_kv, L->hd, bs, max_nb, L->scale);
    attn_out_mlp(x, NULL, o, L->mlp_norm, L->mlp_eps, L->type_o, L->Wo, L->type_gu, L->Wgu, L->type_d, L->Wd,
                 M, L->H, nq, L->I);
    free(buf);
}
