"""What lightweight re-scheduling buys after a workload shift, judged by the simulator (no GPUs).

    python benchmarks/planner_shift_gain.py [--quick] [--no-plot] [--seed N] [--time-limit S] [--streams K]
                                            [--cluster deploy/clusters/cloud-32.yaml] [--model llama-30b]

The planner plans the cluster for workload A; the traffic then shifts to workload B. Three plans are
served under B in the discrete-event simulator (services/planner/simulator.py):

  stale        the plan made for A, unchanged (its phases, dispatch, routing and KV codec);
  rescheduled  `planner.reschedule(plan, workload=B)`: phases and routing re-decided, grouping and layouts
               kept, so no weights move - what the live planner does on a shift (services/planner/live.py);
  full         `Planner(cluster, model, B).solve(...)` from scratch: what a restart would get (weights reload).

Both directions run: conversation -> code and code -> conversation. The two searches (one per workload)
serve both directions: the plan made for A is the stale plan of A -> B and the full re-plan of B -> A.
Goodput = the highest Poisson rate at which >= 90% of requests meet both of B's SLOs, found by
`simulator.find_goodput` (bisection to 3%) through `experiment.best_by_simulation`, as
benchmarks/paper_comparison.py judges its plans; it is averaged over --streams request streams (seeds
seed, seed+1, ...), the same streams for every plan, since one stream's figure moves by a few % with
the seed. Planner times: re-scheduling (median of --repeat runs, ms) against the full search (s).
`phase_only_best` scores every phase designation of the stale plan's replicas under B with the
planner's objective (at most 2^12): whether any phase-only re-scheduling could do better than the
one found. The workload's rate does not change the plans (the planner maximises the rate it sustains).

Prints one JSON object; writes docs/planner_shift_gain.png unless --no-plot. About 40 s on a 2-core
machine (--quick: one 500-request stream per plan and a 4 s search limit, ~15 s). Deterministic for a
seed while the searches end by their own stopping rule before --time-limit (`hit_time_limit` says).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import time
from pathlib import Path

from thunderserve.common.plan import Plan
from thunderserve.planner import Cluster, ModelSpec, Planner, Workload
from thunderserve.planner.experiment import Settings, best_by_simulation, plan_shape
from thunderserve.planner.parallel import PHASES, evaluate_layout
from thunderserve.planner.planner import layout_of
from thunderserve.planner.simulator import SLO

ROOT = Path(__file__).resolve().parents[1]
PNG = ROOT / "docs" / "planner_shift_gain.png"
DIRECTIONS = (("conversation", "code"), ("code", "conversation"))
KINDS = ("stale", "rescheduled", "full")


def _replicas(plan: Plan) -> list[dict]:
    """Per replica: phase, layout, GPUs per node, the planner's capacity (req/s, for its own workload)."""
    out = []
    for r in plan.replicas:
        nodes: dict[str, int] = {}
        for g in r.gpus:
            n = g.split(":", 1)[0]
            nodes[n] = nodes.get(n, 0) + 1
        out.append({"id": r.id, "phase": r.phase, "layout": r.layout,
                    "gpus": "+".join(f"{n}:{c}" for n, c in nodes.items()),
                    "capacity": round(r.capacity, 3), "max_sequences": r.max_sequences})
    return out


def _summary(plan: Plan) -> dict:
    return {"shape": plan_shape(plan), "prefill": plan.prefill_ids, "decode": plan.decode_ids,
            "kv_codec": plan.kv_codec, "objective": round(plan.objective, 3),
            "planned_for": plan.workload.get("name"), "replicas": _replicas(plan)}


def phase_only_best(cluster: Cluster, model: ModelSpec, w: Workload, plan: Plan, seed: int,
                    max_replicas: int = 12) -> dict | None:
    """The planner's objective under `w` of every phase designation of the plan's replicas (layouts kept)."""
    if len(plan.replicas) > max_replicas:
        return None
    planner = Planner(cluster, model, w, seed=seed)
    perf = {(r.id, ph): evaluate_layout(cluster, model, w, layout_of(r), ph, planner.calib)
            for r in plan.replicas for ph in PHASES}
    best: tuple[float, tuple[str, ...]] = (0.0, ())
    for phases in itertools.product(PHASES, repeat=len(plan.replicas)):
        items = [(r.id, perf[(r.id, ph)]) for r, ph in zip(plan.replicas, phases) if perf[(r.id, ph)].capacity > 0]
        rate = planner.choose_codec(items)[1].rate if items else 0.0
        if rate > best[0] * (1 + 1e-9):
            best = (rate, phases)
    return {"objective": round(best[0], 3), "designations": 2 ** len(plan.replicas),
            "prefill": [r.id for r, ph in zip(plan.replicas, best[1]) if ph == "prefill"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cluster", default=str(ROOT / "deploy" / "clusters" / "cloud-32.yaml"))
    ap.add_argument("--model", default="llama-30b")
    ap.add_argument("--seed", type=int, default=0, help="planner search and request streams")
    ap.add_argument("--time-limit", type=float, default=None, help="s per full search (default 20, --quick 4)")
    ap.add_argument("--requests", type=int, default=None, help="requests per simulation (default 1500, --quick 500)")
    ap.add_argument("--streams", type=int, default=None,
                    help="request streams (seeds seed, seed+1, ...) to average goodput over (default 4, --quick 1)")
    ap.add_argument("--repeat", type=int, default=5, help="re-scheduling runs timed (the median is reported)")
    ap.add_argument("--quick", action="store_true", help="smoke run: fewer requests, a 4 s search limit")
    ap.add_argument("--no-plot", action="store_true", help=f"do not write {PNG.relative_to(ROOT)}")
    args = ap.parse_args(argv)
    time_limit = args.time_limit if args.time_limit is not None else (4.0 if args.quick else 20.0)
    args.streams = args.streams if args.streams is not None else (1 if args.quick else 4)
    n_req = args.requests if args.requests is not None else (500 if args.quick else 1500)
    streams = [Settings(model=args.model, n_requests=n_req, seed=args.seed + k) for k in range(args.streams)]
    t0 = time.monotonic()

    def log(msg: str) -> None:
        print(f"[{time.monotonic() - t0:6.1f} s] {msg}", file=sys.stderr, flush=True)

    cluster = Cluster.from_yaml(args.cluster)
    model = ModelSpec.from_name(args.model)
    names = sorted({n for d in DIRECTIONS for n in d})
    workloads = {n: Workload.from_name(n, rate=1.0) for n in names}

    planners: dict[str, Planner] = {}
    plans: dict[str, Plan] = {}
    search: dict[str, dict] = {}
    for n in names:
        log(f"full search for {n} (limit {time_limit:g} s)")
        planners[n] = Planner(cluster, model, workloads[n], seed=args.seed)
        t = time.monotonic()
        plans[n] = planners[n].solve(time_limit_s=time_limit)
        took = time.monotonic() - t
        search[n] = {"s": round(took, 2), "iterations": plans[n].meta.get("iterations"),
                     "hit_time_limit": took >= time_limit * 0.98}
        log(f"  {plan_shape(plans[n])}, objective {plans[n].objective:.2f} req/s, {took:.1f} s")

    directions = []
    for a, b in DIRECTIONS:
        wb = workloads[b]
        slo = SLO(wb.ttft_slo, wb.tpot_slo, wb.attainment)
        log(f"shift {a} -> {b}: reschedule x{args.repeat}")
        ms = []
        for _ in range(args.repeat):
            t = time.perf_counter()
            resched = planners[a].reschedule(plans[a], workload=wb)  # the live planner's call
            ms.append((time.perf_counter() - t) * 1e3)
        cand = {"stale": plans[a], "rescheduled": resched, "full": plans[b]}
        row: dict = {"from": a, "to": b}
        for kind in KINDS:
            t = time.monotonic()
            per_stream, first = [], None
            for st in streams:  # the same request streams for every plan
                found = best_by_simulation([cand[kind]], cluster, model, wb, slo, st)
                g = found[1] if found else None
                per_stream.append(round(g.goodput, 3) if g else 0.0)
                first = first if first is not None else (g.result if g else None)
            row[kind] = {"goodput": round(statistics.fmean(per_stream), 3), "goodput_per_stream": per_stream,
                         "p90_ttft_s_stream0": round(first.percentile("ttft", 90), 3) if first else None,
                         "p90_tpot_s_stream0": round(first.percentile("tpot", 90), 4) if first else None,
                         "plan": _summary(cand[kind])}
            log(f"  {kind:11s} {plan_shape(cand[kind])}: goodput {row[kind]['goodput']:.2f} req/s under {b} "
                f"(streams {per_stream}, {time.monotonic() - t:.1f} s)")
        gs, gr, gf = (row[k]["goodput"] for k in KINDS)
        flipped = sorted(r.id for r in resched.replicas if r.phase != plans[a].replica(r.id).phase)
        row["rescheduled"]["phases_flipped"] = flipped
        row["rescheduled"]["phase_only_best"] = phase_only_best(cluster, model, wb, plans[a], args.seed)
        row["ratio_rescheduled_vs_stale"] = round(gr / gs, 3) if gs > 0 else None
        row["ratio_rescheduled_vs_full"] = round(gr / gf, 3) if gf > 0 else None
        row["ratio_stale_vs_full"] = round(gs / gf, 3) if gf > 0 else None
        row["planner_time"] = {"reschedule_ms_median": round(statistics.median(ms), 1),
                               "reschedule_ms_max": round(max(ms), 1),
                               "full_search_s": search[b]["s"], "full_search_iterations": search[b]["iterations"],
                               "full_search_hit_time_limit": search[b]["hit_time_limit"]}
        directions.append(row)

    png = None
    if not args.no_plot:
        png = plot(directions, cluster.name, args.model)
        log(f"wrote {png}")
    out = {"benchmark": "planner_shift_gain", "cluster": cluster.name, "gpus": cluster.n_gpus, "model": args.model,
           "quick": args.quick, "seed": args.seed, "time_limit_s": time_limit, "requests_per_simulation": n_req,
           "request_streams": args.streams,
           "goodput_rel_tol": 0.03, "slo_attainment": 0.9,
           "slos": {n: {"ttft_s": w.ttft_slo, "tpot_s": w.tpot_slo} for n, w in workloads.items()},
           "searches": search, "directions": directions,
           "seconds": round(time.monotonic() - t0, 1), "load_avg_1m": round(os.getloadavg()[0], 2), "plot": png}
    print(json.dumps(out, indent=2))
    return 0


def plot(directions: list[dict], cluster: str, model: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"stale": "#b0b0b0", "rescheduled": "#4c72b0", "full": "#55a868"}
    labels = {"stale": "stale plan (made for the old workload)", "rescheduled": "rescheduled (no weights move)",
              "full": "full re-plan (restart, weights reload)"}
    fig, ax = plt.subplots(figsize=(8, 4.4))
    width = 0.26
    for i, row in enumerate(directions):
        t = row["planner_time"]
        times = {"stale": "", "rescheduled": f"{t['reschedule_ms_median']:.0f} ms",
                 "full": f"{t['full_search_s']:.1f} s"}
        for j, kind in enumerate(KINDS):
            x = i + (j - 1) * width
            g = row[kind]["goodput"]
            per = row[kind]["goodput_per_stream"]
            err = [[g - min(per)], [max(per) - g]] if len(per) > 1 else None
            ax.bar(x, g, width * 0.95, color=colors[kind], label=labels[kind] if i == 0 else None, yerr=err,
                   capsize=3, error_kw={"lw": 0.8})
            label = f"{g:.2f}" + (f"\n{times[kind]}" if times[kind] else "")
            if len(per) > 1:  # beside the whisker's top
                ax.text(x + width * 0.08, max(per), label, ha="left", va="bottom", fontsize=8)
            else:
                ax.text(x, g, label, ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(directions)))
    ax.set_xticklabels([f"planned for {r['from']},\nserving {r['to']}" for r in directions])
    ax.set_ylabel("simulated goodput (req/s, ≥ 90% SLO attainment)")
    n = len(directions[0]["stale"]["goodput_per_stream"])
    if n > 1:
        ax.set_xlabel(f"bars: mean over {n} request streams, whiskers: min-max", fontsize=8)
    ax.set_title(f"{model} on {cluster}: workload shift", fontsize=10)
    top = max(max(r[k]["goodput_per_stream"]) for r in directions for k in KINDS)
    ax.set_ylim(0, top * 1.25 if top > 0 else 1)
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    PNG.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(PNG, dpi=110)
    plt.close(fig)
    return str(PNG.relative_to(ROOT))


if __name__ == "__main__":
    raise SystemExit(main())
