/* The three low-bit products of lowbit_avx2.c for CPUs with AVX-512 F/BW/VL and VNNI
 * (glmgym.chat.kernels.avx2 builds this file into its own library with AVX-512 flags and calls it
 * only where CPUID reports those, so a compiler or CPU without them loses nothing).
 *
 * Same weight layouts, same int8 activations (lowbit_common.h), same results up to the order of the
 * float sums. What differs:
 *   - `vpdpbusd` (VNNI) takes the 4-byte dot products straight into int32 lanes: one instruction
 *     where AVX2 needs `vpmaddubsw` + `vpmaddwd` (+ an add);
 *   - a 64-byte register holds the codes of two weight rows, so four rows are two registers,
 *     unpacked (q4) or sign-split (q8) once;
 *   - up to MB rows of activations are multiplied per read of four weight rows: the unpacking, the
 *     loads and the loop overhead are shared, so verifying k drafts (speculative decoding), a batch
 *     of decoding rows or a prefill costs far less than k single-row products.
 * Lane layout: lanes 0-7 of a register belong to the pair's first row, lanes 8-15 to its second;
 * the 32 activation bytes of a block are broadcast to both halves.
 */
#include "lowbit_common.h"

#define MB 4 /* activation rows per pass over a tile: 4 x 2 x 2 accumulators + 8 weight registers */

static inline __m512i bcast32(const int8_t *p) {
    return _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)p));
}

/* lanes 0-7 summed into out[0], lanes 8-15 into out[1] */
static inline void hsum_pair(__m512 v, float *out) {
    out[0] = hsum8(_mm512_castps512_ps256(v));
    out[1] = hsum8(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
}

/* y[m0 + i, 4t .. 4t + ROWS) for i < mb from tile t of a q4 weight (layout: lowbit_avx2.c). */
static inline __attribute__((always_inline)) void q4_tile_vnni(const QActs *a, int64_t m0, int mb, int64_t K,
                                                              int64_t G, const uint8_t *w, const float *scale,
                                                              const float *zero, float *y) {
    const __m512i low = _mm512_set1_epi8(0x0F), zeroi = _mm512_setzero_si512();
    const int64_t nb = K / QP, ng = K / G, ppg = G / QP;
    __m512 acc[MB][2];
    __m128 zacc[MB];
    for (int i = 0; i < mb; i++) {
        acc[i][0] = acc[i][1] = _mm512_setzero_ps();
        zacc[i] = _mm_setzero_ps();
    }
    for (int64_t g = 0; g < ng; g++) {
        __m512 gacc[MB][2];
        for (int i = 0; i < mb; i++) gacc[i][0] = gacc[i][1] = _mm512_setzero_ps();
        for (int64_t c = g * ppg; c < (g + 1) * ppg; c++) {
            const uint8_t *wc = w + c * (ROWS * QP / 2); /* rows 0, 1 | rows 2, 3: two cache lines */
            _mm_prefetch((const char *)(wc + PREFETCH_AHEAD), _MM_HINT_NTA);
            _mm_prefetch((const char *)(wc + PREFETCH_AHEAD + 64), _MM_HINT_NTA);
            __m512i v0 = _mm512_loadu_si512((const void *)wc), v1 = _mm512_loadu_si512((const void *)(wc + 64));
            /* low nibbles: columns 0-31 of both rows; high nibbles: columns 32-63 */
            __m512i wa0 = _mm512_and_si512(v0, low), wb0 = _mm512_and_si512(_mm512_srli_epi16(v0, 4), low);
            __m512i wa1 = _mm512_and_si512(v1, low), wb1 = _mm512_and_si512(_mm512_srli_epi16(v1, 4), low);
            for (int i = 0; i < mb; i++) {
                const int8_t *xq = a->q + (m0 + i) * K + c * QP;
                __m512i xa = bcast32(xq), xb = bcast32(xq + QP / 2);
                __m512 dx = _mm512_set1_ps(a->d[(m0 + i) * nb + c]);
                __m512i p0 = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(zeroi, wa0, xa), wb0, xb);
                __m512i p1 = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(zeroi, wa1, xa), wb1, xb);
                gacc[i][0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p0), dx, gacc[i][0]);
                gacc[i][1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p1), dx, gacc[i][1]);
            }
        }
        /* the group's scales, lanes 0-7 row 2p and lanes 8-15 row 2p + 1 */
        const float *s = scale + g * ROWS;
        __m512 s0 = _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(s[0]), _mm512_set1_ps(s[1]));
        __m512 s1 = _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(s[2]), _mm512_set1_ps(s[3]));
        __m128 z = _mm_loadu_ps(zero + g * ROWS);
        for (int i = 0; i < mb; i++) {
            acc[i][0] = _mm512_fmadd_ps(gacc[i][0], s0, acc[i][0]);
            acc[i][1] = _mm512_fmadd_ps(gacc[i][1], s1, acc[i][1]);
            zacc[i] = _mm_fmadd_ps(z, _mm_set1_ps(a->gsum[(m0 + i) * ng + g]), zacc[i]);
        }
    }
    for (int i = 0; i < mb; i++) {
        float *yi = y + i * ROWS;
        _mm_storeu_ps(yi, zacc[i]);
        float h[4];
        hsum_pair(acc[i][0], h);
        hsum_pair(acc[i][1], h + 2);
        for (int r = 0; r < ROWS; r++) yi[r] += h[r];
    }
}

/* y[m0 + i, 4t .. 4t + ROWS) for i < mb from tile t of a tiled q8 weight (one scale per row).
 * Signed x signed through `vpdpbusd` (unsigned x signed): |w| as unsigned, the sign moved onto x. */
static inline __attribute__((always_inline)) void q8_tile_vnni(const QActs *a, int64_t m0, int mb, int64_t K,
                                                              const int8_t *w, const float *scale, float *y) {
    const __m512i zeroi = _mm512_setzero_si512();
    const int64_t nb = K / QK;
    __m512 acc[MB][2];
    for (int i = 0; i < mb; i++) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const int8_t *wb = w + b * (ROWS * QK);
        _mm_prefetch((const char *)(wb + PREFETCH_AHEAD), _MM_HINT_NTA);
        _mm_prefetch((const char *)(wb + PREFETCH_AHEAD + 64), _MM_HINT_NTA);
        __m512i v0 = _mm512_loadu_si512((const void *)wb), v1 = _mm512_loadu_si512((const void *)(wb + 64));
        __m512i u0 = _mm512_abs_epi8(v0), u1 = _mm512_abs_epi8(v1); /* -128 -> 0x80 = 128 unsigned */
        __mmask64 n0 = _mm512_movepi8_mask(v0), n1 = _mm512_movepi8_mask(v1);
        for (int i = 0; i < mb; i++) {
            __m512i x = bcast32(a->q + (m0 + i) * K + b * QK);
            __m512 dx = _mm512_set1_ps(a->d[(m0 + i) * nb + b]);
            __m512i p0 = _mm512_dpbusd_epi32(zeroi, u0, _mm512_mask_sub_epi8(x, n0, zeroi, x));
            __m512i p1 = _mm512_dpbusd_epi32(zeroi, u1, _mm512_mask_sub_epi8(x, n1, zeroi, x));
            acc[i][0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p0), dx, acc[i][0]);
            acc[i][1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p1), dx, acc[i][1]);
        }
    }
    for (int i = 0; i < mb; i++) {
        float h[4];
        hsum_pair(acc[i][0], h);
        hsum_pair(acc[i][1], h + 2);
        for (int r = 0; r < ROWS; r++) y[i * ROWS + r] = h[r] * scale[r];
    }
}

/* y[m0 + i, n0 .. n0 + ROWS) for i < mb from a q8 weight in rows with one scale per block of QK
 * columns (the INT8 lm_head, not tiled: its rows are the embeddings too). Rows n0, n0 + 1 and
 * n0 + 2, n0 + 3 share a register; the blocks' scales are folded into the activations' per pair. */
static inline __attribute__((always_inline)) void q8_rows_vnni(const QActs *a, int64_t m0, int mb, int64_t K,
                                                              const int8_t *w, const float *scale, int64_t n0,
                                                              float *y) {
    const __m512i zeroi = _mm512_setzero_si512();
    const int64_t nb = K / QK;
    const int8_t *wr[ROWS];
    const float *sr[ROWS];
    for (int r = 0; r < ROWS; r++) {
        wr[r] = w + (n0 + r) * K;
        sr[r] = scale + (n0 + r) * nb;
    }
    __m512 acc[MB][2];
    for (int i = 0; i < mb; i++) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        if (b % 2 == 0)
            for (int r = 0; r < ROWS; r++) _mm_prefetch((const char *)(wr[r] + b * QK + PREFETCH_AHEAD), _MM_HINT_NTA);
        __m512i v0 = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)(wr[0] + b * QK))),
                                        _mm256_loadu_si256((const __m256i *)(wr[1] + b * QK)), 1);
        __m512i v1 = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)(wr[2] + b * QK))),
                                        _mm256_loadu_si256((const __m256i *)(wr[3] + b * QK)), 1);
        __m512i u0 = _mm512_abs_epi8(v0), u1 = _mm512_abs_epi8(v1);
        __mmask64 n0m = _mm512_movepi8_mask(v0), n1m = _mm512_movepi8_mask(v1);
        __m512 s0 = _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(sr[0][b]), _mm512_set1_ps(sr[1][b]));
        __m512 s1 = _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(sr[2][b]), _mm512_set1_ps(sr[3][b]));
        for (int i = 0; i < mb; i++) {
            __m512i x = bcast32(a->q + (m0 + i) * K + b * QK);
            __m512 dx = _mm512_set1_ps(a->d[(m0 + i) * nb + b]);
            __m512i p0 = _mm512_dpbusd_epi32(zeroi, u0, _mm512_mask_sub_epi8(x, n0m, zeroi, x));
            __m512i p1 = _mm512_dpbusd_epi32(zeroi, u1, _mm512_mask_sub_epi8(x, n1m, zeroi, x));
            acc[i][0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p0), _mm512_mul_ps(dx, s0), acc[i][0]);
            acc[i][1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p1), _mm512_mul_ps(dx, s1), acc[i][1]);
        }
    }
    for (int i = 0; i < mb; i++) {
        hsum_pair(acc[i][0], y + i * ROWS);
        hsum_pair(acc[i][1], y + i * ROWS + 2);
    }
}

/* Tiles over the threads; per tile the activation rows in passes of MB, the last pass with the
 * rows left (each count its own unrolled copy: the accumulators stay in registers).
 * TILE_FN(m0, mb, t, out) writes out[i * ROWS + r] = y[m0 + i, ROWS t + r]. */
#define FOR_TILES_MB(M, N, y, TILE_FN)                                                          \
    _Pragma("omp parallel for num_threads(nthreads) schedule(static)")                         \
    for (int64_t t = 0; t < ((N) + ROWS - 1) / ROWS; t++) {                                     \
        float out[MB * ROWS];                                                                   \
        for (int64_t m0 = 0; m0 < (M); m0 += MB) {                                              \
            const int64_t left = (M) - m0;                                                      \
            const int mb = left < MB ? (int)left : MB;                                          \
            switch (mb) {                                                                       \
            case 1: TILE_FN(m0, 1, t, out); break;                                              \
            case 2: TILE_FN(m0, 2, t, out); break;                                              \
            case 3: TILE_FN(m0, 3, t, out); break;                                              \
            default: TILE_FN(m0, MB, t, out); break;                                            \
            }                                                                                   \
            for (int i = 0; i < mb; i++)                                                        \
                for (int r = 0; r < ROWS && t * ROWS + r < (N); r++)                            \
                    (y)[(m0 + i) * (N) + t * ROWS + r] = out[i * ROWS + r];                     \
        }                                                                                       \
    }

/* As glmgym_q4_matmul (lowbit_avx2.c): the same arguments and tiles. */
int glmgym_q4_matmul_vnni(const void *x, int x_bf16, int64_t M, int64_t K, const uint8_t *w,
                          const float *scale, const float *zero, int64_t N, int64_t G, float *y,
                          int nthreads) {
    if (K % QP || G % QP || K % G) return -2;
    QActs a;
    if (quantize_acts(x, x_bf16, M, K, QP, G, &a, nthreads)) return -1;
    const int64_t ng = K / G;
#define Q4_TILE(m0, mb, t, out) q4_tile_vnni(&a, m0, mb, K, G, w + (t) * (ROWS * K / 2), \
                                             scale + (t) * ng * ROWS, zero + (t) * ng * ROWS, out)
    FOR_TILES_MB(M, N, y, Q4_TILE)
#undef Q4_TILE
    free_acts(&a);
    return 0;
}

/* As glmgym_q8t_matmul (lowbit_avx2.c): the same arguments and tiles. */
int glmgym_q8t_matmul_vnni(const void *x, int x_bf16, int64_t M, int64_t K, const int8_t *w,
                           const float *scale, int64_t N, float *y, int nthreads) {
    if (K % QK) return -2;
    QActs a;
    if (quantize_acts(x, x_bf16, M, K, QK, K, &a, nthreads)) return -1;
#define Q8_TILE(m0, mb, t, out) q8_tile_vnni(&a, m0, mb, K, w + (t) * (ROWS * K), scale + (t) * ROWS, out)
    FOR_TILES_MB(M, N, y, Q8_TILE)
#undef Q8_TILE
    free_acts(&a);
    return 0;
}

/* As glmgym_q8_matmul (lowbit_avx2.c): int8 rows with one scale per block of 32 columns; N a
 * multiple of ROWS (the last rows otherwise go through the AVX2 product: the caller's job). */
int glmgym_q8_matmul_vnni(const void *x, int x_bf16, int64_t M, int64_t K, const int8_t *w,
                          const float *scale, int64_t N, float *y, int nthreads) {
    if (K % QK || N % ROWS) return -2;
    QActs a;
    if (quantize_acts(x, x_bf16, M, K, QK, K, &a, nthreads)) return -1;
#define Q8_ROWS(m0, mb, t, out) q8_rows_vnni(&a, m0, mb, K, w, scale, (t) * ROWS, out)
    FOR_TILES_MB(M, N, y, Q8_ROWS)
#undef Q8_ROWS
    free_acts(&a);
    return 0;
}
