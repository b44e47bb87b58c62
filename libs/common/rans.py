"""Lossless rANS coding of many short streams of small integers (quantized KV-cache codes).

`symbols` is int32 [streams, n]: one row per channel of one attention head, each row with its own
roughly Laplacian distribution. Each row gets a static table. 64 rANS states code every row in
turn: state l codes the row's tokens l, l + 64, l + 128, ... So a vector of 16 states loads and
stores 16 neighbouring tokens and looks them up in one table. The decoder has 64 independent
chains (4 vectors of 16 with AVX-512, 8 of 8 with AVX2). The states run on from one row to the next, and their final
values are stored once per buffer.

The data words and the rows' statistics are coded by `rans_simd.c` (AVX-512 or AVX2 kernels, built
on first use by `native`) where this CPU and a C compiler allow, and otherwise by numba twins here
(`_encode_rows`, `_decode_rows`, `_row_stats`). Every path writes and reads the same words.

Why the table coding matters: at n = 2000 a plain table (40 symbols x 12 bits) would cost more than
the whole budget (0.08 bit/symbol = 160 bits/row). So a row's table is its alphabet window plus one
small integer per symbol, `v = 1 + round(2 * log2(count))` (0 = absent); both sides rebuild the same
frequencies from `v` in integer arithmetic. The `v` sequences are themselves rANS-coded, in their
own *meta* stream, with static tables conditioned on the previous `v` (shared by all rows and sent
once per buffer). On real KV codes this costs ~0.05 bit/symbol for tables plus ~0.009 for the
quantized probabilities.

Values outside a row's window (at most 254 wide) are coded as an escape symbol, with the raw int32
in a side section, so any int32 round-trips.

Byte layout (all little-endian)::

    header   36 B: b"TSR" 0x03, u32 streams, u32 n, u32 hdr_len, u32 mtab_len,
                   u32 meta_words, u32 data_words, u32 n_esc, u32 check
    mtab     mtab_len B: u8 nctx, then per context: u8 k (0 = unused), [u8 lo, k x u8 v]
    hdr      hdr_len B: per row, varint zigzag(lo - previous lo), varint 2 * k + has_escape
    meta     meta_words x u16: the two final meta states (2 words each; the first codes the values of
             even index in decode order, the second the odd ones), then renormalisation words in
             decode order
    data     data_words x u16: the final states of lanes 0 .. min(n, 64) - 1 (u32 each), then the
             renormalisation words in decode order (rows, blocks of 64 tokens, sets of 16 lanes,
             lanes)
    esc      n_esc x i32: escaped values in decode order (row, token)

`check` is FNV-1a over mtab, hdr and esc: a flipped bit there would otherwise decode silently to
shifted values. The rANS sections are checked instead by the decoder ending exactly on the
encoder's initial states and on the last word.

rANS details: 32-bit states in [2^15, 2^31) with 16-bit renormalisation, probabilities to 2^11,
encoder division by an exact reciprocal. The decoder looks each slot up in one packed int32 table
entry: symbol << 23 | freq << 11 | slot - cum.
"""

from __future__ import annotations

import ctypes
import math

import numba
import numpy as np

from thunderserve.common import native

PROB_BITS = 11
PROB_SCALE = 1 << PROB_BITS
LANES = 64  # rANS states: each codes every 64th token of a row
_SETS = LANES // 16  # vectors of 16 states
_MASK = PROB_SCALE - 1
_RANS_L = 1 << 15  # state lower bound; states live in [2^15, 2^31)
_XMAX_SHIFT = 31 - PROB_BITS  # encoder renormalises when x >= freq << this
_VMAX = 63  # largest table value v (counts up to 2^31)
_KMAX = 254  # widest row window; the escape symbol index is k <= 254, so symbols fit 8 bits
_WIDE_SPAN = 1 << 16  # rows spanning up to this many values find their window by histogram, wider ones by sorting
# meta contexts: 0 for a row's first entry, else 1 + the previous v, + 64 once past the row's peak
# (before the peak v tends to rise, after it to fall)
_NCTX = 129
_FIRST_CTX = 0
_HEADER = 36
_SQRT2 = 1.4142135623730951
_MAGIC = 0x03525354  # b"TSR\x03" (0x02: one meta state; 0x01: four data states, one row each)

# Weights 2^((v-1)/2) in 8 fractional bits, from integer square roots so every platform agrees.
_W = np.array([0] + [math.isqrt(1 << (v - 1 + 16)) for v in range(1, _VMAX + 1)], dtype=np.int64)

# Decoder error codes (0 = ok); turned into ValueError by `decode`.
_ERR_HEADER, _ERR_TABLE, _ERR_META, _ERR_DATA, _ERR_ESC, _ERR_CHECK = 1, 2, 3, 4, 5, 6
_ERR_TEXT = {
    _ERR_HEADER: "bad header or section lengths",
    _ERR_TABLE: "bad table",
    _ERR_META: "meta stream overrun",
    _ERR_DATA: "data stream overrun",
    _ERR_ESC: "escape section overrun",
    _ERR_CHECK: "checksum or final state check failed",
}

_jit = numba.njit(cache=True, nogil=True)



# ---------------------------------------------------------------- tables


@_jit
def _stored_states(n: int) -> int:
    """Lane l codes the tokens l, l + LANES, ... of every row: with n < LANES the rest never move."""
    return min(n, LANES)


@_jit
def _next_ctx(val: int, peak: int) -> int:
    """Meta context after table value `val`, where `peak` is the row's largest value so far."""
    return 1 + val + (64 if val < peak else 0)


@_jit
def _quant_v(c: int) -> int:
    """1 + round(2 log2 c), capped at _VMAX (0 for c = 0), as the bit length of floor(c^2 sqrt 2):
    exact double arithmetic (no log2), so rans_simd.c's twin gives the same value."""
    if c <= 0:
        return 0
    fc = np.float64(c)
    return min(_VMAX, math.frexp(np.floor(fc * fc * _SQRT2))[1])


@_jit
def _build_freq(v, vbase, k, freq, cum) -> bool:
    """v[vbase: vbase + k] -> freq, cum (to PROB_SCALE). Every present symbol gets >= 1; the
    rounding remainder goes to the most probable one. False if no symbol is present."""
    total = 0
    present = 0
    for i in range(k):
        vi = v[vbase + i]
        if vi > 0:
            total += _W[vi]
            present += 1
    if present == 0:
        return False
    avail = PROB_SCALE - present
    inv = 1.0 / np.float64(total)
    s = 0
    best = 0
    bestf = -1
    for i in range(k):
        vi = v[vbase + i]
        f = 0
        if vi > 0:
            # floor(w * avail / total) by a reciprocal: w * avail < 2^51 is exact in a double, the
            # estimate is off by at most one, and the integer check settles it (no int64 division)
            a = _W[vi] * avail
            q = np.int64(a * inv)
            q += np.int64((q + 1) * total <= a) - np.int64(q * total > a)
            f = 1 + q
        freq[i] = f
        s += f
        if f > bestf:
            bestf = f
            best = i
    freq[best] += PROB_SCALE - s
    c = 0
    for i in range(k):
        cum[i] = c
        c += freq[i]
    return True


@_jit
def _enc_table(freq, cum, k, rcp, sh, bias, cmpl, xmax) -> None:
    for i in range(k):
        f = np.int64(freq[i])
        if f == 0:
            xmax[i] = 0
            continue
        lg = 0
        while (1 << lg) < f:
            lg += 1
        # ceil(2^(31+lg) / f) is exact for x < 2^31 and fits 32 bits, so x * rcp fits int64
        rcp[i] = ((1 << (31 + lg)) + f - 1) // f
        sh[i] = 31 + lg
        bias[i] = np.int64(cum[i])
        cmpl[i] = PROB_SCALE - f
        xmax[i] = f << _XMAX_SHIFT


@_jit
def _dec_table(freq, cum, k, dtab) -> None:
    for i in range(k):
        f = np.int64(freq[i])
        c = np.int64(cum[i])
        # int32 arithmetic on a slice: the fill vectorizes (the table costs as much as the row's decoding)
        head = np.int32((i << 23) | (f << 11))
        slots = dtab[c : c + f]
        for j in range(f):
            slots[j] = head + np.int32(j)


# ---------------------------------------------------------------- encoder


@_jit
def _row_stats(row, vrow, wide) -> tuple[int, int, int]:
    """Window (lo, k), escape flag and table values v for one row (`wide`: int64 scratch of
    _WIDE_SPAN counts)."""
    n = row.shape[0]
    mn = row[0]
    mx = row[0]
    for t in range(n):
        a = row[t]
        mn = min(mn, a)
        mx = max(mx, a)
    lo = np.int64(mn)
    span = np.int64(mx) - lo + 1
    esc = 0
    k = span
    if _KMAX < span <= _WIDE_SPAN:
        return _wide_row_stats(row, vrow, wide, lo, span)
    if span > _KMAX:
        # widest-coverage window of _KMAX values; everything else is escaped
        srt = np.sort(row)
        best = 0
        bi = 0
        j = 0
        for i in range(n):
            while j < n and np.int64(srt[j]) - np.int64(srt[i]) < _KMAX:
                j += 1
            if j - i > best:
                best = j - i
                bi = i
        lo = np.int64(srt[bi])
        k = np.int64(srt[bi + best - 1]) - lo + 1
        esc = 1
    ke = k + esc
    # four sub-histograms break the store-to-load chain on runs of one symbol
    h = np.zeros(1024, np.int64)
    t = 0
    if esc == 0:
        # every value is in the window: no range check in the hot loop
        while t + 8 <= n:
            h[row[t] - lo] += 1
            h[256 + row[t + 1] - lo] += 1
            h[512 + row[t + 2] - lo] += 1
            h[768 + row[t + 3] - lo] += 1
            h[row[t + 4] - lo] += 1
            h[256 + row[t + 5] - lo] += 1
            h[512 + row[t + 6] - lo] += 1
            h[768 + row[t + 7] - lo] += 1
            t += 8
    while t < n:
        d = np.int64(row[t]) - lo
        if d < 0 or d >= k:
            d = k
        h[d] += 1
        t += 1
    for i in range(ke):
        vrow[i] = _quant_v(h[i] + h[256 + i] + h[512 + i] + h[768 + i])
    return lo, k, esc


@_jit
def _wide_row_stats(row, vrow, wide, mn, span) -> tuple[int, int, int]:
    """`_row_stats` for a row wider than a window but narrower than _WIDE_SPAN: the same window as
    the sorted search (the first present value whose window of _KMAX values covers the most),
    found from the row's histogram in O(n + span) instead of a sort."""
    n = row.shape[0]
    wide[:span] = 0
    for t in range(n):
        wide[np.int64(row[t]) - mn] += 1
    count = 0
    for a in range(_KMAX):
        count += wide[a]
    best = count
    start = 0
    for a in range(1, span - _KMAX + 1):
        count += wide[a + _KMAX - 1] - wide[a - 1]
        if count > best:
            best = count
            start = a
    # a best window can start on an absent value; the next present one covers the same values
    while wide[start] == 0:
        start += 1
    last = min(start + _KMAX, span) - 1
    while wide[last] == 0:
        last -= 1
    k = last - start + 1
    inside = 0
    for i in range(k):
        vrow[i] = _quant_v(wide[start + i])
        inside += wide[start + i]
    vrow[k] = _quant_v(n - inside)
    return mn + start, k, 1


@_jit
def _encode_rows(sym, lo, k, freq, cum, states, out, p):
    """The data words, backwards into out[..p); returns the new p. numba twin of
    `rans_simd_encode_rows` (rans_simd.c), which writes the same words: rows last to first, each
    row's blocks of LANES tokens last to first, a block's state sets last to first, each set's
    flushed words in lane order. sym int32 [rows, n]; lo, k: each row's window start and escape
    index; freq, cum int16 [rows, 256]; states uint32 [LANES], in and out."""
    rows, n = sym.shape
    rcp = np.zeros(_KMAX + 1, np.int64)
    sh = np.zeros(_KMAX + 1, np.int64)
    bias = np.zeros(_KMAX + 1, np.int64)
    cmpl = np.zeros(_KMAX + 1, np.int64)
    xmax = np.zeros(_KMAX + 1, np.int64)
    words = np.empty(16, np.uint16)  # one set's flushed words, in lane order
    x = states.astype(np.int64)
    for r in range(rows - 1, -1, -1):
        kr = np.int64(k[r])
        lor = np.int64(lo[r])
        _enc_table(freq[r], cum[r], kr + 1, rcp, sh, bias, cmpl, xmax)
        row = sym[r]
        t0 = (n - 1) // LANES * LANES
        while t0 >= 0:
            for i in range(_SETS - 1, -1, -1):
                flushed = np.uint64(0)
                for t in range(t0 + 16 * i, min(t0 + 16 * i + 16, n)):
                    # unsigned indices: numba skips its negative-index wraparound code for them.
                    # Offsets wrap modulo 2^32, as in the vector code: one min maps the escapes to k
                    j = np.uint64(min((np.int64(row[np.uint64(t)]) - lor) & 0xFFFFFFFF, kr))
                    lane = np.uint64(t - t0)
                    xx = x[lane]
                    nd = np.int64(xx >= xmax[j])  # branch-free: a flush is a coin toss
                    words[flushed] = xx & 0xFFFF
                    flushed += np.uint64(nd)
                    xx >>= 16 * nd
                    x[lane] = xx + bias[j] + ((xx * rcp[j]) >> sh[j]) * cmpl[j]
                p -= np.int64(flushed)
                for q in range(np.int64(flushed)):
                    out[np.uint64(p + q)] = words[np.uint64(q)]
            t0 -= LANES
    states[:] = x
    return p


@_jit
def _put_u32(buf, off, val) -> None:
    for i in range(4):
        buf[off + i] = (val >> (8 * i)) & 0xFF


@_jit
def _fnv(buf, start, end, h):
    for i in range(start, end):
        h = ((h ^ np.int64(buf[i])) * 16777619) & 0xFFFFFFFF
    return h


@_jit
def _check(buf, mtab_len, hl, esc_start):
    h = _fnv(buf, _HEADER, _HEADER + mtab_len + hl, np.int64(2166136261))
    return _fnv(buf, esc_start, buf.shape[0], h)


@_jit
def _put_varint(buf, off, val) -> int:
    while val >= 0x80:
        buf[off] = (val & 0x7F) | 0x80
        val >>= 7
        off += 1
    buf[off] = val
    return off + 1


@numba.njit(cache=True, nogil=True, inline="always")
def _meta_put(x, ment, at, mout, p):
    """Code one meta value into state x (its entry: ment[at .. at + 5) = xmax, rcp, shift, bias, cmpl,
    read as scalars by unsigned index: a view per value would cost numba a reference count, a signed
    index a wraparound check); returns (x, p)."""
    flush = np.int64(x >= ment[at])  # branch-free: the flushes do not follow a pattern
    mout[p - 1] = x & 0xFFFF  # p >= 4 here: at most one word per value so far, four spare
    p -= flush
    x >>= 16 * flush
    rcp, sh = ment[at + np.uint64(1)], ment[at + np.uint64(2)]
    return x + ment[at + np.uint64(3)] + ((x * rcp) >> sh) * ment[at + np.uint64(4)], p


@_jit
def _encode_meta(v, kw, esc, ns):
    """The rows' table values as one rANS stream (two interleaved states) with static tables conditioned on the
    previous value. Returns (mtab bytes, meta words in decode order)."""
    # meta statistics: v conditioned on the previous v of the row
    mcount = np.zeros((_NCTX, _VMAX + 1), np.int64)
    n_meta = 0
    for r in range(ns):
        ctx = _FIRST_CTX
        peak = 0
        for i in range(kw[r] + esc[r]):
            mcount[ctx, v[r, i]] += 1
            peak = max(peak, np.int64(v[r, i]))
            ctx = _next_ctx(np.int64(v[r, i]), peak)
            n_meta += 1
    mlo = np.zeros(_NCTX, np.int64)
    mk = np.zeros(_NCTX, np.int64)
    mv = np.zeros((_NCTX, _VMAX + 1), np.uint8)
    nctx = 0
    mtab_len = 1
    for c in range(_NCTX):
        a = -1
        b = -1
        for s in range(_VMAX + 1):
            if mcount[c, s] > 0:
                if a < 0:
                    a = s
                b = s
        if a >= 0:
            mlo[c] = a
            mk[c] = b - a + 1
            for s in range(a, b + 1):
                mv[c, s - a] = _quant_v(mcount[c, s])
            nctx = c + 1
    for c in range(nctx):
        mtab_len += 1 + (1 + mk[c] if mk[c] > 0 else 0)
    # meta encoder tables, one entry's five numbers side by side (a value costs one cache line)
    freq = np.zeros(256, np.int64)
    cum = np.zeros(256, np.int64)
    ent = np.zeros((5, _VMAX + 1), np.int64)
    ment = np.empty((nctx, _VMAX + 1, 5), np.int64)  # only the entries of present values are read
    for c in range(nctx):
        if mk[c] > 0:
            _build_freq(mv[c], 0, mk[c], freq, cum)
            _enc_table(freq, cum, mk[c], ent[1], ent[2], ent[3], ent[4], ent[0])
            for d in range(mk[c]):
                for f in range(5):
                    ment[c, d, f] = ent[f, d]
    # meta stream, backwards, two states: the values in decode order alternate between them, so the
    # two chains of multiplies overlap
    mout = np.empty(n_meta + 4, np.uint16)
    p = n_meta + 4
    x0 = np.int64(_RANS_L)
    x1 = np.int64(_RANS_L)
    j = n_meta  # the decode-order index of the value after the one being coded
    ctxs = np.zeros(256, np.int64)
    flat = ment.reshape(-1)
    for r in range(ns - 1, -1, -1):
        ke = kw[r] + esc[r]
        ctx = _FIRST_CTX
        peak = 0
        for i in range(ke):
            ctxs[i] = ctx
            peak = max(peak, np.int64(v[r, i]))
            ctx = _next_ctx(np.int64(v[r, i]), peak)
        for i in range(ke - 1, -1, -1):
            j -= 1
            c = ctxs[i]
            at = np.uint64(5 * ((_VMAX + 1) * c + np.int64(v[r, i]) - mlo[c]))
            if j & 1:
                x1, p = _meta_put(x1, flat, at, mout, p)
            else:
                x0, p = _meta_put(x0, flat, at, mout, p)
    p -= 4
    mout[p], mout[p + 1], mout[p + 2], mout[p + 3] = x0 & 0xFFFF, x0 >> 16, x1 & 0xFFFF, x1 >> 16

    mtab = np.empty(mtab_len, np.uint8)
    o = 0
    mtab[o] = nctx
    o += 1
    for c in range(nctx):
        mtab[o] = mk[c]
        o += 1
        if mk[c] > 0:
            mtab[o] = mlo[c]
            o += 1
            for s in range(mk[c]):
                mtab[o] = mv[c, s]
                o += 1
    return mtab, mout[p:]


@_jit
def _encode_tables(symbols, lo, kw, v, done, with_freq):
    """Everything of a buffer but its data words: each row's window (lo, kw), escape flag esc and
    table values v (given for the rows marked `done`), the frequencies int16 [rows, 256] the numba
    data coder takes (with_freq; the vector kernels build their own from v), the escapes in decode
    order (row, token), the meta section and the row headers."""
    ns, n = symbols.shape
    esc = np.zeros(ns, np.int64)
    wide = np.empty(_WIDE_SPAN, np.int64)
    for r in range(ns):
        if not done[r]:
            lo[r], kw[r], esc[r] = _row_stats(symbols[r], v[r], wide)
    n_esc = 0
    for r in range(ns):
        if esc[r]:
            for t in range(n):
                d = np.int64(symbols[r, t]) - lo[r]
                n_esc += d < 0 or d >= kw[r]
    escv = np.empty(n_esc, np.int32)
    e = 0
    for r in range(ns):
        if esc[r]:
            for t in range(n):
                d = np.int64(symbols[r, t]) - lo[r]
                if d < 0 or d >= kw[r]:
                    escv[e] = symbols[r, t]
                    e += 1
    mtab, mwords = _encode_meta(v, kw, esc, ns)
    freq = np.zeros((ns if with_freq else 0, 256), np.int16)
    cum = np.zeros((ns if with_freq else 0, 256), np.int16)
    f64 = np.zeros(256, np.int64)
    c64 = np.zeros(256, np.int64)
    for r in range(ns if with_freq else 0):
        ke = kw[r] + esc[r]
        _build_freq(v[r], 0, ke, f64, c64)
        for i in range(ke):
            freq[r, i] = f64[i]
            cum[r, i] = c64[i]
    hdr = np.empty(ns * 16, np.uint8)
    hl = 0
    prev = np.int64(0)
    for r in range(ns):
        dl = np.int64(lo[r]) - prev
        prev = np.int64(lo[r])
        z = (dl << 1) if dl >= 0 else ((-dl) << 1) - 1
        hl = _put_varint(hdr, hl, z)
        hl = _put_varint(hdr, hl, np.int64(kw[r]) * 2 + esc[r])
    return esc, freq, cum, escv, mtab, mwords, hdr[:hl]


@_jit
def _frame(ns, n, mtab, hdr, mwords, states, n_words, escv):
    """The buffer: header, meta tables, row headers, meta words, data (final states, then the data
    words), escapes; the check word over tables, headers and escapes. Returns it with the data
    words' place left for the caller to fill (numpy copies them as one memcpy; numba's slice
    assignment goes a byte at a time), and that place's offset."""
    mtab_len, hl, meta_words, n_esc = mtab.shape[0], hdr.shape[0], mwords.shape[0], escv.shape[0]
    data_words = 2 * states.shape[0] + n_words
    total = _HEADER + mtab_len + hl + 2 * meta_words + 2 * data_words + 4 * n_esc
    out = np.empty(total, np.uint8)  # every byte is written, here or by the caller
    _put_u32(out, 0, _MAGIC)
    _put_u32(out, 4, ns)
    _put_u32(out, 8, n)
    _put_u32(out, 12, hl)
    _put_u32(out, 16, mtab_len)
    _put_u32(out, 20, meta_words)
    _put_u32(out, 24, data_words)
    _put_u32(out, 28, n_esc)
    o = _HEADER
    out[o : o + mtab_len] = mtab
    o += mtab_len
    out[o : o + hl] = hdr
    o += hl
    # u16 / u32 -> bytes as plain copies (x86 and every numpy target we run on are little-endian)
    out[o : o + 2 * meta_words] = mwords.view(np.uint8)
    o += 2 * meta_words
    out[o : o + 4 * states.shape[0]] = states.view(np.uint8)
    o += 4 * states.shape[0]
    at = o
    o += 2 * n_words
    for i in range(n_esc):
        _put_u32(out, o, np.int64(escv[i]) & 0xFFFFFFFF)
        o += 4
    _put_u32(out, 32, _check(out, mtab_len, hl, total - 4 * n_esc))
    return out, at


# ---------------------------------------------------------------- decoder


@_jit
def _get_u32(buf, off) -> int:
    return (
        np.int64(buf[off])
        | (np.int64(buf[off + 1]) << 8)
        | (np.int64(buf[off + 2]) << 16)
        | (np.int64(buf[off + 3]) << 24)
    )


@_jit
def _decode_rows(out, lo, k, freq, cum, states, words, nwords, p):
    """Inverse of `_encode_rows` (numba twin of `rans_simd_decode_rows`): rows first to last into
    out int32 [rows, n], an escape as lo + k; words: the data words as bytes, nwords of them, read
    from word p on (past the end as zeros). Returns the new p, or -1 when it passes the end."""
    rows, n = out.shape
    dtab = np.empty(PROB_SCALE, np.int32)
    # the words and LANES zero words after them: a block reads at most LANES words, so every read
    # of a block that starts within the words stays in this copy
    padded = np.zeros(nwords + LANES, np.uint16)
    padded[:nwords] = words[: 2 * nwords].view(np.uint16)
    x = states.astype(np.int64)
    for r in range(rows):
        _dec_table(freq[r], cum[r], np.int64(k[r]) + 1, dtab)
        row = out[r]
        lor = np.int64(lo[r])
        for t0 in range(0, n, LANES):
            if p > nwords:
                return -1
            # a lane's renormalisation reads come after the lanes before it: decoding and reading
            # lane by lane takes the words in the order the vector code does (set by set)
            for t in range(t0, min(t0 + LANES, n)):
                lane = np.uint64(t - t0)  # unsigned indices: no wraparound code
                xx = x[lane]
                e = np.int64(dtab[np.uint64(xx & _MASK)])
                xx = ((e >> 11) & 0xFFF) * (xx >> PROB_BITS) + (e & _MASK)
                row[np.uint64(t)] = lor + (e >> 23)  # stored modulo 2^32, as the vector code adds
                nd = np.int64(xx < _RANS_L)  # branch-free: a read is a coin toss
                x[lane] = (xx << (16 * nd)) | (np.int64(padded[np.uint64(p)]) & -nd)
                p += nd
    states[:] = x
    return p if p <= nwords else -1


@_jit
def _decode_tables(buf, ns, n, lo, kw, esc, freq, cum, states):
    """Everything of a buffer but its data words: checks the header, sizes, check word and meta
    section, fills each row's window (lo, kw), escape flag and frequencies, and the final states.
    Returns (error, byte offset of the data words, their count, byte offset of the escapes)."""
    size = buf.shape[0]
    if size < _HEADER or _get_u32(buf, 0) != _MAGIC or _get_u32(buf, 4) != ns or _get_u32(buf, 8) != n:
        return _ERR_HEADER, 0, 0, 0
    hl = _get_u32(buf, 12)
    mtab_len = _get_u32(buf, 16)
    meta_words = _get_u32(buf, 20)
    data_words = _get_u32(buf, 24)
    n_esc = _get_u32(buf, 28)
    if ns == 0 or n == 0:
        empty = hl == 0 and mtab_len == 0 and meta_words == 0 and data_words == 0 and n_esc == 0
        return (0 if size == _HEADER and empty and _get_u32(buf, 32) == 0 else _ERR_HEADER), 0, 0, 0
    if size != _HEADER + mtab_len + hl + 2 * meta_words + 2 * data_words + 4 * n_esc:
        return _ERR_HEADER, 0, 0, 0
    nst = _stored_states(n)
    if meta_words < 4 or data_words < 2 * nst:
        return _ERR_HEADER, 0, 0, 0
    if _check(buf, mtab_len, hl, size - 4 * n_esc) != _get_u32(buf, 32):
        return _ERR_CHECK, 0, 0, 0
    # meta tables: per context a slot -> symbol table plus freq/cum
    o = _HEADER
    mend = o + mtab_len
    nctx = np.int64(buf[o])
    o += 1
    if nctx > _NCTX:
        return _ERR_TABLE, 0, 0, 0
    mlo = np.zeros(_NCTX, np.int64)
    mk = np.zeros(_NCTX, np.int64)
    mfreq = np.zeros((_NCTX, 256), np.int64)
    mcum = np.zeros((_NCTX, 256), np.int64)
    mslot = np.zeros((_NCTX, PROB_SCALE), np.uint8)
    for c in range(nctx):
        if o >= mend:
            return _ERR_TABLE, 0, 0, 0
        k = np.int64(buf[o])
        o += 1
        if k == 0:
            continue
        if o + 1 + k > mend:
            return _ERR_TABLE, 0, 0, 0
        a = np.int64(buf[o])
        o += 1
        if a + k > _VMAX + 1:
            return _ERR_TABLE, 0, 0, 0
        mlo[c] = a
        mk[c] = k
        for s in range(k):
            if buf[o + s] > _VMAX:
                return _ERR_TABLE, 0, 0, 0
        if not _build_freq(buf, o, k, mfreq[c], mcum[c]):
            return _ERR_TABLE, 0, 0, 0
        o += k
        for s in range(k):
            for j in range(mfreq[c, s]):
                mslot[c, mcum[c, s] + j] = s
    if o != mend:
        return _ERR_TABLE, 0, 0, 0
    hpos = mend
    hend = mend + hl
    mbase = hend
    xs = np.empty(2, np.int64)  # the meta states: values of even and odd decode-order index
    for u in range(2):
        xs[u] = _get_u32(buf, mbase + 4 * u) & 0xFFFFFFFF
        if xs[u] < _RANS_L or xs[u] >= (1 << 31):
            return _ERR_CHECK, 0, 0, 0
    mptr = 4
    j = 0
    vrow = np.zeros(256, np.uint8)
    f64 = np.zeros(256, np.int64)
    c64 = np.zeros(256, np.int64)
    prev = np.int64(0)
    for r in range(ns):
        # row header: two varints
        vals = np.zeros(2, np.int64)
        for f in range(2):
            val = np.int64(0)
            shift = 0
            while True:
                if hpos >= hend or shift > 35:
                    return _ERR_HEADER, 0, 0, 0
                b = np.int64(buf[hpos])
                hpos += 1
                val |= (b & 0x7F) << shift
                shift += 7
                if b < 0x80:
                    break
            vals[f] = val
        z = vals[0]
        dl = (z >> 1) if (z & 1) == 0 else -((z + 1) >> 1)
        prev += dl
        if prev < -(1 << 31) or prev >= (1 << 31):
            return _ERR_HEADER, 0, 0, 0
        kwin = vals[1] >> 1
        has_esc = vals[1] & 1
        ke = kwin + has_esc
        if kwin < 1 or kwin > _KMAX:
            return _ERR_HEADER, 0, 0, 0
        # the row's table values from the meta stream
        ctx = _FIRST_CTX
        peak = 0
        for i in range(ke):
            if mk[ctx] == 0:
                return _ERR_META, 0, 0, 0
            xm = xs[j & 1]
            slot = xm & _MASK
            s = np.int64(mslot[ctx, slot])
            xm = mfreq[ctx, s] * (xm >> PROB_BITS) + slot - mcum[ctx, s]
            if xm < _RANS_L:
                if mptr >= meta_words:
                    return _ERR_META, 0, 0, 0
                q = mbase + 2 * mptr
                xm = (xm << 16) | np.int64(buf[q]) | (np.int64(buf[q + 1]) << 8)
                mptr += 1
            xs[j & 1] = xm
            j += 1
            val = s + mlo[ctx]
            vrow[i] = val
            peak = max(peak, val)
            ctx = _next_ctx(val, peak)
        if not _build_freq(vrow, 0, ke, f64, c64):
            return _ERR_TABLE, 0, 0, 0
        for i in range(ke):
            freq[r, i] = f64[i]
            cum[r, i] = c64[i]
        lo[r] = prev
        kw[r] = kwin
        esc[r] = has_esc
    if hpos != hend or mptr != meta_words or xs[0] != _RANS_L or xs[1] != _RANS_L:
        return _ERR_CHECK, 0, 0, 0
    dbase = mbase + 2 * meta_words
    for u in range(nst):
        x = _get_u32(buf, dbase + 4 * u)
        if x < _RANS_L or x >= (1 << 31):
            return _ERR_CHECK, 0, 0, 0
        states[u] = x
    return 0, dbase + 4 * nst, data_words - 2 * nst, dbase + 2 * data_words


@_jit
def _swap_escapes(out, lo, kw, esc, buf, ebase, n_esc) -> int:
    """The escaped values in place of their escape symbols (decoded as lo + kw), in decode order."""
    ep = 0
    for r in range(out.shape[0]):
        if esc[r]:
            mark = np.int32(np.int64(lo[r]) + np.int64(kw[r]))  # modulo 2^32, as the data decoder adds
            row = out[r]
            for t in range(row.shape[0]):
                if row[t] == mark:
                    if ep >= n_esc:
                        return _ERR_ESC
                    row[t] = _get_u32(buf, ebase + 4 * ep)
                    ep += 1
    return 0 if ep == n_esc else _ERR_CHECK


# ---------------------------------------------------------------- entropy


@_jit
def _entropy_bits(symbols) -> float:
    ns, n = symbols.shape
    total = 0.0
    for r in range(ns):
        srt = np.sort(symbols[r])
        run = 1
        for t in range(1, n + 1):
            if t < n and srt[t] == srt[t - 1]:
                run += 1
            else:
                total -= run * math.log2(run / n)
                run = 1
    return total


# ---------------------------------------------------------------- the vector data coder


def _encode_rows_any(found: tuple[ctypes.CDLL, int] | None, sym, lo, k, v, esc, freq, cum, states, out, p: int) -> int:
    """The data words by the vector kernels (`found`: `native.kernels()`; they build the
    tables from v and esc) or the numba twin (from freq and cum)."""
    if found is None:
        return int(_encode_rows(sym, lo, k, freq, cum, states, out, p))
    lib, level = found
    rows, n = sym.shape
    return int(lib.rans_simd_encode_rows(level, sym.ctypes.data, rows, n, lo.ctypes.data, k.ctypes.data,
                                         v.ctypes.data, esc.ctypes.data, _W.ctypes.data, states.ctypes.data,
                                         out.ctypes.data, p))


def _decode_rows_any(found: tuple[ctypes.CDLL, int] | None, out, lo, k, freq, cum, states, words,
                     nwords: int) -> int:
    """Inverse of `_encode_rows_any`, by the same kernels or the numba twin."""
    if found is None:
        return int(_decode_rows(out, lo, k, freq, cum, states, words, nwords, 0))
    lib, level = found
    rows, n = out.shape
    return int(lib.rans_simd_decode_rows(level, out.ctypes.data, rows, n, lo.ctypes.data, k.ctypes.data,
                                         freq.ctypes.data, cum.ctypes.data, states.ctypes.data, words.ctypes.data,
                                         nwords, 0))


# ---------------------------------------------------------------- public API


def _as_symbols(symbols: np.ndarray) -> np.ndarray:
    a = np.asarray(symbols)
    if a.ndim != 2:
        raise ValueError(f"symbols must be 2-D [streams, n], got shape {a.shape}")
    if a.dtype != np.int32:
        if not np.issubdtype(a.dtype, np.integer):
            raise ValueError(f"symbols must be integers, got {a.dtype}")
        if a.size and (a.min() < -(2**31) or a.max() >= 2**31):
            raise ValueError("symbols must fit int32")
        a = a.astype(np.int32)
    return np.ascontiguousarray(a)


def encode(symbols: np.ndarray, simd: bool = True) -> np.ndarray:
    """int32 [streams, n] -> self-contained uint8 buffer (tables included). Releases the GIL.
    `simd=False` codes the data words with numba even where the vector library runs (same bytes)."""
    a = _as_symbols(symbols)
    ns, n = a.shape
    if max(a.shape) >= 2**32 or a.size >= 2**40:
        raise ValueError(f"rans: shape {a.shape} too large for the u32 header fields")
    if ns == 0 or n == 0:  # the header alone, every length and the check word 0
        return np.array([_MAGIC, ns, n, 0, 0, 0, 0, 0, 0], "<u4").view(np.uint8)
    lo = np.zeros(ns, np.int32)
    kw = np.zeros(ns, np.int32)
    v = np.zeros((ns, 256), np.uint8)
    done = np.zeros(ns, np.uint8)
    found = native.kernels() if simd else None
    if found is not None:  # the rows no wider than a window; the rest go through _row_stats
        lib, level = found
        lib.rans_simd_row_stats(level, a.ctypes.data, ns, n, lo.ctypes.data, kw.ctypes.data, v.ctypes.data,
                                done.ctypes.data)
    esc, freq, cum, escv, mtab, mwords, hdr = _encode_tables(a, lo, kw, v, done, found is None)
    states = np.full(LANES, _RANS_L, np.uint32)
    # one word at most per symbol, and 16 words of room below the last for the vector stores
    cap = a.size + 16
    words = np.empty(cap, np.uint16)
    p = _encode_rows_any(found, a, lo, kw, v, esc, freq, cum, states, words, cap)
    out, at = _frame(ns, n, mtab, hdr, mwords, states[: _stored_states(n)], cap - p, escv)
    out[at : at + 2 * (cap - p)] = words[p:].view(np.uint8)
    return out


def decode(buf: np.ndarray, streams: int, n: int, simd: bool = True) -> np.ndarray:
    """Inverse of `encode`. Raises ValueError on a buffer that is corrupt, short or of another shape."""
    if streams < 0 or n < 0:
        raise ValueError("streams and n must be >= 0")
    b = np.ascontiguousarray(np.frombuffer(buf, np.uint8) if isinstance(buf, bytes | bytearray | memoryview) else buf)
    if b.dtype != np.uint8 or b.ndim != 1:
        raise ValueError("buf must be a 1-D uint8 array")
    # check the header before allocating [streams, n]
    head = b[:12].view("<u4") if b.shape[0] >= _HEADER else None
    if head is None or int(head[0]) != _MAGIC or int(head[1]) != streams or int(head[2]) != n:
        raise ValueError(f"rans: corrupt buffer or not [{streams}, {n}] ({_ERR_TEXT[_ERR_HEADER]})")
    lo = np.zeros(streams, np.int32)
    kw = np.zeros(streams, np.int32)
    esc = np.zeros(streams, np.int64)
    freq = np.zeros((streams, 256), np.int16)
    cum = np.zeros((streams, 256), np.int16)
    states = np.full(LANES, _RANS_L, np.uint32)
    err, wbase, nwords, ebase = _decode_tables(b, streams, n, lo, kw, esc, freq, cum, states)
    out = np.empty((streams, n), np.int32)
    if not err and streams and n:
        words = b[wbase : wbase + 2 * nwords]
        p = _decode_rows_any(native.kernels() if simd else None, out, lo, kw, freq, cum, states, words, nwords)
        if p != nwords or (states != _RANS_L).any():
            err = _ERR_CHECK if p >= 0 else _ERR_DATA
        else:
            err = _swap_escapes(out, lo, kw, esc, b, ebase, (b.shape[0] - ebase) // 4)
    if err:
        raise ValueError(f"rans: corrupt buffer ({_ERR_TEXT[err]})")
    return out


def entropy_bits(symbols: np.ndarray) -> float:
    """Sum over streams of n * H(stream's empirical distribution), in bits: the ideal size."""
    return float(_entropy_bits(_as_symbols(symbols)))
