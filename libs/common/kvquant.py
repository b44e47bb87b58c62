"""Quantization kernels for the KV codec (DESIGN.md §4).

Plain torch, CPU- and GPU-agnostic. The unit everywhere is a 2-D tensor of *rows*; each row
is cut into groups of `group` values along its last axis (the last group of a row may be
shorter), and each group gets its own asymmetric range: an fp16 minimum ("zero") and an
fp16 step ("scale"). Codes are unsigned `bits`-bit integers; 4-bit codes are packed two per
byte. Decoding reproduces `code * scale + zero` in fp32, so every value comes back within
half a step of its group (the fp16 range is rounded outward so that no value is clipped).

`hadamard_rotate` is the orthonormal Walsh-Hadamard transform along the last axis, used to
spread outlier channels over a whole head before quantizing (it is its own inverse).
"""

from __future__ import annotations

import math

import torch

_F16_MAX = float(torch.finfo(torch.float16).max)


def _parts(n: int, group: int) -> list[tuple[int, int, int]]:
    """(start, stop, group size) of the full groups and of the shorter last group along an axis."""
    full = n // group * group
    parts = [(0, full, group)] if full else []
    if n > full:
        parts.append((full, n, n - full))
    return parts


def _ranges(lo: torch.Tensor, hi: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group fp16 (zero, scale) with zero <= lo and zero + levels * scale >= hi.

    Checked in float64 (these tensors are small): in fp32 a step far below the values' own
    precision would pass the check and let the top code overflow.
    """
    lo = lo.double().clamp(-_F16_MAX, _F16_MAX)
    hi = hi.double().clamp(-_F16_MAX, _F16_MAX)
    zero = lo.to(torch.float16)
    # fp16 rounding may lift the minimum above the data: step it down one ulp where it did.
    zero = torch.where(zero.double() > lo, torch.nextafter(zero, zero.new_tensor(-math.inf)), zero)
    span = (hi - zero.double()).clamp_min(0)
    scale = (span / levels).to(torch.float16)
    short = scale.double() * levels + zero.double() < hi
    scale = torch.where(short, torch.nextafter(scale, scale.new_tensor(math.inf)), scale)
    return zero, scale


def quantize(x: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize x [outer, n, inner] in groups of `group` along dim 1.

    Returns (codes uint8 of x's shape, zero fp16 [outer, G, inner], scale fp16 [outer, G, inner])
    with G = ceil(n / group). Keys per channel use inner = head_dim (groups run over tokens
    and no transpose is needed); values per token use inner = 1.
    """
    levels = (1 << bits) - 1
    x = x.float()
    outer, n, inner = x.shape
    codes = torch.empty(x.shape, dtype=torch.uint8)
    zeros, scales = [], []
    for start, stop, g in _parts(n, group):
        part = x[:, start:stop].view(outer, (stop - start) // g, g, inner)
        lo, hi = part.amin(2), part.amax(2)
        if lo.numel() and (float(lo.min()) < -_F16_MAX or float(hi.max()) > _F16_MAX):
            part = part.clamp(-_F16_MAX, _F16_MAX)  # fp16 scales cannot describe a wider range
        zero, scale = _ranges(lo, hi, levels)
        z = zero.float().unsqueeze(2)
        s = scale.float().unsqueeze(2)
        inv = torch.where(s > 0, 1.0 / s, torch.zeros_like(s))
        # (x - zero) / scale lies in [0, levels]; +0.5 then truncation rounds to nearest.
        # float -> int16 -> uint8 is much faster in torch than float -> uint8.
        q = (part - z).mul_(inv).add_(0.5).to(torch.int16).clamp_(max=levels).to(torch.uint8)
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
    out = codes.float()
    outer, n, inner = out.shape
    for start, stop, g in _parts(n, group):
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


def hadamard_rotate(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal Walsh-Hadamard transform along the last axis (length a power of two).

    H is symmetric and orthonormal, so applying it twice gives back the input.
    """
    d = x.shape[-1]
    if d & (d - 1):
        raise ValueError(f"Hadamard rotation needs a power-of-two length, got {d}")
    return x @ hadamard_matrix(d, x.dtype)


_HADAMARD: dict[tuple[int, torch.dtype], torch.Tensor] = {}


def hadamard_matrix(d: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    key = (d, dtype)
    if key not in _HADAMARD:
        h = torch.ones(1, 1, dtype=torch.float64)
        while h.shape[0] < d:
            h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
        _HADAMARD[key] = (h / math.sqrt(d)).to(dtype)
    return _HADAMARD[key]


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
    return pack_bitplanes(flat, bits)


def unpack_codes(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    if bits == 8:
        return packed
    if bits == 4:
        return unpack_nibbles(packed, n)
    return unpack_bitplanes(packed, bits, n)


def pack_bitplanes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Any width 1..8: bit j of every code goes to plane j, eight codes per byte."""
    n = codes.numel()
    padded = torch.zeros((n + 7) // 8 * 8, dtype=torch.uint8)
    padded[:n] = codes
    weights = torch.tensor([1 << i for i in range(8)], dtype=torch.uint8)
    planes = [((padded >> j) & 1).view(-1, 8).mul_(weights).sum(1, dtype=torch.uint8) for j in range(bits)]
    return torch.cat(planes) if planes else padded[:0]


def unpack_bitplanes(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    per_plane = (n + 7) // 8
    out = torch.zeros(per_plane * 8, dtype=torch.uint8)
    shifts = torch.arange(8, dtype=torch.uint8)
    for j in range(bits):
        plane = packed[j * per_plane : (j + 1) * per_plane]
        out |= ((plane.unsqueeze(1) >> shifts) & 1).reshape(-1) << j
    return out[:n]


def code_bytes(n: int, bits: int) -> int:
    """Wire bytes of n packed codes."""
    if bits in (4, 8):
        return (n * bits + 7) // 8
    return (n + 7) // 8 * bits


def encode_tensor(
    t: torch.Tensor, bits: int, group: int, axis: str, rotate: bool, sink_tokens: int
) -> dict[str, torch.Tensor]:
    """Quantize one KV tensor; returns the named buffers that go on the wire."""
    if not 1 <= bits <= 8:
        raise ValueError(f"unsupported bit width {bits}")
    x = t.detach().float()
    buffers: dict[str, torch.Tensor] = {}
    if sink_tokens:
        buffers["sink"] = x[..., :sink_tokens, :].to(torch.float16).contiguous()
        x = x[..., sink_tokens:, :]
    if rotate:
        x = hadamard_rotate(x)
    codes, zero, scale = quantize(x.reshape(_view3(tuple(x.shape), axis)), bits, group)
    buffers["codes"] = pack_codes(codes, bits)
    buffers["zero"] = zero
    buffers["scale"] = scale
    return buffers


def decode_tensor(
    buffers: dict[str, torch.Tensor],
    shape: tuple[int, ...],
    bits: int,
    group: int,
    axis: str,
    rotate: bool,
    sink_tokens: int,
) -> torch.Tensor:
    """Inverse of `encode_tensor`: an fp32 tensor of `shape`."""
    *lead, s, d = shape
    qshape = (*lead, s - sink_tokens, d)
    v3 = _view3(qshape, axis)
    codes = unpack_codes(buffers["codes"], bits, math.prod(v3)).view(v3)
    x = dequantize(codes, buffers["zero"], buffers["scale"], group).view(qshape)
    if rotate:
        x = hadamard_rotate(x)
    if sink_tokens:
        x = torch.cat((buffers["sink"].float(), x), dim=-2)
    return x


def error_bound(
    buffers: dict[str, torch.Tensor],
    shape: tuple[int, ...],
    bits: int,
    group: int,
    axis: str,
    rotate: bool,
    sink_tokens: int,
) -> torch.Tensor:
    """Per-value bound on |decoded - original| from quantization alone (fp32 decode).

    Half a step of the value's group. After a Hadamard rotation each output is a +-1/sqrt(d)
    combination of the rotated errors, so its bound is sum(half steps) / sqrt(d). Sink tokens
    are exact up to fp16 rounding, which the caller accounts for.
    """
    *lead, s, d = shape
    qshape = (*lead, s - sink_tokens, d)
    outer, n, inner = _view3(qshape, axis)
    scale = buffers["scale"].float()
    steps = scale.repeat_interleave(group, dim=1)[:, :n] if scale.numel() else torch.zeros(outer, n, inner)
    half = (steps.expand(outer, n, inner) / 2).reshape(qshape)
    if rotate and d:
        half = (half.sum(-1, keepdim=True) / math.sqrt(d)).expand(qshape)
    return torch.cat((torch.zeros(*lead, sink_tokens, d), half), dim=-2)
