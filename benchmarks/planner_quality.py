"""Tabu search vs exhaustive enumeration on random small clusters (target: within 1% on every one).

    python benchmarks/planner_quality.py [--n 50] [--seed0 0] [--gpus 4 8]

Instance i: `random_cluster(seed0 + i)` (4-8 GPUs by default, 1-3 nodes of random types, random links), model
llama-7b / llama-13b and workload code / conversation alternating. Exhaustive search enumerates every
grouping and phase designation up to the interchangeability of a node's GPUs. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import time

from thunderserve.planner import ModelSpec, Planner, Workload
from thunderserve.planner.search import exhaustive_search
from thunderserve.planner.synthetic import random_cluster


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=50)
    ap.add_argument("--seed0", type=int, default=0)
    ap.add_argument("--gpus", type=int, nargs=2, default=[4, 8], metavar=("MIN", "MAX"),
                    help="GPUs per random cluster (exhaustive search slows down fast beyond ~12)")
    args = ap.parse_args()
    rows = []
    t_tabu = t_exh = 0.0
    for i in range(args.n):
        seed = args.seed0 + i
        cluster = random_cluster(seed, *args.gpus)
        model = ModelSpec.from_name(["llama-7b", "llama-13b"][seed % 2])
        wl = Workload.from_name(["code", "conversation"][(seed // 2) % 2], rate=2.0)
        t = time.perf_counter()
        plan = Planner(cluster, model, wl).solve()
        t1 = time.perf_counter() - t
        t = time.perf_counter()
        best = exhaustive_search(Planner(cluster, model, wl))
        t2 = time.perf_counter() - t
        t_tabu += t1
        t_exh += t2
        ratio = plan.objective / best.score if best.score > 0 else 1.0
        rows.append({"seed": seed, "gpus": cluster.n_gpus, "nodes": [f"{n.count}x{n.gpu.name}" for n in cluster.nodes],
                     "model": model.name, "shape": wl.name, "tabu": round(plan.objective, 4),
                     "exhaustive": round(best.score, 4), "ratio": round(ratio, 5), "tabu_s": round(t1, 3),
                     "exhaustive_s": round(t2, 3)})
    ratios = [r["ratio"] for r in rows]
    print(json.dumps({
        "benchmark": "planner_quality", "instances": len(rows), "gpus": args.gpus,
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "within_1pct": sum(r >= 0.99 for r in ratios), "exact": sum(r >= 1 - 1e-9 for r in ratios),
        "min_ratio": min(ratios), "mean_ratio": round(sum(ratios) / len(ratios), 5),
        "tabu_total_s": round(t_tabu, 1), "exhaustive_total_s": round(t_exh, 1),
        "misses": [r for r in rows if r["ratio"] < 0.99], "instances_detail": rows}, indent=2))


if __name__ == "__main__":
    main()
