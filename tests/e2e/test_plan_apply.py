"""A published plan is hot-applied: phases flip in place, the router follows its tables. Plans go
out through `thunderserve apply --wait`, which reports when each replica applied the epoch."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import tempfile
import time

import pytest

from thunderserve.common.client import Client
from thunderserve.common.plan import Plan, Replica
from thunderserve.planner.apply_cli import main as apply_main

pytestmark = pytest.mark.slow


def _apply(cluster, plan: Plan, wait_s: float, capsys) -> tuple[int, str, str]:
    with tempfile.NamedTemporaryFile("w", suffix=".json") as f:
        f.write(plan.to_json())
        f.flush()
        code = apply_main([f.name, "--nats", cluster.nats_url, "--wait", str(wait_s)])
    out = capsys.readouterr()
    return code, out.out, out.err


async def _publish_and_wait(cluster, plan: Plan, capsys, also=lambda replicas: True) -> dict:
    """Apply `plan` (`thunderserve apply --wait`: every replica of the plan must acknowledge it); return
    /health once the router has applied it too (and `also`)."""
    code, out, err = await asyncio.to_thread(_apply, cluster, plan, 30, capsys)
    assert code == 0, err
    acked = set(re.findall(r"^  (\S+) \((?:prefill|decode|colocated)\) applied it after [0-9.]+ s$", out, re.M))
    assert sorted(acked) == sorted(r.id for r in plan.replicas), out
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        health = cluster.health() or {}
        replicas = {r["id"]: r for r in health.get("replicas", [])}
        if health.get("plan_epoch") == plan.epoch and replicas \
                and all(r["plan_epoch"] == plan.epoch for r in replicas.values()) and also(replicas):
            return health
        await asyncio.sleep(0.2)
    raise AssertionError(f"plan epoch {plan.epoch} was not acknowledged: {cluster.health()}")


async def test_plan_flips_a_replica_and_steers_routing(tiny_cluster, capsys):
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
        tiny_cluster, plan, capsys, also=lambda replicas: replicas.get("prefill-1", {}).get("phase") == "decode")
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


async def test_a_plan_makes_a_replica_colocated_and_dispatches_to_it(tiny_cluster, capsys):
    """A plan turns prefill-1 colocated and dispatches every request to it: it prefills and decodes them itself,
    and no request touches the prefill/decode pair the plan leaves idle."""
    tiny_cluster.start_replica("prefill", 1)
    tiny_cluster.wait_ready(timeout=120, prefill=2, decode=1)
    plan = Plan(
        replicas=[Replica("prefill-0", "prefill", ["h:0"]), Replica("prefill-1", "colocated", ["h:1"]),
                  Replica("decode-0", "decode", ["h:2"])],
        dispatch={"prefill-0": 0.0, "prefill-1": 1.0},
        routing={"prefill-0": {"decode-0": 1.0}},
        epoch=3, meta={"token_budget": 8},
    )
    health = await _publish_and_wait(
        tiny_cluster, plan, capsys, also=lambda replicas: replicas.get("prefill-1", {}).get("phase") == "colocated")
    assert health["colocated_replicas"] == 1
    before = {r["id"]: r["dispatched"] for r in health["replicas"]}
    async with Client(tiny_cluster.nats_url) as client:
        results = await asyncio.gather(*(client.complete(f"Colocated plan {i} " * 4, max_tokens=6, ignore_eos=True)
                                         for i in range(6)))
    assert all(len(r.token_ids) == 6 for r in results)
    after = {r["id"]: r["dispatched"] for r in tiny_cluster.health()["replicas"]}
    assert after["prefill-1"] - before["prefill-1"] == 6
    assert after["prefill-0"] == before["prefill-0"] and after["decode-0"] == before["decode-0"]


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


# int4: the KV streams during the prefill's pass (an early handoff), the first token after it on the channel
@pytest.mark.parametrize("codec", ["none", "int4"])
async def test_plan_decides_which_replica_streams_the_first_token(tiny_cluster, capsys, codec):
    replicas = [Replica("prefill-0", "prefill", ["h:0"]), Replica("decode-0", "decode", ["h:1"])]
    async with Client(tiny_cluster.nats_url, timeout_s=60) as client:
        await client.complete("warm up the channel pair", max_tokens=3)
        await _publish_and_wait(tiny_cluster, Plan(replicas=replicas, epoch=11, kv_codec=codec), capsys)
        early, streamed = await _first_token_while_decode_paused(tiny_cluster, client)
        assert early  # the prefill replica streams it without waiting for decode

        held_plan = Plan(replicas=replicas, epoch=12, kv_codec=codec,
                         first_token_from_decode=["prefill-0->decode-0"])
        await _publish_and_wait(tiny_cluster, held_plan, capsys)
        early, held = await _first_token_while_decode_paused(tiny_cluster, client)
        assert not early  # it waits for the KV to land on the (paused) decode replica

        ghost = Plan(replicas=[*replicas, Replica("ghost", "decode", ["h:2"])], epoch=13, kv_codec="none")
        code, _, err = await asyncio.to_thread(_apply, tiny_cluster, ghost, 1.5, capsys)
        assert code == 1 and "not applied within 1.5 s by ghost" in err  # no such replica: it says so
    assert held == streamed and len(held) == 5  # the same tokens either way
