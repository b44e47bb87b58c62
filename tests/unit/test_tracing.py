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
