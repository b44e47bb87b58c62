"""The planner: two-level scheduling of a heterogeneous cluster (DESIGN.md §3).

Upper level (search.py): tabu search over GPU grouping and phase designation.
Lower level (here): per-group parallel configuration (parallel.py, cached per group composition and
phase) and the orchestration LP (orchestration.py). `score()` is the objective the search maximises.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable, Sequence

from thunderserve.common.plan import Plan, Replica, Stage

from . import costmodel as cm
from . import orchestration as orch
from .cluster import Cluster
from .colocated import best_colocated_layout, colocated_perf
from .model import ModelSpec
from .parallel import PHASES, GroupPerf, Layout, StageSpec, best_layout, evaluate_layout
from .workload import Workload

COLOCATED = "colocated"  # a group that runs both phases with chunked prefill (vLLM V1-style)
ALL_PHASES = (*PHASES, COLOCATED)
Signature = tuple[tuple[str, int], ...]  # (node, GPU count) per node: GPUs of a node are interchangeable
Progress = Callable[[int, float, float], None]  # (iteration, best score, elapsed s)


def plan_calibration(plan: Plan) -> cm.Calibration:
    """The cost-model calibration `plan` was made with (`plan --calibration`), else the default."""
    recorded = plan.meta.get("planner", {}).get("calibration")
    return cm.Calibration(**recorded) if recorded else cm.DEFAULT_CALIBRATION


class Planner:
    def __init__(self, cluster: Cluster, model: ModelSpec, workload: Workload, codec: str = "auto",
                 calibration: cm.Calibration | None = None, seed: int = 0, codec_tolerance: float = 0.01,
                 max_pp: int = 4, colocated: bool = False, token_budget: int = 512, **search_opts: int):
        if codec != "auto" and codec not in cm.CODECS:
            raise ValueError(f"codec must be auto or one of {', '.join(cm.CODECS)}")
        if token_budget < 1:
            raise ValueError("token_budget must be >= 1")
        self.cluster = cluster
        self.model = model
        self.workload = workload
        self.codec = codec
        self.calib = calibration or cm.DEFAULT_CALIBRATION
        self.seed = seed
        self.codec_tolerance = codec_tolerance  # "auto" accepts this fraction of goodput for less loss
        self.max_pp = max_pp
        # colocated: the search may also designate a group "colocated" (chunked prefill at `token_budget`
        # tokens per iteration and micro-batch); score() accepts the phase either way
        self.colocated = colocated
        self.token_budget = token_budget
        self.phases: tuple[str, ...] = ALL_PHASES if colocated else PHASES
        self.search_opts = search_opts
        self._node_rank = {n.name: i for i, n in enumerate(cluster.nodes)}
        self._groups: dict[tuple[Signature, str], GroupPerf | None] = {}
        self._fits: dict = {}  # layer fits per stage-hardware sequence (parallel.best_layout's cache)
        self._routes: dict[tuple, orch.Route] = {}
        self._scores: dict[tuple, float] = {}
        self._sigs: dict[tuple[str, ...], Signature] = {}
        self.lp_solves = 0

    @classmethod
    def from_plan(cls, plan: Plan) -> Planner:
        """The planner that made `plan` (cluster, model, workload, settings), from what the plan records."""
        meta = plan.meta
        missing = [k for k in ("cluster_spec", "model_spec", "workload_sample") if k not in meta]
        if missing or not plan.workload:
            raise ValueError(f"the plan does not say what it was made for (no {', '.join(missing) or 'workload'}); "
                             "make it with `thunderserve plan ... --json`")
        settings = meta.get("planner", {})
        return cls(Cluster.from_dict(meta["cluster_spec"]), ModelSpec(**meta["model_spec"]),
                   Workload.from_summary(plan.workload, meta["workload_sample"]), codec=settings.get("codec", "auto"),
                   seed=settings.get("seed", 0), max_pp=settings.get("max_pp", 4),
                   calibration=plan_calibration(plan), colocated=settings.get("colocated", False),
                   token_budget=settings.get("token_budget", meta.get("token_budget", 512)))

    # --- lower level: groups ---------------------------------------------------------------------
    def signature(self, group: Iterable[str]) -> Signature:
        if isinstance(group, tuple):  # the search's groups are tuples: memoise
            sig = self._sigs.get(group)
            if sig is None:
                sig = self._sigs[group] = self._signature(group)
            return sig
        return self._signature(group)

    def _signature(self, group: Iterable[str]) -> Signature:
        counts: dict[str, int] = {}
        for g in group:
            n = g.split(":", 1)[0]
            counts[n] = counts.get(n, 0) + 1
        return tuple(sorted(counts.items(), key=lambda kv: self._node_rank[kv[0]]))

    def _sig_perf(self, sig: Signature, phase: str) -> GroupPerf | None:
        key = (sig, phase)
        if key not in self._groups:
            ids = [f"{n}:{i}" for n, c in sig for i in range(c)]
            if phase == COLOCATED:
                found = best_colocated_layout(self.cluster, self.model, self.workload, ids, self.calib, self.max_pp,
                                              self.token_budget, self._fits)
                perf = self._colocated_group(found[0], found[1]) if found else None
            else:
                perf = best_layout(self.cluster, self.model, self.workload, ids, phase, self.calib, self.max_pp,
                                   cache=self._fits)
            self._groups[key] = perf if perf is not None and perf.capacity > 0 else None
        return self._groups[key]

    def _colocated_group(self, layout: Layout, c) -> GroupPerf:  # c: colocated.ColocatedPerf
        return GroupPerf(layout, COLOCATED, c.capacity, c.capacity * self.workload.output_mean, latency=c.latency,
                         service=c.service, tpot=c.tpot, sequences=c.sequences)

    def colocated_layout_perf(self, layout: Layout) -> GroupPerf:
        """A fixed layout's colocated (chunked) performance, as `evaluate_layout` for the other phases."""
        c = colocated_perf(self.model, layout.hw(self.cluster), self.workload, self.calib, self.token_budget)
        return self._colocated_group(layout, c)

    def capacity(self, group: Iterable[str], phase: str) -> float:
        perf = self._sig_perf(self.signature(group), phase)
        return perf.capacity if perf else 0.0

    def group_perf(self, group: Sequence[str], phase: str) -> GroupPerf | None:
        """Best layout of this group for the phase, on its actual GPU ids (None: cannot serve it)."""
        perf = self._sig_perf(self.signature(group), phase)
        if perf is None:
            return None
        by_node: dict[str, list[str]] = {}
        for g in sorted(group, key=_gpu_key):
            by_node.setdefault(g.split(":", 1)[0], []).append(g)
        return _with_layout(perf, perf.layout.remap(by_node))

    # --- lower level: orchestration -----------------------------------------------------------------
    def _route(self, codec: str) -> Callable[[orch.ReplicaLoad, orch.ReplicaLoad], orch.Route]:
        def fn(p: orch.ReplicaLoad, d: orch.ReplicaLoad) -> orch.Route:
            key = (p.layer_map, p.latency, p.service, p.service2, d.layer_map, d.tpot, codec)
            r = self._routes.get(key)
            if r is None:
                r = orch.route_metrics(self.cluster, self.model, self.workload, p, d, codec, self.calib)
                self._routes[key] = r
            return r
        return fn

    @staticmethod
    def _loads(items: Sequence[tuple[str, GroupPerf]]) -> tuple[list[orch.ReplicaLoad], list[orch.ReplicaLoad]]:
        pre, dec = [], []
        for rid, perf in items:
            if perf.phase == COLOCATED:  # outside the LP: takes its own requests
                continue
            load = orch.ReplicaLoad(rid, perf.capacity, perf.layout.layer_map(), perf.latency, perf.service,
                                    perf.service2, perf.latencies, perf.tpot)
            (pre if perf.phase == "prefill" else dec).append(load)
        return pre, dec

    def orchestrate(self, items: Sequence[tuple[str, GroupPerf]], codec: str) -> orch.Orchestration:
        pre, dec = self._loads(items)
        return self._solve_lp(pre, dec, codec)

    def _solve_lp(self, pre: list[orch.ReplicaLoad], dec: list[orch.ReplicaLoad], codec: str) -> orch.Orchestration:
        self.lp_solves += 1
        return orch.solve(self.cluster, pre, dec, self._route(codec), self.calib)

    def _route_bound(self, pre: list[orch.ReplicaLoad], dec: list[orch.ReplicaLoad], codec: str) -> float:
        """Upper bound on the LP's rate from the route capacities alone (no LP): each prefill replica
        ships at most its best route's capacity (its time constraint), and only decode replicas some
        route reaches count."""
        fn = self._route(codec)
        pre_cap, reached = 0.0, set()
        for p in pre:
            if p.capacity <= 0:
                continue
            best = 0.0
            for j, d in enumerate(dec):
                if d.capacity > 0:
                    c = fn(p, d).cap
                    if c > 0:
                        reached.add(j)
                        best = max(best, c)  # split over routes: sum x/cap <= 1
            pre_cap += best
        return min(pre_cap, sum(dec[j].capacity for j in reached))

    def choose_codec(self, items: Sequence[tuple[str, GroupPerf]]) -> tuple[str, orch.Orchestration]:
        """The KV codec and the LP result for these replicas.

        "auto": compression only shrinks transfer bytes, so int4 reaches the highest rate; take the
        least lossy codec (none, then int8) whose rate is within `codec_tolerance` of it. A codec whose
        route-capacity bound already falls short of that skips its LP (same answer, fewer solves).
        """
        pre, dec = self._loads(items)
        if self.codec != "auto":
            return self.codec, self._solve_lp(pre, dec, self.codec)
        best = self._solve_lp(pre, dec, "int4")
        if best.rate <= 0:
            return "int4", best
        need = best.rate * (1 - self.codec_tolerance)
        for codec in ("none", "int8"):
            if self._route_bound(pre, dec, codec) < need * (1 - 1e-6):
                continue
            res = self._solve_lp(pre, dec, codec)
            if res.rate >= need:
                return codec, res
        return "int4", best

    def items_bound(self, items: Sequence[tuple[str, GroupPerf]]) -> float:
        """Upper bound on choose_codec(items)'s rate from route capacities alone (no LP)."""
        pre, dec = self._loads(items)
        return self._route_bound(pre, dec, "int4" if self.codec == "auto" else self.codec)

    def route_bound(self, groups: Sequence[Sequence[str]], phases: Sequence[str]) -> float:
        """Upper bound on score() tighter than bound(): route capacities (KV transfer time counted in
        TTFT) at the most compressed codec allowed, no LP. The score itself when already known."""
        key, parts = self._key(groups, phases)
        if key in self._scores:
            return self._scores[key]
        items = [(f"g{i}", self._sig_perf(sig, ph)) for i, (sig, ph) in enumerate(parts)]
        return self.items_bound(items) + _colocated_rate(items)  # type: ignore[arg-type]

    # --- the objective -----------------------------------------------------------------------------
    def _key(self, groups: Sequence[Sequence[str]], phases: Sequence[str]) -> tuple[tuple, list]:
        if len(groups) != len(phases):
            raise ValueError("groups and phases differ in length")
        parts = []
        for g, ph in zip(groups, phases, strict=True):
            if ph not in ALL_PHASES:
                raise ValueError(f"unknown phase {ph!r}")
            sig = self.signature(g)
            if self._sig_perf(sig, ph) is not None:  # groups that cannot serve their phase are idle
                parts.append((sig, ph))
        return tuple(sorted(parts)), parts

    def bound(self, groups: Sequence[Sequence[str]], phases: Sequence[str]) -> float:
        """Upper bound on score(): min(total prefill capacity, total decode capacity) + colocated capacity."""
        pre = dec = colo = 0.0
        for g, ph in zip(groups, phases, strict=True):
            c = self.capacity(g, ph)
            if ph == "prefill":
                pre += c
            elif ph == "decode":
                dec += c
            else:
                colo += c
        return min(pre, dec) + colo

    def score(self, groups: Sequence[Sequence[str]], phases: Sequence[str]) -> float:
        """SLO-meeting request rate (req/s) this grouping and phase designation sustains; 0 if infeasible:
        the LP's disaggregated rate plus the colocated groups' capacities (they take requests directly)."""
        key, parts = self._key(groups, phases)
        if key in self._scores:
            return self._scores[key]
        items = [(f"g{i}", self._sig_perf(sig, ph)) for i, (sig, ph) in enumerate(parts)]
        colo = _colocated_rate(items)  # type: ignore[arg-type]
        disagg = [it for it in items if it[1].phase != COLOCATED]  # type: ignore[union-attr]
        val = (self.choose_codec(disagg)[1].rate if disagg else 0.0) + colo  # type: ignore[arg-type]
        self._scores[key] = val
        return val

    # --- the search --------------------------------------------------------------------------------
    def solve(self, time_limit_s: float | None = None, progress: Progress | None = None) -> Plan:
        from .search import tabu_search  # search imports this module's types

        t0 = time.monotonic()
        res = tabu_search(self, time_limit_s=time_limit_s, progress=progress, seed=self.seed,
                          **self.search_opts)
        plan = self.build_plan(res.groups, res.phases)
        plan.meta.update({"method": "tabu", "iterations": res.iterations, "lp_solves": self.lp_solves,
                          "layouts_evaluated": len(self._groups), "search_s": round(time.monotonic() - t0, 3)})
        return plan

    # --- plans -------------------------------------------------------------------------------------
    def build_plan(self, groups: Sequence[Sequence[str]], phases: Sequence[str], epoch: int = 1,
                   ids: Sequence[str] | None = None, perfs: Sequence[GroupPerf | None] | None = None,
                   solved: tuple[str, orch.Orchestration] | None = None) -> Plan:
        """Turn a grouping + phases (or fixed per-group perfs) into a Plan, choosing the KV codec.
        `solved`: choose_codec's answer for exactly these serving replicas, if the caller has it."""
        if perfs is None:
            perfs = [self.group_perf(list(g), ph) for g, ph in zip(groups, phases, strict=True)]
        if ids is None:  # number the replicas that serve, in order
            n = iter(range(len(perfs)))
            ids = [f"r{next(n)}" if p is not None and p.capacity > 0 else "" for p in perfs]
        items = [(rid, p) for rid, p in zip(ids, perfs, strict=True) if p is not None and p.capacity > 0]
        disagg = [it for it in items if it[1].phase != COLOCATED]
        best_codec, result = solved if solved is not None else self.choose_codec(disagg)
        replicas: list[Replica] = []
        used: set[str] = set()
        for rid, perf in items:
            gpus = list(perf.layout.gpus)
            used |= set(gpus)
            replicas.append(self._replica(rid, perf, gpus))
        unused = [g for g in self.cluster.gpu_ids() if g not in used]
        pre_ids = [r.id for r in replicas if r.phase == "prefill"]
        dec_ids = [r.id for r in replicas if r.phase == "decode"]
        colo = {r.id: r.capacity for r in replicas if r.phase == COLOCATED}
        objective = result.rate + sum(colo.values())
        dispatch = result.dispatch(pre_ids)
        if colo:  # one dispatch over both kinds: the LP's flow and each colocated replica's capacity
            dispatch = {k: v / objective for k, v in
                        ({p: x * result.rate for p, x in dispatch.items()} | colo).items()}
        goodput = min(self.workload.rate, objective)
        extra = {"token_budget": self.token_budget} if colo else {}  # the colocated replicas' chunk budget
        return Plan(
            replicas=replicas,
            dispatch=dispatch,
            routing=result.routing(pre_ids, dec_ids),
            kv_codec=best_codec,
            epoch=epoch,
            model=self.model.name,
            model_layers=self.model.layers,
            cluster=self.cluster.name,
            objective=objective,
            predicted_goodput=goodput,
            predicted_tokens_per_s=goodput * self.workload.output_mean,
            price_per_hour=round(sum(r.price_per_hour for r in replicas), 4),
            workload=self.workload.summary(),
            unused_gpus=unused,
            first_token_from_decode=sorted(f"{p}->{d}" for (p, d), r in result.routes.items()
                                           if r.first_from_decode and (p, d) in result.flows),
            meta={"cluster_price_per_hour": round(self.cluster.price_per_hour(), 4),
                  "cluster_spec": self.cluster.to_dict(),
                  # what `Planner.from_plan` needs to re-plan this plan later (e.g. a live planner)
                  "model_spec": dataclasses.asdict(self.model),
                  "workload_sample": self.workload.sample(),
                  "planner": {"codec": self.codec, "max_pp": self.max_pp, "seed": self.seed,
                              "colocated": self.colocated, "token_budget": self.token_budget,
                              **({"calibration": dataclasses.asdict(self.calib)}
                                 if self.calib != cm.DEFAULT_CALIBRATION else {})},
                  **extra,
                  "kv_transfer_s": {f"{p}->{d}": round(r.transfer_s, 4) for (p, d), r in result.routes.items()
                                    if (p, d) in result.flows},
                  # at the objective rate, the most loaded first (the LP keeps each at most link_util_max)
                  "network_load": {k: round(v, 3) for k, v in sorted(result.network_load.items(), key=lambda kv: -kv[1])
                                   if v >= 0.005}},
        )

    def _replica(self, rid: str, perf: GroupPerf, gpus: list[str]) -> Replica:
        stages = [Stage(list(s.gpus), s.tp, s.layer_start, s.layer_end, s.node, self.cluster.node(s.node).gpu.name)
                  for s in perf.layout.stages]
        return Replica(id=rid, phase=perf.phase, gpus=gpus, stages=stages, capacity=perf.capacity,
                       tokens_per_s=perf.tokens_per_s, price_per_hour=round(self.cluster.price_per_hour(gpus), 4),
                       latency_s=perf.latency, tpot_s=perf.tpot, max_sequences=perf.sequences)

    # --- lightweight re-scheduling -------------------------------------------------------------------
    def reschedule(self, plan: Plan, workload: Workload | None = None, failed: Iterable[str] = ()) -> Plan:
        """Re-decide phases and orchestration only: grouping and layouts stay (no weights move).

        `failed` holds replica ids or GPU ids; a replica with a failed GPU is dropped.
        """
        if workload is not None and workload is not self.workload:
            other = Planner(self.cluster, self.model, workload, self.codec, self.calib, self.seed,
                            self.codec_tolerance, self.max_pp, self.colocated, self.token_budget,
                            **self.search_opts)
            return other.reschedule(plan, None, failed)
        failed = set(failed)
        keep = [r for r in plan.replicas if r.id not in failed and not (set(r.gpus) & failed)]
        # Every replica may flip between the planner's phases (colocated too, when it allows colocated groups);
        # a colocated replica in a plan made without them stays colocated (re-evaluated for the workload).
        colo = [r for r in keep if r.phase == COLOCATED and not self.colocated]
        flex = [r for r in keep if r not in colo]
        # a fixed layout's capacity in each phase (cheap: no layout search)
        perf = {(r.id, ph): evaluate_layout(self.cluster, self.model, self.workload, layout_of(r), ph, self.calib)
                for r in flex for ph in PHASES}
        perf |= {(r.id, COLOCATED): self.colocated_layout_perf(layout_of(r)) for r in flex if self.colocated}
        from .search import phase_search

        memo: dict[tuple[str, ...], tuple[str, orch.Orchestration]] = {}
        phases = phase_search(self, [r.id for r in flex], perf, [r.phase for r in flex], memo=memo)
        # the final designation's LP is in the memo: phase_search's items are build_plan's disaggregated
        # ones (same replicas, same order, capacity > 0)
        chosen = {r.id: perf[(r.id, ph)] for r, ph in zip(flex, phases, strict=True)}
        chosen |= {r.id: self.colocated_layout_perf(layout_of(r)) for r in colo}
        new = self.build_plan([list(r.gpus) for r in keep], [chosen[r.id].phase for r in keep],
                              epoch=plan.epoch + 1, ids=[r.id for r in keep], perfs=[chosen[r.id] for r in keep],
                              solved=memo.get(tuple(phases)))
        # replicas that serve neither phase stay out of the plan but keep their (unchanged) layout
        new.meta["rescheduled_from"] = plan.epoch
        new.meta["failed"] = sorted(failed)
        return new


def _colocated_rate(items: Sequence[tuple[str, GroupPerf]]) -> float:
    return sum(p.capacity for _, p in items if p.phase == COLOCATED)


def _with_layout(perf: GroupPerf, layout: Layout) -> GroupPerf:
    return dataclasses.replace(perf, layout=layout)


def layout_of(r: Replica) -> Layout:
    return Layout(tuple(StageSpec(s.node or s.gpus[0].split(":", 1)[0], tuple(s.gpus), s.tp, s.layer_start,
                                  s.layer_end) for s in r.stages))


def _gpu_key(g: str) -> tuple[str, int]:
    node, _, idx = g.rpartition(":")
    return (node, int(idx) if idx.isdigit() else 0)
