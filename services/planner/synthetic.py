"""Synthetic clusters for tests and benchmarks (deterministic given a seed)."""

from __future__ import annotations

import random

from .cluster import Cluster

SMALL_TYPES = ["A40", "A6000", "A5000", "RTX3090Ti", "L40", "A100-40G", "L4", "RTX4090"]
FAST_INTRA = {"A40": 256, "A6000": 256, "L40": 256, "A100-40G": 2400, "A100-80G": 2400}
# node types of the paper-like cloud mix, cycled to build larger clusters
CLOUD_TYPES = ["A40", "A6000", "A5000", "RTX3090Ti", "L40", "A40", "A6000", "RTX3090Ti"]


def random_cluster(seed: int, min_gpus: int = 4, max_gpus: int = 8, max_nodes: int = 3) -> Cluster:
    """1..max_nodes nodes of random types, min_gpus..max_gpus GPUs, random inter-node links."""
    rng = random.Random(seed)
    total = rng.randint(min_gpus, max_gpus)
    n_nodes = rng.randint(1, min(max_nodes, total))
    cuts = sorted(rng.sample(range(1, total), n_nodes - 1))
    counts = [b - a for a, b in zip([0, *cuts], [*cuts, total], strict=True)]
    nodes = []
    for i, c in enumerate(counts):
        gpu = rng.choice(SMALL_TYPES)
        nodes.append({"name": f"n{i}", "gpu": gpu, "count": c, "intra_gbps": FAST_INTRA.get(gpu, 128)})
    links = [[f"n{i}", f"n{j}", rng.choice([5, 10, 25, 40, 100])]
             for i in range(n_nodes) for j in range(i + 1, n_nodes)]
    return Cluster.from_dict({"name": f"random-{seed}", "nodes": nodes,
                              "network": {"default_gbps": 10, "links": links}})


def cloud_cluster(n_gpus: int) -> Cluster:
    """n_gpus/4 four-GPU nodes cycling through the cloud mix; pairs of nodes share a 40 Gbit/s
    link, everything else talks at 10 Gbit/s."""
    n_nodes = max(1, n_gpus // 4)
    nodes = [{"name": f"n{i}", "gpu": CLOUD_TYPES[i % len(CLOUD_TYPES)], "count": 4,
              "intra_gbps": FAST_INTRA.get(CLOUD_TYPES[i % len(CLOUD_TYPES)], 128)} for i in range(n_nodes)]
    links = [[f"n{i}", f"n{i + 1}", 40] for i in range(0, n_nodes - 1, 2)]
    return Cluster.from_dict({"name": f"cloud-{n_gpus}", "nodes": nodes,
                              "network": {"default_gbps": 10, "links": links}})
