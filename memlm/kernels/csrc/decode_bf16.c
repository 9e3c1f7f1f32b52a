/* Decode-time matmuls on plain bf16 weights W (N, K) row-major, and the two fused steps of a
   batch-1..8 decoder layer built on them (the bf16 linear method's layers at decode).

     dense_matmul       y (M, N) fp32 = bf16(x) . W^T           x fp32, rounded to bf16 first
     dense_head         y (M, N) fp32 = x . W^T in fp32          x fp32 as is (the LM head: exact picks)
     dense_attn_in      rms_norm(x) -> bf16 -> qkv projection (+ bias) -> bf16 -> RoPE -> bf16
     dense_attn_out_mlp x += bf16(o_proj(a)); h = bf16(rms_norm(x));
                        x += bf16(down(bf16(silu(g) * u))) with [g | u] = bf16(h . Wgu^T)
     dense_layer_step   the two above around the new k / v rows written into a paged float cache
                        and paged_attention.c's decode kernel (called by address): a whole layer

   Products: AVX512-BF16 `vdpbf16ps` (pairs of bf16 products summed into fp32 lanes) where the
   compiler targets it, else a plain C loop over the same bf16 values in fp32; the LM head
   widens W's bf16 to fp32 and multiplies the unrounded fp32 x (exact products, fp32 sums).
   The fused steps round to bf16 exactly where the torch bf16 path (`DecoderLayer._forward_fused`
   with oneDNN matmuls and `fused_ops.c`) rounds, with the same norm / RoPE / SiLU formulas, so
   the two differ only by fp32 summation order. Each step is one OpenMP region: threads split
   every projection's output rows (blocks of NR), with barriers between phases; scratch (a few
   rows of the layer's widths) is allocated per call. Wrapped by memlm/kernels/dense_layer.py. */
#include "common.h"

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <immintrin.h>

enum { MR = 4, NR = 4 };
#define PAR_MIN 65536   /* multiply-adds below which a call stays on one thread */

static inline float bf2f(uint16_t h) { uint32_t u = (uint32_t)h << 16; float f; memcpy(&f, &u, 4); return f; }
static inline uint16_t f2bf(float f) {                 /* round to nearest even, as fused_ops.c */
    uint32_t u; memcpy(&u, &f, 4);
    u += 0x7FFFu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}
static inline float round_bf(float f) { return bf2f(f2bf(f)); }

#if defined(__AVX512F__) && defined(__AVX512BF16__) && defined(__AVX512BW__)
#define HAVE_DPBF16 1
#endif

/* out[i * NR + j] = x row (r0 + i) . W row (n + j), i < mr, j < nr; x bf16 (M, K) */
static inline __attribute__((always_inline)) void tile_dot(const uint16_t* W, const uint16_t* xb, int K,
                                                          int r0, int mr, int n, int nr, float* out) {
#if HAVE_DPBF16
    __m512 acc[MR][NR];
    for (int i = 0; i < mr; i++)
        for (int j = 0; j < nr; j++) acc[i][j] = _mm512_setzero_ps();
    int k = 0;
    for (; k + 32 <= K; k += 32) {
        __m512i w[NR];
        for (int j = 0; j < nr; j++) w[j] = _mm512_loadu_si512((const void*)(W + (int64_t)(n + j) * K + k));
        for (int i = 0; i < mr; i++) {
            const __m512i xv = _mm512_loadu_si512((const void*)(xb + (int64_t)(r0 + i) * K + k));
            for (int j = 0; j < nr; j++)
                acc[i][j] = _mm512_dpbf16_ps(acc[i][j], (__m512bh)xv, (__m512bh)w[j]);
        }
    }
    if (k < K) {                                   /* the last K % 32 columns, masked */
        const __mmask32 m = (__mmask32)((1ull << (K - k)) - 1);
        __m512i w[NR];
        for (int j = 0; j < nr; j++) w[j] = _mm512_maskz_loadu_epi16(m, W + (int64_t)(n + j) * K + k);
        for (int i = 0; i < mr; i++) {
            const __m512i xv = _mm512_maskz_loadu_epi16(m, xb + (int64_t)(r0 + i) * K + k);
            for (int j = 0; j < nr; j++)
                acc[i][j] = _mm512_dpbf16_ps(acc[i][j], (__m512bh)xv, (__m512bh)w[j]);
        }
    }
    for (int i = 0; i < mr; i++)
        for (int j = 0; j < nr; j++) out[i * NR + j] = _mm512_reduce_add_ps(acc[i][j]);
#else
    for (int i = 0; i < mr; i++)
        for (int j = 0; j < nr; j++) {
            const uint16_t *xr = xb + (int64_t)(r0 + i) * K, *wr = W + (int64_t)(n + j) * K;
            float s = 0.f;
            _Pragma("omp simd reduction(+:s)")
            for (int k = 0; k < K; k++) s += bf2f(xr[k]) * bf2f(wr[k]);
            out[i * NR + j] = s;
        }
#endif
}

/* y[r * ldy + n] (+)= x row r . W row n for every row r < M and n < N, inside a parallel region
   (an orphaned `omp for` over blocks of NR rows of W) or alone. acc: add into y; rnd: round each
   product to bf16 first (what a bf16-output matmul stores). */
static void dense_rows(const uint16_t* W, const uint16_t* xb, int M, int K, float* y, int64_t ldy,
                       int N, int acc, int rnd) {
    const int nb = (N + NR - 1) / NR;
    _Pragma("omp for schedule(static)")
    for (int b = 0; b < nb; b++) {
        const int n = b * NR, nr = N - n < NR ? N - n : NR;
        float out[MR * NR];
        prefetch_row(W + (int64_t)n * K, (int64_t)nr * K * 2);
        for (int r0 = 0; r0 < M; r0 += MR) {
            const int mr = M - r0 < MR ? M - r0 : MR;
            if (nr == NR) {
#define ROWS(R) case R: tile_dot(W, xb, K, r0, R, n, NR, out); break;
                switch (mr) { ROWS(1) ROWS(2) ROWS(3) ROWS(4) }
#undef ROWS
            } else {
                tile_dot(W, xb, K, r0, mr, n, nr, out);
            }
            for (int i = 0; i < mr; i++)
                for (int j = 0; j < nr; j++) {
                    float* o = y + (int64_t)(r0 + i) * ldy + n + j;
                    const float v = rnd ? round_bf(out[i * NR + j]) : out[i * NR + j];
                    *o = acc ? *o + v : v;
                }
        }
    }
}

static void to_bf16(const float* x, uint16_t* out, int64_t n) {
    _Pragma("omp simd")
    for (int64_t i = 0; i < n; i++) out[i] = f2bf(x[i]);
}

void dense_matmul(const uint16_t* W, const float* x, float* y, int M, int N, int K) {
    if (M <= 0 || N <= 0 || K <= 0) return;
    uint16_t* xb = (uint16_t*)malloc(sizeof(uint16_t) * (size_t)M * K);
    if (xb == NULL) return;
    to_bf16(x, xb, (int64_t)M * K);
    _Pragma("omp parallel if((int64_t)N * K * M >= PAR_MIN)")
    dense_rows(W, xb, M, K, y, N, N, 0, 0);
    free(xb);
}

/* y (M, N) fp32 = x (M, K) fp32 . W^T with W's bf16 widened: every product exact, fp32 sums */
void dense_head(const uint16_t* W, const float* x, float* y, int M, int N, int K) {
    if (M <= 0 || N <= 0 || K <= 0) return;
    _Pragma("omp parallel for schedule(static) if((int64_t)N * K * M >= PAR_MIN)")
    for (int n = 0; n < N; n++) {
        const uint16_t* wr = W + (int64_t)n * K;
        for (int r = 0; r < M; r++) {
            const float* xr = x + (int64_t)r * K;
            int k = 0;
            float s = 0.f;
#if defined(__AVX512F__)
            __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
            for (; k + 32 <= K; k += 32) {
                a0 = _mm512_fmadd_ps(bf16x16_load(wr + k), _mm512_loadu_ps(xr + k), a0);
                a1 = _mm512_fmadd_ps(bf16x16_load(wr + k + 16), _mm512_loadu_ps(xr + k + 16), a1);
            }
            s = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
#endif
            for (; k < K; k++) s += xr[k] * bf2f(wr[k]);
            y[(int64_t)r * N + n] = s;
        }
    }
}

/* out (H) bf16 = rms_norm(x) * w, as fused_ops.c's rms_norm_bf16 */
static void rms_norm_row_bf16(const float* x, const float* w, float eps, int H, uint16_t* out) {
    float ss = 0.f;
    _Pragma("omp simd reduction(+:ss)")
    for (int d = 0; d < H; d++) ss += x[d] * x[d];
    const float r = 1.f / sqrtf(ss / H + eps);
    _Pragma("omp simd")
    for (int d = 0; d < H; d++) out[d] = f2bf(x[d] * r * w[d]);
}

/* x (M, H) fp32 -> qkv (M, Nq) bf16 = rope(bf16(bf16(rms_norm(x)) . Wqkv^T + bias)); the first
   n_rot heads of width hd are rotated ("rotate half") by cos / sin (M, hd), as fused_ops.c's
   rope_bf16 on the rounded projection. bias, cos_, sin_ may be NULL (no bias, no RoPE). */
void dense_attn_in(const float* x, const float* norm_w, float eps, const uint16_t* W, const float* bias,
                   const float* cos_, const float* sin_, uint16_t* qkv, int M, int H, int Nq,
                   int n_rot, int hd) {
    if (M <= 0 || H <= 0 || Nq <= 0) return;
    float* y = (float*)malloc(sizeof(float) * (size_t)M * Nq);
    uint16_t* h = (uint16_t*)malloc(sizeof(uint16_t) * (size_t)M * H);
    if (y == NULL || h == NULL) { free(y); free(h); return; }
    for (int r = 0; r < M; r++) rms_norm_row_bf16(x + (int64_t)r * H, norm_w, eps, H, h + (int64_t)r * H);
    const int half = hd / 2, rot = cos_ != NULL && sin_ != NULL ? n_rot : 0;
    _Pragma("omp parallel if((int64_t)Nq * H * M >= PAR_MIN)")
    {
        dense_rows(W, h, M, H, y, Nq, Nq, 0, 0);
        _Pragma("omp for schedule(static)")
        for (int r = 0; r < M; r++) {
            float* yr = y + (int64_t)r * Nq;
            uint16_t* o = qkv + (int64_t)r * Nq;
            for (int n = 0; n < Nq; n++) o[n] = f2bf(bias ? yr[n] + bias[n] : yr[n]);
            const float *c = cos_ + (int64_t)r * hd, *s = sin_ + (int64_t)r * hd;
            for (int hh = 0; hh < rot; hh++) {
                uint16_t* t = o + (int64_t)hh * hd;
                for (int d = 0; d < half; d++) {
                    const float a = bf2f(t[d]), b = bf2f(t[d + half]);
                    t[d] = f2bf(a * c[d] - b * s[d]);
                    t[d + half] = f2bf(b * c[d + half] + a * s[d + half]);
                }
            }
        }
    }
    free(y);
    free(h);
}

/* silu(g) * u of bf16 values, rounded to bf16: fused_ops.c's silu_mul_bf16 formula */
static void silu_mul_row(const float* gu, uint16_t* out, int I) {
    int d = 0;
#if defined(__AVX512F__)
    for (; d + 16 <= I; d += 16) {
        const __m512 a = _mm512_loadu_ps(gu + d), b = _mm512_loadu_ps(gu + I + d);
        const __m512 den = _mm512_add_ps(_mm512_set1_ps(1.f), exp512(_mm512_sub_ps(_mm512_setzero_ps(), a)));
        __m512 r = _mm512_rcp14_ps(den);
        r = _mm512_mul_ps(r, _mm512_fnmadd_ps(den, r, _mm512_set1_ps(2.f)));
        bf16x16_store(out + d, _mm512_mul_ps(_mm512_mul_ps(a, b), r));
    }
#endif
    for (; d < I; d++) out[d] = f2bf(gu[d] * gu[I + d] / (1.f + exp_approx(-gu[d])));
}

/* x (M, H) fp32, updated in place: x += bf16(attn (M, Ko) bf16 . Wo^T); h = bf16(rms_norm(x));
   [g | u] = bf16(h . Wgu^T) (2I outputs); x += bf16(Wd . bf16(silu(g) * u)). */
void dense_attn_out_mlp(float* x, const uint16_t* attn, const float* norm_w, float eps, const uint16_t* Wo,
                        const uint16_t* Wgu, const uint16_t* Wd, int M, int H, int Ko, int I) {
    if (M <= 0 || H <= 0 || Ko <= 0 || I <= 0) return;
    float* gu = (float*)malloc(sizeof(float) * (size_t)M * 2 * I);
    uint16_t* t = (uint16_t*)malloc(sizeof(uint16_t) * (size_t)M * (H > I ? H : I));
    if (gu == NULL || t == NULL) { free(gu); free(t); return; }
    const unsigned int csr = _mm_getcsr();
    const int par = (int64_t)(2 * I) * H * M >= PAR_MIN;
    _Pragma("omp parallel if(par)")
    {
        dense_rows(Wo, attn, M, Ko, x, H, H, 1, 1);                      /* x += bf16(o_proj(attn)) */
        _Pragma("omp single")
        for (int r = 0; r < M; r++) rms_norm_row_bf16(x + (int64_t)r * H, norm_w, eps, H, t + (int64_t)r * H);
        dense_rows(Wgu, t, M, H, gu, 2 * I, 2 * I, 0, 1);
        _Pragma("omp single")
        {
            _mm_setcsr(csr | 0x8040);          /* FTZ/DAZ as silu_mul_bf16: no denormal assists */
            for (int r = 0; r < M; r++) silu_mul_row(gu + (int64_t)r * 2 * I, t + (int64_t)r * I, I);
            _mm_setcsr(csr);
        }
        dense_rows(Wd, t, M, I, x, H, H, 1, 1);                          /* x += bf16(down(...)) */
    }
    free(gu);
    free(t);
}

/* One decoder layer's constants (dense_layer.py's LayerArgs mirrors it). */
typedef struct {
    const float *attn_norm, *qkv_bias, *mlp_norm;
    const uint16_t *Wqkv, *Wo, *Wgu, *Wd;
    float attn_eps, mlp_eps, scale;
    int H, n_heads, n_kv, hd, I, rope;
} dense_args;

/* A whole decoder layer for M decode tokens, one per sequence, with the two-call path's roundings:
   dense_attn_in; each row's k and v (bf16) into its cache slot (fp16 or fp32 rows of n_kv * hd);
   attention through `attend` on the bf16 q; its output rounded to bf16 into dense_attn_out_mlp. */
void dense_layer_step(const dense_args* L, float* x, const float* cos_, const float* sin_, int M,
                      void* kc, void* vc, int kv_f16, const int64_t* slots, const int64_t* tables,
                      const int64_t* lens, int max_nb, int bs, paged_attend_fn attend) {
    const int nq = L->n_heads * L->hd, kvw = L->n_kv * L->hd, Nq = nq + 2 * kvw;
    if (M <= 0) return;
    uint16_t* qkv = (uint16_t*)malloc(sizeof(uint16_t) * (size_t)M * ((size_t)Nq + nq));
    float* qf = (float*)malloc(sizeof(float) * (size_t)M * 2 * nq);
    if (qkv == NULL || qf == NULL) { free(qkv); free(qf); return; }
    uint16_t* ab = qkv + (size_t)M * Nq;
    float* o = qf + (size_t)M * nq;
    dense_attn_in(x, L->attn_norm, L->attn_eps, L->Wqkv, L->qkv_bias, L->rope ? cos_ : NULL,
                  L->rope ? sin_ : NULL, qkv, M, L->H, Nq, L->n_heads + L->n_kv, L->hd);
    for (int r = 0; r < M; r++) {
        const uint16_t* yr = qkv + (int64_t)r * Nq;
        for (int e = 0; e < nq; e++) qf[(int64_t)r * nq + e] = bf2f(yr[e]);
        if (kv_f16) {
            _Float16 *kr = (_Float16*)kc + slots[r] * kvw, *vr = (_Float16*)vc + slots[r] * kvw;
            for (int e = 0; e < kvw; e++) { kr[e] = (_Float16)bf2f(yr[nq + e]); vr[e] = (_Float16)bf2f(yr[nq + kvw + e]); }
        } else {
            float *kr = (float*)kc + slots[r] * kvw, *vr = (float*)vc + slots[r] * kvw;
            for (int e = 0; e < kvw; e++) { kr[e] = bf2f(yr[nq + e]); vr[e] = bf2f(yr[nq + kvw + e]); }
        }
    }
    attend(qf, kc, vc, NULL, NULL, tables, lens, o, NULL, M, L->n_heads, L->n_kv, L->hd, bs, max_nb, L->scale);
    to_bf16(o, ab, (int64_t)M * nq);
    dense_attn_out_mlp(x, ab, L->mlp_norm, L->mlp_eps, L->Wo, L->Wgu, L->Wd, M, L->H, nq, L->I);
    free(qkv);
    free(qf);
}
