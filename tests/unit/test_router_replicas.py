"""The router's replica choice: least loaded, plan weights, and avoiding a failed attempt's replicas."""

from __future__ import annotations

import pytest

from thunderserve.common.protocol import Heartbeat
from thunderserve.router.replicas import NoReplicaError, ReplicaTable


def _table(*beats: Heartbeat) -> ReplicaTable:
    table = ReplicaTable(timeout_s=60)
    for beat in beats:
        table.update(beat)
    return table


def test_least_loaded_then_avoid_then_fallback() -> None:
    table = _table(Heartbeat("d0", "decode", "m", capacity=4, running=0),
                   Heartbeat("d1", "decode", "m", capacity=4, running=3),
                   Heartbeat("p0", "prefill", "m", capacity=4))
    assert table.choose("decode").beat.replica_id == "d0"
    assert table.choose("decode", avoid=frozenset({"d0"})).beat.replica_id == "d1"  # busier, but not the failed one
    assert table.choose("prefill", avoid=frozenset({"p0"})).beat.replica_id == "p0"  # the only one: still chosen
    with pytest.raises(NoReplicaError):
        _table().choose("decode", avoid=frozenset({"d0"}))


def test_plan_weights_and_stopping_replicas() -> None:
    table = _table(Heartbeat("d0", "decode", "m", capacity=4), Heartbeat("d1", "decode", "m", capacity=4))
    assert table.choose("decode", {"d1": 1.0}).beat.replica_id == "d1"  # the plan routes only to d1
    table.update(Heartbeat("d1", "decode", "m", capacity=4, state="stopping"))
    assert table.choose("decode", {"d1": 1.0}).beat.replica_id == "d0"  # d1 leaves: the plan's weight cannot keep it
    table.forget("d0")  # d0 is found dead (a probe)
    assert table.expired() == {"d1": True, "d0": False}  # d1 said goodbye; d0 did not
    assert table.expired() == {}


def test_a_new_session_is_reported_and_seen_after_filters_stale_replicas():
    import time

    from thunderserve.common.protocol import Heartbeat
    from thunderserve.router.replicas import NoReplicaError, ReplicaTable

    table = ReplicaTable(timeout_s=5.0)
    assert table.update(Heartbeat("p", "prefill", "m", session="a-1")) is False  # first sight
    assert table.update(Heartbeat("p", "prefill", "m", session="a-1")) is False
    assert table.update(Heartbeat("p", "prefill", "m", session="a-2")) is True  # reconnected
    assert table.update(Heartbeat("p", "prefill", "m", session="b-1")) is True  # restarted under its id
    mark = time.monotonic()
    with pytest.raises(NoReplicaError):
        table.choose("prefill", seen_after=mark)  # not heard from since
    table.update(Heartbeat("p", "prefill", "m", session="b-1"))
    assert table.choose("prefill", seen_after=mark).beat.replica_id == "p"


def test_a_request_enters_at_a_prefill_or_a_colocated_replica() -> None:
    table = _table(Heartbeat("p0", "prefill", "m", capacity=1, running=1),
                   Heartbeat("c0", "colocated", "m", capacity=64, running=40),
                   Heartbeat("d0", "decode", "m", capacity=64))
    # a colocated replica is as busy as the prompts it holds: none here (its 40 decoding sequences do not count)
    assert table.choose(("prefill", "colocated")).beat.replica_id == "c0"
    assert table.choose(("prefill", "colocated"), {"p0": 1.0}).beat.replica_id == "p0"  # the plan's dispatch
    table.update(Heartbeat("c0", "colocated", "m", capacity=64, running=40, waiting=3))
    assert table.choose(("prefill", "colocated")).beat.replica_id == "p0"  # 1 prompt against 3
    table.replicas["p0"].assigned = 4  # this router's own count reacts before the heartbeats do
    assert table.choose(("prefill", "colocated")).beat.replica_id == "c0"
    assert table.choose("prefill").beat.replica_id == "p0"
    with pytest.raises(NoReplicaError, match="no decode or colocated replica"):
        _table(Heartbeat("p0", "prefill", "m")).choose(("decode", "colocated"))


def test_idle_replicas_share_requests_by_the_plans_weights() -> None:
    """Light traffic (every replica idle at each choice): the split follows the weights, not the table's order."""
    table = _table(Heartbeat("p0", "prefill", "m", capacity=1), Heartbeat("p1", "prefill", "m", capacity=1),
                   Heartbeat("c0", "colocated", "m", capacity=64))
    counts = {"p0": 0, "p1": 0, "c0": 0}
    for _ in range(60):
        view = table.choose(("prefill", "colocated"), {"p0": 1.0, "p1": 2.0, "c0": 3.0})
        view.dispatched += 1  # (the router counts it; the request ends before the next one comes)
        counts[view.beat.replica_id] += 1
    assert counts == {"p0": 10, "p1": 20, "c0": 30}
    for _ in range(6):
        view = table.choose("prefill")
        view.dispatched += 1
    # no weights: the one sent the fewest catches up
    assert (table.replicas["p0"].dispatched, table.replicas["p1"].dispatched) == (16, 20)
