"""LivePlanner against a real nats-server, with the replicas' heartbeats and a router's workload
reports published by the test: a silent replica is re-planned away, a returning one brought back, a
death no plan can serve leaves the current plan in place, and a traffic shift re-plans the phases.
(With real replicas: tests/e2e/test_live_planner.py.)"""

from __future__ import annotations

import asyncio
import itertools
import time

import nats
import pytest

from thunderserve.common import protocol
from thunderserve.common.planstore import current_plan
from thunderserve.common.protocol import Heartbeat, Subjects, WorkloadReport
from thunderserve.planner.live import LivePlanner
from thunderserve.planner.planner import Planner
from thunderserve.planner.shift import ShiftPolicy

_prefixes = itertools.count()
IDS = ["prefill-0", "prefill-1", "decode-0"]


async def _scenario(nats_url: str, planner: Planner, base, steps, shift: ShiftPolicy | None = None,
                    ) -> tuple[LivePlanner, list]:
    """Beat for the replicas in each step's set for its duration, and report the step's traffic (if it
    has any: (prompt, output) pairs and their rate) every 0.1 s; return the planner and the stored plans."""
    subjects = Subjects(f"livetest{next(_prefixes)}{int(time.time()) % 10000}")
    nc = await nats.connect(nats_url)
    live = LivePlanner(nc, subjects, planner, base, dead_after_s=1.0, poll_s=0.05, shift=shift)
    stored = []
    try:
        await live.start()
        for alive, seconds, *traffic in steps:
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                for rid in alive:
                    phase = "decode" if rid.startswith("decode") else "prefill"
                    await nc.publish(subjects.heartbeat(rid), protocol.encode(Heartbeat(rid, phase, "m")))
                if traffic:  # a router's report: these requests arrived and finished at `rate`
                    pairs, rate = traffic
                    report = WorkloadReport("router-t", len(pairs) / rate, len(pairs), [p for p, _ in pairs],
                                            [o for _, o in pairs], len(pairs))
                    await nc.publish(subjects.workload, protocol.encode(report))
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


def test_a_traffic_shift_replans_once_it_is_steady_and_a_drift_within_the_threshold_does_not(
        nats_url, three_replica_plan):
    """The base plan is for the code shape (long prompts, short outputs) at 1 req/s: two prefill
    replicas. Chat-like traffic (short prompts, long outputs) makes one of them decode, in one step
    (no plan for the mixture of both); the code shape brings the base phases back. A drift within the
    threshold, and a rate change that serves alike, publish nothing."""
    planner, base = three_replica_plan
    code_like = [(2182, 29), (2182, 28)]  # the trace's mean shape
    chat_like = [(20, 200), (30, 180)]
    drifted = [(25, 210), (22, 190)]
    policy = ShiftPolicy(window_s=1.0, threshold=0.25, min_requests=5, cooldown_s=0.0)
    steps = [(IDS, 1.5, code_like, 1.0), (IDS, 2.5, chat_like, 1.0), (IDS, 1.5, drifted, 1.0),
             (IDS, 2.5, code_like, 1.0), (IDS, 2.0, code_like, 4.0)]
    live, stored = asyncio.run(_scenario(nats_url, planner, base, steps, shift=policy))
    phases = [{r.id: r.phase for r in plan.replicas} for plan in stored]
    assert phases[0] == {"prefill-0": "prefill", "prefill-1": "prefill", "decode-0": "decode"}
    assert sorted(phases[1].values()) == ["decode", "decode", "prefill"]  # a prefill replica now decodes
    assert phases[3] == phases[0]  # the code shape again: the base phases
    assert [plan.epoch for plan in stored] == [1, 2, 2, 3, 3]  # one epoch per shift, none for the drift
    triggers = [h["trigger"] for h in live.history]
    assert triggers[0] == "start" and all(t.startswith("workload shift: ") for t in triggers[1:])
    assert "mean output" in triggers[1] and "mean prompt" in triggers[1]
    assert stored[1].workload["prompt_mean"] == pytest.approx(25, abs=1)  # the plan says what it was made for
    assert stored[1].workload["output_mean"] == pytest.approx(190, abs=1)
    assert live.workload.rate == pytest.approx(4.0)  # the rate shift was noted, and the plan kept


def test_without_a_shift_policy_traffic_is_ignored(nats_url, three_replica_plan):
    planner, base = three_replica_plan
    live, stored = asyncio.run(_scenario(nats_url, planner, base, [(IDS, 1.5, [(20, 200)] * 3, 1.0)]))
    assert [h["epoch"] for h in live.history] == [1] and stored[-1].epoch == 1


def test_a_late_replica_gone_from_nats_is_replanned_away_before_its_heartbeat_timeout(
        nats_url, three_replica_plan):
    """With a 10 s heartbeat timeout: decode-0 stops beating and its connection goes (its process
    died), prefill-1 stops beating but still answers on its control subject (alive, only late). The
    probe finds decode-0 gone within a couple of seconds; prefill-1 is left in the plan."""
    planner, base = three_replica_plan

    async def main() -> tuple[LivePlanner, float | None]:
        subjects = Subjects(f"liveprobe{next(_prefixes)}{int(time.time()) % 10000}")
        nc, replicas = await nats.connect(nats_url), {rid: await nats.connect(nats_url) for rid in IDS}

        async def answer(msg) -> None:
            await msg.respond(protocol.encode({"ok": True}))

        for rid, conn in replicas.items():
            await conn.subscribe(subjects.control(rid), cb=answer)
        live = LivePlanner(nc, subjects, planner, base, dead_after_s=10.0, poll_s=0.05, shift=None)
        gone_after = None
        try:
            await live.start()
            beating, t_stop = set(IDS), None
            for step in range(40):  # 4 s
                if step == 10:
                    beating -= {"decode-0", "prefill-1"}
                    await replicas["decode-0"].close()
                    t_stop = time.monotonic()
                for rid in beating:
                    phase = "decode" if rid.startswith("decode") else "prefill"
                    await replicas[rid].publish(subjects.heartbeat(rid), protocol.encode(Heartbeat(rid, phase, "m")))
                if gone_after is None and len(live.history) > 1:
                    gone_after = time.monotonic() - t_stop
                await asyncio.sleep(0.1)
        finally:
            await live.stop()
            for conn in [nc, *replicas.values()]:
                if not conn.is_closed:
                    await conn.close()
        return live, gone_after

    live, gone_after = asyncio.run(main())
    assert [h["dead"] for h in live.history] == [[], ["decode-0"]]
    assert gone_after is not None and gone_after < 2.5  # the probe, not the 10 s timeout
    assert "prefill-1" in live.history[-1]["phases"]
