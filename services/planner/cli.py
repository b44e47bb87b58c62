"""`thunderserve plan`: plan a cluster and print the plan (optionally write it as JSON); with `--live`,
publish it to a deployment and keep it right as replicas die and return and as the traffic shifts
(`live.LivePlanner`)."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
import time
from pathlib import Path

import yaml

from thunderserve.common import aio, config
from thunderserve.common.config import CliParser
from thunderserve.common.plan import Plan
from thunderserve.common.protocol import Subjects

from .cluster import Cluster
from .costmodel import CODECS, Calibration
from .model import BUILTIN_MODELS, ModelSpec
from .planner import Planner
from .shift import ShiftPolicy
from .workload import DEFAULT_SLOS, Workload

PROG = "thunderserve plan"




def build_parser() -> argparse.ArgumentParser:
    ap = CliParser(
        prog=PROG,
        description="Plan a heterogeneous GPU cluster for disaggregated LLM serving: group GPUs into "
                    "replicas, give each a phase (prefill/decode, or colocated with chunked prefill) and a "
                    "parallel layout, and route requests between them so the SLO-meeting request rate is as "
                    "high as possible.",
        epilog="example: thunderserve plan --cluster deploy/clusters/cloud-32.yaml --model llama-30b "
               "--workload code --rate 2 --json plan.json",
    )
    ap.add_argument("--cluster", metavar="FILE",
                    help="cluster spec YAML (nodes: name, gpu, count, intra_gbps; network: default_gbps, links)")
    ap.add_argument("--model", metavar="NAME|config.json",
                    help=f"built-in model ({', '.join(BUILTIN_MODELS)}) or a HuggingFace config.json / model folder")
    ap.add_argument("--workload", metavar="code|conversation|TRACE.csv",
                    help="named workload shape (ships with a synthetic trace) or an Azure-format trace CSV "
                         "(TIMESTAMP,ContextTokens,GeneratedTokens)")
    ap.add_argument("--rate", type=float, metavar="R",
                    help="arrival rate, requests/s (required for named shapes; a trace defaults to its own rate)")
    ap.add_argument("--ttft", type=float, metavar="S",
                    help="TTFT SLO in seconds (default: " + ", ".join(f"{k} {v[0]}" for k, v in DEFAULT_SLOS.items())
                    + ")")
    ap.add_argument("--tpot", type=float, metavar="S",
                    help="TPOT (time per output token) SLO in seconds (default: 0.1)")
    ap.add_argument("--attainment", type=float, default=0.9, metavar="F",
                    help="fraction of requests that must meet both SLOs (default 0.9)")
    ap.add_argument("--codec", choices=("auto", *CODECS), default="auto",
                    help="KV transfer codec; auto picks the least lossy one within 1%% of the best goodput")
    ap.add_argument("--time-limit", type=float, metavar="S", dest="time_limit",
                    help="stop the search after S seconds (default: iteration cap / no-improvement stop)")
    ap.add_argument("--max-pp", type=int, default=4, metavar="N", dest="max_pp",
                    help="deepest pipeline a replica may have (default 4)")
    ap.add_argument("--colocated", action=argparse.BooleanOptionalAction, default=False,
                    help="let the search also make a group a colocated replica, which runs both phases with chunked "
                         "prefill (vLLM V1-style; `python -m thunderserve.colocated`), where its model says that "
                         "serves more. Off by default: its model and the disaggregated one err differently (by up to "
                         "43%% against simulations), and simulated plans with colocated groups tied or lost against "
                         "disaggregated ones on the paper's cloud cluster (docs/benchmarks.md)")
    ap.add_argument("--token-budget", type=int, default=512, metavar="N", dest="token_budget",
                    help="colocated replicas: prompt and decode tokens per iteration and pipeline micro-batch "
                         "(chunked prefill; written to the plan as meta.token_budget; default 512)")
    ap.add_argument("--calibration", metavar="PROFILE.json",
                    help="cost-model efficiencies measured by `thunderserve profile --gpu TYPE --json PROFILE.json` "
                         "(default: the built-in guesses)")
    ap.add_argument("--seed", type=int, default=0, help="random seed of the search (default 0)")
    ap.add_argument("--json", metavar="OUT", help="write the plan as JSON to this file ('-' for stdout)")
    ap.add_argument("--quiet", action="store_true", help="no progress line on stderr")
    live = ap.add_argument_group("live re-planning")
    live.add_argument("--live", action="store_true",
                      help="publish the plan to the deployment at --nats, then keep running: when a replica "
                           "stops heart-beating (or comes back), or the routers' traffic shifts away from the "
                           "workload planned for, re-decide phases and routing (no weights move) and publish the "
                           "next epoch, until Ctrl-C. Replicas must run under the plan's ids (--replica-id)")
    live.add_argument("--from-plan", metavar="PLAN.json", dest="from_plan",
                      help="with --live: start from this plan (e.g. `--json` output) instead of searching; "
                           "without --cluster, --model and --workload, re-plan it for what it records it was made for")
    live.add_argument("--dead-after", type=float, default=2.0, metavar="S", dest="dead_after",
                      help="seconds without a heartbeat before a replica counts as dead (default 2); one whose "
                           "heartbeat is 0.75 s late and whose connection is gone from NATS counts as dead at once")
    live.add_argument("--shift", type=float, default=0.25, metavar="F",
                      help="re-plan when the observed rate, mean prompt or mean output length is off from the "
                           "planned workload's by more than this fraction (default 0.25; 0 = ignore the traffic)")
    live.add_argument("--shift-window", type=float, default=60.0, metavar="S", dest="shift_window",
                      help="judge the traffic over the routers' reports of the last S seconds (default 60)")
    live.add_argument("--shift-min-requests", type=int, default=50, metavar="N", dest="shift_min_requests",
                      help="finished requests the window needs before it counts (default 50)")
    live.add_argument("--shift-cooldown", type=float, default=30.0, metavar="S", dest="shift_cooldown",
                      help="at least S seconds between two re-plans for the traffic (default 30)")
    config.add_nats_args(ap)
    return ap


async def _run_live(args: argparse.Namespace, planner: Planner, plan: Plan) -> int:
    from .live import LivePlanner

    logging.basicConfig(level=logging.INFO, format="%(asctime)s planner %(levelname)s %(message)s")
    try:  # fail fast if NATS is not there; once connected, ride out its restarts
        nc = await aio.connect_nats(args.nats, "planner", first_timeout=10, max_reconnect_attempts=-1)
    except ConnectionError as exc:
        return fail(PROG, str(exc))
    live = LivePlanner(nc, Subjects(args.subject_prefix), planner, plan, dead_after_s=args.dead_after,
                       shift=_shift_policy(args))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await live.start()
        print(f"live: published plan epoch {live.epoch}; watching {len(plan.replicas)} replicas (Ctrl-C stops)",
              file=sys.stderr, flush=True)
        await stop.wait()
    except ValueError as exc:
        return fail(PROG, f"cannot publish the plan: {exc}")
    finally:
        await live.stop()
        await aio.close_nats(nc)
    return 0


def _shift_policy(args: argparse.Namespace) -> ShiftPolicy | None:
    for flag, value, zero_ok in (("--shift", args.shift, True), ("--shift-window", args.shift_window, False),
                                 ("--shift-min-requests", args.shift_min_requests, False),
                                 ("--shift-cooldown", args.shift_cooldown, True)):
        if value < 0 or (value == 0 and not zero_ok):
            raise ValueError(f"{flag} must be {'>= 0' if zero_ok else '> 0'}")
    if args.shift == 0:
        return None
    return ShiftPolicy(window_s=args.shift_window, threshold=args.shift, min_requests=args.shift_min_requests,
                       cooldown_s=args.shift_cooldown)


def _calibration(path: str) -> Calibration:
    profile = json.loads(Path(path).read_text())
    if "calibration" not in profile:
        raise ValueError(f"{path}: no efficiencies in this profile (make it with `thunderserve profile --gpu TYPE`)")
    return Calibration(**profile["calibration"])


def _workload(args: argparse.Namespace) -> Workload:
    if args.rate is not None and args.rate <= 0:
        raise ValueError("--rate must be > 0")
    if args.workload in DEFAULT_SLOS:
        if args.rate is None:
            raise ValueError(f"--rate is required with the named workload {args.workload!r}")
        return Workload.from_name(args.workload, rate=args.rate, ttft=args.ttft, tpot=args.tpot,
                                  attainment=args.attainment)
    if not Path(args.workload).exists():
        raise ValueError(f"workload {args.workload!r} is neither code, conversation nor an existing trace CSV")
    return Workload.from_trace(args.workload, rate=args.rate, ttft=args.ttft, tpot=args.tpot,
                               attainment=args.attainment)


def _gpus(ids: list[str]) -> str:
    """n0:0,n0:1,n0:2,n1:0 -> n0:0-2,n1:0"""
    by: dict[str, list[int]] = {}
    for g in ids:
        n, _, i = g.rpartition(":")
        by.setdefault(n, []).append(int(i))
    parts = []
    for n, idx in by.items():
        idx.sort()
        runs, start = [], idx[0]
        for a, b in zip(idx, idx[1:] + [None], strict=True):
            if b != a + 1:
                runs.append(f"{start}" if start == a else f"{start}-{a}")
                start = b
        parts.append(f"{n}:{'+'.join(runs)}")
    return ",".join(parts)


def format_plan(plan: Plan) -> str:
    head = ("replica", "phase", "GPUs", "type", "TPxPP", "tok/s", "req/s", "$/h")
    rows = []
    for r in plan.replicas:
        types = "/".join(dict.fromkeys(s.gpu_type for s in r.stages))
        rows.append((r.id, r.phase, _gpus(r.gpus), types, r.layout.removeprefix("TP").replace("xPP", "x"),
                     f"{r.tokens_per_s:,.0f}", f"{r.capacity:.2f}", f"{r.price_per_hour:.2f}"))
    w = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(head)]
    line = "  ".join(h.ljust(w[i]) for i, h in enumerate(head))
    out = [line, "-" * len(line)]
    out += ["  ".join(c.ljust(w[i]) if i < 5 else c.rjust(w[i]) for i, c in enumerate(row)) for row in rows]
    n_pre, n_dec, n_colo = len(plan.prefill_ids), len(plan.decode_ids), len(plan.ids("colocated"))
    wl = plan.workload
    per_dollar = plan.objective / plan.price_per_hour if plan.price_per_hour else 0.0
    out += [
        "",
        f"plan epoch {plan.epoch}: {plan.model} on {plan.cluster}: {len(plan.replicas)} replicas "
        f"({n_pre} prefill, {n_dec} decode"
        + (f", {n_colo} colocated with chunked prefill at {plan.meta.get('token_budget')} tokens per iteration"
           if n_colo else "") + f"), KV codec {plan.kv_codec}",
        f"workload {wl.get('name')}: rate {wl.get('rate', 0):.3g} req/s, prompt {wl.get('prompt_mean', 0):.0f} / "
        f"output {wl.get('output_mean', 0):.0f} tokens (mean), TTFT SLO {wl.get('ttft_slo')} s, "
        f"TPOT SLO {wl.get('tpot_slo')} s, attainment {wl.get('attainment')}",
        f"sustainable SLO-meeting rate (objective): {plan.objective:.3f} req/s",
        f"predicted goodput at the given rate:      {plan.predicted_goodput:.3f} req/s "
        f"({plan.predicted_tokens_per_s:,.0f} output tok/s)",
        f"price: ${plan.price_per_hour:.2f}/h for the GPUs used "
        f"(cluster ${plan.meta.get('cluster_price_per_hour', 0):.2f}/h), {per_dollar:.3f} req/s per $/h",
    ]
    if load := plan.meta.get("network_load"):
        busiest = ", ".join(f"{k} {v:.0%}" for k, v in list(load.items())[:4])
        out.append(f"KV traffic at the objective rate, busiest first (share of bandwidth): {busiest}")
    if plan.unused_gpus:
        out.append(f"unused GPUs: {_gpus(plan.unused_gpus)}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.from_plan and not args.live:
            raise ValueError("--from-plan needs --live")
        if args.live:
            _shift_policy(args)  # bad values: an error now, not after the search
        start_plan = Plan.from_json(Path(args.from_plan).read_text()) if args.from_plan else None
        given = [a for a in (args.cluster, args.model, args.workload) if a is not None]
        if start_plan is not None and not given:  # the plan says what it was made for
            planner = Planner.from_plan(start_plan)
        elif len(given) < 3:
            raise ValueError("--cluster, --model and --workload are required (or --live --from-plan PLAN.json alone)")
        else:
            if args.max_pp < 1:
                raise ValueError("--max-pp must be >= 1")
            if args.time_limit is not None and args.time_limit <= 0:
                raise ValueError("--time-limit must be > 0")
            if args.token_budget < 1:
                raise ValueError("--token-budget must be >= 1")
            planner = Planner(Cluster.from_yaml(args.cluster), ModelSpec.load(args.model), _workload(args),
                              codec=args.codec, seed=args.seed, max_pp=args.max_pp, colocated=args.colocated,
                              token_budget=args.token_budget,
                              calibration=_calibration(args.calibration) if args.calibration else None)
    except INPUT_ERRORS as exc:
        return fail(PROG, input_error(exc, args.cluster))
    if start_plan is not None:
        return asyncio.run(_run_live(args, planner, start_plan))

    tty = sys.stderr.isatty()
    last = [0.0]

    def progress(it: int, best: float, elapsed: float) -> None:
        if args.quiet:
            return
        msg = f"searching: iteration {it}, best {best:.3f} req/s, {elapsed:.1f} s"
        if tty:
            print(f"\r{msg}", end="", file=sys.stderr, flush=True)
        elif elapsed - last[0] >= 2.0 or it == 1:
            last[0] = elapsed
            print(msg, file=sys.stderr, flush=True)

    if not args.quiet:
        cluster = planner.cluster
        print(f"planning {planner.model.name} on {cluster.name} ({cluster.n_gpus} GPUs)...", file=sys.stderr)
    t0 = time.monotonic()
    plan = planner.solve(time_limit_s=args.time_limit, progress=progress)
    if not args.quiet:
        print(("\r" if tty else "") + f"search done: {plan.meta.get('iterations')} iterations, "
              f"{plan.meta.get('lp_solves')} LP solves, {time.monotonic() - t0:.1f} s", file=sys.stderr)
    if args.json == "-":
        print(plan.to_json(indent=2))
    else:
        print(format_plan(plan))
        if args.json:
            try:
                Path(args.json).write_text(plan.to_json(indent=2) + "\n")
            except OSError as exc:
                return fail(PROG, f"cannot write {args.json}: {exc.strerror}")
            print(f"plan written to {args.json}")
    if plan.objective <= 0:
        print(f"{PROG}: warning: no feasible plan (the model does not fit or the SLOs cannot be met)",
              file=sys.stderr)
        return 0
    if args.live:
        return asyncio.run(_run_live(args, planner, plan))
    return 0


INPUT_ERRORS = (FileNotFoundError, yaml.YAMLError, ValueError, KeyError, TypeError, OSError)


def input_error(exc: BaseException, cluster_path: str | None) -> str:
    """One line saying what is wrong with the user's input (shared by the planner's commands)."""
    if isinstance(exc, FileNotFoundError):
        return f"file not found: {exc.filename}"
    if isinstance(exc, yaml.YAMLError):
        return f"cannot parse {cluster_path}: {str(exc).splitlines()[0]}"
    return str(exc.args[0]) if exc.args else repr(exc)


def fail(prog: str, msg: str) -> int:
    print(f"{prog}: error: {msg}", file=sys.stderr)
    return 2
