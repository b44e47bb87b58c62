"""`thunderserve status`: the plan, the replicas heard from, the silent ones and the traffic, read off
a real nats-server where the test plays the replicas and a router."""

from __future__ import annotations

import asyncio
import json
import uuid

import nats

from thunderserve.common import protocol
from thunderserve.common.natsserver import free_port
from thunderserve.common.plan import Plan, Replica
from thunderserve.common.planstore import publish_plan
from thunderserve.common.protocol import Heartbeat, Subjects, WorkloadReport
from thunderserve.planner.status_cli import format_status, gather, main


async def _deployment(nats_url: str, subjects: Subjects) -> dict:
    nc = await nats.connect(nats_url)
    plan = Plan(replicas=[Replica("r0", "prefill", ["h:0"]), Replica("r1", "decode", ["h:1"]),
                          Replica("r2", "decode", ["h:2"])], epoch=4, kv_codec="int4",
                workload={"rate": 2.0, "prompt_mean": 100.0, "output_mean": 20.0})
    await publish_plan(nc, subjects, plan)

    async def play() -> None:  # r2 is silent; r1 has not applied epoch 4 yet
        for _ in range(12):
            await nc.publish(subjects.heartbeat("r0"), protocol.encode(Heartbeat("r0", "prefill", "m", plan_epoch=4)))
            await nc.publish(subjects.heartbeat("r1"), protocol.encode(
                Heartbeat("r1", "decode", "m", running=3, capacity=8, plan_epoch=3, state="draining")))
            await nc.publish(subjects.workload, protocol.encode(
                WorkloadReport("router-x", 0.5, 2, [300, 500], [10, 30], 2)))
            await asyncio.sleep(0.1)

    player = asyncio.create_task(play())
    try:
        return await gather(nats_url, subjects, 1.0)
    finally:
        await player
        await nc.close()


def test_status_shows_the_plan_the_replicas_the_silent_ones_and_the_traffic(nats_url):
    subjects = Subjects(f"st{uuid.uuid4().hex[:6]}")
    status = asyncio.run(_deployment(nats_url, subjects))
    assert status["plan"]["epoch"] == 4 and status["silent"] == ["r2"]
    by_id = {r["id"]: r for r in status["replicas"]}
    assert sorted(by_id) == ["r0", "r1"] and by_id["r1"]["state"] == "draining" and by_id["r1"]["running"] == 3
    [traffic] = status["traffic"]
    assert traffic["router"] == "router-x" and traffic["rate"] == 4.0  # 2 arrivals per 0.5 s
    assert traffic["prompt_mean"] == 400.0 and traffic["output_mean"] == 20.0
    text = format_status(status)
    assert text.splitlines()[0].startswith("plan epoch 4 (published")
    assert "r1" in text and "(not applied yet)" in text and "in the plan but silent: r2" in text
    assert "router-x: 4.0 req/s" in text
    json.dumps(status)  # --json prints it as is


def test_an_empty_deployment_and_an_unreachable_server(nats_url, capsys):
    status = asyncio.run(gather(nats_url, Subjects(f"st{uuid.uuid4().hex[:6]}"), 0.3))
    text = format_status(status)
    assert "no plan published" in text and "no replica heart-beat within 0.3 s" in text
    assert main(["--nats", f"nats://127.0.0.1:{free_port()}", "--listen", "0.2"]) == 1
    err = capsys.readouterr().err.strip()
    assert "cannot reach NATS" in err and len(err.splitlines()) == 1
    assert main(["--listen", "0"]) == 2
