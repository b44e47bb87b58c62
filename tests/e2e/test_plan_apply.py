"""A published plan is hot-applied: phases flip in place, the router follows its tables."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import nats
import pytest

from thunderserve.common.client import Client
from thunderserve.common.plan import Plan, Replica
from thunderserve.common.planstore import publish_plan
from thunderserve.common.protocol import Subjects

pytestmark = pytest.mark.slow


async def _publish_and_wait(cluster, plan: Plan, also=lambda replicas: True) -> dict:
    """Publish `plan`; return /health once the router and every replica acknowledged its epoch (and `also`)."""
    nc = await nats.connect(cluster.nats_url)
    try:
        await publish_plan(nc, Subjects(), plan)
    finally:
        await nc.close()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        health = cluster.health() or {}
        replicas = {r["id"]: r for r in health.get("replicas", [])}
        if health.get("plan_epoch") == plan.epoch and replicas \
                and all(r["plan_epoch"] == plan.epoch for r in replicas.values()) and also(replicas):
            return health
        await asyncio.sleep(0.2)
    raise AssertionError(f"plan epoch {plan.epoch} was not acknowledged: {cluster.health()}")


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
    health = await _publish_and_wait(
        tiny_cluster, plan, also=lambda replicas: replicas.get("prefill-1", {}).get("phase") == "decode")
    replicas = {r["id"]: r for r in health["replicas"]}
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


async def _first_token_while_decode_paused(cluster, client: Client, pause_s: float = 1.0):
    """(whether a first token arrived while decode-0 was stopped, the whole output)."""
    stream = client.stream("Held or not", max_tokens=5, ignore_eos=True, temperature=0)
    tokens: list[int] = []
    os.kill(cluster.procs["decode-0"].pid, signal.SIGSTOP)
    try:
        first = asyncio.ensure_future(anext(stream))
        done, _ = await asyncio.wait({first}, timeout=pause_s)
        early = bool(done)
    finally:
        os.kill(cluster.procs["decode-0"].pid, signal.SIGCONT)
    tokens.extend((await first).token_ids)
    async for chunk in stream:
        tokens.extend(chunk.token_ids)
    return early, tokens


async def test_plan_decides_which_replica_streams_the_first_token(tiny_cluster):
    replicas = [Replica("prefill-0", "prefill", ["h:0"]), Replica("decode-0", "decode", ["h:1"])]
    async with Client(tiny_cluster.nats_url, timeout_s=60) as client:
        await client.complete("warm up the channel pair", max_tokens=3)
        await _publish_and_wait(tiny_cluster, Plan(replicas=replicas, epoch=11, kv_codec="none"))
        early, streamed = await _first_token_while_decode_paused(tiny_cluster, client)
        assert early  # the prefill replica streams it without waiting for decode

        held_plan = Plan(replicas=replicas, epoch=12, kv_codec="none",
                         first_token_from_decode=["prefill-0->decode-0"])
        await _publish_and_wait(tiny_cluster, held_plan)
        early, held = await _first_token_while_decode_paused(tiny_cluster, client)
        assert not early  # it waits for the KV to land on the (paused) decode replica
    assert held == streamed and len(held) == 5  # the same tokens either way
