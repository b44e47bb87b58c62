"""W3C trace context carried in NATS headers, so one trace spans every hop of a request; and the
spans themselves.

The router starts a trace per request; every service that handles a message continues it
(same trace id, a new span id) on the messages it sends. Services record what they did as spans
(`start_span(name, parent)` ... `span.end()`): the router's request, prefill's forward pass, the
KV encode and send, decode's KV receive and generation. With `THUNDERSERVE_TRACE_DIR` set, each
process appends its finished spans to `<dir>/<service>-<pid>.jsonl`, one JSON object per line
with OpenTelemetry's field names (traceId, spanId, parentSpanId, name, startTimeUnixNano,
endTimeUnixNano, attributes), so any tool that reads OTLP-shaped JSON can take them;
`python -m thunderserve.common.tracing DIR` prints each request's spans as a tree. With
`THUNDERSERVE_OTLP_ENDPOINT` set (a collector's OTLP/HTTP address, e.g. http://127.0.0.1:4318), the
spans also go to `<endpoint>/v1/traces` in OTLP's JSON encoding, batched by a background thread, so
Jaeger, Tempo or an OpenTelemetry Collector show them. Without either a span costs a few
microseconds and goes nowhere.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import secrets
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

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
OTLP_ENDPOINT_ENV = "THUNDERSERVE_OTLP_ENDPOINT"


def _otlp_value(value: Any) -> dict[str, Any]:
    if isinstance(value, bool):
        return {"boolValue": value}
    if isinstance(value, int):
        return {"intValue": str(value)}  # OTLP/JSON writes 64-bit integers as strings
    if isinstance(value, float):
        return {"doubleValue": value}
    return {"stringValue": str(value)}


def otlp_request(service: str, records: list[dict[str, Any]]) -> dict[str, Any]:
    """An OTLP ExportTraceServiceRequest, JSON-encoded (hex ids, nanoseconds as strings), of `records`
    (this module's span records) from `service`."""
    spans = []
    for r in records:
        span = {"traceId": r["traceId"], "spanId": r["spanId"], "name": r["name"], "kind": 1,  # INTERNAL
                "startTimeUnixNano": str(r["startTimeUnixNano"]), "endTimeUnixNano": str(r["endTimeUnixNano"]),
                "attributes": [{"key": k, "value": _otlp_value(v)} for k, v in r["attributes"].items()]}
        if r["parentSpanId"]:
            span["parentSpanId"] = r["parentSpanId"]
        spans.append(span)
    return {"resourceSpans": [{"resource": {"attributes": [{"key": "service.name", "value": {"stringValue": service}}]},
                               "scopeSpans": [{"scope": {"name": "thunderserve"}, "spans": spans}]}]}


class OtlpExporter:
    """Sends finished spans to an OTLP/HTTP collector from a background thread: a batch of up to
    `batch` spans every `interval_s`. A collector that is slow or down costs dropped spans (at most
    `max_queue` wait) and one warning per outage, never a stalled service."""

    def __init__(self, endpoint: str, service: str, interval_s: float = 1.0, batch: int = 512,
                 max_queue: int = 8192, timeout_s: float = 5.0):
        if not endpoint.startswith(("http://", "https://")):
            raise ValueError(f"the OTLP endpoint must be an http:// or https:// URL, not {endpoint!r}")
        self.url = endpoint.rstrip("/") + ("" if endpoint.rstrip("/").endswith("/v1/traces") else "/v1/traces")
        self.service, self.interval_s, self.batch, self.max_queue, self.timeout_s = \
            service, interval_s, batch, max_queue, timeout_s
        self.sent = self.dropped = 0
        self._queue: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = False
        self._failing = False
        self._thread = threading.Thread(target=self._run, name="otlp-export", daemon=True)
        self._thread.start()

    def add(self, record: dict[str, Any]) -> None:
        with self._lock:
            if len(self._queue) >= self.max_queue:
                self.dropped += 1
                return
            self._queue.append(record)
            if len(self._queue) >= self.batch:
                self._wake.set()

    def _run(self) -> None:
        while True:
            self._wake.wait(self.interval_s)
            self._wake.clear()
            self._send_all()
            if self._stop:
                return

    def _send_all(self) -> None:
        while True:
            with self._lock:
                records, self._queue = self._queue[: self.batch], self._queue[self.batch:]
            if not records:
                return
            body = json.dumps(otlp_request(self.service, records)).encode()
            request = urllib.request.Request(self.url, data=body, method="POST",
                                             headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as resp:
                    resp.read()
                self.sent += len(records)
                if self._failing:
                    log.info("OTLP export to %s works again", self.url)
                self._failing = False
            except (OSError, urllib.error.URLError) as exc:
                self.dropped += len(records)
                if not self._failing:
                    log.warning("OTLP export to %s failed (%s); dropping spans until it works", self.url, exc)
                self._failing = True
                return

    def close(self) -> None:
        """Send what is queued (within the timeout) and stop."""
        self._stop = True
        self._wake.set()
        self._thread.join(self.timeout_s + 1.0)


class _Sink:
    """Where this process's finished spans go (a JSON-lines file, a collector), if anywhere."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.file = None
        self.exporter: OtlpExporter | None = None
        self.service = "thunderserve"

    def configure(self, service: str, trace_dir: str | None = None, otlp_endpoint: str | None = None) -> None:
        trace_dir = trace_dir if trace_dir is not None else os.environ.get(TRACE_DIR_ENV, "")
        otlp_endpoint = otlp_endpoint if otlp_endpoint is not None else os.environ.get(OTLP_ENDPOINT_ENV, "")
        with self.lock:
            self.service = service
            if self.file is not None:
                self.file.close()
                self.file = None
            if self.exporter is not None:
                self.exporter.close()
                self.exporter = None
            if trace_dir:
                Path(trace_dir).mkdir(parents=True, exist_ok=True)
                self.file = open(Path(trace_dir) / f"{service}-{os.getpid()}.jsonl", "a", buffering=1)  # noqa: SIM115
            if otlp_endpoint:
                try:
                    self.exporter = OtlpExporter(otlp_endpoint, service)
                except ValueError as exc:  # a service still runs; it just sends no spans
                    log.error("%s; spans are not exported", exc)

    @property
    def active(self) -> bool:
        return self.file is not None or self.exporter is not None

    def write(self, record: dict[str, Any]) -> None:
        with self.lock:
            if self.file is not None:
                self.file.write(json.dumps({**record, "service": self.service}) + "\n")
            if self.exporter is not None:
                self.exporter.add(record)

    def close(self) -> None:
        with self.lock:
            exporter, self.exporter = self.exporter, None
        if exporter is not None:
            exporter.close()


_sink = _Sink()
atexit.register(_sink.close)  # a stopping service sends its last spans


def configure(service: str, trace_dir: str | None = None, otlp_endpoint: str | None = None) -> None:
    """Record this process's spans as `service`: into `trace_dir` (default: $THUNDERSERVE_TRACE_DIR)
    and to the collector at `otlp_endpoint` (default: $THUNDERSERVE_OTLP_ENDPOINT); empty: nowhere.
    Every service calls it once at start-up."""
    _sink.configure(service, trace_dir, otlp_endpoint)


def recording() -> bool:
    return _sink.active


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
        if not _sink.active:
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
