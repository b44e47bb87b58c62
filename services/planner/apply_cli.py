"""`thunderserve apply PLAN.json --nats URL`: publish a plan; the router and replicas hot-apply it."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

from thunderserve.common import aio, config
from thunderserve.common.plan import Plan
from thunderserve.common.planstore import StalePlanError, current_plan, publish_plan
from thunderserve.common.protocol import Subjects


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="thunderserve apply",
        description="Publish a plan (JSON from `thunderserve plan --json`) as the deployment's current plan. "
        "Its epoch must exceed the current one (use --bump to take the next free epoch). The router switches "
        "its dispatch and routing tables; replicas whose phase changes drain and flip without reloading weights.",
    )
    parser.add_argument("plan", help="the plan JSON file")
    config.add_nats_args(parser)
    parser.add_argument("--bump", action="store_true", help="set the plan's epoch to the current epoch + 1")
    return parser


async def _apply(args: argparse.Namespace, plan: Plan) -> int:
    subjects = Subjects(args.subject_prefix)
    try:
        nc = await aio.connect_nats(args.nats, "apply", first_timeout=10, max_reconnect_attempts=0)
    except ConnectionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    try:
        if args.bump:
            current = await current_plan(nc, subjects)
            plan.epoch = (current.epoch if current else 0) + 1
        plan.created_at = time.time()
        await publish_plan(nc, subjects, plan)
        print(f"published plan epoch {plan.epoch}: {len(plan.prefill_ids)} prefill, "
              f"{len(plan.decode_ids)} decode replicas, KV codec {plan.kv_codec}")
        return 0
    except (StalePlanError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        await nc.close()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with open(args.plan) as fh:
            plan = Plan.from_json(fh.read())
    except (OSError, ValueError) as exc:
        print(f"error: cannot read plan {args.plan}: {exc}", file=sys.stderr)
        return 2
    return asyncio.run(_apply(args, plan))
