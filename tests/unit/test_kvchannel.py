"""The direct KV channel between two real processes: data intact, tags matched, failures surface."""

from __future__ import annotations

import multiprocessing as mp
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from thunderserve.common.kvchannel import ChannelCancelled, ChannelClient, ChannelError, ChannelHost, split_points
from thunderserve.common.kvcodec import get_codec, pack_cache, unpack_cache

CTX = mp.get_context("spawn")


@pytest.fixture(params=["tcp", "gloo"])
def backend(request) -> str:
    """Both CPU transports: the socket pair, and torch.distributed (whose code NCCL shares)."""
    return request.param


def _prefill_side(endpoint: str, pair_id: str, payloads: list[tuple[int, bytes]], die_after: bool,
                  linger_s: float, backend: str, ready) -> None:
    import os
    from concurrent.futures import ThreadPoolExecutor

    ready.set()  # imports done: what is left is the connect itself
    pair = ChannelClient(timeout_s=10, backend=backend).connect(endpoint, pair_id)
    # Each transfer waits in its own thread, as the prefill role does: a send completes when
    # the receiver takes that tag, in whatever order it does.
    with ThreadPoolExecutor(len(payloads)) as pool:
        for tag, data in payloads:
            pool.submit(pair.send, torch.frombuffer(bytearray(data), dtype=torch.uint8), tag)
    if die_after:
        os._exit(0)  # vanish without closing anything, like a crash
    time.sleep(linger_s)


def _start_sender(endpoint, pair_id, payloads, backend, die_after=False, linger_s=1.0):
    ready = CTX.Event()
    proc = CTX.Process(target=_prefill_side, args=(endpoint, pair_id, payloads, die_after, linger_s, backend, ready))
    proc.ready = ready
    proc.start()
    return proc


def test_transfers_arrive_intact_and_matched_by_tag(backend):
    host = ChannelHost(timeout_s=10)
    big = torch.randint(0, 256, (9 * 1024 * 1024 + 7,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    # the last one is over SPLIT_BYTES: it travels as several tagged parts in flight at once
    payloads = [(7, bytes(range(256)) * 4096), (3, b"hello channel"), (11, bytes(big.numpy()))]
    proc = _start_sender(host.endpoint, "pair-a", payloads, backend)
    pair = host.accept("pair-a", backend)
    # receive in a different order than sent: tags, not order, match them up
    reused = torch.empty(16 * 1024 * 1024, dtype=torch.uint8)
    for tag, data in sorted(payloads):
        got = pair.recv(len(data), tag, out=reused if tag == 11 else None)
        assert bytes(got.numpy()) == data
    proc.join(10)
    assert proc.exitcode == 0


def test_concurrent_receivers_each_get_their_own_payload(backend):
    from concurrent.futures import ThreadPoolExecutor

    host = ChannelHost(timeout_s=10)
    gen = torch.Generator().manual_seed(1)
    sizes = [1, 1000, 1 << 20, 3 << 20, 5 << 20, 77]
    payloads = [(20 + i, bytes(torch.randint(0, 256, (n,), dtype=torch.uint8, generator=gen).numpy()))
                for i, n in enumerate(sizes)]
    proc = _start_sender(host.endpoint, "pair-c", payloads, backend)
    pair = host.accept("pair-c", backend)
    # as the decode role does: each handoff receives in its own channel thread, in any order
    with ThreadPoolExecutor(len(payloads)) as pool:
        got = list(pool.map(lambda p: bytes(pair.recv(len(p[1]), p[0]).numpy()), reversed(payloads)))
    assert got == [data for _, data in reversed(payloads)]
    proc.join(10)
    assert proc.exitcode == 0


def test_kv_cache_round_trips_through_channel_and_codec(backend):
    torch.manual_seed(0)
    layers = [(torch.randn(1, 3, 17, 64), torch.randn(1, 3, 17, 64)) for _ in range(4)]
    payload, manifest = pack_cache(get_codec("none"), layers)
    host = ChannelHost(timeout_s=10)
    proc = _start_sender(host.endpoint, "pair-kv", [(1, bytes(payload.numpy()))], backend)
    got = unpack_cache(host.accept("pair-kv", backend).recv(manifest["nbytes"], 1), manifest)
    proc.join(10)
    for (k, v), (gk, gv) in zip(layers, got):
        assert torch.equal(k, gk) and torch.equal(v, gv)


def _stream_cache() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(5)
    return [(torch.randn(1, 3, 40, 64, generator=g), torch.randn(1, 3, 40, 64, generator=g)) for _ in range(30)]


def _stream_side(endpoint: str, pair_id: str, backend: str, ready) -> None:
    from thunderserve.common.kvchannel import send_parts
    from thunderserve.common.kvcodec import pack_runs

    ready.set()
    pair = ChannelClient(timeout_s=10, backend=backend).connect(endpoint, pair_id)
    _, parts = pack_runs(get_codec("int4"), _stream_cache(), rebuild=True, runs=4)
    send_parts(pair, 1, parts)
    time.sleep(1.0)


def test_a_streamed_cache_decodes_run_by_run_to_the_one_payload_values(backend):
    """int4 in 4 runs through the channel (each run encoded, sent, received and decoded on its own,
    the first layer rebuilt by the receiver) gives exactly what one payload gives, and every
    received buffer is handed back."""
    from thunderserve.common.kvchannel import BufferPool, recv_parts
    from thunderserve.common.kvcodec import pack_runs, unpack_runs

    layers = _stream_cache()
    head, _ = pack_runs(get_codec("int4"), layers, rebuild=True, runs=4)
    assert head == {"codec": "int4", "layers": 30, "runs": 4, "rebuilt": 1}
    host = ChannelHost(timeout_s=10)
    ready = CTX.Event()
    proc = CTX.Process(target=_stream_side, args=(host.endpoint, "pair-s", backend, ready))
    proc.start()
    pair = host.accept("pair-s", backend)
    pool, released = BufferPool(), []

    def release(buf: torch.Tensor) -> None:
        released.append(buf.numel())
        pool.give(buf)

    got = unpack_runs(head, recv_parts(pair, 1, head["runs"], pool), lambda: layers[0], release=release)
    proc.join(10)
    assert len(released) == 4
    expected = unpack_cache(*pack_cache(get_codec("int4"), layers, rebuild=True), lambda: layers[0])
    for (k, v), (gk, gv) in zip(expected, got, strict=True):
        assert torch.equal(k, gk) and torch.equal(v, gv)


def test_dead_peer_is_an_error_not_a_hang(backend):
    host = ChannelHost(timeout_s=5)
    proc = _start_sender(host.endpoint, "pair-dead", [(1, b"x" * 10)], backend, die_after=True)
    pair = host.accept("pair-dead", backend)
    assert bytes(pair.recv(10, 1).numpy()) == b"x" * 10
    proc.join(10)
    start = time.monotonic()
    with pytest.raises(ChannelError):
        pair.recv(10, 2)  # the sender is gone: this must fail, not wait forever
    assert time.monotonic() - start < 6
    assert pair.broken
    with pytest.raises(ChannelError, match="broken"):
        pair.recv(10, 3)


def test_silent_peer_times_out_within_the_pair_timeout(backend):
    host = ChannelHost(timeout_s=2)
    proc = _start_sender(host.endpoint, "pair-silent", [(1, b"y" * 10)], backend, linger_s=6.0)
    # The short pair timeout is what is under test, not the sender's start-up (a spawned process
    # importing torch took over 2 s on a loaded CI machine): accept once its imports are done.
    assert proc.ready.wait(60), "the sender process did not start"
    pair = host.accept("pair-silent", backend)
    assert bytes(pair.recv(10, 1).numpy()) == b"y" * 10
    start = time.monotonic()
    with pytest.raises(ChannelError, match="(?i)timed out"):
        pair.recv(10, 2)  # the sender is alive but never sends tag 2
    assert 1.5 < time.monotonic() - start < 4
    # gloo closes a pair on any timeout; the socket pair only when a payload was cut mid-way
    assert bool(pair.broken) == (backend == "gloo")
    proc.kill()
    proc.join(10)


def _late_side(endpoint: str, pair_id: str, delay_s: float, ready) -> None:
    ready.set()
    pair = ChannelClient(timeout_s=10, backend="tcp").connect(endpoint, pair_id)
    time.sleep(delay_s)
    pair.send(torch.frombuffer(bytearray(b"late"), dtype=torch.uint8), 5)
    time.sleep(1.0)


def _late_pair(pair_id: str, delay_s: float, timeout_s: float = 1, host: ChannelHost | None = None):
    """(the decode side's socket pair, the sender process): the sender sends b"late" on tag 5 after `delay_s`."""
    host = host or ChannelHost(timeout_s=timeout_s)
    ready = CTX.Event()
    proc = CTX.Process(target=_late_side, args=(host.endpoint, pair_id, delay_s, ready))
    proc.start()
    assert ready.wait(60), "the sender process did not start"
    return host.accept(pair_id, "tcp"), proc


def test_a_socket_pair_waits_past_its_timeout_when_asked():
    """An early KV handoff's decode replica waits for the KV as long as the prefill's forward pass
    takes (`recv(..., wait_s)`): the socket pair reads on past its timeout, between payloads, and
    the stream stays intact."""
    pair, proc = _late_pair("pair-late", 2.5)
    assert pair.waits_longer
    start = time.monotonic()
    assert bytes(pair.recv(4, 5, wait_s=20).numpy()) == b"late"
    assert 1.5 < time.monotonic() - start < 10 and not pair.broken
    proc.join(10)


def test_a_called_off_wait_ends_at_once_and_leaves_the_stream_intact():
    """An abort frees a decode replica's channel thread that waits for a frozen prefill's KV: a long
    wait (`wait_s`) ends soon after its `cancel` is set, whether its thread is the one reading the
    socket or one waiting its turn, and the pair goes on carrying the next payload."""
    pair, proc = _late_pair("pair-off", 3.0)
    cancels = [threading.Event(), threading.Event()]
    ended: list[float] = [0.0, 0.0]

    def wait(i: int) -> None:
        with pytest.raises(ChannelCancelled):
            pair.recv(4, 9 + i, wait_s=60, cancel=cancels[i])
        ended[i] = time.monotonic()

    with ThreadPoolExecutor(2) as pool:
        waits = [pool.submit(wait, i) for i in range(2)]
        time.sleep(0.5)  # both wait now: one reads the socket, the other waits its turn
        for i, cancel in enumerate(cancels):
            called_off = time.monotonic()
            cancel.set()
            waits[i].result(timeout=10)
            assert ended[i] - called_off < 1.0
    assert not pair.broken
    assert bytes(pair.recv(4, 5, wait_s=20).numpy()) == b"late"
    proc.join(10)


def test_closing_the_host_ends_every_wait_on_it_at_once():
    """A decode replica shutting down closes its channel host: an accept whose peer never comes and a
    read blocked on a quiet pair both end with a ChannelError at once, not at the 30 s timeout."""
    host = ChannelHost(timeout_s=30)
    pair, proc = _late_pair("pair-quiet", 20.0, host=host)
    with ThreadPoolExecutor(2) as pool:
        accept = pool.submit(host.accept, "pair-nobody", "tcp")
        read = pool.submit(pair.recv, 4, 9, wait_s=60)
        time.sleep(0.5)
        closed = time.monotonic()
        host.close()
        for wait in (accept, read):
            with pytest.raises(ChannelError):
                wait.result(timeout=20)
        assert time.monotonic() - closed < 2
    proc.kill()
    proc.join(10)


def test_accepting_a_peer_that_never_comes_is_a_channel_error(backend):
    host = ChannelHost(timeout_s=1)
    start = time.monotonic()
    with pytest.raises(ChannelError, match="did not connect within 1 s"):
        host.accept("pair-nobody", backend)
    assert time.monotonic() - start < 5


def test_connecting_to_nothing_fails_quickly():
    start = time.monotonic()
    with pytest.raises(ChannelError):
        ChannelClient(timeout_s=2).connect("127.0.0.1:1", "pair-none")
    assert time.monotonic() - start < 10


def test_split_points_cover_the_payload_exactly():
    for n in (0, 1, 4 << 20, (4 << 20) + 1, 9 << 20, 64 << 20, (64 << 20) + 3):
        parts = split_points(n)
        assert parts[0][0] == 0 and parts[-1][1] == n and len(parts) <= 4
        assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))


def test_buffer_pool_recycles_and_detach_copies_only_views():
    from thunderserve.common.kvchannel import BufferPool, detach_from

    pool = BufferPool(max_buffers=1)
    buf = pool.take(100)
    pool.give(buf)
    again = pool.take(50)
    assert again.data_ptr() == buf.data_ptr()  # recycled, no new allocation
    view, own = again[:10].view(torch.uint8), torch.zeros(3, dtype=torch.uint8)
    out = detach_from(again, [view, own])
    assert out[0].data_ptr() != again.data_ptr() and torch.equal(out[0], view)
    assert out[1] is own
    pool.give(torch.empty(10, dtype=torch.uint8))
    pool.give(torch.empty(1000, dtype=torch.uint8))  # over max_buffers: the smallest is dropped
    assert pool.take(500).numel() == 1000


def test_nccl_pairs_need_the_replicas_gpu():
    """Without a CUDA device to stage KV through, an nccl pair fails at once on either side, saying why,
    instead of waiting for a peer or failing inside NCCL."""
    host = ChannelHost(timeout_s=5)
    try:
        t0 = time.monotonic()
        with pytest.raises(ChannelError, match="needs --device cuda"):
            host.accept("pair-nccl", "nccl")
        with pytest.raises(ChannelError, match="needs --device cuda"):
            ChannelClient(timeout_s=5, backend="nccl").connect(host.endpoint, "pair-nccl")
        assert time.monotonic() - t0 < 2  # neither waited out its timeout
    finally:
        host.close()
