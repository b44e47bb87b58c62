"""A decode replica (or the NATS server) dies mid-generation: how long the streams stall, and
whether any request is lost.

    python benchmarks/backbone_failover.py [--model smollm2] [--requests 4] [--max-tokens 160]
                                           [--kill-after 40] [--kill decode|nats] [--no-plot]

A local deployment (1 prefill, 2 decode replicas, KV codec int4) serves `--requests` streamed,
greedy requests of `--max-tokens` tokens through the SDK. Once every stream has passed
`--kill-after` tokens, the decode replica holding the most of them is SIGKILLed. The router
notices the missing heartbeats and resumes those requests on the other pair: a prefill of the
prompt plus the tokens already streamed, then decode goes on (`services/router/README.md`).
Reported per request: tokens received, whether it finished whole, and its longest gap between
two tokens (for a resumed one, the stall: heartbeat timeout + re-prefill + the KV hop). Prints
JSON; writes docs/backbone_failover.png (tokens received over time per stream) unless --no-plot.

`--kill nats` SIGKILLs the embedded nats-server instead, under the launcher's supervision (as
`thunderserve up` runs it), which restarts it on its port. NATS kept nothing sent during the gap, so
the router resumes every request it held once reconnected. The streams go over HTTP (SSE) here: an
SDK client's own NATS connection would lose the events of the gap. Plot: docs/backbone_failover_nats.png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import threading
import time

import httpx
from backbone_common import finish, host_info, progress, r, save_plot, sdk_stream

from thunderserve.common.client import Client
from thunderserve.launcher.cluster import LocalCluster, RestartPolicy


async def _http_stream(http: httpx.AsyncClient, url: str, prompt: str, max_tokens: int,
                       times: list[float]) -> dict:
    """The same request as `_stream`, over the HTTP API (SSE): one event per token chunk."""
    tokens, finish_reason, error = 0, None, ""
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    try:
        async with http.stream("POST", url + "/v1/chat/completions", json=body) as resp:
            async for line in resp.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                event = json.loads(line[6:])
                if event.get("choices"):
                    times.append(time.monotonic())
                    finish_reason = event["choices"][0].get("finish_reason") or finish_reason
                if event.get("usage"):
                    tokens = event["usage"]["completion_tokens"]
                if event.get("error"):
                    error = event["error"].get("message", str(event["error"]))
    except Exception as exc:  # a lost request is a result here, not a crash of the benchmark
        error = str(exc)
    return {"tokens": tokens, "finish_reason": finish_reason, "error": error}


async def _run(cluster: LocalCluster, args) -> dict:
    prompts = [f"Write a long story about a lighthouse keeper, part {i}." for i in range(args.requests)]
    times: list[list[float]] = [[] for _ in prompts]
    async with Client(cluster.nats_url, timeout_s=120) as client, httpx.AsyncClient(timeout=120) as http:
        t0 = time.monotonic()
        if args.kill == "nats":
            streams = [_http_stream(http, cluster.http_url, p, args.max_tokens, t) for p, t in zip(prompts, times)]
        else:
            streams = [sdk_stream(client, p, args.max_tokens, t) for p, t in zip(prompts, times)]
        tasks = [asyncio.create_task(s) for s in streams]
        while min(len(t) for t in times) < args.kill_after:
            if all(task.done() for task in tasks):
                raise RuntimeError("the requests finished before the kill")
            await asyncio.sleep(0.01)
        running = {v["id"]: v["running"] for v in (cluster.health() or {}).get("replicas", [])
                   if v["phase"] == "decode"}
        killed_at = time.monotonic()
        if args.kill == "nats":
            victim = "nats-server"
            progress(f"killing nats-server (decode batches: {running})")
            os.kill(cluster.nats.proc.pid, signal.SIGKILL)
        else:
            victim = max(running, key=running.get)
            progress(f"killing {victim} (decode batches: {running})")
            cluster.kill(victim)
        results = await asyncio.gather(*tasks)
    rows = []
    for res, t in zip(results, times):
        gaps = [b - a for a, b in zip(t, t[1:])]
        rows.append({**res, "whole": res["finish_reason"] == "length" and res["tokens"] == args.max_tokens,
                     "longest_gap_s": r(max(gaps) if gaps else 0.0),
                     "times_s": [r(x - t0) for x in t]})
    return {"victim": victim, "killed_at_s": r(killed_at - t0), "requests": rows}


def plot(result: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for i, row in enumerate(result["requests"]):
        ax.plot(row["times_s"], range(1, len(row["times_s"]) + 1), label=f"request {i}")
    ax.axvline(result["killed_at_s"], color="red", ls="--", lw=1, label=f"{result['victim']} killed")
    ax.set_xlabel("seconds since the requests were sent")
    ax.set_ylabel("tokens received")
    what = "the NATS server dies" if result["victim"] == "nats-server" else "a decode replica dies"
    ax.set_title(f"{result['model']}: {what} mid-generation")
    save_plot(fig, ax, path, grid="both")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2", help="model (default smollm2; 'tiny-random' is quicker)")
    p.add_argument("--requests", type=int, default=4, help="concurrent streamed requests")
    p.add_argument("--max-tokens", type=int, default=160, help="tokens per request")
    p.add_argument("--kill-after", type=int, default=40, help="kill once every stream has this many tokens")
    p.add_argument("--kill", choices=("decode", "nats"), default="decode",
                   help="what dies: the busiest decode replica (default) or the embedded nats-server")
    p.add_argument("--no-plot", action="store_true", help="do not write docs/backbone_failover[_nats].png")
    args = p.parse_args()
    if not 0 < args.kill_after < args.max_tokens:
        p.error("--kill-after must be between 0 and --max-tokens")
    info = host_info()
    progress(f"starting {args.model}: 1 prefill + 2 decode replicas")
    cluster = LocalCluster(model=args.model, prefill=1, decode=2, kv_codec="int4", threads_per_replica=1,
                           log_level="WARNING").start()
    stop = threading.Event()  # under --kill nats, the launcher's supervision restarts the server
    if args.kill == "nats":
        threading.Thread(target=cluster.supervise, args=(stop, RestartPolicy(), 0.1, progress), daemon=True).start()
    try:
        out = asyncio.run(_run(cluster, args))
    finally:
        stop.set()
        cluster.stop()
    lost = sum(not row["whole"] for row in out["requests"])
    gaps = [row["longest_gap_s"] for row in out["requests"]]
    result = {"benchmark": "backbone_failover", "model": args.model, "host": info, "requests_sent": args.requests,
              "max_tokens": args.max_tokens, "requests_lost": lost, "longest_gap_s": max(gaps), **out}
    finish(result, "backbone_failover" + ("_nats" if args.kill == "nats" else ""), plot, args.no_plot)


if __name__ == "__main__":
    main()
