"""Lossless rANS coding of many short streams of small integers (quantized KV-cache codes).

`symbols` is int32 [streams, n]: one row per channel of one attention head, each row with its own
roughly Laplacian distribution. Each row gets a static table; rows are interleaved four at a time
(four rANS states, one per row of a *group*), so the decoder has four independent dependency chains
without paying four state flushes per row: the states run on from one group to the next, and only
the four final states are stored, once per buffer.

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

    header   36 B: b"TSR" 0x01, u32 streams, u32 n, u32 hdr_len, u32 mtab_len,
                   u32 meta_words, u32 data_words, u32 n_esc, u32 check
    mtab     mtab_len B: u8 nctx, then per context: u8 k (0 = unused), [u8 lo, k x u8 v]
    hdr      hdr_len B: per row, varint zigzag(lo - previous lo), varint 2 * k + has_escape
    meta     meta_words x u16: final meta state (2 words), then renormalisation words in decode order
    data     data_words x u16: 4 final states (8 words), renormalisation words, 4 zero pad words
    esc      n_esc x i32: escaped values in decode order (group, token, lane)

`check` is FNV-1a over mtab, hdr and esc: a flipped bit there would otherwise decode silently to
shifted values. The rANS sections are checked instead by the decoder ending exactly on the
encoder's initial states and on the last word (and the pad words being zero).

rANS details: 32-bit states in [2^15, 2^31) with 16-bit renormalisation, probabilities to 2^11,
encoder division by an exact 32-bit reciprocal (state < 2^31 keeps the product in int64). The
decoder looks each slot up in one packed int32 table entry: symbol << 23 | freq << 11 | slot - cum.
Rows of a final partial group are padded with dummy single-symbol rows, which cost no bits.
"""

from __future__ import annotations

import math

import numba
import numpy as np

PROB_BITS = 11
PROB_SCALE = 1 << PROB_BITS
LANES = 4  # the group loops are unrolled by hand for four lanes
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
_MAGIC = 0x01525354  # b"TSR\x01"

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
_inline = numba.njit(cache=True, nogil=True, inline="always")  # per-lane steps: inlined, states stay in registers


# ---------------------------------------------------------------- tables


@_jit
def _next_ctx(val: int, peak: int) -> int:
    """Meta context after table value `val`, where `peak` is the row's largest value so far."""
    return 1 + val + (64 if val < peak else 0)


@_jit
def _quant_v(c: int) -> int:
    if c <= 0:
        return 0
    return min(_VMAX, 1 + int(math.floor(2.0 * math.log2(c) + 0.5)))


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
    s = 0
    best = 0
    bestf = -1
    for i in range(k):
        vi = v[vbase + i]
        f = 0
        if vi > 0:
            f = 1 + (_W[vi] * avail) // total
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
        f = freq[i]
        if f == 0:
            xmax[i] = 0
            continue
        lg = 0
        while (1 << lg) < f:
            lg += 1
        # ceil(2^(31+lg) / f) is exact for x < 2^31 and fits 32 bits, so x * rcp fits int64
        rcp[i] = ((1 << (31 + lg)) + f - 1) // f
        sh[i] = 31 + lg
        bias[i] = cum[i]
        cmpl[i] = PROB_SCALE - f
        xmax[i] = f << _XMAX_SHIFT


@_jit
def _dec_table(freq, cum, k, dtab) -> None:
    for i in range(k):
        f = freq[i]
        c = cum[i]
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


@_inline
def _enc_step(x, j, etab, out, p):
    """One lane's encoder step for table entry j: flush 16 bits if the state would overflow, then
    x -> C(s, x) by the exact reciprocal. Returns (x, p)."""
    u1, u2, u3, u4 = np.uint64(1), np.uint64(2), np.uint64(3), np.uint64(4)
    nd = np.int64(x >= etab[j + u1])
    out[np.uint64(p - 1)] = x & 0xFFFF
    p -= nd
    x >>= 16 * nd
    return x + etab[j + u2] + ((x * etab[j]) >> etab[j + u4]) * etab[j + u3], p


@_jit
def _enc_group(sym, sr, r0, lo, kw, esc, v, states, out, p, etab, idx, freq, cum):
    """rANS-encode rows sr..sr+3 of `sym` (tables: rows r0..r0+3) backwards into out[..p]; returns p.

    etab holds, per lane (2048 apart) and symbol (8 apart): reciprocal, renormalisation bound,
    cum, M - freq, shift. idx is scratch for the rows' symbol indices, interleaved by lane, so the
    hot loop keeps one pointer instead of four rows, windows and tables (no register spills)."""
    n = sym.shape[1]
    for u in range(LANES):
        r = r0 + u
        ke = kw[r] + esc[r]
        _build_freq(v[r], 0, ke, freq, cum)
        for i in range(ke):
            f = freq[i]
            if f == 0:
                continue
            lg = 0
            while (1 << lg) < f:
                lg += 1
            j = u * 2048 + 8 * i
            # ceil(2^(31+lg) / f) is exact for x < 2^31 and fits 32 bits, so x * rcp fits int64
            etab[j] = ((1 << (31 + lg)) + f - 1) // f
            etab[j + 1] = f << _XMAX_SHIFT
            etab[j + 2] = cum[i]
            etab[j + 3] = PROB_SCALE - f
            etab[j + 4] = 31 + lg
    row0, row1, row2, row3 = sym[sr], sym[sr + 1], sym[sr + 2], sym[sr + 3]
    lo0, lo1, lo2, lo3 = lo[r0], lo[r0 + 1], lo[r0 + 2], lo[r0 + 3]
    k0, k1, k2, k3 = np.uint64(kw[r0]), np.uint64(kw[r0 + 1]), np.uint64(kw[r0 + 2]), np.uint64(kw[r0 + 3])
    for t in range(n):
        # negative offsets wrap to huge unsigned values, so one min() maps them to the escape too
        b = 4 * t
        idx[b] = min(np.uint64(np.int64(row0[t]) - lo0), k0)
        idx[b + 1] = min(np.uint64(np.int64(row1[t]) - lo1), k1)
        idx[b + 2] = min(np.uint64(np.int64(row2[t]) - lo2), k2)
        idx[b + 3] = min(np.uint64(np.int64(row3[t]) - lo3), k3)
    u1, u2, u3, u4, u8 = np.uint64(1), np.uint64(2), np.uint64(3), np.uint64(4), np.uint64(8)
    x0, x1, x2, x3 = states[0], states[1], states[2], states[3]
    # unsigned indices: numba skips its negative-index wraparound code for them
    for t in range(n - 1, -1, -1):
        # lanes in reverse so the decoder reads words in lane order
        tb = np.uint64(t) * u4
        x3, p = _enc_step(x3, np.uint64(idx[tb + u3]) * u8 + np.uint64(6144), etab, out, p)
        x2, p = _enc_step(x2, np.uint64(idx[tb + u2]) * u8 + np.uint64(4096), etab, out, p)
        x1, p = _enc_step(x1, np.uint64(idx[tb + u1]) * u8 + np.uint64(2048), etab, out, p)
        x0, p = _enc_step(x0, np.uint64(idx[tb]) * u8, etab, out, p)
    states[0], states[1], states[2], states[3] = x0, x1, x2, x3
    return p


@_jit
def _collect_escapes(sym, sr, r0, lo, kw, esc, escv, ne) -> int:
    """Append rows sr..sr+3's out-of-window values to escv in decode order (token, lane)."""
    if esc[r0] + esc[r0 + 1] + esc[r0 + 2] + esc[r0 + 3] == 0:
        return ne
    for t in range(sym.shape[1]):
        for u in range(LANES):
            if esc[r0 + u]:
                d = np.int64(sym[sr + u, t]) - lo[r0 + u]
                if d < 0 or d >= kw[r0 + u]:
                    escv[ne] = sym[sr + u, t]
                    ne += 1
    return ne


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


@_jit
def _encode_meta(v, kw, esc, ns):
    """The rows' table values as one rANS stream (one state) with static tables conditioned on the
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
    # meta encoder tables
    freq = np.zeros(256, np.int64)
    cum = np.zeros(256, np.int64)
    mrcp = np.zeros((_NCTX, 64), np.int64)
    msh = np.zeros((_NCTX, 64), np.int64)
    mbias = np.zeros((_NCTX, 64), np.int64)
    mcmpl = np.zeros((_NCTX, 64), np.int64)
    mxmax = np.zeros((_NCTX, 64), np.int64)
    for c in range(nctx):
        if mk[c] > 0:
            _build_freq(mv[c], 0, mk[c], freq, cum)
            _enc_table(freq, cum, mk[c], mrcp[c], msh[c], mbias[c], mcmpl[c], mxmax[c])
    # meta stream, backwards, one state
    mout = np.empty(n_meta + 2, np.uint16)
    p = n_meta + 2
    x = np.int64(_RANS_L)
    ctxs = np.zeros(256, np.int64)
    for r in range(ns - 1, -1, -1):
        ke = kw[r] + esc[r]
        ctx = _FIRST_CTX
        peak = 0
        for i in range(ke):
            ctxs[i] = ctx
            peak = max(peak, np.int64(v[r, i]))
            ctx = _next_ctx(np.int64(v[r, i]), peak)
        for i in range(ke - 1, -1, -1):
            ctx = ctxs[i]
            d = np.int64(v[r, i]) - mlo[ctx]
            if x >= mxmax[ctx, d]:
                p -= 1
                mout[p] = x & 0xFFFF
                x >>= 16
            x = x + mbias[ctx, d] + ((x * mrcp[ctx, d]) >> msh[ctx, d]) * mcmpl[ctx, d]
    p -= 2
    mout[p] = x & 0xFFFF
    mout[p + 1] = x >> 16

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
def _encode(symbols):
    ns, n = symbols.shape
    if ns == 0 or n == 0:
        out = np.zeros(_HEADER, np.uint8)
        _put_u32(out, 0, _MAGIC)
        _put_u32(out, 4, ns)
        _put_u32(out, 8, n)
        return out
    ng = (ns + LANES - 1) // LANES
    nfull = ns // LANES
    # rows padded to whole groups; the padding rows are constant 0 (one symbol, zero cost)
    lo = np.zeros(ng * LANES, np.int64)
    kw = np.ones(ng * LANES, np.int64)
    esc = np.zeros(ng * LANES, np.int64)
    v = np.zeros((ng * LANES, 256), np.uint8)
    v[:, 0] = 1
    n_esc = 0
    wide = np.empty(_WIDE_SPAN, np.int64)
    for r in range(ns):
        lo[r], kw[r], esc[r] = _row_stats(symbols[r], v[r], wide)
    tail = np.zeros((LANES, n), np.int32)
    for r in range(nfull * LANES, ns):
        tail[r - nfull * LANES] = symbols[r]

    # escapes (decode order), and the counts the escape tables were built from
    escv = np.empty(0, np.int32)
    total_esc = 0
    for r in range(ns):
        if esc[r]:
            for t in range(n):
                d = np.int64(symbols[r, t]) - lo[r]
                if d < 0 or d >= kw[r]:
                    total_esc += 1
    if total_esc > 0:
        escv = np.empty(total_esc, np.int32)
        for g in range(nfull):
            n_esc = _collect_escapes(symbols, g * LANES, g * LANES, lo, kw, esc, escv, n_esc)
        if nfull < ng:
            n_esc = _collect_escapes(tail, 0, nfull * LANES, lo, kw, esc, escv, n_esc)

    mtab, mwords = _encode_meta(v, kw, esc, ns)
    mtab_len = mtab.shape[0]
    meta_words = mwords.shape[0]
    freq = np.zeros(256, np.int64)
    cum = np.zeros(256, np.int64)

    # data stream, backwards: tail group first, then full groups last to first
    cap = ns * n + 2 * LANES + 2
    dout = np.empty(cap, np.uint16)
    p = cap
    states = np.full(LANES, _RANS_L, np.int64)
    etab = np.zeros(LANES * 2048, np.int64)
    idx = np.empty(LANES * n, np.uint8)
    if nfull < ng:
        r0 = nfull * LANES
        p = _enc_group(tail, 0, r0, lo, kw, esc, v, states, dout, p, etab, idx, freq, cum)
    for g in range(nfull - 1, -1, -1):
        p = _enc_group(symbols, g * LANES, g * LANES, lo, kw, esc, v, states, dout, p, etab, idx, freq, cum)
    for u in range(LANES - 1, -1, -1):
        p -= 2
        dout[p] = states[u] & 0xFFFF
        dout[p + 1] = states[u] >> 16
    data_words = cap - p + LANES  # + zero padding so the decoder's look-ahead stays in bounds
    dstart = p

    # row headers
    hdr = np.empty(ns * 16, np.uint8)
    hl = 0
    prev = np.int64(0)
    for r in range(ns):
        dl = lo[r] - prev
        prev = lo[r]
        z = (dl << 1) if dl >= 0 else ((-dl) << 1) - 1
        hl = _put_varint(hdr, hl, z)
        hl = _put_varint(hdr, hl, kw[r] * 2 + esc[r])

    total = _HEADER + mtab_len + hl + 2 * meta_words + 2 * data_words + 4 * n_esc
    out = np.zeros(total, np.uint8)
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
    out[o : o + hl] = hdr[:hl]
    o += hl
    # u16 -> bytes as a plain copy (x86 and every numpy target we run on are little-endian)
    out[o : o + 2 * meta_words] = mwords.view(np.uint8)
    o += 2 * meta_words
    out[o : o + 2 * (data_words - LANES)] = dout[dstart:].view(np.uint8)
    o += 2 * (data_words - LANES)
    o += 2 * LANES
    for i in range(n_esc):
        _put_u32(out, o, np.int64(escv[i]) & 0xFFFFFFFF)
        o += 4
    _put_u32(out, 32, _check(out, mtab_len, hl, total - 4 * n_esc))
    return out


# ---------------------------------------------------------------- decoder


@_jit
def _get_u32(buf, off) -> int:
    return (
        np.int64(buf[off])
        | (np.int64(buf[off + 1]) << 8)
        | (np.int64(buf[off + 2]) << 16)
        | (np.int64(buf[off + 3]) << 24)
    )


@_inline
def _dec_step(x, off, dtab, buf, dbase, ptr):
    """One lane's decoder step (its slot table at dtab[off:]): the symbol index, then x -> D(x),
    reading 16 bits when the state drops below _RANS_L. Returns (x, ptr, symbol index)."""
    e = dtab[(np.uint64(x) & np.uint64(_MASK)) + off]
    x = ((e >> 11) & 0xFFF) * (x >> PROB_BITS) + (e & _MASK)
    nd = np.int64(x < _RANS_L)
    q = np.uint64(dbase + 2 * ptr)
    w = np.int64(buf[q]) | (np.int64(buf[q + np.uint64(1)]) << 8)
    return (x << (16 * nd)) | (w & -nd), ptr + nd, e >> 23


@_inline
def _emit(o, ut, lo, s, esc, escbuf, ebase, ep, n_esc):
    """Store symbol index s of a row (window start lo) at o[ut], or its escaped raw value.
    Returns (ep, ok): ok False when the escape section has run out."""
    if s != esc:
        o[ut] = lo + s
        return ep, True
    if ep >= n_esc:
        return ep, False
    o[ut] = _get_u32(escbuf, ebase + 4 * ep)
    return ep + 1, True


@_jit
def _dec_group(out, r0, buf, dbase, dw, ptr, states, dtab, lo, escid, escbuf, ebase, n_esc, ep):
    """Decode rows r0..r0+3 of `out`. Returns (ptr, ep, error).

    dtab holds lane u's slot table at u * PROB_SCALE (the literal offsets below, for PROB_BITS = 11).
    The four lanes are written out by hand (LANES = 4) so each state stays in a register."""
    n = out.shape[1]
    o0, o1, o2, o3 = out[r0], out[r0 + 1], out[r0 + 2], out[r0 + 3]
    lo0, lo1, lo2, lo3 = lo[0], lo[1], lo[2], lo[3]
    e0, e1, e2, e3 = escid[0], escid[1], escid[2], escid[3]
    x0, x1, x2, x3 = states[0], states[1], states[2], states[3]
    for t in range(n):
        # at most LANES words are read per token and the section has LANES pad words, so
        # checking once per token keeps every read in bounds
        if ptr > dw:
            return ptr, ep, _ERR_DATA
        ut = np.uint64(t)  # unsigned indices skip numba's negative-index wraparound code
        x0, ptr, s = _dec_step(x0, np.uint64(0), dtab, buf, dbase, ptr)
        ep, ok = _emit(o0, ut, lo0, s, e0, escbuf, ebase, ep, n_esc)
        x1, ptr, s = _dec_step(x1, np.uint64(2048), dtab, buf, dbase, ptr)
        ep, ok1 = _emit(o1, ut, lo1, s, e1, escbuf, ebase, ep, n_esc)
        x2, ptr, s = _dec_step(x2, np.uint64(4096), dtab, buf, dbase, ptr)
        ep, ok2 = _emit(o2, ut, lo2, s, e2, escbuf, ebase, ep, n_esc)
        x3, ptr, s = _dec_step(x3, np.uint64(6144), dtab, buf, dbase, ptr)
        ep, ok3 = _emit(o3, ut, lo3, s, e3, escbuf, ebase, ep, n_esc)
        if not (ok and ok1 and ok2 and ok3):
            return ptr, ep, _ERR_ESC
    states[0], states[1], states[2], states[3] = x0, x1, x2, x3
    if ptr > dw:
        return ptr, ep, _ERR_DATA
    return ptr, ep, 0


@_jit
def _decode(buf, ns, n, out) -> int:
    size = buf.shape[0]
    if size < _HEADER or _get_u32(buf, 0) != _MAGIC or _get_u32(buf, 4) != ns or _get_u32(buf, 8) != n:
        return _ERR_HEADER
    hl = _get_u32(buf, 12)
    mtab_len = _get_u32(buf, 16)
    meta_words = _get_u32(buf, 20)
    data_words = _get_u32(buf, 24)
    n_esc = _get_u32(buf, 28)
    if ns == 0 or n == 0:
        empty = hl == 0 and mtab_len == 0 and meta_words == 0 and data_words == 0 and n_esc == 0
        return 0 if size == _HEADER and empty and _get_u32(buf, 32) == 0 else _ERR_HEADER
    if size != _HEADER + mtab_len + hl + 2 * meta_words + 2 * data_words + 4 * n_esc:
        return _ERR_HEADER
    if meta_words < 2 or data_words < 3 * LANES:
        return _ERR_HEADER
    if _check(buf, mtab_len, hl, size - 4 * n_esc) != _get_u32(buf, 32):
        return _ERR_CHECK
    pad = _HEADER + mtab_len + hl + 2 * meta_words + 2 * (data_words - LANES)
    for i in range(2 * LANES):
        if buf[pad + i] != 0:
            return _ERR_CHECK
    # meta tables: per context a slot -> symbol table plus freq/cum
    o = _HEADER
    mend = o + mtab_len
    nctx = np.int64(buf[o])
    o += 1
    if nctx > _NCTX:
        return _ERR_TABLE
    mlo = np.zeros(_NCTX, np.int64)
    mk = np.zeros(_NCTX, np.int64)
    mfreq = np.zeros((_NCTX, 256), np.int64)
    mcum = np.zeros((_NCTX, 256), np.int64)
    mslot = np.zeros((_NCTX, PROB_SCALE), np.uint8)
    for c in range(nctx):
        if o >= mend:
            return _ERR_TABLE
        k = np.int64(buf[o])
        o += 1
        if k == 0:
            continue
        if o + 1 + k > mend:
            return _ERR_TABLE
        a = np.int64(buf[o])
        o += 1
        if a + k > _VMAX + 1:
            return _ERR_TABLE
        mlo[c] = a
        mk[c] = k
        for s in range(k):
            if buf[o + s] > _VMAX:
                return _ERR_TABLE
        if not _build_freq(buf, o, k, mfreq[c], mcum[c]):
            return _ERR_TABLE
        o += k
        for s in range(k):
            for j in range(mfreq[c, s]):
                mslot[c, mcum[c, s] + j] = s
    if o != mend:
        return _ERR_TABLE
    hpos = mend
    hend = mend + hl
    mbase = hend
    xm = _get_u32(buf, mbase) & 0xFFFFFFFF
    mptr = 2
    dbase = mbase + 2 * meta_words
    dw = data_words - LANES
    ebase = dbase + 2 * data_words
    states = np.empty(LANES, np.int64)
    for u in range(LANES):
        states[u] = _get_u32(buf, dbase + 4 * u)
        if states[u] < _RANS_L or states[u] >= (1 << 31):
            return _ERR_CHECK
    if xm < _RANS_L or xm >= (1 << 31):
        return _ERR_CHECK
    ptr = 2 * LANES
    ep = 0
    ng = (ns + LANES - 1) // LANES
    dtab = np.empty(LANES * PROB_SCALE, np.int32)  # lane u's slot table at u * PROB_SCALE
    lo = np.zeros(LANES, np.int64)
    escid = np.zeros(LANES, np.int64)
    vrow = np.zeros(256, np.uint8)
    freq = np.zeros(256, np.int64)
    cum = np.zeros(256, np.int64)
    prev = np.int64(0)
    tail = np.zeros((LANES, n), np.int32)
    for g in range(ng):
        for u in range(LANES):
            r = g * LANES + u
            if r >= ns:
                # padding row: one symbol with the whole probability range
                lo[u] = 0
                escid[u] = 255
                dtab[u * PROB_SCALE : (u + 1) * PROB_SCALE] = (PROB_SCALE << 11) | np.arange(PROB_SCALE)
                continue
            # row header: two varints
            vals = np.zeros(2, np.int64)
            for f in range(2):
                val = np.int64(0)
                shift = 0
                while True:
                    if hpos >= hend or shift > 35:
                        return _ERR_HEADER
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
                return _ERR_HEADER
            kwin = vals[1] >> 1
            has_esc = vals[1] & 1
            ke = kwin + has_esc
            if kwin < 1 or kwin > _KMAX:
                return _ERR_HEADER
            # the row's table values from the meta stream
            ctx = _FIRST_CTX
            peak = 0
            for i in range(ke):
                if mk[ctx] == 0:
                    return _ERR_META
                slot = xm & _MASK
                s = np.int64(mslot[ctx, slot])
                xm = mfreq[ctx, s] * (xm >> PROB_BITS) + slot - mcum[ctx, s]
                if xm < _RANS_L:
                    if mptr >= meta_words:
                        return _ERR_META
                    q = mbase + 2 * mptr
                    xm = (xm << 16) | np.int64(buf[q]) | (np.int64(buf[q + 1]) << 8)
                    mptr += 1
                val = s + mlo[ctx]
                vrow[i] = val
                peak = max(peak, val)
                ctx = _next_ctx(val, peak)
            if not _build_freq(vrow, 0, ke, freq, cum):
                return _ERR_TABLE
            _dec_table(freq, cum, ke, dtab[u * PROB_SCALE : (u + 1) * PROB_SCALE])
            lo[u] = prev
            escid[u] = kwin if has_esc else 255
        if g * LANES + LANES <= ns:
            ptr, ep, err = _dec_group(
                out, g * LANES, buf, dbase, dw, ptr, states, dtab, lo, escid, buf, ebase, n_esc, ep
            )
        else:
            ptr, ep, err = _dec_group(tail, 0, buf, dbase, dw, ptr, states, dtab, lo, escid, buf, ebase, n_esc, ep)
            for r in range(g * LANES, ns):
                out[r] = tail[r - g * LANES]
        if err:
            return err
    if hpos != hend or mptr != meta_words or xm != _RANS_L or ptr != dw or ep != n_esc:
        return _ERR_CHECK
    for u in range(LANES):
        if states[u] != _RANS_L:
            return _ERR_CHECK
    return 0


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


def encode(symbols: np.ndarray) -> np.ndarray:
    """int32 [streams, n] -> self-contained uint8 buffer (tables included). Releases the GIL."""
    a = _as_symbols(symbols)
    if max(a.shape) >= 2**32 or a.size >= 2**40:
        raise ValueError(f"rans: shape {a.shape} too large for the u32 header fields")
    return _encode(a)


def decode(buf: np.ndarray, streams: int, n: int) -> np.ndarray:
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
    out = np.empty((streams, n), np.int32)
    err = _decode(b, streams, n, out)
    if err:
        raise ValueError(f"rans: corrupt buffer ({_ERR_TEXT[err]})")
    return out


def entropy_bits(symbols: np.ndarray) -> float:
    """Sum over streams of n * H(stream's empirical distribution), in bits: the ideal size."""
    return float(_entropy_bits(_as_symbols(symbols)))
