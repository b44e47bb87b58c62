"""The direct KV channel: torch.distributed point-to-point between one prefill and one decode replica.

Each (prefill, decode) pair gets its own two-rank process group, built lazily through a
`TCPStore` that the decode replica hosts and advertises (its *endpoint*). Gloo carries CPU
tensors, NCCL CUDA tensors: the same code, so CPU tests exercise the GPU path's logic.
The decode side is rank 1, the prefill side rank 0. Transfers are tagged so several can be
in flight on one pair in any order. Every wait has a timeout and a dead peer surfaces as a
`ChannelError`, never a hang.

Bulk KV goes here; the small description of it (the manifest, the tag) goes over NATS.
"""

from __future__ import annotations

import itertools
import logging
import socket
import threading
from datetime import timedelta

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


def split_points(nbytes: int) -> list[tuple[int, int]]:
    """The [start, end) byte ranges a payload travels in; both sides derive the same ones."""
    parts = max(1, min(MAX_PARTS, nbytes // SPLIT_BYTES))
    step = -(-nbytes // parts) if nbytes else 0
    return [(i * step, min(nbytes, (i + 1) * step)) for i in range(parts)] if nbytes else [(0, 0)]


class ChannelError(RuntimeError):
    """A transfer failed: the peer died, the pair broke, or a wait timed out."""


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
    """One side of a two-rank group. `send` / `recv` block the calling thread (run them off the loop)."""

    def __init__(self, pair_id: str, group, rank: int, timeout_s: float):
        self.pair_id = pair_id
        self.group = group
        self.rank = rank
        self.peer = 1 - rank
        self.timeout_s = timeout_s
        self.broken: str | None = None
        self._tags = itertools.count(1)
        self._lock = threading.Lock()

    def next_tag(self) -> int:
        with self._lock:
            return next(self._tags) % (1 << (30 - TAG_BITS))

    def send(self, payload: torch.Tensor, tag: int) -> None:
        """Send a flat uint8 payload; returns once the receiver has it (or raises ChannelError)."""
        flat = payload.contiguous().reshape(-1)
        self._run(lambda: [self.group.send([flat[a:b]], self.peer, (tag << TAG_BITS) | i)
                           for i, (a, b) in enumerate(split_points(flat.numel()))], "send")

    def recv(self, nbytes: int, tag: int, device: str = "cpu", out: torch.Tensor | None = None) -> torch.Tensor:
        """Receive the payload sent with `tag`; into `out` (a flat uint8 buffer of >= nbytes) when given."""
        buf = torch.empty(nbytes, dtype=torch.uint8, device=device) if out is None else out[:nbytes]
        self._run(lambda: [self.group.recv([buf[a:b]], self.peer, (tag << TAG_BITS) | i)
                           for i, (a, b) in enumerate(split_points(nbytes))], "recv")
        return buf

    def _run(self, start, what: str) -> None:
        if self.broken:
            raise ChannelError(f"channel pair {self.pair_id} is broken: {self.broken}")
        try:
            timeout = timedelta(seconds=self.timeout_s)
            for work in start():
                if not work.wait(timeout):
                    raise ChannelError(f"{what} on pair {self.pair_id} timed out after {self.timeout_s} s")
        except ChannelError:
            raise
        except Exception as exc:  # gloo raises RuntimeError/DistError with the peer's fate
            # A failed pair does not recover: later transfers must rebuild it.
            self.broken = str(exc).splitlines()[0][:300]
            raise ChannelError(f"{what} on pair {self.pair_id} failed: {self.broken}") from None


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
    """Decode side: hosts the rendezvous store and accepts pairs from prefill replicas."""

    def __init__(self, host: str | None = None, port: int = 0, timeout_s: float = DEFAULT_TIMEOUT_S):
        self.host = host or "127.0.0.1"
        self.timeout_s = timeout_s
        self.store = dist.TCPStore(
            self.host, port, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=timeout_s)
        )
        self.port = self.store.port
        self.pairs: dict[str, ChannelPair] = {}
        self.buffers = BufferPool()
        self._lock = threading.Lock()

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"

    def accept(self, pair_id: str, backend: str = "gloo") -> ChannelPair:
        """Join pair `pair_id` as the decode rank (blocks until the prefill side joins too)."""
        group = _make_group(self.store, pair_id, DECODE_RANK, self.host, self.timeout_s, backend)
        pair = ChannelPair(pair_id, group, DECODE_RANK, self.timeout_s)
        with self._lock:
            self.pairs[pair_id] = pair
        return pair

    def get(self, pair_id: str) -> ChannelPair | None:
        with self._lock:
            return self.pairs.get(pair_id)


class ChannelClient:
    """Prefill side: one pair per decode endpoint, rebuilt when it breaks."""

    def __init__(self, timeout_s: float = DEFAULT_TIMEOUT_S):
        self.timeout_s = timeout_s
        self.pairs: dict[str, ChannelPair] = {}  # endpoint -> pair
        self._stores: dict[str, dist.TCPStore] = {}

    def connect(self, endpoint: str, pair_id: str, backend: str = "gloo") -> ChannelPair:
        """Join pair `pair_id` as the prefill rank (the decode side must `accept` it concurrently)."""
        host, port = endpoint.rsplit(":", 1)
        try:
            store = dist.TCPStore(
                host, int(port), is_master=False, timeout=timedelta(seconds=self.timeout_s)
            )
            group = _make_group(store, pair_id, PREFILL_RANK, _route_to(host), self.timeout_s, backend)
        except Exception as exc:
            raise ChannelError(f"cannot connect channel to {endpoint}: {str(exc).splitlines()[0]}") from None
        pair = ChannelPair(pair_id, group, PREFILL_RANK, self.timeout_s)
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
        self.pairs.pop(endpoint, None)
        self._stores.pop(endpoint, None)


def _route_to(peer_host: str) -> str:
    """The local address that reaches `peer_host` (gloo binds its device to it)."""
    if peer_host in ("127.0.0.1", "localhost"):
        return "127.0.0.1"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((peer_host, 9))
        return s.getsockname()[0]

