"""Lightweight re-scheduling: phases and routing only; failed replicas removed; layouts unchanged."""

from pathlib import Path

import pytest

from thunderserve.common.plan import Plan
from thunderserve.planner import Cluster, ModelSpec, Planner, Workload

CLUSTERS = Path(__file__).resolve().parents[2] / "deploy" / "clusters"


@pytest.fixture(scope="module")
def cloud():
    c = Cluster.from_yaml(CLUSTERS / "cloud-32.yaml")
    planner = Planner(c, ModelSpec.from_name("llama-13b"), Workload.from_name("conversation", rate=4.0))
    return planner, planner.solve(time_limit_s=3.0)


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
    # no shift, no failure: nothing to improve, phases stay
    same = planner.reschedule(plan)
    assert [(r.id, r.phase) for r in same.replicas] == [(r.id, r.phase) for r in plan.replicas]
    assert same.objective == pytest.approx(plan.objective, rel=1e-9)


def test_reschedule_is_fast(cloud):
    import time

    planner, plan = cloud
    fresh = Planner(planner.cluster, planner.model, planner.workload)  # no warm caches
    t = time.process_time()  # CPU time: robust to other jobs sharing the cores
    fresh.reschedule(plan, failed=[plan.decode_ids[0]])
    assert time.process_time() - t < 0.5  # benchmark target is 100 ms wall; loose here
