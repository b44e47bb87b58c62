"""The Plan data model: plain-dict / JSON round trip and consistency checks."""

import json

import pytest

from thunderserve.common.plan import Plan, Replica, Stage


def _plan() -> Plan:
    return Plan(
        replicas=[
            Replica("r0", "prefill", ["n0:0", "n0:1"], [Stage(["n0:0", "n0:1"], 2, 0, 32, "n0", "A40")],
                    capacity=1.5, tokens_per_s=3000.0, price_per_hour=0.8, latency_s=0.4),
            Replica("r1", "decode", ["n1:0", "n1:1"],
                    [Stage(["n1:0"], 1, 0, 16, "n1", "RTX3090Ti"), Stage(["n1:1"], 1, 16, 32, "n1", "RTX3090Ti")],
                    capacity=2.0, tokens_per_s=500.0, tpot_s=0.05, max_sequences=24),
        ],
        dispatch={"r0": 1.0},
        routing={"r0": {"r1": 1.0}},
        kv_codec="int4",
        epoch=3,
        model="llama-7b",
        model_layers=32,
        objective=1.5,
        workload={"name": "code", "rate": 1.0},
        first_token_from_decode=["r0->r1"],
        meta={"note": "x", "nested": {"a": [1, 2.5, True]}},
    )


def _plain(x) -> bool:
    if isinstance(x, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in x.items())
    if isinstance(x, list):
        return all(_plain(v) for v in x)
    return isinstance(x, (str, int, float, bool))


def test_dict_and_json_round_trip():
    p = _plan()
    d = p.to_dict()
    assert _plain(d)  # msgpack-able: only str/int/float/bool/list/dict
    assert Plan.from_dict(d) == p
    assert Plan.from_json(p.to_json()) == p
    assert Plan.from_dict(json.loads(json.dumps(d))).to_dict() == d
    assert Plan.from_json(p.to_json()).first_token_waits("r0", "r1")
    assert not p.first_token_waits("r1", "r0")


def test_router_facing_fields_are_simple():
    p = _plan()
    assert [(r.id, r.phase) for r in p.replicas] == [("r0", "prefill"), ("r1", "decode")]
    assert p.dispatch == {"r0": 1.0} and p.routing == {"r0": {"r1": 1.0}}
    assert p.prefill_ids == ["r0"] and p.decode_ids == ["r1"]
    assert p.replica("r1").layout == "TP1xPP2" and p.replica("r0").layout == "TP2xPP1"
    p.validate()


def test_unknown_keys_are_ignored_and_newer_schema_rejected():
    d = _plan().to_dict()
    d["future_field"] = 1
    d["replicas"][0]["future"] = "x"
    assert Plan.from_dict(d).replicas[0].id == "r0"
    d["schema"] = 99
    with pytest.raises(ValueError):
        Plan.from_dict(d)


@pytest.mark.parametrize("breaker", [
    lambda p: p.replicas[1].gpus.append("n0:0"),  # GPU in two replicas
    lambda p: p.dispatch.update({"r1": 0.5}),  # dispatch to a decode replica
    lambda p: p.routing.update({"r0": {"r1": 0.5}}),  # row not summing to 1
    lambda p: setattr(p.replicas[1].stages[1], "layer_end", 30),  # layers not covered
    lambda p: setattr(p.replicas[0], "phase", "training"),
])
def test_validate_catches_inconsistency(breaker):
    p = _plan()
    breaker(p)
    with pytest.raises(ValueError):
        p.validate()


def test_validate_accepts_colocated_replicas_in_dispatch():
    p = _plan()
    p.replicas.append(Replica("c0", "colocated", ["n2:0"], [Stage(["n2:0"], 1, 0, 32, "n2", "A40")], capacity=1.0))
    p.dispatch = {"r0": 0.5, "c0": 0.5}
    p.validate()
    p.dispatch = {"r0": 0.5, "nope": 0.5}
    with pytest.raises(ValueError):
        p.validate()
