"""KV-cache codecs for the prefill -> decode hop (DESIGN.md §4).

Compression is for transport only: prefill encodes, decode decodes, and decode computes
in full precision. Interface (other tools rely on these names):

    codec = get_codec("int4")
    packed = codec.encode(tensor, kind="key")   # tensor: [batch, kv_heads, seq, head_dim]
    packed.nbytes                               # exact bytes on the wire, scales included
    codec.decode(packed)                        # original shape and dtype

A whole cache (one (key, value) pair per layer) travels as one flat uint8 buffer plus a
small msgpack-able manifest: `pack_cache` / `unpack_cache`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import torch

from thunderserve.common import kvquant

KVLayers = list[tuple[torch.Tensor, torch.Tensor]]

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "uint8": torch.uint8,
    "int8": torch.int8,
    "int32": torch.int32,
}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"unsupported dtype {name!r}") from None


@dataclass
class PackedTensor:
    """One encoded tensor: named buffers plus what the decoder needs to rebuild it."""

    codec: str
    kind: str  # "key" | "value"
    shape: tuple[int, ...]
    dtype: str  # original dtype name
    buffers: dict[str, torch.Tensor]
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers.values())


class KVCodec(Protocol):
    name: str

    def encode(self, tensor: torch.Tensor, kind: str = "key") -> PackedTensor: ...

    def decode(self, packed: PackedTensor) -> torch.Tensor: ...


class NoneCodec:
    """No compression: the tensor's own bytes."""

    name = "none"

    def encode(self, tensor: torch.Tensor, kind: str = "key") -> PackedTensor:
        return PackedTensor(
            self.name, kind, tuple(tensor.shape), dtype_name(tensor.dtype), {"data": tensor.contiguous()}
        )

    def decode(self, packed: PackedTensor) -> torch.Tensor:
        return packed.buffers["data"].reshape(packed.shape).to(dtype_from_name(packed.dtype))


@dataclass(frozen=True)
class QuantSpec:
    """How one kind of tensor (keys or values) is quantized.

    axis "token": groups run along head_dim (one token's vector); axis "channel": groups run
    along the sequence (one channel over many tokens, KIVI-style for keys).
    """

    bits: int
    group: int
    axis: str = "token"
    rotate: bool = False  # Hadamard along head_dim first: spreads outlier channels
    sink_tokens: int = 0  # the first tokens travel in fp16 (attention sinks)

    def params(self) -> dict[str, Any]:
        return {
            "bits": self.bits,
            "group": self.group,
            "axis": self.axis,
            "rotate": self.rotate,
            "sink_tokens": self.sink_tokens,
        }

    @classmethod
    def from_params(cls, p: dict[str, Any]) -> QuantSpec:
        return cls(int(p["bits"]), int(p["group"]), str(p["axis"]), bool(p["rotate"]), int(p["sink_tokens"]))


def _fit(spec: QuantSpec, shape: tuple[int, ...]) -> QuantSpec:
    """The spec as it applies to one tensor: no more sink tokens than it has, rotation only
    for power-of-two head_dim."""
    seq, head_dim = shape[-2], shape[-1]
    rotate = spec.rotate and head_dim > 0 and head_dim & (head_dim - 1) == 0
    return replace(spec, rotate=rotate, sink_tokens=min(spec.sink_tokens, seq))


class GroupQuantCodec:
    """Asymmetric integer quantization in groups, fp16 zero + scale per group (DESIGN.md §4).

    Everything the decoder needs travels in `params`, so a packed tensor decodes with any
    instance of the codec, whatever spec that instance would itself use to encode.
    """

    name = "int8"
    key_spec = QuantSpec(8, 64, "token")
    value_spec = QuantSpec(8, 64, "token")

    def __init__(self, key_spec: QuantSpec | None = None, value_spec: QuantSpec | None = None) -> None:
        self.key_spec = key_spec or self.key_spec
        self.value_spec = value_spec or self.value_spec

    def encode(self, tensor: torch.Tensor, kind: str = "key") -> PackedTensor:
        spec = _fit(self.key_spec if kind == "key" else self.value_spec, tuple(tensor.shape))
        params = spec.params()
        buffers = kvquant.encode_tensor(tensor, **params)
        return PackedTensor(self.name, kind, tuple(tensor.shape), dtype_name(tensor.dtype), buffers, params)

    def decode(self, packed: PackedTensor) -> torch.Tensor:
        params = QuantSpec.from_params(packed.params).params()  # validates and normalises types
        out = kvquant.decode_tensor(packed.buffers, packed.shape, **params)
        return out.to(dtype_from_name(packed.dtype))


# Choices measured on SmolLM2 (docs/benchmarks.md, "KV codec"): keys are ~5x more sensitive
# than values, per-channel key groups beat per-token ones, and the first (attention-sink)
# token's key in fp16 halves the KL; a Hadamard rotation helps int4 keys but not int8.


class Int8Codec(GroupQuantCodec):
    name = "int8"
    key_spec = QuantSpec(8, 64, "channel", sink_tokens=1)
    value_spec = QuantSpec(8, 64, "token")


class Int4Codec(GroupQuantCodec):
    name = "int4"
    key_spec = QuantSpec(4, 64, "channel", rotate=True, sink_tokens=1)
    value_spec = QuantSpec(4, 64, "token", rotate=True)


_CODECS: dict[str, type] = {"none": NoneCodec, "int8": Int8Codec, "int4": Int4Codec}
DEFAULT_CODEC = "int4"


def register_codec(name: str, cls: type) -> None:
    _CODECS[name] = cls


def codec_names() -> list[str]:
    return sorted(_CODECS)


def get_codec(name: str) -> KVCodec:
    try:
        return _CODECS[name]()
    except KeyError:
        raise ValueError(f"unknown KV codec {name!r}; choose one of {', '.join(codec_names())}") from None


# --- whole-cache framing for the channel -------------------------------------------------


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def pack_cache(codec: KVCodec, layers: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[
    torch.Tensor, dict[str, Any]
]:
    """Encode every layer's (key, value) and frame them into one uint8 buffer + manifest."""
    entries: list[dict[str, Any]] = []
    chunks: list[torch.Tensor] = []
    offset = 0
    for index, (key, value) in enumerate(layers):
        # A codec may choose per layer (e.g. more bits for sensitive layers); params say which.
        layer_codec = codec.for_layer(index, len(layers)) if hasattr(codec, "for_layer") else codec
        for packed in (layer_codec.encode(key, kind="key"), layer_codec.encode(value, kind="value")):
            bufs = []
            for bname, buf in packed.buffers.items():
                raw = _as_bytes(buf)
                bufs.append([bname, dtype_name(buf.dtype), list(buf.shape), offset, raw.numel()])
                chunks.append(raw)
                offset += raw.numel()
            entry = {
                "kind": packed.kind,
                "shape": list(packed.shape),
                "dtype": packed.dtype,
                "params": packed.params,
                "buffers": bufs,
            }
            if packed.codec != codec.name:  # a per-layer choice: name it for the decoder
                entry["codec"] = packed.codec
            entries.append(entry)
    payload = torch.cat(chunks) if chunks else torch.empty(0, dtype=torch.uint8)
    return payload, {"codec": codec.name, "entries": entries, "nbytes": offset}


def unpack_cache(payload: torch.Tensor, manifest: dict[str, Any]) -> KVLayers:
    """Inverse of `pack_cache`: returns [(key, value), ...] in the original dtype."""
    codecs = {manifest["codec"]: get_codec(manifest["codec"])}
    if payload.numel() != manifest["nbytes"]:
        raise ValueError(f"KV payload has {payload.numel()} bytes, manifest says {manifest['nbytes']}")
    tensors = []
    for entry in manifest["entries"]:
        buffers = {}
        for bname, bdtype, bshape, off, n in entry["buffers"]:
            buffers[bname] = payload[off : off + n].view(dtype_from_name(bdtype)).reshape(bshape)
        name = entry.get("codec", manifest["codec"])
        if name not in codecs:
            codecs[name] = get_codec(name)
        packed = PackedTensor(name, entry["kind"], tuple(entry["shape"]), entry["dtype"], buffers, entry["params"])
        tensors.append(codecs[name].decode(packed))
    return [(tensors[i], tensors[i + 1]) for i in range(0, len(tensors), 2)]
