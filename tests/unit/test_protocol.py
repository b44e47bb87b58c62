"""Messages survive msgpack round trips, tolerate version skew, and reject garbage clearly."""

from __future__ import annotations

import msgpack
import pytest

from thunderserve.common import protocol, tracing
from thunderserve.common.protocol import (
    Heartbeat,
    KVHandoff,
    PrefillRequest,
    ProtocolError,
    SamplingParams,
    Subjects,
    TokenChunk,
    Usage,
)


def test_nested_messages_round_trip():
    sampling = SamplingParams(max_tokens=9, temperature=0.0, seed=3, stop=["\n\n"], logit_bias={42: -5.0})
    request = PrefillRequest("r1", [1, 2, 3], sampling, "ts.tokens.x.r1", "decode-0", "127.0.0.1:5000", "int4")
    assert protocol.decode(PrefillRequest, protocol.encode(request)) == request
    handoff = KVHandoff("r1", "prefill-0", "p-1", 5, [1, 2], 7, sampling, "reply",
                        {"codec": "none", "entries": [{"shape": [1, 3, 2, 64]}], "nbytes": 10})
    back = protocol.decode(KVHandoff, protocol.encode(handoff))
    assert back == handoff and isinstance(back.sampling, SamplingParams)
    assert back.sampling.logit_bias == {42: -5.0}
    chunk = TokenChunk("r1", 3, [5], "hi", "stop", Usage(2, 4))
    assert protocol.decode(TokenChunk, protocol.encode(chunk)).usage.total_tokens == 6


def test_unknown_fields_are_ignored_and_missing_ones_default():
    raw = msgpack.packb({"replica_id": "d0", "phase": "decode", "model": "m", "from_the_future": 1})
    beat = protocol.decode(Heartbeat, raw)
    assert beat.replica_id == "d0" and beat.state == "ready" and beat.running == 0


@pytest.mark.parametrize("data", [b"\xc1\xc1", msgpack.packb([1, 2]), msgpack.packb({"index": 1})])
def test_garbage_is_a_protocol_error(data):
    with pytest.raises(ProtocolError):
        protocol.decode(TokenChunk, data)


def test_subjects_use_the_prefix():
    s = Subjects("blue")
    assert s.prefill("p0") == "blue.prefill.p0"
    assert s.tokens("router-1", "abc") == "blue.tokens.router-1.abc"
    assert s.tokens_wildcard("router-1") == "blue.tokens.router-1.*"
    assert s.heartbeats == "blue.heartbeat.*"


def test_trace_context_continues_the_trace():
    root = tracing.new_traceparent()
    child = tracing.child_traceparent(root)
    assert tracing.trace_id(child) == tracing.trace_id(root) and child != root
    assert tracing.trace_id(tracing.child_traceparent("garbage")) != ""
