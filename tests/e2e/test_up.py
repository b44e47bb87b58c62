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


def test_up_serves_a_plan_and_its_live_planner_replans_when_a_replica_dies(tmp_path, three_replica_plan):
    """`up --plan`: the processes are the plan's replicas (its ids and phases) plus a live planner. With
    restarts off, a killed decode replica stays down: the planner flips a prefill replica to decode
    and requests are served again."""
    planner, _ = three_replica_plan
    plan = planner.build_plan([["h:0"], ["h:1"], ["h:2"]], ["prefill", "prefill", "decode"], ids=["r0", "r1", "r2"])
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(plan.to_json())
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "thunderserve.launcher", "--model", "mocker", "--plan", str(plan_file),
         "--http-port", str(port), "--restart-limit", "0", "--log-level", "WARNING"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    url = f"http://127.0.0.1:{port}"

    def health() -> dict:
        return httpx.get(url + "/health", timeout=5).json()

    def complete() -> int:
        return httpx.post(url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 3}, timeout=30).status_code

    try:
        _wait_for_line(proc, "ThunderServe ready", 240)
        children = psutil.Process(proc.pid).children(recursive=True)
        assert any("thunderserve.planner" in " ".join(c.cmdline()) for c in children)
        body = health()
        assert body["plan_epoch"] == 1
        assert {(r["id"], r["phase"]) for r in body["replicas"]} == {("r0", "prefill"), ("r1", "prefill"),
                                                                      ("r2", "decode")}
        assert complete() == 200
        decode = next(c for c in children if "--replica-id r2" in " ".join(c.cmdline()))
        decode.kill()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            body = health()
            phases = sorted(r["phase"] for r in body["replicas"] if r["state"] == "ready")
            if body["plan_epoch"] >= 2 and phases == ["decode", "prefill"]:
                break
            time.sleep(0.3)
        else:
            raise AssertionError(f"no re-plan without r2: {body}")
        assert complete() == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        _, alive = psutil.wait_procs([c for c in children if c.pid != decode.pid], timeout=10)
        assert not alive, f"left behind: {[c.pid for c in alive]}"
    finally:
        if proc.poll() is None:
            proc.kill()
