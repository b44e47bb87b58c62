"""Cluster spec: nodes of identical GPUs, the intra-node link, each node's NIC, and the inter-node
bandwidth matrix.

A pair's bandwidth is what one transfer between the two nodes gets (the path's limit). A node's NIC is
shared by every transfer into it (and, separately, out of it: full duplex), so a node receiving from four
peers at once gets at most its NIC's rate in all. Without `nic_gbps`, a node's NIC is its fastest
inter-node link: the least that agrees with the matrix."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .catalog import Catalog, GPUSpec, default_catalog


@dataclass(frozen=True)
class Node:
    name: str
    gpu: GPUSpec
    count: int
    intra_gbps: float  # link between this node's GPUs, Gbit/s
    price_per_gpu_hour: float
    nic_gbps: float | None = None  # Gbit/s each way through the node's NIC (None: its fastest link)

    def gpu_ids(self) -> list[str]:
        return [f"{self.name}:{i}" for i in range(self.count)]


@dataclass
class Cluster:
    name: str
    nodes: list[Node]
    default_gbps: float = 10.0
    links: dict[tuple[str, str], float] = field(default_factory=dict)  # unordered pair -> Gbit/s

    def __post_init__(self) -> None:
        self._by_name = {n.name: n for n in self.nodes}
        if len(self._by_name) != len(self.nodes):
            raise ValueError(f"cluster {self.name!r}: duplicate node names")
        # each NIC's rate, once: the LP's rows and the simulator's transfers ask for it many times
        self._nic = {n.name: n.nic_gbps if n.nic_gbps is not None else
                     max((self.gbps(n.name, o.name) for o in self.nodes if o is not n), default=math.inf)
                     for n in self.nodes}

    # --- construction -------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any], catalog: Catalog | None = None) -> Cluster:
        catalog = catalog or default_catalog()
        if not isinstance(d, dict) or not d.get("nodes"):
            raise ValueError("cluster spec needs a non-empty 'nodes' list")
        nodes = []
        for i, nd in enumerate(d["nodes"]):
            if not isinstance(nd, dict) or "gpu" not in nd:
                raise ValueError(f"cluster node #{i}: needs at least 'gpu' and 'count'")
            name = str(nd.get("name", f"n{i}"))
            if ":" in name:
                raise ValueError(f"node name {name!r} must not contain ':'")
            try:
                gpu = catalog.get(str(nd["gpu"]))
            except KeyError as exc:
                raise ValueError(f"node {name}: {exc.args[0]}") from None
            count = int(_number(nd.get("count", 1), f"node {name}: count", 1, integer=True))
            intra = _number(nd.get("intra_gbps", 128.0), f"node {name}: intra_gbps")
            price = _number(nd.get("price_per_gpu_hour", gpu.price), f"node {name}: price_per_gpu_hour", 0.0)
            nic = nd.get("nic_gbps")
            nodes.append(Node(name, gpu, count, intra, price,
                              None if nic is None else _number(nic, f"node {name}: nic_gbps")))
        net = d.get("network") or {}
        if not isinstance(net, dict):
            raise ValueError("cluster spec: 'network' must be a mapping (default_gbps, links)")
        default = _number(net.get("default_gbps", 10.0), "network: default_gbps")
        links: dict[tuple[str, str], float] = {}
        names = {n.name for n in nodes}
        for link in net.get("links") or []:
            if not isinstance(link, (list, tuple)) or len(link) != 3:
                raise ValueError(f"network link {link!r}: expected [nodeA, nodeB, gbps]")
            a, b, g = str(link[0]), str(link[1]), _number(link[2], f"network link {link!r}: gbps")
            if a not in names or b not in names:
                raise ValueError(f"network link {link!r}: unknown node")
            links[_pair(a, b)] = g
        return cls(str(d.get("name", "cluster")), nodes, default, links)

    @classmethod
    def from_yaml(cls, path: str | Path, catalog: Catalog | None = None) -> Cluster:
        with open(path) as f:
            data = yaml.safe_load(f)
        return cls.from_dict(data, catalog)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "nodes": [
                {"name": n.name, "gpu": n.gpu.name, "count": n.count, "intra_gbps": n.intra_gbps,
                 "price_per_gpu_hour": n.price_per_gpu_hour,
                 **({} if n.nic_gbps is None else {"nic_gbps": n.nic_gbps})}
                for n in self.nodes
            ],
            "network": {"default_gbps": self.default_gbps,
                        "links": [[a, b, g] for (a, b), g in sorted(self.links.items())]},
        }

    # --- queries ------------------------------------------------------------------------------
    def gpu_ids(self) -> list[str]:
        return [g for n in self.nodes for g in n.gpu_ids()]

    def node(self, name: str) -> Node:
        return self._by_name[name]

    def node_of(self, gpu_id: str) -> Node:
        return self._by_name[gpu_id.split(":", 1)[0]]

    def gbps(self, a: str, b: str) -> float:
        """Bandwidth between two nodes (or inside one node when a == b), Gbit/s."""
        if a == b:
            return self._by_name[a].intra_gbps
        return self.links.get(_pair(a, b), self.default_gbps)

    def nic_gbps(self, name: str) -> float:
        """The rate of node `name`'s NIC, each way, Gbit/s: its `nic_gbps`, or else its fastest link
        to another node (infinite for a cluster of one node, which has no inter-node transfers)."""
        return self._nic[name]

    def path_gbps(self, a: str, b: str) -> float:
        """What one transfer from node a to node b gets alone: the pair's link, or a slower NIC."""
        return min(gbps for _, gbps in self.transfer_resources(a, b))

    def transfer_resources(self, a: str, b: str) -> list[tuple[tuple[str, ...], float]]:
        """What a transfer from node a to node b occupies, each with its Gbit/s: the pair's link
        (`("link", a, b)`, names in order) and, between two nodes, a's NIC out (`("out", a)`) and b's NIC
        in (`("in", b)`), which all of a node's transfers that way share."""
        out: list[tuple[tuple[str, ...], float]] = [(("link", *_pair(a, b)), self.gbps(a, b))]
        if a != b:
            out += [(("out", a), self.nic_gbps(a)), (("in", b), self.nic_gbps(b))]
        return out

    def price_per_hour(self, gpu_ids: list[str] | None = None) -> float:
        ids = self.gpu_ids() if gpu_ids is None else gpu_ids
        return sum(self.node_of(g).price_per_gpu_hour for g in ids)

    @property
    def n_gpus(self) -> int:
        return sum(n.count for n in self.nodes)

    def peaks_per_dollar(self) -> dict[str, float]:
        """The cluster's summed datasheet peaks per $/h: dense FP16 TFLOP/s ("tflops"), memory
        bandwidth GB/s ("mem_gbps") and memory GB ("mem_gb"). Under the roofline cost model a
        request costs at least its FLOPs over the compute and its bytes over the bandwidth, so a
        cluster serves at most min(tflops / FLOPs, mem_gbps / bytes) requests per $/h: against a
        plan that runs another cluster at its roofline, the larger of the two ratios bounds the
        gain in goodput per $/h, before any link or replica costs."""
        price = self.price_per_hour()
        return {key: sum(getattr(n.gpu, key) * n.count for n in self.nodes) / price
                for key in ("tflops", "mem_gbps", "mem_gb")}


def _number(value: Any, what: str, least: float | None = None, integer: bool = False) -> float:
    """`value` as a number: above 0 (`least` None, for rates), or at least `least`; else a ValueError
    that names `what`."""
    if isinstance(value, str):  # YAML reads 1e3 (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            pass
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and integer:
        ok = float(value).is_integer()
    if ok:
        ok = value > 0 if least is None else value >= least
    if not ok:
        kind = "a whole number" if integer else "a number"
        bound = "above 0" if least is None else f">= {least:g}"
        raise ValueError(f"{what} must be {kind} {bound}, not {value!r}")
    return float(value)


def _pair(a: str, b: str) -> tuple[str, str]:
    return (a, b) if a <= b else (b, a)
