"""Spans: recorded as OTLP-shaped JSON lines when a trace directory is set, nothing otherwise; read
back as one tree per trace."""

from __future__ import annotations

import json

import pytest

from thunderserve.common import tracing


@pytest.fixture
def recorded(tmp_path):
    tracing.configure("svc", str(tmp_path))
    yield tmp_path
    tracing.configure("thunderserve", "")


def test_spans_link_into_a_tree_under_the_callers_context(recorded):
    caller = tracing.new_traceparent()
    root = tracing.start_span("root", caller, request_id="r1")
    a = root.child("a", n=1)
    b = root.child("b")
    leaf = tracing.start_span("leaf", a.traceparent)  # in another service: from the message's header
    leaf.end(ok=True)
    a.end()
    b.end(skipped=None)  # None attributes are dropped
    root.end()
    root.end()  # a second end records nothing
    spans = tracing.read_spans(recorded)
    assert len(spans) == 4 and {sp["traceId"] for sp in spans} == {tracing.trace_id(caller)}
    by = {sp["name"]: sp for sp in spans}
    assert by["root"]["parentSpanId"] == caller.split("-")[2]
    assert by["a"]["parentSpanId"] == by["b"]["parentSpanId"] == by["root"]["spanId"]
    assert by["leaf"]["parentSpanId"] == by["a"]["spanId"]
    assert by["root"]["attributes"] == {"request_id": "r1"} and by["b"]["attributes"] == {}
    assert by["leaf"]["attributes"] == {"ok": True} and by["root"]["service"] == "svc"
    assert all(sp["endTimeUnixNano"] >= sp["startTimeUnixNano"] for sp in spans)
    assert root.headers == {tracing.TRACEPARENT: root.traceparent}
    tree = tracing.span_trees(spans)[tracing.trace_id(caller)]
    assert [(depth, sp["name"]) for depth, sp in tree] == [(0, "root"), (1, "a"), (2, "leaf"), (1, "b")]
    text = tracing.format_trees(spans)
    assert text.splitlines()[0] == f"trace {tracing.trace_id(caller)}" and "svc: leaf  ok=True" in text


def test_without_a_trace_dir_nothing_is_written_and_a_bad_parent_starts_a_trace(tmp_path):
    tracing.configure("svc", "")
    span = tracing.start_span("x", "not-a-traceparent")
    assert len(span.trace_id) == 32 and span.parent_span_id == "" and not tracing.recording()
    span.end()
    assert list(tmp_path.iterdir()) == []


def test_a_line_cut_short_is_skipped(recorded):
    tracing.start_span("whole").end()
    path = next(recorded.glob("*.jsonl"))
    path.write_text(path.read_text() + json.dumps({"traceId": "t"})[:7])  # a killed process's last line
    assert [sp["name"] for sp in tracing.read_spans(recorded)] == ["whole"]


def test_spans_go_to_an_otlp_collector_in_its_json_encoding(otlp_collector, tmp_path):
    tracing.configure("svc", "", otlp_collector.url)
    try:
        caller = tracing.new_traceparent()
        root = tracing.start_span("root", caller, tokens=3, ratio=0.5, ok=True, codec="int4")
        root.child("step").end()
        root.end()
    finally:
        tracing.configure("thunderserve", "", "")  # closing the exporter sends what it holds
    assert [(path, kind) for path, kind, _ in otlp_collector.requests] == [("/v1/traces", "application/json")]
    spans = otlp_collector.spans()
    assert {service for service, _ in spans} == {"svc"}
    by = {span["name"]: span for _, span in spans}
    assert by["root"]["traceId"] == tracing.trace_id(caller) and by["root"]["parentSpanId"] == caller.split("-")[2]
    assert by["step"]["parentSpanId"] == by["root"]["spanId"] and len(by["step"]["spanId"]) == 16
    assert by["root"]["attributes"] == [{"key": "tokens", "value": {"intValue": "3"}},
                                        {"key": "ratio", "value": {"doubleValue": 0.5}},
                                        {"key": "ok", "value": {"boolValue": True}},
                                        {"key": "codec", "value": {"stringValue": "int4"}}]
    assert int(by["root"]["endTimeUnixNano"]) >= int(by["root"]["startTimeUnixNano"])  # strings, as OTLP/JSON has
    assert list(tmp_path.iterdir()) == []  # no trace directory was asked for


def test_a_collector_that_is_down_costs_spans_not_the_service(caplog):
    import socket

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    exporter = tracing.OtlpExporter(f"http://127.0.0.1:{port}", "svc", interval_s=0.05, timeout_s=1.0)
    for i in range(3):
        exporter.add({"traceId": "0" * 32, "spanId": f"{i:016x}", "parentSpanId": "", "name": "x",
                      "startTimeUnixNano": 1, "endTimeUnixNano": 2, "attributes": {}})
    exporter.close()
    assert exporter.sent == 0 and exporter.dropped == 3
    assert caplog.text.count("OTLP export") == 1  # one warning per outage, not one per batch
    with pytest.raises(ValueError, match="http"):
        tracing.OtlpExporter("localhost:4318", "svc")
    tracing.configure("svc", "", "localhost:4318")  # a bad endpoint in a service: logged, nothing exported
    assert not tracing.recording() and "spans are not exported" in caplog.text
    tracing.configure("thunderserve", "", "")
