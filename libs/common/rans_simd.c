/* The data section of rans.py's coder, with AVX-512: 64 rANS states per row, 16 to a vector.
 *
 * rans.py holds the format and a numba implementation of these two functions that writes and reads
 * exactly the same words (the fallback, and the reference the tests compare with). Here:
 *   - a row of n tokens is cut into blocks of 64; state set i (lanes 16i..16i+15) codes tokens
 *     64b + 16i + u of block b, so each vector step loads and stores 16 neighbouring tokens;
 *   - the decoder decodes the four sets of a block, then renormalises them in order, each set
 *     reading its words in lane order; the encoder runs the blocks and sets backwards;
 *   - 32-bit states in [2^15, 2^31), 16-bit renormalisation, probabilities to 2^11, the encoder's
 *     division by an exact reciprocal (Alverson's method; frequency 1 by a special case).
 * Words are compressed and expanded as 32-bit lanes (AVX-512 F: Skylake-SP and later, Zen 4), in
 * registers: Zen 4 microcodes the memory forms, so words go through plain unaligned loads and stores. The .so is built by rans.py on first use; the functions carry
 * their own target attribute, so the library loads on any x86-64 and `rans_simd_supported` says
 * whether they may be called.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#define PROB_BITS 11
#define PROB_SCALE (1 << PROB_BITS)
#define RANS_L (1u << 15)
#define KMAX 254 /* widest row window */
#define VMAX 63
#define SETS 4
#define LANES (16 * SETS)
#define SIMD __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq")))

int rans_simd_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
}

/* RIGHT[c][j]: word j of a 16-word store takes compressed word j - (16 - c), so the c words of a
 * compressed set land at the top of the store. */
static uint16_t RIGHT[17][16];

__attribute__((constructor)) static void init_right(void) {
    for (int c = 0; c <= 16; c++)
        for (int j = 0; j < 16; j++) RIGHT[c][j] = (uint16_t)((j - (16 - c)) & 15);
}

static inline __mmask16 active(int64_t left) {
    return left >= 16 ? (__mmask16)0xFFFF : left <= 0 ? (__mmask16)0 : (__mmask16)((1u << left) - 1);
}

/* rans._quant_v: 1 + round(2 log2 c) as the bit length of floor(c^2 sqrt 2), capped at VMAX. */
static inline uint8_t quant_v(uint64_t c) {
    if (c == 0) return 0;
    double fc = (double)c;
    int e;
    frexp(floor(fc * fc * 1.4142135623730951), &e);
    return (uint8_t)(e < VMAX ? e : VMAX);
}

/* rans._row_stats for the rows no wider than a window (the others, done[r] = 0, are left to it):
 * lo[r] = the row's smallest value, k[r] = its span, v[256 r + i] = quant_v(count of lo + i).
 * Returns how many rows were left. */
SIMD int64_t rans_simd_row_stats(const int32_t *sym, int64_t rows, int64_t n, int32_t *lo, int32_t *k, uint8_t *v,
                                 uint8_t *done) {
    uint32_t h[4][KMAX];
    int64_t left = 0;
    for (int64_t r = 0; r < rows; r++) {
        const int32_t *row = sym + r * n;
        __m512i mn = _mm512_set1_epi32(INT32_MAX), mx = _mm512_set1_epi32(INT32_MIN);
        for (int64_t t = 0; t < n; t += 16) {
            __mmask16 act = active(n - t);
            __m512i x = _mm512_maskz_loadu_epi32(act, row + t);
            mn = _mm512_mask_min_epi32(mn, act, mn, x);
            mx = _mm512_mask_max_epi32(mx, act, mx, x);
        }
        int32_t a = _mm512_reduce_min_epi32(mn), b = _mm512_reduce_max_epi32(mx);
        int64_t span = (int64_t)b - a + 1;
        if (span > KMAX) {
            done[r] = 0;
            left++;
            continue;
        }
        for (int j = 0; j < 4; j++) memset(h[j], 0, (size_t)span * sizeof h[j][0]);
        int64_t t = 0;
        for (; t + 4 <= n; t += 4) { /* four sub-histograms: no store-to-load chain on runs */
            h[0][row[t] - a]++;
            h[1][row[t + 1] - a]++;
            h[2][row[t + 2] - a]++;
            h[3][row[t + 3] - a]++;
        }
        for (; t < n; t++) h[0][row[t] - a]++;
        for (int64_t i = 0; i < span; i++) v[256 * r + i] = quant_v((uint64_t)h[0][i] + h[1][i] + h[2][i] + h[3][i]);
        lo[r] = a;
        k[r] = (int32_t)span;
        done[r] = 1;
    }
    return left;
}

/* Per symbol index i of a row: tab[2i] = reciprocal, tab[2i + 1] = bias | (M - f) << 12 | shift << 23. */
static void encoder_table(const int16_t *freq, const int16_t *cum, int64_t ke, uint32_t *tab) {
    for (int64_t i = 0; i < ke; i++) {
        uint32_t f = (uint32_t)freq[i], c = (uint32_t)cum[i];
        if (f == 0) continue;
        if (f == 1) { /* q = x: mulhi(x, 2^32 - 1) = x - 1, the bias takes the difference */
            tab[2 * i] = 0xFFFFFFFFu;
            tab[2 * i + 1] = (c + PROB_SCALE - 1) | (uint32_t)(PROB_SCALE - 1) << 12;
        } else {
            uint32_t lg = 32 - (uint32_t)__builtin_clz(f - 1); /* ceil(log2 f) */
            tab[2 * i] = (uint32_t)(((1ull << (31 + lg)) + f - 1) / f);
            tab[2 * i + 1] = c | (uint32_t)(PROB_SCALE - f) << 12 | (lg - 1) << 23;
        }
    }
}

SIMD static inline __m512i encode_set(__m512i x, __mmask16 act, const int32_t *sym, __m512i lo, __m512i k,
                                      const uint32_t *tab, uint16_t *out, int64_t *p) {
    const __m512i m11 = _mm512_set1_epi32(0x7FF), m12 = _mm512_set1_epi32(0xFFF);
    __m512i s = _mm512_maskz_loadu_epi32(act, sym);
    /* out-of-window values wrap to huge unsigned offsets: one min maps them to the escape k */
    __m512i i2 = _mm512_slli_epi32(_mm512_min_epu32(_mm512_sub_epi32(s, lo), k), 1);
    __m512i rcp = _mm512_i32gather_epi32(i2, (const void *)tab, 4);
    __m512i e = _mm512_i32gather_epi32(_mm512_add_epi32(i2, _mm512_set1_epi32(1)), (const void *)tab, 4);
    __m512i cmpl = _mm512_and_si512(_mm512_srli_epi32(e, 12), m11);
    __m512i xmax = _mm512_slli_epi32(_mm512_sub_epi32(_mm512_set1_epi32(PROB_SCALE), cmpl), 31 - PROB_BITS);
    __mmask16 flush = _mm512_mask_cmpge_epu32_mask(act, x, xmax);
    int c = __builtin_popcount(flush);
    *p -= c;
    __m256i words = _mm512_cvtepi32_epi16(_mm512_maskz_compress_epi32(flush, x));
    words = _mm256_permutexvar_epi16(_mm256_loadu_si256((const __m256i *)RIGHT[c]), words);
    _mm256_storeu_si256((__m256i *)(out + *p + c - 16), words); /* below *p: not written yet */
    x = _mm512_mask_srli_epi32(x, flush, x, 16);
    __m512i even = _mm512_srli_epi64(_mm512_mul_epu32(x, rcp), 32);
    __m512i odd = _mm512_mul_epu32(_mm512_srli_epi64(x, 32), _mm512_srli_epi64(rcp, 32));
    __m512i q = _mm512_srlv_epi32(_mm512_mask_blend_epi32(0xAAAA, even, odd), _mm512_srli_epi32(e, 23));
    __m512i nx = _mm512_add_epi32(_mm512_add_epi32(x, _mm512_and_si512(e, m12)), _mm512_mullo_epi32(q, cmpl));
    return _mm512_mask_mov_epi32(x, act, nx);
}

/* Rows last to first, each row's blocks last to first, into out[..p) backwards; returns the new p.
 * sym int32 [rows, n]; lo, k: each row's window (k = its escape index); freq, cum int16 [rows, 256];
 * states: LANES uint32, in and out. out must have 16 writable words below the final p. */
SIMD int64_t rans_simd_encode_rows(const int32_t *sym, int64_t rows, int64_t n, const int32_t *lo, const int32_t *k,
                                   const int16_t *freq, const int16_t *cum, uint32_t *states, uint16_t *out,
                                   int64_t p) {
    uint32_t tab[2 * 256];
    __m512i x[SETS];
    for (int i = 0; i < SETS; i++) x[i] = _mm512_loadu_si512(states + 16 * i);
    for (int64_t r = rows - 1; r >= 0; r--) {
        encoder_table(freq + 256 * r, cum + 256 * r, (int64_t)k[r] + 1, tab);
        const int32_t *row = sym + r * n;
        __m512i vlo = _mm512_set1_epi32(lo[r]), vk = _mm512_set1_epi32(k[r]);
        for (int64_t t0 = (n - 1) / LANES * LANES; t0 >= 0; t0 -= LANES)
            for (int i = SETS - 1; i >= 0; i--)
                x[i] = encode_set(x[i], active(n - t0 - 16 * i), row + t0 + 16 * i, vlo, vk, tab, out, &p);
    }
    for (int i = 0; i < SETS; i++) _mm512_storeu_si512(states + 16 * i, x[i]);
    return p;
}

/* One block (LANES tokens from out[0]) from the words at src; returns the words it read. */
SIMD static inline int64_t decode_block(__m512i *x, int32_t *out, int64_t left, __m512i lo, const uint32_t *dtab,
                                        const uint8_t *src) {
    const __m512i m11 = _mm512_set1_epi32(0x7FF), m12 = _mm512_set1_epi32(0xFFF);
    __mmask16 act[SETS];
    __m512i sym[SETS];
    for (int i = 0; i < SETS; i++) {
        act[i] = active(left - 16 * i);
        __m512i e = _mm512_i32gather_epi32(_mm512_and_si512(x[i], m11), (const void *)dtab, 4);
        __m512i f = _mm512_and_si512(_mm512_srli_epi32(e, PROB_BITS), m12);
        __m512i nx = _mm512_add_epi32(_mm512_mullo_epi32(f, _mm512_srli_epi32(x[i], PROB_BITS)),
                                      _mm512_and_si512(e, m11));
        sym[i] = _mm512_srli_epi32(e, 23);
        x[i] = _mm512_mask_mov_epi32(x[i], act[i], nx);
    }
    int64_t used = 0;
    for (int i = 0; i < SETS; i++) {
        __mmask16 fill = _mm512_mask_cmplt_epu32_mask(act[i], x[i], _mm512_set1_epi32(RANS_L));
        __m512i w = _mm512_maskz_expand_epi32(fill, _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(src + 2 * used))));
        used += __builtin_popcount(fill);
        x[i] = _mm512_mask_or_epi32(x[i], fill, _mm512_slli_epi32(x[i], 16), w);
        _mm512_mask_storeu_epi32(out + 16 * i, act[i], _mm512_add_epi32(sym[i], lo));
    }
    return used;
}

/* Inverse of rans_simd_encode_rows: rows first to last into out int32 [rows, n] (an escape comes out
 * as lo + k; the caller swaps in the raw values). words: the renormalisation words (bytes, any
 * alignment), nwords of them, read from word p on. Returns the new p, or -1 when a row would read
 * past the end. */
SIMD int64_t rans_simd_decode_rows(int32_t *out, int64_t rows, int64_t n, const int32_t *lo, const int32_t *k,
                                   const int16_t *freq, const int16_t *cum, uint32_t *states, const uint8_t *words,
                                   int64_t nwords, int64_t p) {
    uint32_t dtab[PROB_SCALE];
    uint8_t tail[2 * 2 * LANES];
    __m512i x[SETS];
    for (int i = 0; i < SETS; i++) x[i] = _mm512_loadu_si512(states + 16 * i);
    for (int64_t r = 0; r < rows; r++) {
        const int16_t *fr = freq + 256 * r, *cu = cum + 256 * r;
        for (int32_t s = 0; s <= k[r]; s++) { /* slot -> symbol << 23 | freq << 11 | slot - cum */
            uint32_t head = (uint32_t)s << 23 | (uint32_t)fr[s] << PROB_BITS;
            for (int32_t j = 0; j < fr[s]; j++) dtab[cu[s] + j] = head | (uint32_t)j;
        }
        __m512i vlo = _mm512_set1_epi32(lo[r]);
        int32_t *row = out + r * n;
        for (int64_t t0 = 0; t0 < n; t0 += LANES) {
            if (p > nwords) return -1;
            const uint8_t *src = words + 2 * p;
            if (p + LANES > nwords) { /* a block reads at most LANES words: near the end, from a padded copy */
                memset(tail, 0, sizeof tail);
                memcpy(tail, src, (size_t)(2 * (nwords - p)));
                src = tail;
            }
            p += decode_block(x, row + t0, n - t0, vlo, dtab, src);
        }
    }
    for (int i = 0; i < SETS; i++) _mm512_storeu_si512(states + 16 * i, x[i]);
    return p > nwords ? -1 : p;
}
