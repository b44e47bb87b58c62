"""KV-cache codecs for the prefill -> decode hop (DESIGN.md §4).

Compression is for transport only: prefill encodes, decode decodes, and decode computes
in full precision. Interface (other tools rely on these names):

    codec = get_codec("int4")
    packed = codec.encode(tensor, kind="key")   # tensor: [batch, kv_heads, seq, head_dim]
    packed.nbytes                               # exact bytes on the wire, scales included
    codec.decode(packed)                        # original shape and dtype

A whole cache (one (key, value) pair per layer) travels as one flat uint8 buffer plus a
small msgpack-able manifest: `pack_cache` / `unpack_cache`. The first layer's KV depends on the
tokens alone, so a receiver with the model can rebuild it exactly (`engine.first_layer_kv`);
`int4` then leaves it out (`pack_cache(..., rebuild=True)`). Or it travels in runs of consecutive
layers, each a payload and manifest of its own, so the receiver decodes one run while the sender
encodes the next: `pack_runs` / `unpack_runs` (the channel side: `kvchannel.send_parts` /
`recv_parts`). Either way a cache codes on several threads when asked (`threads=`).
"""

from __future__ import annotations

import copy
import functools
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import torch

from thunderserve.common import config, kventropy, kvprofiles, kvquant

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
    layers: tuple[int, ...] | None = None  # a stack of these cache layers (shape has a leading layer axis)

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
    """How one kind of tensor (keys or values) is quantized (see `kvquant.encode_tensor`).

    axis "token": groups run along head_dim (one token's vector); axis "channel": groups run
    along the sequence (one channel over many tokens, KIVI-style for keys).
    """

    bits: int  # code width; with `widths`, the mean width per channel
    group: int
    axis: str = "token"
    rotate: int = 0  # Hadamard block along head_dim (0 = none): spreads outlier channels
    sink_tokens: int = 0  # the first tokens travel in fp16 (attention sinks)
    levels: str = "uniform"  # "uniform" (asymmetric) | "normal" (Gaussian-quantile codebook)
    rope_theta: float = 0.0  # > 0: undo RoPE before quantizing (keys), redo it on decode
    rope_start: int = 0  # position of the tensor's first token
    widths: bool = False  # per-channel bit widths (axis "channel")

    def params(self) -> dict[str, Any]:
        return {
            "bits": self.bits,
            "group": self.group,
            "axis": self.axis,
            "rotate": self.rotate,
            "sink_tokens": self.sink_tokens,
            "levels": self.levels,
            "rope_theta": self.rope_theta,
            "rope_start": self.rope_start,
            "widths": self.widths,
        }

    @classmethod
    def from_params(cls, p: dict[str, Any]) -> QuantSpec:
        spec = cls(
            int(p["bits"]), int(p["group"]), str(p["axis"]), int(p["rotate"]), int(p["sink_tokens"]),
            str(p["levels"]), float(p["rope_theta"]), int(p["rope_start"]), bool(p["widths"]),
        )
        if spec.levels not in ("uniform", "normal") or (spec.levels == "normal" and spec.axis != "token"):
            raise ValueError(f"unsupported levels {spec.levels!r} on axis {spec.axis!r}")
        return spec


def _fit(spec: QuantSpec, shape: tuple[int, ...]) -> QuantSpec:
    """The spec as it applies to one tensor: no more sink tokens than it has, a rotation block
    only if it is a power of two dividing head_dim, RoPE only for an even head_dim, per-channel
    widths only on the channel axis, normal levels only from 2 bits."""
    rotate, sink_tokens, rope_theta = _fit_transforms(spec.rotate, spec.sink_tokens, spec.rope_theta, shape)
    levels = spec.levels if spec.bits >= 2 else "uniform"
    return replace(spec, rotate=rotate, sink_tokens=sink_tokens, rope_theta=rope_theta,
                   widths=spec.widths and spec.axis == "channel" and levels == "uniform", levels=levels)


def _fit_transforms(rotate: int, sink_tokens: int, rope_theta: float,
                    shape: tuple[int, ...]) -> tuple[int, int, float]:
    """(rotate, sink_tokens, rope_theta) as they apply to a tensor of `shape`: a rotation block
    only if it is a power of two dividing head_dim, no more sink tokens than it has, RoPE only
    for an even head_dim."""
    seq, head_dim = shape[-2], shape[-1]
    block = min(rotate, head_dim)
    rotate = block if block > 0 and block & (block - 1) == 0 and head_dim % block == 0 else 0
    return rotate, min(sink_tokens, seq), rope_theta if head_dim % 2 == 0 else 0.0


# Layers per stack in `encode_layers`: enough to pay the per-operation overhead once for many short
# layers, few enough that a stack's temporaries stay in cache (2,000-token layers go one or two at a time).
STACK_VALUES = 1 << 20
# An entropy-coded stack's decoded fp32 output stays under glibc's largest mmap threshold (32 MiB,
# `memory.MMAP_THRESHOLD`), so decoding reuses freed heap pages instead of faulting in fresh ones:
# a 46 MB output cost ~11,000 page faults, ~20 ms, per decode (a 2,000-token cache goes in 3 stacks).
ENTROPY_STACK_BYTES = 16 << 20


class GroupQuantCodec:
    """Group quantization of keys and values with the outlier handling of `QuantSpec`.

    Everything the decoder needs travels in `params` (and the buffers), so a packed tensor
    decodes with any instance of the codec, whatever spec that instance would itself use to
    encode. `key_weights` [kv_heads, head_dim] (encoder only) weighs the per-channel width
    allocation of keys by query energy; None = by range alone.
    """

    name = "int8-fixed"
    key_spec = QuantSpec(8, 64, "token")
    value_spec = QuantSpec(8, 64, "token")

    def __init__(
        self,
        key_spec: QuantSpec | None = None,
        value_spec: QuantSpec | None = None,
        key_weights: torch.Tensor | None = None,
    ) -> None:
        self.key_spec = key_spec or self.key_spec
        self.value_spec = value_spec or self.value_spec
        self.key_weights = key_weights

    def encode(self, tensor: torch.Tensor, kind: str = "key") -> PackedTensor:
        spec = _fit(self.key_spec if kind == "key" else self.value_spec, tuple(tensor.shape))
        params = spec.params()
        weights = self.key_weights if kind == "key" and spec.widths else None
        if weights is not None and tuple(weights.shape) != (tensor.shape[1], tensor.shape[-1]):
            weights = None
        buffers = kvquant.encode_tensor(tensor, **params, weights=weights)
        return PackedTensor(self.name, kind, tuple(tensor.shape), dtype_name(tensor.dtype), buffers, params)

    def decode(self, packed: PackedTensor) -> torch.Tensor:
        params = QuantSpec.from_params(packed.params).params()  # validates and normalises types
        out = kvquant.decode_tensor(packed.buffers, packed.shape, **params)
        return out.to(dtype_from_name(packed.dtype))

    def error_bound(self, packed: PackedTensor) -> torch.Tensor:
        """Per-value bound on |decode - original| from quantization alone (fp32)."""
        return kvquant.error_bound(packed.buffers, packed.shape, **QuantSpec.from_params(packed.params).params())

    def for_layer(
        self, index: int, n_layers: int, shape: tuple[int, ...], model: str | None = None
    ) -> GroupQuantCodec:
        """The codec for one layer of a whole cache (the same for every layer here)."""
        return self

    def encode_layers(self, layers: Sequence[tuple[torch.Tensor, torch.Tensor]], model: str | None = None,
                      first: int = 0, total: int | None = None) -> list[PackedTensor]:
        """A whole cache of same-shaped layers, or its layers first.. of `total`: one stacked
        tensor per kind and per set of layers sharing a spec (keys with per-channel widths share
        one whatever their mean width), so the kernels run once per stack, not once per layer."""
        shape = tuple(layers[0][0].shape)
        total = total or first + len(layers)
        per_layer = [self.for_layer(first + i, total, shape, model) for i in range(len(layers))]
        out: list[PackedTensor] = []
        for kind in ("key", "value"):
            stacks: dict[QuantSpec, list[tuple[int, int]]] = {}  # shared spec -> (layer, its bits)
            for i, codec in enumerate(per_layer):
                spec = _fit(codec.key_spec if kind == "key" else codec.value_spec, shape)
                stacks.setdefault(replace(spec, bits=0) if spec.widths else spec, []).append((i, spec.bits))
            per_stack = max(1, STACK_VALUES // max(1, layers[0][0].numel()))
            for spec, same in stacks.items():
                for chunk in (same[i : i + per_stack] for i in range(0, len(same), per_stack)):
                    idx, bits = [i for i, _ in chunk], [b for _, b in chunk]
                    out.append(self._encode_stack(layers, per_layer, kind, spec, idx, bits, shape, first))
        return out

    def _encode_stack(self, layers: Sequence[tuple[torch.Tensor, torch.Tensor]], per_layer: list[GroupQuantCodec],
                      kind: str, spec: QuantSpec, idx: list[int], bits: list[int],
                      shape: tuple[int, ...], first: int) -> PackedTensor:
        """Layers `idx` (of `layers`, the cache's from `first` on) of one kind, sharing `spec` up to
        their mean widths `bits`, as one stack."""
        weights = None
        if kind == "key" and spec.widths:
            found = [per_layer[i].key_weights for i in idx]
            if all(w is not None and tuple(w.shape) == (shape[1], shape[-1]) for w in found):
                weights = torch.stack(found)
        params = replace(spec, bits=max(bits)).params()  # with widths, the decoder reads those
        tensors = [layers[i][0 if kind == "key" else 1] for i in idx]
        buffers = kvquant.encode_tensor(tensors, **{**params, "bits": bits}, weights=weights)
        return PackedTensor(self.name, kind, (len(idx), *shape), dtype_name(tensors[0].dtype), buffers, params,
                            tuple(first + i for i in idx))


class Int8Codec(GroupQuantCodec):
    """8 bits per value, fixed-rate: keys per channel, values per token, groups of 64; the first
    (attention-sink) token's key and value in fp16. Every step is a torch kernel, so it is the
    fastest codec on a CPU; `FineEntropyCodec` ("int8") has ~20x less next-token KL at the same size."""

    name = "int8-fixed"
    key_spec = QuantSpec(8, 64, "channel", sink_tokens=1)
    value_spec = QuantSpec(8, 64, "token", sink_tokens=1)


class Int4Codec(GroupQuantCodec):
    """4 bits per value on average, fixed-rate (docs/benchmarks.md, "KV codec"): every step is
    a torch kernel, so it suits a GPU encoder; `EntropyCodec` ("int4") is more accurate at the
    same wire size but entropy-codes on the CPU.

    Keys: the sink token in fp16; RoPE undone (pre-RoPE channels keep a fixed range over the
    sequence, so one range per channel over up to 4,096 tokens costs almost nothing); one bit
    width per channel (2-8 bits), allotted by range^2 x query energy. Values: the sink token
    in fp16, a block-16 Hadamard rotation, then 4 bits per value on a Gaussian-quantile
    codebook with one fp16 scale per token and head. For a model with a calibrated profile
    (`kvprofiles`, matched by the cache's geometry in `pack_cache`) the RoPE base, the query
    energies and per-layer widths (3-6 bits: more for sensitive layers, fewer for the others,
    within 4.57 bits/value at 2,000 tokens) come from the profile; without one, keys are taken
    as they are and channels are weighed by range alone.
    """

    name = "int4-fixed"
    key_spec = QuantSpec(4, 4096, "channel", sink_tokens=1, widths=True)
    value_spec = QuantSpec(4, 64, "token", rotate=16, sink_tokens=1, levels="normal")

    def for_layer(
        self, index: int, n_layers: int, shape: tuple[int, ...], model: str | None = None
    ) -> GroupQuantCodec:
        """The codec for one layer of a whole cache: the calibrated profile's, if one fits
        (`model`: the model that made the cache; None = any profile of this geometry)."""
        profile = kvprofiles.find(n_layers, shape[1], shape[-1], model)
        if profile is None:
            return self
        key = replace(self.key_spec, bits=profile.key_bits[index], rope_theta=profile.rope_theta)
        value = replace(self.value_spec, bits=profile.value_bits[index])
        return Int4Codec(key, value, profile.key_weights(index))


class EntropyCodec:
    """About 4.5 bits per value: uniform steps, entropy-coded per channel (`kventropy`;
    docs/benchmarks.md, "KV codec").

    Keys: the first (sink) and last (newest) tokens in fp16, RoPE undone, one step per channel.
    Values: the same two tokens in fp16, one step per head. With a calibrated profile
    (`kvprofiles`, found by the cache's geometry and model in `pack_cache`) the RoPE base and
    the steps (equal next-token KL per KV head, key channels weighed by query energy) come from
    it, and so does a transform per layer, KV head and kind: each token's vector is coded in a
    basis where the channels are uncorrelated and every unit of error costs the same KL
    (`Profile.transforms`), so one step s serves all. Without a profile, keys are taken as they
    are and each step is its channel's RMS / `kventropy.RELATIVE_STEP`. Everything the decoder
    needs travels in `params` and the buffers, but for the transform's matrices: the params name
    them (profile, file digest, first layer), and a receiver that has not got them refuses the
    tensor.
    """

    name = "int4"
    rebuilds_first_layer = True  # pack_cache(rebuild=True) leaves the first layer to the decoder
    value_rotate = 0  # a rotation would raise the entropy-coded rate (it mixes channels of unequal spread)
    sink_tokens = 1
    recent_tokens = 1  # the prompt's last token in fp16 too: the next tokens attend to it most
    token_alpha = 0.15  # per-token steps ~ predicted attention^-alpha (kventropy.token_exponents)
    fine_bits = 0  # > 0: steps 2^fine_bits times finer, their low bits sent as they are (FineEntropyCodec)

    def __init__(self, key_steps: torch.Tensor | None = None, value_steps: torch.Tensor | None = None,
                 rope_theta: float = 0.0, token_query: torch.Tensor | None = None,
                 transforms: dict[str, torch.Tensor] | None = None, transform_ref: dict[str, Any] | None = None,
                 ) -> None:
        # encoder only ([kv_heads, head_dim], or [layers, kv_heads, head_dim] for encode_layers):
        self.key_steps = key_steps  # None = from the data
        self.value_steps = value_steps
        self.rope_theta = rope_theta
        self.token_query = token_query  # None = no per-token steps
        # "key"/"value" -> encode matrices [kv_heads, d, d] or [layers, kv_heads, d, d], and what names
        # them for the decoder: {"transform": profile, "transform_id": digest, "transform_layer": first}
        self.transforms = transforms or {}
        self.transform_ref = transform_ref

    @classmethod
    def from_profile(cls, profile: kvprofiles.Profile, layer: int | slice | None = None) -> EntropyCodec:
        """The calibrated codec for a whole cache (layer None), for one of its layers, or for a
        slice of them."""
        found = {kind: profile.transforms(kind) for kind in ("key", "value")}
        transforms = {kind: pair[0] for kind, pair in found.items() if pair is not None}
        steps = tuple(profile.entropy_steps(kind, transformed=kind in transforms) for kind in ("key", "value"))
        query = profile.importance_query()
        first = 0
        if layer is not None:
            steps, query = (steps[0][layer], steps[1][layer]), query[layer] if query is not None else None
            transforms = {kind: t[layer] for kind, t in transforms.items()}
            first = layer if isinstance(layer, int) else layer.start or 0
        ref = {"transform": profile.name, "transform_id": profile.transform_id, "transform_layer": first}
        return cls(*steps, profile.rope_theta, query, transforms, ref if transforms else None)

    def _params(self, kind: str, shape: tuple[int, ...], transform: torch.Tensor | None) -> dict[str, Any]:
        rotate = 0 if kind == "key" else self.value_rotate
        theta = self.rope_theta if kind == "key" else 0.0
        rotate, sink, theta = _fit_transforms(rotate, self.sink_tokens, theta, shape)
        recent = max(0, min(self.recent_tokens, shape[-2] - sink))
        params = {"rotate": rotate, "sink_tokens": sink, "rope_theta": theta, "rope_start": 0, "recent_tokens": recent}
        if self.fine_bits:
            params["fine_bits"] = self.fine_bits
        if transform is not None:
            params.update(self.transform_ref, rotate=0)
        return params

    def _transform(self, kind: str, shape: tuple[int, ...], layers: int) -> torch.Tensor | None:
        """The encode matrices for `layers` tensors of `shape` ([B, H, S, D]), if this codec has ones
        that fit."""
        t = self.transforms.get(kind)
        if t is None or self.transform_ref is None or tuple(t.shape[-3:]) != (shape[-3], shape[-1], shape[-1]):
            return None
        return t if (t.dim() == 4 and t.shape[0] == layers) or (t.dim() == 3 and layers == 1) else None

    @staticmethod
    def _checked_params(p: dict[str, Any]) -> dict[str, Any]:
        fine_bits = kventropy.check_fine_bits(int(p.get("fine_bits", 0)))
        return {"rotate": int(p["rotate"]), "sink_tokens": int(p["sink_tokens"]),
                "rope_theta": float(p["rope_theta"]), "rope_start": int(p["rope_start"]),
                "recent_tokens": int(p.get("recent_tokens", 0)), "fine_bits": fine_bits}

    @staticmethod
    def _inverse(packed: PackedTensor) -> torch.Tensor | None:
        """The decode matrices [layers, kv_heads, d, d] a packed tensor's header names (None: it
        was coded without a transform); a receiver without them cannot decode it."""
        p = packed.params
        if "transform" not in p:
            return None
        name, digest, first = str(p["transform"]), str(p["transform_id"]), int(p["transform_layer"])
        profile = kvprofiles.by_name(name)
        pair = profile.transforms(packed.kind) if profile is not None else None
        if pair is None or profile.transform_id != digest:
            raise ValueError(f"this KV cache was coded in the bases of profile {name!r} ({digest}), which this "
                             "receiver does not have: run the same ThunderServe release on both replicas")
        count = packed.shape[0] if len(packed.shape) == 5 else 1
        inverse = pair[1][first : first + count]
        if inverse.shape[0] != count or tuple(inverse.shape[-3:]) != (packed.shape[-3], *packed.shape[-1:] * 2):
            raise ValueError(f"the KV header names layers {first}..{first + count - 1} of profile {name!r}, "
                             "which does not have them")
        return inverse

    @staticmethod
    def _fits(t: torch.Tensor | None, heads: int, head_dim: int) -> torch.Tensor | None:
        return t if t is not None and tuple(t.shape[-2:]) == (heads, head_dim) else None

    def _encode(self, tensor: torch.Tensor | Sequence[torch.Tensor], kind: str, shape: tuple[int, ...],
                token_exp: torch.Tensor | None = None,
                ) -> tuple[dict[str, Any], dict[str, torch.Tensor], torch.Tensor | None]:
        """(params, buffers, the per-token exponents the buffers carry or None)."""
        transform = self._transform(kind, shape, 1 if isinstance(tensor, torch.Tensor) else len(tensor))
        params = self._params(kind, shape, transform)
        heads, head_dim = shape[-3], shape[-1]
        steps = self._fits(self.key_steps if kind == "key" else self.value_steps, heads, head_dim)
        # per-token steps need pre-RoPE keys (the query is calibrated pre-RoPE)
        query = self._fits(self.token_query, heads, head_dim) if kind == "key" and params["rope_theta"] else None
        buffers, exps = kventropy.encode_tensor(
            tensor, steps, **self._checked_params(params), token_query=query, token_exp=token_exp,
            token_alpha=self.token_alpha, transform=transform)
        return params, buffers, exps

    def encode(self, tensor: torch.Tensor, kind: str = "key") -> PackedTensor:
        """One tensor. Per-token steps come from the keys, so only keys get them here;
        `encode_layers` gives a layer's values its keys' steps."""
        shape = tuple(tensor.shape)
        params, buffers, _ = self._encode(tensor, kind, shape)
        return PackedTensor(self.name, kind, shape, dtype_name(tensor.dtype), buffers, params)

    def decode(self, packed: PackedTensor) -> torch.Tensor:
        out = kventropy.decode_tensor(packed.buffers, packed.shape, **self._checked_params(packed.params),
                                      inverse=self._inverse(packed))
        return out.to(dtype_from_name(packed.dtype))

    def error_bound(self, packed: PackedTensor) -> torch.Tensor:
        """Per-value bound on |decode - original| from quantization alone (fp32)."""
        return kventropy.error_bound(packed.buffers, packed.shape, **self._checked_params(packed.params),
                                     inverse=self._inverse(packed))

    def for_layer(self, index: int, n_layers: int, shape: tuple[int, ...],
                  model: str | None = None) -> EntropyCodec:
        """The codec for one layer of a whole cache: the calibrated profile's, if one fits and
        this codec has no steps of its own."""
        profile = self._profile(n_layers, shape, model)
        return self if profile is None else type(self).from_profile(profile, index)

    def _profile(self, n_layers: int, shape: tuple[int, ...], model: str | None) -> kvprofiles.Profile | None:
        if self.key_steps is not None or self.value_steps is not None:
            return None
        profile = kvprofiles.find(n_layers, shape[1], shape[-1], model)
        return profile if profile is not None and profile.entropy_step else None

    def _from(self, first: int, count: int) -> EntropyCodec:
        """This codec for `count` of a cache's layers from `first` on: per-layer steps and queries
        ([layers, kv_heads, head_dim]) keep those rows."""
        def cut(t: torch.Tensor | None, per_layer_dims: int = 3) -> torch.Tensor | None:
            return t[first : first + count] if t is not None and t.dim() == per_layer_dims else t
        if not first and all(t is None or t.dim() != 3 or t.shape[0] == count
                             for t in (self.key_steps, self.value_steps, self.token_query)):
            return self
        codec = copy.copy(self)  # a subclass keeps its settings
        codec.key_steps, codec.value_steps, codec.token_query = map(cut, (self.key_steps, self.value_steps,
                                                                         self.token_query))
        codec.transforms = {kind: cut(t, 4) for kind, t in self.transforms.items()}
        if self.transform_ref is not None:
            ref = self.transform_ref
            codec.transform_ref = dict(ref, transform_layer=ref["transform_layer"] + first)
        return codec

    def encode_layers(self, layers: Sequence[tuple[torch.Tensor, torch.Tensor]], model: str | None = None,
                      first: int = 0, total: int | None = None) -> list[PackedTensor]:
        """A whole cache of same-shaped layers, or its layers first.. of `total` (the decoder
        rebuilds the ones before, or another call codes the rest): stacks of consecutive layers, a
        key and a value stack each (one coder call per stack), at most `ENTROPY_STACK_BYTES` of fp32
        per stack; the values take the per-token steps their keys got."""
        shape = tuple(layers[0][0].shape)
        profile = self._profile(total or first + len(layers), shape, model)
        per_stack = max(1, ENTROPY_STACK_BYTES // max(1, 4 * layers[0][0].numel()))
        out: list[PackedTensor] = []
        for a in range(0, len(layers), per_stack):
            stack = layers[a : a + per_stack]
            lo, count = first + a, len(stack)
            codec = (self._from(lo, count) if profile is None
                     else type(self).from_profile(profile, slice(lo, lo + count)))
            token_exp = None
            for i, kind in enumerate(("key", "value")):
                tensors = [layer[i] for layer in stack]
                params, buffers, token_exp = codec._encode(tensors, kind, shape, token_exp)
                out.append(PackedTensor(self.name, kind, (count, *shape), dtype_name(tensors[0].dtype),
                                        buffers, params, tuple(range(lo, lo + count))))
        return out


class FineEntropyCodec(EntropyCodec):
    """About 8.5 bits per value: int4's method (`EntropyCodec`) with every step 16 times finer.
    A code's part above its low 4 bits is entropy-coded as int4's codes are, and those 4 bits
    travel as they are (`kventropy.encode_tensor`, `fine_bits`). The quantization error is 16
    times smaller than int4's and the wire ~4 bits per value larger. Against `Int8Codec`'s
    fixed-rate 8 bits (its range has to cover each group's outliers), the same wire size takes
    ~20x less next-token KL (docs/benchmarks.md, "int8")."""

    name = "int8"
    fine_bits = kventropy.FINE_BITS


_CODECS: dict[str, type] = {"none": NoneCodec, "int8": FineEntropyCodec, "int8-fixed": Int8Codec,
                            "int4": EntropyCodec, "int4-fixed": Int4Codec}
assert sorted(_CODECS) == list(config.KV_CODECS), "config.KV_CODECS names the codecs, sorted"
DEFAULT_CODEC = config.DEFAULT_KV_CODEC


def codec_names() -> list[str]:
    return list(config.KV_CODECS)


def get_codec(name: str) -> KVCodec:
    try:
        return _CODECS[name]()
    except KeyError:
        raise ValueError(f"unknown KV codec {name!r}; choose one of {', '.join(codec_names())}") from None


# --- whole-cache framing for the channel -------------------------------------------------


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


@functools.lru_cache(maxsize=4)
def _pool(threads: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(threads, thread_name_prefix="kvcodec")


def _run_all(tasks: Sequence[Callable[[], Any]], threads: int) -> list[Any]:
    """Every task's result, in order; on up to `threads` threads. The codec kernels (numba, torch's
    matmul) release the GIL, so a cache's layers code in parallel."""
    if threads <= 1 or len(tasks) <= 1:
        return [task() for task in tasks]
    return list(_pool(threads).map(lambda task: task(), tasks))


def _bounds(start: int, end: int, runs: int) -> list[tuple[int, int]]:
    """[start, end) cut into up to `runs` runs of consecutive layers, as even as they come."""
    runs = max(1, min(runs, end - start))
    cuts = [start + (end - start) * i // runs for i in range(runs + 1)]
    return [(a, b) for a, b in zip(cuts, cuts[1:], strict=False) if b > a]


def _rebuilt(codec: KVCodec, layers: Sequence[tuple[torch.Tensor, torch.Tensor]], rebuild: bool) -> int:
    return 1 if rebuild and getattr(codec, "rebuilds_first_layer", False) and len(layers) > 1 else 0


def _encode_range(codec: KVCodec, layers: Sequence[tuple[torch.Tensor, torch.Tensor]], start: int, end: int,
                  rebuilt: int, model: str | None, threads: int) -> list[PackedTensor]:
    """The packed tensors of layers [start, end) of a cache (its first `rebuilt` left out), on up to
    `threads` threads."""
    total = len(layers)
    encode_layers = getattr(codec, "encode_layers", None)
    # (this range's layers only: from a `LayerFeed`, the later ones may not be computed yet)
    shapes = {(tuple(k.shape), tuple(v.shape), k.dtype, v.dtype) for k, v in layers[max(start, rebuilt):end]}
    stacked = encode_layers is not None and len(shapes) == 1 and len(next(iter(shapes))[0]) == 4

    def on_host(index: int) -> tuple[torch.Tensor, torch.Tensor]:
        key, value = layers[index]  # the codecs run on the host: a cache on a GPU comes over layer by layer
        return key.cpu(), value.cpu()  # (on the CPU already: no copy)

    def encode_run(a: int, b: int) -> list[PackedTensor]:
        if stacked:
            return encode_layers([on_host(i) for i in range(a, b)], model, a, total)
        packed = []
        for index in range(a, b):
            key, value = on_host(index)
            # A codec may choose per layer (e.g. more bits for sensitive layers); params say which.
            for_layer = getattr(codec, "for_layer", None)
            layer_codec = for_layer(index, total, tuple(key.shape), model) if for_layer else codec
            packed += [layer_codec.encode(key, kind="key"), layer_codec.encode(value, kind="value")]
        return packed

    tasks = [functools.partial(encode_run, a, b) for a, b in _bounds(start, end, threads)]
    return [packed for run in _run_all(tasks, threads) for packed in run]


def _frame(codec: KVCodec, packed_all: list[PackedTensor]) -> tuple[torch.Tensor, dict[str, Any]]:
    """Packed tensors as one uint8 payload and the manifest that finds them in it."""
    entries: list[dict[str, Any]] = []
    chunks: list[torch.Tensor] = []
    offset = 0
    for packed in packed_all:
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
        if packed.layers is not None:
            entry["layers"] = list(packed.layers)
        if packed.codec != codec.name:  # a per-layer choice: name it for the decoder
            entry["codec"] = packed.codec
        entries.append(entry)
    payload = torch.cat(chunks) if chunks else torch.empty(0, dtype=torch.uint8)
    return payload, {"codec": codec.name, "entries": entries, "nbytes": offset}


def pack_cache(
    codec: KVCodec, layers: Sequence[tuple[torch.Tensor, torch.Tensor]], model: str | None = None,
    rebuild: bool = False, threads: int = 1,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Encode every layer's (key, value) and frame them into one uint8 buffer + manifest.

    `model`: the served name of the model that made the cache, so a codec with calibrated
    per-model settings (int4) uses that model's and no other's; None = match by geometry.
    `rebuild`: the receiver can rebuild the first layer's KV from the token ids
    (`engine.first_layer_kv`); a codec with `rebuilds_first_layer` then leaves it out
    (manifest "rebuilt": 1) and spends nothing on the layer whose values are the most
    sensitive of all. A codec with `encode_layers` encodes same-shaped layers as stacks (an
    entry then names its `layers`); otherwise every tensor is an entry, in order key 0,
    value 0, key 1, ...
    `threads`: code that many runs of consecutive layers at once, each its own stacks (the
    payload's size moves only by the extra stacks' headers and coding tables).
    """
    rebuilt = _rebuilt(codec, layers, rebuild)
    payload, manifest = _frame(codec, _encode_range(codec, layers, rebuilt, len(layers), rebuilt, model, threads))
    manifest["layers"] = len(layers)
    if rebuilt:
        manifest["rebuilt"] = rebuilt
    return payload, manifest


class FeedClosed(RuntimeError):
    """A `LayerFeed` was closed before the layer asked for came in."""


class LayerFeed(Sequence[tuple[torch.Tensor, torch.Tensor]]):
    """A cache's layers as a forward pass computes them (`Engine.prefill(on_layer=feed.put)`), so that
    `pack_runs` can encode a run as soon as its layers are in while the pass goes on. Reading a layer
    waits for it; once the feed is closed early (the pass failed, or its KV is not needed) reading a
    missing layer raises `FeedClosed`. `waited_s`: the time readers spent waiting."""

    def __init__(self, count: int):
        self._layers: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * count
        self._closed: str | None = None
        self._cv = threading.Condition()
        self.waited_s = 0.0

    def put(self, index: int, key: torch.Tensor, value: torch.Tensor) -> None:
        with self._cv:
            self._layers[index] = (key, value)
            self._cv.notify_all()

    def close(self, reason: str) -> None:
        with self._cv:
            self._closed = reason
            self._cv.notify_all()

    def __len__(self) -> int:
        return len(self._layers)

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        index = range(len(self))[index]  # negative indices, and IndexError past the end
        with self._cv:
            t0 = time.perf_counter()
            while (layer := self._layers[index]) is None:
                if self._closed is not None:
                    raise FeedClosed(f"layer {index} will not come: {self._closed}")
                self._cv.wait()
            self.waited_s += time.perf_counter() - t0
            return layer


def pack_runs(
    codec: KVCodec, layers: Sequence[tuple[torch.Tensor, torch.Tensor]], model: str | None = None,
    rebuild: bool = False, runs: int = 4, threads: int = 1,
) -> tuple[dict[str, Any], Iterator[tuple[torch.Tensor, dict[str, Any]]]]:
    """`pack_cache` in `runs` runs of consecutive layers, for a transfer that streams them: the
    receiver decodes a run while the sender encodes the next. Returns the transfer's head (codec,
    layer count, rebuilt layers and the number of runs: what the receiver needs before the first
    run) and a generator that encodes each run only when asked, as (payload, manifest). `layers`
    may be a `LayerFeed`: a run is then encoded as soon as its layers are in."""
    rebuilt = _rebuilt(codec, layers, rebuild)
    bounds = _bounds(rebuilt, len(layers), runs)
    head: dict[str, Any] = {"codec": codec.name, "layers": len(layers), "runs": len(bounds)}
    if rebuilt:
        head["rebuilt"] = rebuilt

    def encoded() -> Iterator[tuple[torch.Tensor, dict[str, Any]]]:
        for a, b in bounds:
            yield _frame(codec, _encode_range(codec, layers, a, b, rebuilt, model, threads))

    return head, encoded()


@dataclass
class DecodedRun:
    """A payload's tensors, decoded: (kind, the layers a stacked entry holds or None, tensor)."""

    parts: list[tuple[str, tuple[int, ...] | None, torch.Tensor]]


def _entry_decoders(payload: torch.Tensor, manifest: dict[str, Any]
                     ) -> list[tuple[str, tuple[int, ...] | None, Callable[[], torch.Tensor]]]:
    """Per entry of a payload: its kind, its layers (stacked entries) and a call that decodes it."""
    if payload.numel() != manifest["nbytes"]:
        raise ValueError(f"KV payload has {payload.numel()} bytes, manifest says {manifest['nbytes']}")
    codecs = {manifest["codec"]: get_codec(manifest["codec"])}
    entries: list[tuple[str, tuple[int, ...] | None, Callable[[], torch.Tensor]]] = []
    for entry in manifest["entries"]:
        buffers = {}
        for bname, bdtype, bshape, off, n in entry["buffers"]:
            raw, dtype = payload[off : off + n], dtype_from_name(bdtype)
            if off % dtype.itemsize:  # packed codes may leave an odd offset: copy to align
                raw = raw.clone()
            buffers[bname] = raw.view(dtype).reshape(bshape)
        name = entry.get("codec", manifest["codec"])
        if name not in codecs:
            codecs[name] = get_codec(name)
        kind, stack = entry["kind"], entry.get("layers")
        if kind not in ("key", "value"):
            raise ValueError(f"unknown KV entry kind {kind!r}")
        packed = PackedTensor(name, kind, tuple(entry["shape"]), entry["dtype"], buffers, entry["params"],
                              tuple(stack) if stack is not None else None)
        entries.append((kind, packed.layers, functools.partial(codecs[name].decode, packed)))
    return entries


def decode_entries(payload: torch.Tensor, manifest: dict[str, Any], threads: int = 1) -> DecodedRun:
    """Decode the entries of one `pack_cache` payload (or one run of `pack_runs`), on up to
    `threads` threads (not from inside one of them: they share one pool)."""
    entries = _entry_decoders(payload, manifest)
    return _decoded(entries, _run_all([decode for _, _, decode in entries], threads))


def _decoded(entries: Sequence[tuple[str, tuple[int, ...] | None, Any]], tensors: Sequence[torch.Tensor]) -> DecodedRun:
    """Each entry's kind and layers, with its tensor."""
    return DecodedRun([(kind, stack, t) for (kind, stack, _), t in zip(entries, tensors, strict=True)])


def _check_rebuild(head: dict[str, Any], rebuild: Callable[[], tuple[torch.Tensor, torch.Tensor]] | None) -> int:
    rebuilt = int(head.get("rebuilt", 0))
    if rebuilt not in (0, 1):
        raise ValueError(f"only the first layer can be rebuilt, the manifest says {rebuilt}")
    if rebuilt and rebuild is None:
        raise ValueError("the KV cache leaves its first layer to be rebuilt from the tokens, "
                         "and this receiver cannot rebuild it")
    return rebuilt


def assemble(head: dict[str, Any], runs: Sequence[DecodedRun],
             first: tuple[torch.Tensor, torch.Tensor] | None = None) -> KVLayers:
    """The cache [(key, value), ...] from its decoded runs, in order, and the rebuilt first
    layer (`first`, when the head says the sender left it out)."""
    slots: dict[str, dict[int, torch.Tensor]] = {"key": {}, "value": {}}
    rebuilt = int(head.get("rebuilt", 0))
    if rebuilt:
        slots["key"][0], slots["value"][0] = first
    unstacked = {"key": rebuilt, "value": rebuilt}  # the next layer an entry without `layers` is
    for run in runs:
        for kind, stack, tensor in run.parts:
            if stack is None:
                slots[kind][unstacked[kind]] = tensor
                unstacked[kind] += 1
            else:
                slots[kind].update(zip(stack, tensor.unbind(0), strict=True))
    n = head.get("layers", len(slots["key"]))
    if any(sorted(slots[k]) != list(range(n)) for k in slots):
        raise ValueError("KV manifest does not give every layer one key and one value")
    return [(slots["key"][i], slots["value"][i]) for i in range(n)]


def unpack_cache(payload: torch.Tensor, manifest: dict[str, Any],
                 rebuild: Callable[[], tuple[torch.Tensor, torch.Tensor]] | None = None,
                 threads: int = 1) -> KVLayers:
    """Inverse of `pack_cache`: returns [(key, value), ...] in the original dtype.

    `rebuild()`: the first layer's (key, value), rebuilt from the token ids
    (`engine.first_layer_kv`); needed when the sender left it out (manifest "rebuilt").
    `threads`: decode that many entries (and the rebuild) at once."""
    rebuilt = _check_rebuild(manifest, rebuild)
    entries = _entry_decoders(payload, manifest)
    done = _run_all(([rebuild] if rebuilt else []) + [decode for _, _, decode in entries], threads)
    first = done.pop(0) if rebuilt else None
    return assemble(manifest, [_decoded(entries, done)], first)


@functools.lru_cache(maxsize=1)
def _behind() -> ThreadPoolExecutor:
    """The thread that decodes a streamed transfer's runs while the next run is being received."""
    return ThreadPoolExecutor(1, thread_name_prefix="kvcodec-runs")


def unpack_runs(head: dict[str, Any], parts: Iterator[tuple[torch.Tensor, dict[str, Any]]],
                rebuild: Callable[[], tuple[torch.Tensor, torch.Tensor]] | None = None, threads: int = 1,
                release: Callable[[torch.Tensor], None] | None = None) -> KVLayers:
    """Inverse of `pack_runs`: `parts` yields each run's (payload, manifest) as it arrives (it may
    block while one is on its way); each run is decoded on another thread while the next arrives,
    the rebuilt first layer before them. `release(payload)` is called once a run's tensors no
    longer view its payload (a received buffer can then be reused)."""
    from thunderserve.common.kvchannel import detach_from  # (the channel's buffer helper)

    def decode_run(payload: torch.Tensor, manifest: dict[str, Any]) -> DecodedRun:
        try:
            run = decode_entries(payload, manifest, threads)
            return _decoded(run.parts, detach_from(payload, [t for _, _, t in run.parts]))
        finally:
            if release is not None:
                release(payload)

    rebuilt = _check_rebuild(head, rebuild)
    first = _behind().submit(rebuild) if rebuilt else None
    runs = [_behind().submit(decode_run, payload, manifest) for payload, manifest in parts]
    decoded = [run.result() for run in runs]
    if len(decoded) != int(head.get("runs", len(decoded))):
        raise ValueError(f"the KV transfer has {len(decoded)} runs, its head says {head['runs']}")
    return assemble(head, decoded, first.result() if first is not None else None)
