"""W3C trace context rides in every NATS message (DESIGN.md §2): watched on the bus of a real deployment.

Every message on the deployment's subjects, and every reply to one, carries a `traceparent` header;
the messages of one request (prefill request, KV handoff, token chunks, the SDK's events) all carry
that request's trace id, the one its HTTP caller or SDK sent. With THUNDERSERVE_TRACE_DIR set, the
services record the request's spans, linked into one tree under the caller's span; with
THUNDERSERVE_OTLP_ENDPOINT set, they send the same spans to that OTLP collector."""

from __future__ import annotations

import asyncio
import time

import httpx
import nats

from thunderserve.common import protocol, tracing
from thunderserve.common.client import Client
from thunderserve.common.protocol import CompletionRequest

REQUEST_SUBJECTS = ("ts.prefill.", "ts.decode.", "ts.tokens.")


async def test_every_message_carries_trace_context_and_a_request_keeps_its_trace(make_cluster, tmp_path,
                                                                                 otlp_collector):
    trace_dir = tmp_path / "spans"
    cluster = make_cluster(model="tiny-random", threads_per_replica=1, extra_env={
        "THUNDERSERVE_WORKLOAD_PERIOD": "0.3", "THUNDERSERVE_TRACE_DIR": str(trace_dir),
        "THUNDERSERVE_OTLP_ENDPOINT": otlp_collector.url})
    nc = await nats.connect(cluster.nats_url)
    seen: list[tuple[float, str, str | None, str | None, bytes]] = []  # (time, subject, reply, traceparent, data)

    async def on_any(msg):
        seen.append((time.monotonic(), msg.subject, msg.reply or None, tracing.traceparent_of(msg), msg.data))

    await nc.subscribe(">", cb=on_any)
    await nc.flush()
    try:
        parent = tracing.new_traceparent()
        t0 = time.monotonic()
        async with httpx.AsyncClient(timeout=30) as http:
            resp = await http.post(cluster.http_url + "/v1/completions", headers={"traceparent": parent},
                                   json={"prompt": "Hello", "max_tokens": 4, "ignore_eos": True})
        assert resp.status_code == 200, resp.text
        await asyncio.sleep(0.3)
        t1 = time.monotonic()
        async with Client(cluster.nats_url, timeout_s=30) as client:
            result = await client.complete("Hi", max_tokens=3, ignore_eos=True)
        assert len(result.token_ids) == 3
        await asyncio.sleep(1.0)  # heartbeats and workload reports
    finally:
        await nc.close()

    ours = [s for s in seen if s[1].startswith("ts.")]
    kinds = {s[1].split(".")[1] for s in ours}
    assert {"prefill", "decode", "tokens", "heartbeat", "workload", "connect", "api"} <= kinds, kinds
    assert [s for s in ours if s[3] is None] == [], "messages without trace context"
    replies = {s[2] for s in ours if s[2]}
    answered = [s for s in seen if s[1] in replies]
    assert answered and all(s[3] is not None for s in answered), "replies without trace context"

    http_hops = [s for s in ours if t0 <= s[0] < t1 and s[1].startswith(REQUEST_SUBJECTS)]
    assert {s[1].split(".")[1] for s in http_hops} == {"prefill", "decode", "tokens"}
    assert {tracing.trace_id(s[3]) for s in http_hops} == {tracing.trace_id(parent)}
    # the SDK's request: its entry message starts a trace, and every hop and event after it continue it
    entry = next(s for s in ours if s[1] == "ts.api.completions")
    sdk_trace = tracing.trace_id(entry[3])
    sdk_hops = [s for s in ours if s[0] > entry[0] and s[1].startswith(REQUEST_SUBJECTS)]
    assert sdk_hops and {tracing.trace_id(s[3]) for s in sdk_hops} == {sdk_trace}
    inbox = protocol.decode(CompletionRequest, entry[4]).reply_subject  # where the router streams its events
    events = [s for s in seen if s[1] == inbox]
    assert events and all(tracing.trace_id(s[3]) == sdk_trace for s in events)

    # the spans: one tree under the HTTP caller's span, every hop in it
    spans = [sp for sp in tracing.read_spans(trace_dir) if sp["traceId"] == tracing.trace_id(parent)]
    by_name = {sp["name"]: sp for sp in spans}
    assert sorted(by_name) == sorted(["router.request", "prefill.request", "prefill.forward", "kv.encode", "kv.send",
                                      "decode.request", "kv.receive", "kv.decode"]), sorted(by_name)
    assert len(spans) == len(by_name)  # each once: nothing resumed, nothing doubled
    parent_of = {name: sp["parentSpanId"] for name, sp in by_name.items()}
    span_of = {name: sp["spanId"] for name, sp in by_name.items()}
    assert parent_of["router.request"] == parent.split("-")[2]  # the caller's span
    assert parent_of["prefill.request"] == span_of["router.request"]
    assert {parent_of[n] for n in ("prefill.forward", "kv.encode", "kv.send", "decode.request")} == \
        {span_of["prefill.request"]}
    assert {parent_of["kv.receive"], parent_of["kv.decode"]} == {span_of["decode.request"]}
    assert by_name["router.request"]["attributes"]["completion_tokens"] == 4
    assert by_name["kv.send"]["attributes"]["bytes"] == by_name["kv.receive"]["attributes"]["bytes"] > 0
    services = {sp["service"] for sp in spans}
    assert services == {"router", "prefill-0", "decode-0"}
    root = by_name["router.request"]
    outside = [(sp["name"], sp["startTimeUnixNano"] - root["startTimeUnixNano"],
                root["endTimeUnixNano"] - sp["endTimeUnixNano"]) for sp in spans
               if not root["startTimeUnixNano"] <= sp["startTimeUnixNano"] <= sp["endTimeUnixNano"]
               <= root["endTimeUnixNano"]]
    assert outside == []  # one host's clock: every hop inside the router's span

    # ... and the same spans reached the OTLP collector, under each service's name
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        exported = {span["spanId"]: service for service, span in otlp_collector.spans()
                    if span["traceId"] == tracing.trace_id(parent)}
        if len(exported) >= len(spans):
            break
        await asyncio.sleep(0.2)
    assert exported == {sp["spanId"]: sp["service"] for sp in spans}
