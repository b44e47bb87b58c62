"""`LocalCluster.supervise` (what `thunderserve up` runs): a service that exits is restarted, one
that keeps exiting is left down and reported."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable

import httpx
import pytest

from thunderserve.launcher.cluster import RestartPolicy

pytestmark = pytest.mark.slow


class _Supervisor:
    def __init__(self, cluster, policy: RestartPolicy) -> None:
        self.reports: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=cluster.supervise, args=(self.stop, policy, 0.1, self.reports.append),
                                       daemon=True)

    def __enter__(self) -> _Supervisor:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(timeout=10)


def _until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _serves(cluster) -> bool:
    try:
        resp = httpx.post(cluster.http_url + "/v1/completions", json={"prompt": "hi", "max_tokens": 3}, timeout=10)
    except httpx.HTTPError:
        return False
    return resp.status_code == 200 and resp.json()["usage"]["completion_tokens"] == 3


def test_crashed_replica_and_router_are_restarted(mocker_cluster):
    cluster = mocker_cluster
    with _Supervisor(cluster, RestartPolicy(backoff_s=0.1)) as sup:
        old = cluster.procs["decode-0"]
        os.kill(old.pid, signal.SIGKILL)
        _until(lambda: cluster.procs["decode-0"] is not old, 10, "decode-0 to be restarted")
        assert any("decode-0 exited with code -9; restarting it" in r for r in sup.reports), sup.reports
        cluster.wait_ready(timeout=120)
        _until(lambda: _serves(cluster), 60, "the restarted decode replica to serve")

        router = cluster.procs["router"]
        os.kill(router.pid, signal.SIGKILL)
        _until(lambda: cluster.procs["router"] is not router, 10, "the router to be restarted")
        _until(lambda: _serves(cluster), 60, "the restarted router to serve on its old port")
        assert all(p.poll() is None for p in cluster.procs.values())


def test_service_that_keeps_exiting_is_left_down(mocker_cluster):
    cluster = mocker_cluster
    cluster.model = "no-such-model"  # every restart now exits at once: a crash loop
    with _Supervisor(cluster, RestartPolicy(limit=2, backoff_s=0.1)) as sup:
        os.kill(cluster.procs["prefill-0"].pid, signal.SIGKILL)
        _until(lambda: "prefill-0" not in cluster.procs, 90, "the supervisor to give up on prefill-0")
    restarts = [r for r in sup.reports if r.startswith("prefill-0 exited") and "restarting" in r]
    assert len(restarts) == 2, sup.reports
    assert "after 2 restart(s) within 300 s; leaving it down" in sup.reports[-1], sup.reports
    # the others were left alone
    assert cluster.procs["decode-0"].poll() is None and cluster.procs["router"].poll() is None


def test_a_crashed_nats_server_comes_back_with_the_plan_and_every_service_reconnects(mocker_cluster):
    """SIGKILL the embedded nats-server: it restarts on its port with its JetStream store, so the
    stored plan survives; the router and replicas reconnect, serve again, and still follow new plans."""
    import asyncio

    import nats

    from thunderserve.common.plan import Plan, Replica
    from thunderserve.common.planstore import current_plan, publish_plan
    from thunderserve.common.protocol import Subjects

    cluster = mocker_cluster
    replicas = [Replica("prefill-0", "prefill", ["h:0"]), Replica("decode-0", "decode", ["h:1"])]

    async def publish(plan: Plan) -> Plan | None:
        nc = await nats.connect(cluster.nats_url)
        try:
            if plan is not None:
                await publish_plan(nc, Subjects(), plan)
            return await current_plan(nc, Subjects())
        finally:
            await nc.close()

    asyncio.run(publish(Plan(replicas=replicas, epoch=5, kv_codec="none")))
    _until(lambda: (cluster.health() or {}).get("plan_epoch") == 5, 20, "the router to apply epoch 5")
    with _Supervisor(cluster, RestartPolicy(backoff_s=0.1)) as sup:
        old = cluster.nats.proc
        os.kill(old.pid, signal.SIGKILL)
        _until(lambda: cluster.nats.proc is not None and cluster.nats.proc is not old
               and cluster.nats.proc.poll() is None, 10, "nats-server to be restarted")
        assert any("nats-server exited with code -9; restarting it" in r for r in sup.reports), sup.reports
        _until(lambda: _serves(cluster), 30, "the deployment to serve again")
        assert asyncio.run(publish(None)).epoch == 5  # the plan outlived the server
        asyncio.run(publish(Plan(replicas=replicas, epoch=6, kv_codec="int8")))
        _until(lambda: (cluster.health() or {}).get("plan_epoch") == 6
               and all(r["plan_epoch"] == 6 for r in cluster.health()["replicas"]), 30,
               "the router and the replicas to apply a plan published after the restart")
