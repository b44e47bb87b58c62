"""Serving throughput through the OpenAI HTTP API: ThunderServe configurations vs `transformers serve`.

One burst of `--clients` concurrent streamed chat requests (a `--prompt-len`-token prompt each,
exactly `--output-tokens` output tokens, greedy) against each server in turn, after a warm-up
request; the same client code for every server. Reported per server: output tokens/s (all
output tokens / wall time from the first request sent to the last token received), TTFT
p50/p90 (request sent -> first content chunk), and the CPU each process used.

ThunderServe configurations are `PxD[+C]:dtype:threads[:codec]` (P prefill and D decode replicas, C
colocated ones, model dtype, torch threads per replica, KV codec if not the default), each started as a whole deployment
(`LocalCluster`). Output length is forced with `ignore_eos` + `min_tokens`. The baseline is
`transformers serve --continuous-batching` on the same model folder, forced to the same length with
a per-request `generation_config` (`min_new_tokens` = `max_new_tokens`), run once per
`--hf-threads` value (default: all cores, then 1 thread); ThunderServe is compared with its best.

    python benchmarks/backbone_serving.py
    python benchmarks/backbone_serving.py --configs 1x1:bfloat16:1 --no-hf --quick

Prints one JSON object; writes docs/backbone_serving.png unless --no-plot.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
from backbone_common import chat_prompt_for, finish, host_info, percentile, progress, r

DEFAULT_CONFIGS = ["1x1:float32:1", "1x1:bfloat16:1", "1x1:bfloat16:1:none", "2x1:bfloat16:1"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def one_request(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> dict[str, Any]:
    t0 = time.perf_counter()
    ttft = None
    chunks = 0
    usage = None
    async with client.stream("POST", url, json=body) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"HTTP {resp.status_code}: {(await resp.aread())[:300]!r}")
        async for line in resp.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:].strip()
            if data == "[DONE]":
                break
            event = json.loads(data)
            if event.get("usage"):
                usage = event["usage"]
            for choice in event.get("choices") or []:
                if (choice.get("delta") or {}).get("content"):
                    chunks += 1
                    if ttft is None:
                        ttft = time.perf_counter() - t0
    end = time.perf_counter()
    tokens = int(usage["completion_tokens"]) if usage and usage.get("completion_tokens") else chunks
    return {"ttft": ttft if ttft is not None else end - t0, "latency": end - t0, "tokens": tokens,
            "content_chunks": chunks, "usage_reported": usage is not None}


async def burst(base_url: str, bodies: list[dict[str, Any]]) -> tuple[float, list[dict[str, Any]]]:
    limits = httpx.Limits(max_connections=len(bodies) + 2, max_keepalive_connections=len(bodies) + 2)
    async with httpx.AsyncClient(base_url=base_url, timeout=600, limits=limits) as client:
        t0 = time.perf_counter()
        outs = await asyncio.gather(*(one_request(client, "/v1/chat/completions", b) for b in bodies))
        return time.perf_counter() - t0, list(outs)


def cpu_of(pids: dict[str, int]) -> dict[str, float]:
    out = {}
    for name, pid in pids.items():
        try:
            t = psutil.Process(pid).cpu_times()
            out[name] = t.user + t.system + t.children_user + t.children_system
        except psutil.NoSuchProcess:
            out[name] = 0.0
    return out


def measure(base_url: str, bodies: list[dict[str, Any]], warm_body: dict[str, Any], pids: dict[str, int],
            bursts: int) -> dict[str, Any]:
    asyncio.run(burst(base_url, [warm_body, warm_body]))  # warm-up: connections, channel pairs, kernels
    runs = []
    for _ in range(bursts):
        a = cpu_of(pids)
        wall, outs = asyncio.run(burst(base_url, bodies))
        b = cpu_of(pids)
        tokens = sum(o["tokens"] for o in outs)
        ttfts = [o["ttft"] for o in outs]
        runs.append({
            "wall_s": r(wall, 2),
            "output_tokens": tokens,
            "output_tokens_per_s": r(tokens / wall, 1),
            "ttft_p50_s": r(percentile(ttfts, 50)),
            "ttft_p90_s": r(percentile(ttfts, 90)),
            "ttft_max_s": r(max(ttfts)),
            "latency_p50_s": r(percentile([o["latency"] for o in outs], 50)),
            "tokens_per_request": sorted({o["tokens"] for o in outs}),
            "usage_reported": all(o["usage_reported"] for o in outs),
            "cores_used": {k: r((b[k] - a[k]) / wall, 2) for k in a},
        })
        progress(f"  burst: {runs[-1]['output_tokens_per_s']} tok/s, TTFT p50 {runs[-1]['ttft_p50_s']} s")
    best = max(runs, key=lambda x: x["output_tokens_per_s"])
    return {**best, "bursts": runs} if bursts > 1 else best


def thunderserve_config(spec: str, bodies, warm, args) -> dict[str, Any]:
    from thunderserve.launcher.cluster import LocalCluster

    parts = spec.split(":")
    pairs, _, colocated = parts[0].partition("+")  # "1x1", "0x0+1": C colocated replicas beside them
    p, d = (int(x) for x in pairs.split("x"))
    dtype, threads = parts[1], int(parts[2])
    codec = (parts[3] or None) if len(parts) > 3 else args.kv_codec
    decode_nice = int(parts[4]) if len(parts) > 4 else 0
    log_dir = tempfile.mkdtemp(prefix="bb-serving-")
    cluster = LocalCluster(model=args.model, prefill=p, decode=d, colocated=int(colocated or 0), dtype=dtype,
                           threads_per_replica=threads, kv_codec=codec, decode_nice=decode_nice, log_dir=log_dir,
                           log_level="WARNING")
    progress(f"ThunderServe {spec}: starting")
    t0 = time.perf_counter()
    cluster.start(timeout=240)
    startup = time.perf_counter() - t0
    try:
        pids = {name: proc.pid for name, proc in cluster.procs.items()}
        ts_bodies = [{**b, "ignore_eos": True, "min_tokens": args.output_tokens,
                      "stream_options": {"include_usage": True}} for b in bodies]
        res = measure(cluster.http_url, ts_bodies, {**warm, "ignore_eos": True}, pids, args.bursts)
    finally:
        cluster.stop()
    return {"server": "thunderserve", "config": spec, "prefill": p, "decode": d, "dtype": dtype,
            "threads_per_replica": threads, "kv_codec": codec or "default (int4)", "decode_nice": decode_nice,
            "startup_s": r(startup, 1),
            **res}


def hf_serve(bodies, warm, args, hf_threads: int) -> dict[str, Any]:
    from thunderserve.common.models import resolve_model

    path = str(resolve_model(args.model).path)
    port = free_port()
    exe = str(Path(sys.executable).parent / "transformers")
    cmd = [exe, "serve", path, "--continuous-batching", "--host", "127.0.0.1", "--port", str(port),
           "--device", "cpu", "--dtype", args.hf_dtype, "--log-level", "warning"]
    log_path = Path(tempfile.mkdtemp(prefix="bb-hfserve-")) / "transformers-serve.log"
    progress(f"transformers serve: starting ({' '.join(cmd[1:])})")
    t0 = time.perf_counter()
    with open(log_path, "wb") as log:
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
        if hf_threads:
            env["OMP_NUM_THREADS"] = str(hf_threads)  # torch's intra-op threads
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"transformers serve exited: {log_path.read_text()[-2000:]}")
            try:
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("transformers serve did not come up")
            time.sleep(0.5)
        startup = time.perf_counter() - t0
        forced = json.dumps({"max_new_tokens": args.output_tokens, "min_new_tokens": args.output_tokens,
                             "do_sample": False})
        hf_bodies = [{**b, "model": path, "generation_config": forced} for b in bodies]
        hf_warm = {**warm, "model": path}
        res = measure(base, hf_bodies, hf_warm, {"transformers-serve": proc.pid}, args.bursts)
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
    threads = hf_threads or psutil.cpu_count()
    return {"server": "transformers serve --continuous-batching", "config": f"hf:{args.hf_dtype}:{threads}",
            "dtype": args.hf_dtype, "threads": threads, "startup_s": r(startup, 1), **res}


def run(args: argparse.Namespace) -> dict[str, Any]:
    from thunderserve.common.models import load_tokenizer

    tok = load_tokenizer(args.model)
    bodies = []
    for i in range(args.clients):
        content = chat_prompt_for(tok, args.prompt_len, salt=i)
        bodies.append({"messages": [{"role": "user", "content": content}], "max_tokens": args.output_tokens,
                       "temperature": 0, "stream": True})
    n_prompt = len(tok.apply_chat_template(bodies[0]["messages"], add_generation_prompt=True, tokenize=True,
                                           return_dict=True)["input_ids"])
    warm = {"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 4, "temperature": 0,
            "stream": True}
    results = []
    for spec in args.configs:
        try:
            results.append(thunderserve_config(spec, bodies, warm, args))
        except Exception as exc:  # one broken configuration must not hide the others
            progress(f"{spec} failed: {exc}")
            results.append({"server": "thunderserve", "config": spec, "error": str(exc)[:500]})
    if not args.no_hf:
        for hf_threads in args.hf_threads:
            try:
                results.append(hf_serve(bodies, warm, args, hf_threads))
            except Exception as exc:
                progress(f"transformers serve failed: {exc}")
                results.append({"server": "transformers serve", "error": str(exc)[:500]})
    out: dict[str, Any] = {
        "benchmark": "backbone_serving",
        "model": args.model,
        "clients": args.clients,
        "prompt_tokens": n_prompt,
        "output_tokens": args.output_tokens,
        "targets": {"tokens_per_s_vs_hf": 2.0, "ttft_p50_s": 1.0},
        "host": host_info(),
        "results": results,
    }
    # Compare against the baseline's best run (its best thread count on this host).
    hfs = [x for x in results if x["server"].startswith("transformers") and "error" not in x]
    hf = max(hfs, key=lambda x: x["output_tokens_per_s"]) if hfs else None
    if hf is not None:
        out["baseline_best"] = hf["config"]
        for x in results:
            if x["server"] == "thunderserve" and "error" not in x:
                x["tokens_per_s_vs_hf"] = r(x["output_tokens_per_s"] / hf["output_tokens_per_s"], 2)
                x["meets_targets"] = x["tokens_per_s_vs_hf"] >= 2.0 and x["ttft_p50_s"] <= 1.0
    return out


def plot(result: dict[str, Any], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [x for x in result["results"] if "error" not in x]
    names = [x["config"] for x in rows]
    colors = ["tab:gray" if x["server"] != "thunderserve" else "tab:blue" for x in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.bar(names, [x["output_tokens_per_s"] for x in rows], color=colors)
    ax1.set_ylabel("output tokens/s")
    ax1.set_title(f"{result['clients']} concurrent streams, {result['prompt_tokens']} in / "
                  f"{result['output_tokens']} out")
    ax2.bar(names, [x["ttft_p50_s"] for x in rows], color=colors)
    ax2.axhline(result["targets"]["ttft_p50_s"], color="red", ls="--", label="target")
    ax2.set_ylabel("TTFT p50 (s)")
    ax2.legend()
    for ax in (ax1, ax2):
        ax.tick_params(axis="x", labelrotation=25, labelsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", nargs="*", default=DEFAULT_CONFIGS,
                   help="ThunderServe configurations PxD[+C]:dtype:threads[:kv_codec[:decode_nice]] (C colocated "
                        "replicas: 0x0+1 is one colocated replica alone) "
                        f"(default {' '.join(DEFAULT_CONFIGS)})")
    p.add_argument("--model", default="smollm2", help="model (default smollm2)")
    p.add_argument("--kv-codec", default=None, help="ThunderServe KV codec (default: the product default)")
    p.add_argument("--clients", type=int, default=16, help="concurrent streamed requests (default 16)")
    p.add_argument("--prompt-len", type=int, default=128, help="prompt tokens incl. chat template (default 128)")
    p.add_argument("--output-tokens", type=int, default=32, help="forced output tokens (default 32)")
    p.add_argument("--bursts", type=int, default=1, help="measured bursts per server; the best is reported")
    p.add_argument("--no-hf", action="store_true", help="skip the transformers serve baseline")
    p.add_argument("--hf-dtype", default="auto", help="--dtype for transformers serve (default auto = fp32)")
    p.add_argument("--hf-threads", type=int, nargs="+", default=[0, 1],
                   help="torch threads for transformers serve, one run each (OMP_NUM_THREADS; 0 = all cores; "
                        "default 0 1)")
    p.add_argument("--quick", action="store_true", help="8 clients, 16 output tokens")
    p.add_argument("--no-plot", action="store_true", help="do not write docs/backbone_serving.png")
    args = p.parse_args()
    if args.quick:
        args.clients, args.output_tokens = 8, 16
    result = run(args)
    finish(result, "backbone_serving", plot, args.no_plot)


if __name__ == "__main__":
    main()
