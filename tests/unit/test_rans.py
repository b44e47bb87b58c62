"""rANS coder for KV-cache codes: exact round-trip on every shape and int32 value, size close to the
empirical entropy, and corrupt buffers rejected with ValueError."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from thunderserve.common import native, rans

I32_MIN, I32_MAX = -(2**31), 2**31 - 1


def _laplace(streams: int, n: int, seed: int = 0) -> np.ndarray:
    """Rows like quantized KV channels: Laplacian, each with its own centre and scale."""
    rng = np.random.default_rng(seed)
    centre = rng.integers(-90, 90, size=(streams, 1))
    scale = rng.uniform(2.0, 4.0, size=(streams, 1))  # entropy ~3.4-4.4 bits, like real KV codes
    return np.round(centre + rng.laplace(0.0, 1.0, size=(streams, n)) * scale).astype(np.int32)


def _roundtrip(a: np.ndarray) -> np.ndarray:
    """Encode and decode, and where the AVX-512 data coder runs, its numba twin too: the same
    bytes out, and each decodes the other's."""
    buf = rans.encode(a)
    assert buf.dtype == np.uint8 and buf.ndim == 1
    out = rans.decode(buf, *a.shape)
    assert out.dtype == np.int32 and out.shape == a.shape
    np.testing.assert_array_equal(out, a)
    if native.level_name():
        np.testing.assert_array_equal(rans.encode(a, simd=False), buf)
        np.testing.assert_array_equal(rans.decode(buf, *a.shape, simd=False), a)
    return buf


def _decoded_or_error(buf: np.ndarray, shape: tuple[int, int], simd: bool) -> np.ndarray | str:
    try:
        return rans.decode(buf, *shape, simd=simd)
    except ValueError as exc:
        return str(exc)


@pytest.mark.parametrize(
    "shape", [(0, 0), (0, 7), (5, 0), (1, 1), (1, 2), (3, 1), (4, 1), (5, 3), (8, 2000), (13, 257)]
)
def test_roundtrip_shapes(shape: tuple[int, int]) -> None:
    _roundtrip(_laplace(*shape))


def test_constant_streams_cost_nothing_beyond_headers() -> None:
    a = np.full((64, 2000), 7, np.int32)
    a[10] = -3
    a[11] = I32_MAX
    a[12] = I32_MIN
    buf = _roundtrip(a)
    assert len(buf) < 64 * 8 + 200


def test_single_huge_outliers() -> None:
    a = _laplace(9, 500, seed=1)
    a[2, 17] = I32_MAX
    a[2, 18] = I32_MIN
    a[5, 0] = I32_MIN
    a[8, 499] = I32_MAX
    buf = _roundtrip(a)
    # an outlier is an escape symbol plus 4 raw bytes, not a wider table
    assert len(buf) <= len(rans.encode(_laplace(9, 500, seed=1))) + 4 * (4 + 4)


def test_random_wide_range() -> None:
    rng = np.random.default_rng(2)
    _roundtrip(rng.integers(I32_MIN, I32_MAX, size=(6, 300), endpoint=True, dtype=np.int64).astype(np.int32))
    # wide but windowable: most values near 0, a spray of far ones
    a = np.round(rng.laplace(0, 3, size=(7, 1000))).astype(np.int32)
    far = rng.random(a.shape) < 0.02
    a[far] = rng.integers(-5000, 5000, size=int(far.sum()))
    _roundtrip(a)


@pytest.mark.parametrize("spread", [40.0, 400.0, 20000.0])  # rows ~600, ~6,000 and > 65,536 values wide
def test_a_wide_row_escapes_only_what_the_best_window_leaves_out(spread: float) -> None:
    """Rows wider than a table window keep the values of the window that covers most of them and
    escape the rest (the escape count sits in the header), whichever way the window is found."""
    rng = np.random.default_rng(3)
    a = np.round(rng.laplace(0, spread, size=(4, 1500))).astype(np.int32)
    buf = _roundtrip(a)
    window = 254  # rans._KMAX
    fewest = 0
    for row in np.sort(a.astype(np.int64), axis=1):
        covered = np.searchsorted(row, row + window, side="left") - np.arange(row.size)
        fewest += row.size - int(covered.max())
    assert int.from_bytes(buf[28:32].tobytes(), "little") == fewest


def test_other_integer_dtypes_and_non_contiguous() -> None:
    a = _laplace(6, 100)
    _roundtrip(np.ascontiguousarray(a))
    np.testing.assert_array_equal(rans.decode(rans.encode(a.astype(np.int16)), 6, 100), a)
    view = _laplace(12, 100)[::2]
    np.testing.assert_array_equal(rans.decode(rans.encode(view), 6, 100), view)


@settings(max_examples=60, deadline=None)
@given(
    streams=st.integers(0, 9),
    n=st.integers(0, 40),
    lo=st.integers(I32_MIN, I32_MAX),
    width=st.sampled_from([1, 2, 30, 254, 255, 1000, 2**32]),
    seed=st.integers(0, 2**32 - 1),
)
def test_roundtrip_property(streams: int, n: int, lo: int, width: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    vals = lo + rng.integers(0, width, size=(streams, n), dtype=np.int64)
    a = np.clip(vals, I32_MIN, I32_MAX).astype(np.int32)
    _roundtrip(a)


@pytest.mark.parametrize("n", [200, 2000])
def test_size_close_to_entropy(n: int) -> None:
    """Tables + payload + headers against the ideal. Measured on this data: ~0.07 bit/symbol at
    n = 2000 (the KV-cache case; 0.068 on a real SmolLM2 cache) and ~0.5 at n = 200, where each
    row's table is spread over ten times fewer symbols."""
    a = _laplace(256, n, seed=3)
    ideal = rans.entropy_bits(a)
    bits = 8 * len(_roundtrip(a))
    margin = 0.09 if n == 2000 else 0.7
    assert ideal < bits < ideal + margin * a.size, (bits - ideal) / a.size


def test_entropy_bits() -> None:
    assert rans.entropy_bits(np.zeros((3, 10), np.int32)) == 0.0
    assert rans.entropy_bits(np.zeros((0, 10), np.int32)) == 0.0
    a = np.tile(np.array([[1, 2, 3, 4]], np.int32), (2, 2))  # 2 rows, each 4 symbols twice
    assert rans.entropy_bits(a) == pytest.approx(2 * 8 * 2.0)


def test_corrupt_buffers_raise() -> None:
    a = _laplace(10, 300, seed=4)
    a[3, 5] = I32_MAX
    buf = rans.encode(a)
    with pytest.raises(ValueError):
        rans.decode(buf[:-1], 10, 300)
    with pytest.raises(ValueError):
        rans.decode(buf[:20], 10, 300)
    with pytest.raises(ValueError):
        rans.decode(np.zeros(0, np.uint8), 10, 300)
    with pytest.raises(ValueError):
        rans.decode(np.concatenate([buf, np.zeros(3, np.uint8)]), 10, 300)
    with pytest.raises(ValueError):
        rans.decode(buf, 10, 301)  # wrong shape
    with pytest.raises(ValueError):
        rans.decode(buf, 11, 300)
    # flipped bytes anywhere: a ValueError, or (rarely, in the rANS payload, which has no checksum)
    # a wrong array; never a crash or hang
    rng = np.random.default_rng(5)
    rejected = 0
    for _ in range(300):
        bad = buf.copy()
        pos = rng.integers(0, len(bad), size=rng.integers(1, 4))
        bad[pos] ^= rng.integers(1, 256, size=len(pos)).astype(np.uint8)
        out = _decoded_or_error(bad, (10, 300), simd=True)
        if native.level_name():  # both data decoders read a damaged stream the same way
            twin = _decoded_or_error(bad, (10, 300), simd=False)
            assert isinstance(twin, str) if isinstance(out, str) else np.array_equal(twin, out)
        if isinstance(out, str):
            rejected += 1
            continue
        assert out.shape == (10, 300)
    assert rejected > 290


def test_random_garbage_never_crashes() -> None:
    rng = np.random.default_rng(6)
    good = rans.encode(_laplace(5, 50))
    for i in range(200):
        junk = rng.integers(0, 256, size=rng.integers(0, 400), dtype=np.uint8)
        if i % 2 and len(junk) >= 36:
            junk[:36] = good[:36]  # valid header, garbage body
        with pytest.raises(ValueError):
            rans.decode(junk, 5, 50)


def test_only_the_states_of_lanes_that_code_are_stored() -> None:
    """A row's token t goes to state t mod 64, so a buffer stores the final states of lanes
    0 .. min(n, 64) - 1 only (u32 each, in the state range [2^15, 2^31)), ahead of the data words."""
    a = _laplace(6, 2000, seed=8)
    for n in (20, 2000):
        buf = _roundtrip(a[:, :n])
        hdr, mtab, meta_words, data_words, n_esc = (int.from_bytes(buf[o : o + 4].tobytes(), "little")
                                                    for o in (12, 16, 20, 24, 28))
        start = 36 + mtab + hdr + 2 * meta_words
        assert len(buf) == start + 2 * data_words + 4 * n_esc
        states = buf[start : start + 4 * min(n, 64)].view("<u4")
        assert (states >= 2**15).all() and (states < 2**31).all()
        # one state fewer stored is a different layout: the decoder refuses it
        short = np.concatenate([buf[:24], np.frombuffer((data_words - 2).to_bytes(4, "little"), np.uint8),
                                buf[28:start], buf[start + 4 :]])
        with pytest.raises(ValueError):
            rans.decode(short, 6, n)


@pytest.mark.parametrize("level", ["avx512", "avx2"])
def test_each_vector_kernel_writes_the_numba_twins_bytes(level: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The AVX-512 and the AVX2 kernels (THUNDERSERVE_SIMD=avx2 caps the level) each write the
    numba path's bytes and decode them, on tails of every length, single-symbol rows, escapes, rows
    on each side of every table size the encoders hold in registers (AVX-512: 16, 32, 64, 128
    symbols; AVX2: 8, 16, 32, 64) and wide rows, and read a damaged stream as the numba path does."""
    monkeypatch.setenv("THUNDERSERVE_SIMD", "avx2" if level == "avx2" else "1")
    native.kernels.cache_clear()
    try:
        if native.level_name() != level:
            pytest.skip(f"this CPU or machine does not run the {level} kernels")
        rng = np.random.default_rng(9)
        cases = [_laplace(3, n, seed=n) for n in (1, 7, 8, 9, 15, 16, 17, 63, 64, 65, 130, 1998)]
        cases.append(np.full((4, 100), 5, np.int32))  # one symbol: the whole probability range
        spans = (7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65, 127, 128, 129)  # windows and their escape index
        cases.append(np.stack([np.resize(np.arange(w), 200) - 40 for w in spans]).astype(np.int32))
        wide = np.round(rng.laplace(0, 400, size=(3, 300))).astype(np.int32)
        wide[1, 7] = I32_MIN
        cases.append(wide)
        for a in cases:
            _roundtrip(a)  # the same bytes as the numba path, each decoding the other's
        buf = rans.encode(cases[-1])
        for i in range(100):
            bad = buf.copy()
            bad[rng.integers(36, len(bad))] ^= np.uint8(1 + i % 255)
            out = _decoded_or_error(bad, (3, 300), simd=True)
            twin = _decoded_or_error(bad, (3, 300), simd=False)
            assert isinstance(twin, str) if isinstance(out, str) else np.array_equal(twin, out)
    finally:
        native.kernels.cache_clear()  # back to this machine's own level for the other tests


def test_the_library_builds_into_an_empty_cache_and_a_failed_build_falls_back(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On first use the library is compiled into the cache directory; if the compiler fails, the
    coder warns and runs its numba path, and the bytes are the same."""
    import shutil

    a = _laplace(5, 300, seed=10)
    expected = rans.encode(a, simd=False)
    monkeypatch.setenv("THUNDERSERVE_CACHE_DIR", str(tmp_path / "ok"))
    native.kernels.cache_clear()
    try:
        if shutil.which("cc") is None and shutil.which("gcc") is None:
            pytest.skip("no C compiler here")
        level = native.level_name()
        built = list((tmp_path / "ok").glob("thunderserve_simd-*.so"))
        assert len(built) == 1 and not list((tmp_path / "ok").glob("*.tmp"))
        if level:
            np.testing.assert_array_equal(rans.encode(a), expected)
        monkeypatch.setenv("THUNDERSERVE_CACHE_DIR", str(tmp_path / "broken"))
        monkeypatch.setenv("CC", shutil.which("false") or "false")
        native.kernels.cache_clear()
        assert native.level_name() is None
        np.testing.assert_array_equal(rans.encode(a), expected)
        np.testing.assert_array_equal(rans.decode(expected, 5, 300), a)
    finally:
        native.kernels.cache_clear()


def test_releases_gil_in_threads() -> None:
    from concurrent.futures import ThreadPoolExecutor

    parts = [_laplace(16, 500, seed=s) for s in range(4)]
    with ThreadPoolExecutor(2) as pool:
        bufs = list(pool.map(rans.encode, parts))
        outs = list(pool.map(lambda b: rans.decode(b, 16, 500), bufs))
    for a, out in zip(parts, outs):
        np.testing.assert_array_equal(out, a)
