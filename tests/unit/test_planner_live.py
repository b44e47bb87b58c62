"""LivePlanner against a real nats-server, with the replicas' heartbeats published by the test:
a silent replica is re-planned away, a returning one brought back, and a death no plan can serve
leaves the current plan in place. (With real replicas: tests/e2e/test_live_planner.py.)"""

from __future__ import annotations

import asyncio
import itertools
import time

import nats

from thunderserve.common import protocol
from thunderserve.common.planstore import current_plan
from thunderserve.common.protocol import Heartbeat, Subjects
from thunderserve.planner.live import LivePlanner
from thunderserve.planner.planner import Planner

_prefixes = itertools.count()
IDS = ["prefill-0", "prefill-1", "decode-0"]


async def _scenario(nats_url: str, planner: Planner, base, steps) -> tuple[LivePlanner, list]:
    """Beat for the replicas in each step's set for its duration; return the planner and the stored plans."""
    subjects = Subjects(f"livetest{next(_prefixes)}{int(time.time()) % 10000}")
    nc = await nats.connect(nats_url)
    live = LivePlanner(nc, subjects, planner, base, dead_after_s=1.0, poll_s=0.05)
    stored = []
    try:
        await live.start()
        for alive, seconds in steps:
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                for rid in alive:
                    phase = "decode" if rid.startswith("decode") else "prefill"
                    await nc.publish(subjects.heartbeat(rid), protocol.encode(Heartbeat(rid, phase, "m")))
                await asyncio.sleep(0.1)
            stored.append(await current_plan(nc, subjects))
    finally:
        await live.stop()
        await nc.close()
    return live, stored


def test_a_silent_replica_is_replanned_away_and_back(nats_url, three_replica_plan):
    planner, base = three_replica_plan
    steps = [(IDS, 1.5), (["prefill-0", "prefill-1"], 2.5), (IDS, 1.5)]
    live, stored = asyncio.run(_scenario(nats_url, planner, base, steps))
    assert [h["dead"] for h in live.history] == [[], ["decode-0"], []]
    assert [h["epoch"] for h in live.history] == [1, 2, 3]
    phases = [{r.id: r.phase for r in plan.replicas} for plan in stored]
    assert [plan.epoch for plan in stored] == [1, 2, 3]
    assert phases[0] == {"prefill-0": "prefill", "prefill-1": "prefill", "decode-0": "decode"}
    assert sorted(phases[1]) == ["prefill-0", "prefill-1"]
    assert sorted(phases[1].values()) == ["decode", "prefill"]  # one prefill replica now decodes
    assert phases[2] == phases[0]  # decode-0 is back: the base plan again


def test_a_death_no_plan_can_serve_keeps_the_current_plan(nats_url, three_replica_plan, caplog):
    planner, base = three_replica_plan
    steps = [(IDS, 1.5), (["prefill-0"], 2.5)]  # one replica cannot hold both phases
    live, stored = asyncio.run(_scenario(nats_url, planner, base, steps))
    assert [h["epoch"] for h in live.history] == [1]
    assert stored[-1].epoch == 1
    assert live.dead == frozenset({"prefill-1", "decode-0"})  # noted, so it is not retried every poll
    assert "no plan can serve without them" in caplog.text
