"""Lightweight re-scheduling time on 32 GPUs (target <= 100 ms): after a replica failure and after a
workload shift. Grouping and layouts stay; only phases and the routing LP are re-decided.

    python benchmarks/planner_reschedule.py [--cluster deploy/clusters/cloud-32.yaml] [--model llama-30b]
                                            [--plan PLAN.json]

`--plan` reschedules a saved plan (e.g. `thunderserve plan ... --json PLAN.json`) instead of solving one,
and `--fixed` a fixed 8-replica grouping of cloud-32 (the one the planner chose for llama-13b before
issue 4), so different planner versions can be timed on the same plan.

"cold" uses a fresh Planner (no caches), "warm" the planner that made the plan. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

from thunderserve.common.plan import Plan
from thunderserve.planner import Cluster, ModelSpec, Planner, Workload

ROOT = Path(__file__).resolve().parents[1]
FIXED_GROUPS = [["l40:3", "a40a:0", "a40a:1"], ["a40a:2", "a40a:3", "a40b:0", "a40b:3"],
                ["l40:1", "l40:2", "a40b:1", "a40b:2"], ["a5k:0", "a5k:1", "a5k:2", "a5k:3"],
                ["a6ka:0", "a6ka:1", "a6ka:2", "a6ka:3"], ["a6kb:0", "a6kb:1", "a6kb:2", "a6kb:3"],
                ["l40:0"], [f"r3090{x}:{i}" for x in "ab" for i in range(4)]]


def _time(fn, repeat: int) -> list[float]:
    out = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1000)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cluster", default=str(ROOT / "deploy" / "clusters" / "cloud-32.yaml"))
    ap.add_argument("--model", default="llama-30b")
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--plan", help="a saved plan (JSON) to reschedule instead of solving one")
    ap.add_argument("--fixed", action="store_true", help="reschedule the fixed 8-replica cloud-32 grouping")
    args = ap.parse_args()
    cluster = Cluster.from_yaml(args.cluster)
    model = ModelSpec.from_name(args.model)
    conv = Workload.from_name("conversation", rate=4.0)
    code = Workload.from_name("code", rate=4.0)
    planner = Planner(cluster, model, conv)
    if args.plan:
        plan = Plan.from_json(Path(args.plan).read_text())
    elif args.fixed:
        plan = planner.build_plan(FIXED_GROUPS, ["prefill"] * 3 + ["decode"] * 3 + ["prefill", "decode"])
    else:
        plan = planner.solve()
    victim = max(plan.replicas, key=lambda r: r.capacity if r.phase == "decode" else -1).id
    cases = {
        "failure_cold": lambda: Planner(cluster, model, conv).reschedule(plan, failed=[victim]),
        "failure_warm": lambda: planner.reschedule(plan, failed=[victim]),
        "shift_to_code_cold": lambda: Planner(cluster, model, conv).reschedule(plan, workload=code),
    }
    res = {}
    for name, fn in cases.items():
        ms = _time(fn, args.repeat)
        res[name] = {"median_ms": round(statistics.median(ms), 1), "max_ms": round(max(ms), 1)}
    after = planner.reschedule(plan, failed=[victim])
    shifted = planner.reschedule(plan, workload=code)
    print(json.dumps({
        "benchmark": "planner_reschedule", "cluster": cluster.name, "gpus": cluster.n_gpus, "model": args.model,
        "replicas": len(plan.replicas), "failed": victim, "load_avg_1m": round(os.getloadavg()[0], 2),
        "objective_before": round(plan.objective, 3), "objective_after_failure": round(after.objective, 3),
        "prefill_before": len(plan.prefill_ids), "prefill_after_shift_to_code": len(shifted.prefill_ids),
        "timings": res}, indent=2))


if __name__ == "__main__":
    main()
