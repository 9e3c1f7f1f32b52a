/* Batched matmuls on ggml block weights (Q8_0, Q4_0, Q4_1; the layouts of gemv_q.c) with 8-bit
   activations, for prefill chunks and large decode batches: y (M, N) fp32 = x (M, K) fp32 . W^T.

   x is quantized once per call (per chunk of rows, below), per row and block of 32 as in
   decode_q.c: d = max|x| / 127, q = round(x / d), s = d sum(q). W is decoded NP = 32 output
   columns ("a panel") at a time into a per-thread buffer, once per panel and chunk of rows, and
   reused over every row of the chunk: unsigned bytes laid out for AVX-512 VNNI (per block and
   group of 4 inputs, the 4 bytes of each of the 32 columns side by side: two 64-byte vectors),
   with each column's d and m per block as fp32. The register tile is MR rows x 32 columns: per
   group of 4 inputs each row's 4 activation bytes are broadcast (signed) against the two weight
   vectors (unsigned) by vpdpbusd into int32 per block; per block the fp32 accumulators then take
   d_w d_x isum (+ m_w s_x for Q4_1). `planes` = 2 adds a second 8-bit plane per block (what
   the first left; see quantize_row), to every block (`outlier` = 0) or only to the blocks with a
   massive channel (`outlier` > 0, Python's `MEMLM_GEMM_PLANES=auto`), and a tile runs the second
   plane's dot products only for the blocks where one of its rows has it. The unsigned weight
   bytes u and the integer sums:

     Q4_1  u = q (0..15)   isum = sum(u qx)                  w = d u + m  (+ m s_x in fp32)
     Q4_0  u = q (0..15)   isum = sum(u qx) - 8 sum(qx)      w = d (u - 8)
     Q8_0  u = q + 128     isum = sum(u qx) - 128 sum(qx)    w = d q

   so every integer sum is decode_q.c's, and the error against the fp32 product has its bound,
   sum_g sum_j |w_gj| d_x,g / 2 (the rounding of x; the tests check it).

   Workspace, bounded and allocated per call: the quantized activations of at most
   max(MR, CHUNK_BYTES / K) rows at a time (K + 13 K / 32 bytes a row) and one panel per thread
   (NP (K + 8 K / 32) bytes). `status` is set to 0 on success, 1 when that allocation failed
   (y is then not written). Threads split the panels (OpenMP). Plain C, the same integers, where
   the compiler does not target AVX-512 VNNI. Wrapped by memlm/kernels/gemv.py (`block_matmul`). */
#include "common.h"
#include "ggml_blocks.h"

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

enum { QK = 32, TYPE_Q4_0 = 2, TYPE_Q4_1 = 3, TYPE_Q8_0 = 8, MR = 4, NP = 32, KQ = QK / 4 };
#define CHUNK_BYTES ((int64_t)1 << 21)      /* quantized activation bytes held at once */

#if defined(__AVX512F__) && defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define GEMM_VNNI 1
#endif


/* Quantized activation rows: q (rows, K) int8; per row and block d, s = d sum(q) (fp32) and
   bias = -off sum(q) (int32; off = 8 for Q4_0, 128 for Q8_0, 0 for Q4_1); with a selective
   second plane, `two` (rows, G) says which blocks carry one (NULL: every block does). */
typedef struct { int8_t* q; float *d, *s; int32_t* bias; uint8_t* two; int K, G; } xact;

/* One block of 32: q = round(xb * 127 / amax) into qb; returns the integer sum, *d = amax / 127. */
static int quantize_block(const float* xb, int8_t* qb, float* d) {
    int sum;
#if defined(__AVX512F__)
    const __m512 lo = _mm512_loadu_ps(xb), hi = _mm512_loadu_ps(xb + 16);
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi)));
    const float id = amax > 0.f ? 127.f / amax : 0.f;
    const __m512i ql = _mm512_cvtps_epi32(_mm512_mul_ps(lo, _mm512_set1_ps(id)));
    const __m512i qh = _mm512_cvtps_epi32(_mm512_mul_ps(hi, _mm512_set1_ps(id)));
    _mm_storeu_si128((__m128i*)qb, _mm512_cvtsepi32_epi8(ql));
    _mm_storeu_si128((__m128i*)(qb + 16), _mm512_cvtsepi32_epi8(qh));
    sum = _mm512_reduce_add_epi32(_mm512_add_epi32(ql, qh));
#else
    float amax = 0.f;
    for (int j = 0; j < QK; j++) amax = fmaxf(amax, fabsf(xb[j]));
    const float id = amax > 0.f ? 127.f / amax : 0.f;
    sum = 0;
    for (int j = 0; j < QK; j++) { const int v = (int)nearbyintf(xb[j] * id); qb[j] = (int8_t)v; sum += v; }
#endif
    *d = amax / 127.f;
    return sum;
}

/* Row `x` -> row r of `a`: per block, plane 0 is q0 = round(x / d0); with planes = 2, plane 1
   is what that left at 256 times the resolution, q1 = round((x - d0 q0) 256 / d0) (|q1| <= 128,
   clamped to 127), so x ~ (d0 / 256) (256 q0 + q1) and the kernel forms 256 isum0 + isum1 in
   int32 (at most 2^28 in magnitude) under the one scale d = d0 / 256. With `outlier` > 0 only
   the blocks whose max |x| exceeds `outlier` times the row's root mean square get plane 1 (the
   rest are stored as with planes = 1, q1 = 0, and a->two marks which is which): on SmolLM2 the
   rounding of plane 0 in those few blocks, a row's massive channels beside small ones, is what
   moves greedy answers (BENCHMARKS.md, "A second plane for outlier blocks"). */
static void quantize_row(const xact* a, int r, const float* x, int off, int planes, float outlier) {
    const int G = a->G;
    int8_t* q = a->q + (int64_t)r * planes * a->K;
    float *d = a->d + (int64_t)r * G, *s = a->s + (int64_t)r * G;
    int32_t* bias = a->bias + (int64_t)r * G;
    uint8_t* two = a->two != NULL ? a->two + (int64_t)r * G : NULL;
    float limit = 0.f;
    if (planes == 2 && outlier > 0.f) {
        float ss = 0.f;
#if defined(__AVX512F__)
        __m512 acc = _mm512_setzero_ps();
        for (int j = 0; j < a->K; j += 16) {              /* K % 32 == 0 */
            const __m512 v = _mm512_loadu_ps(x + j);
            acc = _mm512_fmadd_ps(v, v, acc);
        }
        ss = _mm512_reduce_add_ps(acc);
#else
        for (int j = 0; j < a->K; j++) ss += x[j] * x[j];
#endif
        limit = outlier * sqrtf(ss / (float)a->K);
    }
    for (int g = 0; g < G; g++) {
        const float* xb = x + g * QK;
        int8_t* q0 = q + g * QK;
        float d0;
        const int sum0 = quantize_block(xb, q0, &d0);
        if (planes == 1) {
            d[g] = d0;
            s[g] = d0 * (float)sum0;
            bias[g] = -off * sum0;
            continue;
        }
        int8_t* q1 = q + a->K + g * QK;
        const int second = outlier <= 0.f || d0 * 127.f > limit;
        if (two != NULL) two[g] = (uint8_t)second;
        if (!second) {                         /* plane 0 alone, as with planes = 1; q1 = 0 */
            memset(q1, 0, QK);
            d[g] = d0;
            s[g] = d0 * (float)sum0;
            bias[g] = -off * sum0;
            continue;
        }
        const float up = d0 > 0.f ? 256.f / d0 : 0.f;
        int sum1 = 0;
#if defined(__AVX512F__)
        const __m512 vd = _mm512_set1_ps(d0), vup = _mm512_set1_ps(up);
        const __m512i top = _mm512_set1_epi32(127), bottom = _mm512_set1_epi32(-127);
        __m512i vsum = _mm512_setzero_si512();
        for (int h = 0; h < QK; h += 16) {        /* the scalar loop's roundings: no fused multiply-add */
            const __m512 q0f = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(q0 + h))));
            const __m512 rest = _mm512_sub_ps(_mm512_loadu_ps(xb + h), _mm512_mul_ps(vd, q0f));
            __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(rest, vup));
            v = _mm512_max_epi32(_mm512_min_epi32(v, top), bottom);
            _mm_storeu_si128((__m128i*)(q1 + h), _mm512_cvtsepi32_epi8(v));
            vsum = _mm512_add_epi32(vsum, v);
        }
        sum1 = _mm512_reduce_add_epi32(vsum);
#else
        for (int j = 0; j < QK; j++) {
            float v = nearbyintf((xb[j] - d0 * (float)q0[j]) * up);
            v = v > 127.f ? 127.f : v < -127.f ? -127.f : v;
            q1[j] = (int8_t)v;
            sum1 += (int)v;
        }
#endif
        d[g] = d0 / 256.f;
        s[g] = d[g] * (float)(256 * sum0 + sum1);
        bias[g] = -off * (256 * sum0 + sum1);
    }
}

/* Columns n0 .. n0 + nc (nc <= NP) of W -> the panel: pu [G][KQ][NP][4] unsigned bytes, pd and
   pm [G][NP] (d, and m for Q4_1); columns past nc are zero (their outputs are not stored). */
#if !(defined(__AVX512F__) && defined(__AVX512BW__))
static void decode_scales(int type, const uint8_t* W, int64_t row_bytes, int n0, int nc, int G,
                          float* pd, float* pm) {
    const int bb = block_bytes(type);
    for (int c = 0; c < NP; c++)
        for (int g = 0; g < G; g++) {
            const uint8_t* b = W + (int64_t)(n0 + (c < nc ? c : 0)) * row_bytes + (int64_t)g * bb;
            pd[g * NP + c] = c < nc ? f16(b) : 0.f;
            pm[g * NP + c] = c < nc && type == TYPE_Q4_1 ? f16(b + 2) : 0.f;
        }
}
#endif

#if defined(__AVX512F__) && defined(__AVX512BW__)
/* 16 columns (rows n of W, `cols` of them real) of block g -> their KQ vectors of 16 x 4 bytes:
   each column's 32 unsigned bytes as one 256-bit half of a zmm (columns i and i + 8 share one),
   then an 8 x 8 dword transpose in each half (unpack 32, unpack 64, a 64-bit two-source permute). */
static inline void decode16(int type, const uint8_t* const* rows, int cols, int64_t at, uint8_t* dst) {
    __m512i z[8], t[8], u[8];
    const int off = type == TYPE_Q8_0 ? 2 : type == TYPE_Q4_1 ? 4 : 2;
    for (int i = 0; i < 8; i++) {
        const uint8_t *a = rows[i] + at + off, *b = rows[i + 8] + at + off;
        if (type == TYPE_Q8_0) {
            const __m256i lo = i < cols ? _mm256_loadu_si256((const __m256i*)a) : _mm256_set1_epi8((char)0x80);
            const __m256i hi = i + 8 < cols ? _mm256_loadu_si256((const __m256i*)b) : _mm256_set1_epi8((char)0x80);
            z[i] = _mm512_xor_si512(_mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1), _mm512_set1_epi8((char)0x80));
        } else {
            const __m128i qa = i < cols ? _mm_loadu_si128((const __m128i*)a) : _mm_setzero_si128();
            const __m128i qb = i + 8 < cols ? _mm_loadu_si128((const __m128i*)b) : _mm_setzero_si128();
            __m512i v = _mm512_inserti64x4(_mm512_broadcast_i32x4(qa), _mm256_broadcastsi128_si256(qb), 1);
            v = _mm512_mask_srli_epi16(v, (__mmask32)0xFF00FF00u, v, 4);   /* qa qa qb qb; lanes 1, 3: >> 4 */
            z[i] = _mm512_and_si512(v, _mm512_set1_epi8(15));
        }
    }
    for (int i = 0; i < 8; i += 2) {
        t[i] = _mm512_unpacklo_epi32(z[i], z[i + 1]);
        t[i + 1] = _mm512_unpackhi_epi32(z[i], z[i + 1]);
    }
    for (int i = 0; i < 8; i += 4) {
        u[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
        u[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
        u[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
        u[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
    }
    const __m512i lo = _mm512_set_epi64(13, 12, 5, 4, 9, 8, 1, 0), hi = _mm512_set_epi64(15, 14, 7, 6, 11, 10, 3, 2);
    for (int j = 0; j < 4; j++) {            /* u[j] holds dwords j of columns 0-3, u[j + 4] of 4-7 */
        _mm512_storeu_si512((void*)(dst + j * NP * 4), _mm512_permutex2var_epi64(u[j], lo, u[j + 4]));
        _mm512_storeu_si512((void*)(dst + (j + 4) * NP * 4), _mm512_permutex2var_epi64(u[j], hi, u[j + 4]));
    }
}
#endif

static void decode_panel(int type, const uint8_t* W, int64_t row_bytes, int n0, int nc, int G,
                         uint8_t* pu, float* pd, float* pm) {
    const int bb = block_bytes(type);
#if defined(__AVX512F__) && defined(__AVX512BW__)
    const uint8_t* base = W + (int64_t)n0 * row_bytes;
    for (int h = 0; h < NP / 16; h++) {
        const uint8_t* rows[16];
        int at[16];
        const int cols = nc - 16 * h;
        for (int i = 0; i < 16; i++) {
            at[i] = (16 * h + i < nc ? 16 * h + i : 0) * (int)row_bytes;
            rows[i] = base + at[i];
        }
        const __m512i idx = _mm512_loadu_si512((const void*)at);
        const __mmask16 real = cols >= 16 ? 0xFFFF : (__mmask16)((1u << cols) - 1u);
        for (int g = 0; g < G; g++) {
            decode16(type, rows, cols, (int64_t)g * bb, pu + (int64_t)g * KQ * NP * 4 + h * 64);
            /* the first 4 bytes of each column's block: d (and m for Q4_1), 16 columns at once */
            const __m512i dm = _mm512_i32gather_epi32(idx, (const void*)(base + (int64_t)g * bb), 1);
            _mm512_storeu_ps(pd + g * NP + 16 * h, _mm512_maskz_mov_ps(real, _mm512_cvtph_ps(_mm512_cvtepi32_epi16(dm))));
            const __m512 m = type == TYPE_Q4_1 ? _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32(dm, 16)))
                                               : _mm512_setzero_ps();
            _mm512_storeu_ps(pm + g * NP + 16 * h, _mm512_maskz_mov_ps(real, m));
        }
    }
#else
    decode_scales(type, W, row_bytes, n0, nc, G, pd, pm);
    for (int c = 0; c < NP; c++) {
        for (int g = 0; g < G; g++) {
            uint8_t u[QK];
            const uint8_t* b = W + (int64_t)(n0 + (c < nc ? c : 0)) * row_bytes + (int64_t)g * bb;
            if (c >= nc) {
                memset(u, 0, QK);
            } else if (type == TYPE_Q8_0) {
                for (int j = 0; j < QK; j++) u[j] = (uint8_t)(b[2 + j] ^ 0x80u);
            } else {
                const uint8_t* qs = b + (type == TYPE_Q4_1 ? 4 : 2);
                for (int j = 0; j < QK / 2; j++) { u[j] = qs[j] & 15; u[j + 16] = qs[j] >> 4; }
            }
            uint8_t* dst = pu + ((int64_t)g * KQ * NP + c) * 4;
            for (int kq = 0; kq < KQ; kq++) memcpy(dst + kq * NP * 4, u + 4 * kq, 4);
        }
    }
#endif
}

#if defined(GEMM_VNNI)
/* 4 activation bytes broadcast to every dword of a zmm, as one load */
static inline __m512i bcast4(const int8_t* p) {
    float f;
    memcpy(&f, p, 4);
    return _mm512_castps_si512(_mm512_set1_ps(f));
}
#endif

/* y[r][0..nc) = activation rows r0 .. r0 + mr of a . the panel's columns */
static inline __attribute__((always_inline)) void tile(int type, const uint8_t* pu, const float* pd,
                                                      const float* pm, const xact* a, int r0, int mr,
                                                      float* y, int64_t ldy, int nc, int planes) {
    const int G = a->G, K = a->K;
    const int64_t ldq = (int64_t)planes * K;             /* bytes from one row's planes to the next's */
#if defined(GEMM_VNNI)
    __m512 f[MR][2];
    for (int r = 0; r < mr; r++) f[r][0] = f[r][1] = _mm512_setzero_ps();
    for (int g = 0; g < G; g++) {
        /* which rows of the tile carry plane 1 in block g; none: plane 0 alone, as planes = 1 */
        int two[MR], second = 0;
        for (int r = 0; r < mr; r++) {
            two[r] = planes == 2 && (a->two == NULL || a->two[(int64_t)(r0 + r) * G + g]);
            second |= two[r];
        }
        __m512i acc[MR][2], acc1[MR][2];
        for (int r = 0; r < mr; r++) {
            const __m512i b = type == TYPE_Q4_1 ? _mm512_setzero_si512()
                                                : _mm512_set1_epi32(a->bias[(int64_t)(r0 + r) * G + g]);
            acc[r][0] = acc[r][1] = second ? _mm512_setzero_si512() : b;
            acc1[r][0] = acc1[r][1] = b;
        }
        const uint8_t* pg = pu + (int64_t)g * KQ * NP * 4;
        const int8_t* xg = a->q + (int64_t)r0 * ldq + g * QK;
        if (second) {
            for (int kq = 0; kq < KQ; kq++) {
                const __m512i w0 = _mm512_loadu_si512((const void*)(pg + kq * NP * 4));
                const __m512i w1 = _mm512_loadu_si512((const void*)(pg + kq * NP * 4 + 64));
                for (int r = 0; r < mr; r++) {
                    const __m512i xb = bcast4(xg + r * ldq + 4 * kq), xr = bcast4(xg + r * ldq + K + 4 * kq);
                    acc[r][0] = _mm512_dpbusd_epi32(acc[r][0], w0, xb);
                    acc[r][1] = _mm512_dpbusd_epi32(acc[r][1], w1, xb);
                    acc1[r][0] = _mm512_dpbusd_epi32(acc1[r][0], w0, xr);
                    acc1[r][1] = _mm512_dpbusd_epi32(acc1[r][1], w1, xr);
                }
            }
            for (int r = 0; r < mr; r++) {              /* rows without plane 1: q1 = 0, acc1 = bias */
                acc[r][0] = _mm512_add_epi32(two[r] ? _mm512_slli_epi32(acc[r][0], 8) : acc[r][0], acc1[r][0]);
                acc[r][1] = _mm512_add_epi32(two[r] ? _mm512_slli_epi32(acc[r][1], 8) : acc[r][1], acc1[r][1]);
            }
        } else {
            for (int kq = 0; kq < KQ; kq++) {
                const __m512i w0 = _mm512_loadu_si512((const void*)(pg + kq * NP * 4));
                const __m512i w1 = _mm512_loadu_si512((const void*)(pg + kq * NP * 4 + 64));
                for (int r = 0; r < mr; r++) {
                    const __m512i xb = bcast4(xg + r * ldq + 4 * kq);
                    acc[r][0] = _mm512_dpbusd_epi32(acc[r][0], w0, xb);
                    acc[r][1] = _mm512_dpbusd_epi32(acc[r][1], w1, xb);
                }
            }
        }
        const __m512 d0 = _mm512_loadu_ps(pd + g * NP), d1 = _mm512_loadu_ps(pd + g * NP + 16);
        for (int r = 0; r < mr; r++) {
            const __m512 dx = _mm512_set1_ps(a->d[(int64_t)(r0 + r) * G + g]);
            f[r][0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[r][0]), _mm512_mul_ps(d0, dx), f[r][0]);
            f[r][1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[r][1]), _mm512_mul_ps(d1, dx), f[r][1]);
        }
        if (type == TYPE_Q4_1) {
            const __m512 m0 = _mm512_loadu_ps(pm + g * NP), m1 = _mm512_loadu_ps(pm + g * NP + 16);
            for (int r = 0; r < mr; r++) {
                const __m512 sx = _mm512_set1_ps(a->s[(int64_t)(r0 + r) * G + g]);
                f[r][0] = _mm512_fmadd_ps(m0, sx, f[r][0]);
                f[r][1] = _mm512_fmadd_ps(m1, sx, f[r][1]);
            }
        }
    }
    const __mmask16 k0 = nc >= 16 ? 0xFFFF : (__mmask16)((1u << nc) - 1u);
    const __mmask16 k1 = nc >= 32 ? 0xFFFF : nc <= 16 ? 0 : (__mmask16)((1u << (nc - 16)) - 1u);
    for (int r = 0; r < mr; r++) {
        float* o = y + (int64_t)(r0 + r) * ldy;
        _mm512_mask_storeu_ps(o, k0, f[r][0]);
        _mm512_mask_storeu_ps(o + 16, k1, f[r][1]);
    }
#else
    for (int r = 0; r < mr; r++) {
        const int64_t ro = r0 + r;
        for (int c = 0; c < nc; c++) {
            float acc = 0.f;
            for (int g = 0; g < G; g++) {
                int32_t i0 = 0, i1 = 0;
                const uint8_t* pg = pu + (int64_t)g * KQ * NP * 4 + c * 4;
                const int8_t* xg = a->q + ro * ldq + g * QK;
                for (int kq = 0; kq < KQ; kq++)
                    for (int e = 0; e < 4; e++) {
                        i0 += (int32_t)pg[kq * NP * 4 + e] * xg[4 * kq + e];
                        if (planes == 2) i1 += (int32_t)pg[kq * NP * 4 + e] * xg[K + 4 * kq + e];
                    }
                const int two = planes == 2 && (a->two == NULL || a->two[ro * G + g]);
                int32_t isum = two ? i0 * 256 + i1 : i0;
                if (type != TYPE_Q4_1) isum += a->bias[ro * G + g];
                acc += (float)isum * (pd[g * NP + c] * a->d[ro * G + g]);
                if (type == TYPE_Q4_1) acc += pm[g * NP + c] * a->s[ro * G + g];
            }
            y[ro * ldy + c] = acc;
        }
    }
#endif
}

void qgemm(int type, const uint8_t* W, const float* x, float* y, int M, int N, int K, int planes,
           float outlier, int32_t* status) {
    *status = 0;
    if (block_bytes(type) == 0 || M <= 0 || N <= 0 || K <= 0 || K % QK || planes < 1 || planes > 2) return;
    const int G = K / QK, off = type == TYPE_Q8_0 ? 128 : type == TYPE_Q4_0 ? 8 : 0;
    const int64_t row_bytes = (int64_t)G * block_bytes(type);
    /* chunk: rows of x quantized at once (planes x K bytes each), a multiple of MR */
    int chunk = (int)(CHUNK_BYTES / ((int64_t)K * planes)) / MR * MR;
    chunk = chunk < MR ? MR : chunk;
    chunk = chunk > M ? M : chunk;
    const int threads = omp_get_max_threads();
    const size_t panel_u = (size_t)G * KQ * NP * 4, panel_f = (size_t)G * NP;
    const size_t panel_bytes = (panel_u + 2 * panel_f * sizeof(float) + 63) / 64 * 64;
    const size_t xq_bytes = ((size_t)chunk * planes * K + 63) / 64 * 64;
    const size_t ws_bytes = xq_bytes + (size_t)chunk * G * 13 + (size_t)threads * panel_bytes;
    char* ws = (char*)aligned_alloc(64, (ws_bytes + 63) / 64 * 64);
    if (ws == NULL) { *status = 1; return; }
    char* panels = ws + xq_bytes + (size_t)chunk * G * 13 + 63;
    panels = (char*)((uintptr_t)panels & ~(uintptr_t)63);
    xact a = {(int8_t*)ws, (float*)(ws + xq_bytes), NULL, NULL, NULL, K, G};
    a.s = a.d + (size_t)chunk * G;
    a.bias = (int32_t*)(a.s + (size_t)chunk * G);
    if (planes == 2 && outlier > 0.f) a.two = (uint8_t*)(a.bias + (size_t)chunk * G);
    const int n_panels = (N + NP - 1) / NP;
    _Pragma("omp parallel num_threads(threads) if((int64_t)N * K * M >= 65536)")
    {
        char* mine = panels + (size_t)omp_get_thread_num() * panel_bytes;
        uint8_t* pu = (uint8_t*)mine;
        float *pd = (float*)(mine + panel_u), *pm = pd + panel_f;
        for (int c0 = 0; c0 < M; c0 += chunk) {
            const int rows = M - c0 < chunk ? M - c0 : chunk;
            _Pragma("omp for schedule(static)")
            for (int r = 0; r < rows; r++) quantize_row(&a, r, x + (int64_t)(c0 + r) * K, off, planes, outlier);
            _Pragma("omp for schedule(static)")
            for (int p = 0; p < n_panels; p++) {
                const int n0 = p * NP, nc = N - n0 < NP ? N - n0 : NP;
                decode_panel(type, W, row_bytes, n0, nc, G, pu, pd, pm);
                float* yp = y + (int64_t)c0 * N + n0;
                for (int r0 = 0; r0 < rows; r0 += MR) {
                    const int mr = rows - r0 < MR ? rows - r0 : MR;
#define ROWS(T, R, P) case R: tile(T, pu, pd, pm, &a, r0, R, yp, N, nc, P); break;
#define TYPE(T, P) case T: switch (mr) { ROWS(T, 1, P) ROWS(T, 2, P) ROWS(T, 3, P) ROWS(T, 4, P) } break;
                    if (planes == 1) { switch (type) { TYPE(TYPE_Q8_0, 1) TYPE(TYPE_Q4_0, 1) TYPE(TYPE_Q4_1, 1) } }
                    else { switch (type) { TYPE(TYPE_Q8_0, 2) TYPE(TYPE_Q4_0, 2) TYPE(TYPE_Q4_1, 2) } }
#undef TYPE
#undef ROWS
                }
            }
        }
    }
    free(ws);
}
