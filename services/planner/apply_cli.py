"""`thunderserve apply PLAN.json --nats URL`: publish a plan; the router and replicas hot-apply it."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

from thunderserve.common import aio, config
from thunderserve.common.plan import Plan
from thunderserve.common.planstore import StalePlanError, current_plan, publish_plan, wait_for_acks
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
    parser.add_argument("--wait", type=float, default=0.0, metavar="S",
                        help="then wait up to S seconds for every replica of the plan to apply it (a replica whose "
                        "phase changes drains and flips first) and print when each did; exit 1 if one did not "
                        "(default 0: do not wait)")
    return parser


async def _apply(args: argparse.Namespace, plan: Plan) -> int:
    subjects = Subjects(args.subject_prefix)
    try:
        nc = await aio.connect_nats(args.nats, "apply", first_timeout=10, max_reconnect_attempts=0)
    except ConnectionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    async def publish() -> int:
        if args.bump:
            current = await current_plan(nc, subjects)
            plan.epoch = (current.epoch if current else 0) + 1
        plan.created_at = time.time()
        await publish_plan(nc, subjects, plan)
        print(f"published plan epoch {plan.epoch}: {len(plan.prefill_ids)} prefill, "
              f"{len(plan.decode_ids)} decode replicas, KV codec {plan.kv_codec}", flush=True)
        return plan.epoch

    try:
        if args.wait <= 0:
            await publish()
            return 0
        _, acked, missing = await wait_for_acks(nc, subjects, publish, [r.id for r in plan.replicas], args.wait)
        for rid, seconds in sorted(acked.items(), key=lambda kv: kv[1]):
            print(f"  {rid} ({plan.replica(rid).phase}) applied it after {seconds:.2f} s")
        if missing:
            print(f"error: not applied within {args.wait:g} s by {', '.join(sorted(missing))}", file=sys.stderr)
            return 1
        return 0
    except (StalePlanError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        await nc.close()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.wait < 0:
        print("error: --wait cannot be negative", file=sys.stderr)
        return 2
    try:
        with open(args.plan) as fh:
            plan = Plan.from_json(fh.read())
    except (OSError, ValueError) as exc:
        print(f"error: cannot read plan {args.plan}: {exc}", file=sys.stderr)
        return 2
    return asyncio.run(_apply(args, plan))
