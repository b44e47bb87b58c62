"""The early KV handoff (`--kv-stream-early`, the replicas' default on the tcp channel): the prefill
replica hands a request off as its forward pass starts, a channel thread encodes each run of the
compressed KV as soon as the pass has computed its layers and sends it, and the first token follows
the KV on the channel (`FirstToken`). The decode replica decodes the KV while the prefill computes it."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import nats
import pytest

from thunderserve.common import protocol, tracing
from thunderserve.common.client import Client
from thunderserve.common.protocol import Heartbeat, KVHandoff, PrefillRequest, SamplingParams, Subjects, TokenChunk

pytestmark = pytest.mark.slow

PROMPTS = ["The quick brown fox", "Once upon a time " * 40, "1, 2, 3, 4,", "def main():" * 30]
N = 8


async def _greedy(cluster, **params) -> list[list[int]]:
    async with Client(cluster.nats_url, timeout_s=60) as client:
        done = await asyncio.gather(*(client.complete(p, max_tokens=N, ignore_eos=True, temperature=0, **params)
                                      for p in PROMPTS))
    return [d.token_ids for d in done]


async def _heartbeats(nc, replicas: int) -> dict[str, Heartbeat]:
    """Each replica's latest heartbeat by replica id, kept current; returns once `replicas` are ready."""
    beats: dict[str, Heartbeat] = {}

    async def on_beat(msg):
        beat = protocol.decode(Heartbeat, msg.data)
        beats[beat.replica_id] = beat

    await nc.subscribe(Subjects().heartbeats, cb=on_beat)
    for _ in range(100):
        if sum(b.state == "ready" for b in beats.values()) == replicas:
            break
        await asyncio.sleep(0.1)
    return beats


def _traces(trace_dir) -> dict[str, dict[str, dict]]:
    """Each trace's spans by name (a request's own spans occur once each)."""
    out: dict[str, dict[str, dict]] = {}
    for span in tracing.read_spans(trace_dir):
        out.setdefault(span["traceId"], {})[span["name"]] = span
    return out


async def test_the_kv_streams_during_the_forward_pass_and_decodes_to_the_same_tokens(make_cluster, tmp_path):
    """Concurrent int4 requests, handed off early, give the tokens they give when the KV moves after
    the pass (THUNDERSERVE_KV_STREAM_EARLY=0). A request its first token ends sends its KV in vain:
    the decode replica drops it without a word, and the pair goes on serving the next request."""
    trace_dir = tmp_path / "spans"
    env = {"THUNDERSERVE_TRACE_DIR": str(trace_dir)}
    early = make_cluster(model="tiny-random", threads_per_replica=1, kv_codec="int4", extra_env=env)
    got = await _greedy(early)
    async with Client(early.nats_url, timeout_s=60) as client:
        one = await client.complete(PROMPTS[1], max_tokens=1, temperature=0)
        after = await client.complete(PROMPTS[0], max_tokens=N, ignore_eos=True, temperature=0)
    await asyncio.sleep(0.5)  # the decode replica's dropped request ends its span
    early.stop()
    assert one.finish_reason == "length" and one.token_ids == got[1][:1]
    assert after.token_ids == got[0]

    traces = _traces(trace_dir)
    served = [t for t in traces.values() if "kv.decode" in t]
    assert len(served) == len(PROMPTS) + 1
    for spans in served:
        assert spans["kv.encode"]["attributes"]["early"] is True  # encoded as the pass computed the layers
        assert spans["kv.send"]["attributes"]["bytes"] == spans["kv.receive"]["attributes"]["bytes"] > 0
    dropped = [t["decode.request"] for t in traces.values() if "cancelled" in t.get("decode.request", {}).get(
        "attributes", {})]
    assert [d["attributes"]["cancelled"] for d in dropped] == ["the first token ended the request"]

    late = make_cluster(model="tiny-random", threads_per_replica=1, kv_codec="int4",
                        extra_env={"THUNDERSERVE_KV_STREAM_EARLY": "0"})
    assert await _greedy(late) == got


async def test_a_pass_that_fails_after_an_early_handoff_is_dropped_on_both_sides(make_cluster, tmp_path):
    """A prefill request whose forward pass fails after the early handoff went out (a token id past
    the vocabulary, sent straight to the prefill replica: the router would refuse it) ends with an
    error to its caller; the decode replica, told on the channel, drops it without a word, and the
    pair serves the next request."""
    trace_dir = tmp_path / "spans"
    cluster = make_cluster(model="tiny-random", threads_per_replica=1, kv_codec="int4",
                           extra_env={"THUNDERSERVE_TRACE_DIR": str(trace_dir)})
    async with Client(cluster.nats_url, timeout_s=60) as client:  # sets the channel pair up
        before = await client.complete(PROMPTS[0], max_tokens=N, ignore_eos=True, temperature=0)
    subjects = Subjects()
    nc = await nats.connect(cluster.nats_url)
    try:
        beats = {b.phase: b for b in (await _heartbeats(nc, 2)).values()}
        chunks: asyncio.Queue = asyncio.Queue()

        async def on_chunk(msg):
            chunks.put_nowait(protocol.decode(TokenChunk, msg.data))

        inbox = nc.new_inbox()
        await nc.subscribe(inbox, cb=on_chunk)
        decode = beats["decode"]
        request = PrefillRequest("bad-1", [1, 2, 10**9], SamplingParams(max_tokens=4, temperature=0), inbox,
                                 decode.replica_id, decode.endpoint, kv_codec="int4")
        await nc.publish(subjects.prefill(beats["prefill"].replica_id), protocol.encode(request),
                         headers=tracing.headers_for(None))
        failure = await asyncio.wait_for(chunks.get(), 30)
        assert failure.error and "prefill failed" in failure.error
    finally:
        await nc.close()
    async with Client(cluster.nats_url, timeout_s=60) as client:
        after = await client.complete(PROMPTS[0], max_tokens=N, ignore_eos=True, temperature=0)
    assert after.token_ids == before.token_ids
    await asyncio.sleep(0.5)
    dropped = [sp for sp in tracing.read_spans(trace_dir)
               if sp["name"] == "decode.request" and "cancelled" in sp.get("attributes", {})]
    assert [sp["attributes"]["cancelled"] for sp in dropped] == ["the prefill failed"]


async def test_handoffs_are_taken_at_once_and_an_abort_frees_the_wait_for_a_frozen_prefill(make_cluster, tmp_path):
    """Two prefill replicas hand off to one decode replica during their forward passes: it waits for
    both KV caches at once (NATS runs a subscription's callbacks one at a time, so the second had
    waited for the first pass to end). Then a prefill replica freezes (SIGSTOP: no heartbeats, no KV)
    after its early handoff: the router resumes the request on the other replica and aborts the
    first attempt, and the decode replica stops waiting for the frozen replica's KV at once, where it
    would otherwise hold a channel thread (and its drain) for EARLY_WAIT_S."""
    trace_dir = tmp_path / "spans"
    cluster = make_cluster(model="smollm2", prefill=2, threads_per_replica=1, kv_codec="int4",
                           extra_env={"THUNDERSERVE_TRACE_DIR": str(trace_dir)})
    long_prompts = ["Once upon a time " * 250, "The quick brown fox " * 200]  # passes of seconds
    subjects = Subjects()
    nc = await nats.connect(cluster.nats_url)
    frozen = None
    try:
        beats = await _heartbeats(nc, 3)
        decode = next(b.replica_id for b in beats.values() if b.phase == "decode")
        handoffs: asyncio.Queue = asyncio.Queue()

        async def on_handoff(msg):
            handoffs.put_nowait(protocol.decode(KVHandoff, msg.data))

        await nc.subscribe(subjects.decode(decode), cb=on_handoff)
        async with Client(cluster.nats_url, timeout_s=120) as client:
            both = await asyncio.gather(*(client.complete(p, max_tokens=4, ignore_eos=True, temperature=0)
                                          for p in long_prompts))
            assert all(len(done.token_ids) == 4 for done in both)
            pair = [handoffs.get_nowait() for _ in long_prompts]
            assert len({h.prefill_replica for h in pair}) == 2 and all(h.first_token_later for h in pair)

            task = asyncio.create_task(client.complete(long_prompts[0], max_tokens=4, ignore_eos=True,
                                                       temperature=0))
            first = await asyncio.wait_for(handoffs.get(), 60)
            assert first.first_token_later
            frozen = first.prefill_replica
            os.kill(cluster.procs[frozen].pid, signal.SIGSTOP)  # before its KV is all out
            done = await asyncio.wait_for(task, 120)
        assert done.token_ids == both[0].token_ids
        deadline = time.monotonic() + 10
        while beats[decode].waiting and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert beats[decode].waiting == 0, "the decode replica still waits for the frozen replica's KV"
    finally:
        await nc.close()
        if frozen is not None:
            cluster.kill(frozen)  # SIGKILL ends a stopped process too
    recorded = tracing.read_spans(trace_dir)
    spans = {sp["attributes"].get("request_id"): sp for sp in recorded if sp["name"] == "decode.request"}
    receives = {sp["parentSpanId"]: sp for sp in recorded if sp["name"] == "kv.receive"}
    a, b = (receives[spans[h.request_id]["spanId"]] for h in pair)  # each from its handoff to its last run
    assert int(a["startTimeUnixNano"]) < int(b["endTimeUnixNano"]) and \
        int(b["startTimeUnixNano"]) < int(a["endTimeUnixNano"]), "the two KV caches were received one after the other"
    assert spans[first.request_id]["attributes"].get("cancelled") == "aborted while its KV was awaited"
