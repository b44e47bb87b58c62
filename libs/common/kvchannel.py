"""The direct KV channel: point-to-point between one prefill and one decode replica.

Each (prefill, decode) pair gets its own connection, built lazily through a `TCPStore` that the
decode replica hosts and advertises (its *endpoint*). Two transports share that rendezvous, the
tags, the timeouts and the error handling:

- `torch.distributed` (`backend="gloo"` for CPU tensors, `"nccl"` for CUDA tensors): a two-rank
  process group per pair. The same code for both, so CPU tests exercise the GPU path's logic.
- `backend="tcp"` (the default for CPU tensors): one plain TCP connection per pair. On CPUs gloo is
  itself TCP, plus a receive-posting handshake and two thread hand-offs per transfer; on a busy
  2-core host each hand-off can wait a scheduler tick, which made a 1 MB transfer ~10x slower
  than the socket beneath it. The socket pair receives straight into the caller's buffer.

The decode side is rank 1, the prefill side rank 0. Transfers are tagged so several can be in
flight on one pair in any order. Every wait has a timeout and a dead peer surfaces as a
`ChannelError`, never a hang.

Bulk KV goes here; the small description of it (the manifest, the tag) goes over NATS. A
streamed transfer (`send_parts` / `recv_parts`) sends its parts' own descriptions in-band: each
part is made only once the one before is sent, so nothing about it is known when the handoff goes.
"""

from __future__ import annotations

import itertools
import logging
import select
import socket
import struct
import threading
import time
from collections.abc import Iterator
from datetime import timedelta

import msgpack
import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 30.0
PREFILL_RANK, DECODE_RANK = 0, 1
# Large payloads go as a few transfers in flight at once: one gloo transfer leaves the link idle
# while each side copies; several overlap those copies (measured: 64 MB at ~40% -> ~100% of TCP).
SPLIT_BYTES = 4 << 20
MAX_PARTS = 4
TAG_BITS = 3  # sub-tags per transfer: tag << TAG_BITS | part
BACKENDS = ("tcp", "gloo", "nccl")
DEFAULT_BACKEND = "tcp"
_SOCKET_PORT_KEY = "kvsock/port"  # where the decode side's socket listener is, in its store
CANCEL_POLL_S = 0.2  # how often a cancellable wait looks at its cancel event


def split_points(nbytes: int) -> list[tuple[int, int]]:
    """The [start, end) byte ranges a payload travels in; both sides derive the same ones."""
    parts = max(1, min(MAX_PARTS, nbytes // SPLIT_BYTES))
    step = -(-nbytes // parts) if nbytes else 0
    return [(i * step, min(nbytes, (i + 1) * step)) for i in range(parts)] if nbytes else [(0, 0)]


class ChannelError(RuntimeError):
    """A transfer failed: the peer died, the pair broke, or a wait timed out."""


class ChannelCancelled(ChannelError):
    """A wait was called off (its `cancel` event was set) before its payload began to arrive; the
    pair is intact."""


def _wire_device(backend: str, gpu: str | None) -> str:
    """Where a backend's tensors must be: NCCL's on the replica's GPU, gloo's on the host."""
    if backend != "nccl":
        return "cpu"
    if gpu is None or torch.device(gpu).type != "cuda":
        raise ChannelError("the nccl channel backend moves KV between GPUs: the replica needs --device cuda")
    return gpu


def _make_group(store: dist.Store, pair_id: str, rank: int, host: str, timeout_s: float, backend: str):
    prefix = dist.PrefixStore(f"kvpair/{pair_id}", store)
    timeout = timedelta(seconds=timeout_s)
    if backend == "nccl":  # pragma: no cover - needs GPUs
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timeout
        return dist.ProcessGroupNCCL(prefix, rank, 2, opts)
    opts = dist.ProcessGroupGloo._Options()
    opts._timeout = timeout
    opts._devices = [dist.ProcessGroupGloo.create_device(hostname=host)]
    return dist.ProcessGroupGloo(prefix, rank, 2, opts)


class ChannelPair:
    """One side of a pair. `send` / `recv` block the calling thread (run them off the loop).

    A failed pair does not recover (`broken` says why): later transfers must rebuild it.
    """

    def __init__(self, pair_id: str, rank: int, timeout_s: float):
        self.pair_id = pair_id
        self.rank = rank
        self.peer = 1 - rank
        self.timeout_s = timeout_s
        self.broken: str | None = None
        self._next_tag = 1
        self._tag_lock = threading.Lock()

    def next_tag(self, count: int = 1) -> int:
        """The first of `count` consecutive tags for one transfer (a streamed one takes
        `PART_TAGS` per part); tag 0 is never handed out."""
        with self._tag_lock:
            if self._next_tag + count > 1 << (30 - TAG_BITS):  # wrap around, keeping the block whole
                self._next_tag = 1
            first = self._next_tag
            self._next_tag += count
            return first

    def send(self, payload: torch.Tensor, tag: int) -> None:
        """Send a flat uint8 payload; returns once it is on its way (or raises ChannelError)."""
        raise NotImplementedError

    def recv(self, nbytes: int, tag: int, device: str = "cpu", out: torch.Tensor | None = None,
             wait_s: float | None = None, cancel: threading.Event | None = None) -> torch.Tensor:
        """Receive the payload sent with `tag`; into `out` (a flat uint8 buffer of >= nbytes) when given.
        `wait_s`: how long to wait for it to start coming, where the transport allows more than the
        pair's timeout (`waits_longer`). `cancel`: once set, a wait that has not begun receiving ends
        with `ChannelCancelled` (where the transport can stop between payloads: `waits_longer`)."""
        raise NotImplementedError

    waits_longer = False  # whether recv's `wait_s` can exceed the pair's timeout

    def _check(self) -> None:
        if self.broken:
            raise ChannelError(f"channel pair {self.pair_id} is broken: {self.broken}")

    def _break(self, what: str, exc: BaseException) -> ChannelError:
        self.broken = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
        return ChannelError(f"{what} on pair {self.pair_id} failed: {self.broken}")


class DistPair(ChannelPair):
    """A two-rank torch.distributed group (gloo or NCCL).

    NCCL moves CUDA tensors only: a payload from the host is staged through the replica's GPU
    (`wire_device`), and what arrives there is copied to where the caller asked. The codec works on the
    host, so NCCL costs a copy each way beside the transfer. Gloo sends host tensors as they are."""

    def __init__(self, pair_id: str, group, rank: int, timeout_s: float, wire_device: str = "cpu"):
        super().__init__(pair_id, rank, timeout_s)
        self.group = group
        self.wire_device = torch.device(wire_device)

    def send(self, payload: torch.Tensor, tag: int) -> None:
        flat = payload.contiguous().reshape(-1).to(self.wire_device)
        self._run(lambda: [self.group.send([flat[a:b]], self.peer, (tag << TAG_BITS) | i)
                           for i, (a, b) in enumerate(split_points(flat.numel()))], "send")

    def recv(self, nbytes: int, tag: int, device: str = "cpu", out: torch.Tensor | None = None,
             wait_s: float | None = None, cancel: threading.Event | None = None) -> torch.Tensor:
        target = torch.empty(nbytes, dtype=torch.uint8, device=device) if out is None else out[:nbytes]
        buf = target if target.device == self.wire_device else torch.empty(nbytes, dtype=torch.uint8,
                                                                             device=self.wire_device)
        self._run(lambda: [self.group.recv([buf[a:b]], self.peer, (tag << TAG_BITS) | i)
                           for i, (a, b) in enumerate(split_points(nbytes))], "recv")
        if buf is not target:
            target.copy_(buf)
        return target

    def _run(self, start, what: str) -> None:
        self._check()
        try:
            timeout = timedelta(seconds=self.timeout_s)
            for work in start():
                if not work.wait(timeout):
                    raise ChannelError(f"{what} on pair {self.pair_id} timed out after {self.timeout_s} s")
        except ChannelError:
            raise
        except Exception as exc:  # gloo raises RuntimeError/DistError with the peer's fate
            raise self._break(what, exc) from None


_HEADER = struct.Struct("<QQ")  # tag, nbytes


class SocketPair(ChannelPair):
    """One TCP connection; each transfer is a 16-byte header (tag, size) and the raw bytes.

    Receivers take turns reading the socket: whoever reads finds the next payload's waiting
    buffer by its tag and fills it in place, so the usual one-at-a-time transfer costs no extra
    thread hand-off. A payload nobody waits for yet is kept (for at most the timeout) until its
    `recv` comes.
    """

    def __init__(self, pair_id: str, sock: socket.socket, rank: int, timeout_s: float):
        super().__init__(pair_id, rank, timeout_s)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(timeout_s)
        self._sock = sock
        self._send_lock = threading.Lock()
        self._cv = threading.Condition()
        self._reader = False  # a receiver is reading the socket
        self._waiting: dict[int, torch.Tensor] = {}  # tag -> the buffer its recv waits with
        self._filling: set[int] = set()  # tags being read into their waiting buffer
        self._done: set[int] = set()  # tags whose waiting buffer is full
        self._early: dict[int, tuple[torch.Tensor, float]] = {}  # tag -> (payload, arrival) before its recv

    def send(self, payload: torch.Tensor, tag: int) -> None:
        flat = payload.contiguous().reshape(-1)
        if flat.device.type != "cpu":
            raise ChannelError("the tcp channel backend carries CPU tensors; use nccl for CUDA tensors")
        self._check()
        try:
            header, body = _HEADER.pack(tag, flat.numel()), memoryview(flat.numpy())
            with self._send_lock:
                # header and payload in one call, so the receiver wakes once for both
                sent = self._sock.sendmsg([header, body])
                if sent < len(header):
                    self._sock.sendall(header[sent:])
                    sent = len(header)
                if sent - len(header) < len(body):
                    self._sock.sendall(body[sent - len(header):])
        except OSError as exc:  # a partly written stream cannot be resumed
            raise self._break("send", exc) from None

    waits_longer = True  # a wait that ends between payloads leaves the stream intact

    def recv(self, nbytes: int, tag: int, device: str = "cpu", out: torch.Tensor | None = None,
             wait_s: float | None = None, cancel: threading.Event | None = None) -> torch.Tensor:
        buf = torch.empty(nbytes, dtype=torch.uint8) if out is None else out[:nbytes]
        wait_s = self.timeout_s if wait_s is None else max(wait_s, self.timeout_s)
        deadline = time.monotonic() + wait_s
        with self._cv:
            self._check()
            self._waiting[tag] = buf
            while True:
                if tag in self._done:
                    self._done.discard(tag)
                    return buf
                # (it may have been read, into a buffer of its own, before this recv was waiting)
                early = self._early.pop(tag, None)
                if early is not None:
                    self._waiting.pop(tag, None)
                    return self._sized(early[0], nbytes, buf, tag)
                if self.broken:
                    self._waiting.pop(tag, None)
                    self._check()
                filling = tag in self._filling  # (a buffer being filled must not be let go)
                if cancel is not None and cancel.is_set() and not filling:
                    self._waiting.pop(tag, None)
                    raise ChannelCancelled(f"recv on pair {self.pair_id} called off")
                if not self._reader:
                    self._reader = True
                    break
                left = deadline - time.monotonic()
                if left <= 0 and not filling:
                    self._waiting.pop(tag, None)
                    raise ChannelError(f"recv on pair {self.pair_id} timed out after {wait_s} s")
                self._cv.wait(max(left, 0.05) if cancel is None else min(max(left, 0.05), CANCEL_POLL_S))
        return self._read_until(tag, buf, nbytes, deadline, cancel)

    def _read_until(self, tag: int, buf: torch.Tensor, nbytes: int, deadline: float,
                    cancel: threading.Event | None) -> torch.Tensor:
        """As the reader: read payloads off the socket until `tag`'s has arrived."""
        try:
            while True:
                if cancel is not None:
                    self._await_header(deadline, cancel)
                got_tag, size = _HEADER.unpack(self._read_header(deadline))
                with self._cv:
                    target = self._waiting.pop(got_tag, None)
                    if target is not None and target.numel() == size:
                        self._filling.add(got_tag)
                    else:
                        target = torch.empty(size, dtype=torch.uint8)
                self._read_into(target)
                with self._cv:
                    if got_tag in self._filling:
                        self._filling.discard(got_tag)
                        self._done.add(got_tag)
                    else:
                        self._keep_early(got_tag, target)
                    self._cv.notify_all()
                if got_tag == tag:
                    break
        finally:  # whatever happened, let another receiver read
            with self._cv:
                self._reader = False
                self._waiting.pop(tag, None)
                self._cv.notify_all()
        with self._cv:
            self._done.discard(tag)
            if tag in self._early:  # it came in a size other than expected
                return self._sized(self._early.pop(tag)[0], nbytes, buf, tag)
        return buf

    def _await_header(self, deadline: float, cancel: threading.Event) -> None:
        """Between payloads, as the reader: wait for the next header to begin arriving, looking at
        `cancel` as it waits (a blocked socket read would not)."""
        while True:
            try:
                if select.select([self._sock], [], [], CANCEL_POLL_S)[0]:
                    return
            except (OSError, ValueError) as exc:  # (ValueError: the socket was closed under the wait)
                raise self._break("recv", exc) from None
            if cancel.is_set():
                raise ChannelCancelled(f"recv on pair {self.pair_id} called off")
            if time.monotonic() >= deadline:
                raise ChannelError(f"recv on pair {self.pair_id} timed out")

    def _read_header(self, deadline: float) -> bytes:
        header = bytearray(_HEADER.size)
        view, got = memoryview(header), 0
        while got < len(header):
            try:
                n = self._sock.recv_into(view[got:])
            except TimeoutError:
                if got == 0 and time.monotonic() < deadline:  # a longer wait (recv's wait_s): read on
                    continue
                if got == 0:  # nothing half-read: the stream is intact, only this wait ends
                    raise ChannelError(f"recv on pair {self.pair_id} timed out") from None
                raise self._break("recv", TimeoutError("timed out inside a header")) from None
            except OSError as exc:
                raise self._break("recv", exc) from None
            if n == 0:
                raise self._break("recv", ConnectionError("connection closed by peer"))
            got += n
        return bytes(header)

    def _read_into(self, target: torch.Tensor) -> None:
        view, got, size = memoryview(target.numpy()), 0, target.numel()
        try:
            while got < size:
                n = self._sock.recv_into(view[got:])
                if n == 0:
                    raise ConnectionError("connection closed by peer")
                got += n
        except (OSError, ConnectionError) as exc:
            with self._cv:
                self._cv.notify_all()
            raise self._break("recv", exc) from None

    def _keep_early(self, tag: int, payload: torch.Tensor) -> None:
        now = time.monotonic()
        for old in [t for t, (_, at) in self._early.items() if now - at > self.timeout_s]:
            del self._early[old]  # its receiver gave up (an aborted request): do not hold it forever
        self._early[tag] = (payload, now)

    def _sized(self, payload: torch.Tensor, nbytes: int, buf: torch.Tensor, tag: int) -> torch.Tensor:
        if payload.numel() != nbytes:
            raise ChannelError(f"tag {tag} on pair {self.pair_id}: {payload.numel()} bytes arrived, {nbytes} expected")
        buf.copy_(payload)
        return buf

    def close(self) -> None:
        """End the pair: every transfer waiting on it ends with a ChannelError (a shutdown wakes a blocked
        read, where a close alone would not)."""
        with self._cv:
            self.broken = self.broken or "closed"
            self._cv.notify_all()
        for end in (lambda: self._sock.shutdown(socket.SHUT_RDWR), self._sock.close):
            try:
                end()
            except OSError:
                pass


# A streamed transfer sends its parts one after another: per part, a small header (the sizes), the
# part's description (msgpack) and its payload, each on a tag of its own (PART_TAGS per part).
PART_TAGS = 3
_PART = struct.Struct("<QQ")  # description bytes, payload bytes


def send_parts(pair: ChannelPair, tag: int, parts: Iterator[tuple[torch.Tensor, dict]]) -> tuple[int, float, float]:
    """Send each (payload, description) that `parts` yields as soon as it is made, from tag `tag`
    on. Returns (payload bytes, seconds spent making the parts, seconds spent sending them)."""
    nbytes, making, sending = 0, 0.0, 0.0
    for ptag in itertools.count(tag, PART_TAGS):
        t0 = time.perf_counter()
        part = next(parts, None)
        t1 = time.perf_counter()
        making += t1 - t0
        if part is None:
            break
        payload, description = part
        raw = msgpack.packb(description)
        pair.send(torch.frombuffer(bytearray(_PART.pack(len(raw), payload.numel())), dtype=torch.uint8), ptag)
        pair.send(torch.frombuffer(bytearray(raw), dtype=torch.uint8), ptag + 1)
        pair.send(payload, ptag + 2)
        sending += time.perf_counter() - t1
        nbytes += payload.numel()
    return nbytes, making, sending


def recv_parts(pair: ChannelPair, tag: int, count: int, buffers: BufferPool | None = None,
               wait_s: float | None = None, cancel: threading.Event | None = None,
               ) -> Iterator[tuple[torch.Tensor, dict]]:
    """The `count` parts `send_parts` sends from tag `tag`, each as it arrives: (payload,
    description). A payload lands in a buffer from `buffers` (give it back when done with it).
    `wait_s` and `cancel`: how long each part may take to start coming, and what calls the wait off
    (`ChannelPair.recv`)."""
    for ptag in range(tag, tag + PART_TAGS * count, PART_TAGS):
        size, nbytes = _PART.unpack(pair.recv(_PART.size, ptag, wait_s=wait_s, cancel=cancel).numpy().tobytes())
        description = msgpack.unpackb(pair.recv(size, ptag + 1).numpy().tobytes())
        out = buffers.take(nbytes) if buffers is not None else None
        yield pair.recv(nbytes, ptag + 2, out=out), description


class BufferPool:
    """Reusable receive buffers. A fresh 64 MB buffer costs more in page faults than the transfer
    itself; a recycled one costs nothing. Take one per transfer, give it back once unpacked."""

    def __init__(self, max_buffers: int = 4):
        self.max_buffers = max_buffers
        self._free: list[torch.Tensor] = []
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> torch.Tensor:
        with self._lock:  # (tensors compare elementwise: find them by position, not ==)
            fits = [i for i, b in enumerate(self._free) if b.numel() >= nbytes]
            if fits:
                return self._free.pop(min(fits, key=lambda i: self._free[i].numel()))
        return torch.empty(nbytes, dtype=torch.uint8)

    def give(self, buf: torch.Tensor) -> None:
        with self._lock:
            self._free.append(buf)
            if len(self._free) > self.max_buffers:
                self._free.pop(min(range(len(self._free)), key=lambda i: self._free[i].numel()))


def detach_from(buf: torch.Tensor, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Copies of those `tensors` that still view `buf`, so `buf` can be reused."""
    base = buf.untyped_storage().data_ptr()
    return [t.clone() if t.untyped_storage().data_ptr() == base else t for t in tensors]


class ChannelHost:
    """Decode side: hosts the rendezvous store (and the socket listener) and accepts pairs."""

    def __init__(self, host: str | None = None, port: int = 0, timeout_s: float = DEFAULT_TIMEOUT_S,
                 gpu: str | None = None):
        self.host = host or "127.0.0.1"
        self.timeout_s = timeout_s
        self.gpu = gpu  # the replica's CUDA device, which nccl pairs move KV through (None: no GPU)
        self.store = dist.TCPStore(
            self.host, port, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=timeout_s)
        )
        self.port = self.store.port
        self.pairs: dict[str, ChannelPair] = {}
        self.buffers = BufferPool()
        self._lock = threading.Condition()
        self._arrived: dict[str, socket.socket] = {}  # pair id -> connection not yet accepted
        self._closed = False
        self._listener = socket.create_server((self.host, 0))
        self.store.set(_SOCKET_PORT_KEY, str(self._listener.getsockname()[1]))
        threading.Thread(target=self._take_connections, name="kvchannel-listen", daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"

    def accept(self, pair_id: str, backend: str = DEFAULT_BACKEND) -> ChannelPair:
        """Join pair `pair_id` as the decode rank (blocks until the prefill side joins too)."""
        if backend not in BACKENDS:
            raise ChannelError(f"unknown channel backend {backend!r} (one of {', '.join(BACKENDS)})")
        if backend == "tcp":
            with self._lock:
                if not self._lock.wait_for(lambda: pair_id in self._arrived or self._closed, self.timeout_s):
                    raise ChannelError(f"pair {pair_id}: the prefill side did not connect within {self.timeout_s} s")
                if self._closed:
                    raise ChannelError(f"pair {pair_id}: the channel host closed")
                sock = self._arrived.pop(pair_id)
            pair: ChannelPair = SocketPair(pair_id, sock, DECODE_RANK, self.timeout_s)
        else:
            wire = _wire_device(backend, self.gpu)
            try:
                group = _make_group(self.store, pair_id, DECODE_RANK, self.host, self.timeout_s, backend)
            except RuntimeError as exc:  # torch.distributed errors (DistStoreError: the wait timed out)
                raise ChannelError(f"pair {pair_id}: the prefill side did not connect within {self.timeout_s} s"
                                   f" ({str(exc).splitlines()[0]})") from None
            pair = DistPair(pair_id, group, DECODE_RANK, self.timeout_s, wire)
        with self._lock:
            self.pairs[pair_id] = pair
        return pair

    def get(self, pair_id: str) -> ChannelPair | None:
        with self._lock:
            return self.pairs.get(pair_id)

    def close(self) -> None:
        """Stop taking pairs and end those there are; waits for either end at once."""
        self._listener.close()
        with self._lock:
            self._closed = True
            self._lock.notify_all()
            for pair in self.pairs.values():
                if isinstance(pair, SocketPair):
                    pair.close()

    def _take_connections(self) -> None:
        """Listener thread: each socket-pair connection first names its pair id."""
        while True:
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return  # closed
            try:
                sock.settimeout(self.timeout_s)
                pair_id = _recv_name(sock)
            except (OSError, ValueError) as exc:
                log.warning("dropped a channel connection that did not name its pair: %s", exc)
                sock.close()
                continue
            with self._lock:
                self._arrived[pair_id] = sock
                self._lock.notify_all()


def _send_name(sock: socket.socket, name: str) -> None:
    data = name.encode()
    sock.sendall(len(data).to_bytes(2, "little") + data)


def _recv_name(sock: socket.socket) -> str:
    def exact(n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = sock.recv(n - len(data))
            if not chunk:
                raise ValueError("connection closed during the handshake")
            data += chunk
        return data

    return exact(int.from_bytes(exact(2), "little")).decode()


class ChannelClient:
    """Prefill side: one pair per decode endpoint, rebuilt when it breaks."""

    def __init__(self, timeout_s: float = DEFAULT_TIMEOUT_S, backend: str = DEFAULT_BACKEND, gpu: str | None = None):
        if backend not in BACKENDS:
            raise ValueError(f"unknown channel backend {backend!r} (one of {', '.join(BACKENDS)})")
        self.timeout_s = timeout_s
        self.backend = backend
        self.gpu = gpu  # as ChannelHost's
        self.pairs: dict[str, ChannelPair] = {}  # endpoint -> pair
        self._stores: dict[str, dist.TCPStore] = {}

    def connect(self, endpoint: str, pair_id: str, backend: str | None = None) -> ChannelPair:
        """Join pair `pair_id` as the prefill rank (the decode side must `accept` it concurrently)."""
        backend = backend or self.backend
        host, port = endpoint.rsplit(":", 1)
        try:
            store = dist.TCPStore(
                host, int(port), is_master=False, timeout=timedelta(seconds=self.timeout_s)
            )
            if backend == "tcp":
                sock = socket.create_connection((host, int(store.get(_SOCKET_PORT_KEY))), timeout=self.timeout_s)
                _send_name(sock, pair_id)
                pair: ChannelPair = SocketPair(pair_id, sock, PREFILL_RANK, self.timeout_s)
            else:
                wire = _wire_device(backend, self.gpu)
                group = _make_group(store, pair_id, PREFILL_RANK, _route_to(host), self.timeout_s, backend)
                pair = DistPair(pair_id, group, PREFILL_RANK, self.timeout_s, wire)
        except Exception as exc:
            raise ChannelError(f"cannot connect channel to {endpoint}: {str(exc).splitlines()[0]}") from None
        self.pairs[endpoint] = pair
        self._stores[endpoint] = store
        return pair

    def get(self, endpoint: str) -> ChannelPair | None:
        pair = self.pairs.get(endpoint)
        if pair is not None and pair.broken:
            self.drop(endpoint)
            return None
        return pair

    def drop(self, endpoint: str) -> None:
        pair = self.pairs.pop(endpoint, None)
        if isinstance(pair, SocketPair):
            pair.close()
        self._stores.pop(endpoint, None)


def _route_to(peer_host: str) -> str:
    """The local address that reaches `peer_host` (gloo binds its device to it)."""
    if peer_host in ("127.0.0.1", "localhost"):
        return "127.0.0.1"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((peer_host, 9))
        return s.getsockname()[0]

