"""The entropy-coded int4 codec (kventropy): wire size, steps, profile, what travels."""

from __future__ import annotations

import math
from dataclasses import replace

import msgpack
import numpy as np
import pytest
import torch

from thunderserve.common import kventropy, kvprofiles, kvquant, native, rans
from thunderserve.common.kvcodec import EntropyCodec, FineEntropyCodec, get_codec, pack_cache, unpack_cache


def _kv(shape: tuple[int, ...], seed: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale


@pytest.mark.parametrize("shape", [(1, 3, 2000, 64), (1, 3, 37, 64), (2, 3, 1, 64), (1, 2, 70, 48), (0, 3, 5, 64)])
@pytest.mark.parametrize("kind", ["key", "value"])
@pytest.mark.parametrize("name", ["int4", "int8"])
def test_exact_wire_size(shape: tuple[int, ...], kind: str, name: str) -> None:
    """fp16 steps (one per head and channel), the fp16 sink (first) and recent (last) tokens, the
    coded bytes (int8: and 4 fine bits per coded value): nothing else."""
    packed = get_codec(name).encode(_kv(shape, 1), kind=kind)
    b, h, s, d = shape
    recent = min(1, max(0, s - 1))
    fine = (b * h * max(0, s - 1 - recent) * d + 1) // 2 if name == "int8" else 0
    assert packed.buffers["fine"].numel() == fine if name == "int8" else "fine" not in packed.buffers
    assert packed.buffers["steps"].shape == (h, d) and packed.buffers["steps"].dtype == torch.float16
    assert packed.buffers["sink"].shape == (b, h, min(1, s), d)
    assert packed.params["recent_tokens"] == recent
    if recent:
        assert packed.buffers["recent"].shape == (b, h, 1, d) and packed.buffers["recent"].dtype == torch.float16
    codes = packed.buffers["codes"].numel()
    assert packed.nbytes == 2 * h * d + 2 * b * h * (min(1, s) + recent) * d + codes + fine


def test_rate_without_a_profile() -> None:
    """No profile: each step is its channel's RMS / RELATIVE_STEP, about 4.5 bits per value on
    Gaussian channels of any scale at 2,000 tokens, and the coder within a tenth of a bit of
    the codes' own entropy."""
    x = _kv((1, 3, 2000, 64), 2) * torch.logspace(-2, 2, 64)  # channel scales over four decades
    for kind in ("key", "value"):
        packed = get_codec("int4").encode(x, kind=kind)
        values = x[..., 1:, :].numel()
        bits = packed.buffers["codes"].numel() * 8 / values
        assert 4.0 < bits < 5.0, bits
        if kind == "key":  # the codes themselves, rebuilt from the decoded tensor
            codes = torch.round(get_codec("int4").decode(packed)[..., 1:, :] / packed.buffers["steps"].float().view(
                1, 3, 1, 64))
            ideal = rans.entropy_bits(codes[0].permute(0, 2, 1).reshape(-1, 1999).to(torch.int32).numpy())
            assert bits - ideal / values < 0.1


def test_steps_set_the_error_and_travel() -> None:
    """Halving the steps halves the largest error and costs about a bit per value; a decoder with
    no steps of its own decodes what any encoder sent."""
    x = _kv((1, 3, 2000, 64), 3)
    steps = torch.full((3, 64), 0.1)
    coarse, fine = EntropyCodec(steps, steps), EntropyCodec(steps / 2, steps / 2)
    errs, sizes = [], []
    for codec in (coarse, fine):
        packed = codec.encode(x, kind="value")
        y = get_codec("int4").decode(packed)  # the receiver's own codec
        assert torch.equal(y, codec.decode(packed))
        errs.append(float((y - x)[..., 1:, :].abs().max()))
        sizes.append(packed.buffers["codes"].numel() * 8 / x[..., 1:, :].numel())
    assert errs[1] < 0.6 * errs[0]
    assert 0.8 < sizes[1] - sizes[0] < 1.3  # a bit, plus the wider alphabet's longer tables


@pytest.mark.parametrize("count", [1000, 1001])
def test_fine_bits_split_and_join(count: int) -> None:
    """A code's low 4 bits come off into packed bytes and go back on, negatives and an odd count included."""
    codes = np.random.default_rng(count).integers(-5000, 5000, count).astype(np.int32)
    coarse = codes.copy()
    fine = kventropy._split_fine(coarse)
    assert fine.nbytes == (count + 1) // 2 and np.array_equal(fine[:2], [(codes[0] & 15) | (codes[1] & 15) << 4,
                                                                           (codes[2] & 15) | (codes[3] & 15) << 4])
    assert np.array_equal(coarse, codes >> 4)
    kventropy._join_fine(coarse, fine)
    assert np.array_equal(coarse, codes)
    with pytest.raises(ValueError, match="fine_bits"):
        kventropy.encode_tensor(torch.zeros(1, 1, 4, 8), None, 0, 1, fine_bits=3)


def test_fine_bits_cut_the_error_and_add_only_their_own_bits() -> None:
    """int8 is int4's method with steps 16x finer: the same coded part (the codes' high bits have
    int4's distribution), 4 raw bits per value beside it, and a 16x smaller error bound. A payload
    without its fine bits is refused."""
    x = _kv((1, 3, 2000, 64), 4)
    steps = torch.full((3, 64), 0.1)
    coarse, fine = EntropyCodec(steps, steps), FineEntropyCodec(steps, steps)
    packed = [codec.encode(x, kind="key") for codec in (coarse, fine)]
    values = x[..., 1:-1, :].numel()
    assert packed[1].buffers["fine"].numel() == values // 2 and packed[1].params["fine_bits"] == 4
    coded = [p.buffers["codes"].numel() * 8 / values for p in packed]
    assert abs(coded[1] - coded[0]) < 0.05, coded  # floor(y / s) costs what round(y / s) does
    y = get_codec("int4").decode(packed[1])  # any entropy codec decodes what the params say
    bounds = [get_codec("int4").error_bound(p) for p in packed]
    assert torch.allclose(bounds[1] * 16, bounds[0])
    err, bound = (y - x)[..., 1:-1, :].abs(), bounds[1][..., 1:-1, :]  # the ends travel in fp16
    assert bool((err <= bound + 1e-6).all()) and float(err.max()) > 0.4 * float(bound.max())
    short = dict(packed[1].buffers, fine=packed[1].buffers["fine"][:-1])
    with pytest.raises(ValueError, match="fine bits"):
        get_codec("int8").decode(replace(packed[1], buffers=short))


def test_huge_and_non_finite_values() -> None:
    """Values far past fp16 come back within their step (the codes are int32, not fp16), and
    NaN or infinity never makes the decoder return a non-finite value."""
    x = torch.zeros(1, 1, 8, 64)
    x[0, 0, 3, 5] = 1e6
    codec = get_codec("int4")
    packed = codec.encode(x, kind="key")
    assert float((codec.decode(packed) - x).abs().max()) <= float(codec.error_bound(packed).max()) + 1e-3
    x[0, 0, 4, 6], x[0, 0, 5, 7] = math.nan, math.inf
    assert torch.isfinite(codec.decode(codec.encode(x, kind="value"))).all()


def test_profile_steps_equalise_the_heads() -> None:
    """The calibrated steps: a head of sensitivity a gets s / sqrt(a), a key channel of query
    energy w is divided by sqrt(w) more; every head's predicted KL share a * step^2 / w is then
    the same."""
    profile = kvprofiles.find(30, 3, 64)
    assert profile is not None and profile.entropy_step > 0
    for kind in ("key", "value"):
        steps = profile.entropy_steps(kind)
        assert steps.shape == (30, 3, 64) and bool((steps > 0).all())
        a = torch.tensor(profile.head_sensitivity[kind]).unsqueeze(-1)
        w = torch.stack([profile.key_weights(i) for i in range(30)]) if kind == "key" else torch.ones(1)
        share = a * w * steps.square()
        assert torch.allclose(share, torch.full_like(share, profile.entropy_step**2), rtol=1e-4)


def test_pack_cache_uses_the_profile_and_stacks_per_kind() -> None:
    """A small SmolLM2-shaped cache: one stack per kind, the profile's steps (of the coefficients in its
    bases), RoPE base and bases' name on the wire; another geometry gets steps from its data and
    keys as they are."""
    profile = kvprofiles.find(30, 3, 64)
    layers = [(_kv((1, 3, 20, 64), i), _kv((1, 3, 20, 64), 50 + i)) for i in range(30)]
    payload, manifest = pack_cache(get_codec("int4"), layers)
    assert [e["kind"] for e in manifest["entries"]] == ["key", "value"]
    key = manifest["entries"][0]
    assert key["params"]["rope_theta"] == profile.rope_theta and key["layers"] == list(range(30))
    assert key["params"]["transform"] == profile.name and key["params"]["transform_id"] == profile.transform_id
    _, _, shape, off, n = next(b for b in key["buffers"] if b[0] == "steps")
    sent = payload[off : off + n].view(torch.float16).view(shape).float()
    assert torch.allclose(sent, profile.entropy_steps("key", transformed=True), rtol=1e-3)
    out = unpack_cache(payload, msgpack.unpackb(msgpack.packb(manifest)))
    assert all(k.shape == (1, 3, 20, 64) for k, _ in out)
    _, manifest4 = pack_cache(get_codec("int4"), layers[:4])
    assert manifest4["entries"][0]["params"]["rope_theta"] == 0.0
    assert "transform" not in manifest4["entries"][0]["params"]


def test_pack_cache_without_the_first_layer_uses_the_other_layers_steps() -> None:
    """rebuild=True: the stacks name layers 1..29 and carry the profile's steps for those layers
    (explicit per-layer steps are cut the same way); the decoder puts the rebuilt layer first."""
    profile = kvprofiles.find(30, 3, 64)
    layers = [(_kv((1, 3, 20, 64), i), _kv((1, 3, 20, 64), 50 + i)) for i in range(30)]
    explicit = EntropyCodec(profile.entropy_steps("key"), profile.entropy_steps("value"), profile.rope_theta)
    for codec, transformed in ((get_codec("int4"), True), (explicit, False)):
        payload, manifest = pack_cache(codec, layers, rebuild=True)
        key = manifest["entries"][0]
        assert manifest["rebuilt"] == 1 and key["layers"] == list(range(1, 30))
        assert key["params"].get("transform_layer") == (1 if transformed else None)
        _, _, shape, off, n = next(b for b in key["buffers"] if b[0] == "steps")
        sent = payload[off : off + n].view(torch.float16).view(shape).float()
        assert torch.allclose(sent, profile.entropy_steps("key", transformed)[1:], rtol=1e-3)
        out = unpack_cache(payload, manifest, lambda: layers[0])
        assert out[0][0] is layers[0][0] and len(out) == 30
        assert torch.allclose(out[5][1], layers[5][1], atol=0.1)  # values of std 1, steps ~0.01-0.05


def test_error_bound_holds_through_rope_and_rotation() -> None:
    """The bound carried back through the profile's inverse transform and RoPE (keys) holds on a
    calibrated stack, the fp16 sink and recent tokens excepted."""
    layers = [(_kv((1, 3, 50, 64), i, 3.0), _kv((1, 3, 50, 64), 90 + i)) for i in range(30)]
    codec = get_codec("int4")
    for j, packed in enumerate(codec.encode_layers(layers)):
        x = torch.stack([layer[j] for layer in layers])
        err = (codec.decode(packed) - x).abs()[..., 1:-1, :]
        bound = codec.error_bound(packed)[..., 1:-1, :]
        assert bool((err <= bound * (1 + 1e-4) + 1e-6).all())
        # a bound, not a blanket (through the inverse transform it adds 64 errors' worst cases)
        assert float((err / bound).max()) > 0.15


def test_default_steps_share_a_head_after_rotation() -> None:
    x = _kv((2, 3, 1, 10, 64), 4) * torch.arange(1, 65)
    rotated, per_channel = kventropy.default_steps(x, rotate=64), kventropy.default_steps(x, rotate=0)
    assert bool((rotated == rotated[..., :1]).all())
    assert float(per_channel[..., -1].mean()) > 30 * float(per_channel[..., 0].mean())


def test_tokens_the_queries_will_attend_get_finer_steps() -> None:
    """Per-token steps: a token whose pre-RoPE key lines up with the (slow-pair) mean query is
    predicted to draw attention and gets the finest steps, in its key and in its value (which
    take the key's exponents), and comes back closer."""
    theta = 1e5
    query = torch.zeros(3, 64)
    query[:, 31] = 4.0  # the slowest RoPE pair
    pre = _kv((1, 3, 200, 64), 5)
    pre[..., 50, 31] = 30.0
    keys, values = kvquant.rope(pre, theta, 0), _kv((1, 3, 200, 64), 6)
    steps = torch.full((3, 64), 0.05)
    codec = EntropyCodec(steps, steps, theta, token_query=query)
    pk, pv = codec.encode_layers([(keys, values)])
    exps = kventropy.decoded_token_exponents(pk.buffers, pk.shape, 1, 1)[0, 0]  # [heads, 198]
    assert torch.equal(exps, kventropy.decoded_token_exponents(pv.buffers, pv.shape, 1, 1)[0, 0])
    assert bool((exps[:, 49] == exps.min(1).values).all()) and bool((exps[:, 49] < 0).all())
    err = (codec.decode(pv)[0] - values).abs()[0, :, 1:]  # [heads, 199, 64]
    assert float(err[:, 49].max()) < 0.5 * float(err.max())
    bound = codec.error_bound(pk)[0]
    assert bool(((codec.decode(pk)[0] - keys).abs()[..., 1:-1, :] <= bound[..., 1:-1, :] * (1 + 1e-4) + 1e-6).all())


def test_profile_transforms_invert_and_decorrelate() -> None:
    """The shipped transforms (fp16 on disk): each decode matrix inverts its encode matrix to
    float precision (it is computed from the same fp16 matrix on both sides of the hop), and a
    values matrix is the head's sensitivity root times an orthonormal basis."""
    profile = kvprofiles.find(30, 3, 64)
    assert profile is not None and profile.transform_id
    for kind in ("key", "value"):
        encode, decode = profile.transforms(kind)
        assert encode.shape == decode.shape == (30, 3, 64, 64)
        eye = torch.eye(64).expand(30, 3, 64, 64)
        assert torch.allclose(encode.double() @ decode.double(), eye.double(), atol=1e-4)
    encode = profile.transforms("value")[0]
    gram = encode.transpose(-1, -2) @ encode  # a * I for a basis scaled by sqrt(a)
    a = torch.tensor(profile.head_sensitivity["value"]).view(30, 3, 1, 1)
    assert torch.allclose(gram / a, torch.eye(64).expand(30, 3, 64, 64), atol=2e-2)


def test_a_decorrelating_transform_saves_bits_at_the_same_error() -> None:
    """Strongly correlated channels, coded in their KLT basis with the same steps: the error bound
    is carried back through the inverse (and holds), and the codes take fewer bits, as high-rate
    theory says (half the mean log2 of the channel variances over the eigenvalues)."""
    g = torch.Generator().manual_seed(7)
    mix = torch.randn(3, 64, 64, generator=g) * torch.logspace(0, -2, 64).view(1, 64, 1)
    x = torch.randn(1, 3, 500, 64, generator=g) @ mix  # [1, heads, tokens, 64], correlated channels
    cov = torch.einsum("bhnd,bhne->hde", x, x) / x.shape[-2]
    basis = torch.linalg.eigh(cov.double())[1].flip(-1).float()  # [heads, 64, 64]
    steps = torch.full((3, 64), 0.05)
    plain = kventropy.encode_tensor(x, steps, 0, 1).buffers
    coded = kventropy.encode_tensor(x, steps, 0, 1, transform=basis).buffers
    inverse = basis.transpose(-1, -2)
    y = kventropy.decode_tensor(coded, tuple(x.shape), 0, 1, inverse=inverse)
    bound = kventropy.error_bound(coded, tuple(x.shape), 0, 1, inverse=inverse)
    assert bool(((y - x).abs() <= bound * (1 + 1e-4) + 1e-5)[..., 1:, :].all())  # the sink is fp16
    rms = [float((kventropy.decode_tensor(b, tuple(x.shape), 0, 1, inverse=i) - x)[..., 1:, :].square().mean().sqrt())
           for b, i in ((plain, None), (coded, inverse))]
    assert abs(rms[1] / rms[0] - 1) < 0.05  # an orthonormal basis keeps the error
    values = x[..., 1:, :].numel()
    saved = (plain["codes"].numel() - coded["codes"].numel()) * 8 / values
    variances = x.var(-2).clamp_min(1e-12)
    eig = torch.linalg.eigvalsh(cov.double()).clamp_min(1e-12)
    promised = float(0.5 * (variances.log2().mean() - eig.log2().mean()))
    assert saved > 0.5 * promised and saved > 0.3, (saved, promised)


def test_a_receiver_without_the_senders_bases_refuses_the_cache() -> None:
    """The header names the profile and its basis file's digest; a cache coded in other bases (a
    different release on the other replica) is refused with a message, never decoded wrongly."""
    layers = [(_kv((1, 3, 12, 64), i), _kv((1, 3, 12, 64), 70 + i)) for i in range(30)]
    payload, manifest = pack_cache(get_codec("int4"), layers, rebuild=True)
    out = unpack_cache(payload, manifest, lambda: layers[0])
    assert torch.allclose(out[7][1], layers[7][1], atol=0.2)
    manifest["entries"][1]["params"]["transform_id"] = "0" * 16
    with pytest.raises(ValueError, match="same ThunderServe release"):
        unpack_cache(payload, manifest, lambda: layers[0])
    manifest["entries"][1]["params"].update(transform_id=kvprofiles.find(30, 3, 64).transform_id, transform_layer=5)
    with pytest.raises(ValueError, match="does not have them"):
        unpack_cache(payload, manifest, lambda: layers[0])


def test_the_last_token_travels_in_fp16_like_the_first() -> None:
    """The newest token, which the first decode steps attend to most, comes back as its fp16
    copy (not rounded to a step), and the bound says so; a one-token tensor is all sink."""
    x = _kv((1, 3, 40, 64), 11, 5.0)
    codec = get_codec("int4")
    for kind in ("key", "value"):
        packed = codec.encode(x, kind=kind)
        y = codec.decode(packed)
        for t in (0, -1):
            assert torch.equal(y[..., t, :], x[..., t, :].half().float())
        assert float(codec.error_bound(packed)[..., -1, :].abs().max()) == 0.0
        assert float((y - x)[..., 1:-1, :].abs().max()) > 1e-3  # the body is quantized
    one = codec.encode(x[..., :1, :], kind="key")
    assert one.params["recent_tokens"] == 0 and "recent" not in one.buffers


@pytest.mark.parametrize(("head_dim", "tokens"), [(64, 151), (32, 151), (64, 19)])
@pytest.mark.parametrize("level", ["avx512", "avx2"])
def test_the_c_kernels_and_the_torch_path_code_a_transformed_stack_alike(
    level: str, head_dim: int, tokens: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`transform_simd.c` (RoPE undone, logits, exponents, product and rounding in C; its AVX-512 and,
    with THUNDERSERVE_SIMD=avx2, its AVX2 kernels) against the numba and torch path
    (THUNDERSERVE_SIMD=0), on a stack cut short along the tokens (so its rows are not one
    contiguous block), with two sequences, non-finite values, a token count that leaves partial
    vectors, keys with per-token steps from a query and values with the keys' exponents and int8's
    fine bits (split off in C row by row): each decodes within its bound, and the codes and exponents
    match but for a rare rounding tie (the sums run in another order)."""
    setting = "1" if level == "avx512" else "avx2"
    monkeypatch.setenv("THUNDERSERVE_SIMD", setting)
    native.kernels.cache_clear()
    if native.level_name() != level:
        monkeypatch.delenv("THUNDERSERVE_SIMD")
        native.kernels.cache_clear()
        pytest.skip(f"this CPU or machine does not run the {level} kernels")
    g = torch.Generator().manual_seed(3)
    full = torch.randn(3, 2, 3, 160, head_dim, generator=g) * torch.logspace(0, 1, head_dim)
    full[0, 1, 2, 10, 5], full[1, 0, 0, 12, 9], full[2, 1, 1, 14, 0] = float("nan"), float("inf"), -float("inf")
    parts = [layer[..., :tokens, :] for layer in full]  # [2, 3, tokens, D] views, not contiguous
    transform = torch.linalg.qr(torch.randn(3, 3, head_dim, head_dim, generator=g))[0] * 2.0
    steps = torch.rand(3, 3, head_dim, generator=g) * 0.2 + 0.05
    query = torch.randn(3, 3, head_dim, generator=g)
    shape = (3, 2, 3, tokens, head_dim)

    def both(**kw):
        coded = []
        for simd in (setting, "0"):
            monkeypatch.setenv("THUNDERSERVE_SIMD", simd)
            native.kernels.cache_clear()
            encoded = kventropy.encode_tensor(parts, steps, 0, 1, transform=transform, recent_tokens=1, **kw)
            coded.append(encoded.buffers)
        monkeypatch.delenv("THUNDERSERVE_SIMD")
        native.kernels.cache_clear()  # this machine's own kernels again
        return coded

    inverse = transform.inverse()
    keys = both(rope_theta=1e4, token_query=query, token_alpha=0.15)
    values = both(token_exp=kventropy.decoded_token_exponents(keys[0], shape, 1, 1), fine_bits=kventropy.FINE_BITS)
    for (kernel, torch_path), theta, fine_bits in ((keys, 1e4, 0), (values, 0.0, kventropy.FINE_BITS)):
        n = tokens - 2
        codes = [rans.decode(c["codes"].numpy(), 3 * 2 * 3 * head_dim, n) for c in (kernel, torch_path)]
        assert np.abs(codes[0] - codes[1]).max() <= 1  # the coded part: the codes' high bits
        for c, coded in zip(codes, (kernel, torch_path), strict=True):
            assert ("fine" in coded) == bool(fine_bits)
            if fine_bits:
                kventropy._join_fine(c.reshape(-1), coded["fine"].numpy())
        differ = codes[0] != codes[1]
        assert differ.mean() < 1e-3 and np.abs(codes[0] - codes[1]).max() <= 1
        if "tokens" in kernel:
            exps = [kventropy.decoded_token_exponents(c, shape, 1, 1) for c in (kernel, torch_path)]
            assert (exps[0] != exps[1]).float().mean() < 1e-2 and (exps[0] - exps[1]).abs().max() <= 1
            assert exps[0].abs().max() > 0  # the query did set per-token steps
        x = torch.stack(parts)
        finite = x.isfinite().all(-1, keepdim=True).expand_as(x)[..., 1:-1, :]  # a transform mixes a token's channels
        for coded in (kernel, torch_path):
            y = kventropy.decode_tensor(coded, shape, 0, 1, theta, inverse=inverse, recent_tokens=1,
                                        fine_bits=fine_bits)
            bound = kventropy.error_bound(coded, shape, 0, 1, theta, inverse=inverse, recent_tokens=1,
                                          fine_bits=fine_bits)
            err = (y - x)[..., 1:-1, :].abs()
            assert bool((err <= bound[..., 1:-1, :] * (1 + 1e-4) + 1e-4)[finite].all())
            assert bool(y.isfinite().all())


@pytest.mark.parametrize("transform", [False, True])
def test_encoding_returns_the_exponents_its_buffers_carry(transform: bool) -> None:
    """The values of a layer take their keys' per-token steps from what encoding the keys returned,
    not by decoding them again: it must be exactly what the decoder reads."""
    x = _kv((2, 1, 3, 90, 64), 13, 3.0)
    query = _kv((2, 3, 64), 14)
    basis = torch.linalg.qr(_kv((2, 3, 64, 64), 15))[0] if transform else None
    steps = torch.full((2, 3, 64), 0.2)
    encoded = kventropy.encode_tensor(list(x), steps, 0, 1, 1e4, token_query=query, token_alpha=0.15,
                                      transform=basis, recent_tokens=1)
    read = kventropy.decoded_token_exponents(encoded.buffers, tuple(x.shape), 1, 1)
    assert encoded.token_exp is not None and torch.equal(encoded.token_exp, read)
    assert read.abs().max() > 0
