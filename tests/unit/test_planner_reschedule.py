"""Lightweight re-scheduling: phases and routing only; failed replicas removed; layouts unchanged."""

from pathlib import Path

import pytest

from thunderserve.common.plan import Plan
from thunderserve.planner import Cluster, ModelSpec, Planner, Workload

CLUSTERS = Path(__file__).resolve().parents[2] / "deploy" / "clusters"


@pytest.fixture(scope="module")
def cloud():
    c = Cluster.from_yaml(CLUSTERS / "cloud-32.yaml")
    # an iteration cap, not a time limit: the plan must not depend on the machine's load
    planner = Planner(c, ModelSpec.from_name("llama-13b"), Workload.from_name("conversation", rate=4.0),
                      max_iters=12, restarts=0)
    return planner, planner.solve()


def _layout(r):
    return (tuple(r.gpus), tuple((tuple(s.gpus), s.tp, s.layer_start, s.layer_end) for s in r.stages))


def test_reschedule_after_failure(cloud):
    planner, plan = cloud
    plan.validate()
    assert len(plan.decode_ids) >= 2
    victim = plan.decode_ids[0]
    new = planner.reschedule(plan, failed=[victim])
    new.validate()
    assert new.epoch == plan.epoch + 1
    assert victim not in {r.id for r in new.replicas}
    assert victim not in new.dispatch and all(victim not in row for row in new.routing.values())
    before = {r.id: _layout(r) for r in plan.replicas}
    for r in new.replicas:
        assert _layout(r) == before[r.id]  # same GPUs, same stages, same layer ranges
    assert 0 < new.objective <= plan.objective + 1e-9
    assert set(new.prefill_ids) and set(new.decode_ids)


def test_reschedule_by_failed_gpu_and_survives_json(cloud):
    planner, plan = cloud
    gpu = plan.replicas[0].gpus[0]
    new = planner.reschedule(Plan.from_json(plan.to_json()), failed=[gpu])
    new.validate()
    assert plan.replicas[0].id not in {r.id for r in new.replicas}
    assert gpu not in {g for r in new.replicas for g in r.gpus}


def test_reschedule_follows_workload_shift(cloud):
    planner, plan = cloud
    code = Workload.from_name("code", rate=4.0)
    new = planner.reschedule(plan, workload=code)
    new.validate()
    before = {r.id: _layout(r) for r in plan.replicas}
    assert all(_layout(r) == before[r.id] for r in new.replicas)
    share = lambda p: len(p.prefill_ids) / len(p.replicas)  # noqa: E731
    assert share(new) >= share(plan)
    # no shift, no failure: flips only where they gain (the fixture's search is capped, so its plan
    # need not be flip-optimal for the fixed layouts), and once there, nothing to improve: phases stay
    same = planner.reschedule(plan)
    assert same.objective >= plan.objective * (1 - 1e-9)
    again = planner.reschedule(same)
    assert [(r.id, r.phase) for r in again.replicas] == [(r.id, r.phase) for r in same.replicas]
    assert again.objective == pytest.approx(same.objective, rel=1e-9)


def test_reschedule_is_fast(cloud):
    import time

    planner, plan = cloud
    fresh = Planner(planner.cluster, planner.model, planner.workload)  # no warm caches
    t = time.process_time()  # CPU time: robust to other jobs sharing the cores
    fresh.reschedule(plan, failed=[plan.decode_ids[0]])
    assert time.process_time() - t < 0.5  # benchmark target is 100 ms wall; loose here


# --- issue 4: the pruned phase search + LP reuse must not change what reschedule returns -------------
FIXED_GROUPS = [["l40:3", "a40a:0", "a40a:1"], ["a40a:2", "a40a:3", "a40b:0", "a40b:3"],
                ["l40:1", "l40:2", "a40b:1", "a40b:2"], ["a5k:0", "a5k:1", "a5k:2", "a5k:3"],
                ["a6ka:0", "a6ka:1", "a6ka:2", "a6ka:3"], ["a6kb:0", "a6kb:1", "a6kb:2", "a6kb:3"],
                ["l40:0"], [f"r3090{x}:{i}" for x in "ab" for i in range(4)]]
FIXED_PHASES = ["prefill"] * 3 + ["decode"] * 3 + ["prefill", "decode"]


def _reference(planner, plan, failed=()):
    """The re-scheduling algorithm before the LP-saving changes: every codec's LP solved, every flip
    above the capacity bound scored (no route-capacity pruning)."""
    from thunderserve.planner.parallel import PHASES, evaluate_layout
    from thunderserve.planner.planner import layout_of

    def choose(items):
        best = planner.orchestrate(items, "int4")
        if best.rate <= 0:
            return "int4", best
        for codec in ("none", "int8"):
            res = planner.orchestrate(items, codec)
            if res.rate >= best.rate * (1 - planner.codec_tolerance):
                return codec, res
        return "int4", best

    keep = [r for r in plan.replicas if r.id not in failed and not (set(r.gpus) & set(failed))]
    ids = [r.id for r in keep]
    perf = {(r.id, ph): evaluate_layout(planner.cluster, planner.model, planner.workload, layout_of(r), ph,
                                        planner.calib) for r in keep for ph in PHASES}
    other = {"prefill": "decode", "decode": "prefill"}
    cache = {}

    def solved(ph):
        if ph not in cache:
            cache[ph] = choose([(r, perf[(r, p)]) for r, p in zip(ids, ph) if perf[(r, p)].capacity > 0])
        return cache[ph]

    def bound(ph):
        pre = sum(perf[(r, p)].capacity for r, p in zip(ids, ph) if p == "prefill")
        return min(pre, sum(perf[(r, p)].capacity for r, p in zip(ids, ph) if p == "decode"))

    cur = tuple(r.phase for r in keep)
    cur_score = solved(cur)[1].rate
    while True:
        best, best_score = None, cur_score * (1 + 1e-6)
        for b, c in sorted(((bound(c), c) for c in (cur[:i] + (other[cur[i]],) + cur[i + 1:]
                                                     for i in range(len(cur)))), reverse=True):
            if b <= best_score:
                break
            if solved(c)[1].rate > best_score:
                best, best_score = c, solved(c)[1].rate
        if best is None:
            break
        cur, cur_score = best, best_score
    codec, res = solved(cur)
    pre = [r for r, p in zip(ids, cur) if p == "prefill" and perf[(r, p)].capacity > 0]
    dec = [r for r, p in zip(ids, cur) if p == "decode" and perf[(r, p)].capacity > 0]
    return list(zip(ids, cur)), codec, res.rate, res.routing(pre, dec), res.dispatch(pre)


@pytest.fixture(scope="module")
def fixed():
    c = Cluster.from_yaml(CLUSTERS / "cloud-32.yaml")
    planner = Planner(c, ModelSpec.from_name("llama-13b"), Workload.from_name("conversation", rate=4.0))
    return planner, planner.build_plan(FIXED_GROUPS, FIXED_PHASES)


@pytest.mark.parametrize("case", ["failure", "shift", "shift+failure", "two-failures", "nothing"])
def test_reschedule_matches_the_unpruned_reference(fixed, case):
    planner, plan = fixed
    code = Workload.from_name("code", rate=4.0)
    workload = code if case.startswith("shift") else None
    failed = {"failure": ["r7"], "shift+failure": ["r4"], "two-failures": ["r0", "r3"]}.get(case, [])
    new = Planner(planner.cluster, planner.model, planner.workload).reschedule(plan, workload=workload,
                                                                               failed=failed)
    ref_planner = Planner(planner.cluster, planner.model, workload or planner.workload)
    phases, codec, rate, routing, dispatch = _reference(ref_planner, plan, failed)
    serving = {p for p, _ in phases if p in {r.id for r in new.replicas}}
    assert [(r.id, r.phase) for r in new.replicas] == [(r, p) for r, p in phases if r in serving]
    assert new.kv_codec == codec
    assert new.objective == pytest.approx(rate, rel=1e-12)
    assert new.dispatch == pytest.approx(dispatch, rel=1e-9, abs=1e-12)
    assert new.routing.keys() == routing.keys()
    for p, row in routing.items():
        assert new.routing[p] == pytest.approx(row, rel=1e-9, abs=1e-12)
    if case == "shift":  # the workload shift really moves phases
        assert [r.phase for r in new.replicas] != [r.phase for r in plan.replicas]
