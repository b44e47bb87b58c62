"""The live planner re-plans when a replica dies: a prefill replica flips to decode in place (no
weights reloaded), and the requests the dead decode replica held finish on it."""

from __future__ import annotations

import asyncio
import time

import nats
import pytest

from thunderserve.common.client import Client
from thunderserve.common.protocol import Subjects
from thunderserve.planner.live import LivePlanner

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
