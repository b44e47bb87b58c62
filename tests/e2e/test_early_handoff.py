"""The early KV handoff (`--kv-stream-early`, the replicas' default on the tcp channel): the prefill
replica hands a request off as its forward pass starts, a channel thread encodes each run of the
compressed KV as soon as the pass has computed its layers and sends it, and the first token follows
the KV on the channel (`FirstToken`). The decode replica decodes the KV while the prefill computes it."""

from __future__ import annotations

import asyncio

import nats
import pytest

from thunderserve.common import protocol, tracing
from thunderserve.common.client import Client
from thunderserve.common.protocol import Heartbeat, PrefillRequest, SamplingParams, Subjects, TokenChunk

pytestmark = pytest.mark.slow

PROMPTS = ["The quick brown fox", "Once upon a time " * 40, "1, 2, 3, 4,", "def main():" * 30]
N = 8


async def _greedy(cluster, **params) -> list[list[int]]:
    async with Client(cluster.nats_url, timeout_s=60) as client:
        done = await asyncio.gather(*(client.complete(p, max_tokens=N, ignore_eos=True, temperature=0, **params)
                                      for p in PROMPTS))
    return [d.token_ids for d in done]


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
        beats: dict[str, Heartbeat] = {}

        async def on_beat(msg):
            beat = protocol.decode(Heartbeat, msg.data)
            beats[beat.phase] = beat

        await nc.subscribe(subjects.heartbeats, cb=on_beat)
        for _ in range(100):
            if {"prefill", "decode"} <= set(beats):
                break
            await asyncio.sleep(0.1)
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
