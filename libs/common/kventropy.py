"""Entropy-coded uniform quantization of KV tensors: the int4 and int8 codecs' method (DESIGN.md §4).

A fixed-rate code spends each value its channel's width, so a channel's range must cover its
outliers and every value pays for them. Here every value is rounded to a multiple of its
channel's step, `code = round(x / step)`, and the codes are entropy-coded per channel
(`rans`): an outlier costs a few extra bits where it occurs, and nothing travels but the
steps (fp16, one per layer, KV head and channel), the fp16 sink and newest tokens, optional
per-token step exponents and the coded bits.

Where the steps come from is the encoder's choice; the decoder reads them off the wire.
With a calibrated profile (`kvprofiles`) they equalise each KV head's share of the
next-token KL: a head whose error variance costs `a` KL per unit gets step `s / sqrt(a)`,
and a key channel is further divided by the root of the query energy `w` that multiplies
its error (an error e in a key moves attention logits by q.e). `s` is the one knob: the
profile's is set so that a 2,000-token cache costs the int4 wire budget. Without a profile
each channel's step is its own RMS over the tensor divided by `RELATIVE_STEP`.

Keys are quantized pre-RoPE (RoPE undone: each channel then keeps one distribution over the
sequence). A Hadamard rotation (`rotate`) is supported but the codec does not use one: mixing
channels of unequal spread raises the sum of their entropies (docs/benchmarks.md). A calibrated
*transform* does the opposite: a per-head basis in which the channels are uncorrelated (a KLT,
`kvprofiles.Profile.transforms`) takes the same error for fewer bits. The encoder multiplies each
token's vector by the head's matrix before rounding, the decoder by its inverse after; neither
matrix travels (the header names the profile they come from).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import numba
import numpy as np
import torch

from thunderserve.common import config, kvquant, native, rans

_F16_TINY = float(torch.finfo(torch.float16).tiny)
_F16_MAX = float(torch.finfo(torch.float16).max)
_CODE_MAX = float(2**31 - 128)  # |code| stays inside int32 after fp32 rounding
# Without a profile: step = channel RMS / RELATIVE_STEP, about 4.5 bits per value for
# Gaussian-like channels (a uniform quantizer's entropy is ~ log2(sigma / step) + 2.05).
RELATIVE_STEP = 5.5
# The one width of the low code bits sent as they are (`encode_tensor`'s fine_bits, int8): two codes'
# per byte, a pass that vectorizes (a loop over any width took ~15x as long).
FINE_BITS = 4


def check_fine_bits(fine_bits: int) -> int:
    """`fine_bits` if this release codes that many low bits as they are (0 or FINE_BITS), else ValueError."""
    if fine_bits not in (0, FINE_BITS):
        raise ValueError(f"unsupported fine_bits {fine_bits} (0 or {FINE_BITS})")
    return fine_bits


def _stacked(t: torch.Tensor | Sequence[torch.Tensor]) -> tuple[bool, list[torch.Tensor]]:
    stacked = not isinstance(t, torch.Tensor)
    return stacked, (list(t) if stacked else [t])


def default_steps(x: torch.Tensor, rotate: int) -> torch.Tensor:
    """Steps [P, H, D] for x [P, B, H, n, D] without a profile: each channel's RMS over the batch and
    tokens (after a rotation all channels of a head look alike, so a head shares one)."""
    rms = x.square().mean((1, 3)).sqrt()  # [P, H, D]
    if rotate:
        rms = rms.square().mean(-1, keepdim=True).sqrt().expand_as(rms)
    return rms / RELATIVE_STEP


def _wire_steps(steps: torch.Tensor) -> torch.Tensor:
    """fp16 steps the decoder can divide by: finite and positive (a zero or missing step
    becomes the smallest normal fp16; its channel's codes are then exact or huge, never wrong)."""
    steps = torch.nan_to_num(steps.float(), nan=_F16_TINY, posinf=_F16_MAX, neginf=_F16_TINY)
    return steps.clamp(_F16_TINY, _F16_MAX).to(torch.float16)


def token_exponents(keys: torch.Tensor, query: torch.Tensor, alpha: float) -> torch.Tensor:
    """Per-token step exponents [P, B, H, n] (int32, half-octaves: a token's steps are multiplied
    by 2^(e / 2), 1/16..16) from pre-RoPE keys [P, B, H, n, D] and a query [P, H, D].

    A token's error matters in proportion to the attention it will get. The decode's queries
    are unknown at encode time, but the part of a logit that RoPE leaves nearly unrotated over
    the context (the low-frequency pairs) is query . key with the query's mean: `query` is that
    mean, zero outside those pairs (`kvprofiles.Profile.importance_query`). A token's predicted
    log-attention, centred over the tensor's tokens, times -alpha / ln 2, gives e / 2; centring
    keeps the geometric mean of the multipliers, and so the rate, about where it was.
    """
    d = keys.shape[-1]
    logit = torch.einsum("pbhnd,phd->pbhn", keys, query.float()) / math.sqrt(max(d, 1))
    rows = logit.reshape(-1, logit.shape[-1]).contiguous().numpy()
    exps = np.empty(rows.shape, np.int32)
    _exponents(rows, alpha, exps, np.empty(rows.shape, np.float32))
    return torch.from_numpy(exps).reshape(logit.shape)


class Encoded(NamedTuple):
    """What `encode_tensor` returns."""

    buffers: dict[str, torch.Tensor]  # what goes on the wire, by name
    token_exp: torch.Tensor | None  # the per-token step exponents the buffers carry [P, B, H, n]


# 2^(-e / 2) for e = -8..8: what a token's coefficients are multiplied by before rounding
_TOKEN_INV = np.array([2.0 ** (-e / 2) for e in range(-8, 9)], np.float32)


@numba.njit(cache=True, nogil=True)
def _exponents(logit: np.ndarray, alpha: float, exps: np.ndarray, token_inv: np.ndarray) -> None:
    """`token_exponents` from the predicted logits f32 [rows, n] into exps int32 [rows, n], and
    token_inv f32 [rows, n] = 2^(-e / 2)."""
    scale = -2.0 * alpha / math.log(2.0)
    rows, n = logit.shape
    for r in range(rows):
        mean = 0.0
        for t in range(n):
            mean += logit[r, t]
        mean /= max(n, 1)
        for t in range(n):
            e = np.int32(min(max(np.rint((logit[r, t] - mean) * scale), -8.0), 8.0))
            exps[r, t] = e
            token_inv[r, t] = _TOKEN_INV[e + 8]


def encode_tensor(
    t: torch.Tensor | Sequence[torch.Tensor],
    steps: torch.Tensor | None,
    rotate: int,
    sink_tokens: int,
    rope_theta: float = 0.0,
    rope_start: int = 0,
    token_query: torch.Tensor | None = None,
    token_exp: torch.Tensor | None = None,
    token_alpha: float = 0.0,
    transform: torch.Tensor | None = None,
    recent_tokens: int = 0,
    fine_bits: int = 0,
) -> Encoded:
    """Encode one KV tensor [B, H, S, D] or a stack of same-shaped ones (a cache's layers, one
    leading axis): the named buffers that go on the wire, and the per-token exponents
    [P, B, H, n] they carry (None: none), as `decoded_token_exponents` would read them back.

    `steps`: [H, D] for one tensor, [P, H, D] for a stack of P (None = `default_steps`; with a
    `transform` [P, H, D, D], the steps of its coefficients, required).
    The first `sink_tokens` tokens and the last `recent_tokens` travel in fp16 (buffers "sink"
    and "recent"; the first decode steps attend most to the newest tokens). Per-token steps (optional, coded in the
    buffer "tokens"): `token_exp` [P, B, H, n] as given, or for keys `token_query` [P, H, D]
    and `token_alpha` to compute them from the keys (`token_exponents`). The wire size follows
    the content: the steps fix the error, not the rate.
    """
    check_fine_bits(fine_bits)
    stacked, parts = _stacked(t)
    recent = None
    if recent_tokens:
        s = parts[0].shape[-2]
        recent = torch.stack([part[..., s - recent_tokens :, :].detach() for part in parts]).to(torch.float16)
        parts = [part[..., : s - recent_tokens, :] for part in parts]
    if transform is not None:
        if steps is None:
            raise ValueError("coding in a transform needs the steps of its coefficients")
        *_, h, _, d = parts[0].shape
        steps = _wire_steps(steps.reshape(len(parts), h, d))
        query = token_query if token_exp is None and token_alpha else None
        sink, streams, token_exp, fine = _transformed_streams(parts, steps, sink_tokens, rope_theta, rope_start,
                                                              query, token_exp, token_alpha, transform, fine_bits)
    else:
        sink, x = kvquant.first_pass(parts, sink_tokens, rope_theta, rope_start, rotate)  # [P, B, H, n, D]
        torch.nan_to_num(x, nan=0.0, posinf=_F16_MAX, neginf=-_F16_MAX, out=x)
        p, b, h, n, d = x.shape
        if steps is None:
            steps = default_steps(x, rotate) if b * n else torch.ones(p, h, d)
        steps = _wire_steps(steps.reshape(p, h, d))
        if token_exp is None and token_query is not None and token_alpha:
            token_exp = token_exponents(x, token_query.reshape(p, h, d), token_alpha)
        rows = p * b * h
        inv = (steps.float().reciprocal() * (1 << fine_bits)).view(p, 1, h, d).expand(p, b, h, d).reshape(rows, d)
        token_inv = torch.ones(p, b, h, n) if token_exp is None else torch.exp2(token_exp.float() / -2)
        streams = _quantize(x.reshape(rows, n, d).numpy(), inv.numpy(), token_inv.reshape(rows, n).numpy())
        fine = _split_fine(streams.reshape(-1)) if fine_bits else None
    buffers: dict[str, torch.Tensor] = {"steps": steps if stacked else steps[0]}
    if token_exp is not None:
        *lead, n = token_exp.shape
        buffers["tokens"] = torch.from_numpy(rans.encode(token_exp.reshape(math.prod(lead), n).numpy()))
    rows, d, n = streams.shape  # one stream per (layer, sequence, head, channel), its tokens in order
    if fine is not None:
        buffers["fine"] = torch.from_numpy(fine)
    buffers["codes"] = torch.from_numpy(rans.encode(streams.reshape(rows * d, n)))
    if sink is not None:
        buffers["sink"] = sink if stacked else sink[0]
    if recent is not None:
        buffers["recent"] = recent if stacked else recent[0]
    return Encoded(buffers, token_exp)


def _transformed_streams(parts: Sequence[torch.Tensor], steps: torch.Tensor, sink_tokens: int, rope_theta: float,
                         rope_start: int, token_query: torch.Tensor | None, token_exp: torch.Tensor | None,
                         token_alpha: float, transform: torch.Tensor, fine_bits: int = 0,
                         ) -> tuple[torch.Tensor | None, np.ndarray, torch.Tensor | None, np.ndarray | None]:
    """`encode_tensor`'s work with a transform, one row (layer, sequence, head) at a time, each
    through cache-resident tiles: the row's tokens after the sink, RoPE undone and made finite,
    then their per-token exponents (from `token_query`, or `token_exp` as given), their product
    with the row's matrix and the rounding. `transform_simd.c` does it all where it runs
    (`native.kernels()`: AVX-512 or AVX2, for the head sizes it takes); else `_rows_by_torch`. Returns the
    fp16 sink tokens [P, B, H, k, D], the codes int32 [P * B * H, D, n], the exponents
    [P, B, H, n] (or None) and, with `fine_bits`, the low bits split off the codes (`_split_fine`; the C
    kernels split each row while it is in cache)."""
    parts = [_token_rows(part.detach().float()) for part in parts]
    p = len(parts)
    b, h, s, d = parts[0].shape
    k, n = sink_tokens, s - sink_tokens
    sink = torch.stack([part[..., :k, :] for part in parts]).to(torch.float16) if k else None
    inv = (steps.float().reciprocal() * (1 << fine_bits)).numpy()  # [P, H, D]
    cos = nsin = np.empty((0, 0), np.float32)
    if rope_theta and d:
        c, sn = kvquant.rope_tables(n, d, float(rope_theta), int(rope_start + k))
        cos, nsin = c.numpy(), (-sn).numpy()  # undoing RoPE is RoPE by the opposite angle
    exps = query = None
    if token_query is not None:
        exps = np.empty((p, b, h, n), np.int32)
        query = (token_query.float().reshape(p, h, d) / math.sqrt(max(d, 1))).contiguous()
    elif token_exp is not None:
        exps = np.ascontiguousarray(token_exp.reshape(p, b, h, n).numpy(), np.int32)
    out = np.empty((p * b * h, d, n), np.int32)
    matrices = _per_row(transform, b)
    found = native.kernels()
    rope = cos.shape[0] > 0
    if found and found[0].transform_simd_fits(d, rope):
        matrices = matrices.contiguous()  # held here: the kernel reads it by address
        srcs = np.array([part.data_ptr() for part in parts], np.int64)
        strides = np.array([part.stride() for part in parts], np.int64)  # [P, 4] in floats
        rope_tables = (cos.ctypes.data, nsin.ctypes.data) if rope else (None, None)
        fine = np.empty(out.size // 2, np.uint8) if fine_bits else None  # d is even: rows split alone
        status = found[0].transform_simd_rows(
            found[1], srcs.ctypes.data, strides.ctypes.data, p, b, h, s, k, d, *rope_tables,
            None if query is None else query.data_ptr(), float(token_alpha), None if exps is None else exps.ctypes.data,
            matrices.data_ptr(), inv.ctypes.data, out.ctypes.data, None if fine is None else fine.ctypes.data)
        if status:
            raise MemoryError(f"transform_simd_rows failed ({status}) on a [{p}, {b}, {h}, {s}, {d}] stack")
    else:
        _rows_by_torch(parts, k, cos, nsin, query, token_alpha, exps, matrices, inv, out)
        fine = _split_fine(out.reshape(-1)) if fine_bits else None
    return sink, out, None if exps is None else torch.from_numpy(exps), fine


def _token_rows(t: torch.Tensor) -> torch.Tensor:
    """t [B, H, S, D] as it is when each (sequence, head) holds its tokens as contiguous rows (a
    cache cut short along the tokens is), else a contiguous copy."""
    return t if t.stride(-1) == 1 and t.stride(-2) == t.shape[-1] else t.contiguous()


def _rows_by_torch(parts: list[torch.Tensor], k: int, cos: np.ndarray, nsin: np.ndarray, query: torch.Tensor | None,
                   alpha: float, exps: np.ndarray | None, matrices: torch.Tensor, inv: np.ndarray,
                   out: np.ndarray) -> None:
    """`transform_simd_rows` by numba and torch, a row at a time through scratch tiles that stay in
    cache: `_prepare_rows`, the logits by `torch.mv`, `_exponents`, the product by `torch.mm`
    ((x @ T)^T = T^T @ x^T lands in the coder's layout) and `_quantize_row`."""
    b, h, s, d = parts[0].shape
    n = s - k
    x, coeffs, logit = torch.empty(n, d), torch.empty(d, n), torch.empty(1, n)
    token_inv = np.ones((1, n), np.float32)
    r = 0
    for i, part in enumerate(parts):
        for bi in range(b):
            for hi in range(h):
                _prepare_rows(part[bi, hi, k:].numpy(), cos, nsin, x.numpy())
                if query is not None:
                    torch.mv(x, query[i, hi], out=logit[0])
                    _exponents(logit.numpy(), alpha, exps[i, bi, hi].reshape(1, n), token_inv)
                elif exps is not None:
                    token_inv[0] = np.exp2(exps[i, bi, hi] * np.float32(-0.5), dtype=np.float32)
                torch.mm(matrices[r].t(), x.t(), out=coeffs)
                _quantize_row(coeffs.numpy(), inv[i, hi], token_inv[0], out[r])
                r += 1


def _dims(shape: tuple[int, ...]) -> tuple[int, int, int, int, int]:
    *lead, s, d = shape
    p, b, h = (1, *lead) if len(lead) == 2 else lead
    return p, b, h, s, d


def decoded_token_exponents(buffers: dict[str, torch.Tensor], shape: tuple[int, ...],
                            sink_tokens: int, recent_tokens: int = 0) -> torch.Tensor | None:
    """The per-token step exponents [P, B, H, n] a packed tensor carries (None: it has none)."""
    if "tokens" not in buffers:
        return None
    p, b, h, s, _ = _dims(shape)
    n = s - sink_tokens - recent_tokens
    return torch.from_numpy(rans.decode(buffers["tokens"].numpy(), p * b * h, n)).view(p, b, h, n)


def _steps(buffers: dict[str, torch.Tensor], shape: tuple[int, ...], sink_tokens: int,
           fine_bits: int = 0) -> torch.Tensor:
    """Every quantized value's step, broadcastable to [P, B, H, n, D]."""
    p, _, h, _, d = _dims(shape)
    steps = buffers["steps"].float().reshape(p, 1, h, 1, d) / (1 << fine_bits)
    exps = decoded_token_exponents(buffers, shape, sink_tokens)
    return steps if exps is None else steps * torch.exp2(exps.float() / 2).unsqueeze(-1)


def decode_tensor(buffers: dict[str, torch.Tensor], shape: tuple[int, ...], rotate: int, sink_tokens: int,
                  rope_theta: float = 0.0, rope_start: int = 0, inverse: torch.Tensor | None = None,
                  recent_tokens: int = 0, fine_bits: int = 0) -> torch.Tensor:
    """Inverse of `encode_tensor`: fp32 of `shape` ([B, H, S, D], or [P, B, H, S, D] for a stack).
    `inverse` [P, H, D, D]: the inverse of the encoder's `transform`."""
    p, b, h, s, d = _dims(shape)
    k, m = sink_tokens, recent_tokens
    n = s - k - m
    rows = p * b * h
    codes = rans.decode(buffers["codes"].numpy(), rows * d, n).reshape(rows, d, n)
    if fine_bits:
        fine = buffers.get("fine")
        if fine is None or fine.numel() != (codes.size + 1) // 2:  # two codes' low bits per byte
            raise ValueError(f"a KV tensor coded with {fine_bits} fine bits per value lacks them or has too few")
        _join_fine(codes.reshape(-1), fine.numpy())
    exps = decoded_token_exponents(buffers, shape, k, m)
    token_steps = (torch.exp2(exps.float() / 2) if exps is not None else torch.ones(p, b, h, n)).reshape(rows, n)
    steps = buffers["steps"].float().reshape(p, 1, h, d).expand(p, b, h, d).reshape(rows, d) / (1 << fine_bits)
    # the output is written in place: the fp16 ends copied in, the body decoded straight into it
    out = torch.empty(rows, s, d)
    if k:
        out[:, :k] = buffers["sink"].reshape(rows, k, d)
    if m:
        out[:, s - m :] = buffers["recent"].reshape(rows, m, d)
    cos = sin = torch.empty(0, 0)
    if rope_theta and d:
        cos, sin = kvquant.rope_tables(n, d, float(rope_theta), int(rope_start + k))
    body = out[:, k : k + n]
    if inverse is not None:
        _inverse_transformed(codes, steps.numpy(), token_steps.numpy(), _per_row(inverse, b), cos.numpy(),
                             sin.numpy(), body)
    else:
        _dequantize(codes, steps.numpy(), token_steps.numpy(), cos.numpy(), sin.numpy(), body.numpy())
        if rotate:
            body.copy_(kvquant.hadamard_rotate(body, rotate))
    return out.reshape(shape)


def error_bound(buffers: dict[str, torch.Tensor], shape: tuple[int, ...], rotate: int, sink_tokens: int,
                rope_theta: float = 0.0, rope_start: int = 0, inverse: torch.Tensor | None = None,
                recent_tokens: int = 0, fine_bits: int = 0) -> torch.Tensor:
    """Per-value bound on |decoded - original| from quantization alone: half the value's
    step in the quantized domain, carried back through the inverse transform (a sum of
    |weight| x bound), the rotation and RoPE (0 for the fp16 sink and recent tokens)."""
    if recent_tokens:
        *lead, s, d = shape
        body = error_bound(buffers, (*lead, s - recent_tokens, d), rotate, sink_tokens, rope_theta, rope_start,
                           inverse, fine_bits=fine_bits)
        return torch.cat((body, torch.zeros(*lead, recent_tokens, d)), -2)
    p, b, h, s, d = _dims(shape)
    half = (_steps(buffers, shape, sink_tokens, fine_bits) / 2).expand(p, b, h, s - sink_tokens, d)
    if inverse is not None:
        half = torch.matmul(half, inverse.float().abs().reshape(p, 1, h, d, d))
    return kvquant.propagate_bound(half, rotate, rope_theta, rope_start, sink_tokens).reshape(shape)


# Quantizing and dequantizing are fused with the transpose between the tensor's layout (tokens
# outer, channels inner) and the coder's (one stream per channel), and decoding also with RoPE:
# one pass each way instead of torch's half-dozen over the whole cache. Decoding transposes a tile
# of _TILE tokens at a time through a small buffer, so both sides stay in L1.
_TILE = 32


@numba.njit(cache=True, nogil=True)
def _quantize(x: np.ndarray, inv: np.ndarray, token_inv: np.ndarray) -> np.ndarray:
    """x f32 [R, n, D] (R = layers x sequences x heads) / steps (inv f32 [R, D] x token_inv f32
    [R, n]), rounded to int32 [R, D, n], clamped to +-_CODE_MAX."""
    r_, n_, d_ = x.shape
    out = np.empty((r_, d_, n_), np.int32)
    for r in range(r_):
        for t in range(n_):
            ti = token_inv[r, t]
            for c in range(d_):
                q = np.rint(x[r, t, c] * (inv[r, c] * ti))
                out[r, c, t] = np.int32(min(max(q, -_CODE_MAX), _CODE_MAX))
    return out


@numba.njit(cache=True, nogil=True)
def _dequantize(codes: np.ndarray, steps: np.ndarray, token_steps: np.ndarray, cos: np.ndarray,
                sin: np.ndarray, out: np.ndarray) -> None:
    """Inverse of `_quantize` (codes [R, D, n], steps [R, D], token_steps [R, n]) into out f32
    [R, n, D], RoPE redone when cos/sin [n, D / 2] are given (else 0 x 0)."""
    r_, d_, n_ = codes.shape
    rope = cos.shape[0] > 0
    tile = np.empty((_TILE, d_), np.float32)
    for r in range(r_):
        for t0 in range(0, n_, _TILE):
            t1 = min(t0 + _TILE, n_)
            for c in range(d_):
                st = steps[r, c]
                for t in range(t0, t1):
                    tile[t - t0, c] = np.float32(codes[r, c, t]) * st
            for t in range(t0, t1):
                ts = token_steps[r, t]
                row, o = tile[t - t0], out[r, t]
                if not rope:
                    for c in range(d_):
                        o[c] = row[c] * ts
                    continue
                _rope_row(row, ts, o, cos[t], sin[t])


@numba.njit(cache=True, nogil=True, inline="always")
def _rope_row(row: np.ndarray, scale: float, o: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> None:
    """o = RoPE(row * scale) at one position (cos/sin [D / 2]; HF rotate_half: channel c pairs
    with c + D/2). o may be row."""
    half = row.shape[0] // 2
    for c in range(half):
        x1, x2 = row[c] * scale, row[c + half] * scale
        o[c] = x1 * cos[c] - x2 * sin[c]
        o[c + half] = x2 * cos[c] + x1 * sin[c]


# With a transform the cache is taken one row (layer, sequence, head) at a time (`_transformed_streams`
# and its inverse): torch's matmul computes the row's product into a scratch tile that stays in cache
# (x @ T, transposed, is T^T @ x^T, and BLAS reads a transposed operand in place, so the product lands
# in the coder's layout), and these kernels do the rest in one pass each.
def _per_row(matrices: torch.Tensor, sequences: int) -> torch.Tensor:
    """[P, H, D, D] (or [H, D, D]) -> one fp32 matrix per row [P * B * H, D, D] (a view)."""
    p_h = matrices.float().reshape(-1, 1, *matrices.shape[-3:])
    return p_h.expand(p_h.shape[0], sequences, *p_h.shape[-3:]).reshape(-1, *matrices.shape[-2:])


def _inverse_transformed(codes: np.ndarray, steps: np.ndarray, token_steps: np.ndarray, inverse: torch.Tensor,
                         cos: np.ndarray, sin: np.ndarray, out: torch.Tensor) -> None:
    """Inverse of `_transformed_streams`' codes into out f32 [R, n, D], RoPE redone when cos/sin are given."""
    r_, d_, n_ = codes.shape
    scratch = torch.empty(d_, n_)
    rope = cos.shape[0] > 0
    for r in range(r_):
        _dequantize_row(codes[r], steps[r], token_steps[r], scratch.numpy())
        torch.mm(scratch.t(), inverse[r], out=out[r])
        if rope:
            _rope_rows(out[r].numpy(), cos, sin)


@numba.njit(cache=True, nogil=True)
def _prepare_rows(src: np.ndarray, cos: np.ndarray, nsin: np.ndarray, out: np.ndarray) -> None:
    """out f32 [n, D] = src [n, D] with RoPE undone when cos / -sin [n, D / 2] are given (else
    0 x 0), NaN as 0 and infinities as the largest fp16 (a wire step must stay finite)."""
    one = np.float32(1.0)
    top = np.float32(_F16_MAX)
    rope = cos.shape[0] > 0
    for t in range(src.shape[0]):
        o = out[t]
        row = src[t]
        if rope:
            _rope_row(row, one, o, cos[t], nsin[t])
            row = o
        for c in range(o.shape[0]):  # branch-free, so it vectorizes
            v = row[c]
            o[c] = np.float32(0.0) if v != v else min(max(v, -top), top)


@numba.njit(cache=True, nogil=True)
def _quantize_row(coeffs: np.ndarray, inv: np.ndarray, token_inv: np.ndarray, out: np.ndarray) -> None:
    """One row's coefficients f32 [D, n] / steps (inv [D] x token_inv [n]) -> int32 codes [D, n]."""
    d_, n_ = coeffs.shape
    for c in range(d_):
        ic = inv[c]
        for t in range(n_):
            q = np.rint(coeffs[c, t] * (ic * token_inv[t]))
            out[c, t] = np.int32(min(max(q, -_CODE_MAX), _CODE_MAX))


@numba.njit(cache=True, nogil=True)
def _dequantize_row(codes: np.ndarray, steps: np.ndarray, token_steps: np.ndarray, out: np.ndarray) -> None:
    """Inverse of `_quantize_row`: codes int32 [D, n] -> f32 [D, n]."""
    d_, n_ = codes.shape
    for c in range(d_):
        st = steps[c]
        for t in range(n_):
            out[c, t] = np.float32(codes[c, t]) * (st * token_steps[t])


@numba.njit(cache=True, nogil=True)
def _rope_rows(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> None:
    """RoPE redone in place on x f32 [n, D] (cos/sin [n, D / 2])."""
    one = np.float32(1.0)
    for t in range(x.shape[0]):
        _rope_row(x[t], one, x[t], cos[t], sin[t])


@numba.njit(cache=True, nogil=True)
def _split_fine(codes: np.ndarray) -> np.ndarray:
    """codes int32 [N] -> their low 4 bits, two per byte (the even code's in the low nibble);
    the codes keep the rest, shifted down in place (an arithmetic shift: floor for negatives)."""
    n = codes.shape[0]
    out = np.zeros((n + 1) // 2, np.uint8)
    for i in range(n // 2):
        a, b = codes[2 * i], codes[2 * i + 1]
        out[i] = np.uint8((a & 15) | ((b & 15) << 4))
        codes[2 * i], codes[2 * i + 1] = a >> 4, b >> 4
    if n % 2:
        out[n // 2] = np.uint8(codes[n - 1] & 15)
        codes[n - 1] >>= 4
    return out


@numba.njit(cache=True, nogil=True)
def _join_fine(codes: np.ndarray, fine: np.ndarray) -> None:
    """Inverse of `_split_fine`, in place on codes int32 [N]."""
    n = codes.shape[0]
    for i in range(n // 2):
        f = np.int32(fine[i])
        codes[2 * i] = (codes[2 * i] << 4) | (f & 15)
        codes[2 * i + 1] = (codes[2 * i + 1] << 4) | (f >> 4)
    if n % 2:
        codes[n - 1] = (codes[n - 1] << 4) | (np.int32(fine[n // 2]) & 15)


def warm_up() -> None:
    """Compile the coder and the fused kernels now (or load them from numba's cache), not on
    the first transfer: a cold compile takes ~30 s, a cached load about a second. One process at a
    time: the first to come compiles, and the ones that started with it then load its cache."""
    x = torch.zeros(1, 1, 3, 4)
    with config.file_lock(config.cache_root() / "kernels-warm-up.lock"):
        for rope_theta in (0.0, 1e4):
            for transform in (None, torch.eye(4).expand(1, 4, 4)):
                steps = torch.ones(1, 4) if transform is not None else None
                for fine_bits in (0, 4):
                    buffers = encode_tensor(x, steps, 0, 1, rope_theta, transform=transform, fine_bits=fine_bits,
                                            token_exp=torch.zeros(1, 1, 1, 2, dtype=torch.int32)).buffers
                    decode_tensor(buffers, tuple(x.shape), 0, 1, rope_theta, inverse=transform,
                                  fine_bits=fine_bits)
