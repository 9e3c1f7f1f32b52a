/* ggml block codecs as the block-weight kernels read them (decode_q.c, gemm_q.c).

   Owns: the byte size of one 32-weight block per ggml type id (Q4_0 = 2, Q4_1 = 3, Q8_0 = 8;
   0 for any other) and the fp16 scale read (F16C where the CPU has it, else an exact software
   conversion). Does not know: the dot products or how rows are tiled. */
#ifndef MEMLM_KERNELS_GGML_BLOCKS_H
#define MEMLM_KERNELS_GGML_BLOCKS_H

#include <math.h>
#include <stdint.h>
#include <string.h>
#if defined(__F16C__)
#include <immintrin.h>
#endif

static int block_bytes(int type) {
    return type == 8 ? 34 : type == 2 ? 18 : type == 3 ? 20 : 0;
}

#if defined(__F16C__)
static inline float f16(const uint8_t* b) { uint16_t h; memcpy(&h, b, 2); return _cvtsh_ss(h); }
#else
static inline float f16(const uint8_t* b) {              /* IEEE half -> float, exactly */
    uint16_t h; memcpy(&h, b, 2);
    const int e = (h >> 10) & 31, m = h & 1023;
    const float v = e == 0 ? ldexpf((float)m, -24) : e == 31 ? (m ? NAN : INFINITY) : ldexpf((float)(m | 1024), e - 25);
    return (h & 0x8000u) ? -v : v;
}
#endif
#endif  /* MEMLM_KERNELS_GGML_BLOCKS_H */
