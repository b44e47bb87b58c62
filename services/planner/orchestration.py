"""Lower level, step 2: orchestration as a two-stage transportation LP (scipy HiGHS).

Stage 1 ships requests from the dispatcher to prefill replicas, stage 2 ships prefilled requests to
decode replicas. A flow x[p, d] (requests/s prefilled on p and decoded on d) pays the KV transfer
between them twice over:
  * in latency: the first token leaves the prefill replica before its KV moves, so the transfer
    delays the second token; the requests whose TPOT that breaks use up part of p's miss budget on
    that route, so p's capacity on route (p, d) is cap[p, d];
  * in bandwidth: every node pair's link carries at most its bandwidth of KV bytes per second, and
    every node's NIC at most its rate out of the node and, separately, into it.

    maximise  sum x[p, d]
    s.t.      sum_d x[p, d] / cap[p, d]            <= 1    for each prefill replica p (its time)
              sum_p x[p, d]                        <= C_d  for each decode replica d
              sum_{p,d} x[p, d] * bytes_ab[p, d]   <= B_ab for each node pair / node (a, b)
              sum_{p,d} x[p, d] * bytes_a.[p, d]   <= N_a  for each node a's NIC, out (and likewise in)
              x >= 0

The optimum is the SLO-meeting request rate the plan sustains; the flows give the dispatch weights
and the prefill->decode routing matrix.
"""

from __future__ import annotations

import bisect
import functools
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import linprog

from . import costmodel as cm
from .cluster import Cluster
from .model import ModelSpec
from .workload import Workload

LayerMap = tuple[tuple[str, int, int], ...]  # (node, first layer, end layer) per stage


@dataclass(frozen=True)
class ReplicaLoad:
    """What the LP needs to know about one replica."""

    id: str
    capacity: float  # req/s; prefill: before KV-transfer time
    layer_map: LayerMap
    latency: float = 0.0  # prefill: latency at the attainment-quantile prompt
    service: float = 0.0  # prefill: s per prompt, E[S]
    service2: float = 0.0  # prefill: E[S^2] (0: deterministic, service^2)
    latencies: tuple[float, ...] = ()  # prefill: latency at each of the workload's prompt points
    tpot: float = 0.0  # decode: time per output token at full batch (0: unknown, taken as 0)


@dataclass(frozen=True)
class Route:
    cap: float  # req/s the prefill replica can send on this route within the TTFT SLO
    transfer_s: float  # KV transfer time of an attainment-quantile prompt
    link_bytes: tuple[tuple[tuple[str, str], float], ...]  # (from node, to node) -> KV bytes per (mean) request
    first_from_decode: bool = False  # the first token waits for the KV and leaves from the decode side


@dataclass
class Orchestration:
    rate: float  # req/s sustained within SLOs (the objective)
    flows: dict[tuple[str, str], float] = field(default_factory=dict)
    routes: dict[tuple[str, str], Route] = field(default_factory=dict)
    # share of each link's and NIC's bandwidth the flows' KV takes ("link a-b", "a out", "b in")
    network_load: dict[str, float] = field(default_factory=dict)

    def dispatch(self, prefill_ids: list[str]) -> dict[str, float]:
        out = {p: sum(f for (pp, _), f in self.flows.items() if pp == p) for p in prefill_ids}
        total = sum(out.values())
        return {p: (v / total if total > 0 else 0.0) for p, v in out.items()}

    def routing(self, prefill_ids: list[str], decode_ids: list[str]) -> dict[str, dict[str, float]]:
        table: dict[str, dict[str, float]] = {}
        for p in prefill_ids:
            row = {d: self.flows.get((p, d), 0.0) for d in decode_ids}
            row = {d: v for d, v in row.items() if v > 1e-12}
            tot = sum(row.values())
            if tot > 0:
                table[p] = {d: v / tot for d, v in row.items()}
            else:  # idle prefill replica: still give the router somewhere to send (fail-over)
                cands = [(r.cap, d) for (pp, d), r in self.routes.items() if pp == p and r.cap > 0]
                table[p] = {max(cands)[1]: 1.0} if cands else {}
        return table


def transfer_miss(tx: tuple[float, ...] | list[float], tpot_slo: float, tpot: float,
                  output_points: tuple[float, ...] | list[float]) -> float:
    """Fraction of requests whose TPOT the KV transfer alone breaks. The first token leaves the prefill
    replica before its KV moves (services/prefill/role.py), so the transfer (with its link wait) sits
    between the first and second tokens: an output of o tokens tolerates (tpot_slo - tpot) * (o - 1) of
    it; an output of one token moves no KV. `tx` holds the transfer time of each prompt point (equal
    weights), independent of the output length."""
    if not tx or not output_points:
        return 0.0
    slack = sorted((tpot_slo - tpot) * (o - 1.0) for o in output_points if o > 1.0)
    miss = sum(bisect.bisect_left(slack, x) for x in tx)  # slack values below each transfer time
    return miss / (len(tx) * len(output_points))


def route_metrics(cluster: Cluster, model: ModelSpec, workload: Workload, p: ReplicaLoad, d: ReplicaLoad,
                  codec: str, calib: cm.Calibration = cm.DEFAULT_CALIBRATION) -> Route:
    """KV bytes per node pair and transfer time of route p -> d (layer l's KV goes from the node
    holding layer l on p to the node holding it on d; node pairs transfer in parallel).

    Where the first token leaves from decides what the transfer costs, and the route takes the better:
      * from the prefill replica, before the KV moves (what services/prefill/role.py does): TTFT
        budget = SLO - latency; the transfer delays the second token, and the requests whose TPOT it
        breaks (`transfer_miss`: short outputs behind a slow link) come out of the route's miss budget;
      * from the decode side once the KV has landed (`first_from_decode`): TTFT budget = SLO - latency
        - transfer (+ link wait), TPOT untouched - better when short outputs cross a slow link."""
    ranges: dict[tuple[str, str], list[tuple[int, int]]] = {}
    for na, a0, a1 in p.layer_map:
        for nb, b0, b1 in d.layer_map:
            if min(a1, b1) > max(a0, b0):
                ranges.setdefault((na, nb), []).append((max(a0, b0), min(a1, b1)))
    t = 0.0
    link_bytes = []
    pts = workload.prompt_points if p.latencies else ()
    tx = [0.0] * len(pts)  # each prompt point's KV arrival after its prefill's end (node pairs in parallel)
    t_wait = 0.0  # the same for the prompt_q transfer, link wait included (no prompt points)
    rho_l = calib.link_util_max
    for (a, b), spans in sorted(ranges.items()):
        n = sum(hi - lo for lo, hi in spans)
        gbps = cluster.path_gbps(a, b)
        after = functools.partial(cm.streamed_transfer_after, model, runs=cm.run_layers(model, spans, codec, calib),
                                  gbps=gbps, codec=codec, calib=calib)  # (tokens, latency=...): what is left
        # of the transfer after the prefill (the runs stream during the pass)
        tq = cm.kv_transfer_time(model, workload.prompt_q, n, gbps, codec, calib)  # the link's busy time
        aq = after(workload.prompt_q, latency=p.latency)
        t = max(t, aq)
        times = [cm.kv_transfer_time(model, x, n, gbps, codec, calib) for x in pts]
        if times and rho_l < 1:  # queueing on the link (FIFO) at the LP's load cap: M/G/1 mean wait
            t1 = sum(times) / len(times)
            wait = cm.mg1_wait(rho_l / t1, t1, sum(x * x for x in times) / len(times))
            for i, x in enumerate(pts):
                tx[i] = max(tx[i], after(x, latency=p.latencies[i]) + wait)
        elif rho_l < 1:
            t_wait = max(t_wait, aq + cm.mg1_wait(rho_l / tq, tq, tq * tq))
        link_bytes.append(((a, b), cm.kv_transfer_bytes(model, workload.prompt_mean, n, codec)))
    target = cm.split_attainment(workload.attainment, calib.ttft_miss_share)
    miss = transfer_miss(tx if pts else ([t_wait or t] if ranges else []), workload.tpot_slo, d.tpot,
                         workload.output_points)
    s2 = p.service2 if p.service2 > 0 else p.service * p.service
    if target + miss >= 1.0:
        cap = 0.0
    elif pts:  # per prompt length: TTFT = M/G/1 wait + its own latency
        cap = cm.prefill_capacity_dist([workload.ttft_slo - lat for lat in p.latencies], p.service, s2,
                                       target + miss)
    else:
        cap = cm.prefill_capacity(p.latency, p.service, workload.ttft_slo, 0.0, target + miss, s2)
    if miss > 0:  # the first token could instead wait for the KV: TTFT pays what is left of the transfer
        if pts:
            hold = cm.prefill_capacity_dist([workload.ttft_slo - lat - x for lat, x in zip(p.latencies, tx,
                                                                                          strict=True)],
                                            p.service, s2, target)
        else:
            hold = cm.prefill_capacity(p.latency, p.service, workload.ttft_slo, t_wait or t, target, s2)
        if hold > cap:
            return Route(hold, t, tuple(link_bytes), True)
    return Route(cap, t, tuple(link_bytes))


def upper_bound(prefills: list[ReplicaLoad], decodes: list[ReplicaLoad]) -> float:
    """No plan beats min(total prefill capacity, total decode capacity): prunes LP solves."""
    return min(sum(p.capacity for p in prefills), sum(d.capacity for d in decodes))


def solve(cluster: Cluster, prefills: list[ReplicaLoad], decodes: list[ReplicaLoad],
          route_fn, calib: cm.Calibration = cm.DEFAULT_CALIBRATION) -> Orchestration:
    """Solve the LP. `route_fn(p, d) -> Route` (cached by the caller) supplies route costs."""
    prefills = [p for p in prefills if p.capacity > 0]
    decodes = [d for d in decodes if d.capacity > 0]
    if not prefills or not decodes:
        return Orchestration(0.0)
    routes: dict[tuple[str, str], Route] = {}
    cols: list[tuple[int, int]] = []
    for i, p in enumerate(prefills):
        for j, d in enumerate(decodes):
            r = route_fn(p, d)
            routes[(p.id, d.id)] = r
            if r.cap > 0:
                cols.append((i, j))
    if not cols:
        return Orchestration(0.0, routes=routes)
    # one row per link (node pair) and per NIC direction a transfer uses: ("link", a, b), ("out", a), ("in", b);
    # per column, the seconds of each one's time a request takes
    rows: dict[tuple[str, ...], int] = {}
    busy = [[(rows.setdefault(key, len(rows)), nbytes / cm.gbps_to_Bps(gbps, calib))
             for (a, b), nbytes in routes[(prefills[i].id, decodes[j].id)].link_bytes
             for key, gbps in cluster.transfer_resources(a, b)] for i, j in cols]
    n_p, n_d = len(prefills), len(decodes)
    A = np.zeros((n_p + n_d + len(rows), len(cols)))
    b = np.ones(A.shape[0])
    b[n_p + n_d:] = calib.link_util_max  # links and NICs are FIFO servers: keep their queues short
    for c, (i, j) in enumerate(cols):
        A[i, c] = 1.0 / routes[(prefills[i].id, decodes[j].id)].cap
        A[n_p + j, c] = 1.0 / decodes[j].capacity  # rows scaled to "fraction of capacity used"
        for row, seconds in busy[c]:
            A[n_p + n_d + row, c] += seconds
    res = linprog(-np.ones(len(cols)), A_ub=A, b_ub=b, bounds=(0, None), method="highs")
    if res.status != 0:
        return Orchestration(0.0, routes=routes)
    flows = {(prefills[i].id, decodes[j].id): float(x) for (i, j), x in zip(cols, res.x, strict=True)
             if x > 1e-12}
    used = A[n_p + n_d:] @ res.x
    load = {(f"link {key[1]}-{key[2]}" if key[0] == "link" else f"{key[1]} {key[0]}"): float(u)
            for key, u in zip(rows, used, strict=True)}
    return Orchestration(float(-res.fun), flows, routes, load)
