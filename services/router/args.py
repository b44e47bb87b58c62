"""Command-line arguments of `python -m thunderserve.router`."""

from __future__ import annotations

import argparse

from thunderserve.common import config


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m thunderserve.router",
        description="The ThunderServe router: an OpenAI-compatible HTTP API and the NATS entry of the "
        "client SDK. It tokenizes requests, picks a prefill and a decode replica for each, and "
        "streams the tokens back.",
    )
    config.add_nats_args(parser)
    group = parser.add_argument_group("router")
    group.add_argument("--model", default=config.env("MODEL", config.DEFAULT_MODEL),
                       help="the served model (for its tokenizer and name): 'smollm2', 'tiny-random' or a "
                       "local HuggingFace folder (env THUNDERSERVE_MODEL)")
    group.add_argument("--host", default=config.env("HTTP_HOST", "127.0.0.1"),
                       help="HTTP listen address (env THUNDERSERVE_HTTP_HOST; default 127.0.0.1)")
    group.add_argument("--http-port", type=int, default=config.env("HTTP_PORT", 8000, int),
                       help="HTTP port (env THUNDERSERVE_HTTP_PORT; default 8000)")
    group.add_argument("--kv-codec", default=config.env("KV_CODEC", None),
                       help="KV codec requested for transfers (none, int8, int4, int8-fixed, int4-fixed; default: "
                       "the replicas')")
    group.add_argument("--replica-timeout", type=float, default=config.env("REPLICA_TIMEOUT", 2.0, float),
                       help="seconds without a heartbeat before a replica counts as dead (default 2)")
    group.add_argument("--request-timeout", type=float, default=config.env("REQUEST_TIMEOUT", 120.0, float),
                       help="seconds without progress before a request fails (default 120)")
    group.add_argument("--resume-wait", type=float, default=config.env("RESUME_WAIT", 30.0, float),
                       help="seconds a request whose replica died may wait for another (or the same, "
                       "restarted) replica to resume it before it fails (default 30)")
    group.add_argument("--api-key", default=config.env("API_KEY", None), metavar="KEY",
                       help="require 'Authorization: Bearer KEY' on the /v1 endpoints (env THUNDERSERVE_API_KEY; "
                       "default: none). /health and /metrics stay open; the NATS SDK entry is guarded by NATS's own "
                       "authentication, not this key")
    group.add_argument("--max-inflight", type=int, default=config.env("MAX_INFLIGHT", 512, int), metavar="N",
                       help="requests in flight at most; more get a 429 to retry, instead of queueing without bound "
                       "(env THUNDERSERVE_MAX_INFLIGHT; default 512; 0 = no limit)")
    group.add_argument("--drain-timeout", type=float, default=config.env("DRAIN_TIMEOUT", 30.0, float),
                       metavar="S", help="on SIGTERM/SIGINT, refuse new requests and give the ones in flight up to "
                       "S seconds to finish before stopping (env THUNDERSERVE_DRAIN_TIMEOUT; default 30)")
    group.add_argument("--workload-period", type=float, default=config.env("WORKLOAD_PERIOD", 5.0, float),
                       metavar="S", help="send the planner the arrival rate and the request lengths seen "
                       "every S seconds on <prefix>.workload (env THUNDERSERVE_WORKLOAD_PERIOD; default 5; "
                       "0 turns it off)")
    config.add_logging_args(parser)
    return parser
