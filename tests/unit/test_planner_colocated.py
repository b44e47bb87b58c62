"""Colocated (chunked-prefill) replicas in the planner: the analytic capacity against closed forms and the
simulator, the search designating them, plans that carry them, and re-scheduling around them."""

import json
import math
from pathlib import Path

import pytest

from thunderserve.common.plan import Plan
from thunderserve.planner import Cluster, ModelSpec, Planner, Workload, cli
from thunderserve.planner import baselines as bl
from thunderserve.planner import costmodel as cm
from thunderserve.planner.colocated import colocated_perf
from thunderserve.planner.search import exhaustive_search
from thunderserve.planner.simulator import SLO, SimConfig, Simulator, find_goodput, iteration_time, poisson_requests

CLUSTERS = Path(__file__).resolve().parents[2] / "deploy" / "clusters"
ONE = Cluster.from_dict({"name": "one", "nodes": [{"name": "n", "gpu": "A100-80G", "count": 1}]})
SERVER = Cluster.from_dict({"name": "s4", "nodes": [{"name": "n", "gpu": "A100-80G", "count": 4,
                                                       "intra_gbps": 2400}]})
MODEL = ModelSpec.from_name("llama-7b")
# fixed lengths: the steady-state model's own assumptions (as the simulator-vs-planner tests use)
FIXED = Workload(rate=1, prompt_lens=[1024], output_lens=[128], ttft_slo=1.5, tpot_slo=0.05)


def _hw(cluster: Cluster, gpus: list[str], w: Workload = FIXED) -> list[cm.StageHW]:
    return bl.best_colocated_layout(cluster, MODEL, w, gpus, token_budget=512)[0].hw(cluster)


def _chunked(budget: int = 512) -> SimConfig:
    return SimConfig(colocated_policy="chunked", token_budget=budget)


def _slo(w: Workload) -> SLO:
    return SLO(w.ttft_slo, w.tpot_slo, w.attainment)


# --- the analytic capacity -------------------------------------------------------------------------------
def test_iteration_cost_is_shared_with_the_simulator():
    """The model's mean-valued iteration and the simulator's are one formula."""
    hw = _hw(SERVER, ["n:0", "n:1"])
    chunks = [(0, 300), (1024, 212)]
    attn = sum(c * d + c * c / 2 for d, c in chunks)
    kv = sum(d + c for d, c in chunks)
    assert iteration_time(MODEL, hw, 7, 900.0, chunks) == cm.chunked_iteration_time(
        MODEL, hw, 7, 900.0, 512, attn, kv, 2)


def test_chunked_capacity_closed_form_bounds():
    hw = _hw(ONE, ["n:0"])
    perf = colocated_perf(MODEL, hw, FIXED, token_budget=512)
    assert perf.capacity > 0 and perf.sequences > 0 and 0 < perf.tpot <= FIXED.tpot_slo
    # prefill must keep up: at most 512 prompt tokens per iteration, and no iteration is cheaper than a
    # prompt's first chunk alone
    assert perf.capacity * 1024 < 512 / iteration_time(MODEL, hw, 0, 0.0, [(0, 512)])
    # a 1,024-token prompt in 512-token chunks: at least two iterations of its own chunk
    assert perf.latency >= 2 * iteration_time(MODEL, hw, 0, 0.0, [(0, 512)])
    # SLOs: none meetable -> 0; looser ones never serve less
    assert colocated_perf(MODEL, hw, Workload(1, [1024], [128], 0.01, 0.05), token_budget=512).capacity == 0
    assert colocated_perf(MODEL, hw, Workload(1, [1024], [128], 1.5, 0.001), token_budget=512).capacity == 0
    loose = colocated_perf(MODEL, hw, Workload(1, [1024], [128], 3.0, 0.1), token_budget=512)
    assert loose.capacity >= perf.capacity
    with pytest.raises(ValueError):
        colocated_perf(MODEL, hw, FIXED, token_budget=0)


def test_chunking_beats_stalling_when_prompts_are_long():
    """Long prompts stall every decode step under V0; chunked prefill interleaves them."""
    w = Workload(1, [4096], [128], ttft_slo=3.0, tpot_slo=0.05)
    hw = _hw(ONE, ["n:0"], w)
    assert colocated_perf(MODEL, hw, w, token_budget=512).capacity > colocated_perf(MODEL, hw, w).capacity


@pytest.mark.parametrize("budget", [512, 1024])
def test_chunked_capacity_near_simulated_goodput(budget):
    plan = bl.colocated_plan(ONE, MODEL, FIXED, [["n:0"]], "one", token_budget=budget)
    assert plan.meta["token_budget"] == budget
    sim = Simulator(plan, ONE, MODEL, _slo(FIXED), config=_chunked(budget))
    g = find_goodput(sim, [1024], [128], n=600, hint=plan.objective)
    assert g.goodput == pytest.approx(plan.objective, rel=0.15)


# --- the planner ---------------------------------------------------------------------------------------
def _paper40() -> Cluster:
    return Cluster.from_yaml(CLUSTERS / "a40-3090ti-40g.yaml")


def _sim_goodput(plan: Plan, cluster: Cluster, model: ModelSpec, w: Workload) -> float:
    sim = Simulator(plan, cluster, model, _slo(w), config=_chunked(512))
    return find_goodput(sim, w.prompt_lens, w.output_lens, n=400, hint=0.7 * plan.objective).goodput


def test_planner_picks_colocated_where_the_simulator_says_it_wins():
    """LLaMA-13B chat on the 4xA40 + 4x3090 Ti cluster: the planner makes colocated groups, and the
    simulator serves more with them than with the disaggregated plan it makes without."""
    c, m, w = _paper40(), ModelSpec.from_name("llama-13b"), Workload.from_name("conversation", rate=1.0)
    colo = Planner(c, m, w, colocated=True).solve()
    disagg = Planner(c, m, w).solve()
    assert any(r.phase == "colocated" for r in colo.replicas)
    assert not any(r.phase == "colocated" for r in disagg.replicas)
    assert colo.objective > disagg.objective
    assert _sim_goodput(colo, c, m, w) > 1.05 * _sim_goodput(disagg, c, m, w)


def test_planner_keeps_disaggregation_where_colocation_loses():
    """LLaMA-13B code on the same cluster: the planner stays disaggregated; the simulator agrees that the
    colocated alternatives (the chunked HexGen-style search's plan, uniform groups) serve less."""
    c, m, w = _paper40(), ModelSpec.from_name("llama-13b"), Workload.from_name("code", rate=1.0)
    plan = Planner(c, m, w, colocated=True).solve()
    assert {r.phase for r in plan.replicas} == {"prefill", "decode"}
    best_colocated = max(_sim_goodput(p, c, m, w) for p in (bl.hexgen_plans(c, m, w, token_budget=512)
                                                           + bl.vllm_plans(c, m, w, token_budget=512)[:1]))
    assert _sim_goodput(plan, c, m, w) > best_colocated


def test_colocated_search_matches_exhaustive_on_a_small_cluster():
    c = Cluster.from_dict({"name": "small", "nodes": [
        {"name": "a", "gpu": "A40", "count": 2, "intra_gbps": 256},
        {"name": "b", "gpu": "RTX3090Ti", "count": 2, "intra_gbps": 128}], "network": {"default_gbps": 40}})
    for shape in ("code", "conversation"):
        w = Workload.from_name(shape, rate=1.0)
        plan = Planner(c, MODEL, w, colocated=True).solve()
        best = exhaustive_search(Planner(c, MODEL, w, colocated=True))
        assert plan.objective == pytest.approx(best.score, rel=1e-9)
        assert best.score >= exhaustive_search(Planner(c, MODEL, w)).score  # a larger space never loses


def _mixed(planner: Planner) -> Plan:
    """One colocated replica beside a prefill and a decode replica on the 4xA100 server."""
    return planner.build_plan([["n:0"], ["n:1"], ["n:2", "n:3"]], ["prefill", "decode", "colocated"])


def test_mixed_plan_round_trips_and_simulates():
    w = Workload.from_name("conversation", rate=1.0)
    planner = Planner(SERVER, MODEL, w, colocated=True, token_budget=768)
    plan = _mixed(planner)
    plan.validate()
    colo = plan.replica(plan.ids("colocated")[0])
    assert colo.layout and colo.max_sequences > 0 and colo.tpot_s > 0 and colo.latency_s > 0 and colo.capacity > 0
    assert plan.meta["token_budget"] == 768 and plan.meta["planner"]["colocated"] is True
    # the objective is the LP's rate plus the colocated capacity; one dispatch over both kinds, by rate
    lp = plan.objective - colo.capacity
    assert lp > 0 and plan.objective == pytest.approx(planner.score([["n:0"], ["n:1"], ["n:2", "n:3"]],
                                                                    ["prefill", "decode", "colocated"]))
    assert sum(plan.dispatch.values()) == pytest.approx(1.0)
    assert plan.dispatch[colo.id] == pytest.approx(colo.capacity / plan.objective)
    again = Plan.from_json(plan.to_json())
    assert again.to_dict() == plan.to_dict()
    assert Planner.from_plan(again).token_budget == 768 and Planner.from_plan(again).colocated
    res = Simulator(again, SERVER, MODEL, _slo(w), config=_chunked(768)).run(
        poisson_requests(2.0, w.prompt_lens, w.output_lens, n=600, seed=0))
    share = sum(r.prefill == colo.id for r in res.requests) / len(res.requests)
    assert share == pytest.approx(plan.dispatch[colo.id], abs=0.05)
    assert all(r.decode == r.prefill for r in res.requests if r.prefill == colo.id)
    assert all(math.isfinite(r.finish) for r in res.requests)


def test_reschedule_redecides_colocated_replicas_too():
    """With colocated groups allowed, re-scheduling may flip any replica to or from colocated (layouts stay);
    without, a plan's colocated replicas stay as they are."""
    w = Workload.from_name("conversation", rate=1.0)
    planner = Planner(SERVER, MODEL, w, colocated=True)
    plan = _mixed(planner)
    colo, dead = plan.ids("colocated")[0], plan.decode_ids[0]
    for new in (planner.reschedule(plan, failed=[dead]),
                planner.reschedule(plan, workload=Workload.from_name("code", rate=3.0))):
        new.validate()
        assert new.epoch == plan.epoch + 1
        assert all(r.stages == plan.replica(r.id).stages for r in new.replicas)
        if new.ids("colocated"):
            assert new.meta["token_budget"] == plan.meta["token_budget"]
    fixed = Planner(SERVER, MODEL, w).reschedule(plan, failed=[dead])
    assert fixed.replica(colo).phase == "colocated" and fixed.dispatch.get(colo, 0) > 0
    assert planner.reschedule(plan, failed=[dead]).objective >= fixed.objective * (1 - 1e-9)
    # a disaggregated plan: the replicas that serve more colocated flip to it
    disagg = planner.build_plan([["n:0"], ["n:1"], ["n:2", "n:3"]], ["prefill", "decode", "decode"])
    kept = Planner(SERVER, MODEL, w).reschedule(disagg)
    moved = planner.reschedule(disagg)
    assert moved.ids("colocated") and moved.objective > kept.objective
    assert not kept.ids("colocated")


def test_plan_cli_colocated_is_opt_in(tmp_path, capsys):
    args = ["--cluster", str(CLUSTERS / "a100-8x.yaml"), "--model", "llama-13b", "--workload", "conversation",
            "--rate", "2", "--quiet", "--json"]
    assert cli.main([*args, str(tmp_path / "a.json"), "--colocated"]) == 0
    assert "colocated with chunked prefill at 512 tokens" in capsys.readouterr().out
    assert "colocated" in {r.phase for r in Plan.from_json((tmp_path / "a.json").read_text()).replicas}
    assert cli.main([*args, str(tmp_path / "b.json")]) == 0
    assert {r.phase for r in Plan.from_json((tmp_path / "b.json").read_text()).replicas} == {"prefill", "decode"}
    assert cli.main([*args, str(tmp_path / "c.json"), "--colocated", "--token-budget", "0"]) == 2
    # `simulate` runs the plan's colocated replicas as they are served: chunked, at the plan's budget
    from thunderserve.planner.simulate_cli import main as simulate_main

    sim = ["--plan", str(tmp_path / "a.json"), "--workload", "conversation", "--rate", "1", "--duration", "20",
           "--quiet", "--json"]
    assert simulate_main([*sim, str(tmp_path / "s1.json")]) == 0
    got = json.loads((tmp_path / "s1.json").read_text())
    assert (got["colocated"], got["token_budget"]) == ("chunked", 512)
    assert simulate_main([*sim, str(tmp_path / "s2.json"), "--colocated", "stall"]) == 0
    assert json.loads((tmp_path / "s2.json").read_text())["colocated"] == "stall"
