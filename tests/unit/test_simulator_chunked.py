"""Colocated replicas with chunked prefill (vLLM V1-style, `SimConfig(colocated_policy="chunked")`)."""

import math

import pytest

from thunderserve.common.plan import Plan, Replica, Stage
from thunderserve.planner import Cluster, ModelSpec, Workload
from thunderserve.planner import baselines as bl
from thunderserve.planner import costmodel as cm
from thunderserve.planner import simulator as simmod
from thunderserve.planner.simulator import SLO, SimConfig, Simulator, iteration_time, poisson_requests, trace_requests

SERVER = Cluster.from_dict({"name": "s4", "nodes": [{"name": "n", "gpu": "A100-80G", "count": 4,
                                                       "intra_gbps": 2400}]})
MODEL = ModelSpec.from_name("llama-7b")
W = Workload(rate=1, prompt_lens=[512, 1024, 2048], output_lens=[32, 128, 256], ttft_slo=1.5, tpot_slo=0.08)
SLO_ = SLO(W.ttft_slo, W.tpot_slo, W.attainment)


def _chunked(budget: int, **kw) -> SimConfig:
    return SimConfig(colocated_policy="chunked", token_budget=budget, **kw)


def _one_gpu_plan() -> Plan:
    return bl.colocated_plan(SERVER, MODEL, W, [["n:0"]], "one")


def _pp2_plan() -> Plan:
    half = MODEL.layers // 2
    stages = [Stage(["n:0"], 1, 0, half, "n", "A100-80G"), Stage(["n:1"], 1, half, MODEL.layers, "n", "A100-80G")]
    rep = Replica(id="c0", phase="colocated", gpus=["n:0", "n:1"], stages=stages, capacity=1.0, max_sequences=64)
    return Plan(replicas=[rep], model=MODEL.name, model_layers=MODEL.layers, cluster=SERVER.name)


def _record_iterations(monkeypatch) -> list[tuple[int, float, list[tuple[int, int]], float]]:
    """Every chunked iteration the simulator costs: (decode sequences, context, chunks, its time)."""
    log: list[tuple[int, float, list[tuple[int, int]], float]] = []
    real = simmod.iteration_time

    def rec(model, stages, decode, context, chunks, calib=cm.DEFAULT_CALIBRATION):
        t = real(model, stages, decode, context, chunks, calib)
        log.append((decode, context, list(chunks), t))
        return t

    monkeypatch.setattr(simmod, "iteration_time", rec)
    return log


def _record_tokens(monkeypatch) -> dict[int, list[float]]:
    """Request id -> the times its decode steps ended (one output token each)."""
    times: dict[int, list[float]] = {}
    real = simmod._DecodeBatch.finish_step

    def rec(self, now):
        for rid in self.running:
            times.setdefault(rid, []).append(now)
        real(self, now)

    monkeypatch.setattr(simmod._DecodeBatch, "finish_step", rec)
    return times


def test_config_rejects_unknown_policy_and_bad_budget():
    with pytest.raises(ValueError):
        SimConfig(colocated_policy="fancy")
    with pytest.raises(ValueError):
        SimConfig(colocated_policy="chunked", token_budget=0)


def test_iteration_time_is_the_cost_model_at_its_edges():
    hw = Simulator(_one_gpu_plan(), SERVER, MODEL, SLO_).hw["c0"]
    # a fresh prompt alone is a prefill; decode alone a decode step
    assert iteration_time(MODEL, hw, 0, 0.0, [(0, 1500)]) == pytest.approx(cm.prefill_latency(MODEL, hw, 1500))
    assert iteration_time(MODEL, hw, 24, 900.0, []) == pytest.approx(cm.decode_step_time(MODEL, hw, 24, 900.0))
    # a later chunk attends to its prefix: dearer than the same number of fresh tokens
    assert iteration_time(MODEL, hw, 0, 0.0, [(4096, 1024)]) > iteration_time(MODEL, hw, 0, 0.0, [(0, 1024)])
    # decode tokens piggy-back on a chunk for less than a separate decode step
    both = iteration_time(MODEL, hw, 24, 900.0, [(0, 1024)])
    alone = iteration_time(MODEL, hw, 0, 0.0, [(0, 1024)]) + iteration_time(MODEL, hw, 24, 900.0, [])
    assert iteration_time(MODEL, hw, 0, 0.0, [(0, 1024)]) < both < alone


@pytest.mark.parametrize("prompt,budget", [(5000, 2048), (1500, 2048), (3000, 512)])
def test_lone_request_ttft_is_its_chunks_then_decode_steps(monkeypatch, prompt, budget):
    log = _record_iterations(monkeypatch)
    plan = _one_gpu_plan()
    sim = Simulator(plan, SERVER, MODEL, SLO_, config=_chunked(budget))
    hw = sim.hw["c0"]
    out = 40
    r = sim.run(trace_requests([0.0], [prompt], [out])).requests[0]
    n = math.ceil(prompt / budget)
    chunks = [(k * budget, min(budget, prompt - k * budget)) for k in range(n)]
    assert [c for _, _, c, _ in log[:n]] == [[c] for c in chunks]  # one chunk per iteration, in order
    assert all(d == 0 for d, _, _, _ in log[:n])
    ttft = sum(iteration_time(MODEL, hw, 0, 0.0, [c]) for c in chunks)
    assert r.ttft == pytest.approx(ttft, rel=1e-9)
    if prompt <= budget:
        assert r.ttft == pytest.approx(cm.prefill_latency(MODEL, hw, prompt), rel=1e-9)
    # then out - 1 decode steps at the growing context: prompt + first token + tokens decoded so far
    decode = sum(cm.decode_step_time(MODEL, hw, 1, prompt + 1 + k) for k in range(out - 1))
    assert r.finish - r.first_token == pytest.approx(decode, rel=1e-9)
    assert len(log) == n + out - 1


@pytest.mark.parametrize("plan_fn", [_one_gpu_plan, _pp2_plan])
@pytest.mark.parametrize("budget", [256, 1024])
def test_no_iteration_exceeds_the_token_budget(monkeypatch, plan_fn, budget):
    log = _record_iterations(monkeypatch)
    plan = plan_fn()
    sim = Simulator(plan, SERVER, MODEL, SLO_, config=_chunked(budget))
    pp = plan.replicas[0].pp
    reqs = poisson_requests(6.0, W.prompt_lens, W.output_lens, n=150, seed=1)
    res = sim.run(reqs)
    assert all(math.isfinite(r.finish) for r in res.requests)
    totals = []
    for decode, _, chunks, _ in log:
        assert all(0 < c <= budget for _, c in chunks)  # a prompt gets at most one budget-sized chunk
        totals.append(decode + sum(c for _, c in chunks))
        assert totals[-1] <= pp * budget  # the budget holds per micro-batch
    assert max(totals) == pp * budget  # and is used: long prompts fill it
    assert sum(c for _, _, ch, _ in log for _, c in ch) == sum(r.prompt for r in reqs)  # every prompt token once


def test_running_decodes_keep_a_token_per_iteration_while_a_long_prompt_prefills(monkeypatch):
    """Four sequences decode when an 8,000-token prompt arrives. Chunked: they keep a token every iteration,
    so no gap between their tokens exceeds a full-budget mixed iteration. Stall: one gap is the whole prefill."""
    plan = _one_gpu_plan()
    hw = Simulator(plan, SERVER, MODEL, SLO_).hw["c0"]
    budget, long_prompt, short, out = 1024, 8000, 128, 200
    reqs = trace_requests([0.0, 0.0, 0.0, 0.0, 0.3], [short] * 4 + [long_prompt], [out] * 4 + [2])
    gaps = {}
    for policy in ("chunked", "stall"):
        with monkeypatch.context() as m:
            log = _record_iterations(m)
            tokens = _record_tokens(m)
            cfg = _chunked(budget) if policy == "chunked" else SimConfig(max_prefill_batch=1)
            res = Simulator(plan, SERVER, MODEL, SLO_, config=cfg).run(reqs)
        early, late = res.requests[:4], res.requests[4]
        assert early[0].first_token < late.arrival < early[0].finish  # the long prompt lands mid-decode
        worst = 0.0
        for r in early:
            ts = [r.first_token] + tokens[r.id]
            assert len(ts) == out and ts[-1] == r.finish
            worst = max(worst, max(b - a for a, b in zip(ts, ts[1:])))
        gaps[policy] = worst
        if policy == "chunked":
            during = [d for d, _, ch, _ in log if ch and ch[0][1] > 0 and ch[0][0] + ch[0][1] > short]
            assert len(during) == math.ceil(long_prompt / (budget - 4)) or len(during) >= long_prompt // budget
            assert all(d == 4 for d in during)  # every iteration of the long prefill carried all four decodes
    # a full-budget iteration over the longest prefix bounds every inter-token gap (and so the TPOT)
    bound = iteration_time(MODEL, hw, 4, short + out, [(long_prompt, budget)])
    assert gaps["chunked"] <= bound
    assert max(r.tpot for r in res.requests[:4]) > 0
    assert gaps["stall"] >= cm.prefill_latency(MODEL, hw, long_prompt) > 3 * bound


def test_chunked_is_deterministic_for_a_seed():
    plan = _one_gpu_plan()
    sim = Simulator(plan, SERVER, MODEL, SLO_, config=_chunked(512))

    def run(seed):
        res = sim.run(poisson_requests(5.0, W.prompt_lens, W.output_lens, n=300, seed=seed), seed=seed)
        return [(r.first_token, r.finish) for r in res.requests]

    assert run(3) == run(3)
    assert run(3) != run(4)


def test_chunked_serves_more_than_stall_under_long_prompts():
    """Decode no longer waits for whole long prompts, so TPOT attainment holds to a higher rate."""
    plan = _one_gpu_plan()
    w = Workload(rate=1, prompt_lens=[4096, 256], output_lens=[64, 256], ttft_slo=3.0, tpot_slo=0.04)
    slo = SLO(w.ttft_slo, w.tpot_slo, 0.9)
    reqs = poisson_requests(1.5, w.prompt_lens, w.output_lens, n=400, seed=0)
    stall = Simulator(plan, SERVER, MODEL, slo).run(reqs)
    chunked = Simulator(plan, SERVER, MODEL, slo, config=_chunked(512)).run(reqs)
    assert chunked.percentile("tpot", 90) < stall.percentile("tpot", 90)
