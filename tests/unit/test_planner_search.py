"""The upper level: tabu search against exhaustive enumeration, the phase mix, slow links."""

import re
from pathlib import Path

import pytest

from thunderserve.planner import Cluster, ModelSpec, Planner, Workload
from thunderserve.planner.search import exhaustive_search
from thunderserve.planner.synthetic import random_cluster

CLUSTERS = Path(__file__).resolve().parents[2] / "deploy" / "clusters"


def _paper(gbps: int) -> Cluster:
    return Cluster.from_yaml(CLUSTERS / f"a40-3090ti-{gbps}g.yaml")


def _cross_fraction(plan) -> float:
    """Share of the request flow whose KV crosses between nodes."""
    nodes = {r.id: {s.node for s in r.stages} for r in plan.replicas}
    tot = 0.0
    for p, w in plan.dispatch.items():
        for d, x in plan.routing.get(p, {}).items():
            if nodes[p] != nodes[d] or len(nodes[p]) > 1:
                tot += w * x
    return tot


def test_shipped_clusters_load():
    c = Cluster.from_yaml(CLUSTERS / "cloud-32.yaml")
    assert c.n_gpus == 32 and 13.0 <= c.price_per_hour() <= 14.0
    assert len({n.gpu.name for n in c.nodes}) >= 5
    assert c.gpu_ids()[:2] == ["a40a:0", "a40a:1"]
    assert _paper(5).gbps("n0", "n1") == 5 and _paper(40).gbps("n0", "n1") == 40
    a100 = Cluster.from_yaml(CLUSTERS / "a100-8x.yaml")
    assert a100.n_gpus == 8 and {n.gpu.name for n in a100.nodes} == {"A100-80G"}


def test_a_nodes_nic_is_its_fastest_link_unless_given():
    c = Cluster.from_yaml(CLUSTERS / "cloud-32.yaml")
    assert c.nic_gbps("a40a") == 40 and c.nic_gbps("a5k") == 10 and c.nic_gbps("r3090a") == 25
    spec = {"nodes": [{"name": "a", "gpu": "A40"}, {"name": "b", "gpu": "A40", "nic_gbps": 4}],
            "network": {"default_gbps": 10}}
    two = Cluster.from_dict(spec)
    assert two.nic_gbps("a") == 10 and two.nic_gbps("b") == 4
    assert two.path_gbps("a", "b") == 4 and two.gbps("a", "b") == 10  # one transfer: the slower NIC
    assert [k for k, _ in two.transfer_resources("a", "b")] == [("link", "a", "b"), ("out", "a"), ("in", "b")]
    assert [k for k, _ in two.transfer_resources("b", "a")] == [("link", "a", "b"), ("out", "b"), ("in", "a")]
    assert two.transfer_resources("a", "a") == [(("link", "a", "a"), two.node("a").intra_gbps)]
    assert Cluster.from_dict(two.to_dict()).nic_gbps("b") == 4
    assert "nic_gbps" not in Cluster.from_dict(two.to_dict()).to_dict()["nodes"][0]
    with pytest.raises(ValueError, match="nic_gbps must be a number above 0"):
        Cluster.from_dict({"nodes": [{"name": "a", "gpu": "A40", "nic_gbps": 0}]})
    assert Cluster.from_dict({"nodes": [{"name": "a", "gpu": "A40", "nic_gbps": "1e3"}]}).nic_gbps("a") == 1000


@pytest.mark.parametrize("spec,needle", [
    ({"network": {"default_gbps": 0}}, "default_gbps must be a number above 0, not 0"),  # was a ZeroDivisionError
    ({"network": {"links": [["a", "b", -1]]}}, "gbps must be a number above 0"),
    ({"network": "fast"}, "'network' must be a mapping"),
    ({"nodes": [{"name": "a", "gpu": "A40", "count": "two"}]}, "count must be a whole number >= 1, not 'two'"),
    ({"nodes": [{"name": "a", "gpu": "A40", "count": 1.5}]}, "count must be a whole number"),
    ({"nodes": [{"name": "a", "gpu": "A40", "intra_gbps": True}]}, "intra_gbps must be a number above 0"),
    ({"nodes": [{"name": "a", "gpu": "A40", "price_per_gpu_hour": -1}]}, "price_per_gpu_hour must be a number >= 0"),
])
def test_a_cluster_file_with_a_bad_number_names_it(spec, needle):
    base = {"nodes": [{"name": "a", "gpu": "A40"}, {"name": "b", "gpu": "A40"}]}
    with pytest.raises(ValueError, match=re.escape(needle)):
        Cluster.from_dict({**base, **spec})


CASES = [(_paper(40), "llama-13b", "code"), (_paper(40), "llama-30b", "conversation"),
         (_paper(5), "llama-13b", "conversation"), (_paper(5), "llama-30b", "code")]
CASES += [(random_cluster(s), ["llama-7b", "llama-13b"][s % 2], ["code", "conversation"][(s // 2) % 2])
          for s in (0, 3, 5, 9, 24, 30)]


@pytest.mark.parametrize("cluster,model,shape", CASES, ids=[f"{c.name}-{m}-{w}" for c, m, w in CASES])
def test_tabu_matches_exhaustive_on_small_clusters(cluster, model, shape):
    m, w = ModelSpec.from_name(model), Workload.from_name(shape, rate=2.0)
    plan = Planner(cluster, m, w).solve()
    best = exhaustive_search(Planner(cluster, m, w))
    assert plan.objective == pytest.approx(best.score, rel=1e-9)
    plan.validate()


def test_plan_scores_the_same_through_score():
    c = _paper(40)
    planner = Planner(c, ModelSpec.from_name("llama-13b"), Workload.from_name("conversation", rate=2.0))
    plan = planner.solve()
    groups = [r.gpus for r in plan.replicas]
    phases = [r.phase for r in plan.replicas]
    fresh = Planner(c, ModelSpec.from_name("llama-13b"), Workload.from_name("conversation", rate=2.0))
    assert fresh.score(groups, phases) == pytest.approx(plan.objective, rel=1e-12)
    assert planner.score(groups, phases) == pytest.approx(plan.objective, rel=1e-12)
    assert plan.predicted_goodput == pytest.approx(min(2.0, plan.objective))
    assert plan.price_per_hour == pytest.approx(c.price_per_hour([g for r in plan.replicas for g in r.gpus]))
    # a designation without a decode replica cannot serve anything
    assert fresh.score(groups, ["prefill"] * len(groups)) == 0.0


def test_score_rejects_bad_input():
    planner = Planner(_paper(40), ModelSpec.from_name("llama-7b"), Workload.from_name("code", rate=1.0))
    with pytest.raises(ValueError):
        planner.score([["n0:0"]], ["prefill", "decode"])
    with pytest.raises(ValueError):
        planner.score([["n0:0"]], ["training"])


def _prefill_share(plan) -> float:
    pre = sum(r.price_per_hour for r in plan.replicas if r.phase == "prefill")
    return pre / sum(r.price_per_hour for r in plan.replicas)


@pytest.mark.parametrize("cluster", [_paper(40), _paper(5), Cluster.from_yaml(CLUSTERS / "a100-8x.yaml")],
                         ids=["40g", "5g", "a100"])
def test_code_shape_gets_more_prefill_than_conversation(cluster):
    m = ModelSpec.from_name("llama-13b")
    code = Planner(cluster, m, Workload.from_name("code", rate=2.0)).solve()
    conv = Planner(cluster, m, Workload.from_name("conversation", rate=2.0)).solve()
    assert _prefill_share(code) > _prefill_share(conv)
    tok = lambda plan: sum(r.tokens_per_s for r in plan.replicas if r.phase == "prefill")  # noqa: E731
    assert tok(code) > tok(conv)


@pytest.mark.parametrize("model,shape", [("llama-13b", "code"), ("llama-13b", "conversation"),
                                         ("llama-30b", "code"), ("llama-30b", "conversation")])
def test_slow_link_keeps_kv_inside_nodes_or_compresses(model, shape):
    m, w = ModelSpec.from_name(model), Workload.from_name(shape, rate=2.0)
    slow = Planner(_paper(5), m, w).solve()
    fast = Planner(_paper(40), m, w).solve()
    assert slow.kv_codec != "none" or _cross_fraction(slow) < 1e-9  # compresses, or keeps KV inside nodes
    assert slow.objective <= fast.objective
    # with compression off, the slow link moves less of the flow across nodes
    slow_raw = Planner(_paper(5), m, w, codec="none").solve()
    fast_raw = Planner(_paper(40), m, w, codec="none").solve()
    assert _cross_fraction(slow_raw) <= _cross_fraction(fast_raw) + 1e-9


def test_time_limit_is_respected():
    import time

    from thunderserve.planner.synthetic import cloud_cluster
    planner = Planner(cloud_cluster(32), ModelSpec.from_name("llama-30b"), Workload.from_name("code", rate=2.0))
    t = time.monotonic()
    plan = planner.solve(time_limit_s=1.0)
    assert time.monotonic() - t < 8.0  # the limit plus one iteration and plan building (shared cores)
    assert plan.objective > 0
    plan.validate()


def test_plan_carries_cluster_spec():
    cl = Cluster.from_yaml(Path(__file__).resolve().parents[2] / "deploy" / "clusters" / "a40-3090ti-40g.yaml")
    w = Workload.from_name("conversation", rate=1.0)
    plan = Planner(cl, ModelSpec.from_name("llama-7b"), w).solve(time_limit_s=2)
    assert plan.meta["cluster_spec"] == cl.to_dict()
    assert Cluster.from_dict(plan.meta["cluster_spec"]).gpu_ids() == cl.gpu_ids()


# --- issue 4: the search must not stall on null moves; the LP-free bounds must be exact -------------
def _seed_planner(seed: int) -> Planner:
    return Planner(random_cluster(seed), ModelSpec.from_name(["llama-7b", "llama-13b"][seed % 2]),
                   Workload.from_name(["code", "conversation"][(seed // 2) % 2], rate=2.0))


@pytest.mark.parametrize("seed", [74, 76, 147])
def test_tabu_leaves_local_optima_that_used_to_pin_it(seed):
    """Seeds 74 and 76 of planner_quality: the search sat on a local optimum (ratio 0.934 / 0.938)
    because swapping two single-GPU groups of one phase re-created the current state and won.
    Seed 147 (2+2 RTX 4090, 4 A5000): the optimum is the mirror image of a 2-group local optimum,
    reachable only by swapping the two groups' phases."""
    plan = _seed_planner(seed).solve()
    best = exhaustive_search(_seed_planner(seed))
    assert plan.objective >= best.score * 0.99


def test_candidates_exclude_the_current_state():
    from thunderserve.planner.search import State, _canon, apply, candidates, moves

    planner = _seed_planner(76)  # n0: 4x RTX 3090 Ti, n1: 2x L40
    state = State((("n0:0", "n0:1", "n0:2"), ("n0:3",), ("n1:0",), ("n1:1",)),
                  ("prefill", "decode", "prefill", "decode"))
    ms = moves(state)
    raw = [s for m in ms for s in apply(state, m, planner)]
    key = _canon(planner, state)
    assert any(_canon(planner, s) == key for s in raw)  # the swap n0:3 <-> n1:1 is a null move
    cands = candidates(planner, state, ms)
    keys = [_canon(planner, s) for s in cands]
    assert key not in keys and len(set(keys)) == len(keys) > 0


def _random_states(planner: Planner, n: int, seed: int = 0):
    import random

    rng = random.Random(seed)
    ids = planner.cluster.gpu_ids()
    for _ in range(n):
        rng.shuffle(ids)
        groups, rest = [], list(ids)
        while rest:
            k = rng.randint(1, min(4, len(rest)))
            groups.append(rest[:k])
            rest = rest[k:]
        yield groups, [rng.choice(["prefill", "decode"]) for _ in groups]


@pytest.mark.parametrize("seed", [74, 76, 5])
def test_route_bound_bounds_the_score(seed):
    planner = _seed_planner(seed)
    checked = 0
    for groups, phases in _random_states(planner, 60, seed):
        sc = planner.score(groups, phases)
        fresh = _seed_planner(seed)  # no cached score: the bound itself
        rb = fresh.route_bound(groups, phases)
        assert sc <= rb * (1 + 1e-7) and rb <= planner.bound(groups, phases) * (1 + 1e-9)
        checked += sc > 0
    assert checked >= 5


def test_codec_choice_skips_only_lps_that_cannot_win():
    """choose_codec skips a codec's LP when its route bound is short of the tolerance; the answer
    must be what solving every codec gives."""
    planner = _seed_planner(76)
    seen = set()
    for groups, phases in _random_states(planner, 80, 1):
        _, parts = planner._key(groups, phases)
        items = [(f"g{i}", planner._sig_perf(sig, ph)) for i, (sig, ph) in enumerate(parts)]
        codec, res = planner.choose_codec(items)
        ref = {c: planner.orchestrate(items, c).rate for c in ("int4", "none", "int8")}
        want = "int4"
        if ref["int4"] > 0:
            want = next((c for c in ("none", "int8") if ref[c] >= ref["int4"] * (1 - planner.codec_tolerance)),
                        "int4")
        assert codec == want and res.rate == pytest.approx(ref[want], rel=1e-12)
        seen.add(codec)
    assert len(seen) >= 2  # the cases exercise both a skipped and a taken codec


# --- issue 5: the search contains the DistServe-style placements, so it must never lose to them -------
@pytest.mark.parametrize("seed", range(12))
def test_search_never_loses_to_the_distserve_style_placement(seed):
    from thunderserve.planner import baselines as bl

    plan = _seed_planner(seed).solve()
    ds = bl.distserve_plans(random_cluster(seed), _seed_planner(seed).model, _seed_planner(seed).workload)
    assert plan.objective >= (ds[0].objective if ds else 0.0) * (1 - 1e-9)


def test_chain_floor_on_the_cloud_cluster():
    """cloud-32, LLaMA-30B code: the search used to return a plan its own objective ranked below the
    DistServe-style cut 4D(TP4xPP1)+1P(TP4xPP4) (4.89 vs 4.91 req/s). Even under a short time limit it
    now returns at least the best two-size cut along the widest-link chain."""
    from thunderserve.planner.experiment import load_cluster
    from thunderserve.planner.search import chain_state

    p = Planner(load_cluster("cloud-32"), ModelSpec.from_name("llama-30b"), Workload.from_name("code"))
    c = chain_state(p)
    floor = p.score(c.groups, c.phases)
    assert floor > 0
    assert p.solve(time_limit_s=2.0).objective >= floor * (1 - 1e-9)
