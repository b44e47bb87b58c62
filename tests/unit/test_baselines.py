"""Baselines: colocated capacity model, plan shapes, fairness rules, and the simulator's colocated replicas."""

import pytest

from thunderserve.common.plan import Plan
from thunderserve.planner import Cluster, ModelSpec, Workload
from thunderserve.planner import baselines as bl
from thunderserve.planner import costmodel as cm
from thunderserve.planner.simulator import SLO, SimConfig, Simulator, find_goodput, poisson_requests, trace_requests

SERVER = Cluster.from_dict({"name": "s4", "nodes": [{"name": "n", "gpu": "A100-80G", "count": 4,
                                                       "intra_gbps": 2400}]})
HETERO = Cluster.from_dict({"name": "h", "nodes": [
    {"name": "a", "gpu": "A40", "count": 2, "intra_gbps": 256},
    {"name": "b", "gpu": "RTX3090Ti", "count": 2, "intra_gbps": 128}], "network": {"default_gbps": 40}})
MODEL = ModelSpec.from_name("llama-7b")
W = Workload(rate=1, prompt_lens=[512, 1024, 2048], output_lens=[32, 128, 256], ttft_slo=1.5, tpot_slo=0.08)


def _slo(w=W):
    return SLO(w.ttft_slo, w.tpot_slo, w.attainment)


def test_colocated_capacity_below_both_phase_bounds():
    hw = bl.best_colocated_layout(SERVER, MODEL, W, ["n:0"])[0].hw(SERVER)
    perf = bl.colocated_perf(MODEL, hw, W)
    assert perf.capacity > 0 and perf.sequences > 0
    assert perf.capacity < 1 / perf.service  # prefill time alone would saturate it
    dec = cm.decode_perf(MODEL, hw, W.prompt_mean, W.output_mean, W.tpot_slo)
    assert perf.capacity < dec.requests_per_s  # decode alone, without prefill stalls, serves more
    tight = Workload(1, W.prompt_lens, W.output_lens, 0.01, W.tpot_slo)
    assert bl.colocated_perf(MODEL, hw, tight).capacity == 0


def test_colocated_plan_is_valid_and_round_trips():
    plan = bl.colocated_plan(SERVER, MODEL, W, [["n:0", "n:1"], ["n:2", "n:3"]], "test")
    plan.validate()
    assert [r.phase for r in plan.replicas] == ["colocated", "colocated"]
    assert plan.objective == pytest.approx(sum(r.capacity for r in plan.replicas))
    assert plan.meta["cluster_spec"]["name"] == "s4"
    again = Plan.from_json(plan.to_json())
    assert again.to_dict() == plan.to_dict()
    # the two groups are the same shape: same layout on other GPUs
    assert plan.replicas[0].layout == plan.replicas[1].layout and plan.replicas[1].gpus == ["n:2", "n:3"]


def test_vllm_plans_are_uniform_and_use_the_whole_server():
    plans = bl.vllm_plans(SERVER, MODEL, W)
    assert plans and plans == sorted(plans, key=lambda p: -p.objective)
    for p in plans:
        sizes = {len(r.gpus) for r in p.replicas}
        assert len(sizes) == 1 and all(r.phase == "colocated" for r in p.replicas)
        assert p.price_per_hour <= SERVER.price_per_hour() + 1e-9


def test_uniform_groups_follow_the_widest_links():
    cl = Cluster.from_dict({"name": "x", "nodes": [{"name": f"n{i}", "gpu": "A40", "count": 2} for i in range(4)],
                            "network": {"default_gbps": 5, "links": [["n0", "n2", 100], ["n1", "n3", 100]]}})
    groups = bl.uniform_groups(cl, 4)
    assert {frozenset(g.split(":")[0] for g in grp) for grp in groups} == {frozenset({"n0", "n2"}),
                                                                            frozenset({"n1", "n3"})}


def test_distserve_plans_use_two_instance_sizes():
    plans = bl.distserve_plans(SERVER, MODEL, W)
    assert plans
    for p in plans:
        p.validate()
        assert p.prefill_ids and p.decode_ids
        assert len({len(r.gpus) for r in p.replicas if r.phase == "prefill"}) == 1
        assert len({len(r.gpus) for r in p.replicas if r.phase == "decode"}) == 1
    assert plans[0].objective >= plans[-1].objective


def test_hexgen_is_colocated_and_beats_uniform_on_its_own_objective():
    plans = bl.hexgen_plans(HETERO, MODEL, W, time_limit_s=10)
    assert plans and all(r.phase == "colocated" for r in plans[0].replicas)
    uniform = bl.vllm_plans(HETERO, MODEL, W)
    assert plans[0].objective >= max(p.objective for p in uniform) * (1 - 1e-6)  # tabu starts no worse


def test_same_budget_gpus():
    assert bl.same_budget_gpus(13.52, 1.60) == 8
    assert bl.same_budget_gpus(12.80, 1.60) == 8


# --- the simulator's colocated replicas --------------------------------------------------------------
def _one_replica_plan():
    return bl.colocated_plan(SERVER, MODEL, W, [["n:0"]], "one")


def test_colocated_unloaded_latencies_are_the_cost_model():
    plan = _one_replica_plan()
    sim = Simulator(plan, SERVER, MODEL, _slo(), config=SimConfig(max_prefill_batch=1))
    res = sim.run(trace_requests([0.0], [1024], [64]))
    hw = sim.hw[plan.replicas[0].id]
    r = res.requests[0]
    assert r.ttft == pytest.approx(cm.prefill_latency(MODEL, hw, 1024))  # no KV transfer when colocated
    assert r.tpot == pytest.approx(cm.decode_step_time(MODEL, hw, 1, 1024 + 1 + 63 / 2), rel=0.01)


def test_prefill_stalls_the_running_decode_batch():
    plan = _one_replica_plan()
    sim = Simulator(plan, SERVER, MODEL, _slo(), config=SimConfig(max_prefill_batch=1))
    alone = sim.run(trace_requests([0.0], [1024], [200])).requests[0]
    both = sim.run(trace_requests([0.0, 1.0], [1024, 2048], [200, 8])).requests[0]
    hw = sim.hw[plan.replicas[0].id]
    stall = cm.prefill_service_time(MODEL, hw, 2048)
    # the first request's decode waited one 2048-token prefill (plus a slightly slower shared step)
    assert both.e2e - alone.e2e == pytest.approx(stall, rel=0.15)
    assert both.tpot > alone.tpot


def test_colocated_goodput_near_its_analytic_capacity():
    w = Workload(rate=1, prompt_lens=[1024], output_lens=[128], ttft_slo=1.0, tpot_slo=0.05)
    plan = bl.colocated_plan(SERVER, MODEL, w, [["n:0"]], "one")
    sim = Simulator(plan, SERVER, MODEL, _slo(w))
    g = find_goodput(sim, [1024], [128], n=800, hint=plan.objective)
    assert g.goodput == pytest.approx(plan.objective, rel=0.25)  # analytic stall model: rougher than M/D/1


def test_colocated_dispatch_follows_capacity():
    plan = bl.colocated_plan(HETERO, MODEL, W, [["a:0", "a:1"], ["b:0", "b:1"]], "two")
    caps = {r.id: r.capacity for r in plan.replicas}
    sim = Simulator(plan, HETERO, MODEL, _slo())
    res = sim.run(poisson_requests(1.0, [512], [16], n=3000, seed=0))
    share = sum(r.prefill == "c0" for r in res.requests) / len(res.requests)
    assert share == pytest.approx(caps["c0"] / sum(caps.values()), abs=0.03)


def test_peaks_per_dollar_bound_the_paper_comparison():
    """A cluster's summed datasheet peaks per $/h, by hand for a two-node cluster; and the paper
    comparison's clusters: the 32 cloud GPUs give 1.61x the 8xA100 server's compute per $/h and
    1.53x its memory bandwidth, so no plan on the roofline model reaches 1.7x its goodput per $/h."""
    from thunderserve.planner.experiment import load_cluster

    mixed = Cluster.from_dict({"name": "two", "nodes": [
        {"name": "a", "gpu": "A40", "count": 2, "intra_gbps": 64},
        {"name": "b", "gpu": "A100-80G", "count": 1, "intra_gbps": 64, "price_per_gpu_hour": 2.0}]})
    peaks = mixed.peaks_per_dollar()
    price = 2 * 0.40 + 2.0
    assert peaks["tflops"] == pytest.approx((2 * 149.7 + 312) / price)
    assert peaks["mem_gbps"] == pytest.approx((2 * 696 + 2039) / price)
    assert peaks["mem_gb"] == pytest.approx((2 * 48 + 80) / price)
    cloud, server = load_cluster("cloud-32").peaks_per_dollar(), load_cluster("a100-8x").peaks_per_dollar()
    ratio = {k: cloud[k] / server[k] for k in cloud}
    assert ratio["tflops"] == pytest.approx(1.611, abs=2e-3) and ratio["mem_gbps"] == pytest.approx(1.528, abs=2e-3)
    assert max(ratio["tflops"], ratio["mem_gbps"]) < 1.7
