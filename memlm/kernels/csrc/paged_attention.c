/* Decode attention straight from the paged KV cache (CPU): one query token per sequence
   attending to its whole cached context through its block table. Wrapped by
   memlm/kernels/attention.py, which also holds the torch reference it is tested against.

   Why: gather + SDPA moves every K/V byte three times (gather read, gather write, SDPA read);
   decode attention is memory-bound, so reading each cached row once, in place, through the
   block table is about 3x less traffic. The query heads of a GQA group share each K/V row
   load; online softmax one block at a time.

   Two kernel bodies:
   - head size 64 with 16-token blocks on AVX-512 (SmolLM2, GPT-2): one (sequence, KV head)
     per task, queries and accumulators in registers, 16 scores per block folded by one
     transpose-add tree, and the next blocks' rows prefetched (a block table sends the hardware
     prefetcher nowhere useful). benchmarks/kernels.py, one thread, SmolLM2's shape, 64
     sequences x 272 tokens x 30 layers, in-order blocks: fp16 KV 75 -> 45 ms, int8 65 -> 31 ms,
     fp32 116 -> 68 ms against the generic body (gather + SDPA: 219 ms for fp16).
   - generic C for other shapes and CPUs: one sequence per task when there are enough of them
     (each token's row of all KV heads is one contiguous read), else one (sequence, KV head).

   H2O attention mass: with `mass` non-NULL ((B, nkv, max_nb * block_size) fp32), each query's
   final softmax weights are added to mass[b, kv head of the query, key] (summed over the query
   heads of a GQA group; accumulated across calls, i.e. layers). The raw scores are kept as they
   are computed and normalized once the row's max and sum are known: a second pass over L
   scores, none over K. Both bodies do this: the AVX-512 head-64 body keeps its masked 16-score
   vectors of each query head and normalizes them with exp512 at the end (a (sequence, KV
   head) task owns its row of mass, so no two threads add to the same row).

   Exports paged_decode_attention_{f32,f16,i8}[_hd64], all with the signature
   (q, k_cache, v_cache, k_scales, v_scales, block_tables, lens, out, mass,
    B, nh, nkv, hd, block_size, max_nb, scale). */
#include "common.h"

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
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
          const int64_t* lens, float* out, float* mass, int B, int nh, int nkv, int hd_arg,   \
          int bs_arg, int max_nb, float scale)                                                 \
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
        float* raw = mass ? (float*)malloc(sizeof(float) * (size_t)nq * (size_t)(L > 0 ? L : 1)) : NULL; \
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
                    if (raw) raw[j * L + start + t] = s[j][t];                                 \
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
            if (raw) {              /* this task owns rows (b, kh0 .. kh0 + hp - 1) of mass */ \
                float* mrow = mass + ((int64_t)b * nkv + kh0 + j / g) * ((int64_t)max_nb * bs); \
                for (int64_t t = 0; t < L; t++) mrow[t] += exp_approx(raw[j * L + t] - m[j]) * inv; \
            }                                                                                  \
        }                                                                                      \
        free(raw);                                                                             \
    }                                                                                          \
    _mm_setcsr(csr);                                                                           \
    }                                                                                          \
}

/* Generic shapes, plus head size 64 with 16-token blocks as compile-time constants: the
   inner loops unroll (measured 48.6 -> 38.3 ms per SmolLM2 decode step of 64 sequences). */
DEFINE_DECODE(paged_decode_attention_f32, float, widen_f32, hd_arg, bs_arg)
DEFINE_DECODE(paged_decode_attention_f16, _Float16, widen_f16, hd_arg, bs_arg)
DEFINE_DECODE(paged_decode_attention_i8, int8_t, widen_i8, hd_arg, bs_arg)

/* AVX-512 path for head size 64, 16-token blocks and up to 8 query heads per KV head.
   One (sequence, KV head) at a time: the group's queries and accumulators live in registers.
   Per block: the K rows are widened once into an L1 buffer; each query head's 16 dot products
   are 16 vector FMA chains folded by one transpose-and-add tree (no horizontal reduction per
   token); softmax runs on one 16-lane vector; P.V broadcasts each probability. int8 caches
   apply the K scale to the 16 scores and fold the V scale into the probabilities. */
#if defined(__AVX512F__)
#define PF 2   /* blocks prefetched ahead (into L2); 1-3 measured within noise of each other */
/* lane t of the result = sum of the 16 lanes of v[t] */
static inline __m512 sum16x16(const __m512 v[16]) {
    __m512 w[8], x[4], y[2];
    for (int i = 0; i < 8; i++)
        w[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 4; i++) {
        const __m512d a = _mm512_castps_pd(w[2 * i]), b = _mm512_castps_pd(w[2 * i + 1]);
        x[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
    }
    for (int i = 0; i < 2; i++)
        y[i] = _mm512_add_ps(_mm512_shuffle_f32x4(x[2 * i], x[2 * i + 1], 0x88),
                             _mm512_shuffle_f32x4(x[2 * i], x[2 * i + 1], 0xDD));
    /* y[0] = [t0-3 (lanes 0,1), t0-3 (2,3), t4-7 (0,1), t4-7 (2,3)]; likewise y[1] for t8-15 */
    return _mm512_add_ps(_mm512_shuffle_f32x4(y[0], y[1], 0x88), _mm512_shuffle_f32x4(y[0], y[1], 0xDD));
}

static inline void row512_f32(const float* r, __m512 o[4]) {
    for (int c = 0; c < 4; c++) o[c] = _mm512_loadu_ps(r + 16 * c);
}
static inline void row512_f16(const _Float16* r, __m512 o[4]) {
    for (int c = 0; c < 4; c++) o[c] = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(r + 16 * c)));
}
static inline void row512_i8(const int8_t* r, __m512 o[4]) {
    for (int c = 0; c < 4; c++)
        o[c] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(r + 16 * c))));
}

#define DEFINE_HEAD512(NAME, KV_T, ROW, SCALED)                                                   \
static inline __attribute__((always_inline)) void NAME(                                         \
        const float* qb, const KV_T* kc, const KV_T* vc, const float* ks, const float* vs,      \
        const int64_t* table, int64_t L, float* ob, float* mrow, int mstride, int nkv, int h,   \
        float scale, const int G)                                                                \
{                                                                                                \
    __m512 qv[G][4], acc[G][4];                                                                  \
    /* H2O mass: the G rows of raw scores, normalized once m and l are final */                \
    float* raw = mrow ? (float*)malloc(sizeof(float) * (size_t)G * (size_t)(L > 0 ? L : 1)) : NULL; \
    float m[G], l[G];                                                                            \
    float kf[16][64] __attribute__((aligned(64)));                                               \
    float pb[G][16] __attribute__((aligned(64)));                                                \
    float sk[16] __attribute__((aligned(64))), sv[16] __attribute__((aligned(64)));              \
    for (int j = 0; j < G; j++) {                                                                \
        for (int c = 0; c < 4; c++) {                                                            \
            qv[j][c] = _mm512_mul_ps(_mm512_loadu_ps(qb + j * 64 + 16 * c), _mm512_set1_ps(scale)); \
            acc[j][c] = _mm512_setzero_ps();                                                     \
        }                                                                                        \
        m[j] = -INFINITY; l[j] = 0.f;                                                            \
    }                                                                                            \
    for (int64_t start = 0; start < L; start += 16) {                                            \
        const int n = (L - start) < 16 ? (int)(L - start) : 16;                                  \
        const __mmask16 live = (__mmask16)((1u << n) - 1u);                                      \
        const int64_t base = table[start / 16] * 16;                                             \
        for (int64_t ahead = start == 0 ? 16 : PF * 16; ahead <= PF * 16; ahead += 16) {         \
            if (start + ahead >= L) break;   /* later blocks: the hardware cannot guess them */   \
            const int64_t nx = table[(start + ahead) / 16] * 16;                                 \
            for (int t = 0; t < 16; t++)                                                         \
                for (int o = 0; o < 64 * (int)sizeof(KV_T); o += 64) {                           \
                    _mm_prefetch((const char*)(kc + ((nx + t) * nkv + h) * 64) + o, _MM_HINT_T2); \
                    _mm_prefetch((const char*)(vc + ((nx + t) * nkv + h) * 64) + o, _MM_HINT_T2); \
                }                                                                                \
        }                                                                                        \
        for (int t = 0; t < n; t++) {                                                            \
            __m512 r[4];                                                                         \
            ROW(kc + ((base + t) * nkv + h) * 64, r);                                            \
            for (int c = 0; c < 4; c++) _mm512_store_ps(&kf[t][16 * c], r[c]);                  \
            if (SCALED) { sk[t] = ks[(base + t) * nkv + h]; sv[t] = vs[(base + t) * nkv + h]; } \
        }                                                                                        \
        for (int j = 0; j < G; j++) {                                                            \
            __m512 d[16];                                                                        \
            for (int t = 0; t < 16; t++) {                                                       \
                __m512 a = _mm512_mul_ps(qv[j][0], _mm512_load_ps(&kf[t][0]));                   \
                a = _mm512_fmadd_ps(qv[j][1], _mm512_load_ps(&kf[t][16]), a);                    \
                a = _mm512_fmadd_ps(qv[j][2], _mm512_load_ps(&kf[t][32]), a);                    \
                d[t] = _mm512_fmadd_ps(qv[j][3], _mm512_load_ps(&kf[t][48]), a);                 \
            }                                                                                    \
            __m512 sc = sum16x16(d);                                                             \
            if (SCALED) sc = _mm512_mul_ps(sc, _mm512_maskz_loadu_ps(live, sk));                 \
            sc = _mm512_mask_blend_ps(live, _mm512_set1_ps(-INFINITY), sc);                      \
            if (raw) _mm512_mask_storeu_ps(raw + (int64_t)j * L + start, live, sc);              \
            const float bm = fmaxf(m[j], _mm512_reduce_max_ps(sc));                              \
            const float corr = expf(m[j] - bm);                                                  \
            const __m512 p = _mm512_maskz_mov_ps(live, exp512(_mm512_sub_ps(sc, _mm512_set1_ps(bm)))); \
            l[j] = l[j] * corr + _mm512_reduce_add_ps(p);                                        \
            m[j] = bm;                                                                           \
            for (int c = 0; c < 4; c++) acc[j][c] = _mm512_mul_ps(acc[j][c], _mm512_set1_ps(corr)); \
            _mm512_store_ps(pb[j], SCALED ? _mm512_mul_ps(p, _mm512_maskz_loadu_ps(live, sv)) : p); \
        }                                                                                        \
        for (int t = 0; t < n; t++) {                                                            \
            __m512 r[4];                                                                         \
            ROW(vc + ((base + t) * nkv + h) * 64, r);                                            \
            for (int j = 0; j < G; j++) {                                                        \
                const __m512 pt = _mm512_set1_ps(pb[j][t]);                                      \
                for (int c = 0; c < 4; c++) acc[j][c] = _mm512_fmadd_ps(pt, r[c], acc[j][c]);    \
            }                                                                                    \
        }                                                                                        \
    }                                                                                            \
    for (int j = 0; j < G; j++) {                                                                \
        const __m512 inv = _mm512_set1_ps(1.f / l[j]);                                           \
        for (int c = 0; c < 4; c++) _mm512_storeu_ps(ob + j * 64 + 16 * c, _mm512_mul_ps(acc[j][c], inv)); \
    }                                                                                            \
    if (raw) {             /* the G query heads of KV head h add into one row of mass */         \
        float* mr = mrow + (int64_t)h * mstride;                                                 \
        for (int j = 0; j < G; j++) {                                                            \
            const __m512 mj = _mm512_set1_ps(m[j]), inv = _mm512_set1_ps(1.f / l[j]);            \
            const float* rj = raw + (int64_t)j * L;                                              \
            for (int64_t t = 0; t < L; t += 16) {                                                \
                const int n = (L - t) < 16 ? (int)(L - t) : 16;                                  \
                const __mmask16 lv = (__mmask16)((1u << n) - 1u);                                \
                const __m512 w = _mm512_mul_ps(exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(lv, rj + t), mj)), inv); \
                _mm512_mask_storeu_ps(mr + t, lv, _mm512_add_ps(_mm512_maskz_loadu_ps(lv, mr + t), w)); \
            }                                                                                    \
        }                                                                                        \
        free(raw);                                                                               \
    }                                                                                            \
}

#define DEFINE_DECODE512(NAME, HEAD, KV_T, GENERIC)                                              \
void NAME(const float* q, const KV_T* kc, const KV_T* vc, const float* ks, const float* vs,     \
          const int64_t* tables, const int64_t* lens, float* out, float* mass, int B, int nh,   \
          int nkv, int hd_arg, int bs_arg, int max_nb, float scale)                              \
{                                                                                                \
    const int g = nh / nkv;                                                                      \
    if (g > 8) {                                                                                 \
        GENERIC(q, kc, vc, ks, vs, tables, lens, out, mass, B, nh, nkv, hd_arg, bs_arg, max_nb, scale); \
        return;                                                                                  \
    }                                                                                            \
    _Pragma("omp parallel")                                                                      \
    {                                                                                            \
    const unsigned int csr = _mm_getcsr();                                                       \
    _mm_setcsr(csr | 0x8040);                                                                    \
    _Pragma("omp for schedule(dynamic, 1)")                                                      \
    for (int task = 0; task < B * nkv; task++) {                                                 \
        const int b = task / nkv, h = task % nkv;                                                \
        const float* qb = q + ((int64_t)b * nh + (int64_t)h * g) * 64;                           \
        float* ob = out + ((int64_t)b * nh + (int64_t)h * g) * 64;                               \
        const int64_t* tb = tables + (int64_t)b * max_nb;                                        \
        const int ms = max_nb * 16;                                                              \
        float* mb = mass ? mass + (int64_t)b * nkv * ms : NULL;                                  \
        switch (g) {                                                                             \
        case 1: HEAD(qb, kc, vc, ks, vs, tb, lens[b], ob, mb, ms, nkv, h, scale, 1); break;              \
        case 2: HEAD(qb, kc, vc, ks, vs, tb, lens[b], ob, mb, ms, nkv, h, scale, 2); break;              \
        case 3: HEAD(qb, kc, vc, ks, vs, tb, lens[b], ob, mb, ms, nkv, h, scale, 3); break;              \
        case 4: HEAD(qb, kc, vc, ks, vs, tb, lens[b], ob, mb, ms, nkv, h, scale, 4); break;              \
        case 5: HEAD(qb, kc, vc, ks, vs, tb, lens[b], ob, mb, ms, nkv, h, scale, 5); break;              \
        case 6: HEAD(qb, kc, vc, ks, vs, tb, lens[b], ob, mb, ms, nkv, h, scale, 6); break;              \
        case 7: HEAD(qb, kc, vc, ks, vs, tb, lens[b], ob, mb, ms, nkv, h, scale, 7); break;              \
        default: HEAD(qb, kc, vc, ks, vs, tb, lens[b], ob, mb, ms, nkv, h, scale, 8); break;             \
        }                                                                                        \
    }                                                                                            \
    _mm_setcsr(csr);                                                                             \
    }                                                                                            \
}

DEFINE_HEAD512(head512_f32, float, row512_f32, 0)
DEFINE_HEAD512(head512_f16, _Float16, row512_f16, 0)
DEFINE_HEAD512(head512_i8, int8_t, row512_i8, 1)
DEFINE_DECODE(decode_generic_f32_hd64, float, widen_f32, 64, 16)
DEFINE_DECODE(decode_generic_f16_hd64, _Float16, widen_f16, 64, 16)
DEFINE_DECODE(decode_generic_i8_hd64, int8_t, widen_i8, 64, 16)
DEFINE_DECODE512(paged_decode_attention_f32_hd64, head512_f32, float, decode_generic_f32_hd64)
DEFINE_DECODE512(paged_decode_attention_f16_hd64, head512_f16, _Float16, decode_generic_f16_hd64)
DEFINE_DECODE512(paged_decode_attention_i8_hd64, head512_i8, int8_t, decode_generic_i8_hd64)
#else
DEFINE_DECODE(paged_decode_attention_f32_hd64, float, widen_f32, 64, 16)
DEFINE_DECODE(paged_decode_attention_f16_hd64, _Float16, widen_f16, 64, 16)
DEFINE_DECODE(paged_decode_attention_i8_hd64, int8_t, widen_i8, 64, 16)
#endif
