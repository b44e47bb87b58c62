"""Router overhead: latency the router + NATS add over the engine, and the request rate they sustain.

Starts a whole deployment (`LocalCluster`: nats-server, router, 1 prefill + 1 decode replica)
with `--model mocker`: replicas that answer at once without a model (same tokenizer as SmolLM2),
so everything measured is the serving system, not the model. Every request asks for
`--max-tokens` tokens (default 1, greedy) with a `--prompt-len`-token prompt. With 1 token the
prefill replica answers alone (client -> router -> prefill replica -> router -> client); with 2 or
more the request also crosses the KV channel and the decode replica.

1. engine: the same work called directly in-process (MockEngine prefill + choosing the token).
2. latency: one request at a time, through HTTP (`/v1/completions` with httpx, keep-alive) and
   through the NATS SDK (`thunderserve.common.client.Client`). Added latency = end-to-end minus
   the engine's own time. Floors for context: `GET /health` over the same HTTP connection, and a
   NATS PING/PONG round trip to the server.
3. throughput: `--concurrency` clients in a loop for `--duration` s each (HTTP, then SDK); the
   completed-request rate, latency under load, and the CPU each process used.

    python benchmarks/backbone_router.py
    python benchmarks/backbone_router.py --quick
    python benchmarks/backbone_router.py --py-spy 8     # also sample the services with py-spy

Prints one JSON object; writes docs/backbone_router.png unless --no-plot.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
from backbone_common import finish, host_info, percentile, progress, prompt_text, r

MAX_TOKENS = 1  # set from --max-tokens


def lat_stats(values_s: list[float]) -> dict[str, float]:
    ms = [v * 1000 for v in values_s]
    return {"n": len(ms), "p50_ms": r(percentile(ms, 50)), "p90_ms": r(percentile(ms, 90)),
            "p99_ms": r(percentile(ms, 99)), "mean_ms": r(sum(ms) / max(len(ms), 1))}


def engine_direct(prompt_ids: list[int], n: int) -> dict[str, float]:
    """The mock engine's own time for a 1-token request, called in-process."""
    from thunderserve.common.engine import MockEngine
    from thunderserve.common.protocol import SamplingParams
    from thunderserve.common.sequence import sample_token

    engine = MockEngine()
    params = SamplingParams(max_tokens=1, temperature=0.0)
    times = []
    for i in range(n + 20):
        t0 = time.perf_counter()
        res = engine.prefill(prompt_ids)
        sample_token(res.logits, params, 0, engine.eos_token_ids)
        if i >= 20:
            times.append(time.perf_counter() - t0)
    return lat_stats(times)


class Procs:
    """CPU seconds used by each process of the deployment (and this client) over an interval."""

    def __init__(self, cluster) -> None:
        self.procs = {name: psutil.Process(p.pid) for name, p in cluster.procs.items()}
        if cluster.nats is not None and cluster.nats.proc is not None:
            self.procs["nats-server"] = psutil.Process(cluster.nats.proc.pid)
        self.procs["client (this process)"] = psutil.Process(os.getpid())

    def snapshot(self) -> dict[str, float]:
        out = {}
        for name, p in self.procs.items():
            t = p.cpu_times()
            out[name] = t.user + t.system
        return out

    @staticmethod
    def delta(a: dict[str, float], b: dict[str, float], wall: float) -> dict[str, float]:
        """Cores used on average by each process between snapshots a and b."""
        return {k: r((b[k] - a[k]) / wall, 2) for k in a}


async def latency_http(url: str, prompt: str, n: int, warmup: int) -> tuple[dict, dict]:
    body = {"prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0}
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        lat, health = [], []
        for i in range(warmup + n):
            t0 = time.perf_counter()
            resp = await client.post("/v1/completions", json=body)
            resp.raise_for_status()
            assert resp.json()["usage"]["completion_tokens"] == MAX_TOKENS
            t1 = time.perf_counter()
            (await client.get("/health")).raise_for_status()
            t2 = time.perf_counter()
            if i >= warmup:
                lat.append(t1 - t0)
                health.append(t2 - t1)
    return lat_stats(lat), lat_stats(health)


async def latency_sdk(nats_url: str, prompt: str, n: int, warmup: int) -> tuple[dict, dict]:
    from thunderserve.common.client import Client

    async with Client(nats_url) as client:
        lat, ping = [], []
        for i in range(warmup + n):
            t0 = time.perf_counter()
            out = await client.complete(prompt, max_tokens=MAX_TOKENS, temperature=0.0)
            assert out.usage.completion_tokens == MAX_TOKENS, out
            t1 = time.perf_counter()
            await client.nc.flush()  # PING -> PONG with nats-server
            t2 = time.perf_counter()
            if i >= warmup:
                lat.append(t1 - t0)
                ping.append(t2 - t1)
    return lat_stats(lat), lat_stats(ping)


async def load(kind: str, target: str, prompt: str, concurrency: int, duration: float) -> dict[str, Any]:
    """`concurrency` closed-loop clients for `duration` s; completed requests per second."""
    lat: list[float] = []
    errors: collections.Counter[str] = collections.Counter()
    stop_at = 0.0

    if kind == "http":
        client: Any = httpx.AsyncClient(base_url=target, timeout=60,
                                        limits=httpx.Limits(max_connections=concurrency,
                                                            max_keepalive_connections=concurrency))
        body = {"prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0}

        async def one() -> None:
            resp = await client.post("/v1/completions", json=body)
            resp.raise_for_status()
    else:
        from thunderserve.common.client import Client

        client = Client(target)
        await client.connect()

        async def one() -> None:
            await client.complete(prompt, max_tokens=MAX_TOKENS, temperature=0.0)

    async def worker() -> None:
        while time.perf_counter() < stop_at:
            t0 = time.perf_counter()
            try:
                await one()
                lat.append(time.perf_counter() - t0)
            except Exception as exc:  # count, keep going: the rate is what we measure
                errors[type(exc).__name__] += 1

    try:
        # Warm-up: every connection opened, every code path hot.
        stop_at = time.perf_counter() + 1.0
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        lat.clear()
        errors.clear()
        t0 = time.perf_counter()
        stop_at = t0 + duration
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    finally:
        if kind == "http":
            await client.aclose()
        else:
            await client.close()
    return {"concurrency": concurrency, "wall_s": r(wall, 2), "completed": len(lat),
            "requests_per_s": r(len(lat) / wall, 1), "errors": dict(errors), "latency_under_load": lat_stats(lat)}


def py_spy(pid: int, seconds: float, out: Path) -> subprocess.Popen | None:
    exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(exe).exists():
        progress("py-spy not found (pip install py-spy); skipping the profile")
        return None
    return subprocess.Popen([exe, "record", "--format", "raw", "--rate", "200", "--nonblocking", "-d",
                             str(int(seconds)), "-p", str(pid), "-o", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def summarize_spy(path: Path, top: int = 15) -> dict[str, Any]:
    """Self and inclusive sample shares by function from py-spy's collapsed stacks."""
    selfc: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        total += n
        frames = [f.split(" (")[0] + " (" + f.split(" (")[1].split(":")[0].split("/")[-1] + ")" if " (" in f else f
                  for f in stack.split(";")]
        selfc[frames[-1]] += n
        for f in set(frames):
            incl[f] += n
    share = lambda c: [{"frame": f, "share": r(v / max(total, 1), 3)} for f, v in c.most_common(top)]  # noqa: E731
    return {"samples": total, "top_self": share(selfc), "top_inclusive": share(incl)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    from thunderserve.common.models import load_tokenizer
    from thunderserve.launcher.cluster import LocalCluster

    tokenizer = load_tokenizer("smollm2")
    prompt = prompt_text(tokenizer, args.prompt_len)
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    result: dict[str, Any] = {
        "benchmark": "backbone_router",
        "model": "mocker (replicas answer at once; SmolLM2 tokenizer)",
        "deployment": f"LocalCluster: nats-server + router + {args.prefill} prefill + {args.decode} decode, "
                      f"log level {args.log_level}, KV codec {args.kv_codec}",
        "prompt_tokens": len(ids),
        "max_tokens": MAX_TOKENS,
        "targets": {"added_p50_ms": 2.0, "requests_per_s": 1000},
        "host": host_info(),
    }
    result["engine_direct"] = engine_direct(ids, 500)
    engine_p50 = result["engine_direct"]["p50_ms"]
    log_dir = tempfile.mkdtemp(prefix="bb-router-")
    cluster = LocalCluster(model="mocker", prefill=args.prefill, decode=args.decode, threads_per_replica=1,
                           kv_codec=args.kv_codec, log_dir=log_dir, log_level=args.log_level)
    progress("starting the mocker deployment")
    cluster.start(timeout=120)
    try:
        procs = Procs(cluster)
        progress("latency: HTTP")
        http_lat, health = asyncio.run(latency_http(cluster.http_url, prompt, args.requests, args.warmup))
        progress("latency: NATS SDK")
        sdk_lat, ping = asyncio.run(latency_sdk(cluster.nats_url, prompt, args.requests, args.warmup))
        result["latency"] = {
            "http": http_lat,
            "sdk": sdk_lat,
            "added_p50_ms": {"http": r(http_lat["p50_ms"] - engine_p50), "sdk": r(sdk_lat["p50_ms"] - engine_p50)},
            "added_p99_ms": {"http": r(http_lat["p99_ms"] - engine_p50), "sdk": r(sdk_lat["p99_ms"] - engine_p50)},
            "floor_http_get_health": health,
            "floor_nats_ping_pong": ping,
        }
        result["throughput"] = {}
        for kind, target in (("http", cluster.http_url), ("sdk", cluster.nats_url)):
            progress(f"throughput: {kind}, {args.concurrency} clients, {args.duration} s")
            spies: dict[str, tuple[subprocess.Popen | None, Path]] = {}
            if args.py_spy:
                for name in ("router", "prefill-0", "decode-0"):
                    out = Path(log_dir) / f"{name}-{kind}.spy.txt"
                    spies[name] = (py_spy(cluster.procs[name].pid, args.py_spy, out), out)
            a, t0 = procs.snapshot(), time.perf_counter()
            res = asyncio.run(load(kind, target, prompt, args.concurrency, args.duration))
            b, wall = procs.snapshot(), time.perf_counter() - t0
            res["cores_used"] = Procs.delta(a, b, wall)
            server_cpu = sum(b[k] - a[k] for k in a if not k.startswith("client"))
            res["server_cpu_ms_per_request"] = r(1000 * server_cpu / max(res["completed"], 1), 2)
            res["cpu_ms_per_request_by_process"] = {k: r(1000 * (b[k] - a[k]) / max(res["completed"], 1), 2)
                                                    for k in a}
            for name, (spy, out) in spies.items():
                if spy is not None:
                    spy.wait(timeout=args.py_spy + 30)
                    if out.exists():
                        res.setdefault("py_spy", {})[name] = summarize_spy(out)
            result["throughput"][kind] = res
            progress(f"  {res['requests_per_s']} req/s, cores used {res['cores_used']}")
        result["pass"] = {
            "added_p50_http_le_2ms": result["latency"]["added_p50_ms"]["http"] <= 2.0,
            "added_p50_sdk_le_2ms": result["latency"]["added_p50_ms"]["sdk"] <= 2.0,
            "http_ge_1000_rps": result["throughput"]["http"]["requests_per_s"] >= 1000,
            "sdk_ge_1000_rps": result["throughput"]["sdk"]["requests_per_s"] >= 1000,
        }
    finally:
        cluster.stop()
    result["logs"] = log_dir
    return result


def plot(result: dict[str, Any], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    lat = result["latency"]
    names = ["engine direct", "HTTP", "NATS SDK", "GET /health", "NATS ping"]
    stats = [result["engine_direct"], lat["http"], lat["sdk"], lat["floor_http_get_health"],
             lat["floor_nats_ping_pong"]]
    xs = range(len(names))
    ax1.bar([x - 0.2 for x in xs], [s["p50_ms"] for s in stats], width=0.4, label="p50")
    ax1.bar([x + 0.2 for x in xs], [s["p99_ms"] for s in stats], width=0.4, label="p99")
    ax1.set_xticks(list(xs), names, rotation=20, fontsize=8)
    ax1.set_ylabel("ms, one request at a time")
    ax1.set_title("1-token request latency (mocker)")
    ax1.legend()
    tp = result["throughput"]
    ax2.bar(list(tp), [tp[k]["requests_per_s"] for k in tp], color=["tab:blue", "tab:green"])
    ax2.axhline(result["targets"]["requests_per_s"], color="red", ls="--", label="target")
    ax2.set_ylabel("requests/s")
    ax2.set_title(f"sustained rate, {next(iter(tp.values()))['concurrency']} concurrent clients")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompt-len", type=int, default=128, help="prompt tokens (default 128)")
    p.add_argument("--requests", type=int, default=300, help="sequential requests per latency figure")
    p.add_argument("--warmup", type=int, default=30, help="untimed sequential requests first")
    p.add_argument("--max-tokens", type=int, default=1,
                   help="tokens per request (default 1: the prefill replica answers alone; 2 or more also "
                        "crosses the KV channel and the decode replica)")
    p.add_argument("--concurrency", type=int, default=64, help="concurrent clients in the throughput runs")
    p.add_argument("--duration", type=float, default=10.0, help="seconds per throughput run")
    p.add_argument("--prefill", type=int, default=1, help="prefill replicas")
    p.add_argument("--decode", type=int, default=1, help="decode replicas")
    p.add_argument("--kv-codec", default="none",
                   help="KV codec of the deployment (default none: measure routing, not compression; "
                        "the product default is int4)")
    p.add_argument("--log-level", default="WARNING", help="services' log level (default WARNING)")
    p.add_argument("--py-spy", type=float, default=0.0, metavar="S",
                   help="sample router, prefill-0, decode-0 with py-spy for S s during each throughput run")
    p.add_argument("--quick", action="store_true", help="100 requests, 5 s throughput runs")
    p.add_argument("--no-plot", action="store_true", help="do not write docs/backbone_router.png")
    args = p.parse_args()
    global MAX_TOKENS
    MAX_TOKENS = args.max_tokens
    if args.quick:
        args.requests, args.warmup, args.duration = 100, 10, 5.0
    result = run(args)
    finish(result, "backbone_router", plot, args.no_plot)


if __name__ == "__main__":
    main()
