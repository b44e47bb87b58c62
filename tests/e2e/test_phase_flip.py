"""A running replica changes phase in place: it drains, swaps its role, keeps its weights."""

from __future__ import annotations

import asyncio
import time

import nats
import pytest

from thunderserve.common import protocol
from thunderserve.common.client import Client
from thunderserve.common.protocol import ControlCommand, Subjects

pytestmark = pytest.mark.slow


async def _control(nats_url: str, replica: str, phase: str) -> dict:
    nc = await nats.connect(nats_url)
    try:
        reply = await nc.request(Subjects().control(replica), protocol.encode(ControlCommand(phase=phase)), timeout=60)
        return protocol.msgpack.unpackb(reply.data)
    finally:
        await nc.close()


async def test_prefill_replica_flips_to_decode_without_restarting(tiny_cluster):
    proc = tiny_cluster.start_replica("prefill", 1)
    tiny_cluster.wait_ready(timeout=120, prefill=2, decode=1)
    async with Client(tiny_cluster.nats_url) as client:
        # keep requests flowing while the phase changes: none may be lost
        busy = [asyncio.create_task(client.complete(f"Busy {i}", max_tokens=30, ignore_eos=True)) for i in range(6)]
        await asyncio.sleep(0.2)
        answer = await _control(tiny_cluster.nats_url, "prefill-1", "decode")
        assert answer == {"ok": True, "phase": "decode"}
        done = await asyncio.gather(*busy)
        assert all(len(r.token_ids) == 30 for r in done)

        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            health = tiny_cluster.health() or {}
            if health.get("prefill_replicas") == 1 and health.get("decode_replicas") == 2:
                break
            await asyncio.sleep(0.1)
        assert (health["prefill_replicas"], health["decode_replicas"]) == (1, 2)
        assert proc.poll() is None  # same process: the weights were never reloaded

        results = await asyncio.gather(*(client.complete(f"After {i}", max_tokens=5) for i in range(8)))
        assert all(len(r.token_ids) == 5 for r in results)
        replicas = {r["id"]: r for r in (tiny_cluster.health() or {})["replicas"]}
        assert replicas["prefill-1"]["phase"] == "decode"

    bad = await _control(tiny_cluster.nats_url, "prefill-1", "juggle")
    assert bad["ok"] is False and "unknown phase" in bad["error"]


async def test_a_decode_replica_becomes_colocated_and_back_under_load(tiny_cluster):
    """decode-0 turns colocated while requests are decoding on it: they finish; with no decode replica left the
    router sends every request to it (prefill-0 would have no one to hand its KV to), and once it is a decode
    replica again the pair serves. No request is lost, the process never restarts."""
    proc = tiny_cluster.procs["decode-0"]

    async def health_is(prefill: int, decode: int, colocated: int) -> dict:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            health = tiny_cluster.health() or {}
            if (health.get("prefill_replicas"), health.get("decode_replicas"),
                    health.get("colocated_replicas")) == (prefill, decode, colocated):
                return health
            await asyncio.sleep(0.1)
        raise AssertionError(f"replicas never became {prefill}/{decode}/{colocated}: {health}")

    async with Client(tiny_cluster.nats_url) as client:
        busy = [asyncio.create_task(client.complete(f"Busy {i}", max_tokens=30, ignore_eos=True)) for i in range(6)]
        await asyncio.sleep(0.2)
        assert await _control(tiny_cluster.nats_url, "decode-0", "colocated") == {"ok": True, "phase": "colocated"}
        assert all(len(r.token_ids) == 30 for r in await asyncio.gather(*busy))
        health = await health_is(1, 0, 1)
        before = {r["id"]: r["dispatched"] for r in health["replicas"]}
        results = await asyncio.gather(*(client.complete(f"Alone {i}", max_tokens=8, ignore_eos=True)
                                         for i in range(6)))
        assert all(len(r.token_ids) == 8 for r in results)
        after = {r["id"]: r["dispatched"] for r in tiny_cluster.health()["replicas"]}
        assert after["decode-0"] - before["decode-0"] == 6 and after["prefill-0"] == before["prefill-0"]

        assert await _control(tiny_cluster.nats_url, "decode-0", "decode") == {"ok": True, "phase": "decode"}
        await health_is(1, 1, 0)
        results = await asyncio.gather(*(client.complete(f"Pair {i}", max_tokens=8, ignore_eos=True)
                                         for i in range(4)))
        assert all(len(r.token_ids) == 8 for r in results)
        final = {r["id"]: r["dispatched"] for r in tiny_cluster.health()["replicas"]}
        assert final["prefill-0"] == after["prefill-0"] + 4
    assert proc.poll() is None
