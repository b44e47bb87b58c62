"""`thunderserve up`: prints the URL when ready, serves, and leaves no process behind on SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import psutil
import pytest

from thunderserve.common.natsserver import free_port

pytestmark = pytest.mark.slow


def _wait_for_line(proc: subprocess.Popen, needle: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            if proc.poll() is not None:
                break
            continue
        seen.append(line)
        if needle in line:
            return line
    raise AssertionError(f"never printed {needle!r}; output:\n{''.join(seen)[-3000:]}")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_up_serves_and_stops_cleanly(sig):
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "thunderserve.launcher", "--model", "tiny-random", "--http-port", str(port),
         "--log-level", "WARNING"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        line = _wait_for_line(proc, "ThunderServe ready", 240)
        assert f"http://127.0.0.1:{port}/v1" in line
        children = psutil.Process(proc.pid).children(recursive=True)
        names = " ".join(" ".join(c.cmdline()) for c in children)
        assert "nats-server" in names and "thunderserve.router" in names
        assert "thunderserve.prefill" in names and "thunderserve.decode" in names

        resp = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json={"prompt": "Hi", "max_tokens": 3},
                          timeout=60)
        assert resp.status_code == 200 and resp.json()["usage"]["completion_tokens"] == 3

        proc.send_signal(sig)
        assert proc.wait(timeout=60) == 0
        _, alive = psutil.wait_procs(children, timeout=10)
        assert not alive, f"left behind: {[c.pid for c in alive]}"
    finally:
        if proc.poll() is None:
            proc.kill()
