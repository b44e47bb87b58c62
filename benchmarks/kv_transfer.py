"""Time to move one long prompt's SmolLM2 KV cache prefill -> decode, per codec, over the real channel.

Two processes, as in serving: this one prefills the prompt with the real model and plays the
prefill replica (encode + send); a child plays the decode replica (receive + decode). The
manifest goes over a multiprocessing queue where the services use NATS. Prints JSON.

    python benchmarks/kv_transfer.py [--tokens 2000] [--repeat 5] [--codec-threads 1] [--runs 1]

`--codec-threads N` codes N runs of layers at once on each side, as a replica with
`--kv-codec-threads N` does (the model still runs on one torch thread). `--runs N` streams the
cache in N runs of layers, as a prefill replica with `--kv-stream-runs N` does: each run is
encoded and sent while the receiver decodes the one before (`none` always goes as one payload).
Streamed, encode and decode overlap: "encode_s" is the sender's time spent encoding, "wire_s"
and "decode_s" are not split out, and "total_s" is the figure to read.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import time

import torch

from thunderserve.common.kvchannel import PART_TAGS, ChannelClient, ChannelHost, recv_parts, send_parts
from thunderserve.common.kvcodec import codec_names, get_codec, pack_cache, pack_runs, unpack_cache, unpack_runs
from thunderserve.common.memory import keep_freed_memory


def _decode_side(endpoint_q: mp.Queue, work_q: mp.Queue, done_q: mp.Queue, model: str, prompt: list[int],
                 threads: int) -> None:
    from thunderserve.common.engine import Engine

    torch.set_num_threads(1)
    keep_freed_memory()  # as the decode replica does
    engine = Engine(model, threads=1)  # rebuilds the first layer from the tokens, as the replica does
    host = ChannelHost(timeout_s=60)
    endpoint_q.put(host.endpoint)
    pair = host.accept("bench")
    while True:
        item = work_q.get()
        if item is None:
            return
        tag, manifest = item
        if "runs" in manifest:  # streamed: decode each run as the next arrives
            unpack_runs(manifest, recv_parts(pair, tag, manifest["runs"]), lambda: engine.first_layer_kv(prompt),
                        threads)
            done_q.put((None, time.perf_counter()))
            continue
        payload = pair.recv(manifest["nbytes"], tag)
        received = time.perf_counter()
        unpack_cache(payload, manifest, lambda: engine.first_layer_kv(prompt), threads=threads)
        done_q.put((received, time.perf_counter()))


def _streamed(pair, work_q, done_q, codec, kv, engine, args, tag: int) -> dict:
    t0 = time.perf_counter()
    head, parts = pack_runs(codec, kv, model=engine.name, rebuild=engine.rebuilds_first_layer, runs=args.runs,
                            threads=args.codec_threads)
    work_q.put((tag, head))
    nbytes, encoding, _ = send_parts(pair, tag, parts)
    sent = time.perf_counter()
    _, decoded = done_q.get(timeout=120)
    return {"encode_s": encoding, "wire_s": 0.0, "decode_s": decoded - sent, "total_s": decoded - t0, "bytes": nbytes}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2000, help="prompt length (default 2000)")
    parser.add_argument("--repeat", type=int, default=5, help="transfers per codec; the median is reported")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--codec-threads", type=int, default=1, help="codec threads on each side (default 1)")
    parser.add_argument("--runs", type=int, default=1, help="stream the cache in this many runs of layers (default 1)")
    args = parser.parse_args(argv)

    from thunderserve.common.engine import Engine

    torch.set_num_threads(1)
    keep_freed_memory()  # as the prefill replica does
    engine = Engine(args.model, threads=1)
    prompt = (torch.arange(args.tokens) % 5000 + 100).tolist()
    kv = engine.prefill(prompt).kv
    fp32_bytes = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in kv)

    ctx = mp.get_context("spawn")
    endpoint_q, work_q, done_q = ctx.Queue(), ctx.Queue(), ctx.Queue()
    child = ctx.Process(target=_decode_side, args=(endpoint_q, work_q, done_q, args.model, prompt,
                                                                      args.codec_threads), daemon=True)
    child.start()
    pair = ChannelClient(timeout_s=60).connect(endpoint_q.get(timeout=60), "bench")

    results = {}
    tag = 0
    for name in codec_names():
        codec = get_codec(name)
        runs = []
        for _ in range(args.repeat + 1):  # the first run warms up
            if args.runs > 1 and name != "none":
                runs.append(_streamed(pair, work_q, done_q, codec, kv, engine, args, tag + 1))
                tag += PART_TAGS * args.runs
                continue
            tag += 1
            t0 = time.perf_counter()
            payload, manifest = pack_cache(codec, kv, model=engine.name, rebuild=engine.rebuilds_first_layer,
                                           threads=args.codec_threads)
            t1 = time.perf_counter()
            work_q.put((tag, manifest))
            pair.send(payload, tag)
            received, decoded = done_q.get(timeout=120)
            runs.append({"encode_s": t1 - t0, "wire_s": received - t1, "decode_s": decoded - received,
                         "total_s": decoded - t0, "bytes": manifest["nbytes"]})
        runs = runs[1:]
        results[name] = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
        results[name]["ratio_vs_fp32"] = fp32_bytes / results[name]["bytes"]
    work_q.put(None)
    child.join(10)
    report = {"benchmark": "kv_transfer", "model": engine.name, "prompt_tokens": args.tokens,
              "fp32_kv_bytes": fp32_bytes, "threads": 1, "codec_threads": args.codec_threads, "runs": args.runs,
              "codecs": results}
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
