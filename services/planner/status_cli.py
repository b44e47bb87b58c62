"""`thunderserve status --nats URL`: what a deployment is doing, from the bus.

It reads the current plan from the plan store and listens to the heartbeats (and the routers'
workload reports) for a moment, then prints the plan, every replica heard from (phase, state, the
epoch it has applied, load), the plan's replicas that are silent, and the traffic the routers saw.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time

from thunderserve.common import aio, config, protocol
from thunderserve.common.config import CliParser
from thunderserve.common.planstore import current_plan
from thunderserve.common.protocol import Heartbeat, Subjects, WorkloadReport

PROG = "thunderserve status"
log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = CliParser(prog=PROG, description="Show a running deployment: its plan, its replicas (from their "
                       "heartbeats) and the traffic its routers report.")
    config.add_nats_args(parser)
    parser.add_argument("--listen", type=float, default=2.0, metavar="S",
                        help="listen to heartbeats for S seconds (default 2; routers report traffic every 5 s, so "
                        "--listen 6 also shows it)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    return parser


async def gather(nats_url: str, subjects: Subjects, listen_s: float) -> dict:
    nc = await aio.connect_nats(nats_url, "status", first_timeout=5, max_reconnect_attempts=0)
    beats: dict[str, tuple[float, Heartbeat]] = {}
    reports: list[WorkloadReport] = []

    async def on_beat(msg) -> None:
        beat = protocol.decode_or_warn(Heartbeat, msg.data, log)
        if beat is not None:
            beats[beat.replica_id] = (time.monotonic(), beat)

    async def on_report(msg) -> None:
        report = protocol.decode_or_warn(WorkloadReport, msg.data, log)
        if report is not None:
            reports.append(report)

    try:
        await nc.subscribe(subjects.heartbeats, cb=on_beat)
        await nc.subscribe(subjects.workload, cb=on_report)
        plan = await current_plan(nc, subjects)
        await asyncio.sleep(listen_s)
    finally:
        await aio.close_nats(nc)
    now = time.monotonic()
    replicas = [{"id": b.replica_id, "phase": b.phase, "state": b.state, "plan_epoch": b.plan_epoch,
                 "running": b.running, "waiting": b.waiting, "capacity": b.capacity, "model": b.model,
                 "seen_s_ago": round(now - t, 2)} for t, b in sorted(beats.values(), key=lambda tb: tb[1].replica_id)]
    routers: dict[str, dict] = {}
    for rep in reports:
        row = routers.setdefault(rep.router_id, {"router": rep.router_id, "seconds": 0.0, "arrivals": 0,
                                                 "finished": 0, "prompt_lens": [], "output_lens": []})
        row["seconds"] += rep.period_s
        row["arrivals"] += rep.arrivals
        row["finished"] += rep.sampled_of
        row["prompt_lens"] += rep.prompt_lens
        row["output_lens"] += rep.output_lens
    traffic = [{"router": row["router"], "rate": round(row["arrivals"] / row["seconds"], 3) if row["seconds"] else 0.0,
                "finished": row["finished"], "prompt_mean": _mean(row["prompt_lens"]),
                "output_mean": _mean(row["output_lens"]), "over_s": round(row["seconds"], 1)}
               for row in routers.values()]
    silent = sorted({r.id for r in plan.replicas} - set(beats)) if plan else []
    return {"plan": None if plan is None else {
                "epoch": plan.epoch, "kv_codec": plan.kv_codec, "age_s": round(time.time() - plan.created_at, 1),
                "replicas": {r.id: r.phase for r in plan.replicas}, "workload": plan.workload,
                "objective": plan.objective},
            "replicas": replicas, "silent": silent, "traffic": traffic, "listened_s": listen_s}


def _mean(xs: list[int]) -> float | None:
    return round(sum(xs) / len(xs), 1) if xs else None


def format_status(status: dict) -> str:
    lines = []
    plan = status["plan"]
    if plan is None:
        lines.append("no plan published (replicas serve in the phase they started in)")
    else:
        w = plan["workload"]
        planned = (f"; planned for {w.get('rate')} req/s, prompt {w.get('prompt_mean')} / output "
                   f"{w.get('output_mean')} tokens") if w else ""
        lines.append(f"plan epoch {plan['epoch']} (published {plan['age_s']:.0f} s ago): {len(plan['replicas'])} "
                     f"replicas, KV codec {plan['kv_codec']}{planned}")
    if status["replicas"]:
        epoch = plan["epoch"] if plan else None
        lines.append(f"{'replica':<22} {'phase':<8} {'state':<9} {'epoch':>5} {'running':>7} {'waiting':>7} "
                     f"{'capacity':>8}  seen")
        for r in status["replicas"]:
            behind = " (not applied yet)" if epoch is not None and r["plan_epoch"] < epoch else ""
            lines.append(f"{r['id']:<22} {r['phase']:<8} {r['state']:<9} {r['plan_epoch']:>5} {r['running']:>7} "
                         f"{r['waiting']:>7} {r['capacity']:>8}  {r['seen_s_ago']:.1f} s ago{behind}")
    else:
        lines.append(f"no replica heart-beat within {status['listened_s']:g} s")
    if status["silent"]:
        lines.append(f"in the plan but silent: {', '.join(status['silent'])}")
    for t in status["traffic"]:
        lengths = (f", finished {t['finished']}: prompt {t['prompt_mean']} / output {t['output_mean']} tokens (mean)"
                   if t["finished"] else "")
        lines.append(f"{t['router']}: {t['rate']} req/s over {t['over_s']} s{lengths}")
    if not status["traffic"]:
        lines.append(f"no traffic report within {status['listened_s']:g} s (routers report every 5 s)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.listen <= 0:
        print(f"{PROG}: error: --listen must be > 0", file=sys.stderr)
        return 2
    try:
        status = asyncio.run(gather(args.nats, Subjects(args.subject_prefix), args.listen))
    except ConnectionError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(status, indent=2) if args.json else format_status(status))
    return 0
