"""Quantization kernels for the KV codec (DESIGN.md §4).

Plain torch, CPU- and GPU-agnostic. The unit everywhere is a 2-D tensor of *rows*; each row
is cut into groups of `group` values along its last axis (the last group of a row may be
shorter), and each group gets its own asymmetric range: an fp16 minimum ("zero") and an
fp16 step ("scale"). Codes are unsigned `bits`-bit integers; 4-bit codes are packed two per
byte, other widths eight codes to `bits` bytes. Decoding reproduces `code * scale + zero` in fp32, so every
value comes back within half a step of its group (the fp16 range is rounded outward so that
no value is clipped).

Around that core (`encode_tensor` puts them together, all optional and described by params):
- `rope`: undo / redo the rotary position embedding, so keys are quantized pre-RoPE, where
  each channel keeps a fixed range over the sequence;
- `channel_widths` + `pack_widths`: a bit width per channel (2-8 bits, fixed average),
  allotted by reverse water-filling on range^2 x query energy;
- `quantize_normal`: symmetric groups on a Gaussian-quantile codebook (NF4-style) with an
  fp16 scale only, for values after a rotation;
- `hadamard_rotate`: the orthonormal Walsh-Hadamard transform along the last axis, whole or in
  blocks, to spread outlier channels before quantizing (it is its own inverse).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch

_F16_MAX = float(torch.finfo(torch.float16).max)


def _parts(n: int, group: int) -> list[tuple[int, int, int]]:
    """(start, stop, group size) of the full groups and of the shorter last group along an axis."""
    full = n // group * group
    parts = [(0, full, group)] if full else []
    if n > full:
        parts.append((full, n, n - full))
    return parts


def _ranges(lo: torch.Tensor, hi: torch.Tensor, levels) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group fp16 (zero, scale) with zero <= lo and zero + levels * scale >= hi.

    Checked in float64 (these tensors are small): in fp32 a step far below the values' own
    precision would pass the check and let the top code overflow.
    """
    lo = lo.double().clamp(-_F16_MAX, _F16_MAX)
    hi = hi.double().clamp(-_F16_MAX, _F16_MAX)
    zero = lo.to(torch.float16)
    # fp16 rounding may lift the minimum above the data: step it down one ulp where it did.
    zero = torch.where(zero.double() > lo, torch.nextafter(zero, zero.new_tensor(-math.inf)), zero)
    if isinstance(levels, torch.Tensor):
        levels = levels.double()
    span = (hi - zero.double()).clamp_min(0)
    scale = (span / levels).to(torch.float16)
    short = scale.double() * levels + zero.double() < hi
    scale = torch.where(short, torch.nextafter(scale, scale.new_tensor(math.inf)), scale)
    return zero, scale


def quantize(
    x: torch.Tensor,
    bits: int,
    group: int,
    widths: torch.Tensor | None = None,
    bounds: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize x [outer, n, inner] in groups of `group` along dim 1.

    Returns (codes uint8 of x's shape, zero fp16 [outer, G, inner], scale fp16 [outer, G, inner])
    with G = ceil(n / group). Keys per channel use inner = head_dim (groups run over tokens
    and no transpose is needed); values per token use inner = 1. `widths` [outer, inner]
    (uint8, 1..8) gives each channel its own bit width instead of `bits`. `bounds`: x's
    (amin, amax) over dim 1 [outer, inner], if the caller has them (used when one group
    covers n, saving two passes; with several groups each takes its own range).
    """
    x = x.float()
    outer, n, inner = x.shape
    if widths is None:
        levels: torch.Tensor | int = (1 << bits) - 1
    else:
        levels = ((1 << widths.long()) - 1).float().unsqueeze(1)  # [outer, 1, inner]
    codes = torch.empty(x.shape, dtype=torch.uint8)
    zeros, scales = [], []
    for start, stop, g in _parts(n, group):
        part = x[:, start:stop].view(outer, (stop - start) // g, g, inner)
        if bounds is not None and stop - start == n == g:  # one group covers n: its range is the bounds
            lo, hi = bounds[0].unsqueeze(1), bounds[1].unsqueeze(1)
        else:
            lo, hi = part.amin(2), part.amax(2)
        if lo.numel() and (float(lo.min()) < -_F16_MAX or float(hi.max()) > _F16_MAX):
            part = part.clamp(-_F16_MAX, _F16_MAX)  # fp16 scales cannot describe a wider range
        zero, scale = _ranges(lo, hi, levels)
        s = scale.float().unsqueeze(2)
        inv = torch.where(s > 0, 1.0 / s, torch.zeros_like(s))
        # (x - zero) / scale lies in [0, levels]: zero <= x exactly, and `_ranges` checked
        # zero + levels * scale >= max(x) in float64, so fp32 rounding (~1e-7 relative) cannot
        # lift a value past levels + 0.5; +0.5 then truncation rounds to the nearest code.
        # float -> int32 -> uint8 is much faster in torch than float -> uint8.
        q = part.sub(zero.float().unsqueeze(2)).mul_(inv).add_(0.5).to(torch.int32).to(torch.uint8)
        if stop - start == n:  # one part (the usual case for keys): no copy into `codes`
            codes = q.view(outer, n, inner)
        else:
            codes[:, start:stop] = q.view(outer, stop - start, inner)
        zeros.append(zero)
        scales.append(scale)
    if not zeros:
        empty = torch.empty(outer, 0, inner, dtype=torch.float16)
        return codes, empty, empty
    if len(zeros) == 1:
        return codes, zeros[0], scales[0]
    return codes, torch.cat(zeros, 1), torch.cat(scales, 1)


def dequantize(codes: torch.Tensor, zero: torch.Tensor, scale: torch.Tensor, group: int) -> torch.Tensor:
    """Inverse of `quantize`: fp32 of codes' shape [outer, n, inner]."""
    outer, n, inner = codes.shape
    parts = _parts(n, group)
    if len(parts) == 1:  # one addcmul over the whole tensor
        _, stop, g = parts[0]
        view = codes.view(outer, stop // g, g, inner).float()
        return torch.addcmul(zero.float().unsqueeze(2), view, scale.float().unsqueeze(2)).view(outer, n, inner)
    out = codes.float()
    for start, stop, g in parts:
        cols = slice(start // group, start // group + (stop - start) // g)
        part = out[:, start:stop].view(outer, (stop - start) // g, g, inner)
        part.mul_(scale[:, cols].float().unsqueeze(2)).add_(zero[:, cols].float().unsqueeze(2))
    return out


def quantize_rows(x: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`quantize` for rows [R, n] grouped along the last axis: (codes [R * n], zero, scale [R, G])."""
    codes, zero, scale = quantize(x.reshape(x.shape[0], x.shape[1], 1), bits, group)
    return codes.reshape(-1), zero.squeeze(2), scale.squeeze(2)


def dequantize_rows(
    codes: torch.Tensor, zero: torch.Tensor, scale: torch.Tensor, rows: int, n: int, group: int
) -> torch.Tensor:
    """Inverse of `quantize_rows`: fp32 [rows, n]."""
    return dequantize(codes.reshape(rows, n, 1), zero.unsqueeze(2), scale.unsqueeze(2), group).reshape(rows, n)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Two 4-bit codes per byte: byte i holds code i (low) and code i + ceil(N/2) (high)."""
    n = codes.numel()
    half = (n + 1) // 2
    low = codes[:half]
    high = codes[half:]
    packed = low.clone()
    packed[: high.numel()] |= high << 4
    return packed


def unpack_nibbles(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of `pack_nibbles` for `n` codes."""
    return torch.cat((packed & 0x0F, packed >> 4))[:n]


def hadamard_rotate(x: torch.Tensor, block: int | None = None) -> torch.Tensor:
    """Orthonormal Walsh-Hadamard transform along the last axis, in blocks of `block` values
    (a power of two dividing the axis; None = the whole axis, which must be a power of two).

    H is symmetric and orthonormal, so applying it twice gives back the input.
    """
    d = x.shape[-1]
    block = block or d
    if block & (block - 1) or d % block:
        raise ValueError(f"Hadamard rotation needs power-of-two blocks dividing {d}, got {block}")
    h = hadamard_matrix(block, x.dtype)
    if block == d:
        return x @ h
    return (x.reshape(-1, block) @ h).reshape(x.shape)


def first_pass(parts: Sequence[torch.Tensor], sink_tokens: int, rope_theta: float, rope_start: int,
                rotate: int) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The tensors' first `sink_tokens` (fp16) and the rest (fp32, RoPE undone, rotated), each
    stacked along a new leading axis; each tensor's first transform writes straight into the
    stacked buffer, so stacking the layers of a cache costs no extra pass over them."""
    *lead, s, d = parts[0].shape
    sink = torch.empty(len(parts), *lead, sink_tokens, d, dtype=torch.float16) if sink_tokens else None
    body = torch.empty(len(parts), *lead, s - sink_tokens, d)
    for i, part in enumerate(parts):
        x = part.detach().float()
        if sink is not None:
            sink[i] = x[..., :sink_tokens, :]
        x = x[..., sink_tokens:, :]
        if rope_theta:
            rope(x, rope_theta, rope_start + sink_tokens, inverse=True, out=body[i])
        elif rotate and d % rotate == 0 and x.numel():
            torch.matmul(x.reshape(-1, rotate), hadamard_matrix(rotate), out=body[i].view(-1, rotate))
        else:
            body[i] = x
    if rope_theta and rotate:
        body = hadamard_rotate(body, rotate)
    return sink, body


_HADAMARD: dict[tuple[int, torch.dtype], torch.Tensor] = {}


def hadamard_matrix(d: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    key = (d, dtype)
    if key not in _HADAMARD:
        h = torch.ones(1, 1, dtype=torch.float64)
        while h.shape[0] < d:
            h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
        _HADAMARD[key] = (h / math.sqrt(d)).to(dtype)
    return _HADAMARD[key]


# --- rotary position embedding (keys are quantized before RoPE) ----------------------------


@functools.lru_cache(maxsize=16)
def rope_tables(n: int, d: int, theta: float, start: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [n, d/2] of positions start..start+n-1: the HF "rotate_half" layout, where
    channel i pairs with channel i + d/2 and rotates at theta^(-2i/d) per position."""
    inv = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    angle = torch.outer(torch.arange(start, start + n, dtype=torch.float64), inv)
    return angle.cos().float(), angle.sin().float()


@functools.lru_cache(maxsize=16)
def _rope_full(n: int, d: int, theta: float, start: int, inverse: bool) -> tuple[torch.Tensor, torch.Tensor]:
    cos, sin = rope_tables(n, d, theta, start)
    sign = 1.0 if inverse else -1.0
    return torch.cat((cos, cos), -1), torch.cat((sign * sin, -sign * sin), -1)


def rope(x: torch.Tensor, theta: float, start: int, inverse: bool = False,
         out: torch.Tensor | None = None) -> torch.Tensor:
    """Apply (or undo) RoPE on x [..., n, d] for positions start..start+n-1:
    out = x * cos + swap_halves(x) * (-sin | +sin), the sign flipped to undo it."""
    n, d = x.shape[-2:]
    cos, sin = _rope_full(n, d, float(theta), int(start), inverse)
    return torch.addcmul(x * cos, torch.roll(x, d // 2, -1), sin, out=out)


# --- "normal" levels: a codebook fitted to Gaussian data (after a rotation) -----------------

_FINE = 1024  # encode maps x / scale to one of 2 * _FINE + 1 fine bins, then to its nearest level


@functools.lru_cache(maxsize=8)
def normal_levels(bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Levels in [-1, 1] at quantiles of a standard normal (the NF4 construction of QLoRA,
    for any width 2..8; 0 is a level), and the fine-bin -> nearest-level lookup table."""
    n = 1 << bits
    offset = 0.9677
    pos = torch.special.ndtri(torch.linspace(offset, 0.5, n // 2 + 1, dtype=torch.float64)[:-1])
    neg = -torch.special.ndtri(torch.linspace(offset, 0.5, n // 2, dtype=torch.float64)[:-1])
    levels = torch.cat((neg, torch.zeros(1, dtype=torch.float64), pos)).sort().values
    levels = (levels / levels.abs().max()).float()
    fine = torch.arange(-_FINE, _FINE + 1, dtype=torch.float32) / _FINE
    lut = (fine.unsqueeze(1) - levels).abs().argmin(1).to(torch.uint8)
    return levels, lut


def normal_half_step(bits: int) -> float:
    """Largest |x / scale - level| a value can be left with: half the widest gap, plus a fine bin."""
    levels, _ = normal_levels(bits)
    return float((levels[1:] - levels[:-1]).max()) / 2 + 1.0 / _FINE


def quantize_normal(x: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric quantization of x [outer, n] in groups of `group` along dim 1 onto
    `normal_levels(bits)` times an fp16 scale >= the group's largest |x|.

    Returns (codes uint8 [outer, n], scale fp16 [outer, G])."""
    x = x.float()
    outer, n = x.shape
    _, lut = normal_levels(bits)
    codes = torch.empty(x.shape, dtype=torch.uint8)
    scales = []
    for start, stop, g in _parts(n, group):
        part = x[:, start:stop].view(outer, (stop - start) // g, g)
        top = torch.maximum(part.amax(2), part.amin(2).neg_())  # max |x| without an |x| copy
        if top.numel() and float(top.max()) > _F16_MAX:  # fp16 scales cannot describe more
            part = part.clamp(-_F16_MAX, _F16_MAX)
            top = top.clamp(max=_F16_MAX)
        scale = top.to(torch.float16)
        scale = torch.where(scale.float() < top, torch.nextafter(scale, scale.new_tensor(math.inf)), scale)
        s = scale.float().unsqueeze(2)
        inv = torch.where(s > 0, _FINE / s, torch.zeros_like(s))
        # |x| <= scale, so the fine bin lies in [0, 2 * _FINE]
        fine = part.mul(inv).add_(_FINE + 0.5).to(torch.int32)
        q = lut.index_select(0, fine.view(-1)).view(outer, stop - start)
        if stop - start == n:
            codes = q
        else:
            codes[:, start:stop] = q
        scales.append(scale)
    if not scales:
        return codes, torch.empty(outer, 0, dtype=torch.float16)
    return codes, scales[0] if len(scales) == 1 else torch.cat(scales, 1)


def dequantize_normal(codes: torch.Tensor, scale: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """Inverse of `quantize_normal`: fp32 [outer, n]."""
    levels, _ = normal_levels(bits)
    outer, n = codes.shape
    out = levels.index_select(0, codes.reshape(-1).int()).view(outer, n)
    for start, stop, g in _parts(n, group):
        cols = slice(start // group, start // group + (stop - start) // g)
        out[:, start:stop].view(outer, (stop - start) // g, g).mul_(scale[:, cols].float().unsqueeze(2))
    return out


# --- per-channel bit widths (keys) -----------------------------------------------------------

MIN_WIDTH, MAX_WIDTH = 2, 8


def channel_widths(score: torch.Tensor, mean_bits: int | torch.Tensor) -> torch.Tensor:
    """Bit widths [rows, d] (uint8, MIN_WIDTH..MAX_WIDTH) averaging `mean_bits` per row (one
    value, or one per row) that minimise sum(score * 4^-width): the greedy reverse water-filling
    of transform coding, done at once (a channel's gains fall with each bit, so the best N gains
    are prefixes)."""
    rows, d = score.shape
    means = torch.as_tensor(mean_bits, dtype=torch.int64).expand(rows)
    extra = (means * d - MIN_WIDTH * d).clamp(0, (MAX_WIDTH - MIN_WIDTH) * d)  # extra bits per row
    widths = torch.full((rows, d), MIN_WIDTH, dtype=torch.uint8)
    most = int(extra.max()) if rows else 0
    if not d or not most:
        return widths
    steps = torch.arange(MIN_WIDTH + 1, MAX_WIDTH + 1, dtype=torch.float64)
    gain = score.double().clamp_min(1e-300).log().unsqueeze(2) - steps * math.log(4.0)  # [rows, d, K]
    best = gain.reshape(rows, -1).topk(most, dim=1).indices  # sorted: a row's first `extra` are its best
    take = (torch.arange(most) < extra.unsqueeze(1)).to(torch.uint8)
    chosen = torch.zeros(rows, gain[0].numel(), dtype=torch.uint8).scatter_(1, best, take)
    return widths + chosen.view(rows, d, -1).sum(2, dtype=torch.uint8)


def _by_width(widths: torch.Tensor) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Channels (flattened [outer * d]) ordered by width, widest first, and the (width,
    count) of each run of equal widths in that order."""
    flat = widths.reshape(-1)
    order = torch.sort(flat, descending=True, stable=True).indices
    counts = torch.bincount(flat.long(), minlength=MAX_WIDTH + 1).tolist()
    return order, [(w, counts[w]) for w in range(MAX_WIDTH, 0, -1) if counts[w]]


def pack_widths(codes: torch.Tensor, widths: torch.Tensor) -> torch.Tensor:
    """Codes [outer, n, d] of per-channel widths [outer, d]: the channels widest first, each
    channel's n tokens in a row, every run of equal-width channels packed at its own width
    (`pack_codes`), so the codes take exactly their bits up to a byte per run."""
    outer, n, d = codes.shape
    order, runs = _by_width(widths)
    rows = codes.permute(0, 2, 1).reshape(outer * d, n).index_select(0, order)
    parts, start = [], 0
    for width, m in runs:
        parts.append(pack_codes(rows[start : start + m], width))
        start += m
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.uint8)


def unpack_widths(packed: torch.Tensor, widths: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of `pack_widths`: codes uint8 [outer, n, d]."""
    outer, d = widths.shape
    order, runs = _by_width(widths)
    parts, offset = [], 0
    for width, m in runs:
        size = code_bytes(m * n, width)
        parts.append(unpack_codes(packed[offset : offset + size], width, m * n).view(m, n))
        offset += size
    rows = torch.cat(parts) if parts else torch.empty(0, n, dtype=torch.uint8)
    out = torch.empty_like(rows).index_copy_(0, order, rows)
    return out.view(outer, d, n).permute(0, 2, 1).contiguous()


# --- whole KV tensors [batch, kv_heads, seq, head_dim] ---------------------------------------


def _view3(shape: tuple[int, ...], axis: str) -> tuple[int, int, int]:
    """A [..., seq, head_dim] tensor as [outer, n, inner] with the groups running along n."""
    *lead, s, d = shape
    if axis == "token":
        return math.prod(lead) * s, d, 1
    if axis == "channel":
        return math.prod(lead), s, d
    raise ValueError(f"unknown quantization axis {axis!r}")


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    flat = codes.reshape(-1)
    if bits == 8:
        return flat
    if bits == 4:
        return pack_nibbles(flat)
    return pack_lanes(flat, bits)


def unpack_codes(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    if bits == 8:
        return packed
    if bits == 4:
        return unpack_nibbles(packed, n)
    return unpack_lanes(packed, bits, n)


# (lane width, mask of the low lane of each pair, one bit at the start of each pair)
_LANES = ((8, 0x00FF00FF00FF00FF, 0x0001000100010001), (16, 0x0000FFFF0000FFFF, 0x0000000100000001),
          (32, 0x00000000FFFFFFFF, 1))


def pack_lanes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes of 1..7 bits, eight per `bits` bytes: the eight codes of an int64 word (one per
    byte) are moved together in three steps (pairs of bytes, of 16-bit and of 32-bit lanes),
    a few whole-tensor int64 operations instead of one pass per bit."""
    n = codes.numel()
    x = codes.reshape(-1)
    if n % 8 or x.storage_offset() % 8:  # int64 words need whole, aligned groups of eight
        x = torch.cat((x, x.new_zeros(-n % 8)))
    words = x.view(torch.int64)
    field = bits  # bits held in each low lane so far
    for step, (lane, low, _) in enumerate(_LANES):
        high = (words >> lane).bitwise_and_(low).bitwise_left_shift_(field)
        words = (words & low) if step == 0 else words.bitwise_and_(low)  # the input stays intact
        words.bitwise_or_(high)
        field *= 2
    return words.view(torch.uint8).view(-1, 8)[:, :bits].reshape(-1)


def unpack_lanes(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of `pack_lanes` for n codes."""
    m = (n + 7) // 8
    bytes8 = torch.zeros(m, 8, dtype=torch.uint8)
    bytes8[:, :bits] = packed[: m * bits].view(m, bits)
    words = bytes8.view(torch.int64).view(-1)
    field = 4 * bits
    for lane, _, start in reversed(_LANES):
        low = ((1 << field) - 1) * start  # the low field of every pair of lanes
        high = (words >> field).bitwise_and_(low).bitwise_left_shift_(lane)
        words.bitwise_and_(low).bitwise_or_(high)
        field //= 2
    return words.view(torch.uint8)[:n]


def code_bytes(n: int, bits: int) -> int:
    """Wire bytes of n packed codes."""
    if bits in (4, 8):
        return (n * bits + 7) // 8
    return (n + 7) // 8 * bits


def encode_tensor(
    t: torch.Tensor | Sequence[torch.Tensor],
    bits: int | Sequence[int],
    group: int,
    axis: str,
    rotate: int,
    sink_tokens: int,
    levels: str = "uniform",
    rope_theta: float = 0.0,
    rope_start: int = 0,
    widths: bool = False,
    weights: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Quantize one KV tensor, or a stack of same-shaped ones (the layers of a cache, encoded
    in one pass as one tensor with a leading layer axis); returns the named buffers that go on
    the wire.

    Steps, each optional: the first `sink_tokens` travel in fp16; RoPE is undone (keys, for
    positions rope_start + sink_tokens onwards) so that each channel keeps a fixed range over
    the sequence; a block-`rotate` Hadamard rotation spreads outliers; then integer codes:
    `levels` "uniform" (asymmetric, fp16 zero + scale per group) or "normal" (symmetric,
    Gaussian-quantile levels, fp16 scale per group, axis "token" only). With `widths` (axis
    "channel", uniform levels) each channel gets its own bit width, `bits` on average per
    row (for a stack: one mean per tensor), allotted by range^2 x `weights` [kv_heads,
    head_dim] (for a stack: [tensors, kv_heads, head_dim]), the query energy of the channel:
    an error e in a key moves attention logits by q.e. Only the encoder needs the weights:
    the widths travel as a buffer.
    """
    stacked = not isinstance(t, torch.Tensor)
    parts = list(t) if stacked else [t]
    per_part = [bits] * len(parts) if isinstance(bits, int) else list(bits)
    if len(per_part) != len(parts) or not all(1 <= b <= 8 for b in per_part):
        raise ValueError(f"unsupported bit width(s) {bits}")
    if len(set(per_part)) > 1 and not widths:
        raise ValueError("per-tensor bit widths need per-channel widths")
    sink, x = first_pass(parts, sink_tokens, rope_theta, rope_start, rotate)
    if not stacked:
        sink, x = (sink[0] if sink is not None else None), x[0]
    buffers: dict[str, torch.Tensor] = {}
    if sink is not None:
        buffers["sink"] = sink
    v3 = _view3(tuple(x.shape), axis)
    if levels == "normal":
        codes, scale = quantize_normal(x.reshape(v3[0], v3[1]), per_part[0], group)
        buffers["codes"] = pack_codes(codes, per_part[0])
        buffers["scale"] = scale
        return buffers
    x3 = x.reshape(v3)
    if widths:
        bounds = (x3.amin(1), x3.amax(1)) if v3[1] else None
        score = (bounds[1] - bounds[0]).square() if bounds else torch.zeros(v3[0], v3[2])
        lead = x.shape[:-2]
        if weights is not None:
            w = weights.float().unsqueeze(1) if stacked else weights.float()  # broadcast over the batch
            score = score * w.expand(*lead, v3[2]).reshape(v3[0], v3[2])
        # one mean per tensor (a single tensor: one for all its rows), spread over its rows
        row_bits = torch.tensor(per_part).view(len(per_part), *[1] * (len(lead) - 1))
        w = channel_widths(score, row_bits.expand(lead).reshape(-1))
        codes, zero, scale = quantize(x3, per_part[0], group, widths=w, bounds=bounds)
        buffers["widths"] = w
        buffers["codes"] = pack_widths(codes, w)
    else:
        codes, zero, scale = quantize(x3, per_part[0], group)
        buffers["codes"] = pack_codes(codes, per_part[0])
    buffers["zero"] = zero
    buffers["scale"] = scale
    return buffers


def decode_tensor(
    buffers: dict[str, torch.Tensor],
    shape: tuple[int, ...],
    bits: int,
    group: int,
    axis: str,
    rotate: int,
    sink_tokens: int,
    levels: str = "uniform",
    rope_theta: float = 0.0,
    rope_start: int = 0,
    widths: bool = False,
) -> torch.Tensor:
    """Inverse of `encode_tensor`: an fp32 tensor of `shape`."""
    *lead, s, d = shape
    qshape = (*lead, s - sink_tokens, d)
    v3 = _view3(qshape, axis)
    if levels == "normal":
        codes = unpack_codes(buffers["codes"], bits, math.prod(v3)).view(v3[0], v3[1])
        x = dequantize_normal(codes, buffers["scale"], bits, group).view(qshape)
    else:
        if widths:
            codes = unpack_widths(buffers["codes"], buffers["widths"], v3[1])
        else:
            codes = unpack_codes(buffers["codes"], bits, math.prod(v3)).view(v3)
        x = dequantize(codes, buffers["zero"], buffers["scale"], group).view(qshape)
    return last_pass(x, buffers.get("sink"), rotate, rope_theta, rope_start)


def last_pass(x: torch.Tensor, sink: torch.Tensor | None, rotate: int, rope_theta: float,
              rope_start: int) -> torch.Tensor:
    """Inverse of `first_pass` for dequantized values x [..., s - sink_tokens, d]: rotate back,
    redo RoPE, put the fp16 sink tokens in front."""
    sink_tokens = sink.shape[-2] if sink is not None else 0
    if rotate:
        x = hadamard_rotate(x, rotate)
    if rope_theta:
        x = rope(x, rope_theta, rope_start + sink_tokens)
    if sink is not None:
        x = torch.cat((sink.float(), x), dim=-2)
    return x


def error_bound(
    buffers: dict[str, torch.Tensor],
    shape: tuple[int, ...],
    bits: int,
    group: int,
    axis: str,
    rotate: int,
    sink_tokens: int,
    levels: str = "uniform",
    rope_theta: float = 0.0,
    rope_start: int = 0,
    widths: bool = False,
) -> torch.Tensor:
    """Per-value bound on |decoded - original| from quantization alone (fp32 decode).

    Half a step of the value's group (for normal levels: half the widest gap of the scaled
    codebook, plus a fine bin). After a Hadamard rotation of block b each output is a
    +-1/sqrt(b) combination of the block's rotated errors, so its bound is their sum / sqrt(b);
    re-applying RoPE mixes channel pairs (i, i + d/2) with |cos| and |sin| weights. Sink
    tokens are exact up to fp16 rounding, which the caller accounts for.
    """
    *lead, s, d = shape
    qshape = (*lead, s - sink_tokens, d)
    outer, n, inner = _view3(qshape, axis)
    scale = buffers["scale"].float()
    if levels == "normal":
        scale = (scale * normal_half_step(bits)).unsqueeze(2)
    else:
        scale = scale / 2
    steps = scale.repeat_interleave(group, dim=1)[:, :n] if scale.numel() else torch.zeros(outer, n, inner)
    return propagate_bound(steps.expand(outer, n, inner).reshape(qshape), rotate, rope_theta, rope_start,
                           sink_tokens)


def propagate_bound(half: torch.Tensor, rotate: int, rope_theta: float, rope_start: int,
                    sink_tokens: int) -> torch.Tensor:
    """A per-value error bound in the quantized domain [..., s - sink_tokens, d] carried back
    through `last_pass` (the sink tokens get 0)."""
    *lead, _, d = half.shape
    qshape = tuple(half.shape)
    if rotate and d:
        blocks = half.reshape(*qshape[:-1], d // rotate, rotate)
        half = (blocks.sum(-1, keepdim=True) / math.sqrt(rotate)).expand(blocks.shape).reshape(qshape)
    if rope_theta and d:
        cos, sin = rope_tables(qshape[-2], d, float(rope_theta), int(rope_start + sink_tokens))
        h1, h2 = half[..., : d // 2], half[..., d // 2 :]
        half = torch.cat((h1 * cos.abs() + h2 * sin.abs(), h2 * cos.abs() + h1 * sin.abs()), -1)
    return torch.cat((torch.zeros(*lead, sink_tokens, d), half), dim=-2)
