"""A service's event loop and NATS connection: uvloop when installed (several times cheaper per
message), else asyncio; connections that log their errors in one line and close cleanly even when
the server has gone first."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

import nats
import nats.errors

from thunderserve.common import protocol, tracing

log = logging.getLogger(__name__)


def run(main: Coroutine[Any, Any, Any]) -> Any:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


async def connect_nats(url: str, name: str, first_timeout: float | None = None, **options: Any) -> nats.NATS:
    """Connect as `name`. nats.py's default error callback logs a traceback for every failed
    reconnect; a service logs one line instead.

    `first_timeout`: give up on the first connection after this many seconds, with a
    ConnectionError (nats.py retries an unreachable server every 2 s even with
    max_reconnect_attempts=0, so a command would hang); None = wait as long as it takes."""
    quiet = first_timeout is not None  # until connected, a command reports the failure once, itself

    async def on_error(e: Exception) -> None:
        if not quiet:
            log.warning("%s: NATS: %s", name, str(e) or type(e).__name__)

    connecting = nats.connect(url, name=name, error_cb=on_error, **options)
    if first_timeout is None:
        return await connecting
    try:
        nc = await asyncio.wait_for(connecting, first_timeout)
    except (TimeoutError, OSError, nats.errors.Error) as exc:
        raise ConnectionError(f"cannot reach NATS at {url} within {first_timeout:g} s") from exc
    quiet = False  # later reconnect errors are logged as a service's are
    return nc


async def respond(nc: nats.NATS, msg, data: bytes) -> None:
    """Answer a request on its reply subject, in the request's trace (nats.py's `Msg.respond` sends
    no headers)."""
    if msg.reply:
        await nc.publish(msg.reply, data, headers=tracing.headers_for(tracing.traceparent_of(msg)))


async def replica_gone(nc: nats.NATS, subjects: protocol.Subjects, replica_id: str,
                       timeout: float = protocol.PROBE_TIMEOUT_S) -> bool:
    """Probe a replica with an empty command on its control subject, which it always listens to.
    True only if NATS answers "no responders" (its connection is gone: the process died); a reply,
    or a timeout (alive but busy, or frozen with its connection open), is False."""
    try:
        await nc.request(subjects.control(replica_id), protocol.encode(protocol.ControlCommand()),
                         timeout=timeout, headers=tracing.headers_for(None))
    except nats.errors.NoRespondersError:
        return True
    except (nats.errors.Error, TimeoutError):
        pass
    return False


async def close_nats(nc: nats.NATS | None, timeout: float = 5.0) -> None:
    """Drain the connection (deliver what is pending) if the server is there; if it is gone
    (stopped first, or unreachable), close at once rather than wait on reconnects."""
    if nc is None or nc.is_closed:
        return
    try:
        if nc.is_connected:
            await asyncio.wait_for(nc.drain(), timeout=timeout)
            return
    except (nats.errors.Error, TimeoutError) as e:
        log.warning("NATS drain failed (%s); closing the connection", str(e) or type(e).__name__)
    try:
        await nc.close()
    except (nats.errors.Error, RuntimeError, OSError) as e:  # nats.py flushes into a dead transport
        log.warning("NATS connection closed with an error: %s", str(e) or type(e).__name__)
