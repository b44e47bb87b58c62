"""Simulator against closed forms (M/D/1, D/D/1, unloaded latencies) and the planner's capacities."""

import math

import numpy as np
import pytest

from thunderserve.planner import Cluster, ModelSpec, Planner, Workload
from thunderserve.planner import costmodel as cm
from thunderserve.planner.simulator import (
    SLO,
    SimConfig,
    Simulator,
    find_goodput,
    poisson_requests,
    prefill_batch_stage_time,
    prefill_batch_times,
    trace_requests,
)

CLUSTER = Cluster.from_dict({"name": "t", "nodes": [{"name": "n", "gpu": "A100-80G", "count": 4,
                                                       "intra_gbps": 2400}]})
TWO_NODES = Cluster.from_dict({"name": "t2", "nodes": [
    {"name": "a", "gpu": "A100-80G", "count": 2, "intra_gbps": 2400},
    {"name": "b", "gpu": "A100-80G", "count": 2, "intra_gbps": 2400}], "network": {"default_gbps": 10}})
MODEL = ModelSpec.from_name("llama-7b")
ONE = SimConfig(max_prefill_batch=1)  # no prefill batching: the queue is a plain single server


def _plan(output: int, prompt: int = 1024, cluster: Cluster = CLUSTER, groups=(["n:0"], ["n:1"]),
          codec: str = "auto", ttft: float = 1.0, tpot: float = 0.05):
    w = Workload(rate=1, prompt_lens=[prompt], output_lens=[output], ttft_slo=ttft, tpot_slo=tpot)
    return Planner(cluster, MODEL, w, codec=codec).build_plan([list(g) for g in groups], ["prefill", "decode"]), w


def _transfer_s(plan, cluster, prompt):
    return cm.kv_transfer_time(MODEL, prompt, MODEL.layers, cluster.gbps("n", "n"), plan.kv_codec)


def _held(plan) -> bool:
    """Does the plan's r0 -> r1 route send the first token from the decode side (after the KV)?"""
    return plan.first_token_waits("r0", "r1")


def test_batch_cost_is_the_cost_model_for_one_prompt():
    plan, _ = _plan(64)
    hw = Simulator(plan, CLUSTER, MODEL, SLO(1, 1)).hw["r0"]
    assert prefill_batch_stage_time(MODEL, hw[0], [1000]) == cm.prefill_stage_time(MODEL, hw[0], 1000)
    svc, lat = prefill_batch_times(MODEL, hw, [1000])
    assert svc == pytest.approx(cm.prefill_service_time(MODEL, hw, 1000))
    assert lat == pytest.approx(cm.prefill_latency(MODEL, hw, 1000))
    # a batch costs less than its prompts one by one (weights read once) but more than the longest alone
    two = prefill_batch_stage_time(MODEL, hw[0], [300, 500])
    assert cm.prefill_stage_time(MODEL, hw[0], 500) < two < 2 * cm.prefill_stage_time(MODEL, hw[0], 400)


def test_unloaded_latencies_are_the_cost_model():
    plan, _ = _plan(64)
    sim = Simulator(plan, CLUSTER, MODEL, SLO(1, 0.05), config=ONE)
    reqs = trace_requests([0.0, 10.0, 20.0], [1024] * 3, [64] * 3)  # far apart: nothing queues
    res = sim.run(reqs)
    hw_p, hw_d = sim.hw["r0"], sim.hw["r1"]
    # the first token leaves the prefill replica before the KV moves: TTFT is the prefill latency (64-token
    # outputs absorb a fast link's transfer, so the planner keeps the early first token)
    assert not _held(plan)
    ttft = cm.prefill_latency(MODEL, hw_p, 1024)
    x = _transfer_s(plan, CLUSTER, 1024)
    # alone in the batch: each step at the sequence's growing context, which averages prompt + output/2;
    # the KV transfer sits between the first and second tokens
    step = cm.decode_step_time(MODEL, hw_d, 1, 1024 + 1 + 63 / 2)
    for r in res.requests:
        assert r.ttft == pytest.approx(ttft, rel=1e-9)
        assert r.kv_ready - r.first_token == pytest.approx(x, rel=1e-9)
        assert r.tpot == pytest.approx((x + 63 * step) / 63, rel=0.01)
        assert r.e2e == pytest.approx(r.ttft + 63 * r.tpot)


def test_deterministic_arrivals_never_wait():
    """D/D/1 below saturation: every TTFT is the unloaded one."""
    plan, _ = _plan(16)
    sim = Simulator(plan, CLUSTER, MODEL, SLO(1, 0.05), config=ONE)
    s = cm.prefill_service_time(MODEL, sim.hw["r0"], 1024)
    n = 200
    res = sim.run(trace_requests([i * s / 0.9 for i in range(n)], [1024] * n, [16] * n))
    ttfts = np.array([r.ttft for r in res.requests])
    assert ttfts.max() - ttfts.min() < 1e-9


@pytest.mark.parametrize("rho", [0.5, 0.8])
def test_md1_mean_wait(rho):
    """One replica, deterministic service, Poisson arrivals: mean wait = rho S / (2 (1 - rho))."""
    plan, _ = _plan(2)
    sim = Simulator(plan, CLUSTER, MODEL, SLO(1, 0.05), config=ONE)
    s = cm.prefill_service_time(MODEL, sim.hw["r0"], 1024)
    res = sim.run(poisson_requests(rho / s, [1024], [2], n=20_000, seed=3))
    # 2-token outputs: the planner has the first token wait for the (fast) transfer, so TTFT includes it
    base = cm.prefill_latency(MODEL, sim.hw["r0"], 1024) + (_transfer_s(plan, CLUSTER, 1024) if _held(plan) else 0)
    wait = np.array([r.ttft for r in res.requests]) - base
    assert wait.min() > -1e-9
    assert wait.mean() == pytest.approx(rho * s / (2 * (1 - rho)), rel=0.08)
    # P(no wait) = 1 - rho for M/D/1 (PASTA)
    assert (wait < 1e-9).mean() == pytest.approx(1 - rho, abs=0.02)


@pytest.mark.parametrize("output", [64, 256])  # prefill-bound, decode-bound
def test_goodput_matches_planner_capacity(output):
    """With the planner's own assumptions (fixed lengths, Poisson), simulated goodput is close to the
    planner's predicted objective, and the prediction errs on the safe side: the planner splits the miss
    budget between TTFT and TPOT (each planned at 95%), the simulator counts joint misses at 90%."""
    plan, w = _plan(output)
    sim = Simulator(plan, CLUSTER, MODEL, SLO(w.ttft_slo, w.tpot_slo, 0.9), config=ONE)
    g = find_goodput(sim, [1024], [output], n=1200, hint=plan.objective, rel_tol=0.02)
    assert 0.97 * plan.objective <= g.goodput <= 1.15 * plan.objective
    assert g.result is not None and g.result.attainment() >= 0.9


def test_low_load_attainment_and_throughput():
    plan, w = _plan(64)
    sim = Simulator(plan, CLUSTER, MODEL, SLO(w.ttft_slo, w.tpot_slo, 0.9))
    rate = 0.3 * plan.objective
    res = sim.run(poisson_requests(rate, [1024], [64], n=600, seed=1))
    assert res.attainment() == 1.0
    assert res.tokens_per_s() == pytest.approx(rate * 64, rel=0.10)
    assert all(math.isfinite(r.finish) for r in res.requests)


def test_same_seed_same_result_other_seed_differs():
    plan, w = _plan(64)
    sim = Simulator(plan, CLUSTER, MODEL, SLO(w.ttft_slo, w.tpot_slo))
    reqs = poisson_requests(8.0, [512, 1024, 2048], [16, 64, 128], n=300, seed=5)
    a, b = sim.run(reqs, seed=5).summary(), sim.run(reqs, seed=5).summary()
    assert a == b
    c = sim.run(poisson_requests(8.0, [512, 1024, 2048], [16, 64, 128], n=300, seed=6), seed=6).summary()
    assert c != a


def test_overload_fails_slos_and_queue_drains():
    plan, w = _plan(64)
    sim = Simulator(plan, CLUSTER, MODEL, SLO(w.ttft_slo, w.tpot_slo))
    res = sim.run(poisson_requests(3 * plan.objective, [1024], [64], n=500, seed=0))
    assert res.attainment() < 0.5
    assert all(math.isfinite(r.finish) for r in res.requests)  # nothing lost, only late
    assert res.min_slo_scale() > 1


@pytest.mark.parametrize("early", [False, True])
def test_codec_shortens_kv_transfer_over_a_slow_link(early: bool):
    """Prefill on node a, decode on node b over 10 Gbit/s: int4 brings the KV (and every token after
    the first) earlier; TTFT does not wait for the KV either way. Moved after the pass, by the saved
    transfer time. Streamed during the pass (the replicas' default), in 4 runs of a quarter of the
    layers each, a run leaving once the pass has computed it and the run before it has gone: only
    what is left of the chain at the pass's end delays the second token."""
    calib = cm.Calibration(kv_stream_early=early)
    out, ttft = {}, {}
    for codec in ("none", "int4"):
        # a loose TPOT SLO: a 1 s transfer ahead of 7 tokens must not make the route unservable
        plan, _ = _plan(8, cluster=TWO_NODES, groups=(["a:0"], ["b:0"]), codec=codec, ttft=5.0, tpot=1.0)
        assert plan.kv_codec == codec
        sim = Simulator(plan, TWO_NODES, MODEL, SLO(5, 1.0), calib=calib, config=ONE)
        r = sim.run(trace_requests([0.0], [2048], [8])).requests[0]
        out[codec], ttft[codec] = r.finish, r.ttft
    left = cm.kv_transfer_time(MODEL, 2048, MODEL.layers, 10, "int4")  # after the pass
    if early:
        latency = ttft["int4"]  # the first token leaves at the pass's end
        quarter = cm.kv_transfer_time(MODEL, 2048, MODEL.layers // 4, 10, "int4")
        t = 0.0
        for j in range(1, 5):
            t = max(t, latency * j / 4) + quarter
        left = t - latency
        assert quarter <= left < cm.kv_transfer_time(MODEL, 2048, MODEL.layers, 10, "int4")
    saved = cm.kv_transfer_time(MODEL, 2048, MODEL.layers, 10, "none") - left
    assert ttft["none"] == pytest.approx(ttft["int4"], rel=1e-12)
    assert out["none"] - out["int4"] == pytest.approx(saved, rel=1e-6)


def test_one_token_output_moves_no_kv():
    plan, _ = _plan(8, cluster=TWO_NODES, groups=(["a:0"], ["b:0"]), codec="none", ttft=5.0, tpot=1.0)
    sim = Simulator(plan, TWO_NODES, MODEL, SLO(5, 1.0), config=ONE)
    r = sim.run(trace_requests([0.0], [2048], [1])).requests[0]
    assert r.finish == r.first_token and math.isnan(r.kv_ready)


def _two_prompts_at_once(cluster, prefill_gpus, decode_gpu):
    """Two 2,048-token prompts arrive together, one on each prefill replica, for one decode replica:
    when each one's KV has landed, in order."""
    w = Workload(rate=1, prompt_lens=[2048], output_lens=[8], ttft_slo=5, tpot_slo=0.05)
    plan = Planner(cluster, MODEL, w, codec="none").build_plan([[g] for g in (*prefill_gpus, decode_gpu)],
                                                               ["prefill", "prefill", "decode"])
    plan.dispatch = {"r0": 0.5, "r1": 0.5}
    plan.routing = {"r0": {"r2": 1.0}, "r1": {"r2": 1.0}}
    sim = Simulator(plan, cluster, MODEL, SLO(5, 0.05), config=ONE)
    reqs = trace_requests([0.0, 0.0], [2048, 2048], [8, 8])
    res = next(r for r in (sim.run(reqs, seed=s) for s in range(50))  # both prefill replicas in use
               if r.requests[0].prefill != r.requests[1].prefill)
    return sorted(r.kv_ready for r in res.requests)


def test_link_is_shared_fifo():
    """Two prompts prefilled at once on two replicas both send over the a-b link: the second queues."""
    t = _two_prompts_at_once(TWO_NODES, ["a:0", "a:1"], "b:0")
    assert t[1] - t[0] == pytest.approx(cm.kv_transfer_time(MODEL, 2048, MODEL.layers, 10, "none"), rel=1e-6)


@pytest.mark.parametrize("nic_c", [None, 20])
def test_a_nodes_nic_is_shared_by_the_links_into_it(nic_c):
    """Two prompts prefilled at once on nodes a and b go over two links to node c. c's NIC, as fast as
    one link (its default), takes them one after the other; one twice as fast takes both at once."""
    cl = Cluster.from_dict({"name": "t3", "nodes": [
        {"name": n, "gpu": "A100-80G", "count": 1, **({"nic_gbps": nic_c} if n == "c" and nic_c else {})}
        for n in "abc"], "network": {"default_gbps": 10}})
    t = _two_prompts_at_once(cl, ["a:0", "b:0"], "c:0")
    x = cm.kv_transfer_time(MODEL, 2048, MODEL.layers, 10, "none")
    assert t[1] - t[0] == pytest.approx(x if nic_c is None else 0.0, abs=1e-3)  # (hop latencies apart)


def test_request_too_large_for_kv_memory_fails():
    plan, w = _plan(64)
    sim = Simulator(plan, CLUSTER, MODEL, SLO(w.ttft_slo, w.tpot_slo))
    res = sim.run(trace_requests([0.0, 1.0], [1024, 10_000_000], [64, 64]))
    assert math.isfinite(res.requests[0].finish) and not math.isfinite(res.requests[1].finish)
    assert res.attainment() == 0.5


def test_slo_scale_is_the_attainment_quantile():
    plan, w = _plan(64)
    sim = Simulator(plan, CLUSTER, MODEL, SLO(w.ttft_slo, w.tpot_slo))
    res = sim.run(poisson_requests(1.2 * plan.objective, [1024], [64], n=400, seed=2))
    s = res.min_slo_scale()
    assert res.attainment(s) >= 0.9 > res.attainment(s * 0.999)
    scales = [0.5, 1, 2, 4]
    atts = [res.attainment(x) for x in scales]
    assert atts == sorted(atts)


def test_poisson_requests_rate_and_common_random_numbers():
    a = poisson_requests(2.0, [100, 200], [10, 20], n=4000, seed=9)
    b = poisson_requests(4.0, [100, 200], [10, 20], n=4000, seed=9)
    assert len(a) == 4000
    assert (len(a) - 1) / a[-1].arrival == pytest.approx(2.0, rel=0.05)
    assert [r.prompt for r in a] == [r.prompt for r in b]
    assert b[-1].arrival == pytest.approx(a[-1].arrival / 2)
    d = poisson_requests(5.0, [100], [10], duration=100.0, seed=1)
    assert max(r.arrival for r in d) < 100 and 400 < len(d) < 600
    with pytest.raises(ValueError):
        poisson_requests(0, [1], [1], n=1)


def test_first_token_from_decode_waits_for_the_kv():
    """A route the plan marks first-token-from-decode: TTFT pays the transfer, TPOT does not."""
    plan, _ = _plan(8, cluster=TWO_NODES, groups=(["a:0"], ["b:0"]), codec="none", ttft=5.0, tpot=1.0)
    sim = Simulator(plan, TWO_NODES, MODEL, SLO(5, 1.0), config=ONE)
    early = sim.run(trace_requests([0.0], [2048], [8])).requests[0]
    plan.first_token_from_decode = ["r0->r1"]
    sim = Simulator(plan, TWO_NODES, MODEL, SLO(5, 1.0), config=ONE)
    held = sim.run(trace_requests([0.0], [2048], [8])).requests[0]
    x = cm.kv_transfer_time(MODEL, 2048, MODEL.layers, 10, "none")
    assert held.ttft - early.ttft == pytest.approx(x, rel=1e-9)
    assert held.finish == pytest.approx(early.finish, rel=1e-12) and held.first_token == held.kv_ready


def test_planner_holds_the_first_token_when_short_outputs_cross_a_slow_link():
    """8-token outputs behind a ~1 s transfer would all miss a 0.05 s TPOT with an early first token; the
    route then waits for the KV (TTFT 5 s has room) and the plan says so."""
    plan, _ = _plan(8, cluster=TWO_NODES, groups=(["a:0"], ["b:0"]), codec="none", ttft=5.0, tpot=0.05)
    assert plan.objective > 0 and plan.first_token_from_decode == ["r0->r1"]
    plan, _ = _plan(8, cluster=CLUSTER, codec="none", ttft=5.0, tpot=0.05)  # same node: early is free
    assert plan.objective > 0 and plan.first_token_from_decode == []
