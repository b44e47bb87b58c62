"""W3C trace context carried in NATS headers, so one trace spans every hop of a request.

The router starts a trace per request; every service that handles a message continues it
(same trace id, a new span id) on the messages it sends. When the OpenTelemetry SDK is set
up in a process, exporters can pick these ids up; without it this costs a few microseconds.
"""

from __future__ import annotations

import secrets

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
