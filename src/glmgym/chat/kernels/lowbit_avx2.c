/* Low-bit matrix products for x86-64 CPUs with AVX2 + FMA (glmgym.chat.kernels.avx2 builds and
 * loads this file; it is plain C with no Python or torch headers, so it compiles in about a second).
 *
 * y[M, N] = x[M, K] @ W[N, K]^T with W stored as
 *   - q4: 4-bit unsigned codes in tiles of ROWS rows: per tile, chunk by chunk of 64 columns, the
 *     ROWS rows' 32 bytes one after the other (byte j holds column j in the low nibble and column
 *     j + 32 in the high nibble); w = code * scale[g] + zero[g] over groups of G columns (G a
 *     multiple of 64; G = K is one group per row), scales and zeros tiled the same way;
 *   - q8: int8 codes, w = code * scale: in tiles of ROWS rows as q4's (per tile, block by block of
 *     32 columns, the rows' 32 bytes one after the other) with one scale per row, or in plain
 *     rows with one scale per block of 32 columns (the lm_head, whose rows the embeddings read);
 *   - bf16: plain bf16 rows (the lm_head), read at memory speed.
 * The quantized products use the integer dot product of llama.cpp/ggml: activations are quantized
 * to int8 with one float scale (d = absmax / 127) per block of 32 (q8) or 64 (q4: the block of one
 * chunk of codes, which saves a conversion and an FMA per 32 columns; the rounding error this adds
 * is small next to INT4's own), and each block's dot product is `vpmaddubsw` (unsigned x signed
 * bytes -> int16 pairs) + `vpmaddwd` (-> int32) in registers; the groups' zero points multiply the
 * sum of the quantized activations over the group.
 * Work is split over output rows with OpenMP (torch's own libgomp once torch is imported).
 */
#include "lowbit_common.h"

/* 1 when this CPU runs lowbit_avx512.c: AVX-512 F/BW/VL and VNNI in CPUID leaf 7, and the OS saving
 * the AVX-512 registers (XCR0 bits 1, 2, 5, 6, 7). Asked here, in code built for AVX2, because the
 * other library may use AVX-512 anywhere, its own checks included; CPUID directly rather than
 * `__builtin_cpu_supports`, whose feature names older compilers do not all know. */
int glmgym_cpu_has_avx512_vnni(void) {
    unsigned int a, b, c, d;
    __asm__ volatile("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(0), "c"(0));
    if (a < 7) return 0;
    __asm__ volatile("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(1), "c"(0));
    if (!(c & (1u << 27))) return 0; /* OSXSAVE: xgetbv is there */
    unsigned int xlo, xhi;
    __asm__ volatile("xgetbv" : "=a"(xlo), "=d"(xhi) : "c"(0));
    if ((xlo & 0xE6) != 0xE6) return 0;
    __asm__ volatile("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(7), "c"(0));
    const unsigned int f = 1u << 16, bw = 1u << 30, vl = 1u << 31, vnni = 1u << 11;
    return (b & f) && (b & bw) && (b & vl) && (c & vnni);
}

/* The work split of the q8 and bf16 products: output rows in tiles of ROWS over the threads;
 * full tiles call ROW_FN with the constant ROWS (the accumulators stay in registers), the last
 * rows go one at a time. ROW_FN(m, n, R, out) writes out[0 .. R) = y[m, n .. n+R). Needs a
 * variable `nthreads` in scope. */
#define FOR_ROW_TILES(M, N, y, ROW_FN)                                                  \
    _Pragma("omp parallel for num_threads(nthreads) schedule(static)")                 \
    for (int64_t t = 0; t < ((N) + ROWS - 1) / ROWS; t++) {                             \
        int64_t n0 = t * ROWS;                                                          \
        float out[ROWS];                                                                \
        for (int64_t m = 0; m < (M); m++) {                                             \
            if (n0 + ROWS <= (N)) {                                                     \
                ROW_FN(m, n0, ROWS, out);                                               \
                for (int r = 0; r < ROWS; r++) (y)[m * (N) + n0 + r] = out[r];          \
            } else {                                                                    \
                for (int64_t n = n0; n < (N); n++) {                                    \
                    ROW_FN(m, n, 1, out);                                               \
                    (y)[m * (N) + n] = out[0];                                          \
                }                                                                       \
            }                                                                           \
        }                                                                               \
    }

/* The work split of the tiled q4 and q8 products: tiles of ROWS output rows over the threads;
 * TILE_FN(m, t, out) writes out[0 .. ROWS) = y[m, ROWS t .. ROWS t + ROWS), of which the rows
 * below N are kept. Needs a variable `nthreads` in scope. */
#define FOR_TILES(M, N, y, TILE_FN)                                                     \
    _Pragma("omp parallel for num_threads(nthreads) schedule(static)")                 \
    for (int64_t t = 0; t < ((N) + ROWS - 1) / ROWS; t++) {                             \
        float out[ROWS];                                                                \
        for (int64_t m = 0; m < (M); m++) {                                             \
            TILE_FN(m, t, out);                                                         \
            for (int r = 0; r < ROWS && t * ROWS + r < (N); r++) (y)[m * (N) + t * ROWS + r] = out[r]; \
        }                                                                               \
    }

/* y[m, 4t .. 4t+ROWS) from tile t of a q4 weight. A tile interleaves ROWS rows chunk by chunk, so
 * the kernel reads one contiguous stream of codes and one of scales and zeros per tile (ROWS
 * separate row streams plus their scale streams defeated the hardware prefetcher: 1.5x slower).
 * Each 32-byte chunk holds 64 columns of one row: byte j is column j (low nibble) | column 32 + j
 * (high nibble), so one load, an AND and a shift+AND give two blocks of 32 codes in column order. */
static inline __attribute__((always_inline)) void q4_tile(const QActs *a, int64_t m, int64_t K,
                                                         int64_t G, const uint8_t *w,
                                                         const float *scale, const float *zero,
                                                         float *y) {
    const __m256i ones = _mm256_set1_epi16(1), low = _mm256_set1_epi8(0x0F);
    const int64_t nb = K / QP, ng = K / G, ppg = G / QP;
    const int8_t *xq = a->q + m * K;
    const float *xd = a->d + m * nb;
    const float *xs = a->gsum + m * ng;
    __m256 acc[ROWS];
    __m128 zacc = _mm_setzero_ps();
    for (int r = 0; r < ROWS; r++) acc[r] = _mm256_setzero_ps();
    for (int64_t g = 0; g < ng; g++) {
        __m256 gacc[ROWS];
        for (int r = 0; r < ROWS; r++) gacc[r] = _mm256_setzero_ps();
        for (int64_t c = g * ppg; c < (g + 1) * ppg; c++) {
            __m256i xa = _mm256_loadu_si256((const __m256i *)(xq + c * QP));
            __m256i xb = _mm256_loadu_si256((const __m256i *)(xq + c * QP + QP / 2));
            __m256 dx = _mm256_set1_ps(xd[c]);
            const uint8_t *wc = w + c * (ROWS * QP / 2); /* ROWS * 32 bytes: two cache lines */
            _mm_prefetch((const char *)(wc + PREFETCH_AHEAD), _MM_HINT_NTA);
            _mm_prefetch((const char *)(wc + PREFETCH_AHEAD + 64), _MM_HINT_NTA);
            for (int r = 0; r < ROWS; r++) {
                __m256i v = _mm256_loadu_si256((const __m256i *)(wc + r * (QP / 2)));
                __m256i wa = _mm256_and_si256(v, low);
                __m256i wb = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
                /* one activation scale for the 64 columns: the halves add as int16 pairs (each at
                 * most 2 * 15 * 127, their sum fits), then one widening, one conversion, one FMA */
                __m256i p16 = _mm256_add_epi16(_mm256_maddubs_epi16(wa, xa), _mm256_maddubs_epi16(wb, xb));
                __m256i p = _mm256_madd_epi16(p16, ones);
                gacc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), dx, gacc[r]);
            }
        }
        for (int r = 0; r < ROWS; r++)
            acc[r] = _mm256_fmadd_ps(gacc[r], _mm256_set1_ps(scale[g * ROWS + r]), acc[r]);
        zacc = _mm_fmadd_ps(_mm_loadu_ps(zero + g * ROWS), _mm_set1_ps(xs[g]), zacc);
    }
    _mm_storeu_ps(y, zacc);
    for (int r = 0; r < ROWS; r++) y[r] += hsum8(acc[r]);
}

/* x: [M, K] fp32 or bf16; w: [ceil(N/ROWS), K/64, ROWS, 32] q4 tiles; scale, zero:
 * [ceil(N/ROWS), K/G, ROWS] fp32 (rows past N: anything finite); y: [M, N] fp32. */
int glmgym_q4_matmul(const void *x, int x_bf16, int64_t M, int64_t K, const uint8_t *w,
                     const float *scale, const float *zero, int64_t N, int64_t G, float *y,
                     int nthreads) {
    if (K % QP || G % QP || K % G) return -2;
    QActs a;
    if (quantize_acts(x, x_bf16, M, K, QP, G, &a, nthreads)) return -1;
    const int64_t ng = K / G;
#define Q4_TILE(m, t, out) q4_tile(&a, m, K, G, w + (t) * (ROWS * K / 2), scale + (t) * ng * ROWS, \
                                  zero + (t) * ng * ROWS, out)
    FOR_TILES(M, N, y, Q4_TILE)
#undef Q4_TILE
    free_acts(&a);
    return 0;
}

/* y[m, n0 .. n0+R) of a q8 weight in rows with one scale per block of QK columns (the INT8
 * lm_head: its rows are the embeddings too, so it is not tiled; four row streams, each prefetched). */
static inline __attribute__((always_inline)) void q8_rows(const QActs *a, int64_t m, int64_t K,
                                                         const int8_t *w, const float *scale, int64_t n0,
                                                         int R, float *y) {
    const __m256i ones = _mm256_set1_epi16(1);
    const int64_t nb = K / QK;
    const int8_t *xq = a->q + m * K;
    const float *xd = a->d + m * nb;
    __m256 acc[ROWS];
    for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        __m256i xv = _mm256_loadu_si256((const __m256i *)(xq + b * QK));
        for (int r = 0; r < R; r++) {
            const int8_t *wr = w + (n0 + r) * K + b * QK;
            if (b % 2 == 0) _mm_prefetch((const char *)(wr + PREFETCH_AHEAD), _MM_HINT_NTA);
            __m256i wv = _mm256_loadu_si256((const __m256i *)wr);
            /* signed x signed through maddubs: |w| as unsigned, the sign moved onto x */
            __m256i p = _mm256_maddubs_epi16(_mm256_sign_epi8(wv, wv), _mm256_sign_epi8(xv, wv));
            p = _mm256_madd_epi16(p, ones);
            /* the weight's block scale is folded into the block's activation scale: one FMA a block
             * (130528x4096 at M = 1: 23 to 26 ms, against 28 to 30 with a sum per group) */
            __m256 d = _mm256_set1_ps(xd[b] * scale[(n0 + r) * nb + b]);
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), d, acc[r]);
        }
    }
    for (int r = 0; r < R; r++) y[r] = hsum8(acc[r]);
}

/* x: [M, K] fp32 or bf16; w: [N, K] int8 rows; scale: [N, K/32] fp32; y: [M, N] fp32. K a multiple
 * of 32. */
int glmgym_q8_matmul(const void *x, int x_bf16, int64_t M, int64_t K, const int8_t *w,
                     const float *scale, int64_t N, float *y, int nthreads) {
    if (K % QK) return -2;
    QActs a;
    if (quantize_acts(x, x_bf16, M, K, QK, K, &a, nthreads)) return -1;
#define Q8_ROW(m, n, R, out) q8_rows(&a, m, K, w, scale, n, R, out)
    FOR_ROW_TILES(M, N, y, Q8_ROW)
#undef Q8_ROW
    free_acts(&a);
    return 0;
}

/* y[m, 4t .. 4t+ROWS) from tile t of a tiled q8 weight (one scale per row): per block of QK
 * columns the ROWS rows' 32 bytes one after the other, so a tile is one contiguous stream, as for
 * q4. Four separate row streams read 28-31 GB/s on a 2-core AVX-512 EPYC where q4's tiles read
 * 47-56 (ChatGLM-6B's INT8 blocks: 180 ms a token against chatglm.cpp q8_0's 195 for everything). */
static inline __attribute__((always_inline)) void q8_tile(const QActs *a, int64_t m, int64_t K,
                                                         const int8_t *w, const float *scale,
                                                         float *y) {
    const __m256i ones = _mm256_set1_epi16(1);
    const int64_t nb = K / QK;
    const int8_t *xq = a->q + m * K;
    const float *xd = a->d + m * nb;
    __m256 acc[ROWS];
    for (int r = 0; r < ROWS; r++) acc[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        __m256i xv = _mm256_loadu_si256((const __m256i *)(xq + b * QK));
        __m256 dx = _mm256_set1_ps(xd[b]);
        const int8_t *wb = w + b * (ROWS * QK); /* ROWS * 32 bytes: two cache lines */
        _mm_prefetch((const char *)(wb + PREFETCH_AHEAD), _MM_HINT_NTA);
        _mm_prefetch((const char *)(wb + PREFETCH_AHEAD + 64), _MM_HINT_NTA);
        for (int r = 0; r < ROWS; r++) {
            __m256i wv = _mm256_loadu_si256((const __m256i *)(wb + r * QK));
            __m256i p = _mm256_maddubs_epi16(_mm256_sign_epi8(wv, wv), _mm256_sign_epi8(xv, wv));
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(p, ones)), dx, acc[r]);
        }
    }
    for (int r = 0; r < ROWS; r++) y[r] = hsum8(acc[r]) * scale[r];
}

/* x: [M, K] fp32 or bf16; w: [ceil(N/ROWS), K/32, ROWS, 32] int8 tiles; scale: [ceil(N/ROWS) * ROWS]
 * fp32, one per row (rows past N: anything finite); y: [M, N] fp32. K a multiple of 32. */
int glmgym_q8t_matmul(const void *x, int x_bf16, int64_t M, int64_t K, const int8_t *w,
                      const float *scale, int64_t N, float *y, int nthreads) {
    if (K % QK) return -2;
    QActs a;
    if (quantize_acts(x, x_bf16, M, K, QK, K, &a, nthreads)) return -1;
#define Q8_TILE(m, t, out) q8_tile(&a, m, K, w + (t) * (ROWS * K), scale + (t) * ROWS, out)
    FOR_TILES(M, N, y, Q8_TILE)
#undef Q8_TILE
    free_acts(&a);
    return 0;
}

static inline __attribute__((always_inline)) void bf16_rows(const float *x, int64_t K,
                                                           const uint16_t *w, int R, float *y) {
    __m256 acc[ROWS];
    for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();
    for (int64_t k = 0; k < K; k += 8) {
        __m256 xv = _mm256_loadu_ps(x + k);
        for (int r = 0; r < R; r++) acc[r] = _mm256_fmadd_ps(load_bf16x8(w + r * K + k), xv, acc[r]);
    }
    for (int r = 0; r < R; r++) y[r] = hsum8(acc[r]);
}

/* x: [M, K] fp32 (M small); w: [N, K] bf16; y: [M, N] fp32. K a multiple of 8. */
int glmgym_bf16_matmul(const float *x, int64_t M, int64_t K, const uint16_t *w, int64_t N, float *y,
                       int nthreads) {
    if (K % 8) return -2;
#define BF16_ROW(m, n, R, out) bf16_rows(x + (m) * K, K, w + (n) * K, R, out)
    FOR_ROW_TILES(M, N, y, BF16_ROW)
#undef BF16_ROW
    return 0;
}

/* exp(x) for 8 floats (x <= 0 here: scores minus their maximum): 2^n * p(r) with
 * x = n ln2 + r, |r| <= ln2 / 2, p the degree-6 Taylor polynomial (relative error < 2e-7). Inputs
 * below -87 return 0. */
static inline __m256 exp8(__m256 x) {
    const __m256 lo = _mm256_set1_ps(-87.f);
    __m256 under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
    x = _mm256_max_ps(x, lo);
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    /* r = x - n ln2 in two steps (Cody-Waite) to keep r exact enough */
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.f / 720.f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 120.f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 24.f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 6.f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_andnot_ps(under, _mm256_mul_ps(p, _mm256_castsi256_ps(e)));
}

/* 8 fp32 -> 8 bf16, rounding to nearest even as PyTorch's cast does (a NaN becomes a quiet NaN). */
static inline __m128i bf16x8(__m256 v) {
    __m256i u = _mm256_castps_si256(v);
    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7FFF), lsb)), 16);
    __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), nan);
    /* packus works per 128-bit lane: [r0..3 r0..3 | r4..7 r4..7] -> qwords 0, 2 hold r0..7 */
    __m256i p = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0xD8);
    return _mm256_castsi256_si128(p);
}

/* Attention of one query per (row, head) over a bf16 key/value cache: the decoding step on a CPU
 * without native bf16, where PyTorch's bf16 SDPA runs generic code and converting the cache to
 * fp32 first costs more than reading it. Reads each cached key and value once, in fp32 registers.
 *
 * q: H query heads per row, fp32 or bf16 (q_bf16), element strides (qsb, qsh) for row and head,
 * unit stride over d (the rotary's output, read in place); k, v: bf16 with element strides
 * (sb, sh, ss) for row, head and position (unit stride over d); S cached positions; mask: NULL or uint8 [B, S] (row stride msb), 0 where a position
 * may not be attended; y: [B, H, d], fp32 or bf16 (y_bf16, rounded to nearest even).
 * d a multiple of 8, at most 256. */
int glmgym_attn_decode(const void *q, int q_bf16, int64_t qsb, int64_t qsh, const uint16_t *k,
                       const uint16_t *v, int64_t B, int64_t H, int64_t S, int64_t d,
                       int64_t sb, int64_t sh, int64_t ss, const uint8_t *mask, int64_t msb, float scale,
                       void *y, int y_bf16, int nthreads) {
    if (d % 8 || d > 256 || S < 1) return -2;
    int failed = 0;
#pragma omp parallel num_threads(nthreads)
    {
        float *p = (float *)aligned_alloc(32, sizeof(float) * ((S + 7) / 8) * 8);
        if (!p) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t bh = 0; bh < B * H; bh++) {
            if (!p) continue;
            const int64_t b = bh / H, h = bh % H;
            float qv[256], out[256];
            if (q_bf16) {
                const uint16_t *qb = (const uint16_t *)q + b * qsb + h * qsh;
                for (int64_t i = 0; i < d; i += 8) _mm256_storeu_ps(qv + i, load_bf16x8(qb + i));
            } else {
                memcpy(qv, (const float *)q + b * qsb + h * qsh, sizeof(float) * d);
            }
            const uint16_t *kb = k + b * sb + h * sh, *vb = v + b * sb + h * sh;
            const uint8_t *mb = mask ? mask + b * msb : NULL;
            /* scores: q . k_j * scale, -inf where masked */
            float smax = -INFINITY;
            for (int64_t j = 0; j < S; j++) {
                if (mb && !mb[j]) {
                    p[j] = -INFINITY;
                    continue;
                }
                const uint16_t *kj = kb + j * ss;
                __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
                int64_t i = 0;
                for (; i + 16 <= d; i += 16) {
                    a0 = _mm256_fmadd_ps(load_bf16x8(kj + i), _mm256_loadu_ps(qv + i), a0);
                    a1 = _mm256_fmadd_ps(load_bf16x8(kj + i + 8), _mm256_loadu_ps(qv + i + 8), a1);
                }
                if (i < d) a0 = _mm256_fmadd_ps(load_bf16x8(kj + i), _mm256_loadu_ps(qv + i), a0);
                float s = hsum8(_mm256_add_ps(a0, a1)) * scale;
                p[j] = s;
                smax = s > smax ? s : smax;
            }
            /* softmax weights, 8 at a time (the buffer's tail past S is padding) */
            const int64_t S8 = (S + 7) / 8 * 8;
            for (int64_t j = S; j < S8; j++) p[j] = -INFINITY;
            __m256 vsum = _mm256_setzero_ps(), vmax = _mm256_set1_ps(smax);
            for (int64_t j = 0; j < S8; j += 8) {
                __m256 e = exp8(_mm256_sub_ps(_mm256_load_ps(p + j), vmax));
                _mm256_store_ps(p + j, e);
                vsum = _mm256_add_ps(vsum, e);
            }
            float inv = 1.f / hsum8(vsum);
            /* y = sum_j p_j v_j, the accumulators in registers per 64-wide slice of d */
            for (int64_t i0 = 0; i0 < d; i0 += 64) {
                const int64_t w = d - i0 < 64 ? d - i0 : 64;
                __m256 acc[8];
                for (int c = 0; c < 8; c++) acc[c] = _mm256_setzero_ps();
                for (int64_t j = 0; j < S; j++) {
                    if (p[j] == 0.f) continue;
                    const __m256 pj = _mm256_set1_ps(p[j]);
                    const uint16_t *vj = vb + j * ss + i0;
                    for (int c = 0; c < w / 8; c++) acc[c] = _mm256_fmadd_ps(load_bf16x8(vj + 8 * c), pj, acc[c]);
                }
                for (int c = 0; c < w / 8; c++)
                    _mm256_storeu_ps(out + i0 + 8 * c, _mm256_mul_ps(acc[c], _mm256_set1_ps(inv)));
            }
            if (y_bf16) {
                for (int64_t i = 0; i < d; i += 8)
                    _mm_storeu_si128((__m128i *)((uint16_t *)y + bh * d + i), bf16x8(_mm256_loadu_ps(out + i)));
            } else {
                memcpy((float *)y + bh * d, out, sizeof(float) * d);
            }
        }
        free(p);
    }
    return failed ? -1 : 0;
}


#define EPI_BLOCK 1024 /* columns per unit of work: rows of one token split over the threads too */

/* The epilogue of a quantized linear layer, in one pass over its fp32 output y [M, N]: add the bias
 * (NULL: none; fp32, or bf16 when bias_bf16: the layer's own bias, not a per-call fp32 copy), apply
 * the tanh-approximated GELU when act = 1, and write fp32 (out_bf16 = 0, may be y itself) or bf16. Instead of three PyTorch ops on bf16 tensors (cast, add, GELU; PyTorch's tanh
 * runs about 5 ns an element on AVX2) it is one read of y.
 * GELU as x * sigmoid(2u), u = sqrt(2/pi) (x + 0.044715 x^3): the same function as
 * 0.5 x (1 + tanh(u)), without the cancellation of 1 + tanh(u) for negative u. */
int glmgym_epilogue(const float *y, int64_t M, int64_t N, const void *bias, int bias_bf16, int act,
                    int out_bf16, void *out, int nthreads) {
    const __m256 c0 = _mm256_set1_ps(-2.f * 0.7978845608028654f), c1 = _mm256_set1_ps(0.044715f);
    const __m256 one = _mm256_set1_ps(1.f), cap = _mm256_set1_ps(80.f);
    const int64_t nblocks = (N + EPI_BLOCK - 1) / EPI_BLOCK;
#pragma omp parallel for num_threads(nthreads) schedule(static) if (M * N >= 8192)
    for (int64_t job = 0; job < M * nblocks; job++) {
        const int64_t m = job / nblocks, n0 = (job % nblocks) * EPI_BLOCK;
        const int64_t n1 = n0 + EPI_BLOCK < N ? n0 + EPI_BLOCK : N;
        const float *ym = y + m * N;
        float buf[8];
        for (int64_t n = n0; n < n1; n += 8) {
            const int64_t w = n1 - n < 8 ? n1 - n : 8;
            __m256 v;
            if (w == 8) {
                v = _mm256_loadu_ps(ym + n);
                if (bias)
                    v = _mm256_add_ps(v, bias_bf16 ? load_bf16x8((const uint16_t *)bias + n)
                                                   : _mm256_loadu_ps((const float *)bias + n));
            } else {
                for (int i = 0; i < 8; i++) {
                    float bi = !bias || i >= w ? 0.f
                               : bias_bf16 ? bf16_to_f32(((const uint16_t *)bias)[n + i])
                                           : ((const float *)bias)[n + i];
                    buf[i] = i < w ? ym[n + i] + bi : 0.f;
                }
                v = _mm256_loadu_ps(buf);
            }
            if (act == 1) {
                /* -2u = -2 sqrt(2/pi) x (1 + 0.044715 x^2), capped so that exp stays finite */
                __m256 t = _mm256_mul_ps(_mm256_mul_ps(c0, v), _mm256_fmadd_ps(_mm256_mul_ps(v, v), c1, one));
                v = _mm256_div_ps(v, _mm256_add_ps(one, exp8(_mm256_min_ps(t, cap))));
            }
            if (out_bf16) {
                uint16_t *o = (uint16_t *)out + m * N + n;
                if (w == 8) {
                    _mm_storeu_si128((__m128i *)o, bf16x8(v));
                } else {
                    uint16_t tmp[8];
                    _mm_storeu_si128((__m128i *)tmp, bf16x8(v));
                    memcpy(o, tmp, (size_t)w * 2);
                }
            } else {
                float *o = (float *)out + m * N + n;
                if (w == 8) {
                    _mm256_storeu_ps(o, v);
                } else {
                    _mm256_storeu_ps(buf, v);
                    memcpy(o, buf, (size_t)w * 4);
                }
            }
        }
    }
    return 0;
}
