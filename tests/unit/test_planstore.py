"""Plans in JetStream KV: monotonic epochs, compare-and-set, watchers see each newer plan once."""

from __future__ import annotations

import asyncio
import uuid

import nats
import pytest

from thunderserve.common.plan import Plan, Replica
from thunderserve.common.planstore import PlanWatcher, StalePlanError, current_plan, publish_plan
from thunderserve.common.protocol import Subjects


def _plan(epoch: int, decode_weight: float = 1.0) -> Plan:
    return Plan(
        replicas=[Replica("p0", "prefill", ["n0:0"]), Replica("d0", "decode", ["n0:1"]),
                  Replica("d1", "decode", ["n0:2"])],
        dispatch={"p0": 1.0},
        routing={"p0": {"d0": decode_weight, "d1": 1.0 - decode_weight}},
        kv_codec="int4",
        epoch=epoch,
    )


@pytest.fixture
async def nc(nats_url):
    conn = await nats.connect(nats_url)
    yield conn
    await conn.close()


async def test_publish_and_read_back(nc):
    subjects = Subjects(f"t{uuid.uuid4().hex[:6]}")
    assert await current_plan(nc, subjects) is None
    await publish_plan(nc, subjects, _plan(1))
    got = await current_plan(nc, subjects)
    assert got.epoch == 1 and got.routing == {"p0": {"d0": 1.0, "d1": 0.0}}
    with pytest.raises(StalePlanError):
        await publish_plan(nc, subjects, _plan(1, 0.5))
    bad = _plan(2)
    bad.dispatch = {"d0": 1.0}  # a decode replica cannot take dispatch
    with pytest.raises(ValueError):
        await publish_plan(nc, subjects, bad)
    assert (await current_plan(nc, subjects)).epoch == 1


async def test_watcher_applies_current_then_each_newer_plan(nc):
    subjects = Subjects(f"t{uuid.uuid4().hex[:6]}")
    await publish_plan(nc, subjects, _plan(3))
    seen: list[int] = []

    async def on_plan(plan: Plan) -> None:
        seen.append(plan.epoch)

    watcher = PlanWatcher(nc, subjects, on_plan)
    await watcher.start()
    try:
        await publish_plan(nc, subjects, _plan(4, 0.25))
        for _ in range(50):
            if seen[-1:] == [4]:
                break
            await asyncio.sleep(0.05)
        assert seen == [3, 4]
        assert watcher.epoch == 4
    finally:
        await watcher.stop()


def test_apply_cli_publishes_and_refuses_stale(nats_url, tmp_path, capsys):
    from thunderserve.planner.apply_cli import main

    prefix = f"t{uuid.uuid4().hex[:6]}"
    path = tmp_path / "plan.json"
    path.write_text(_plan(5).to_json())
    assert main([str(path), "--nats", nats_url, "--subject-prefix", prefix]) == 0
    assert "epoch 5" in capsys.readouterr().out
    assert main([str(path), "--nats", nats_url, "--subject-prefix", prefix]) == 2
    assert "not newer" in capsys.readouterr().err
    assert main([str(path), "--nats", nats_url, "--subject-prefix", prefix, "--bump"]) == 0
    assert "epoch 6" in capsys.readouterr().out
    (tmp_path / "bad.json").write_text("{nope")
    assert main([str(tmp_path / "bad.json"), "--nats", nats_url]) == 2


def test_epoch_acks_count_a_heartbeat_carrying_the_epoch_or_a_later_one():
    from thunderserve.common.planstore import EpochAcks
    from thunderserve.common.protocol import Heartbeat

    acks = EpochAcks()
    acks.expect(3, ["a", "b"], now=10.0)
    acks.beat(Heartbeat("a", "prefill", "m", plan_epoch=2), now=10.5)  # not yet applied
    acks.beat(Heartbeat("stranger", "decode", "m", plan_epoch=3), now=10.6)  # not in the plan
    assert acks.pending(3) == {"a", "b"} and not acks.done(3)
    acks.beat(Heartbeat("a", "prefill", "m", plan_epoch=3), now=11.0)
    acks.beat(Heartbeat("a", "prefill", "m", plan_epoch=3), now=12.0)  # the first one counts
    acks.beat(Heartbeat("b", "decode", "m", plan_epoch=4), now=13.0)  # already past it
    assert acks.done(3) and acks.ack_times(3) == {"a": 1.0, "b": 3.0}
    assert not acks.done(9) and acks.pending(9) == set()  # never published
    acks.forget(3)
    assert acks.ack_times(3) == {} and not acks.done(3)
