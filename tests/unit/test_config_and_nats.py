"""Configuration precedence and the embedded nats-server launcher."""

from __future__ import annotations

import argparse
import socket

import nats
import pytest

from thunderserve.common import config
from thunderserve.common.natsserver import NatsServer


def _parse(argv, monkeypatch, env=None):
    for k, v in (env or {}).items():
        monkeypatch.setenv(k, v)
    parser = argparse.ArgumentParser()
    config.add_nats_args(parser)
    config.add_model_args(parser)
    return parser.parse_args(argv)


def test_flags_override_env_override_defaults(monkeypatch):
    monkeypatch.delenv("THUNDERSERVE_NATS_URL", raising=False)
    assert _parse([], monkeypatch).nats == config.DEFAULT_NATS_URL
    args = _parse([], monkeypatch, {"THUNDERSERVE_NATS_URL": "nats://env:1", "THUNDERSERVE_THREADS": "3"})
    assert args.nats == "nats://env:1" and args.threads == 3
    assert _parse(["--nats", "nats://flag:2"], monkeypatch).nats == "nats://flag:2"


def test_bad_env_value_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("THUNDERSERVE_THREADS", "many")
    with pytest.raises(SystemExit, match="THUNDERSERVE_THREADS"):
        _parse([], monkeypatch)


async def test_nats_server_with_jetstream(nats_url):
    nc = await nats.connect(nats_url)
    try:
        kv = await nc.jetstream().create_key_value(bucket="ts-test")
        await kv.put("current", b"plan-1")
        assert (await kv.get("current")).value == b"plan-1"
    finally:
        await nc.close()


def test_nats_server_stops_cleanly():
    server = NatsServer().start()
    port = server.port
    server.stop()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=0.5)
