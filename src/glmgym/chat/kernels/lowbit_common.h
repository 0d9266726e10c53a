/* What glmgym's two x86 kernel files share (lowbit_avx2.c, lowbit_avx512.c): the weight layouts' constants
 * and the quantization of the activations, so that both products see the same int8 activations. */
#pragma once
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define QK 32 /* INT8: activations quantized per block of 32 */
#define QP 64 /* INT4: columns per 32-byte chunk of codes, and per activation block */
/* Weights are read once per product: they are prefetched this many bytes ahead with the
 * non-temporal hint, so that streaming them does not evict everything else from the caches (the
 * activations, norms, KV cache and the interpreter's own working set, which the small ops between
 * two products then miss). ChatGLM-6B INT4 on a 2-core AVX2 EPYC, 28 decoding layers: 203-233
 * against 231-246 ms; the ops between the products took 23-25 against 32 ms. */
#define PREFETCH_AHEAD 2048

static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* 8 bf16 -> 8 fp32 */
static inline __m256 load_bf16x8(const uint16_t *p) {
    __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}

/* One row of activations -> int8 codes per block of B columns, their scales, and per group the sum
 * of the quantized activations (the zero points multiply it: with the float sum instead, the
 * rounding errors of the code part (codes 0..15, mean 7.5) would no longer cancel against the
 * zero part). */
static void quantize_row(const void *x, int x_bf16, int64_t K, int64_t B, int64_t G, int8_t *q,
                         float *d, float *gsum) {
    /* B is 32 or 64: the block in four or eight vectors of 8, quantized 32 at a time in registers
     * (the same values as a scalar loop: absmax, x * (1 / d) rounded to nearest even, as lrintf) */
    const __m256 sign = _mm256_set1_ps(-0.f);
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    __m256 v[QP / 8];
    for (int64_t g = 0; g < K / G; g++) gsum[g] = 0.f;
    for (int64_t b = 0; b < K / B; b++) {
        __m256 vmax = _mm256_setzero_ps();
        for (int i = 0; i < B / 8; i++) {
            const int64_t k = b * B + 8 * i;
            v[i] = x_bf16 ? load_bf16x8((const uint16_t *)x + k) : _mm256_loadu_ps((const float *)x + k);
            vmax = _mm256_max_ps(vmax, _mm256_andnot_ps(sign, v[i]));
        }
        __m128 m = _mm_max_ps(_mm256_castps256_ps128(vmax), _mm256_extractf128_ps(vmax, 1));
        m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        m = _mm_max_ss(m, _mm_movehdup_ps(m));
        const float scale = _mm_cvtss_f32(m) / 127.f;
        const __m256 inv = _mm256_set1_ps(scale > 0.f ? 1.f / scale : 0.f);
        __m256i sum = _mm256_setzero_si256();
        for (int i = 0; i < B / 8; i += 4) {
            __m256i r[4];
            for (int c = 0; c < 4; c++) {
                r[c] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i + c], inv));
                sum = _mm256_add_epi32(sum, r[c]);
            }
            /* packs work per 128-bit lane: the permute puts the 32 bytes back in column order */
            __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(r[0], r[1]), _mm256_packs_epi32(r[2], r[3]));
            _mm256_storeu_si256((__m256i *)(q + b * B + 8 * i), _mm256_permutevar8x32_epi32(p, order));
        }
        __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1));
        d[b] = scale;
        gsum[b * B / G] += scale * (float)_mm_cvtsi128_si32(s4);
    }
}

typedef struct {
    int8_t *q;    /* [M, K] */
    float *d;     /* [M, K/B] */
    float *gsum;  /* [M, K/G]: sum over the group of d * q */
} QActs;

static int quantize_acts(const void *x, int x_bf16, int64_t M, int64_t K, int64_t B, int64_t G,
                         QActs *a, int nthreads) {
    a->q = (int8_t *)aligned_alloc(64, ((M * K + 63) / 64) * 64);
    a->d = (float *)malloc(sizeof(float) * M * (K / B));
    a->gsum = (float *)malloc(sizeof(float) * M * (K / G));
    if (!a->q || !a->d || !a->gsum) return -1;
    size_t esize = x_bf16 ? 2 : 4;
#pragma omp parallel for num_threads(nthreads) schedule(static) if (M > 1)
    for (int64_t m = 0; m < M; m++)
        quantize_row((const char *)x + m * K * esize, x_bf16, K, B, G, a->q + m * K, a->d + m * (K / B),
                     a->gsum + m * (K / G));
    return 0;
}

static void free_acts(QActs *a) {
    free(a->q);
    free(a->d);
    free(a->gsum);
}

#define ROWS 4 /* output rows per inner loop: shares each activation block load, more independent FMAs */
