"""Start the router: load the tokenizer, build the app, serve HTTP and the NATS entry."""

from __future__ import annotations

import argparse
import logging

import uvicorn

from thunderserve.common import tracing
from thunderserve.common.models import ALIASES, load_tokenizer, max_context, resolve_model
from thunderserve.common.protocol import Subjects
from thunderserve.router.app import create_app
from thunderserve.router.core import RouterCore


def build_core(args: argparse.Namespace) -> RouterCore:
    info = resolve_model(args.model)
    tokenizer = load_tokenizer(str(info.path))
    aliases = {args.model} | {k for k, v in ALIASES.items() if v == info.name}
    return RouterCore(
        nats_url=args.nats,
        subjects=Subjects(args.subject_prefix),
        tokenizer=tokenizer,
        model_name=info.name,
        model_aliases=aliases,
        max_context=max_context(str(info.path)),
        kv_codec=args.kv_codec,
        replica_timeout_s=args.replica_timeout,
        request_timeout_s=args.request_timeout,
        resume_wait_s=args.resume_wait,
        workload_period_s=args.workload_period,
        max_inflight=args.max_inflight,
    )


class _DrainingServer(uvicorn.Server):
    """uvicorn, telling the router when a stop begins: it refuses new requests from then on, and the
    ones in flight get up to the drain timeout to finish (uvicorn waits for open HTTP streams; the
    app's shutdown then waits for the SDK's)."""

    def __init__(self, config: uvicorn.Config, core: RouterCore):
        super().__init__(config)
        self.core = core

    def handle_exit(self, sig, frame) -> None:
        if not self.core.draining:
            self.core.begin_drain()
        super().handle_exit(sig, frame)


def serve(args: argparse.Namespace) -> None:
    logging.basicConfig(level=args.log_level, format="%(asctime)s router %(levelname)s %(name)s: %(message)s")
    tracing.configure("router")
    core = build_core(args)
    app = create_app(core, drain_timeout_s=args.drain_timeout, api_key=args.api_key or None)
    config = uvicorn.Config(app, host=args.host, port=args.http_port, log_level=args.log_level.lower(),
                            access_log=False, timeout_graceful_shutdown=max(1, int(args.drain_timeout)))
    _DrainingServer(config, core).run()
