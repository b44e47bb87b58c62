"""`thunderserve up`: start everything, print the URL, stop everything on Ctrl-C or SIGTERM."""

from __future__ import annotations

import logging
import signal
import sys
import threading

from thunderserve.launcher.args import build_parser
from thunderserve.launcher.cluster import LocalCluster, RestartPolicy


def _service_env(args) -> dict[str, str]:
    """The settings the services take from their environment (each reads the ones it knows)."""
    given = {"TRACE_DIR": args.trace_dir, "OTLP_ENDPOINT": args.otlp_endpoint, "API_KEY": args.api_key,
             "MAX_INFLIGHT": args.max_inflight}
    return {f"THUNDERSERVE_{name}": str(value) for name, value in given.items() if value not in (None, "")}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s up %(levelname)s %(message)s")
    counts = {"prefill": args.prefill, "decode": args.decode, "colocated": args.colocated}
    if args.plan and any(n is not None for n in counts.values()):
        print("error: --plan gives the replicas; drop --prefill, --decode and --colocated", file=sys.stderr)
        return 2
    if bad := [f"--{phase}" for phase, n in counts.items() if n is not None and n < 0]:
        print(f"error: {' and '.join(bad)} cannot be negative", file=sys.stderr)
        return 2
    colocated = args.colocated or 0
    pairs = colocated == 0 or args.prefill is not None or args.decode is not None  # default: one of each
    prefill, decode = (1 if args.prefill is None else args.prefill, 1 if args.decode is None else args.decode) \
        if pairs else (0, 0)
    if args.restart_limit < 0:
        print("error: --restart-limit cannot be negative", file=sys.stderr)
        return 2
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        cluster = LocalCluster(
            model=args.model, prefill=prefill, decode=decode, colocated=colocated, token_budget=args.token_budget,
            kv_codec=args.kv_codec, dtype=args.dtype, device=args.device,
            http_host=args.host, http_port=args.http_port, nats_url=args.nats, subject_prefix=args.subject_prefix,
            threads_per_replica=args.threads_per_replica, max_batch=args.max_batch, log_level=args.log_level,
            decode_nice=args.decode_nice, plan_file=args.plan,
            extra_env=_service_env(args),
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:  # replicas that cannot serve; the plan file: missing,
        print(f"error: {'--plan: ' if args.plan else ''}{exc}", file=sys.stderr)  # not a plan, not servable
        return 2
    replicas = ", ".join(f"{name} {phase}" for name, phase in cluster.replica_specs())
    print(f"starting ThunderServe: model {args.model}, replicas {replicas}"
          f"{' with a live planner' if args.plan else ''} (the first start converts the model once)...", flush=True)
    try:
        cluster.start(timeout=args.ready_timeout)
    except Exception as exc:
        print(f"error: could not start: {exc}", file=sys.stderr)
        return 1
    print(f"ThunderServe ready: {cluster.http_url}/v1  (NATS {cluster.nats_url}, model {args.model})", flush=True)
    policy = RestartPolicy(limit=args.restart_limit)
    try:
        cluster.supervise(stop, policy, report=lambda line: print(f"warning: {line}", file=sys.stderr, flush=True))
    finally:
        print("stopping...", flush=True)
        cluster.stop()
    return 0
