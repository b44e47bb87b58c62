"""Service NATS connections (thunderserve.common.aio): they close cleanly whether or not the
server is still there."""

from __future__ import annotations

import asyncio
import logging

import pytest

from thunderserve.common import aio
from thunderserve.common.natsserver import NatsServer


def test_close_nats_drains_a_live_connection(nats_url: str) -> None:
    async def scenario() -> list[bytes]:
        nc = await aio.connect_nats(nats_url, "test-live")
        got: list[bytes] = []

        async def on_msg(msg) -> None:
            got.append(msg.data)

        await nc.subscribe("aio.test", cb=on_msg)
        await nc.publish("aio.test", b"pending")  # drain delivers what is in flight before closing
        await aio.close_nats(nc)
        assert nc.is_closed
        return got

    assert asyncio.run(scenario()) == [b"pending"]


def test_close_nats_after_the_server_is_gone(caplog: pytest.LogCaptureFixture) -> None:
    """The server stops first (as when NATS dies before a replica): closing must neither hang
    on reconnects nor raise, and reconnect errors are logged in one line each."""

    async def scenario(server: NatsServer) -> None:
        nc = await aio.connect_nats(server.url, "test-gone", max_reconnect_attempts=-1, reconnect_time_wait=0.1)
        server.stop()
        for _ in range(50):  # until the client notices
            if not nc.is_connected:
                break
            await asyncio.sleep(0.05)
        await nc.publish("aio.test", b"lost")  # buffered while reconnecting
        await asyncio.wait_for(aio.close_nats(nc), timeout=10)
        assert nc.is_closed

    server = NatsServer().start()
    try:
        with caplog.at_level(logging.WARNING, logger="thunderserve.common.aio"):
            asyncio.run(scenario(server))
    finally:
        server.stop()
    assert all(r.exc_info is None for r in caplog.records)


def test_close_nats_accepts_no_connection() -> None:
    asyncio.run(aio.close_nats(None))


def test_first_connection_gives_up_with_a_clear_error(caplog: pytest.LogCaptureFixture) -> None:
    import time

    from thunderserve.common.natsserver import free_port

    url = f"nats://127.0.0.1:{free_port()}"  # nothing listens there

    async def attempt() -> None:
        await aio.connect_nats(url, "test", first_timeout=1.0, max_reconnect_attempts=-1)

    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING), pytest.raises(ConnectionError, match="cannot reach NATS .* within 1 s"):
        asyncio.run(attempt())
    assert time.monotonic() - t0 < 5  # nats.py alone would retry for ever
    assert "NATS:" not in caplog.text  # the caller reports it once, not every retry


def test_first_connection_within_the_timeout(nats_url: str) -> None:
    async def attempt() -> bool:
        nc = await aio.connect_nats(nats_url, "test", first_timeout=5.0)
        connected = nc.is_connected
        await aio.close_nats(nc)
        return connected

    assert asyncio.run(attempt())
