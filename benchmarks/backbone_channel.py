"""KV channel throughput between two processes, as a fraction of a plain TCP socket between the same two.

The receiver process hosts the channel (`ChannelHost`, the decode side) and a TCP listener; the
sender process (this one) joins as the prefill side (`ChannelClient`) and connects the socket.
For every size, each repetition moves one payload with each method, in rotation, so load drift
on the shared host hits all methods alike:

- `tcp`: `socket.sendall` of the tensor's memory, `recv_into` one preallocated buffer (loopback);
- `channel`: the product path as the decode role runs it, on the default CPU transport (`tcp`, a
  socket per pair): `ChannelPair.send` / `ChannelPair.recv` into a buffer from the host's `BufferPool`;
- `channel_fresh_buffer`: the same, but a freshly allocated receive buffer every time (what the
  page faults of a new buffer cost);
- `channel_gloo`: the product path on the torch.distributed transport (gloo; NCCL shares its code),
  pooled buffer (payloads over 4 MB travel as up to 4 tagged parts in flight at once).

A transfer's time runs on the sender from the start of the send until a 1-byte acknowledgement,
sent over the TCP socket after the receiver holds the whole payload, arrives; the same for every
method. Throughput = bytes / median time over `--repeats` after `--warmup` rounds.

    python benchmarks/backbone_channel.py            # 1, 16, 64 MB
    python benchmarks/backbone_channel.py --quick    # fewer repeats

Prints one JSON object; writes docs/backbone_channel.png unless --no-plot.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import socket
import time
from typing import Any

import torch
from backbone_common import finish, host_info, median, progress, r, save_plot

METHODS = ["tcp", "channel", "channel_fresh_buffer", "channel_gloo"]
MB = 1 << 20


def _recv_exact(sock: socket.socket, view: memoryview) -> None:
    got = 0
    n = len(view)
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise ConnectionError("peer closed")
        got += k


def rounds_for(size_mb: int, warmup: int, repeats: int) -> int:
    """Small payloads are quick and noisier: give them proportionally more rounds (at most 16x)."""
    return warmup + repeats * min(16, max(1, 16 // size_mb))


def receiver(conn, sizes_mb: list[int], warmup: int, repeats: int, pair_id: str) -> None:
    """Child process: the decode side of the channel and the TCP server."""
    torch.set_num_threads(1)
    from thunderserve.common.kvchannel import ChannelHost

    host = ChannelHost()
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    conn.send((host.endpoint, server.getsockname()[1]))
    pair = host.accept(pair_id, "tcp")
    gloo_pair = host.accept(pair_id + "-gloo", "gloo")
    sock, _ = server.accept()
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    ack = b"k"
    for size_mb in sizes_mb:
        nbytes = size_mb * MB
        pre = torch.empty(nbytes, dtype=torch.uint8)
        tcp_buf = memoryview(pre.numpy()).cast("B")
        for _ in range(rounds_for(size_mb, warmup, repeats)):
            for method in METHODS:
                tag = int.from_bytes(_recv_n(sock, 4), "little")
                if method == "tcp":
                    _recv_exact(sock, tcp_buf)
                elif method in ("channel", "channel_gloo"):  # as the decode role receives: a pooled buffer
                    buf = host.buffers.take(nbytes)
                    (pair if method == "channel" else gloo_pair).recv(nbytes, tag, out=buf)
                    host.buffers.give(buf)
                else:
                    pair.recv(nbytes, tag)
                sock.sendall(ack)
    sock.close()
    conn.send("done")


def _recv_n(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    _recv_exact(sock, memoryview(buf))
    return bytes(buf)


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(1)
    from thunderserve.common.kvchannel import ChannelClient

    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=receiver, args=(child, args.sizes_mb, args.warmup, args.repeats, "bench"), daemon=True)
    proc.start()
    endpoint, tcp_port = parent.recv()
    pair = ChannelClient(backend="tcp").connect(endpoint, "bench")
    gloo_pair = ChannelClient(backend="gloo").connect(endpoint, "bench-gloo")
    sock = socket.create_connection(("127.0.0.1", tcp_port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    ack = bytearray(1)
    tag = 1
    results: dict[str, Any] = {}
    for size_mb in args.sizes_mb:
        nbytes = size_mb * MB
        payload = torch.randint(0, 256, (nbytes,), dtype=torch.uint8)
        view = memoryview(payload.numpy()).cast("B")
        times: dict[str, list[float]] = {m: [] for m in METHODS}
        for rnd in range(rounds_for(size_mb, args.warmup, args.repeats)):
            for method in METHODS:
                tag += 8
                sock.sendall(tag.to_bytes(4, "little"))
                t0 = time.perf_counter()
                if method == "tcp":
                    sock.sendall(view)
                else:
                    (gloo_pair if method == "channel_gloo" else pair).send(payload, tag)
                _recv_exact(sock, memoryview(ack))
                dt = time.perf_counter() - t0
                if rnd >= args.warmup:
                    times[method].append(dt)
        row: dict[str, Any] = {"timed_rounds": len(times["tcp"])}
        tcp_gbps = nbytes / median(times["tcp"]) / 1e9
        for method in METHODS:
            t = median(times[method])
            gbps = nbytes / t / 1e9
            row[method] = {"median_ms": r(1000 * t, 3), "GB_per_s": r(gbps, 3),
                           "fraction_of_tcp": r(gbps / tcp_gbps, 3),
                           "min_ms": r(1000 * min(times[method]), 3), "max_ms": r(1000 * max(times[method]), 3)}
        row["channel_meets_90pct"] = row["channel"]["fraction_of_tcp"] >= 0.9
        results[f"{size_mb}MB"] = row
        progress(f"{size_mb} MB: " + ", ".join(f"{m} {row[m]['GB_per_s']} GB/s" for m in METHODS))
    sock.close()
    parent.recv()
    proc.join(10)
    return {
        "benchmark": "backbone_channel",
        "transport": "gloo send/recv (thunderserve.common.kvchannel) vs plain TCP socket, 127.0.0.1, two processes",
        "timing": "sender: start of send -> 1-byte ack after the receiver holds the whole payload",
        "warmup": args.warmup,
        "repeats": args.repeats,
        "target": "channel >= 90% of TCP",
        "host": host_info(),
        "results": results,
    }


def plot(result: dict[str, Any], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = list(result["results"])
    fig, ax = plt.subplots(figsize=(7, 4))
    w = 0.8 / len(METHODS)
    for i, m in enumerate(METHODS):
        xs = [j + (i - len(METHODS) / 2 + 0.5) * w for j in range(len(sizes))]
        ax.bar(xs, [result["results"][s][m]["GB_per_s"] for s in sizes], width=w, label=m)
    ax.set_xticks(range(len(sizes)), sizes)
    ax.set_ylabel("GB/s (median)")
    ax.set_title("KV channel (gloo) vs plain TCP, two processes on one host")
    save_plot(fig, ax, path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes-mb", nargs="+", type=int, default=[1, 16, 64], help="payload sizes in MiB")
    p.add_argument("--warmup", type=int, default=3, help="untimed rounds per size")
    p.add_argument("--repeats", type=int, default=25,
                   help="timed rounds per size (median); sizes under 16 MB get up to 16x more")
    p.add_argument("--quick", action="store_true", help="1 warm-up, 5 repeats")
    p.add_argument("--no-plot", action="store_true", help="do not write docs/backbone_channel.png")
    args = p.parse_args()
    if args.quick:
        args.warmup, args.repeats = 1, 5
    result = run(args)
    finish(result, "backbone_channel", plot, args.no_plot)


if __name__ == "__main__":
    main()
