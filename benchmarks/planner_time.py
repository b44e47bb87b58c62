"""Planning time vs cluster size (DESIGN.md §3 planner; targets: 32 GPUs <= 10 s, 128 GPUs <= 120 s).

    python benchmarks/planner_time.py [--sizes 8 32 64 128] [--model llama-30b] [--shapes code conversation]

Clusters: 4-GPU nodes cycling through the paper-like cloud mix (A40, A6000, A5000, RTX 3090 Ti, L40),
pairs of nodes on 40 Gbit/s, the rest on 10 Gbit/s. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

from thunderserve.planner import ModelSpec, Planner, Workload
from thunderserve.planner.synthetic import cloud_cluster


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[8, 32, 64, 128])
    ap.add_argument("--model", default="llama-30b")
    ap.add_argument("--shapes", nargs="+", default=["code", "conversation"])
    ap.add_argument("--rate", type=float, default=2.0)
    args = ap.parse_args()
    model = ModelSpec.from_name(args.model)
    runs = []
    for n in args.sizes:
        cluster = cloud_cluster(n)
        for shape in args.shapes:
            planner = Planner(cluster, model, Workload.from_name(shape, rate=args.rate))
            t = time.perf_counter()
            plan = planner.solve()
            dt = time.perf_counter() - t
            runs.append({"gpus": n, "shape": shape, "seconds": round(dt, 2),
                         "objective_req_s": round(plan.objective, 3),
                         "replicas": len(plan.replicas), "prefill": len(plan.prefill_ids),
                         "decode": len(plan.decode_ids), "kv_codec": plan.kv_codec,
                         "price_per_hour": plan.price_per_hour, "iterations": plan.meta["iterations"],
                         "lp_solves": plan.meta["lp_solves"], "layouts": plan.meta["layouts_evaluated"]})
    print(json.dumps({"benchmark": "planner_time", "model": args.model, "cpus": os.cpu_count(),
                      "load_avg_1m": round(os.getloadavg()[0], 2), "python": platform.python_version(),
                      "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
