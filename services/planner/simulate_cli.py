"""`thunderserve simulate`: run a plan through the discrete-event simulator under a request stream."""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from thunderserve.common.config import CliParser
from thunderserve.common.plan import Plan

from .cli import INPUT_ERRORS, fail, input_error
from .cluster import Cluster
from .model import ModelSpec
from .planner import plan_calibration
from .simulator import COLOCATED_POLICIES, SLO, SimConfig, Simulator, find_goodput, poisson_requests, trace_requests
from .workload import DEFAULT_SLOS, Workload, read_trace

PROG = "thunderserve simulate"
REPO_CLUSTERS = Path(__file__).resolve().parents[2] / "deploy" / "clusters"




def build_parser() -> argparse.ArgumentParser:
    ap = CliParser(
        prog=PROG,
        description="Simulate a plan (from `thunderserve plan --json OUT`, or a baseline) under Poisson or "
                    "trace-timed arrivals: prefill batching and queueing, KV transfer over each link with the "
                    "plan's codec, continuous-batch decode limited by KV memory, colocated replicas. Prints SLO "
                    "attainment, latency percentiles, throughput and (with --goodput) the highest rate that "
                    "keeps the attainment target.",
        epilog="example: thunderserve plan --cluster deploy/clusters/cloud-32.yaml --model llama-30b --workload code "
               "--rate 2 --json plan.json && thunderserve simulate --plan plan.json --workload code --rate 2",
    )
    ap.add_argument("--plan", required=True, metavar="PLAN.json", help="plan JSON written by `thunderserve plan`")
    ap.add_argument("--workload", required=True, metavar="code|conversation|TRACE.csv",
                    help="named shape (Poisson arrivals, lengths drawn from its shipped trace) or an Azure-format "
                         "trace CSV (replayed at its own timestamps, time-scaled to --rate if given)")
    ap.add_argument("--rate", type=float, metavar="R", help="arrival rate, req/s (required for named shapes)")
    ap.add_argument("--duration", type=float, default=300.0, metavar="S",
                    help="seconds of arrivals to simulate (default 300)")
    ap.add_argument("--seed", type=int, default=0, help="random seed: same seed, same result (default 0)")
    ap.add_argument("--cluster", metavar="FILE",
                    help="cluster YAML the plan was made for (default: the plan's meta.cluster_spec, else "
                         "deploy/clusters/<plan.cluster>.yaml)")
    ap.add_argument("--model", metavar="NAME|config.json", help="model (default: the plan's model name)")
    ap.add_argument("--ttft", type=float, metavar="S", help="TTFT SLO, s (default: the plan's workload SLO)")
    ap.add_argument("--tpot", type=float, metavar="S", help="TPOT SLO, s (default: the plan's workload SLO)")
    ap.add_argument("--attainment", type=float, metavar="F", help="attainment target (default: the plan's, or 0.9)")
    ap.add_argument("--goodput", action="store_true",
                    help="also search the highest Poisson rate with attainment >= target (named shapes and traces)")
    ap.add_argument("--prefill-batch-tokens", type=int, default=SimConfig.prefill_batch_tokens, metavar="N",
                    dest="prefill_batch_tokens", help="prompt tokens per prefill batch (default %(default)s)")
    ap.add_argument("--colocated", choices=COLOCATED_POLICIES, default=None,
                    help="scheduling of colocated replicas: 'stall' (vLLM V0: a prefill batch runs alone and stalls "
                         "the decode batch) or 'chunked' (vLLM V1's chunked prefill: decode tokens plus prompt "
                         "chunks up to --token-budget per iteration). Default: chunked for a plan that sets "
                         "meta.token_budget (the planner's colocated groups, served by thunderserve.colocated, "
                         f"which chunks), else {SimConfig.colocated_policy}")
    ap.add_argument("--token-budget", type=int, default=None, metavar="N", dest="token_budget",
                    help="with --colocated chunked: tokens per iteration and micro-batch, vLLM's "
                         "max_num_batched_tokens (default: the plan's meta.token_budget, else "
                         f"{SimConfig.token_budget})")
    ap.add_argument("--json", metavar="OUT", help="write the results as JSON to this file ('-' for stdout only)")
    ap.add_argument("--quiet", action="store_true", help="no progress on stderr")
    return ap


def _cluster(args: argparse.Namespace, plan: Plan) -> Cluster:
    if args.cluster:
        return Cluster.from_yaml(args.cluster)
    spec = plan.meta.get("cluster_spec")
    if isinstance(spec, dict):
        return Cluster.from_dict(spec)
    guess = REPO_CLUSTERS / f"{plan.cluster}.yaml"
    if plan.cluster and guess.exists():
        return Cluster.from_yaml(guess)
    raise ValueError(f"the plan does not carry its cluster ({plan.cluster or 'unnamed'}): pass --cluster FILE")


def _slo(args: argparse.Namespace, plan: Plan, shape: str) -> SLO:
    wl = plan.workload or {}
    d_ttft, d_tpot = DEFAULT_SLOS.get(shape, (wl.get("ttft_slo", 2.0), wl.get("tpot_slo", 0.1)))
    ttft = args.ttft or float(wl.get("ttft_slo") or d_ttft)
    tpot = args.tpot or float(wl.get("tpot_slo") or d_tpot)
    att = args.attainment or float(wl.get("attainment") or 0.9)
    if ttft <= 0 or tpot <= 0 or not 0 < att < 1:
        raise ValueError("SLOs must be > 0 and the attainment in (0, 1)")
    return SLO(ttft, tpot, att)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.rate is not None and args.rate <= 0:
            raise ValueError("--rate must be > 0")
        if args.duration <= 0:
            raise ValueError("--duration must be > 0")
        if args.prefill_batch_tokens < 1:
            raise ValueError("--prefill-batch-tokens must be >= 1")
        if args.token_budget is not None and args.token_budget < 1:
            raise ValueError("--token-budget must be >= 1")
        try:
            plan = Plan.from_json(Path(args.plan).read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{args.plan} is not JSON ({exc.msg}, line {exc.lineno})") from None
        plan.validate()
        cluster = _cluster(args, plan)
        model = ModelSpec.load(args.model or plan.model)
        shape = args.workload if args.workload in DEFAULT_SLOS else "trace"
        if shape != "trace":
            if args.rate is None:
                raise ValueError(f"--rate is required with the named workload {args.workload!r}")
            w = Workload.from_name(args.workload, rate=args.rate)
            reqs = poisson_requests(args.rate, w.prompt_lens, w.output_lens, duration=args.duration, seed=args.seed)
            prompts, outputs = w.prompt_lens, w.output_lens
        else:
            if not Path(args.workload).exists():
                raise ValueError(f"workload {args.workload!r} is neither code, conversation nor an existing trace CSV")
            times, prompts, outputs = read_trace(args.workload)
            reqs = trace_requests(times, prompts, outputs, rate=args.rate, duration=args.duration)
        if not reqs:
            raise ValueError("no request arrives within --duration")
        slo = _slo(args, plan, shape)
        planned_budget = plan.meta.get("token_budget")  # the plan's colocated replicas chunk their prompts
        policy = args.colocated or ("chunked" if planned_budget else SimConfig.colocated_policy)
        budget = args.token_budget or int(planned_budget or SimConfig.token_budget)
        cfg = SimConfig(prefill_batch_tokens=args.prefill_batch_tokens, colocated_policy=policy, token_budget=budget)
        sim = Simulator(plan, cluster, model, slo, calib=plan_calibration(plan), config=cfg)
    except INPUT_ERRORS as exc:
        return fail(PROG, input_error(exc, args.cluster))

    tty = sys.stderr.isatty()
    t0 = time.monotonic()
    shown = [-1.0]

    def progress(frac: float) -> None:
        if args.quiet or (not tty and frac - shown[0] < 0.1 and frac < 1):  # logs: every 10%
            return
        shown[0] = frac
        msg = f"simulating: {frac:5.1%} of {len(reqs)} requests done, {time.monotonic() - t0:.1f} s"
        print(f"\r{msg}" if tty else msg, end="" if tty else "\n", file=sys.stderr, flush=True)

    if not args.quiet:
        print(f"simulating {len(reqs)} requests on {len(plan.replicas)} replicas of {cluster.name}...",
              file=sys.stderr)
    res = sim.run(reqs, seed=args.seed, progress=progress)
    out = {"plan": args.plan, "cluster": cluster.name, "model": model.name, "workload": args.workload,
           "colocated": cfg.colocated_policy,
           **({"token_budget": cfg.token_budget} if cfg.colocated_policy == "chunked" else {}),
           **res.summary()}
    if args.goodput:
        if not args.quiet:
            print(("\n" if tty else "") + "searching goodput...", file=sys.stderr)
        g = find_goodput(sim, prompts, outputs, n=min(2000, max(300, len(reqs))), seed=args.seed,
                         hint=max(0.05, 0.7 * plan.objective))
        out["goodput"] = round(g.goodput, 4)
        out["goodput_probes"] = [[round(r, 4), round(a, 4)] for r, a in g.probes]
    if not args.quiet and tty:
        print(file=sys.stderr)
    if args.json == "-":
        print(json.dumps(out, indent=2))
        return 0
    print(format_result(out, plan))
    if args.json:
        try:
            Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
        except OSError as exc:
            return fail(PROG, f"cannot write {args.json}: {exc.strerror}")
        print(f"results written to {args.json}")
    return 0


def format_result(out: dict, plan: Plan) -> str:
    def p(d: dict, k: str, scale: float = 1.0, unit: str = "s") -> str:
        v = d.get(k)
        return "unfinished" if v is None else f"{v * scale:.3f} {unit}"

    slo = out["slo"]
    lines = [
        f"{out['requests']} requests at {out['rate']:.3g} req/s on {len(plan.replicas)} replicas "
        f"({out['cluster']}, {out['model']}), {out['finished']} finished",
        f"SLO attainment: {out['attainment']:.1%} (TTFT <= {slo['ttft']} s and TPOT <= {slo['tpot']} s; "
        f"target {slo['target']:.0%})",
        f"smallest SLO scale meeting the target: {out['min_slo_scale']:.3f}x",
        f"SLO-meeting output tokens/s: {out['slo_tokens_per_s']:,.1f}",
    ]
    for name, key in (("TTFT", "ttft_s"), ("TPOT", "tpot_s"), ("end-to-end", "e2e_s")):
        d = out[key]
        lines.append(f"{name:<10} p50 {p(d, 'p50')}  p90 {p(d, 'p90')}  p99 {p(d, 'p99')}")
    if "goodput" in out:
        lines.append(f"goodput (highest rate with attainment >= target): {out['goodput']:.3f} req/s "
                     f"(planner predicted {plan.objective:.3f})")
    if not math.isfinite(out["min_slo_scale"]):
        lines.append("some requests never finished (KV memory too small for them)")
    return "\n".join(lines)

