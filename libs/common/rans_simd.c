/* The hot loops of rans.py's coder, vectorized: 64 rANS states per row, 16 to an AVX-512 vector
 * or 8 to an AVX2 one.
 *
 * rans.py holds the format and numba twins of these functions that write and read exactly the same
 * words (the fallback, and the reference the tests compare with). Here:
 *   - a row of n tokens is cut into blocks of 64; lane l of a block codes its token l, so a vector
 *     step loads and stores neighbouring tokens and looks them all up in the row's one table;
 *   - the decoder decodes every lane of a block, then renormalises the lanes in order, reading
 *     their words in lane order; the encoder runs the blocks and lanes backwards;
 *   - 32-bit states in [2^15, 2^31), 16-bit renormalisation, probabilities to 2^11, the encoder's
 *     division by an exact reciprocal (Alverson's method; frequency 1 by a special case).
 * AVX-512 F/BW/VL/DQ (Skylake-SP and later, Zen 4) compresses and expands the flushed lanes in
 * registers: Zen 4 microcodes the memory forms, so words go through plain unaligned loads and
 * stores. AVX2 (Haswell and later, Zen 1-3) does the same with permutations from lookup tables.
 * native.py builds the .so (with transform_simd.c) on first use; each kernel carries its own target
 * attribute, so the library loads on any x86-64, `rans_simd_level` says which kernels this CPU runs,
 * and the exported functions take the level to use.
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
#define LANES 64
#define SETS (LANES / 16)  /* AVX-512 vectors per block */
#define HALVES (LANES / 8) /* AVX2 vectors per block */
#define AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,popcnt")))
#define AVX2 __attribute__((target("avx2,popcnt")))

/* 2: AVX-512 kernels, 1: AVX2 kernels, 0: neither (use the numba path). */
int rans_simd_level(void) {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
        return 2;
    return __builtin_cpu_supports("avx2") ? 1 : 0;
}

/* RIGHT[c][j]: word j of a 16-word store takes compressed word j - (16 - c), so the c words of a
 * compressed set land at the top of the store. */
static uint16_t RIGHT[17][16];
/* AVX2, per 8-lane mask m: TOP[m] moves the lanes of m, in order, to the top of the vector;
 * SPREAD[m][j] = the rank of lane j among the lanes of m (word j of an expand). */
static int32_t TOP[256][8], SPREAD[256][8];
/* Per frequency f of a symbol: its encoder entry's reciprocal, bias addend and high bits. f >= 2:
 * ceil(2^(31 + lg) / f) with lg = ceil(log2 f) (the exact division by f), 0, (M - f) << 12 |
 * (lg - 1) << 23. f = 1: q = x by mulhi(x, 2^32 - 1) = x - 1, the bias takes the difference. */
#define TAB 256
static uint32_t FREQ_ENTRY[PROB_SCALE + 1][3];
__attribute__((constructor)) static void init_tables(void) {
    FREQ_ENTRY[1][0] = 0xFFFFFFFFu;
    FREQ_ENTRY[1][1] = PROB_SCALE - 1;
    FREQ_ENTRY[1][2] = (uint32_t)(PROB_SCALE - 1) << 12;
    for (uint32_t f = 2; f <= PROB_SCALE; f++) {
        uint32_t lg = 32 - (uint32_t)__builtin_clz(f - 1); /* ceil(log2 f) */
        FREQ_ENTRY[f][0] = (uint32_t)(((1ull << (31 + lg)) + f - 1) / f);
        FREQ_ENTRY[f][2] = (PROB_SCALE - f) << 12 | (lg - 1) << 23;
    }
    for (int c = 0; c <= 16; c++)
        for (int j = 0; j < 16; j++) RIGHT[c][j] = (uint16_t)((j - (16 - c)) & 15);
    for (int m = 0; m < 256; m++) {
        int c = __builtin_popcount((unsigned)m), rank = 0;
        for (int j = 0; j < 8; j++) TOP[m][j] = 0;
        for (int j = 0; j < 8; j++)
            if (m >> j & 1) {
                TOP[m][8 - c + rank] = j;
                SPREAD[m][j] = rank++;
            } else {
                SPREAD[m][j] = 0;
            }
    }
}

static inline __mmask16 active(int64_t left) {
    return left >= 16 ? (__mmask16)0xFFFF : left <= 0 ? (__mmask16)0 : (__mmask16)((1u << left) - 1);
}

/* rans._quant_v: 1 + round(2 log2 c) as the bit length of floor(c^2 sqrt 2), capped at VMAX. */
static inline uint8_t quant_v(uint64_t c) {
    if (c == 0) return 0;
    double fc = (double)c, d = floor(fc * fc * 1.4142135623730951); /* >= 1: a normal double */
    uint64_t bits;
    memcpy(&bits, &d, sizeof bits);
    int e = (int)(bits >> 52 & 0x7FF) - 1022; /* frexp's exponent, without the library call */
    return (uint8_t)(e < VMAX ? e : VMAX);
}

AVX512 static void min_max_512(const int32_t *row, int64_t n, int32_t *lo, int32_t *hi) {
    __m512i mn = _mm512_set1_epi32(INT32_MAX), mx = _mm512_set1_epi32(INT32_MIN);
    for (int64_t t = 0; t < n; t += 16) {
        __mmask16 act = active(n - t);
        __m512i x = _mm512_maskz_loadu_epi32(act, row + t);
        mn = _mm512_mask_min_epi32(mn, act, mn, x);
        mx = _mm512_mask_max_epi32(mx, act, mx, x);
    }
    *lo = _mm512_reduce_min_epi32(mn);
    *hi = _mm512_reduce_max_epi32(mx);
}

AVX2 static inline int32_t reduce_256(__m256i x, int max) { /* the extreme of 8 lanes */
    __m128i h = _mm_max_epi32(_mm256_castsi256_si128(x), _mm256_extracti128_si256(x, 1));
    __m128i l = _mm_min_epi32(_mm256_castsi256_si128(x), _mm256_extracti128_si256(x, 1));
    __m128i y = max ? h : l;
    __m128i z = _mm_shuffle_epi32(y, 0x4E);
    y = max ? _mm_max_epi32(y, z) : _mm_min_epi32(y, z);
    z = _mm_shuffle_epi32(y, 0xB1);
    y = max ? _mm_max_epi32(y, z) : _mm_min_epi32(y, z);
    return _mm_cvtsi128_si32(y);
}

/* The reductions stay in registers: extracting them through arrays made the compiler keep the
 * accumulators on the stack, a store-to-load chain per vector. */
AVX2 static void min_max_256(const int32_t *row, int64_t n, int32_t *lo, int32_t *hi) {
    __m256i mn = _mm256_set1_epi32(INT32_MAX), mx = _mm256_set1_epi32(INT32_MIN);
    int64_t t = 0;
    for (; t + 8 <= n; t += 8) {
        __m256i x = _mm256_loadu_si256((const __m256i *)(row + t));
        mn = _mm256_min_epi32(mn, x);
        mx = _mm256_max_epi32(mx, x);
    }
    int32_t a = reduce_256(mn, 0), b = reduce_256(mx, 1);
    for (; t < n; t++) {
        a = row[t] < a ? row[t] : a;
        b = row[t] > b ? row[t] : b;
    }
    *lo = a;
    *hi = b;
}

/* rans._row_stats for the rows no wider than a window (the others, done[r] = 0, are left to it):
 * lo[r] = the row's smallest value, k[r] = its span, v[256 r + i] = quant_v(count of lo + i).
 * Returns how many rows were left. */
int64_t rans_simd_row_stats(int level, const int32_t *sym, int64_t rows, int64_t n, int32_t *lo, int32_t *k,
                            uint8_t *v, uint8_t *done) {
    uint32_t h[4][KMAX];
    int64_t left = 0;
    for (int64_t r = 0; r < rows; r++) {
        const int32_t *row = sym + r * n;
        int32_t a, b;
        if (level >= 2)
            min_max_512(row, n, &a, &b);
        else
            min_max_256(row, n, &a, &b);
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

/* A row's encoder table from its table values v[0..ke) (rans._build_freq, then the numba path's
 * _enc_table): frequencies summing to PROB_SCALE (weights W[v], every present symbol at least 1, the
 * rounding remainder to the first most probable one), the same integer arithmetic, so the same
 * table. Per symbol index i: tab[i] = reciprocal, tab[TAB + i] = bias | (M - f) << 12 | shift << 23.
 * Branch-free (absent and rare symbols come in no pattern), with the per-frequency parts from
 * FREQ_ENTRY. */
static void row_table(const uint8_t *v, int64_t ke, const int64_t *W, uint32_t *tab) {
    int32_t freq[256];
    int64_t total = 0, present = 0;
    for (int64_t i = 0; i < ke; i++) {
        total += W[v[i]]; /* W[0] = 0 */
        present += v[i] != 0;
    }
    if (!present) return; /* an empty row codes nothing */
    int64_t avail = PROB_SCALE - present, s = 0, best = 0, bestf = -1;
    double inv = 1.0 / (double)total;
    for (int64_t i = 0; i < ke; i++) {
        /* floor(W avail / total): a reciprocal estimate (W avail < 2^51 is exact in a double, the
         * estimate off by at most one) settled by an integer check */
        int64_t a = W[v[i]] * avail, q = (int64_t)((double)a * inv);
        q += ((q + 1) * total <= a) - (q * total > a);
        int64_t f = (v[i] != 0) * (1 + q);
        freq[i] = (int32_t)f;
        s += f;
        int more = f > bestf;
        bestf = more ? f : bestf;
        best = more ? i : best;
    }
    freq[best] += (int32_t)(PROB_SCALE - s);
    for (int64_t i = 0, c = 0; i < ke; c += freq[i], i++) {
        const uint32_t *e = FREQ_ENTRY[freq[i]];
        tab[i] = e[0];
        tab[TAB + i] = ((uint32_t)c + e[1]) | e[2];
    }
}

/* Where a block's words start: in place, or near the end (a block reads at most LANES words) in a
 * zero-padded copy. */
static inline const uint8_t *block_words(const uint8_t *words, int64_t nwords, int64_t p, uint8_t *tail) {
    if (p + LANES <= nwords) return words + 2 * p;
    memset(tail, 0, 2 * 2 * LANES);
    memcpy(tail, words + 2 * p, (size_t)(2 * (nwords - p)));
    return tail;
}

/* ------------------------------------------------------------------ AVX-512: 4 vectors of 16 lanes */

/* tab[idx] for a row whose table has at most 16 * regs entries, held in regs vectors t: one or two
 * permutes (a gather, the slow part of encoding, for wider tables: regs 0). */
#define INLINE __attribute__((always_inline)) inline
AVX512 static INLINE __m512i lookup_16(__m512i idx, const __m512i *t, int regs, const uint32_t *tab) {
    if (regs == 1) return _mm512_permutexvar_epi32(idx, t[0]);
    if (regs == 2) return _mm512_permutex2var_epi32(t[0], idx, t[1]);
    if (regs == 4 || regs == 8) {
        __m512i a = _mm512_permutex2var_epi32(t[0], idx, t[1]), b = _mm512_permutex2var_epi32(t[2], idx, t[3]);
        a = _mm512_mask_blend_epi32(_mm512_test_epi32_mask(idx, _mm512_set1_epi32(32)), a, b);
        if (regs == 4) return a;
        __m512i c = _mm512_permutex2var_epi32(t[4], idx, t[5]), d = _mm512_permutex2var_epi32(t[6], idx, t[7]);
        c = _mm512_mask_blend_epi32(_mm512_test_epi32_mask(idx, _mm512_set1_epi32(32)), c, d);
        return _mm512_mask_blend_epi32(_mm512_test_epi32_mask(idx, _mm512_set1_epi32(64)), a, c);
    }
    return _mm512_i32gather_epi32(idx, (const void *)tab, 4);
}

AVX512 static INLINE __m512i encode_16(__m512i x, __mmask16 act, const int32_t *sym, __m512i lo, __m512i k,
                                       const __m512i *trcp, const __m512i *te, int regs, const uint32_t *tab,
                                       uint16_t *out, int64_t *p) {
    const __m512i m11 = _mm512_set1_epi32(0x7FF), m12 = _mm512_set1_epi32(0xFFF);
    __m512i s = _mm512_maskz_loadu_epi32(act, sym);
    /* out-of-window values wrap to huge unsigned offsets: one min maps them to the escape k */
    __m512i idx = _mm512_min_epu32(_mm512_sub_epi32(s, lo), k);
    __m512i rcp = lookup_16(idx, trcp, regs, tab);
    __m512i e = lookup_16(idx, te, regs, tab + TAB);
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

AVX512 static INLINE int64_t encode_row_16(uint32_t *states, const int32_t *row, int64_t n, int32_t lo, int32_t k,
                                           const uint32_t *tab, int regs, uint16_t *out, int64_t p) {
    __m512i x[SETS], vlo = _mm512_set1_epi32(lo), vk = _mm512_set1_epi32(k), trcp[8], te[8];
    for (int j = 0; j < regs; j++) {
        trcp[j] = _mm512_loadu_si512(tab + 16 * j);
        te[j] = _mm512_loadu_si512(tab + TAB + 16 * j);
    }
    for (int i = 0; i < SETS; i++) x[i] = _mm512_loadu_si512(states + 16 * i);
    for (int64_t t0 = (n - 1) / LANES * LANES; t0 >= 0; t0 -= LANES)
        for (int i = SETS - 1; i >= 0; i--)
            x[i] = encode_16(x[i], active(n - t0 - 16 * i), row + t0 + 16 * i, vlo, vk, trcp, te, regs, tab, out, &p);
    for (int i = 0; i < SETS; i++) _mm512_storeu_si512(states + 16 * i, x[i]);
    return p;
}

/* One instance per table size, so each holds its table in registers. */
AVX512 static int64_t encode_row_512(uint32_t *states, const int32_t *row, int64_t n, int32_t lo, int32_t k,
                                     const uint32_t *tab, uint16_t *out, int64_t p) {
    if (k < 16) return encode_row_16(states, row, n, lo, k, tab, 1, out, p);
    if (k < 32) return encode_row_16(states, row, n, lo, k, tab, 2, out, p);
    if (k < 64) return encode_row_16(states, row, n, lo, k, tab, 4, out, p);
    if (k < 128) return encode_row_16(states, row, n, lo, k, tab, 8, out, p);
    return encode_row_16(states, row, n, lo, k, tab, 0, out, p);
}

/* slot -> symbol << 23 | freq << 11 | slot - cum, for symbol indices 0..ke-1: each symbol's slots in
 * masked 16-wide stores (most symbols have few slots; a scalar fill cost a third of the decoding) */
AVX512 static void decoder_table_512(const int16_t *freq, const int16_t *cum, int64_t ke, uint32_t *dtab) {
    const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    for (int32_t s = 0; s < ke; s++) {
        __m512i e = _mm512_add_epi32(_mm512_set1_epi32(s << 23 | freq[s] << PROB_BITS), lane);
        for (int32_t j = 0; j < freq[s]; j += 16, e = _mm512_add_epi32(e, _mm512_set1_epi32(16)))
            _mm512_mask_storeu_epi32(dtab + cum[s] + j, active(freq[s] - j), e);
    }
}

AVX512 static int64_t decode_row_512(uint32_t *states, int32_t *row, int64_t n, int32_t lo, const int16_t *freq,
                                     const int16_t *cum, int64_t ke, uint32_t *dtab, const uint8_t *words,
                                     int64_t nwords, int64_t p) {
    decoder_table_512(freq, cum, ke, dtab); /* built just before its row: it stays in L1 for the gathers */
    const __m512i m11 = _mm512_set1_epi32(0x7FF), m12 = _mm512_set1_epi32(0xFFF), vlo = _mm512_set1_epi32(lo);
    uint8_t tail[2 * 2 * LANES];
    __m512i x[SETS], sym[SETS];
    __mmask16 act[SETS];
    for (int i = 0; i < SETS; i++) x[i] = _mm512_loadu_si512(states + 16 * i);
    for (int64_t t0 = 0; t0 < n; t0 += LANES) {
        if (p > nwords) return -1;
        const uint8_t *src = block_words(words, nwords, p, tail);
        for (int i = 0; i < SETS; i++) { /* the four chains' table lookups overlap */
            act[i] = active(n - t0 - 16 * i);
            __m512i e = _mm512_i32gather_epi32(_mm512_and_si512(x[i], m11), (const void *)dtab, 4);
            __m512i f = _mm512_and_si512(_mm512_srli_epi32(e, PROB_BITS), m12);
            __m512i nx = _mm512_add_epi32(_mm512_mullo_epi32(f, _mm512_srli_epi32(x[i], PROB_BITS)),
                                          _mm512_and_si512(e, m11));
            sym[i] = _mm512_srli_epi32(e, 23);
            x[i] = _mm512_mask_mov_epi32(x[i], act[i], nx);
        }
        for (int i = 0; i < SETS; i++) {
            __mmask16 fill = _mm512_mask_cmplt_epu32_mask(act[i], x[i], _mm512_set1_epi32(RANS_L));
            __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)src));
            src += 2 * __builtin_popcount(fill);
            p += __builtin_popcount(fill);
            x[i] = _mm512_mask_or_epi32(x[i], fill, _mm512_slli_epi32(x[i], 16), _mm512_maskz_expand_epi32(fill, w));
            _mm512_mask_storeu_epi32(row + t0 + 16 * i, act[i], _mm512_add_epi32(sym[i], vlo));
        }
    }
    for (int i = 0; i < SETS; i++) _mm512_storeu_si512(states + 16 * i, x[i]);
    return p;
}

/* ------------------------------------------------------------------ AVX2: 8 vectors of 8 lanes */

AVX2 static inline __m256i active_8(int64_t left) {
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    return _mm256_cmpgt_epi32(_mm256_set1_epi32((int32_t)(left < 0 ? 0 : left > 8 ? 8 : left)), lane);
}

AVX2 static inline int lanes_of(__m256i m) { return _mm256_movemask_ps(_mm256_castsi256_ps(m)); }

/* tab[idx] for a row whose table has at most 8 * regs entries, held in regs vectors t: permutes
 * merged on the index's bits 3 and 4 (a gather for wider tables: regs 0) */
AVX2 static INLINE __m256i pick_8(__m256i a, __m256i b, __m256i idx, int bit) {
    return _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(a), _mm256_castsi256_ps(b),
                                                 _mm256_castsi256_ps(_mm256_slli_epi32(idx, 31 - bit))));
}

AVX2 static INLINE __m256i lookup_8(__m256i idx, const __m256i *t, int regs, const uint32_t *tab) {
    if (regs == 1) return _mm256_permutevar8x32_epi32(t[0], idx);
    if (regs == 2 || regs == 4) {
        __m256i a = pick_8(_mm256_permutevar8x32_epi32(t[0], idx), _mm256_permutevar8x32_epi32(t[1], idx), idx, 3);
        if (regs == 2) return a;
        __m256i b = pick_8(_mm256_permutevar8x32_epi32(t[2], idx), _mm256_permutevar8x32_epi32(t[3], idx), idx, 3);
        return pick_8(a, b, idx, 4);
    }
    if (regs == 8) {
        __m256i a = pick_8(_mm256_permutevar8x32_epi32(t[0], idx), _mm256_permutevar8x32_epi32(t[1], idx), idx, 3);
        __m256i b = pick_8(_mm256_permutevar8x32_epi32(t[2], idx), _mm256_permutevar8x32_epi32(t[3], idx), idx, 3);
        __m256i c = pick_8(_mm256_permutevar8x32_epi32(t[4], idx), _mm256_permutevar8x32_epi32(t[5], idx), idx, 3);
        __m256i d = pick_8(_mm256_permutevar8x32_epi32(t[6], idx), _mm256_permutevar8x32_epi32(t[7], idx), idx, 3);
        return pick_8(pick_8(a, b, idx, 4), pick_8(c, d, idx, 4), idx, 5);
    }
    return _mm256_i32gather_epi32((const int *)tab, idx, 4);
}

AVX2 static INLINE __m256i encode_8(__m256i x, int64_t left, const int32_t *sym, __m256i lo, __m256i k,
                                    const __m256i *trcp, const __m256i *te, int regs, const uint32_t *tab,
                                    uint16_t *out, int64_t *p) {
    const __m256i m11 = _mm256_set1_epi32(0x7FF), m12 = _mm256_set1_epi32(0xFFF);
    __m256i act = active_8(left);
    __m256i s = left >= 8 ? _mm256_loadu_si256((const __m256i *)sym) : _mm256_maskload_epi32(sym, act);
    __m256i idx = _mm256_min_epu32(_mm256_sub_epi32(s, lo), k);
    __m256i rcp = lookup_8(idx, trcp, regs, tab);
    __m256i e = lookup_8(idx, te, regs, tab + TAB);
    __m256i cmpl = _mm256_and_si256(_mm256_srli_epi32(e, 12), m11);
    __m256i xmax = _mm256_slli_epi32(_mm256_sub_epi32(_mm256_set1_epi32(PROB_SCALE), cmpl), 31 - PROB_BITS);
    /* x >= xmax as a signed compare: states are below 2^31, and xmax - 1 too (xmax reaches 2^31) */
    __m256i flush = _mm256_and_si256(_mm256_cmpgt_epi32(x, _mm256_sub_epi32(xmax, _mm256_set1_epi32(1))), act);
    int m = lanes_of(flush), c = __builtin_popcount((unsigned)m);
    *p -= c;
    /* the flushed lanes' low halves, moved to the top and narrowed: 8 words, c of them at the top */
    __m256i top = _mm256_permutevar8x32_epi32(x, _mm256_loadu_si256((const __m256i *)TOP[m]));
    __m256i narrow = _mm256_shuffle_epi8(top, _mm256_setr_epi8(0, 1, 4, 5, 8, 9, 12, 13, -1, -1, -1, -1, -1, -1, -1, -1,
                                                               0, 1, 4, 5, 8, 9, 12, 13, -1, -1, -1, -1, -1, -1, -1, -1));
    narrow = _mm256_permute4x64_epi64(narrow, 0x08); /* qwords 0 and 2: the 8 words in the low half */
    _mm_storeu_si128((__m128i *)(out + *p + c - 8), _mm256_castsi256_si128(narrow));
    x = _mm256_blendv_epi8(x, _mm256_srli_epi32(x, 16), flush);
    __m256i even = _mm256_srli_epi64(_mm256_mul_epu32(x, rcp), 32);
    __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(x, 32), _mm256_srli_epi64(rcp, 32));
    __m256i q = _mm256_srlv_epi32(_mm256_blend_epi32(even, odd, 0xAA), _mm256_srli_epi32(e, 23));
    __m256i nx = _mm256_add_epi32(_mm256_add_epi32(x, _mm256_and_si256(e, m12)), _mm256_mullo_epi32(q, cmpl));
    return _mm256_blendv_epi8(x, nx, act);
}

AVX2 static INLINE int64_t encode_row_8(uint32_t *states, const int32_t *row, int64_t n, int32_t lo, int32_t k,
                                        const uint32_t *tab, int regs, uint16_t *out, int64_t p) {
    __m256i x[HALVES], vlo = _mm256_set1_epi32(lo), vk = _mm256_set1_epi32(k), trcp[8], te[8];
    for (int j = 0; j < regs; j++) {
        trcp[j] = _mm256_loadu_si256((const __m256i *)(tab + 8 * j));
        te[j] = _mm256_loadu_si256((const __m256i *)(tab + TAB + 8 * j));
    }
    for (int i = 0; i < HALVES; i++) x[i] = _mm256_loadu_si256((const __m256i *)(states + 8 * i));
    for (int64_t t0 = (n - 1) / LANES * LANES; t0 >= 0; t0 -= LANES)
        for (int i = HALVES - 1; i >= 0; i--)
            x[i] = encode_8(x[i], n - t0 - 8 * i, row + t0 + 8 * i, vlo, vk, trcp, te, regs, tab, out, &p);
    for (int i = 0; i < HALVES; i++) _mm256_storeu_si256((__m256i *)(states + 8 * i), x[i]);
    return p;
}

/* One instance per table size, as for AVX-512. */
AVX2 static int64_t encode_row_256(uint32_t *states, const int32_t *row, int64_t n, int32_t lo, int32_t k,
                                   const uint32_t *tab, uint16_t *out, int64_t p) {
    if (k < 8) return encode_row_8(states, row, n, lo, k, tab, 1, out, p);
    if (k < 16) return encode_row_8(states, row, n, lo, k, tab, 2, out, p);
    if (k < 32) return encode_row_8(states, row, n, lo, k, tab, 4, out, p);
    if (k < 64) return encode_row_8(states, row, n, lo, k, tab, 8, out, p);
    return encode_row_8(states, row, n, lo, k, tab, 0, out, p);
}

/* the plain fill, vectorized by the compiler: AMD microcodes the AVX2 masked store */
AVX2 static void decoder_table_256(const int16_t *freq, const int16_t *cum, int64_t ke, uint32_t *dtab) {
    for (int32_t s = 0; s < ke; s++) {
        uint32_t head = (uint32_t)s << 23 | (uint32_t)freq[s] << PROB_BITS;
        for (int32_t j = 0; j < freq[s]; j++) dtab[cum[s] + j] = head | (uint32_t)j;
    }
}

AVX2 static int64_t decode_row_256(uint32_t *states, int32_t *row, int64_t n, int32_t lo, const int16_t *freq,
                                   const int16_t *cum, int64_t ke, uint32_t *dtab, const uint8_t *words,
                                   int64_t nwords, int64_t p) {
    decoder_table_256(freq, cum, ke, dtab);
    const __m256i m11 = _mm256_set1_epi32(0x7FF), m12 = _mm256_set1_epi32(0xFFF), vlo = _mm256_set1_epi32(lo);
    const __m256i low = _mm256_set1_epi32(RANS_L);
    uint8_t tail[2 * 2 * LANES];
    __m256i x[HALVES], sym[HALVES], act[HALVES];
    for (int i = 0; i < HALVES; i++) x[i] = _mm256_loadu_si256((const __m256i *)(states + 8 * i));
    for (int64_t t0 = 0; t0 < n; t0 += LANES) {
        if (p > nwords) return -1;
        const uint8_t *src = block_words(words, nwords, p, tail);
        for (int i = 0; i < HALVES; i++) {
            act[i] = active_8(n - t0 - 8 * i);
            __m256i e = _mm256_i32gather_epi32((const int *)dtab, _mm256_and_si256(x[i], m11), 4);
            __m256i f = _mm256_and_si256(_mm256_srli_epi32(e, PROB_BITS), m12);
            __m256i nx = _mm256_add_epi32(_mm256_mullo_epi32(f, _mm256_srli_epi32(x[i], PROB_BITS)),
                                          _mm256_and_si256(e, m11));
            sym[i] = _mm256_srli_epi32(e, 23);
            x[i] = _mm256_blendv_epi8(x[i], nx, act[i]);
        }
        for (int i = 0; i < HALVES; i++) {
            __m256i fill = _mm256_and_si256(_mm256_cmpgt_epi32(low, x[i]), act[i]);
            int m = lanes_of(fill);
            __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)src));
            w = _mm256_permutevar8x32_epi32(w, _mm256_loadu_si256((const __m256i *)SPREAD[m]));
            src += 2 * __builtin_popcount((unsigned)m);
            p += __builtin_popcount((unsigned)m);
            x[i] = _mm256_blendv_epi8(x[i], _mm256_or_si256(_mm256_slli_epi32(x[i], 16), w), fill);
            __m256i v = _mm256_add_epi32(sym[i], vlo);
            if (n - t0 - 8 * i >= 8) /* a plain store where it can: AMD microcodes the masked one */
                _mm256_storeu_si256((__m256i *)(row + t0 + 8 * i), v);
            else
                _mm256_maskstore_epi32(row + t0 + 8 * i, act[i], v);
        }
    }
    for (int i = 0; i < HALVES; i++) _mm256_storeu_si256((__m256i *)(states + 8 * i), x[i]);
    return p;
}

/* ------------------------------------------------------------------ the exported drivers */

/* Rows last to first, each row's blocks and lanes last to first, into out[..p) backwards; returns the
 * new p. sym int32 [rows, n]; lo, k: each row's window (k = its escape index); v uint8 [rows, 256]:
 * the table values, esc: 1 where a row has escapes, W: rans._W (the tables are built here, as
 * rans._encode_tables builds them for the numba path); states: LANES uint32, in and out. out must
 * have 16 writable words below the final p. */
int64_t rans_simd_encode_rows(int level, const int32_t *sym, int64_t rows, int64_t n, const int32_t *lo,
                              const int32_t *k, const uint8_t *v, const int64_t *esc, const int64_t *W,
                              uint32_t *states, uint16_t *out, int64_t p) {
    uint32_t tab[2 * TAB] = {0};
    for (int64_t r = rows - 1; r >= 0; r--) {
        row_table(v + 256 * r, (int64_t)k[r] + esc[r], W, tab);
        p = level >= 2 ? encode_row_512(states, sym + r * n, n, lo[r], k[r], tab, out, p)
                       : encode_row_256(states, sym + r * n, n, lo[r], k[r], tab, out, p);
    }
    return p;
}

/* Inverse of rans_simd_encode_rows: rows first to last into out int32 [rows, n] (an escape comes out
 * as lo + k; the caller swaps in the raw values). words: the renormalisation words (bytes, any
 * alignment), nwords of them, read from word p on. Returns the new p, or -1 when a row would read
 * past the end. */
int64_t rans_simd_decode_rows(int level, int32_t *out, int64_t rows, int64_t n, const int32_t *lo, const int32_t *k,
                              const int16_t *freq, const int16_t *cum, uint32_t *states, const uint8_t *words,
                              int64_t nwords, int64_t p) {
    uint32_t dtab[PROB_SCALE];
    for (int64_t r = 0; r < rows && p >= 0; r++) {
        const int16_t *fr = freq + 256 * r, *cu = cum + 256 * r;
        int64_t ke = (int64_t)k[r] + 1;
        p = level >= 2 ? decode_row_512(states, out + r * n, n, lo[r], fr, cu, ke, dtab, words, nwords, p)
                       : decode_row_256(states, out + r * n, n, lo[r], fr, cu, ke, dtab, words, nwords, p);
    }
    return p > nwords ? -1 : p;
}
