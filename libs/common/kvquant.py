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


def _group_view(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Split rows [R, n] into full groups [R, n // group, group] and the tail [R, n % group] (or None)."""
    rows, n = x.shape
    full = n // group
    head = x[:, : full * group].reshape(rows, full, group)
    tail = x[:, full * group :].reshape(rows, 1, n - full * group) if n % group else None
    return head, tail


def _ranges(g: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group fp16 (zero, scale) such that zero <= min and zero + levels * scale >= max."""
    lo, hi = torch.aminmax(g, dim=-1)
    lo = lo.clamp(-_F16_MAX, _F16_MAX)
    hi = hi.clamp(-_F16_MAX, _F16_MAX)
    zero = lo.to(torch.float16)
    # fp16 rounding may lift the minimum above the data: step it down one ulp where it did.
    zero = torch.where(zero.float() > lo, torch.nextafter(zero, zero.new_tensor(-math.inf)), zero)
    span = (hi - zero.float()).clamp_min(0)
    scale = (span / levels).to(torch.float16)
    short = scale.float() * levels + zero.float() < hi
    scale = torch.where(short, torch.nextafter(scale, scale.new_tensor(math.inf)), scale)
    return zero, scale


def _codes(g: torch.Tensor, zero: torch.Tensor, scale: torch.Tensor, levels: int) -> torch.Tensor:
    z = zero.float().unsqueeze(-1)
    s = scale.float().unsqueeze(-1)
    inv = torch.where(s > 0, 1.0 / s, torch.zeros_like(s))
    return (g - z).mul_(inv).round_().clamp_(0, levels).to(torch.uint8)


def quantize_rows(x: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize rows [R, n] in groups along the last axis.

    Returns (codes uint8 [R * n] in row-major order, zero fp16 [R, G], scale fp16 [R, G]),
    where G = ceil(n / group).
    """
    levels = (1 << bits) - 1
    x = x.float()
    rows, n = x.shape
    head, tail = _group_view(x, group)
    zeros, scales, codes = [], [], []
    for part in (head, tail):
        if part is None or part.shape[1] == 0:
            continue
        zero, scale = _ranges(part, levels)
        zeros.append(zero)
        scales.append(scale)
        codes.append(_codes(part, zero, scale, levels).reshape(rows, part.shape[1] * part.shape[2]))
    if not codes:
        empty = torch.empty(rows, 0, dtype=torch.float16)
        return torch.empty(0, dtype=torch.uint8), empty, empty
    return torch.cat(codes, 1).reshape(-1), torch.cat(zeros, 1), torch.cat(scales, 1)


def dequantize_rows(
    codes: torch.Tensor, zero: torch.Tensor, scale: torch.Tensor, rows: int, n: int, group: int
) -> torch.Tensor:
    """Inverse of `quantize_rows`: fp32 [rows, n]."""
    out = torch.empty(rows, n, dtype=torch.float32)
    if rows == 0 or n == 0:
        return out
    full = n // group
    c = codes.reshape(rows, n)
    if full:
        head = out[:, : full * group].view(rows, full, group)
        torch.addcmul(
            zero[:, :full].float().unsqueeze(-1),
            c[:, : full * group].reshape(rows, full, group),
            scale[:, :full].float().unsqueeze(-1),
            out=head,
        )
    if n % group:
        tail = c[:, full * group :].float()
        out[:, full * group :] = tail * scale[:, full:].float() + zero[:, full:].float()
    return out


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


def _row_shape(shape: tuple[int, ...], axis: str) -> tuple[int, int]:
    """(rows, row length) of a [..., seq, head_dim] tensor laid out for grouping along `axis`."""
    *lead, s, d = shape
    if axis == "token":
        return math.prod(lead) * s, d
    if axis == "channel":
        return math.prod(lead) * d, s
    raise ValueError(f"unknown quantization axis {axis!r}")


def _to_rows(x: torch.Tensor, axis: str) -> torch.Tensor:
    rows = _row_shape(tuple(x.shape), axis)
    return (x if axis == "token" else x.transpose(-1, -2)).reshape(rows)


def _from_rows(rows: torch.Tensor, shape: tuple[int, ...], axis: str) -> torch.Tensor:
    if axis == "token":
        return rows.reshape(shape)
    *lead, s, d = shape
    return rows.reshape(*lead, d, s).transpose(-1, -2)


def encode_tensor(
    t: torch.Tensor, bits: int, group: int, axis: str, rotate: bool, sink_tokens: int
) -> dict[str, torch.Tensor]:
    """Quantize one KV tensor; returns the named buffers that go on the wire."""
    if bits not in (4, 8):
        raise ValueError(f"unsupported bit width {bits}")
    x = t.detach().float()
    buffers: dict[str, torch.Tensor] = {}
    if sink_tokens:
        buffers["sink"] = x[..., :sink_tokens, :].to(torch.float16).contiguous()
        x = x[..., sink_tokens:, :]
    if rotate:
        x = hadamard_rotate(x)
    rows = _to_rows(x, axis)
    codes, zero, scale = quantize_rows(rows, bits, group)
    buffers["codes"] = pack_nibbles(codes) if bits == 4 else codes
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
    n = math.prod(qshape)
    codes = buffers["codes"]
    if bits == 4:
        codes = unpack_nibbles(codes, n)
    r, c = _row_shape(qshape, axis)
    x = _from_rows(dequantize_rows(codes, buffers["zero"], buffers["scale"], r, c, group), qshape, axis)
    if rotate:
        x = hadamard_rotate(x)
    if sink_tokens:
        x = torch.cat((buffers["sink"].float(), x), dim=-2)
    return x.contiguous()


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

    Half a step of the value's group; after a Hadamard rotation each output mixes every
    rotated value with weight 1/sqrt(d), so the bound is the mean half step / sqrt(d) * d.
    Sink tokens are exact up to fp16 rounding, which the caller accounts for.
    """
    *lead, s, d = shape
    qshape = (*lead, s - sink_tokens, d)
    r, c = _row_shape(qshape, axis)
    scale = buffers["scale"].float()
    steps = scale.repeat_interleave(group, dim=1)[:, :c] if r and c else torch.zeros(r, c)
    half = _from_rows(steps.reshape(r, c) / 2, qshape, axis)
    if rotate and d:
        half = (half.sum(-1, keepdim=True) / math.sqrt(d)).expand(qshape)
    return torch.cat((torch.zeros(*lead, sink_tokens, d), half), dim=-2)
