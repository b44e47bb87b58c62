/* int4's work on a stack of KV tensors before the entropy coder (kventropy._transformed_streams):
 * what the numba and torch path does with `_prepare_rows`, `torch.mv` for the tokens' logits,
 * `_exponents`, torch's product with each row's calibrated transform and `_quantize_row`, here in
 * one call (transform_simd_rows) and two passes per row (layer, sequence, head) that keep it in cache.
 *
 * `prepare` undoes RoPE and makes the tokens finite, 16 tokens at a time, and stores them transposed
 * (16 tokens to a vector, channel-major), with each token's logit against the profile's query. The
 * logits become per-token exponents (`token_exponents`, kventropy._exponents' arithmetic). `quantize`
 * multiplies by the matrix T f32 [d, d]: NB blocks of 16 tokens times CH coefficients accumulate in
 * registers (a broadcast of T[k][c] times the tokens' x[.][k]), so the codes int32 [d, n] =
 * rint((x @ T)[t, c] * (inv[c] * tinv[t])) land in the coder's layout (one stream per coefficient),
 * rounded in registers. AVX-512 kernels take 16 tokens to a vector, AVX2 ones 8 (Zen 1-3 GPU hosts);
 * `native` says which run. See transform_simd_fits for d.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq")))
#define AVX2 __attribute__((target("avx2,fma")))
#define CODE_MAX 2147483520.0f /* kventropy._CODE_MAX: |code| stays inside int32 */
#define NB 3                   /* AVX-512: blocks of 16 tokens per pass */
#define CH 8                   /* AVX-512: coefficients per pass, NB x CH = 24 accumulators of 32 registers */
#define NB8 3                  /* AVX2: blocks of 8 tokens per pass */
#define CH8 4                  /* AVX2: coefficients per pass, NB8 x CH8 = 12 accumulators of 16 registers */
#define DMAX 256

/* out[16 i + j] = in[j * ld + i] for 16 x 16 floats (rows >= `rows` read as zeros). */
AVX512 static void transpose_16(const float *in, int64_t ld, int rows, float *out) {
    __m512i r[16], t[16];
    for (int i = 0; i < 16; i++)
        r[i] = i < rows ? _mm512_castps_si512(_mm512_loadu_ps(in + i * ld)) : _mm512_setzero_si512();
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
    for (int i = 0; i < 4; i++) { /* then the 128-bit lanes, in two rounds */
        t[i] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0x88);
        t[i + 4] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0xDD);
        t[i + 8] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0x88);
        t[i + 12] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0xDD);
    }
    for (int i = 0; i < 4; i++) {
        r[i] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0x88);
        r[i + 8] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0xDD);
        r[i + 4] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0x88);
        r[i + 12] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0xDD);
    }
    for (int i = 0; i < 16; i++) _mm512_storeu_si512(out + 16 * i, r[i]);
}

/* NaN as 0, infinities (and anything past it) as the largest fp16: a wire step must stay finite. */
AVX512 static inline __m512 made_finite(__m512 v) {
    v = _mm512_mask_mov_ps(v, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_setzero_ps());
    return _mm512_min_ps(_mm512_max_ps(v, _mm512_set1_ps(-65504.0f)), _mm512_set1_ps(65504.0f));
}

/* Whether these kernels take rows of d channels (with RoPE undone: `rope`); else the caller uses
 * its numba and torch path. */
int transform_simd_fits(int64_t d, int rope) {
    return d > 0 && d <= DMAX && d % (rope ? 32 : 16) == 0;
}

/* One row's tokens x f32 [n, d] -> tiles f32 [ceil(n / 16), d, 16] (tile b holds tokens 16 b ..
 * 16 b + 15, channel-major, zeros past n): RoPE undone when cos and nsin (the sine negated) [n, d / 2]
 * are given, NaN as 0 and infinities as the largest fp16 (kventropy._prepare_rows). With a query
 * [d], also each token's predicted logit x'[t] . query into logit [n]. */
AVX512 static void prepare(const float *x, int64_t n, int64_t d, const float *cos, const float *nsin,
                                   const float *query, float *tiles, float *logit) {
    static _Thread_local float stage[16 * DMAX] __attribute__((aligned(64))); /* 16 tokens, token-major */
    const __m512 zero = _mm512_setzero_ps();
    const int64_t h = d / 2;
    for (int64_t t0 = 0; t0 < n; t0 += 16) {
        int rows = n - t0 < 16 ? (int)(n - t0) : 16;
        for (int j = 0; j < rows; j++) {
            const float *src = x + (t0 + j) * d;
            float *o = stage + j * d;
            if (cos) { /* o[c] = x1 cos - x2 s, o[c + h] = x2 cos + x1 s, s = -sin: HF rotate_half undone */
                const float *ct = cos + (t0 + j) * h, *st = nsin + (t0 + j) * h;
                for (int64_t c = 0; c < h; c += 16) {
                    __m512 x1 = _mm512_loadu_ps(src + c), x2 = _mm512_loadu_ps(src + c + h);
                    __m512 cv = _mm512_loadu_ps(ct + c), sv = _mm512_loadu_ps(st + c);
                    _mm512_store_ps(o + c, made_finite(_mm512_sub_ps(_mm512_mul_ps(x1, cv), _mm512_mul_ps(x2, sv))));
                    _mm512_store_ps(o + c + h, made_finite(_mm512_add_ps(_mm512_mul_ps(x2, cv), _mm512_mul_ps(x1, sv))));
                }
            } else {
                for (int64_t c = 0; c < d; c += 16) _mm512_store_ps(o + c, made_finite(_mm512_loadu_ps(src + c)));
            }
        }
        float *tile = tiles + t0 * d; /* block t0 / 16 */
        for (int64_t k0 = 0; k0 < d; k0 += 16) transpose_16(stage + k0, d, rows, tile + 16 * k0);
        if (query) { /* four sums, so the adds overlap */
            __m512 acc[4] = {zero, zero, zero, zero};
            for (int64_t k = 0; k < d; k += 4)
                for (int i = 0; i < 4; i++)
                    acc[i] = _mm512_fmadd_ps(_mm512_set1_ps(query[k + i]), _mm512_load_ps(tile + 16 * (k + i)), acc[i]);
            __m512 sum = _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
            _mm512_mask_storeu_ps(logit + t0, (__mmask16)((1u << rows) - 1), sum);
        }
    }
}

/* codes int32 [d, n] = rint((x @ T)^T * inv [d] x tinv [n]), clamped to +-CODE_MAX, from the tiles
 * of `prepare` (NB - 1 blocks of finite padding past the last one) and the row's matrix T f32 [d, d].
 * Not inlined: on its own the compiler keeps all 24 accumulators and the tiles in registers. */
AVX512 __attribute__((noinline)) static void quantize(const float *tiles, int64_t n, int64_t d, const float *T,
                                                      const float *inv, const float *tinv, int32_t *codes) {
    const __m512 top = _mm512_set1_ps(CODE_MAX), bottom = _mm512_set1_ps(-CODE_MAX);
    const int64_t block = 16 * d; /* floats per tile */
    for (int64_t t0 = 0; t0 < n; t0 += 16 * NB) {
        __mmask16 act[NB];
        __m512 ti[NB];
        for (int b = 0; b < NB; b++) {
            int64_t left = n - t0 - 16 * b;
            act[b] = (__mmask16)((1u << (left >= 16 ? 16 : left <= 0 ? 0 : left)) - 1);
            ti[b] = _mm512_maskz_loadu_ps(act[b], tinv + t0 + 16 * b);
        }
        const float *x = tiles + t0 * d; /* NB tiles in a row: their lanes past n are masked off */
        for (int64_t c0 = 0; c0 < d; c0 += CH) {
            __m512 acc[NB][CH];
            for (int b = 0; b < NB; b++)
                for (int j = 0; j < CH; j++) acc[b][j] = _mm512_setzero_ps();
            const float *w = T + c0, *xk = x;
            for (int64_t k = 0; k < d; k++, w += d, xk += 16) {
                __m512 xv[NB];
                for (int b = 0; b < NB; b++) xv[b] = _mm512_load_ps(xk + b * block);
                for (int j = 0; j < CH; j++) {
                    __m512 wj = _mm512_set1_ps(w[j]);
                    for (int b = 0; b < NB; b++) acc[b][j] = _mm512_fmadd_ps(wj, xv[b], acc[b][j]);
                }
            }
            for (int j = 0; j < CH; j++) {
                __m512 s = _mm512_set1_ps(inv[c0 + j]);
                for (int b = 0; b < NB; b++) { /* (inv * tinv) first, as the numba path rounds it */
                    __m512 q = _mm512_mul_ps(acc[b][j], _mm512_mul_ps(s, ti[b]));
                    q = _mm512_min_ps(_mm512_max_ps(q, bottom), top); /* cvtps2dq rounds to nearest even: rint */
                    _mm512_mask_storeu_epi32(codes + (c0 + j) * n + t0 + 16 * b, act[b], _mm512_cvtps_epi32(q));
                }
            }
        }
    }
}

/* 2^(-e / 2) as a float, by a table for e in -8..8 (a pow per token cost more than the product) */
static float TOKEN_INV[17];

__attribute__((constructor)) static void init_token_inv(void) {
    for (int i = 0; i < 17; i++) TOKEN_INV[i] = (float)pow(2.0, -(i - 8) / 2.0);
}

static inline float token_inv(int32_t e) {
    return e < -8 || e > 8 ? (float)pow(2.0, -e / 2.0) : TOKEN_INV[e + 8];
}

/* kventropy._exponents for one row: exps = the logits, centred, times -2 alpha / ln 2, rounded (to
 * even) and clamped to +-8, in the same double arithmetic; tinv = 2^(-e / 2) as a float. */
static void token_exponents(const float *logit, int64_t n, double alpha, int32_t *exps, float *tinv) {
    double mean = 0.0, scale = -2.0 * alpha / log(2.0);
    for (int64_t t = 0; t < n; t++) mean += logit[t];
    mean /= (double)(n > 1 ? n : 1);
    for (int64_t t = 0; t < n; t++) {
        double e = rint(((double)logit[t] - mean) * scale);
        exps[t] = (int32_t)(e < -8.0 ? -8.0 : e > 8.0 ? 8.0 : e);
        tinv[t] = token_inv(exps[t]);
    }
}

/* ------------------------------------------------------------------ AVX2: 8 tokens to a vector */

/* out[8 i + j] = in[j * ld + i] for 8 x 8 floats (rows >= `rows` read as zeros). */
AVX2 static void transpose_8(const float *in, int64_t ld, int rows, float *out) {
    __m256 r[8], t[8];
    for (int i = 0; i < 8; i++) r[i] = i < rows ? _mm256_loadu_ps(in + i * ld) : _mm256_setzero_ps();
    for (int i = 0; i < 8; i += 2) {
        t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
        t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int i = 0; i < 8; i += 4) {
        r[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
        r[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
        r[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
        r[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
    }
    for (int i = 0; i < 4; i++) {
        _mm256_storeu_ps(out + 8 * i, _mm256_permute2f128_ps(r[i], r[i + 4], 0x20));
        _mm256_storeu_ps(out + 8 * (i + 4), _mm256_permute2f128_ps(r[i], r[i + 4], 0x31));
    }
}

AVX2 static inline __m256 made_finite_8(__m256 v) {
    v = _mm256_blendv_ps(v, _mm256_setzero_ps(), _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    return _mm256_min_ps(_mm256_max_ps(v, _mm256_set1_ps(-65504.0f)), _mm256_set1_ps(65504.0f));
}

/* `prepare` with 8 tokens to a tile (tile b: tokens 8 b .. 8 b + 7, channel-major). */
AVX2 static void prepare_8(const float *x, int64_t n, int64_t d, const float *cos, const float *nsin,
                           const float *query, float *tiles, float *logit) {
    static _Thread_local float stage[8 * DMAX] __attribute__((aligned(32)));
    const int64_t h = d / 2;
    for (int64_t t0 = 0; t0 < n; t0 += 8) {
        int rows = n - t0 < 8 ? (int)(n - t0) : 8;
        for (int j = 0; j < rows; j++) {
            const float *src = x + (t0 + j) * d;
            float *o = stage + j * d;
            if (cos) {
                const float *ct = cos + (t0 + j) * h, *st = nsin + (t0 + j) * h;
                for (int64_t c = 0; c < h; c += 8) {
                    __m256 x1 = _mm256_loadu_ps(src + c), x2 = _mm256_loadu_ps(src + c + h);
                    __m256 cv = _mm256_loadu_ps(ct + c), sv = _mm256_loadu_ps(st + c);
                    _mm256_store_ps(o + c, made_finite_8(_mm256_sub_ps(_mm256_mul_ps(x1, cv), _mm256_mul_ps(x2, sv))));
                    _mm256_store_ps(o + c + h, made_finite_8(_mm256_add_ps(_mm256_mul_ps(x2, cv), _mm256_mul_ps(x1, sv))));
                }
            } else {
                for (int64_t c = 0; c < d; c += 8) _mm256_store_ps(o + c, made_finite_8(_mm256_loadu_ps(src + c)));
            }
        }
        float *tile = tiles + t0 * d;
        for (int64_t k0 = 0; k0 < d; k0 += 8) transpose_8(stage + k0, d, rows, tile + 8 * k0);
        if (query) {
            __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
            for (int64_t k = 0; k < d; k += 4)
                for (int i = 0; i < 4; i++)
                    acc[i] = _mm256_fmadd_ps(_mm256_set1_ps(query[k + i]), _mm256_load_ps(tile + 8 * (k + i)), acc[i]);
            float sum[8];
            _mm256_storeu_ps(sum, _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
            memcpy(logit + t0, sum, (size_t)rows * sizeof(float));
        }
    }
}

/* `quantize` with 8 tokens to a vector. A block's tail goes through a small buffer: AMD microcodes
 * the AVX2 masked loads and stores. */
AVX2 __attribute__((noinline)) static void quantize_8(const float *tiles, int64_t n, int64_t d, const float *T,
                                                    const float *inv, const float *tinv, int32_t *codes) {
    const __m256 top = _mm256_set1_ps(CODE_MAX), bottom = _mm256_set1_ps(-CODE_MAX);
    const int64_t block = 8 * d;
    for (int64_t t0 = 0; t0 < n; t0 += 8 * NB8) {
        int rows[NB8];
        __m256 ti[NB8];
        for (int b = 0; b < NB8; b++) {
            int64_t left = n - t0 - 8 * b;
            rows[b] = left >= 8 ? 8 : left <= 0 ? 0 : (int)left;
            float part[8] = {0};
            if (rows[b]) memcpy(part, tinv + t0 + 8 * b, (size_t)rows[b] * sizeof(float));
            ti[b] = _mm256_loadu_ps(part);
        }
        const float *x = tiles + t0 * d;
        for (int64_t c0 = 0; c0 < d; c0 += CH8) {
            __m256 acc[NB8][CH8];
            for (int b = 0; b < NB8; b++)
                for (int j = 0; j < CH8; j++) acc[b][j] = _mm256_setzero_ps();
            const float *w = T + c0, *xk = x;
            for (int64_t k = 0; k < d; k++, w += d, xk += 8) {
                __m256 xv[NB8];
                for (int b = 0; b < NB8; b++) xv[b] = _mm256_load_ps(xk + b * block);
                for (int j = 0; j < CH8; j++) {
                    __m256 wj = _mm256_broadcast_ss(w + j);
                    for (int b = 0; b < NB8; b++) acc[b][j] = _mm256_fmadd_ps(wj, xv[b], acc[b][j]);
                }
            }
            for (int j = 0; j < CH8; j++) {
                __m256 s = _mm256_broadcast_ss(inv + c0 + j);
                for (int b = 0; b < NB8; b++) {
                    __m256 q = _mm256_mul_ps(acc[b][j], _mm256_mul_ps(s, ti[b]));
                    __m256i code = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(q, bottom), top));
                    int32_t *to = codes + (c0 + j) * n + t0 + 8 * b;
                    if (rows[b] == 8) {
                        _mm256_storeu_si256((__m256i *)to, code);
                    } else if (rows[b]) {
                        int32_t part[8];
                        _mm256_storeu_si256((__m256i *)part, code);
                        memcpy(to, part, (size_t)rows[b] * sizeof(int32_t));
                    }
                }
            }
        }
    }
}

/* kventropy._split_fine on one row's m codes (m a multiple of 16, as d is): their low 4 bits two to a
 * byte (the even code's in the low nibble), the codes shifted down (arithmetic: floor for negatives).
 * Done here while the row's codes are in cache, not in a pass over the whole stack. A pair of codes
 * is one little-endian 64-bit lane: its bits 0-3 and 32-35 make the byte. */
AVX512 static void split_fine(int32_t *codes, int64_t m, uint8_t *fine) {
    const __m512i low = _mm512_set1_epi64(0x0000000F0000000Fll);
    for (int64_t i = 0; i < m; i += 16) {
        __m512i x = _mm512_loadu_si512(codes + i), v = _mm512_and_si512(x, low);
        _mm_storel_epi64((__m128i *)(fine + i / 2), _mm512_cvtepi64_epi8(_mm512_or_si512(v, _mm512_srli_epi64(v, 28))));
        _mm512_storeu_si512(codes + i, _mm512_srai_epi32(x, 4));
    }
}

AVX2 static void split_fine_8(int32_t *codes, int64_t m, uint8_t *fine) {
    const __m256i low = _mm256_set1_epi64x(0x0000000F0000000Fll), evens = _mm256_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6);
    const __m128i bytes = _mm_setr_epi8(0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1);
    for (int64_t i = 0; i < m; i += 8) {
        __m256i x = _mm256_loadu_si256((const __m256i *)(codes + i)), v = _mm256_and_si256(x, low);
        v = _mm256_permutevar8x32_epi32(_mm256_or_si256(v, _mm256_srli_epi64(v, 28)), evens);
        int32_t four = _mm_cvtsi128_si32(_mm_shuffle_epi8(_mm256_castsi256_si128(v), bytes));
        memcpy(fine + i / 2, &four, sizeof four);
        _mm256_storeu_si256((__m256i *)(codes + i), _mm256_srai_epi32(x, 4));
    }
}

/* ------------------------------------------------------------------ the exported driver */

/* Every row of a stack of p tensors [b, h, s, d], by the AVX-512 (level 2) or AVX2 (level 1)
 * kernels (srcs: their f32 data; strides [p, 4] in floats, each (sequence, head) holding its s
 * tokens as contiguous rows of d) into codes int32
 * [p * b * h, d, n], the tokens after the first k (n = s - k): RoPE undone with cos / nsin [n, d / 2]
 * (or NULL), and per-token steps from a query [p, h, d] (exps [p, b, h, n] written), or from the
 * exponents given in exps (query NULL), or none (both NULL). matrices f32 [p * b * h, d, d], inv f32
 * [p, h, d]. fine (or NULL): the codes' low 4 bits split off into it, uint8 [p * b * h * d * n / 2]
 * (kventropy's fine bits). Returns 0, -1 for a d it does not take, -2 when out of memory. */
int transform_simd_rows(int level, const int64_t *srcs, const int64_t *strides, int64_t p, int64_t b, int64_t h, int64_t s, int64_t k,
                               int64_t d, const float *cos, const float *nsin, const float *query, double alpha,
                               int32_t *exps, const float *matrices, const float *inv, int32_t *codes,
                               uint8_t *fine) {
    if (!transform_simd_fits(d, cos != NULL)) return -1;
    int64_t n = s - k;
    if (n <= 0) return 0;
    /* tiles of 16 (AVX-512) or 8 (AVX2) tokens, and NB - 1 of padding for `quantize` */
    int wide = level >= 2, lanes = wide ? 16 : 8, pad = wide ? NB - 1 : NB8 - 1;
    int64_t used = (n + lanes - 1) / lanes, block = lanes * d;
    float *tiles = aligned_alloc(64, (size_t)((used + pad) * block) * sizeof(float));
    float *logit = malloc((size_t)n * sizeof(float)), *tinv = malloc((size_t)n * sizeof(float));
    if (!tiles || !logit || !tinv) {
        free(tiles), free(logit), free(tinv);
        return -2;
    }
    for (int64_t t = 0; t < n; t++) tinv[t] = 1.0f;
    memset(tiles + used * block, 0, (size_t)(pad * block) * sizeof(float));
    int64_t r = 0;
    for (int64_t i = 0; i < p; i++)
        for (int64_t bi = 0; bi < b; bi++)
            for (int64_t hi = 0; hi < h; hi++, r++) {
                const int64_t *st = strides + 4 * i;
                const float *x = (const float *)(intptr_t)srcs[i] + bi * st[0] + hi * st[1] + k * d;
                const float *q = query ? query + (i * h + hi) * d : NULL;
                int32_t *e = exps ? exps + r * n : NULL;
                if (wide)
                    prepare(x, n, d, cos, nsin, q, tiles, logit);
                else
                    prepare_8(x, n, d, cos, nsin, q, tiles, logit);
                if (q)
                    token_exponents(logit, n, alpha, e, tinv);
                else if (e)
                    for (int64_t t = 0; t < n; t++) tinv[t] = token_inv(e[t]);
                const float *T = matrices + r * d * d, *iv = inv + (i * h + hi) * d;
                if (wide)
                    quantize(tiles, n, d, T, iv, tinv, codes + r * d * n);
                else
                    quantize_8(tiles, n, d, T, iv, tinv, codes + r * d * n);
                if (fine && wide)
                    split_fine(codes + r * d * n, d * n, fine + r * d * n / 2);
                else if (fine)
                    split_fine_8(codes + r * d * n, d * n, fine + r * d * n / 2);
            }
    free(tiles), free(logit), free(tinv);
    return 0;
}
