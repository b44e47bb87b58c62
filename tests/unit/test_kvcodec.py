"""KV codec: round-trip error, shapes, dtypes, exact wire size, cache framing (DESIGN.md §4)."""

from __future__ import annotations

import math

import msgpack
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from thunderserve.common import kvquant
from thunderserve.common.kvcodec import (
    DEFAULT_CODEC,
    GroupQuantCodec,
    QuantSpec,
    codec_names,
    get_codec,
    pack_cache,
    unpack_cache,
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
GROUP_CODECS = ["int8-fixed", "int4-fixed"]  # fixed-rate group quantization (kvquant)
ENTROPY_CODECS = ["int4", "int8"]  # entropy-coded (kventropy); int8 with 4 fine bits sent as they are
QUANT_CODECS = [*GROUP_CODECS, *ENTROPY_CODECS]


def _kv(shape: tuple[int, ...], seed: int, dtype: torch.dtype = torch.float32, outliers: bool = True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    if outliers and shape[-1] > 2:
        x[..., 1] *= 20.0  # an outlier channel, as real keys have
    return x.to(dtype)


def _output_rounding(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Error that casting the fp32 decode back to `dtype` may add."""
    return x.float().abs() * torch.finfo(dtype).eps + torch.finfo(dtype).tiny


def _assert_within_bound(codec, x: torch.Tensor, kind: str) -> None:
    packed = codec.encode(x, kind=kind)
    y = codec.decode(packed)
    assert y.shape == x.shape and y.dtype == x.dtype
    bound = codec.error_bound(packed)
    # fp16 sink tokens and the fp32 arithmetic round too: a relative slack of a few ulps.
    # (The decoded value, up to |x| + bound, is what gets rounded to the output dtype.)
    slack = _output_rounding(x.float().abs() + bound, x.dtype) + _output_rounding(x, torch.float16)
    slack = slack + bound * 1e-4 + 1e-6
    err = (y.float() - x.float()).abs()
    assert bool((err <= bound + slack).all()), float((err - bound - slack).max())


def test_registry_and_default() -> None:
    assert {"none", "int8", "int8-fixed", "int4", "int4-fixed"} <= set(codec_names())
    assert DEFAULT_CODEC == "int4"
    with pytest.raises(ValueError):
        get_codec("int3")


@pytest.mark.parametrize("name", ["none", *QUANT_CODECS])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "shape",
    [(1, 3, 37, 64), (2, 3, 1, 64), (0, 3, 5, 64), (1, 2, 70, 48), (1, 1, 130, 33), (1, 3, 0, 64)]
    + [(1, 3, 4, 1)],
)
@pytest.mark.parametrize("kind", ["key", "value"])
def test_shapes_dtypes_and_bound(name: str, dtype: torch.dtype, shape: tuple[int, ...], kind: str) -> None:
    codec = get_codec(name)
    x = _kv(shape, seed=sum(shape), dtype=dtype)
    if name == "none":
        y = codec.decode(codec.encode(x, kind=kind))
        assert y.dtype == dtype and torch.equal(y, x)
    else:
        _assert_within_bound(codec, x, kind)


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(0, 6),
    n=st.integers(0, 200),
    group=st.sampled_from([1, 3, 16, 32, 64, 128]),
    bits=st.sampled_from([4, 8]),
    scale=st.floats(1e-3, 1e3),
    offset=st.floats(-100, 100),
    seed=st.integers(0, 2**16),
)
def test_kernel_half_step(rows: int, n: int, group: int, bits: int, scale: float, offset: float, seed: int):
    x = torch.randn(rows, n, generator=torch.Generator().manual_seed(seed)) * scale + offset
    codes, zero, step = kvquant.quantize_rows(x, bits, group)
    assert codes.numel() == rows * n and int(codes.max()) < (1 << bits) if codes.numel() else True
    if bits == 4:
        codes = kvquant.unpack_nibbles(kvquant.pack_nibbles(codes), rows * n)
    y = kvquant.dequantize_rows(codes, zero, step, rows, n, group)
    half = (step.float().repeat_interleave(group, dim=1)[:, :n] / 2) if rows and n else torch.zeros(rows, n)
    # Half a step of each group, up to fp32 rounding of code * scale + zero.
    tol = half * 1e-4 + (x.abs() + half) * 4 * torch.finfo(torch.float32).eps
    assert bool(((y - x).abs() <= half + tol).all())


@settings(max_examples=60, deadline=None)
@given(
    name=st.sampled_from(QUANT_CODECS),
    batch=st.integers(0, 2),
    heads=st.integers(1, 3),
    seq=st.integers(1, 80),
    head_dim=st.sampled_from([1, 7, 16, 48, 64, 80, 128]),
    dtype=st.sampled_from(DTYPES),
    kind=st.sampled_from(["key", "value"]),
    seed=st.integers(0, 2**16),
)
def test_codec_roundtrip_property(name, batch, heads, seq, head_dim, dtype, kind, seed) -> None:
    _assert_within_bound(get_codec(name), _kv((batch, heads, seq, head_dim), seed, dtype), kind)


@settings(max_examples=40, deadline=None)
@given(
    bits=st.sampled_from([2, 3, 4, 5, 8]),
    group=st.sampled_from([16, 32, 64, 128, 4096]),
    axis=st.sampled_from(["token", "channel"]),
    rotate=st.sampled_from([0, 16, 64]),
    sink=st.integers(0, 6),
    levels=st.sampled_from(["uniform", "normal"]),
    rope_theta=st.sampled_from([0.0, 1e4, 1e5]),
    rope_start=st.integers(0, 100),
    widths=st.booleans(),
    seq=st.integers(1, 50),
    seed=st.integers(0, 2**16),
)
def test_any_spec_roundtrip(bits, group, axis, rotate, sink, levels, rope_theta, rope_start, widths, seq, seed):
    if levels == "normal":
        axis = "token"
    spec = QuantSpec(bits, group, axis, rotate, sink, levels, rope_theta, rope_start, widths)
    weights = torch.rand(3, 64, generator=torch.Generator().manual_seed(seed)) * 10
    _assert_within_bound(GroupQuantCodec(spec, spec, key_weights=weights), _kv((1, 3, seq, 64), seed), "key")


def test_decode_uses_transmitted_params() -> None:
    """The header names the codec; the params travel: the receiver's defaults don't matter."""
    spec = QuantSpec(4, 32, "token", rotate=64, sink_tokens=2)
    x = _kv((1, 3, 40, 64), 7)
    payload, manifest = pack_cache(GroupQuantCodec(spec, spec), [(x, x)])
    manifest = msgpack.unpackb(msgpack.packb(manifest))
    manifest["codec"] = "int8-fixed"  # GroupQuantCodec's registered name
    (k, _v), = unpack_cache(payload, manifest)
    _assert_within_bound(GroupQuantCodec(spec, spec), x, "key")
    assert (k - x).abs().max() < 1.0


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(0, 4),
    n=st.integers(0, 70),
    d=st.integers(1, 70),
    seed=st.integers(0, 2**16),
)
def test_width_packing_roundtrip(rows: int, n: int, d: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    widths = torch.randint(kvquant.MIN_WIDTH, kvquant.MAX_WIDTH + 1, (rows, d), generator=g).to(torch.uint8)
    codes = torch.randint(0, 256, (rows, n, d), generator=g).to(torch.uint8)
    codes &= ((1 << widths.long()) - 1).to(torch.uint8).unsqueeze(1)
    packed = kvquant.pack_widths(codes, widths)
    # Exactly the bits the widths call for, each run of equal widths rounded up to a byte.
    assert packed.numel() == _width_bytes(widths, n)
    assert torch.equal(kvquant.unpack_widths(packed, widths, n), codes)


def _width_bytes(widths: torch.Tensor, n: int) -> int:
    """Bytes of n codes per channel at per-channel widths: ceil(bits / 8) per run of channels
    of one width, which `pack_widths` packs together."""
    total = 0
    for w in range(1, 9):
        count = int((widths == w).sum()) * n
        total += (count * w + 7) // 8 if w in (4, 8) else (count + 7) // 8 * w
    return total


@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 300), bits=st.integers(1, 8), offset=st.integers(0, 9), seed=st.integers(0, 2**16))
def test_code_packing_roundtrip(n: int, bits: int, offset: int, seed: int) -> None:
    # `offset`: codes that start mid-buffer (a slice), so the int64 word view must not assume alignment
    base = torch.randint(0, 1 << bits, (offset + n,), generator=torch.Generator().manual_seed(seed))
    codes = base.to(torch.uint8)[offset:]
    original = codes.clone()
    packed = kvquant.pack_codes(codes, bits)
    assert packed.numel() == kvquant.code_bytes(n, bits)
    assert torch.equal(kvquant.unpack_codes(packed, bits, n)[:n], original)
    assert torch.equal(codes, original)  # packing leaves its input alone


def test_lane_packing_layout() -> None:
    """Eight 3-bit codes fill three bytes, code i at bits 3i..3i+2 (little-endian)."""
    codes = torch.tensor([1, 2, 3, 4, 5, 6, 7, 0], dtype=torch.uint8)
    packed = kvquant.pack_lanes(codes, 3)
    word = sum(int(b) << (8 * i) for i, b in enumerate(packed.tolist()))
    assert word == sum(int(c) << (3 * i) for i, c in enumerate(codes.tolist()))


def test_channel_widths_water_filling() -> None:
    """Widths average the budget exactly, stay in range, follow the score, and match the
    greedy allocation (one more bit halves the step, quartering the squared error)."""
    score = torch.tensor([[1.0, 5.0, 20.0, 70.0, 1e-9, 1e9, 1.3, 0.7]])
    w = kvquant.channel_widths(score, 4)
    assert int(w.sum()) == 4 * 8
    assert int(w.min()) >= kvquant.MIN_WIDTH and int(w.max()) <= kvquant.MAX_WIDTH
    assert w[0, 5] == kvquant.MAX_WIDTH and w[0, 4] == kvquant.MIN_WIDTH
    assert w[0, 0] <= w[0, 1] <= w[0, 2] <= w[0, 3]
    # the same as adding one bit at a time where it removes the most score * 4^-width
    greedy = [kvquant.MIN_WIDTH] * 8
    for _ in range(32 - 8 * kvquant.MIN_WIDTH):
        gains = [s * 4.0 ** -b if b < kvquant.MAX_WIDTH else -1 for s, b in zip(score[0].tolist(), greedy)]
        greedy[gains.index(max(gains))] += 1
    assert w[0].tolist() == greedy
    assert torch.equal(kvquant.channel_widths(torch.zeros(2, 64), 4).sum(1), torch.tensor([256, 256]))


def test_rope_inverse_is_exact_and_matches_hf() -> None:
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    x = torch.randn(1, 3, 50, 64)
    cos, sin = kvquant.rope_tables(50, 64, 1e5, 7)
    cos, sin = torch.cat((cos, cos), -1).unsqueeze(0), torch.cat((sin, sin), -1).unsqueeze(0)
    _, hf = apply_rotary_pos_emb(x, x, cos, sin)
    assert torch.allclose(kvquant.rope(x, 1e5, 7), hf, atol=1e-5)
    assert torch.allclose(kvquant.rope(kvquant.rope(x, 1e5, 7, inverse=True), 1e5, 7), x, atol=1e-5)


def test_pre_rope_keys_and_query_weights_cut_the_error() -> None:
    """Keys whose outlier channels are fixed before RoPE (as in real models): undoing RoPE
    lets a per-channel range fit them, and query weights move bits to the channels that
    queries read."""
    g = torch.Generator().manual_seed(0)
    pre = torch.randn(1, 3, 300, 64, generator=g)
    outliers = [1, 33, 3, 35, 5, 37, 7, 39]  # four RoPE pairs (i, i + 32), fixed before RoPE
    pre[..., outliers] = pre[..., outliers] * 0.5 + 10.0
    x = kvquant.rope(pre, 1e5, 0)
    base = QuantSpec(4, 4096, "channel", sink_tokens=1, widths=True)

    def err(spec):
        codec = GroupQuantCodec(spec, spec)
        return float((codec.decode(codec.encode(x, kind="key")) - x).square().mean())

    assert err(QuantSpec(4, 4096, "channel", sink_tokens=1, widths=True, rope_theta=1e5)) < 0.6 * err(base)
    weights = torch.ones(3, 64)
    weights[:, [10, 42]] = 50.0  # queries read pair 10 heavily
    spec = QuantSpec(4, 4096, "channel", sink_tokens=1, widths=True, rope_theta=1e5)
    packed_w = GroupQuantCodec(spec, spec, key_weights=weights).encode(x, kind="key")
    packed = GroupQuantCodec(spec, spec).encode(x, kind="key")
    assert bool((packed_w.buffers["widths"][:, 10] > packed.buffers["widths"][:, 10]).all())

    def weighted(p):  # the pre-RoPE error as the queries weigh it
        dec = kvquant.rope(GroupQuantCodec(spec, spec).decode(p), 1e5, 0, inverse=True)
        return float(((dec - pre).square() * weights.view(1, 3, 1, 64)).mean())
    assert weighted(packed_w) < weighted(packed)


def _layer_settings(layers: list, model: str | None = None) -> list[tuple[int, int, float]]:
    """Per layer: (mean key width, value bits, RoPE base) as the int4-fixed manifest records them."""
    payload, manifest = pack_cache(get_codec("int4-fixed"), layers, model=model)
    out: dict[int, list] = {}
    for entry in manifest["entries"]:
        for j, layer in enumerate(entry["layers"]):
            row = out.setdefault(layer, [0, 0, 0.0])
            if entry["kind"] == "key":
                _, _, _, off, n = next(b for b in entry["buffers"] if b[0] == "widths")
                widths = payload[off : off + n].view(len(entry["layers"]), -1)[j]  # this layer's channels
                row[0] = float(widths.float().mean())
                row[2] = entry["params"]["rope_theta"]
            else:
                row[1] = entry["params"]["bits"]
    return [tuple(out[i]) for i in range(len(layers))]


def test_profile_drives_the_int4_fixed_layers() -> None:
    """A SmolLM2-shaped cache gets the calibrated profile: RoPE base and per-layer widths in
    the params and width buffers; any other geometry, or another model's name, falls back to
    the codec's own defaults."""
    from thunderserve.common import kvprofiles

    profile = kvprofiles.find(30, 3, 64)
    assert profile is not None
    layers = [(_kv((1, 3, 20, 64), i), _kv((1, 3, 20, 64), 50 + i)) for i in range(30)]
    calibrated = [(float(k), v, profile.rope_theta) for k, v in zip(profile.key_bits, profile.value_bits)]
    assert _layer_settings(layers) == calibrated
    assert _layer_settings(layers[:4]) == [(4.0, 4, 0.0)] * 4
    # Named by the replica: SmolLM2's own name (any case) gets its profile, another model of the
    # same geometry does not.
    assert _layer_settings(layers, model="smollm2-135m-instruct") == calibrated
    assert _layer_settings(layers, model="another-135m") == [(4.0, 4, 0.0)] * 30
    assert kvprofiles.find(30, 3, 64, model="SmolLM2-135M-Instruct") is profile
    assert kvprofiles.find(30, 3, 64, model="another-135m") is None


def _expected_nbytes(name: str, shape: tuple[int, ...], kind: str, widths: torch.Tensor | None) -> int:
    """Wire bytes from first principles: codes + fp16 zero and scale per group (uniform
    levels) or fp16 scale per group (normal levels) + fp16 sink tokens (+ the per-channel
    widths, one byte each, and the codes at those widths)."""
    codec = get_codec(name)
    spec = codec.key_spec if kind == "key" else codec.value_spec
    *lead, s, d = shape
    sink = min(spec.sink_tokens, s)
    qs = s - sink
    rows, n = (math.prod(lead) * qs, d) if spec.axis == "token" else (math.prod(lead) * d, qs)
    values = rows * n
    groups = rows * math.ceil(n / spec.group)
    sink_bytes = 2 * math.prod(lead) * sink * d
    if spec.levels == "normal":
        return kvquant.code_bytes(values, spec.bits) + 2 * groups + sink_bytes
    if spec.widths:
        assert widths is not None and bool((widths.long().sum(1) == spec.bits * d).all())
        return widths.numel() + _width_bytes(widths, qs) + 4 * groups + sink_bytes
    return kvquant.code_bytes(values, spec.bits) + 4 * groups + sink_bytes


@pytest.mark.parametrize("name", GROUP_CODECS)
@pytest.mark.parametrize(
    "shape", [(1, 3, 2000, 64), (1, 3, 37, 64), (2, 3, 1, 64), (1, 2, 70, 48), (0, 3, 5, 64)]
)
def test_exact_wire_size(name: str, shape: tuple[int, ...]) -> None:
    codec = get_codec(name)
    for kind in ("key", "value"):
        packed = codec.encode(_kv(shape, 0), kind=kind)
        assert packed.nbytes == _expected_nbytes(name, shape, kind, packed.buffers.get("widths"))
        assert packed.nbytes == sum(b.numel() * b.element_size() for b in packed.buffers.values())


def test_wire_size_ratio_targets() -> None:
    """A 2,000-token SmolLM2 cache (30 layers, 3 KV heads, head_dim 64)."""
    layers = [(_kv((1, 3, 2000, 64), i), _kv((1, 3, 2000, 64), 100 + i)) for i in range(30)]
    values = sum(k.numel() + v.numel() for k, v in layers)
    fp16_bytes = values * 2
    sizes = {name: pack_cache(get_codec(name), layers)[0].numel() for name in GROUP_CODECS}
    assert fp16_bytes / sizes["int8-fixed"] >= 1.8
    assert fp16_bytes / sizes["int4-fixed"] >= 3.5
    assert sizes["int4-fixed"] * 8 / values <= 4.57
    # int4's size follows the content; on a real cache it is checked in test_kvcodec_accuracy.


@pytest.mark.parametrize("name", ["none", *QUANT_CODECS])
def test_pack_cache_roundtrip(name: str) -> None:
    codec = get_codec(name)
    half = torch.float16
    layers = [(_kv((1, 3, 21, 64), i, half), _kv((1, 3, 21, 64), 50 + i, half)) for i in range(4)]
    payload, manifest = pack_cache(codec, layers)
    assert payload.dtype == torch.uint8 and payload.numel() == manifest["nbytes"]
    packed = [codec.encode(t, kind=kd) for k, v in layers for t, kd in ((k, "key"), (v, "value"))]
    # Stacked layers share packing words (int4: the coder's header and tables), so the cache is
    # never bigger than its tensors one by one (quantized: a stack per kind; none: every tensor as it is).
    assert manifest["nbytes"] <= sum(p.nbytes for p in packed)
    if name in GROUP_CODECS:
        assert sum(p.nbytes for p in packed) - manifest["nbytes"] <= 16 * len(packed)
    manifest = msgpack.unpackb(msgpack.packb(manifest))  # travels as msgpack
    out = unpack_cache(payload.clone(), manifest)
    assert len(out) == len(layers)
    for (k, v), (k2, v2) in zip(layers, out, strict=True):
        assert k2.shape == k.shape and k2.dtype == k.dtype and v2.dtype == v.dtype
    # Framing and stacking change nothing: what comes out is exactly what the codec decodes per tensor.
    flat = [t for kv in out for t in kv]
    for p, t in zip(packed, flat, strict=True):
        assert torch.equal(codec.decode(p), t)


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("name", ["int4", "int4-fixed", "int8"])
def test_stacked_layers_decode_as_one_by_one(batch: int, name: str) -> None:
    """The calibrated 30-layer int4 paths (int4-fixed: per-layer widths and query weights,
    values grouped by bits; int4: per-layer steps) decode to exactly what each layer's own
    codec gives, for any batch size."""
    codec = get_codec(name)
    shape = (batch, 3, 40, 64)
    layers = [(_kv(shape, i), _kv(shape, 100 + i)) for i in range(30)]
    payload, manifest = pack_cache(codec, layers)
    assert len(manifest["entries"]) < 10  # stacks, not 60 tensors
    out = unpack_cache(payload, manifest)
    for i, ((k, v), (k2, v2)) in enumerate(zip(layers, out, strict=True)):
        layer_codec = codec.for_layer(i, 30, shape)
        if name in ENTROPY_CODECS:  # a layer's values take its keys' per-token steps: encode the pair
            pk, pv = layer_codec.encode_layers([(k, v)])
            assert torch.equal(layer_codec.decode(pk)[0], k2) and torch.equal(layer_codec.decode(pv)[0], v2)
            assert torch.equal(layer_codec.decode(layer_codec.encode(k, kind="key")), k2)
            continue
        assert torch.equal(layer_codec.decode(layer_codec.encode(k, kind="key")), k2)
        assert torch.equal(layer_codec.decode(layer_codec.encode(v, kind="value")), v2)


@pytest.mark.parametrize("name", ENTROPY_CODECS)
def test_entropy_stacks_stay_under_their_size_cap(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """An entropy-coded stack holds at most ENTROPY_STACK_BYTES of fp32 (so its decoded output comes
    from the heap, not a fresh mmap); cutting a cache into more stacks changes no decoded value."""
    from thunderserve.common import kvcodec

    codec = get_codec(name)
    shape = (1, 3, 40, 64)
    layers = [(_kv(shape, i), _kv(shape, 100 + i)) for i in range(30)]
    expected = unpack_cache(*pack_cache(codec, layers))
    layer_bytes = 4 * math.prod(shape)
    monkeypatch.setattr(kvcodec, "ENTROPY_STACK_BYTES", 4 * layer_bytes + 1)
    payload, manifest = pack_cache(codec, layers)
    sizes = [len(e["layers"]) for e in manifest["entries"]]
    assert sizes == [4, 4] * 7 + [2, 2]  # key and value stacks of 4 layers, then the last 2
    for (k, v), (k2, v2) in zip(expected, unpack_cache(payload, manifest), strict=True):
        assert torch.equal(k, k2) and torch.equal(v, v2)


@pytest.mark.parametrize("name", ["int4", "int4-fixed", "int8", "int8-fixed", "none"])
def test_threads_code_runs_of_layers_to_the_same_values(name: str) -> None:
    """pack_cache on 3 threads codes 3 runs of layers, each its own stacks (first layer rebuilt
    or not); the receiver, on any number of threads, gets exactly the one-thread values, and the
    payload's size moves by the stacks' headers and tables only (under 1%)."""
    codec = get_codec(name)
    shape = (1, 3, 40, 64)
    layers = [(_kv(shape, i), _kv(shape, 100 + i)) for i in range(30)]
    rebuild = (lambda: layers[0]) if getattr(codec, "rebuilds_first_layer", False) else None
    one_payload, one_manifest = pack_cache(codec, layers, rebuild=rebuild is not None)
    payload, manifest = pack_cache(codec, layers, rebuild=rebuild is not None, threads=3)
    stacks = {tuple(e["layers"]) for e in manifest["entries"] if "layers" in e}
    if name != "none":
        assert len(stacks) > len({tuple(e["layers"]) for e in one_manifest["entries"]})
    assert abs(payload.numel() - one_payload.numel()) <= 0.01 * one_payload.numel()
    expected = unpack_cache(one_payload, one_manifest, rebuild)
    for threads in (1, 2, 4):
        out = unpack_cache(payload, manifest, rebuild, threads=threads)
        for (k, v), (k2, v2) in zip(expected, out, strict=True):
            assert torch.equal(k, k2) and torch.equal(v, v2)


@pytest.mark.parametrize("name", ["int4", "int4-fixed", "int8", "int8-fixed", "none"])
def test_runs_decode_to_the_one_payload_values(name: str) -> None:
    """pack_runs encodes a run only when asked for it; unpack_runs puts the runs back together into
    exactly what one payload gives, and refuses a transfer that ends early."""
    from thunderserve.common.kvcodec import pack_runs, unpack_runs

    codec = get_codec(name)
    shape = (1, 3, 24, 64)
    layers = [(_kv(shape, i), _kv(shape, 100 + i)) for i in range(30)]
    rebuild = (lambda: layers[0]) if getattr(codec, "rebuilds_first_layer", False) else None
    head, parts = pack_runs(codec, layers, rebuild=rebuild is not None, runs=4, threads=2)
    assert head["runs"] == 4 and head["layers"] == 30
    first = next(parts)
    assert sum(len(e.get("layers", [1])) for e in first[1]["entries"]) <= 2 * 8  # one run's layers, not all
    got = unpack_runs(head, iter([first, *parts]), rebuild, threads=2)
    expected = unpack_cache(*pack_cache(codec, layers, rebuild=rebuild is not None), rebuild)
    for (k, v), (k2, v2) in zip(expected, got, strict=True):
        assert torch.equal(k, k2) and torch.equal(v, v2)
    _, parts = pack_runs(codec, layers, rebuild=rebuild is not None, runs=4)
    with pytest.raises(ValueError, match="runs"):
        unpack_runs(head, iter(list(parts)[:3]), rebuild)


def test_runs_encode_from_a_feed_as_its_layers_come_in() -> None:
    """pack_runs over a LayerFeed (a forward pass putting its layers in from another thread) encodes
    each run once its layers are in, into the bytes the finished cache gives; a feed closed early
    fails the run still missing layers, after the runs that were complete."""
    import threading

    from thunderserve.common.kvcodec import FeedClosed, LayerFeed, pack_runs

    codec = get_codec("int4")
    layers = [(_kv((1, 3, 24, 64), i), _kv((1, 3, 24, 64), 100 + i)) for i in range(8)]
    feed = LayerFeed(len(layers))
    head, parts = pack_runs(codec, feed, rebuild=True, runs=4)
    gate = threading.Event()

    def forward() -> None:  # the first run's layers at once, the rest once the first run is encoded
        for i, (k, v) in enumerate(layers):
            if i == 3:
                gate.wait(30)
            feed.put(i, k, v)

    thread = threading.Thread(target=forward)
    thread.start()
    first = next(parts)  # layers 1-2: layer 0 is rebuilt by the decoder
    gate.set()
    got = [first, *parts]
    thread.join(30)
    head2, expected = pack_runs(codec, layers, rebuild=True, runs=4)
    assert head == head2 and len(got) == 4
    for (payload, manifest), (payload2, manifest2) in zip(got, expected, strict=True):
        assert manifest == manifest2 and torch.equal(payload, payload2)
    assert feed.waited_s > 0  # the second run waited for its layers

    feed = LayerFeed(len(layers))
    for i in range(5):
        feed.put(i, *layers[i])
    _, parts = pack_runs(codec, feed, rebuild=True, runs=4)
    assert len([next(parts), next(parts)]) == 2  # layers 1-4 are in
    feed.close("the pass failed")
    with pytest.raises(FeedClosed, match="the pass failed"):
        next(parts)
    assert len(feed) == 8 and feed[-4] is feed[4]


def test_mixed_shapes_are_packed_tensor_by_tensor() -> None:
    layers = [(_kv((1, 3, 9, 64), 0), _kv((1, 3, 9, 64), 1)), (_kv((1, 3, 12, 64), 2), _kv((1, 3, 12, 64), 3))]
    payload, manifest = pack_cache(get_codec("int8-fixed"), layers)
    assert len(manifest["entries"]) == 4 and all("layers" not in e for e in manifest["entries"])
    out = unpack_cache(payload, manifest)
    assert [tuple(k.shape) for k, _ in out] == [(1, 3, 9, 64), (1, 3, 12, 64)]


def test_unpack_rejects_a_manifest_missing_a_layer() -> None:
    layers = [(_kv((1, 3, 8, 64), i), _kv((1, 3, 8, 64), 10 + i)) for i in range(3)]
    payload, manifest = pack_cache(get_codec("int8"), layers)
    manifest["layers"] = 4
    with pytest.raises(ValueError, match="every layer"):
        unpack_cache(payload, manifest)


def test_unpack_rejects_truncated_payload() -> None:
    payload, manifest = pack_cache(get_codec("int4"), [(_kv((1, 3, 8, 64), 0), _kv((1, 3, 8, 64), 1))])
    with pytest.raises(ValueError):
        unpack_cache(payload[:-1], manifest)


@pytest.mark.parametrize("name", GROUP_CODECS)
def test_values_beyond_fp16_range_are_clamped(name: str) -> None:
    x = torch.zeros(1, 1, 8, 64)
    x[0, 0, 3, 5] = 1e6
    y = get_codec(name).decode(get_codec(name).encode(x, kind="value"))
    # fp16 scales cap the range: the value comes back clipped, not wrapped or infinite.
    assert torch.isfinite(y).all() and float(y[0, 0, 3, 5]) >= 6e4


def test_agreement_standard_error() -> None:
    from thunderserve.common.kvaccuracy import CodecResult

    def result(agreements: list[float]) -> CodecResult:
        rows = [{"id": str(i), "agreement": a} for i, a in enumerate(agreements)]
        return CodecResult("int4", sum(agreements) / len(agreements), 0.0, 4.5, 0.0, rows)

    assert result([1.0, 0.0]).agreement_se == pytest.approx(0.5)  # stdev 0.707 over sqrt(2)
    assert result([0.5] * 10).agreement_se == 0.0
    assert result([1.0]).agreement_se == 0.0  # one prompt: no spread to measure
    assert result([1.0, 0.0, 1.0, 0.0]).summary()["agreement_se"] == pytest.approx(0.2887, abs=1e-4)


def test_per_channel_widths_with_several_groups_in_one_part():
    """Keys with per-channel widths over n tokens that are a whole number of groups (here 32 = 2 x 16,
    after 6 sink tokens; in production: 8,192 tokens at groups of 4,096): each group gets its own range.
    Hypothesis found that the whole-n bounds were used for both, giving one range where the decoder
    reads two."""
    spec = QuantSpec(2, 16, "channel", 0, 6, "uniform", 0.0, 0, True)
    weights = torch.rand(3, 64, generator=torch.Generator().manual_seed(0)) * 10
    _assert_within_bound(GroupQuantCodec(spec, spec, key_weights=weights), _kv((1, 3, 38, 64), 0), "key")
