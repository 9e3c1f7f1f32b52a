/* ggml K-quant block weights (Q4_K, Q5_K, Q6_K: super-blocks of 256 weights, as GGUF stores
   them) read directly: dequantization to fp32 / bf16 rows, and y = x . W^T for a few rows.

     Q4_K  {f16 d; f16 dmin; u8 scales[12]; u8 qs[128]}            144 B   w = d sc_j q - dmin m_j
     Q5_K  {f16 d; f16 dmin; u8 scales[12]; u8 qh[32]; u8 qs[128]} 176 B   (q 5 bits, as Q4_K)
     Q6_K  {u8 ql[128]; u8 qh[64]; i8 scales[16]; f16 d}            210 B   w = d sc_j (q - 32)

   Q4_K / Q5_K: 8 sub-blocks of 32 with 6-bit (sc_j, m_j) packed in `scales` (ggml's
   get_scale_min_k4); qs chunk c (32 bytes) holds sub-block 2c in its low nibbles and 2c + 1 in
   its high ones; Q5_K's bit 4 of element l of sub-block i is bit i of qh[l]. Q6_K: 16
   sub-blocks of 16; element 128h + 32t + l (t < 4, l < 32) is ql[64h + 32(t & 1) + l] >> 4(t >> 1)
   (low 4 bits) | ((qh[32h + l] >> 2t) & 3) << 4. Layouts: ggml-common.h, gguf-py quants.py.

     kq_dequant_f32   (rows, K) fp32, exactly (d sc_j) q - (dmin m_j) in fp32, as gguf-py does
     kq_dequant_bf16  the same rounded to bf16 (tiles for torch's bf16 GEMM)
     kq_matmul_f32    y (M, N) fp32 = x (M, K) fp32 . W^T, fp32 products (each super-block
                      dequantized once per call and row of W, reused over the M rows)
     kq_matmul_q8     the same with x quantized per row and super-block to int8 (d = max|x| / 127,
                      ggml's Q8_K, with sums per 16), integer dot products (AVX-512 VNNI vpdpbusd
                      on 32 weights at a time where the compiler targets it, plain C otherwise,
                      same integers): per super-block d_x (d sum_j sc_j sum q qx - dmin sum_j m_j
                      sum qx) (Q6_K: d sum_j sc_j (sum q qx - 32 sum qx))

   K is a multiple of 256 (GGUF K-quant rows are); OpenMP splits the rows of W. Wrapped by
   memlm/kernels/kquant.py. */
#include "common.h"
#include "ggml_blocks.h"

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

enum { QK_K = 256, TYPE_Q4_K = 12, TYPE_Q5_K = 13, TYPE_Q6_K = 14, MAX_M = 8 };

int kq_block_bytes(int type) {
    return type == TYPE_Q4_K ? 144 : type == TYPE_Q5_K ? 176 : type == TYPE_Q6_K ? 210 : 0;
}

/* One super-block unpacked: q[256] unsigned codes, per-sub-block integer scales (Q4/5_K: 8
   sc and m; Q6_K: 16 signed sc), and the fp32 super-block scales. */
typedef struct { _Alignas(64) uint8_t q[QK_K]; int32_t sc[16], m[8]; float d, dmin; } kblock;

static void scale_min_k4(const uint8_t* s, int j, int32_t* sc, int32_t* m) {
    if (j < 4) { *sc = s[j] & 63; *m = s[j + 4] & 63; }
    else { *sc = (s[j + 4] & 15) | ((s[j - 4] >> 6) << 4); *m = (s[j + 4] >> 4) | ((s[j] >> 6) << 4); }
}

#if defined(__AVX2__)
/* the codes of one super-block, 32 at a time (the same bytes as the plain loops below) */
static inline void unpack_codes(int type, const uint8_t* b, uint8_t* q) {
    const __m256i m4 = _mm256_set1_epi8(15), m2 = _mm256_set1_epi8(3), b4 = _mm256_set1_epi8(16);
    if (type == TYPE_Q6_K) {
        for (int h = 0; h < 2; h++) {
            const __m256i l0 = _mm256_loadu_si256((const __m256i*)(b + 64 * h));
            const __m256i l1 = _mm256_loadu_si256((const __m256i*)(b + 64 * h + 32));
            const __m256i hi = _mm256_loadu_si256((const __m256i*)(b + 128 + 32 * h));
            const __m256i lo[4] = {_mm256_and_si256(l0, m4), _mm256_and_si256(l1, m4),
                                   _mm256_and_si256(_mm256_srli_epi16(l0, 4), m4),
                                   _mm256_and_si256(_mm256_srli_epi16(l1, 4), m4)};
            for (int t = 0; t < 4; t++) {
                const __m256i up = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hi, 2 * t), m2), 4);
                _mm256_store_si256((__m256i*)(q + 128 * h + 32 * t), _mm256_or_si256(lo[t], up));
            }
        }
        return;
    }
    const uint8_t* qs = b + (type == TYPE_Q5_K ? 48 : 16);
    for (int c = 0; c < 4; c++) {
        const __m256i v = _mm256_loadu_si256((const __m256i*)(qs + 32 * c));
        _mm256_store_si256((__m256i*)(q + 64 * c), _mm256_and_si256(v, m4));
        _mm256_store_si256((__m256i*)(q + 64 * c + 32), _mm256_and_si256(_mm256_srli_epi16(v, 4), m4));
    }
    if (type == TYPE_Q5_K) {
        const __m256i h = _mm256_loadu_si256((const __m256i*)(b + 16));
        for (int i = 0; i < 8; i++) {
            const __m256i bit = _mm256_and_si256(i < 4 ? _mm256_slli_epi16(h, 4 - i) : _mm256_srli_epi16(h, i - 4), b4);
            __m256i* qi = (__m256i*)(q + 32 * i);
            _mm256_store_si256(qi, _mm256_or_si256(_mm256_load_si256(qi), bit));
        }
    }
}
#endif

static void unpack(int type, const uint8_t* b, kblock* k) {
#if defined(__AVX2__)
    unpack_codes(type, b, k->q);
    if (type == TYPE_Q6_K) {
        for (int j = 0; j < 16; j++) k->sc[j] = (int8_t)b[192 + j];
        k->d = f16(b + 208); k->dmin = 0.f;
        return;
    }
    k->d = f16(b); k->dmin = f16(b + 2);
    for (int j = 0; j < 8; j++) scale_min_k4(b + 4, j, &k->sc[j], &k->m[j]);
    return;
#endif
    if (type == TYPE_Q6_K) {
        const uint8_t *ql = b, *qh = b + 128;
        for (int j = 0; j < 16; j++) k->sc[j] = (int8_t)b[192 + j];
        k->d = f16(b + 208); k->dmin = 0.f;
        for (int h = 0; h < 2; h++)
            for (int t = 0; t < 4; t++)
                for (int l = 0; l < 32; l++)
                    k->q[128 * h + 32 * t + l] = (uint8_t)(((ql[64 * h + 32 * (t & 1) + l] >> (4 * (t >> 1))) & 15)
                                                           | (((qh[32 * h + l] >> (2 * t)) & 3) << 4));
        return;
    }
    k->d = f16(b); k->dmin = f16(b + 2);
    for (int j = 0; j < 8; j++) scale_min_k4(b + 4, j, &k->sc[j], &k->m[j]);
    const uint8_t* qs = b + (type == TYPE_Q5_K ? 48 : 16);
    for (int c = 0; c < 4; c++)
        for (int l = 0; l < 32; l++) {
            k->q[64 * c + l] = qs[32 * c + l] & 15;
            k->q[64 * c + 32 + l] = qs[32 * c + l] >> 4;
        }
    if (type == TYPE_Q5_K)
        for (int i = 0; i < 8; i++)
            for (int l = 0; l < 32; l++) k->q[32 * i + l] |= (uint8_t)(((b[16 + l] >> i) & 1) << 4);
}

/* the 256 fp32 weights of an unpacked super-block, in gguf-py's order of operations */
static void dequant_block(int type, const kblock* k, float* w) {
    if (type == TYPE_Q6_K) {
        for (int j = 0; j < 16; j++) {
            const float a = k->d * (float)k->sc[j];
            for (int l = 0; l < 16; l++) w[16 * j + l] = a * (float)((int)k->q[16 * j + l] - 32);
        }
        return;
    }
    for (int j = 0; j < 8; j++) {
        const float a = k->d * (float)k->sc[j], c = k->dmin * (float)k->m[j];
        for (int l = 0; l < 32; l++) w[32 * j + l] = a * (float)k->q[32 * j + l] - c;
    }
}

void kq_dequant_f32(int type, const uint8_t* W, float* out, int rows, int K) {
    const int bb = kq_block_bytes(type), nb = K / QK_K;
    #pragma omp parallel for schedule(static)
    for (int r = 0; r < rows; r++) {
        kblock k;
        for (int b = 0; b < nb; b++) {
            unpack(type, W + ((int64_t)r * nb + b) * bb, &k);
            dequant_block(type, &k, out + (int64_t)r * K + (int64_t)b * QK_K);
        }
    }
}

static inline uint16_t f2bf(float f) {
    uint32_t u; memcpy(&u, &f, 4);
    if ((u & 0x7F800000u) == 0x7F800000u) return (uint16_t)(u >> 16);
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

void kq_dequant_bf16(int type, const uint8_t* W, uint16_t* out, int rows, int K) {
    const int bb = kq_block_bytes(type), nb = K / QK_K;
    #pragma omp parallel for schedule(static)
    for (int r = 0; r < rows; r++) {
        kblock k;
        float w[QK_K];
        for (int b = 0; b < nb; b++) {
            unpack(type, W + ((int64_t)r * nb + b) * bb, &k);
            dequant_block(type, &k, w);
            uint16_t* o = out + (int64_t)r * K + (int64_t)b * QK_K;
            for (int e = 0; e < QK_K; e++) o[e] = f2bf(w[e]);
        }
    }
}

void kq_matmul_f32(int type, const uint8_t* W, const float* x, float* y, int M, int N, int K) {
    const int bb = kq_block_bytes(type), nb = K / QK_K;
    #pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        kblock k;
        float w[QK_K];
        prefetch_row(W + (int64_t)n * nb * bb, (int64_t)nb * bb);
        for (int m0 = 0; m0 < M; m0 += MAX_M) {
            const int mr = M - m0 < MAX_M ? M - m0 : MAX_M;
            float acc[MAX_M][16] = {{0}};
            for (int b = 0; b < nb; b++) {
                unpack(type, W + ((int64_t)n * nb + b) * bb, &k);
                dequant_block(type, &k, w);
                for (int i = 0; i < mr; i++) {
                    const float* xr = x + (int64_t)(m0 + i) * K + (int64_t)b * QK_K;
                    for (int e = 0; e < QK_K; e += 16)
                        for (int l = 0; l < 16; l++) acc[i][l] += w[e + l] * xr[e + l];
                }
            }
            for (int i = 0; i < mr; i++) {
                float s = 0.f;
                for (int l = 0; l < 16; l++) s += acc[i][l];
                y[(int64_t)(m0 + i) * N + n] = s;
            }
        }
    }
}

/* ---- 8-bit activations ---------------------------------------------------------------- */
/* x row r, super-block b: q (M, K) int8, d (M, nb) fp32, and x's code sums in natural order:
   bs (M, nb, 16) int16 per 16, b32 (M, nb, 8) int16 per 32 (|sum| <= 32 x 127 fits). On AVX-512 BW the int8 codes of a Q4_K / Q5_K super-block are stored with its
   sub-blocks in the order [0 2 1 3 4 6 5 7], the order the weight's nibbles unpack into 64-byte
   registers (low nibbles of qs chunks c, c + 1, then their high nibbles). */
typedef struct { int8_t* q; float* d; int16_t *bs, *b32; } q8k;

#if defined(__AVX512BW__)
#define KQ_512 1
static const int SUB_ORDER[8] = {0, 2, 1, 3, 4, 6, 5, 7};
#endif

static void quantize_rows(int type, const float* x, int M, int K, q8k* a) {
    const int nb = K / QK_K;
    int8_t qb[QK_K];
    for (int r = 0; r < M; r++)
        for (int b = 0; b < nb; b++) {
            const float* xb = x + (int64_t)r * K + (int64_t)b * QK_K;
            float amax = 0.f;
            for (int e = 0; e < QK_K; e++) amax = fmaxf(amax, fabsf(xb[e]));
            const float id = amax > 0.f ? 127.f / amax : 0.f;
            a->d[r * nb + b] = amax / 127.f;
            for (int e = 0; e < QK_K; e++) {
                const float v = nearbyintf(xb[e] * id);
                qb[e] = (int8_t)(v > 127.f ? 127.f : v < -127.f ? -127.f : v);
            }
            int16_t *bs = a->bs + ((int64_t)r * nb + b) * 16, *b32 = a->b32 + ((int64_t)r * nb + b) * 8;
            for (int j = 0; j < 16; j++) {
                int s = 0;
                for (int l = 0; l < 16; l++) s += qb[16 * j + l];
                bs[j] = (int16_t)s;
            }
            for (int j = 0; j < 8; j++) b32[j] = (int16_t)(bs[2 * j] + bs[2 * j + 1]);
            int8_t* out = a->q + (int64_t)r * K + (int64_t)b * QK_K;
#if defined(KQ_512)
            if (type != TYPE_Q6_K) {
                for (int j = 0; j < 8; j++) memcpy(out + 32 * j, qb + 32 * SUB_ORDER[j], 32);
                continue;
            }
#endif
            memcpy(out, qb, QK_K);
        }
}

#if !defined(__AVX512BW__)
/* the block's offset term over x's sums: Q4/5_K sum_j m_j b32_j, Q6_K 32 sum_j sc_j bs_j */
static inline int32_t offset_sum(int type, const kblock* k, const int16_t* bs, const int16_t* b32) {
    int32_t s = 0;
    if (type == TYPE_Q6_K) {
        for (int j = 0; j < 16; j++) s += k->sc[j] * bs[j];
        return 32 * s;
    }
    for (int j = 0; j < 8; j++) s += k->m[j] * b32[j];
    return s;
}
#endif

#if defined(KQ_512)
/* One super-block in registers: q[4] the 256 codes (64 a register; Q4/5_K in SUB_ORDER, Q6_K in
   natural order), s[4] the matching int16 scale of each code pair (what vpmaddwd multiplies
   the vpmaddubsw pair sums by), off the int16 multipliers of x's sums in the offset term (Q4/5_K:
   the 8 mins against b32, Q6_K: the 16 scales against bs), d, and the offset's fp32 factor
   (Q4/5_K dmin, Q6_K 32 d). */
typedef struct { __m512i q[4], s[4]; __m256i off; float d, doff; } kregs;

/* which scale each int16 lane of register r takes: Q4/5_K SUB_ORDER[2r] x16 then [2r + 1] x16;
   Q6_K sub-blocks 4r .. 4r + 3, 8 lanes each */
static _Alignas(64) int16_t IDX_K4[4][32], IDX_K6[4][32];
static void init_idx(void) {
    for (int r = 0; r < 4; r++)
        for (int l = 0; l < 32; l++) {
            IDX_K4[r][l] = (int16_t)SUB_ORDER[2 * r + l / 16];
            IDX_K6[r][l] = (int16_t)(4 * r + l / 8);
        }
}

static inline void load_regs(int type, const uint8_t* b, kregs* k) {
    const __m512i m4 = _mm512_set1_epi8(15);
    __m512i sc16;
    if (type == TYPE_Q6_K) {
        const __m512i m2 = _mm512_set1_epi8(3);
        for (int h = 0; h < 2; h++) {
            const __m512i l = _mm512_loadu_si512(b + 64 * h);
            const __m512i hh = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i*)(b + 128 + 32 * h)));
            const __m512i up0 = _mm512_and_si512(_mm512_srlv_epi16(hh, _mm512_inserti64x4(_mm512_set1_epi16(0),
                                                 _mm256_set1_epi16(2), 1)), m2);
            const __m512i up1 = _mm512_and_si512(_mm512_srlv_epi16(hh, _mm512_inserti64x4(_mm512_set1_epi16(4),
                                                 _mm256_set1_epi16(6), 1)), m2);
            k->q[2 * h] = _mm512_or_si512(_mm512_and_si512(l, m4), _mm512_slli_epi16(up0, 4));
            k->q[2 * h + 1] = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(l, 4), m4), _mm512_slli_epi16(up1, 4));
        }
        k->d = f16(b + 208); k->doff = 32.f * k->d;
        k->off = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)(b + 192)));
        sc16 = _mm512_castsi256_si512(k->off);
        for (int r = 0; r < 4; r++) k->s[r] = _mm512_permutexvar_epi16(_mm512_load_si512(IDX_K6[r]), sc16);
        return;
    }
    const uint8_t* qs = b + (type == TYPE_Q5_K ? 48 : 16);
    for (int h = 0; h < 2; h++) {
        const __m512i v = _mm512_loadu_si512(qs + 64 * h);
        k->q[2 * h] = _mm512_and_si512(v, m4);                        /* sub-blocks 4h, 4h + 2 */
        k->q[2 * h + 1] = _mm512_and_si512(_mm512_srli_epi16(v, 4), m4);   /* 4h + 1, 4h + 3 */
    }
    if (type == TYPE_Q5_K) {
        const __m512i hh = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i*)(b + 16)));
        for (int r = 0; r < 4; r++) {
            const int lo = SUB_ORDER[2 * r], hi = SUB_ORDER[2 * r + 1];
            const __m512i bit = _mm512_inserti64x4(_mm512_set1_epi8((char)(1 << lo)), _mm256_set1_epi8((char)(1 << hi)), 1);
            k->q[r] = _mm512_mask_add_epi8(k->q[r], _mm512_test_epi8_mask(hh, bit), k->q[r], _mm512_set1_epi8(16));
        }
    }
    k->d = f16(b); k->doff = f16(b + 2);
    uint32_t u[3];                                /* ggml's get_scale_min_k4 on 32-bit words */
    memcpy(u, b + 4, 12);
    const uint32_t sc_lo = u[0] & 0x3f3f3f3fu, m_lo = u[1] & 0x3f3f3f3fu;
    const uint32_t sc_hi = (u[2] & 0x0f0f0f0fu) | (((u[0] >> 6) & 0x03030303u) << 4);
    const uint32_t m_hi = ((u[2] >> 4) & 0x0f0f0f0fu) | (((u[1] >> 6) & 0x03030303u) << 4);
    k->off = _mm256_zextsi128_si256(_mm_cvtepu8_epi16(_mm_cvtsi64_si128((long long)(((uint64_t)m_hi << 32) | m_lo))));
    sc16 = _mm512_castsi128_si512(_mm_cvtepu8_epi16(_mm_cvtsi64_si128((long long)(((uint64_t)sc_hi << 32) | sc_lo))));
    for (int r = 0; r < 4; r++) k->s[r] = _mm512_permutexvar_epi16(_mm512_load_si512(IDX_K4[r]), sc16);
}
#endif

void kq_matmul_q8(int type, const uint8_t* W, const float* x, float* y, int M, int N, int K, int* status) {
    const int bb = kq_block_bytes(type), nb = K / QK_K;
    char* mem = (char*)aligned_alloc(64, ((size_t)M * K + 64 + (size_t)M * nb * (4 + 2 * 24) + 63) / 64 * 64);
    if (mem == NULL) { *status = 1; return; }
    q8k a = {(int8_t*)mem, (float*)(mem + ((size_t)M * K + 63) / 64 * 64), NULL, NULL};
    a.bs = (int16_t*)(a.d + (size_t)M * nb);
    a.b32 = a.bs + (size_t)M * nb * 16;
    quantize_rows(type, x, M, K, &a);
#if defined(KQ_512)
    if (IDX_K6[3][31] == 0) init_idx();           /* idempotent: concurrent callers write the same */
#endif
    #pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        prefetch_row(W + (int64_t)n * nb * bb, (int64_t)nb * bb);
        for (int m0 = 0; m0 < M; m0 += MAX_M) {
            const int mr = M - m0 < MAX_M ? M - m0 : MAX_M;
#if defined(KQ_512)
            kregs k;
            __m512 acc[MAX_M];
            __m256 off[MAX_M];
            for (int i = 0; i < mr; i++) { acc[i] = _mm512_setzero_ps(); off[i] = _mm256_setzero_ps(); }
#else
            kblock k;
            float acc[MAX_M] = {0}, off[MAX_M] = {0};
#endif
            for (int b = 0; b < nb; b++) {
                const uint8_t* blk = W + ((int64_t)n * nb + b) * bb;
#if defined(KQ_512)
                load_regs(type, blk, &k);
#else
                unpack(type, blk, &k);
#endif
                for (int i = 0; i < mr; i++) {
                    const int r = m0 + i;
                    const int8_t* qx = a.q + (int64_t)r * K + (int64_t)b * QK_K;
                    const float dx = a.d[r * nb + b];
                    const int16_t *bs = a.bs + ((int64_t)r * nb + b) * 16, *b32 = a.b32 + ((int64_t)r * nb + b) * 8;
#if defined(KQ_512)
                    const __m256i sums = type == TYPE_Q6_K ? _mm256_loadu_si256((const __m256i*)bs)
                                                           : _mm256_zextsi128_si256(_mm_loadu_si128((const __m128i*)b32));
                    off[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(k.off, sums)),
                                             _mm256_set1_ps(dx * k.doff), off[i]);
                    __m512i dot = _mm512_setzero_si512();
                    for (int c = 0; c < 4; c++) {
                        const __m512i p = _mm512_maddubs_epi16(k.q[c], _mm512_loadu_si512(qx + 64 * c));
                        dot = _mm512_add_epi32(dot, _mm512_madd_epi16(p, k.s[c]));
                    }
                    acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_set1_ps(dx * k.d), acc[i]);
#else
                    const int sub = type == TYPE_Q6_K ? 16 : 32;
                    int32_t dot = 0;
                    for (int j = 0; j < QK_K / sub; j++) {
                        int32_t s = 0;
                        for (int l = 0; l < sub; l++) s += (int32_t)k.q[sub * j + l] * qx[sub * j + l];
                        dot += k.sc[j] * s;
                    }
                    acc[i] += dx * k.d * (float)dot;
                    off[i] += dx * (type == TYPE_Q6_K ? k.d : k.dmin) * (float)offset_sum(type, &k, bs, b32);
#endif
                }
            }
            for (int i = 0; i < mr; i++) {
#if defined(KQ_512)
                const __m128 o4 = _mm_add_ps(_mm256_castps256_ps128(off[i]), _mm256_extractf128_ps(off[i], 1));
                const __m128 o2 = _mm_add_ps(o4, _mm_movehl_ps(o4, o4));
                y[(int64_t)(m0 + i) * N + n] = _mm512_reduce_add_ps(acc[i]) - _mm_cvtss_f32(_mm_add_ss(o2, _mm_shuffle_ps(o2, o2, 1)));
#else
                y[(int64_t)(m0 + i) * N + n] = acc[i] - off[i];
#endif
            }
        }
    }
    free(mem);
    *status = 0;
}
