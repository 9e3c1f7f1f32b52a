/* Batched matmuls on ggml block weights (Q8_0, Q4_0, Q4_1) with Intel AMX bf16 tiles, for
   prefill chunks and decode batches on CPUs that have AMX: y (M, N) fp32 = x (M, K) fp32 . W^T.

   The weight is the A operand: NP = 32 output columns ("a panel") are decoded per thread into
   bf16 rows (w = d q + m, or d (q - 8), or d q, in fp32 then rounded to nearest even), once per
   panel and chunk of rows, so an A tile is 16 columns x 32 inputs read straight from the panel.
   The activations are the B operand: each chunk of x is rounded to bf16 once and laid out as
   the tiles want it (per 16 rows and block of 32 inputs, 16 pair-rows of 16 x 2 bf16: a 16 x 16
   dword transpose). TDPBF16PS accumulates in fp32 across all of K inside the tile registers, so
   no per-block scale work is left (the scales went into the decoded weights): 2 weight tiles x 2
   activation tiles -> 4 accumulator tiles of 16 x 16 (columns x rows), transposed into y once
   at the end. The same rounding as the bf16-tile path (W and x in bf16, fp32 sums). x may come
   as bf16 (the model's activations: no conversion) and y may leave as bf16.

   Workspace, allocated per call: the bf16 activations of at most CHUNK_BYTES worth of rows (a
   multiple of 32) and one panel per thread (NP K 2 bytes). `status`: 0 on success, 1 when that
   allocation failed, 2 when this build or this process has no AMX (`amx_ready` says which;
   y is not written then). Threads split the panels (OpenMP); each loads the tile configuration
   and releases the tiles when done. Built without AMX (other CPUs, other compilers) every call
   answers status 2. Wrapped by memlm/kernels/gemv.py (`block_matmul`). */
#define _GNU_SOURCE
#include "common.h"
#include "ggml_blocks.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>

enum { QK = 32, TYPE_Q4_0 = 2, TYPE_Q4_1 = 3, TYPE_Q8_0 = 8, NP = 32, RT = 16 };
#define CHUNK_BYTES ((int64_t)1 << 21)      /* bf16 activation bytes held at once */
#define GROUP_BYTES ((int64_t)1 << 18)      /* decoded bf16 weight bytes per thread at once */

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__) && defined(__AVX512BW__)
#define GEMM_AMX 1
#include <sys/syscall.h>
#include <unistd.h>

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tile_config;

/* Asks the kernel for the AMX tile state (once per process; Linux >= 5.16): 1 when granted. */
static int request_amx(void) {
    static int granted = -1;
    if (granted < 0) {
        _Pragma("omp critical(memlm_amx)")
        if (granted < 0) granted = syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
    }
    return granted;
}

/* 16 x 16 dwords in r[] -> transposed in place (r[i] lane j <- r[j] lane i). */
static inline void transpose16(__m512i r[16]) {
    __m512i t[16];
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {
        r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
        r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
        r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
        r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
    }
    /* r[4b + c] now holds, in each 128-bit lane L, dword c of rows 4b..4b+3 of lane L's columns */
    for (int c = 0; c < 4; c++) {
        t[c] = _mm512_shuffle_i32x4(r[c], r[4 + c], 0x88);        /* lanes 0, 2 of rows 0-7 */
        t[4 + c] = _mm512_shuffle_i32x4(r[c], r[4 + c], 0xDD);    /* lanes 1, 3 */
        t[8 + c] = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0x88);
        t[12 + c] = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0xDD);
    }
    for (int c = 0; c < 4; c++) {
        r[c] = _mm512_shuffle_i32x4(t[c], t[8 + c], 0x88);         /* lane 0: columns 0-3 */
        r[8 + c] = _mm512_shuffle_i32x4(t[c], t[8 + c], 0xDD);     /* lane 2: columns 8-11 */
        r[4 + c] = _mm512_shuffle_i32x4(t[4 + c], t[12 + c], 0x88);   /* lane 1: columns 4-7 */
        r[12 + c] = _mm512_shuffle_i32x4(t[4 + c], t[12 + c], 0xDD);  /* lane 3: columns 12-15 */
    }
}

/* Column n's block g (32 weights) -> 32 bf16 at dst, in input order. */
static inline void decode_block(int type, const uint8_t* b, uint16_t* dst) {
    const __m512 d = _mm512_set1_ps(f16(b));
    __m512 lo, hi;
    if (type == TYPE_Q8_0) {
        const __m256i q = _mm256_loadu_si256((const __m256i*)(b + 2));
        lo = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(q))), d);
        hi = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(q, 1))), d);
    } else {
        const __m128i qs = _mm_loadu_si128((const __m128i*)(b + (type == TYPE_Q4_1 ? 4 : 2)));
        const __m128i m4 = _mm_set1_epi8(15);
        const __m512 l = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(qs, m4)));
        const __m512 h = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(qs, 4), m4)));
        if (type == TYPE_Q4_1) {
            const __m512 m = _mm512_set1_ps(f16(b + 2));
            lo = _mm512_fmadd_ps(l, d, m);
            hi = _mm512_fmadd_ps(h, d, m);
        } else {
            const __m512 e = _mm512_set1_ps(8.f);
            lo = _mm512_mul_ps(_mm512_sub_ps(l, e), d);
            hi = _mm512_mul_ps(_mm512_sub_ps(h, e), d);
        }
    }
    _mm512_storeu_si512((void*)dst, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
}

/* Columns n0 .. n0 + nc of W -> pa (NP rows of K bf16); rows past nc are zero. */
static void decode_panel(int type, const uint8_t* W, int64_t row_bytes, int n0, int nc, int K, uint16_t* pa) {
    const int G = K / QK, bb = block_bytes(type);
    for (int c = 0; c < NP; c++) {
        uint16_t* row = pa + (int64_t)c * K;
        if (c >= nc) { memset(row, 0, (size_t)K * 2); continue; }
        const uint8_t* w = W + (int64_t)(n0 + c) * row_bytes;
        for (int g = 0; g < G; g++) decode_block(type, w + (int64_t)g * bb, row + g * QK);
    }
}

/* Rows r0 .. r0 + 16 of x (fp32, or bf16 where `xbf`; those past `rows` zero) -> the B tiles of
   row tile t: for each block g, 16 pair-rows x 16 rows x 2 bf16 (1 KiB) at xb + (t G + g) 256
   dwords. */
static void pack_rows(const void* x, int xbf, int rows, int r0, int K, uint32_t* xb, int t) {
    const int G = K / QK;
    for (int g = 0; g < G; g++) {
        __m512i v[16];
        for (int r = 0; r < RT; r++) {
            if (r0 + r < rows && xbf) {
                v[r] = _mm512_loadu_si512((const uint16_t*)x + (int64_t)(r0 + r) * K + g * QK);
            } else if (r0 + r < rows) {
                const float* p = (const float*)x + (int64_t)(r0 + r) * K + g * QK;
                v[r] = (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(p + 16), _mm512_loadu_ps(p));
            } else {
                v[r] = _mm512_setzero_si512();
            }
        }
        transpose16(v);                   /* v[k] lane r: the pair (2k, 2k + 1) of row r */
        uint32_t* dst = xb + ((int64_t)t * G + g) * 256;
        for (int k = 0; k < 16; k++) _mm512_storeu_si512((void*)(dst + k * 16), v[k]);
    }
}

/* The accumulator tile (16 columns x 16 rows, fp32) -> rows r0.. of y (fp32, or bf16 rounded to
   nearest even where `ybf`; y points at the tile's first column, ldy elements a row). */
static inline void store_tile(const float* acc, void* y, int ybf, int64_t ldy, int r0, int rows, int nc) {
    __m512i v[16];
    for (int i = 0; i < 16; i++) v[i] = _mm512_loadu_si512((const void*)(acc + i * 16));
    transpose16(v);                       /* v[r] lane n: column n of row r */
    const __mmask16 k = nc >= 16 ? 0xFFFF : nc <= 0 ? 0 : (__mmask16)((1u << nc) - 1u);
    for (int r = 0; r < RT && r0 + r < rows; r++) {
        if (ybf)
            _mm256_mask_storeu_epi16((uint16_t*)y + (int64_t)(r0 + r) * ldy, k,
                                     (__m256i)_mm512_cvtneps_pbh(_mm512_castsi512_ps(v[r])));
        else
            _mm512_mask_storeu_ps((float*)y + (int64_t)(r0 + r) * ldy, k, _mm512_castsi512_ps(v[r]));
    }
}

/* y rows [0, rows) (row tiles of 16 in xb) x the qn decoded panels at pa (columns n0 .. n0 +
   32 qn, ncols of them real; y points at column n0): per pair of row tiles every panel of the
   group, so the pair's activation tiles are read from cache once per group, not per panel. */
static void group_product(const uint16_t* pa, int qn, const uint32_t* xb, int K, int rows, char* y, int ybf,
                          int64_t ldy, int ncols, float* acc) {
    const int64_t esz = ybf ? 2 : 4, half = 16 * esz;       /* bytes from column n0 to n0 + 16 */
    const int G = K / QK, tiles = (rows + RT - 1) / RT;
    const int64_t lda = (int64_t)K * 2;
    for (int t = 0; t < tiles; t += 2) {
        const int pair = t + 1 < tiles;
        const uint32_t *b0 = xb + (int64_t)t * G * 256, *b1 = b0 + (int64_t)G * 256;
        for (int j = 0; j < qn; j++) {
            const uint16_t* pj = pa + (int64_t)j * NP * K;
            char* yj = y + (int64_t)j * NP * esz;
            const int nc = ncols - j * NP < NP ? ncols - j * NP : NP;
            _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
            for (int g = 0; g < G; g++) {
                _tile_loadd(4, pj + g * QK, lda);
                _tile_loadd(5, pj + 16 * (int64_t)K + g * QK, lda);
                _tile_loadd(6, b0 + g * 256, 64);
                _tile_dpbf16ps(0, 4, 6);
                _tile_dpbf16ps(2, 5, 6);
                if (pair) {
                    _tile_loadd(7, b1 + g * 256, 64);
                    _tile_dpbf16ps(1, 4, 7);
                    _tile_dpbf16ps(3, 5, 7);
                }
            }
            _tile_stored(0, acc, 64);
            store_tile(acc, yj, ybf, ldy, t * RT, rows, nc);
            _tile_stored(2, acc, 64);
            store_tile(acc, yj + half, ybf, ldy, t * RT, rows, nc - 16);
            if (pair) {
                _tile_stored(1, acc, 64);
                store_tile(acc, yj, ybf, ldy, (t + 1) * RT, rows, nc);
                _tile_stored(3, acc, 64);
                store_tile(acc, yj + half, ybf, ldy, (t + 1) * RT, rows, nc - 16);
            }
        }
    }
}
#endif

/* *out = 1 when this build has the AMX path and the process may use the tiles (asks once). */
void amx_ready(int32_t* out) {
#if defined(GEMM_AMX)
    *out = request_amx();
#else
    *out = 0;
#endif
}

/* `flags`: bit 0 x is bf16 (else fp32), bit 1 y is bf16 (else fp32). */
void amx_gemm(int type, const uint8_t* W, const void* x, void* y, int M, int N, int K, int flags, int32_t* status) {
    *status = 2;
#if defined(GEMM_AMX)
    if (!request_amx()) return;
    *status = 0;
    if (block_bytes(type) == 0 || M <= 0 || N <= 0 || K <= 0 || K % QK) return;
    const int G = K / QK, xbf = flags & 1, ybf = (flags >> 1) & 1;
    const int64_t row_bytes = (int64_t)G * block_bytes(type), xrow = (int64_t)K * (xbf ? 2 : 4);
    const int64_t yrow = (int64_t)N * (ybf ? 2 : 4);
    int chunk = (int)(CHUNK_BYTES / ((int64_t)K * 2)) / (2 * RT) * (2 * RT);
    chunk = chunk < 2 * RT ? 2 * RT : chunk;
    chunk = chunk > M ? (M + RT - 1) / RT * RT : chunk;
    const int threads = omp_get_max_threads();
    const size_t xb_bytes = (size_t)chunk * K * 2;
    /* panels decoded per group: about GROUP_BYTES of bf16 weights per thread (L2) */
    int group = (int)(GROUP_BYTES / ((int64_t)NP * K * 2));
    group = group < 1 ? 1 : group;
    const size_t panel_bytes = ((size_t)group * NP * K * 2 + 16 * 16 * 4 + 63) / 64 * 64;
    char* ws = (char*)aligned_alloc(64, (xb_bytes + 63) / 64 * 64 + (size_t)threads * panel_bytes);
    if (ws == NULL) { *status = 1; return; }
    uint32_t* xb = (uint32_t*)ws;
    char* panels = ws + (xb_bytes + 63) / 64 * 64;
    const int n_panels = (N + NP - 1) / NP;
    _Pragma("omp parallel num_threads(threads) if((int64_t)N * K * M >= 65536)")
    {
        tile_config cfg;
        memset(&cfg, 0, sizeof cfg);
        cfg.palette = 1;
        for (int i = 0; i < 8; i++) { cfg.rows[i] = 16; cfg.colsb[i] = 64; }
        _tile_loadconfig(&cfg);
        uint16_t* pa = (uint16_t*)(panels + (size_t)omp_get_thread_num() * panel_bytes);
        float* acc = (float*)((char*)pa + (size_t)group * NP * K * 2);
        const int tid = omp_get_thread_num(), nt = omp_get_num_threads();
        const int p0 = (int)((int64_t)n_panels * tid / nt), p1 = (int)((int64_t)n_panels * (tid + 1) / nt);
        for (int c0 = 0; c0 < M; c0 += chunk) {
            const int rows = M - c0 < chunk ? M - c0 : chunk;
            const int tiles = (rows + RT - 1) / RT;
            _Pragma("omp for schedule(static)")
            for (int t = 0; t < tiles; t++) pack_rows((const char*)x + c0 * xrow, xbf, rows, t * RT, K, xb, t);
            for (int q0 = p0; q0 < p1; q0 += group) {          /* this thread's panels, a group at a time */
                const int qn = p1 - q0 < group ? p1 - q0 : group, n0 = q0 * NP;
                const int ncols = N - n0 < qn * NP ? N - n0 : qn * NP;
                for (int j = 0; j < qn; j++) {
                    const int nj = n0 + j * NP, nc = N - nj < NP ? N - nj : NP;
                    decode_panel(type, W, row_bytes, nj, nc, K, pa + (int64_t)j * NP * K);
                }
                group_product(pa, qn, xb, K, rows, (char*)y + c0 * yrow + (int64_t)n0 * (ybf ? 2 : 4), ybf, N,
                              ncols, acc);
            }
            _Pragma("omp barrier")                          /* before the next chunk's rows replace xb */
        }
        _tile_release();
    }
    free(ws);
#else
    (void)type; (void)W; (void)x; (void)y; (void)M; (void)N; (void)K; (void)flags;
#endif
}
