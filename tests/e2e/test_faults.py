"""Replica failures end requests with an error in bounded time, and service resumes."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import httpx
import pytest

from thunderserve.common.client import Client, ThunderServeError
from thunderserve.common.models import load_tokenizer

pytestmark = pytest.mark.slow


async def _long_request(client: Client) -> str:
    try:
        await client.complete("Tell me everything.", max_tokens=1500, ignore_eos=True, temperature=0)
    except ThunderServeError as exc:
        return str(exc)
    return "finished"


def _resumed(cluster) -> int:
    metrics = httpx.get(cluster.http_url + "/metrics", timeout=10).text
    return int(next(line.split()[1] for line in metrics.splitlines()
                    if line.startswith("thunderserve_requests_resumed_total")))


async def _until_decoding(cluster, n: int) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        health = cluster.health() or {}
        if sum(r["running"] for r in health.get("replicas", []) if r["phase"] == "decode") == n:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"the requests never reached decode: {cluster.health()}")


async def test_requests_wait_for_their_restarted_decode_replica(tiny_cluster):
    """The only decode replica dies: new requests get a quick 503, the ones it was decoding wait,
    and when a decode replica is back (here: the same one, restarted) they go on and finish whole."""
    n = 300
    async with Client(tiny_cluster.nats_url, timeout_s=60) as client:
        tasks = [asyncio.create_task(client.complete(f"Story {i}:", max_tokens=n, ignore_eos=True, temperature=0))
                 for i in range(3)]
        await _until_decoding(tiny_cluster, 3)
        tiny_cluster.kill("decode-0")
        await asyncio.sleep(3)  # past the heartbeat timeout: the router has parked them

        # no decode replica: new requests are refused quickly with 503, not left hanging
        resp = httpx.post(tiny_cluster.http_url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2},
                          timeout=30)
        assert resp.status_code == 503 and "decode" in resp.json()["error"]["message"]
        assert not any(t.done() for t in tasks)

        tiny_cluster.start_replica("decode", 0)
        results = await asyncio.wait_for(asyncio.gather(*tasks), timeout=120)
    assert all(r.finish_reason == "length" and len(r.token_ids) == n for r in results)


async def test_requests_fail_when_no_replica_comes_back(make_cluster):
    """With no decode replica back within the resume wait (2 s here), the requests end with an
    error that says why, in bounded time."""
    cluster = make_cluster(model="tiny-random", threads_per_replica=1, extra_env={"THUNDERSERVE_RESUME_WAIT": "2"})
    async with Client(cluster.nats_url, timeout_s=60) as client:
        tasks = [asyncio.create_task(_long_request(client)) for _ in range(3)]
        await _until_decoding(cluster, 3)
        killed_at = time.monotonic()
        cluster.kill("decode-0")
        outcomes = await asyncio.wait_for(asyncio.gather(*tasks), timeout=30)
        elapsed = time.monotonic() - killed_at
    assert all("decode-0 stopped responding" in o and "within 2 s" in o for o in outcomes), outcomes
    assert elapsed < 10, f"requests took {elapsed:.1f} s to fail"


async def test_requests_on_a_killed_decode_replica_resume_on_another(tiny_cluster):
    """With a second decode replica up, killing the one that decodes loses no request: each goes on
    from the tokens it has streamed (prefilled again with them), and the client's stream is whole."""
    tiny_cluster.start_replica("decode", 1)
    tiny_cluster.wait_ready(timeout=120, decode=2)
    tokenizer = load_tokenizer("tiny-random")
    n = 400
    async with Client(tiny_cluster.nats_url, timeout_s=120) as client:
        tasks = [asyncio.create_task(client.complete(f"Story {i}:", max_tokens=n, ignore_eos=True, temperature=0))
                 for i in range(4)]
        deadline = time.monotonic() + 30
        busiest = None
        while time.monotonic() < deadline:
            running = {r["id"]: r["running"] for r in (tiny_cluster.health() or {}).get("replicas", [])
                       if r["phase"] == "decode"}
            if sum(running.values()) == len(tasks):
                busiest = max(running, key=running.get)
                break
            await asyncio.sleep(0.05)
        assert busiest is not None, "the requests never reached decode"
        tiny_cluster.kill(busiest)
        results = await asyncio.wait_for(asyncio.gather(*tasks), timeout=120)
    for r in results:
        assert r.finish_reason == "length" and len(r.token_ids) == n
        assert r.usage.completion_tokens == n
        assert r.text == tokenizer.decode(r.token_ids, skip_special_tokens=True)  # no delta lost or doubled
    resumed = _resumed(tiny_cluster)
    assert resumed >= 1


async def test_requests_sent_to_a_hung_prefill_replica_are_resumed(tiny_cluster):
    """A prefill replica that freezes (SIGSTOP: no heartbeats, no work) is given up on after the
    heartbeat timeout; the requests it was sent are prefilled on the other replica instead."""
    tiny_cluster.start_replica("prefill", 1)
    tiny_cluster.wait_ready(timeout=120, prefill=2)
    frozen = tiny_cluster.procs["prefill-0"]
    os.kill(frozen.pid, signal.SIGSTOP)
    try:
        async with Client(tiny_cluster.nats_url, timeout_s=60) as client:
            results = await asyncio.wait_for(
                asyncio.gather(*(client.complete(f"Prompt {i}", max_tokens=5, temperature=0) for i in range(4))),
                timeout=60)
    finally:
        tiny_cluster.kill("prefill-0")  # SIGKILL ends a stopped process too
    assert all(r.finish_reason == "length" and len(r.token_ids) == 5 for r in results)
    resumed = _resumed(tiny_cluster)
    assert resumed >= 1  # least-loaded choice sent some of the four to the frozen replica


async def test_killed_prefill_replica_fails_queued_requests(tiny_cluster):
    tiny_cluster.start_replica("prefill", 1)
    tiny_cluster.wait_ready(timeout=120, prefill=2)
    tiny_cluster.kill("prefill-0")
    # the router notices the lost heartbeat and keeps serving on the other prefill replica
    deadline = time.monotonic() + 10
    while (tiny_cluster.health() or {}).get("prefill_replicas") != 1 and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    async with Client(tiny_cluster.nats_url) as client:
        results = await asyncio.gather(*(client.complete(f"Prompt {i}", max_tokens=4) for i in range(4)))
    assert all(len(r.token_ids) == 4 for r in results)


async def test_requests_in_flight_survive_a_nats_server_crash(make_cluster):
    """SIGKILL the embedded nats-server while three HTTP requests and two SDK streams decode. The
    supervisor brings it back; NATS kept nothing sent during the gap, so the router resumes every
    request it held on replicas heard from since, the SDK asks the router to replay the events it
    missed, and each request finishes with all its tokens."""
    import threading

    from thunderserve.launcher.cluster import RestartPolicy

    cluster = make_cluster(model="tiny-random", threads_per_replica=1)
    stop = threading.Event()
    supervisor = threading.Thread(target=cluster.supervise, args=(stop, RestartPolicy(backoff_s=0.1), 0.1),
                                  daemon=True)
    supervisor.start()
    n = 300
    try:
        async with httpx.AsyncClient(timeout=120) as http, Client(cluster.nats_url, timeout_s=60) as client:
            tasks = [asyncio.create_task(http.post(cluster.http_url + "/v1/completions", json={
                "prompt": f"Story {i}:", "max_tokens": n, "ignore_eos": True, "temperature": 0})) for i in range(3)]
            sdk = [asyncio.create_task(client.complete(f"Tale {i}:", max_tokens=n, ignore_eos=True, temperature=0))
                   for i in range(2)]
            await _until_decoding(cluster, 5)
            os.kill(cluster.nats.proc.pid, signal.SIGKILL)
            responses = await asyncio.wait_for(asyncio.gather(*tasks), timeout=120)
            streamed = await asyncio.wait_for(asyncio.gather(*sdk), timeout=120)
    finally:
        stop.set()
        supervisor.join(timeout=10)
    bodies = [r.json() for r in responses]
    assert all(r.status_code == 200 for r in responses), bodies
    assert all(b["usage"]["completion_tokens"] == n and b["choices"][0]["finish_reason"] == "length" for b in bodies)
    assert _resumed(cluster) >= 5
    tokenizer = load_tokenizer(cluster.model)
    for result in streamed:  # every token once, in order: the text is the tokens' text
        assert result.finish_reason == "length" and len(result.token_ids) == n == result.usage.completion_tokens
        assert result.text == tokenizer.decode(result.token_ids)
    metrics = httpx.get(cluster.http_url + "/metrics", timeout=10).text
    assert "thunderserve_sdk_replays_total 0" not in metrics  # the SDK did ask for what it missed


async def test_a_stopping_router_refuses_new_requests_and_lets_the_ones_in_flight_finish(tiny_cluster):
    """SIGTERM the router while two HTTP requests and an SDK stream decode: a new SDK request gets a 503
    that says why, the three in flight finish whole, and the router exits cleanly."""
    n = 300
    router = tiny_cluster.procs["router"]
    async with httpx.AsyncClient(timeout=120) as http, Client(tiny_cluster.nats_url, timeout_s=60) as client:
        tasks = [asyncio.create_task(http.post(tiny_cluster.http_url + "/v1/completions", json={
            "prompt": f"Story {i}:", "max_tokens": n, "ignore_eos": True, "temperature": 0})) for i in range(2)]
        sdk = asyncio.create_task(client.complete("Tale:", max_tokens=n, ignore_eos=True, temperature=0))
        await _until_decoding(tiny_cluster, 3)
        router.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.5)
        with pytest.raises(ThunderServeError) as refused:
            await client.complete("One more?", max_tokens=3)
        assert refused.value.status == 503 and "shutting down" in str(refused.value)
        responses = await asyncio.wait_for(asyncio.gather(*tasks), timeout=120)
        streamed = await asyncio.wait_for(sdk, timeout=120)
    assert all(r.status_code == 200 and r.json()["usage"]["completion_tokens"] == n for r in responses)
    assert streamed.finish_reason == "length" and len(streamed.token_ids) == n
    assert await asyncio.to_thread(router.wait, 30) in (0, -signal.SIGTERM)  # uvicorn exits by the signal it got


async def test_a_dead_replica_is_found_by_a_probe_before_its_heartbeat_timeout(make_cluster):
    """Heartbeat timeout 10 s here. A SIGKILLed decode replica's NATS connection closes with it, so the
    router's probe of the late replica gets "no responders": it counts the replica as dead within a few
    seconds, not ten, and the requests it held resume on the other decode replica."""
    cluster = make_cluster(model="tiny-random", decode=2, threads_per_replica=1,
                           extra_env={"THUNDERSERVE_REPLICA_TIMEOUT": "10"})
    n = 300
    async with Client(cluster.nats_url, timeout_s=60) as client:
        tasks = [asyncio.create_task(client.complete(f"Story {i}:", max_tokens=n, ignore_eos=True, temperature=0))
                 for i in range(4)]
        await _until_decoding(cluster, 4)
        running = {r["id"]: r["running"] for r in cluster.health()["replicas"] if r["phase"] == "decode"}
        victim = max(running, key=running.get)
        cluster.kill(victim)
        killed = time.monotonic()
        while any(r["id"] == victim for r in (cluster.health() or {}).get("replicas", [])):
            assert time.monotonic() - killed < 6, f"{victim} still listed: the probe did not find it gone"
            await asyncio.sleep(0.05)
        results = await asyncio.wait_for(asyncio.gather(*tasks), timeout=120)
    assert all(r.finish_reason == "length" and len(r.token_ids) == n for r in results)
    assert _resumed(cluster) >= 1


async def test_a_peer_that_never_joins_its_channel_pair_holds_up_no_other(tiny_cluster):
    """A prefill replica asks the decode replica for a channel pair and dies before it connects. The
    decode replica waits out its channel timeout on that pair (30 s), but the next prefill replica's
    pair is set up at once: a fresh deployment's first request, which needs one, is served in seconds.
    Nor does the wait hold up the decode replica's shutdown."""
    import nats

    from thunderserve.common import protocol
    from thunderserve.common.protocol import ConnectReply, ConnectRequest, Subjects

    nc = await nats.connect(tiny_cluster.nats_url)
    try:
        reply = await nc.request(Subjects().connect("decode-0"),
                                 protocol.encode(ConnectRequest("prefill-gone", "prefill-gone-0", "tcp")), timeout=10)
        assert protocol.decode(ConnectReply, reply.data).ok
    finally:
        await nc.close()
    start = time.monotonic()
    async with Client(tiny_cluster.nats_url, timeout_s=60) as client:
        done = await client.complete("Prompt 0", max_tokens=4, temperature=0)
    assert len(done.token_ids) == 4
    assert time.monotonic() - start < 15, "the new pair waited for the one that never joined"
    decode, start = tiny_cluster.procs["decode-0"], time.monotonic()
    tiny_cluster.kill("decode-0", signal.SIGTERM)  # (waits for the process to end)
    assert decode.returncode == 0 and time.monotonic() - start < 10
