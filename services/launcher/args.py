"""Command-line arguments of `thunderserve up`."""

from __future__ import annotations

import argparse

from thunderserve.common import config


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="thunderserve up",
        description="Serve a model locally: starts an embedded nats-server (unless --nats is given), "
        "one router with an OpenAI-compatible HTTP API, and prefill and decode replica processes (or "
        "colocated ones, which run both phases). "
        "Prints the URL once everything is ready; Ctrl-C stops it all.",
    )
    parser.add_argument("--nats", default=config.env("NATS_URL", None), metavar="URL",
                        help="use this NATS server instead of starting one (env THUNDERSERVE_NATS_URL)")
    parser.add_argument("--subject-prefix", default=config.env("SUBJECT_PREFIX", config.DEFAULT_SUBJECT_PREFIX),
                        help="NATS subject prefix (default 'ts')")
    parser.add_argument("--model", default=config.env("MODEL", config.DEFAULT_MODEL),
                        help="'smollm2' (default), 'tiny-random' (random weights), 'mocker' (no model: replicas "
                        "answer at once, to try the system without the compute), or a local HuggingFace model folder")
    parser.add_argument("--dtype", default=config.env("DTYPE", "float32"),
                        choices=["float32", "bfloat16", "float16"], help="model compute dtype (default float32)")
    parser.add_argument("--device", default=config.env("DEVICE", "cpu"),
                        help="where the replicas run the model: cpu (default), cuda:N, or cuda: each replica on a "
                        "GPU of its own, round the host's GPUs (env THUNDERSERVE_DEVICE)")
    parser.add_argument("--prefill", type=int, default=None, metavar="N", help="prefill replicas (default 1)")
    parser.add_argument("--decode", type=int, default=None, metavar="M", help="decode replicas (default 1)")
    parser.add_argument("--colocated", type=int, default=None, metavar="C",
                        help="colocated replicas: each prefills and decodes its own requests, prompts in chunks "
                        "between decode steps, no KV transfer (default 0; given alone, no prefill/decode pair "
                        "starts unless --prefill/--decode ask for it)")
    parser.add_argument("--token-budget", type=int, default=0, metavar="T",
                        help="colocated replicas: tokens per iteration, one per running sequence plus prompt "
                        "chunks (default 0: the replica's default, 512; a plan's meta.token_budget wins)")
    parser.add_argument("--plan", metavar="PLAN.json",
                        help="serve this plan (from `thunderserve plan ... --json`): one replica process per plan "
                        "replica, under its id and in its phase, and a live planner that re-plans when a replica "
                        "dies or the traffic shifts (phases and routing; no weights move). The local processes "
                        "stand in for the plan's GPUs. Replaces --prefill, --decode and --colocated")
    parser.add_argument("--kv-codec", default=config.env("KV_CODEC", None), choices=config.KV_CODECS,
                        help=f"KV-cache codec on the prefill->decode hop (default {config.DEFAULT_KV_CODEC}: "
                        "entropy-coded, the "
                        "most accurate at ~4.5 bits/value; int8: the same with 16x finer steps, ~8.5 bits/value; "
                        "int4-fixed / int8-fixed: fixed-rate, less accurate, 2-10x as fast on the CPU; a plan or a "
                        "request that names a codec wins)")
    parser.add_argument("--host", default=config.env("HTTP_HOST", "127.0.0.1"), help="HTTP listen address")
    parser.add_argument("--http-port", type=int, default=config.env("HTTP_PORT", 8000, int),
                        help="HTTP port (default 8000)")
    parser.add_argument("--threads-per-replica", type=int, default=0,
                        help="torch threads per replica, and threads per KV-cache encode or decode (default: the cores "
                        "shared out among replicas)")
    parser.add_argument("--max-batch", type=int, default=64, help="most sequences per decode batch")
    parser.add_argument("--decode-nice", type=int, default=0,
                        help="lower the decode replicas' CPU priority by N, so prompts go first on a shared "
                        "host (shorter time to first token; default 0)")
    parser.add_argument("--trace-dir", default=config.env("TRACE_DIR", None), metavar="DIR",
                        help="record every request's spans (router, prefill forward, KV encode/send/receive/decode, "
                        "decode) as JSON lines in DIR, one file per process (env THUNDERSERVE_TRACE_DIR); "
                        "`python -m thunderserve.common.tracing DIR` prints them as trees")
    parser.add_argument("--api-key", default=config.env("API_KEY", None), metavar="KEY",
                        help="the HTTP API wants 'Authorization: Bearer KEY' (env THUNDERSERVE_API_KEY; default: "
                        "open); /health and /metrics stay open")
    parser.add_argument("--max-inflight", type=int, default=config.env("MAX_INFLIGHT", None, int), metavar="N",
                        help="requests in flight at most; more get a 429 to retry (env THUNDERSERVE_MAX_INFLIGHT; "
                        "default 512; 0 = no limit)")
    parser.add_argument("--otlp-endpoint", default=config.env("OTLP_ENDPOINT", None), metavar="URL",
                        help="also send the spans to this OpenTelemetry collector (OTLP/HTTP, JSON; e.g. "
                        "http://127.0.0.1:4318 for Jaeger or an OpenTelemetry Collector; env "
                        "THUNDERSERVE_OTLP_ENDPOINT)")
    parser.add_argument("--ready-timeout", type=float, default=300.0,
                        help="seconds to wait for every service to be ready (default 300)")
    parser.add_argument("--restart-limit", type=int, default=3, metavar="N",
                        help="restart the router or a replica that exits, up to N times in 5 minutes; after "
                        "that it stays down (default 3; 0 = never restart)")
    config.add_logging_args(parser)
    return parser
