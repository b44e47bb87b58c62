"""Where a request's time goes, hop by hop, from the spans the services record.

    python benchmarks/backbone_trace.py [--model smollm2] [--requests 12] [--prompt-tokens 32 512 1500]
                                        [--max-tokens 32] [--kv-codec int4] [--stream-runs 1] [--prefill 1]
                                        [--no-plot]

A local deployment (`--prefill` prefill replicas + 1 decode replica, one thread each) runs with
THUNDERSERVE_TRACE_DIR set, so the router, the prefill replicas and the decode replica record every
request's spans (libs/common/tracing.py). The benchmark sends `--requests` requests one after another
for each prompt length (greedy, `--max-tokens`; with `--prefill N`, N at a time, so that each prefill
replica has one and their KV caches come to the decode replica together), then reads the spans back.
Per prompt length it reports the median and p90 of each span: router.request (the whole request),
prefill.request and its children prefill.forward, kv.encode, kv.send, decode.request and its children
kv.receive and kv.decode, and "queue": prefill.request's start to prefill.forward's start (waiting for
the model thread; the first request of a pair also sets up the KV channel), and "hop": the end of
prefill.forward to the end of kv.decode, what the KV move adds before the second token. With one
prefill replica, requests go one at a time, so no span waits on another request. A compressed cache
is streamed in runs by default (the replicas' `--kv-stream-runs`); then kv.encode and kv.send cover
the same interleaved stretch, as do kv.receive and kv.decode, and the stacked bars count it twice:
the default `--stream-runs 1` sends one payload, so each span is its own step. Streamed runs travel
during the forward pass (the replicas' `--kv-stream-early`), so their spans overlap it too;
THUNDERSERVE_KV_STREAM_EARLY=0 moves them after it. Prints JSON; writes docs/backbone_trace.png (a
stacked bar per prompt length) unless --no-plot.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
from backbone_common import finish, host_info, median, percentile, progress, prompt_text, r, save_plot

from thunderserve.common import tracing
from thunderserve.common.kvcodec import codec_names
from thunderserve.common.models import load_tokenizer
from thunderserve.launcher.cluster import LocalCluster

SPANS = ("router.request", "prefill.request", "prefill.forward", "kv.encode", "kv.send", "decode.request",
         "kv.receive", "kv.decode")


def _breakdown(trees: list[dict[str, dict]]) -> dict[str, dict[str, float]]:
    """Median and p90 (ms) of each span and of the derived waits, over the requests' trees."""
    values: dict[str, list[float]] = {}
    for by_name in trees:
        for name in SPANS:
            if name in by_name:
                values.setdefault(name, []).append(by_name[name]["durationMs"])
        pre, fwd = by_name["prefill.request"], by_name["prefill.forward"]
        values.setdefault("queue", []).append((fwd["startTimeUnixNano"] - pre["startTimeUnixNano"]) / 1e6)
        # the hop as the request sees it: from the end of the forward pass to the KV decoded
        values.setdefault("hop", []).append((by_name["kv.decode"]["endTimeUnixNano"] - fwd["endTimeUnixNano"]) / 1e6)
    return {name: {"median_ms": r(median(v)), "p90_ms": r(percentile(v, 90))} for name, v in values.items()}


def _run(cluster: LocalCluster, args, trace_dir: str, tokenizer) -> list[dict]:
    rows = []
    with httpx.Client(timeout=300) as http, ThreadPoolExecutor(args.prefill) as pool:

        def send(n: int, salt: int) -> str:
            parent = tracing.new_traceparent()
            body = {"prompt": prompt_text(tokenizer, n, salt=salt), "max_tokens": args.max_tokens,
                    "temperature": 0, "ignore_eos": True}
            resp = http.post(cluster.http_url + "/v1/completions", json=body, headers={"traceparent": parent})
            resp.raise_for_status()
            return tracing.trace_id(parent)

        for n in args.prompt_tokens:
            ids = []
            for i in range(args.requests + 1):  # the first round is a warm-up, not counted
                sent = list(pool.map(send, [n] * args.prefill, range(i * args.prefill, (i + 1) * args.prefill)))
                if i:
                    ids += sent
            time.sleep(0.5)  # let the last spans reach their files
            spans = tracing.read_spans(trace_dir)
            trees = []
            for tid in ids:
                by_name = {sp["name"]: sp for sp in spans if sp["traceId"] == tid}
                missing = [s for s in SPANS if s not in by_name]
                if missing:
                    raise RuntimeError(f"trace {tid} has no {', '.join(missing)} span")
                trees.append(by_name)
            rows.append({"prompt_tokens": n, "requests": len(trees), "spans": _breakdown(trees),
                         "kv_bytes": trees[0]["kv.send"]["attributes"].get("bytes")})
            progress(f"prompt {n}: request median {rows[-1]['spans']['router.request']['median_ms']} ms")
    return rows


def plot(result: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parts = [("queue", "queue for the model thread"), ("prefill.forward", "prefill forward"),
             ("kv.encode", "KV encode"), ("kv.send", "KV send"), ("kv.receive", "KV receive"),
             ("kv.decode", "KV decode")]
    rows = result["rows"]
    labels = [str(row["prompt_tokens"]) for row in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    bottom = [0.0] * len(rows)
    for key, label in parts:
        vals = [row["spans"].get(key, {}).get("median_ms", 0.0) for row in rows]
        ax.bar(labels, vals, bottom=bottom, label=label)
        bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel("ms (median)")
    ax.set_title(f"{result['model']}: the prefill -> decode hop, from spans ({result['kv_codec']})")
    save_plot(fig, ax, path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2", help="model (default smollm2; 'tiny-random' is quicker)")
    p.add_argument("--requests", type=int, default=12, help="requests per prompt length (plus one warm-up)")
    p.add_argument("--prompt-tokens", type=int, nargs="+", default=[32, 512, 1500], help="prompt lengths")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens generated per request")
    p.add_argument("--kv-codec", default="int4", choices=codec_names(), help="KV codec (default int4)")
    p.add_argument("--stream-runs", type=int, default=1,
                   help="the replicas' --kv-stream-runs (default 1: one payload, each span its own step)")
    p.add_argument("--prefill", type=int, default=1,
                   help="prefill replicas (default 1); requests go this many at a time")
    p.add_argument("--no-plot", action="store_true", help="do not write docs/backbone_trace.png")
    args = p.parse_args()
    if args.requests < 1 or args.max_tokens < 2 or min(args.prompt_tokens) < 1 or args.prefill < 1:
        p.error("--requests >= 1, --max-tokens >= 2, --prefill >= 1 and prompt lengths >= 1")
    info = host_info()
    trace_dir = tempfile.mkdtemp(prefix="thunderserve-spans-")
    progress(f"starting {args.model}: {args.prefill} prefill + 1 decode replica, spans in {trace_dir}")
    cluster = LocalCluster(model=args.model, prefill=args.prefill, kv_codec=args.kv_codec, threads_per_replica=1,
                           log_level="WARNING",
                           extra_env={tracing.TRACE_DIR_ENV: trace_dir,
                                      "THUNDERSERVE_KV_STREAM_RUNS": str(args.stream_runs)}).start()
    try:
        rows = _run(cluster, args, trace_dir, load_tokenizer(args.model))
    finally:
        cluster.stop()
    result = {"benchmark": "backbone_trace", "model": args.model, "host": info, "kv_codec": args.kv_codec,
              "stream_runs": args.stream_runs, "prefill_replicas": args.prefill, "max_tokens": args.max_tokens,
              "trace_dir": trace_dir, "rows": rows}
    finish(result, "backbone_trace", plot, args.no_plot)


if __name__ == "__main__":
    main()
