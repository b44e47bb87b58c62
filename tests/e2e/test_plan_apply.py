"""A published plan is hot-applied: phases flip in place, the router follows its tables."""

from __future__ import annotations

import asyncio
import time

import nats
import pytest

from thunderserve.common.client import Client
from thunderserve.common.plan import Plan, Replica
from thunderserve.common.planstore import publish_plan
from thunderserve.common.protocol import Subjects

pytestmark = pytest.mark.slow


async def test_plan_flips_a_replica_and_steers_routing(tiny_cluster):
    tiny_cluster.start_replica("prefill", 1)
    tiny_cluster.wait_ready(timeout=120, prefill=2, decode=1)
    plan = Plan(
        replicas=[Replica("prefill-0", "prefill", ["h:0"]), Replica("prefill-1", "decode", ["h:1"]),
                  Replica("decode-0", "decode", ["h:2"])],
        dispatch={"prefill-0": 1.0},
        routing={"prefill-0": {"prefill-1": 1.0, "decode-0": 0.0}},
        kv_codec="int8",
        epoch=7,
    )
    nc = await nats.connect(tiny_cluster.nats_url)
    try:
        await publish_plan(nc, Subjects(), plan)
    finally:
        await nc.close()

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        health = tiny_cluster.health() or {}
        replicas = {r["id"]: r for r in health.get("replicas", [])}
        if health.get("plan_epoch") == 7 and all(r["plan_epoch"] == 7 for r in replicas.values()) \
                and replicas.get("prefill-1", {}).get("phase") == "decode":
            break
        await asyncio.sleep(0.2)
    assert health["plan_epoch"] == 7
    assert replicas["prefill-1"]["phase"] == "decode" and replicas["prefill-1"]["state"] == "ready"
    assert all(r["plan_epoch"] == 7 for r in replicas.values())  # every replica acknowledged

    before = {rid: r["dispatched"] for rid, r in replicas.items()}
    async with Client(tiny_cluster.nats_url) as client:
        results = await asyncio.gather(*(client.complete(f"Plan {i}", max_tokens=4) for i in range(6)))
    assert all(len(r.token_ids) == 4 for r in results)
    after = {r["id"]: r["dispatched"] for r in tiny_cluster.health()["replicas"]}
    # the plan sends everything prefill-0 -> prefill-1 (now decoding); decode-0 gets nothing
    assert after["prefill-0"] - before["prefill-0"] == 6
    assert after["prefill-1"] - before["prefill-1"] == 6
    assert after["decode-0"] - before["decode-0"] == 0
