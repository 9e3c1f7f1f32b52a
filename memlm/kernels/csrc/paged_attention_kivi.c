/* Decode attention over int4 / int2 KIVI KV blocks, read in place (no dequantized copy).
   Wrapped by memlm/kernels/attention_kivi.py, which holds the torch reference it is tested
   against; the layout is defined in memlm/kv/codecs.py (keys per channel and block, values per
   token and channel group, asymmetric codes packed along channels) and memlm/kv/window.py
   (partial blocks in fp16 stages).

   Why in place: a 4-bit block is 1/4 the bytes of fp16, so reading codes is what makes the
   compressed pool cheaper to attend to, not only smaller. Keys per channel fold into the
   query: q . k_t = sum_c (q_c ks_c) code_tc + sum_c q_c km_c, so each block costs one hd-wide
   scaling of each query head and then plain dot products with the unpacked codes. Values per
   token are widened once per token (shared by the GQA group's query heads) and accumulated
   with online softmax one block at a time.

   H2O attention mass: with `mass` non-NULL ((B, nkv, max_nb * block_size) fp32), each query
   head's final softmax weights are added to mass[b, its KV head, key], summed over the GQA
   group: the raw scores of the task's g heads are kept (g x L floats) as they are computed and
   normalized once the running max and sum are final, so K is read once. A task owns its row.

   One task per (sequence, KV head). AVX-512: 16 codes at a time are spread to lanes by a byte
   shuffle and a per-lane shift; elsewhere the generic loops (the compiler vectorizes them).

   Exports paged_decode_attention_kivi4 / _kivi2, signature
   (q, k_codes, v_codes, k_params, v_params, win_k, win_v, stage_of_block, block_tables, lens,
    out, mass, B, nh, nkv, hd, block_size, max_nb, group, k_params_block_stride, scale);
   mass may be NULL. */
#include "common.h"

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <omp.h>

/* codes c0 .. c(hd-1) of one packed row -> fp32 */
static inline void unpack_row(const uint8_t* p, float* dst, int hd, int bits) {
    int c = 0;
#if defined(__AVX512F__) && defined(__AVX512BW__)
    const __m128i spread = bits == 4 ? _mm_setr_epi8(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7)
                                     : _mm_setr_epi8(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
    const __m512i shift = bits == 4 ? _mm512_setr_epi32(0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4)
                                    : _mm512_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6, 0, 2, 4, 6, 0, 2, 4, 6);
    const __m512i mask = _mm512_set1_epi32((1 << bits) - 1);
    const int step = 16 * bits / 8;                 /* bytes per 16 codes */
    for (; c + 16 <= hd; c += 16, p += step) {
        int64_t word = 0;
        memcpy(&word, p, (size_t)step);
        const __m128i raw = _mm_cvtsi64_si128(word);
        __m512i v = _mm512_cvtepu8_epi32(_mm_shuffle_epi8(raw, spread));
        v = _mm512_and_si512(_mm512_srlv_epi32(v, shift), mask);
        _mm512_storeu_ps(dst + c, _mm512_cvtepi32_ps(v));
    }
#endif
    const int per = 8 / bits, m = (1 << bits) - 1;
    for (int j = 0; c < hd; c++, j++) dst[c] = (float)((p[j / per] >> (bits * (j % per))) & m);
}

static inline float dot(const float* a, const float* b, int n) {
    float s = 0.f;
    #pragma omp simd reduction(+:s)
    for (int i = 0; i < n; i++) s += a[i] * b[i];
    return s;
}

static void decode_kivi(const float* q, const uint8_t* kc, const uint8_t* vc, const _Float16* kp,
                        const _Float16* vp, const _Float16* wk, const _Float16* wv,
                        const int32_t* stage_of, const int64_t* tables, const int64_t* lens, float* out,
                        float* mass, int B, int nh, int nkv, int hd, int bs, int max_nb, int group,
                        int kp_stride, float scale, int bits)
{
    const int g = nh / nkv, hb = hd * bits / 8, ng = hd / group;
    #pragma omp parallel for schedule(dynamic, 1)
    for (int task = 0; task < B * nkv; task++) {
        const int b = task / nkv, h = task % nkv;
        const int64_t L = lens[b];
        const float* qb = q + ((int64_t)b * nh + (int64_t)h * g) * hd;   /* (g, hd) */
        float m[g], l[g], acc[g][hd], qs[g][hd], cst[g], s[g][bs], row[hd];
        float* raw = mass ? (float*)malloc(sizeof(float) * (size_t)g * (size_t)(L > 0 ? L : 1)) : NULL;
        for (int j = 0; j < g; j++) {
            m[j] = -INFINITY; l[j] = 0.f;
            for (int d = 0; d < hd; d++) acc[j][d] = 0.f;
        }
        for (int i = 0; (int64_t)i * bs < L; i++) {
            const int64_t blk = tables[(int64_t)b * max_nb + i];
            const int n = L - (int64_t)i * bs < bs ? (int)(L - (int64_t)i * bs) : bs;
            const int st = stage_of[blk];
            if (st >= 0) {                                   /* partial block: fp16 window */
                for (int t = 0; t < n; t++) {
                    const _Float16* kr = wk + (((int64_t)st * bs + t) * nkv + h) * hd;
                    for (int d = 0; d < hd; d++) row[d] = (float)kr[d];
                    for (int j = 0; j < g; j++) s[j][t] = scale * dot(qb + j * hd, row, hd);
                }
            } else {                                         /* codes: fold the key scales into q */
                const _Float16* p = kp + blk * (int64_t)kp_stride + (int64_t)h * 2 * hd;  /* (2, hd) */
                for (int j = 0; j < g; j++) {
                    float c0 = 0.f;
                    for (int d = 0; d < hd; d++) {
                        qs[j][d] = qb[j * hd + d] * (float)p[d];
                        c0 += qb[j * hd + d] * (float)p[hd + d];
                    }
                    cst[j] = c0;
                }
                for (int t = 0; t < n; t++) {
                    unpack_row(kc + (((int64_t)blk * bs + t) * nkv + h) * hb, row, hd, bits);
                    for (int j = 0; j < g; j++) s[j][t] = scale * (dot(qs[j], row, hd) + cst[j]);
                }
            }
            if (raw)                                         /* scores before the softmax */
                for (int j = 0; j < g; j++)
                    for (int t = 0; t < n; t++) raw[(int64_t)j * L + (int64_t)i * bs + t] = s[j][t];
            float corr[g];
            for (int j = 0; j < g; j++) {
                float mx = m[j];
                for (int t = 0; t < n; t++) mx = s[j][t] > mx ? s[j][t] : mx;
                corr[j] = exp_approx(m[j] - mx);
                m[j] = mx;
                float sum = 0.f;
                for (int t = 0; t < n; t++) { s[j][t] = exp_approx(s[j][t] - mx); sum += s[j][t]; }
                l[j] = l[j] * corr[j] + sum;
                for (int d = 0; d < hd; d++) acc[j][d] *= corr[j];
            }
            for (int t = 0; t < n; t++) {
                const int64_t slot = (int64_t)blk * bs + t;
                if (st >= 0) {
                    const _Float16* vr = wv + (((int64_t)st * bs + t) * nkv + h) * hd;
                    for (int d = 0; d < hd; d++) row[d] = (float)vr[d];
                } else {
                    unpack_row(vc + (slot * nkv + h) * hb, row, hd, bits);
                    const _Float16* p = vp + (slot * nkv + h) * ng * 2;         /* (ng, 2) */
                    for (int gi = 0; gi < ng; gi++) {
                        const float sc = (float)p[2 * gi], mn = (float)p[2 * gi + 1];
                        #pragma omp simd
                        for (int d = gi * group; d < (gi + 1) * group; d++) row[d] = row[d] * sc + mn;
                    }
                }
                for (int j = 0; j < g; j++) {
                    const float w = s[j][t];
                    #pragma omp simd
                    for (int d = 0; d < hd; d++) acc[j][d] += w * row[d];
                }
            }
        }
        float* ob = out + ((int64_t)b * nh + (int64_t)h * g) * hd;
        for (int j = 0; j < g; j++) {
            const float inv = l[j] > 0.f ? 1.f / l[j] : 0.f;
            for (int d = 0; d < hd; d++) ob[j * hd + d] = acc[j][d] * inv;
        }
        if (raw) {                        /* the g query heads of KV head h add into one row */
            float* mrow = mass + ((int64_t)b * nkv + h) * ((int64_t)max_nb * bs);
            for (int j = 0; j < g; j++) {
                const float inv = l[j] > 0.f ? 1.f / l[j] : 0.f;
                for (int64_t t = 0; t < L; t++) mrow[t] += exp_approx(raw[(int64_t)j * L + t] - m[j]) * inv;
            }
            free(raw);
        }
    }
}

#define DEFINE_KIVI(BITS)                                                                          \
void paged_decode_attention_kivi##BITS(const float* q, const uint8_t* kc, const uint8_t* vc,       \
        const _Float16* kp, const _Float16* vp, const _Float16* wk, const _Float16* wv,            \
        const int32_t* stage_of, const int64_t* tables, const int64_t* lens, float* out,           \
        float* mass, int B, int nh, int nkv, int hd, int bs, int max_nb, int group, int kp_stride, \
        float scale)                                                                               \
{                                                                                                  \
    decode_kivi(q, kc, vc, kp, vp, wk, wv, stage_of, tables, lens, out, mass, B, nh, nkv, hd, bs,  \
                max_nb, group, kp_stride, scale, BITS);                                            \
}

DEFINE_KIVI(4)
DEFINE_KIVI(2)
