"""The live planner re-plans when a replica dies: a prefill replica flips to decode in place (no
weights reloaded), and the requests the dead decode replica held finish on it. It re-plans when the
router's traffic shifts: chat-like requests against a plan made for long prompts flip a prefill
replica to decode, while requests keep flowing."""

from __future__ import annotations

import asyncio
import time

import nats
import pytest

from thunderserve.common import protocol
from thunderserve.common.client import Client
from thunderserve.common.protocol import Subjects, WorkloadReport
from thunderserve.planner.live import LivePlanner
from thunderserve.planner.shift import ShiftPolicy

pytestmark = pytest.mark.slow


async def _until(check, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


async def test_decode_replica_dies_and_a_prefill_replica_takes_its_place(tiny_cluster, three_replica_plan):
    tiny_cluster.start_replica("prefill", 1)
    tiny_cluster.wait_ready(timeout=120, prefill=2, decode=1)
    planner, base = three_replica_plan  # the plan's replicas are named as the local processes are
    nc = await nats.connect(tiny_cluster.nats_url)
    live = LivePlanner(nc, Subjects(), planner, base, dead_after_s=1.5)
    try:
        await live.start()
        await _until(lambda: (tiny_cluster.health() or {}).get("plan_epoch") == live.epoch, 30,
                     "the router to apply the base plan")
        n = 300
        async with Client(tiny_cluster.nats_url, timeout_s=60) as client:
            tasks = [asyncio.create_task(client.complete(f"Story {i}:", max_tokens=n, ignore_eos=True,
                                                         temperature=0)) for i in range(3)]
            await _until(lambda: sum(r["running"] for r in (tiny_cluster.health() or {}).get("replicas", [])
                                     if r["id"] == "decode-0") == 3, 30, "the requests to reach decode-0")
            tiny_cluster.kill("decode-0")
            results = await asyncio.wait_for(asyncio.gather(*tasks), timeout=120)
    finally:
        await live.stop()
        await nc.close()
    assert all(r.finish_reason == "length" and len(r.token_ids) == n for r in results)
    last = live.history[-1]
    assert last["dead"] == ["decode-0"] and sorted(last["phases"].values()) == ["decode", "prefill"]
    flipped = next(rid for rid, phase in last["phases"].items() if phase == "decode")
    replicas = {r["id"]: r for r in tiny_cluster.health()["replicas"]}
    assert replicas[flipped]["phase"] == "decode" and replicas[flipped]["plan_epoch"] == last["epoch"]
    assert last["replan_ms"] < 1000
    # the planner recorded when each replica of the new plan applied it (the flipped one after its drain)
    assert sorted(last["acks_s"]) == sorted(last["phases"]) and last["applied_s"] == max(last["acks_s"].values())


async def test_the_routers_traffic_shifts_and_a_prefill_replica_becomes_a_decode_replica(make_cluster,
                                                                                     three_replica_plan):
    cluster = make_cluster(model="tiny-random", prefill=2, decode=1, threads_per_replica=1,
                           extra_env={"THUNDERSERVE_WORKLOAD_PERIOD": "0.25"})
    planner, base = three_replica_plan  # made for the code shape: ~2,200-token prompts, ~29 output tokens
    nc = await nats.connect(cluster.nats_url)
    reports: list[WorkloadReport] = []

    async def on_report(msg):
        reports.append(protocol.decode(WorkloadReport, msg.data))

    await nc.subscribe(Subjects().workload, cb=on_report)
    policy = ShiftPolicy(window_s=3.0, threshold=0.25, min_requests=6, cooldown_s=0.0)
    live = LivePlanner(nc, Subjects(), planner, base, dead_after_s=3.0, shift=policy)
    n = 200  # the planner flips a replica at this shape (at 60 output tokens two prefill replicas still win)
    try:
        await live.start()
        await _until(lambda: (cluster.health() or {}).get("plan_epoch") == live.epoch, 30,
                     "the router to apply the base plan")
        async with Client(cluster.nats_url, timeout_s=60) as client:
            tasks = []
            deadline = time.monotonic() + 60
            while live.epoch == 1 and time.monotonic() < deadline:  # chat-like: short prompts, long outputs
                tasks.append(asyncio.create_task(client.complete(f"Hi {len(tasks)}", max_tokens=n, ignore_eos=True,
                                                                 temperature=0)))
                await asyncio.sleep(0.25)
            after = [asyncio.create_task(client.complete("And now?", max_tokens=n, ignore_eos=True))
                     for _ in range(2)]
            results = await asyncio.wait_for(asyncio.gather(*tasks, *after), timeout=120)
        # the router reports every 0.25 s: give the last requests' report time to come (a loaded host
        # finishes many long outputs at once)
        deadline = time.monotonic() + 5
        while sum(len(rep.prompt_lens) for rep in reports) < len(results) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
    finally:
        await live.stop()
        await nc.close()
    assert live.epoch == 2, "no re-plan for the shifted traffic"
    assert all(r.finish_reason == "length" and len(r.token_ids) == n for r in results)  # none lost in the flip
    last = live.history[-1]
    assert last["trigger"].startswith("workload shift: ") and "mean prompt" in last["trigger"]
    assert sorted(last["phases"].values()) == ["decode", "decode", "prefill"]
    flipped = next(rid for rid, phase in last["phases"].items() if rid.startswith("prefill") and phase == "decode")
    await _until(lambda: {r["id"]: r for r in cluster.health()["replicas"]}[flipped]["phase"] == "decode", 30,
                 f"{flipped} to flip to decode")
    # what the router reported is what was served: each finished request's (prompt, output) lengths
    served = sorted((r.usage.prompt_tokens, r.usage.completion_tokens) for r in results)
    reported = sorted(pair for rep in reports for pair in zip(rep.prompt_lens, rep.output_lens, strict=True))
    assert sum(rep.sampled_of for rep in reports) >= len(reported)
    assert set(reported) <= set(served) and len(reported) == len(results)
    assert sum(rep.arrivals for rep in reports) >= len(results)
    assert last["workload"]["output_mean"] == pytest.approx(n)
