"""W3C trace context carried in NATS headers, so one trace spans every hop of a request; and the
spans themselves.

The router starts a trace per request; every service that handles a message continues it
(same trace id, a new span id) on the messages it sends. Services record what they did as spans
(`start_span(name, parent)` ... `span.end()`): the router's request, prefill's forward pass, the
KV encode and send, decode's KV receive and generation. With `THUNDERSERVE_TRACE_DIR` set, each
process appends its finished spans to `<dir>/<service>-<pid>.jsonl`, one JSON object per line
with OpenTelemetry's field names (traceId, spanId, parentSpanId, name, startTimeUnixNano,
endTimeUnixNano, attributes), so any tool that reads OTLP-shaped JSON can take them;
`python -m thunderserve.common.tracing DIR` prints each request's spans as a tree. Without the
variable a span costs a few microseconds and writes nothing.
"""

from __future__ import annotations

import json
import os
import secrets
import threading
import time
from pathlib import Path
from typing import Any

TRACEPARENT = "traceparent"


def new_traceparent() -> str:
    return f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01"


def child_traceparent(parent: str | None) -> str:
    """A new span in the parent's trace (a new trace when the parent is missing or malformed)."""
    if parent:
        parts = parent.split("-")
        if len(parts) == 4 and len(parts[1]) == 32 and len(parts[2]) == 16:
            return f"{parts[0]}-{parts[1]}-{secrets.token_hex(8)}-{parts[3]}"
    return new_traceparent()


def trace_id(traceparent: str | None) -> str:
    if traceparent and traceparent.count("-") == 3:
        return traceparent.split("-")[1]
    return ""


def headers_for(parent: str | None) -> dict[str, str]:
    """Headers for an outgoing message that continues `parent`'s trace."""
    return {TRACEPARENT: child_traceparent(parent)}


def traceparent_of(msg) -> str | None:
    """The trace context of a received nats.py message, if any."""
    headers = getattr(msg, "headers", None) or {}
    return headers.get(TRACEPARENT)


# --- spans ---------------------------------------------------------------------------------

TRACE_DIR_ENV = "THUNDERSERVE_TRACE_DIR"


class _Sink:
    """Where this process's finished spans go (a JSON-lines file), if anywhere."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.file = None
        self.service = "thunderserve"

    def configure(self, service: str, trace_dir: str | None = None) -> None:
        trace_dir = trace_dir if trace_dir is not None else os.environ.get(TRACE_DIR_ENV, "")
        with self.lock:
            self.service = service
            if self.file is not None:
                self.file.close()
                self.file = None
            if trace_dir:
                Path(trace_dir).mkdir(parents=True, exist_ok=True)
                self.file = open(Path(trace_dir) / f"{service}-{os.getpid()}.jsonl", "a", buffering=1)  # noqa: SIM115

    def write(self, record: dict[str, Any]) -> None:
        with self.lock:
            if self.file is not None:
                record["service"] = self.service
                self.file.write(json.dumps(record) + "\n")


_sink = _Sink()


def configure(service: str, trace_dir: str | None = None) -> None:
    """Record this process's spans as `service`, into `trace_dir` (default: $THUNDERSERVE_TRACE_DIR;
    empty: record nothing). Every service calls it once at start-up."""
    _sink.configure(service, trace_dir)


def recording() -> bool:
    return _sink.file is not None


class Span:
    """One timed step of a request, in its trace. `traceparent` / `headers` carry it to the next hop."""

    __slots__ = ("name", "trace_id", "span_id", "parent_span_id", "start_ns", "attributes", "ended")

    def __init__(self, name: str, parent: str | None, attributes: dict[str, Any]):
        parts = parent.split("-") if parent else []
        valid = len(parts) == 4 and len(parts[1]) == 32 and len(parts[2]) == 16
        self.name = name
        self.trace_id = parts[1] if valid else secrets.token_hex(16)
        self.parent_span_id = parts[2] if valid else ""
        self.span_id = secrets.token_hex(8)
        self.start_ns = time.time_ns()
        self.attributes = attributes
        self.ended = False

    @property
    def traceparent(self) -> str:
        return f"00-{self.trace_id}-{self.span_id}-01"

    @property
    def headers(self) -> dict[str, str]:
        """Headers for a message this span sends: the receiver's spans become its children."""
        return {TRACEPARENT: self.traceparent}

    def child(self, name: str, **attributes: Any) -> Span:
        return Span(name, self.traceparent, attributes)

    def end(self, **attributes: Any) -> None:
        """Finish the span (once; later calls do nothing) and record it."""
        if self.ended:
            return
        self.ended = True
        if _sink.file is None:
            return
        self.attributes.update(attributes)
        end_ns = time.time_ns()
        _sink.write({"traceId": self.trace_id, "spanId": self.span_id, "parentSpanId": self.parent_span_id,
                     "name": self.name, "startTimeUnixNano": self.start_ns, "endTimeUnixNano": end_ns,
                     "durationMs": round((end_ns - self.start_ns) / 1e6, 3),
                     "attributes": {k: v for k, v in self.attributes.items() if v is not None}})


def start_span(name: str, parent: str | None = None, **attributes: Any) -> Span:
    """A span named `name` under `parent` (a traceparent; None or malformed: a new trace)."""
    return Span(name, parent, attributes)


# --- reading them back ----------------------------------------------------------------------

def read_spans(trace_dir: str | Path) -> list[dict[str, Any]]:
    spans = []
    for path in sorted(Path(trace_dir).glob("*.jsonl")):
        with open(path) as fh:
            for line in fh:
                line = line.strip()
                if line:
                    try:
                        spans.append(json.loads(line))
                    except ValueError:
                        continue  # a line cut short by a killed process
    return spans


def span_trees(spans: list[dict[str, Any]]) -> dict[str, list[tuple[int, dict[str, Any]]]]:
    """Per trace id: its spans in tree order, each with its depth (children by start time)."""
    by_trace: dict[str, list[dict[str, Any]]] = {}
    for sp in spans:
        by_trace.setdefault(sp["traceId"], []).append(sp)
    out = {}
    for tid, group in by_trace.items():
        ids = {sp["spanId"] for sp in group}
        children: dict[str, list[dict[str, Any]]] = {}
        for sp in group:
            parent = sp["parentSpanId"] if sp["parentSpanId"] in ids else ""
            children.setdefault(parent, []).append(sp)
        ordered: list[tuple[int, dict[str, Any]]] = []
        stack = [(0, sp) for sp in sorted(children.get("", []), key=_start, reverse=True)]
        while stack:  # depth first, earliest child first
            depth, sp = stack.pop()
            ordered.append((depth, sp))
            stack += [(depth + 1, c) for c in sorted(children.get(sp["spanId"], []), key=_start, reverse=True)]
        out[tid] = ordered
    return out


def _start(span: dict[str, Any]) -> int:
    return span["startTimeUnixNano"]


def format_trees(spans: list[dict[str, Any]]) -> str:
    """Each trace as an indented tree: offset from the trace's start, duration, service, name, attributes."""
    lines = []
    for tid, ordered in sorted(span_trees(spans).items(), key=lambda kv: kv[1][0][1]["startTimeUnixNano"]):
        t0 = min(sp["startTimeUnixNano"] for _, sp in ordered)
        lines.append(f"trace {tid}")
        for depth, sp in ordered:
            attrs = " ".join(f"{k}={v}" for k, v in sp.get("attributes", {}).items())
            lines.append(f"  {(sp['startTimeUnixNano'] - t0) / 1e6:9.1f} ms {sp['durationMs']:9.1f} ms  "
                         f"{'  ' * depth}{sp.get('service', '?')}: {sp['name']}  {attrs}".rstrip())
    return "\n".join(lines)


if __name__ == "__main__":
    import sys

    if len(sys.argv) != 2 or sys.argv[1] in ("-h", "--help"):
        print("usage: python -m thunderserve.common.tracing TRACE_DIR\n\nPrint the spans the services wrote to "
              f"TRACE_DIR (${TRACE_DIR_ENV}) as one tree per request.")
        raise SystemExit(0 if len(sys.argv) == 2 else 2)
    found = read_spans(sys.argv[1])
    if not found:
        print(f"no spans in {sys.argv[1]}", file=sys.stderr)
        raise SystemExit(1)
    print(format_trees(found))
