"""The orchestration LP on small cases against hand solutions, and the layer-partition DP against
brute force."""

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from thunderserve.planner import Cluster, ModelSpec, Workload
from thunderserve.planner import costmodel as cm
from thunderserve.planner import orchestration as orch
from thunderserve.planner.parallel import partition_layers

CL = Cluster.from_dict({"name": "c", "nodes": [{"name": "a", "gpu": "A40", "count": 4, "intra_gbps": 800},
                                              {"name": "b", "gpu": "A40", "count": 4, "intra_gbps": 800}],
                        "network": {"default_gbps": 8}})


def _load(rid, cap, node="a"):
    return orch.ReplicaLoad(rid, cap, ((node, 0, 32),), latency=0.1, service=0.1)


def _fixed_routes(table):
    return lambda p, d: table[(p.id, d.id)]


def test_lp_without_links_matches_hand_solution():
    # p1 sends 2 req/s to d1 or 1 req/s to d2 (per unit of its time), p2: 1 to d1, 3 to d2;
    # decode capacities d1 = 2.5, d2 = 3.5. Hand solution: p1 -> d1 (2), p2 -> d2 (3): 5 req/s.
    routes = {("p1", "d1"): orch.Route(2.0, 0.0, ()), ("p1", "d2"): orch.Route(1.0, 0.0, ()),
              ("p2", "d1"): orch.Route(1.0, 0.0, ()), ("p2", "d2"): orch.Route(3.0, 0.0, ())}
    pre = [_load("p1", 2.0), _load("p2", 3.0)]
    dec = [_load("d1", 2.5), _load("d2", 3.5)]
    res = orch.solve(CL, pre, dec, _fixed_routes(routes), cm.Calibration(net_eff=1.0))
    assert res.rate == pytest.approx(5.0)
    assert res.flows[("p1", "d1")] == pytest.approx(2.0) and res.flows[("p2", "d2")] == pytest.approx(3.0)


def test_lp_with_a_binding_link_matches_hand_solution():
    # As above, but route p2 -> d2 crosses a link that carries 1 GB/s and each request moves 0.5 GB:
    # x22 <= 2. p2 spends 2/3 of its time on d2 and the rest on d1 (1/3 req/s); p1 -> d1 (2).
    # Hand optimum: 2 + 2 + 1/3 = 13/3.
    link = (("a", "b"), 0.5e9)
    routes = {("p1", "d1"): orch.Route(2.0, 0.0, ()), ("p1", "d2"): orch.Route(1.0, 0.0, ()),
              ("p2", "d1"): orch.Route(1.0, 0.0, ()), ("p2", "d2"): orch.Route(3.0, 0.0, (link,))}
    pre = [_load("p1", 2.0), _load("p2", 3.0)]
    dec = [_load("d1", 2.5), _load("d2", 3.5)]
    res = orch.solve(CL, pre, dec, _fixed_routes(routes), cm.Calibration(net_eff=1.0, link_util_max=1.0))
    assert res.rate == pytest.approx(13 / 3)
    assert res.flows[("p2", "d2")] == pytest.approx(2.0)
    disp = res.dispatch(["p1", "p2"])
    assert disp["p1"] == pytest.approx(2 / (13 / 3)) and sum(disp.values()) == pytest.approx(1.0)
    routing = res.routing(["p1", "p2"], ["d1", "d2"])
    assert routing["p2"]["d2"] == pytest.approx(2 / (7 / 3))


def test_route_metrics_kv_link_bound_by_hand():
    # one prefill replica on node a, one decode on node b, 8 Gbit/s between them (1 GB/s at net_eff 1)
    m = ModelSpec.from_name("llama-7b")
    w = Workload(rate=1.0, prompt_lens=[1000], output_lens=[100], ttft_slo=10.0, tpot_slo=0.1)
    calib = cm.Calibration(net_eff=1.0, hop_latency=0.0, link_util_max=1.0)
    p = orch.ReplicaLoad("p", 100.0, (("a", 0, 32),), latency=0.5, service=0.01)
    d = orch.ReplicaLoad("d", 100.0, (("b", 0, 32),))
    r = orch.route_metrics(CL, m, w, p, d, "none", calib)
    kv = 1000 * m.kv_bytes_per_token  # 524.288 MB per request
    assert r.transfer_s == pytest.approx(kv / 1e9)
    assert dict(r.link_bytes)[("a", "b")] == pytest.approx(kv)
    res = orch.solve(CL, [p], [d], lambda a, b: orch.route_metrics(CL, m, w, a, b, "none", calib), calib)
    assert res.rate == pytest.approx(1e9 / kv)  # the link carries 1.907 req/s
    res4 = orch.solve(CL, [p], [d], lambda a, b: orch.route_metrics(CL, m, w, a, b, "int4", calib), calib)
    assert res4.rate == pytest.approx(1e9 / (kv * 0.28))


def test_a_shared_nic_bounds_the_kv_into_one_node():
    # two prefill replicas (nodes a, b) send to one decode replica on node c; every link carries 1 GB/s
    # (8 Gbit/s at net_eff 1). With c's NIC as fast as a link, the two routes share it: half the rate
    # of a NIC fast enough for both.
    m = ModelSpec.from_name("llama-7b")
    w = Workload(rate=1.0, prompt_lens=[1000], output_lens=[100], ttft_slo=10.0, tpot_slo=0.1)
    calib = cm.Calibration(net_eff=1.0, hop_latency=0.0, link_util_max=1.0)
    pre = [orch.ReplicaLoad(n, 100.0, ((n, 0, 32),), latency=0.5, service=0.01) for n in ("a", "b")]
    dec = [orch.ReplicaLoad("d", 100.0, (("c", 0, 32),))]
    kv = 1000 * m.kv_bytes_per_token

    def rate(nic_c):
        cl = Cluster.from_dict({"nodes": [{"name": n, "gpu": "A40"} for n in "ab"]
                                + [{"name": "c", "gpu": "A40", "nic_gbps": nic_c}], "network": {"default_gbps": 8}})
        return orch.solve(cl, pre, dec, lambda p, d: orch.route_metrics(cl, m, w, p, d, "none", calib), calib)

    assert rate(8).rate == pytest.approx(1e9 / kv)
    shared = rate(8).network_load  # c's NIC full, each link half used (the LP may split the flow either way)
    assert shared["c in"] == pytest.approx(1.0) and shared["a out"] + shared["b out"] == pytest.approx(1.0)
    assert shared["link a-c"] == pytest.approx(shared["a out"]) and "c out" not in shared
    assert rate(16).rate == pytest.approx(2e9 / kv)
    assert rate(16).flows[("a", "d")] == pytest.approx(1e9 / kv)
    # a NIC slower than the link also slows the one transfer down
    assert rate(4).routes[("a", "d")].transfer_s == pytest.approx(2 * kv / 1e9)


def test_lp_needs_both_phases():
    assert orch.solve(CL, [_load("p", 1.0)], [], lambda p, d: None).rate == 0.0
    assert orch.solve(CL, [], [_load("d", 1.0)], lambda p, d: None).rate == 0.0


def _brute(n, per, caps, fixed):
    k = len(per)
    best = None
    for cut in itertools.combinations(range(1, n), k - 1):
        parts = [b - a for a, b in zip((0, *cut), (*cut, n), strict=True)]
        if any(p > c for p, c in zip(parts, caps, strict=True)):
            continue
        v = max(f + p * t for p, t, f in zip(parts, per, fixed, strict=True))
        best = v if best is None else min(best, v)
    return best


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_partition_dp_matches_brute_force(data):
    k = data.draw(st.integers(1, 4))
    n = data.draw(st.integers(1, 14))
    per = data.draw(st.lists(st.floats(0.1, 10.0), min_size=k, max_size=k))
    caps = data.draw(st.lists(st.integers(0, 14), min_size=k, max_size=k))
    fixed = data.draw(st.lists(st.floats(0.0, 5.0), min_size=k, max_size=k))
    got = partition_layers(n, per, caps, fixed)
    want = _brute(n, per, caps, fixed) if n >= k else None
    if want is None:
        assert got is None
    else:
        assert got is not None and sum(got) == n and all(1 <= g <= c for g, c in zip(got, caps, strict=True))
        assert max(f + g * t for g, t, f in zip(got, per, fixed, strict=True)) == pytest.approx(want)


def test_lp_loads_links_at_most_link_util_max():
    # the same single route as above; the default calibration keeps the FIFO link at <= 60% load
    m = ModelSpec.from_name("llama-7b")
    w = Workload(rate=1.0, prompt_lens=[1000], output_lens=[100], ttft_slo=10.0, tpot_slo=0.1)
    calib = cm.Calibration(net_eff=1.0, hop_latency=0.0, link_util_max=0.6)
    p = orch.ReplicaLoad("p", 100.0, (("a", 0, 32),), latency=0.5, service=0.01)
    d = orch.ReplicaLoad("d", 100.0, (("b", 0, 32),))
    res = orch.solve(CL, [p], [d], lambda a, b: orch.route_metrics(CL, m, w, a, b, "none", calib), calib)
    assert res.rate == pytest.approx(0.6 * 1e9 / (1000 * m.kv_bytes_per_token))


def test_route_ttft_does_not_wait_for_the_kv():
    # the first token leaves the prefill replica before the KV moves: TTFT budget = SLO - latency, and a
    # transfer (+ M/G/1 link wait at 60% load) within the TPOT slack of (tpot_slo - tpot) (o - 1) costs nothing
    m = ModelSpec.from_name("llama-7b")
    w = Workload(rate=1.0, prompt_lens=[1000], output_lens=[100], ttft_slo=10.0, tpot_slo=0.1)
    calib = cm.Calibration(net_eff=1.0, hop_latency=0.0, link_util_max=0.6)
    p = orch.ReplicaLoad("p", 100.0, (("a", 0, 32),), latency=0.5, service=0.2, service2=0.04,
                         latencies=(0.5,))
    d = orch.ReplicaLoad("d", 100.0, (("b", 0, 32),), tpot=0.05)
    r = orch.route_metrics(CL, m, w, p, d, "none", calib)
    target = cm.split_attainment(0.9, calib.ttft_miss_share)
    assert r.cap == pytest.approx(cm.prefill_capacity_dist([10.0 - 0.5], 0.2, 0.04, target))


def test_route_pays_the_tpot_misses_of_a_slow_transfer():
    # outputs of 2 and 100 tokens: the 2-token half cannot absorb a ~0.7 s transfer (slack 0.05 s), the
    # 100-token half can (4.95 s); that half of the requests comes out of the route's miss budget
    m = ModelSpec.from_name("llama-7b")
    calib = cm.Calibration(net_eff=1.0, hop_latency=0.0, link_util_max=0.6)
    p = orch.ReplicaLoad("p", 100.0, (("a", 0, 32),), latency=0.5, service=0.2, service2=0.04,
                         latencies=(0.5,))
    d = orch.ReplicaLoad("d", 100.0, (("b", 0, 32),), tpot=0.05)
    x = 1000 * m.kv_bytes_per_token / 1e9
    wait = 0.6 * x / (2 * 0.4)  # deterministic transfer: E[W] = rho x / (2 (1 - rho))
    assert orch.transfer_miss([x + wait], 0.1, 0.05, [2, 100]) == 0.5
    w = Workload(rate=1.0, prompt_lens=[1000], output_lens=[2, 100] * 50, ttft_slo=10.0, tpot_slo=0.1,
                 attainment=0.9)
    assert orch.transfer_miss([x + wait], 0.1, 0.05, w.output_points) == pytest.approx(0.5, abs=0.04)
    r = orch.route_metrics(CL, m, w, p, d, "none", calib)  # ~50% > the 5% budget: the first token waits
    target = cm.split_attainment(0.9, calib.ttft_miss_share)
    assert r.first_from_decode and r.cap == pytest.approx(
        cm.prefill_capacity_dist([10.0 - 0.5 - x - wait], 0.2, 0.04, target))
    w = Workload(rate=1.0, prompt_lens=[1000], output_lens=[2] * 4 + [100] * 76, ttft_slo=10.0, tpot_slo=0.1,
                 attainment=0.9)
    miss = orch.transfer_miss([x + wait], 0.1, 0.05, w.output_points)
    assert 0 < miss < 0.05
    early = cm.prefill_capacity_dist([10.0 - 0.5], 0.2, 0.04, target + miss)
    held = cm.prefill_capacity_dist([10.0 - 0.5 - x - wait], 0.2, 0.04, target)
    r = orch.route_metrics(CL, m, w, p, d, "none", calib)  # the better of the two
    assert r.cap == pytest.approx(max(early, held)) and r.first_from_decode == (held > early)
