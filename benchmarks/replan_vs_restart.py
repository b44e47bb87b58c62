"""A replica dies: the live planner's hot re-plan against restarting processes to get the same layout.

    python benchmarks/replan_vs_restart.py [--model smollm2] [--requests 3] [--max-tokens 120]
                                           [--kill-after 30] [--no-plot]

The paper's headline for lightweight re-scheduling is ~13 s instead of ~157 s for a full restart. This
measures the same choice on a real local deployment (`thunderserve up --plan`'s processes): a plan of
three one-replica groups, r0 and r1 prefill, r2 decode, with its live planner (`plan --live --from-plan`).

1. **Hot re-plan.** `--requests` SDK streams run; once each has `--kill-after` tokens, r2 is SIGKILLed
   and 8-token requests are sent (again after each refusal) until one is done. The planner finds r2
   gone (a probe after its heartbeat is late) and publishes the next epoch, in which r1 decodes; r1
   drains and flips in place (no weights move); the router resumes the streams on r0 -> r1. Timed from
   the kill: the new epoch stored, every replica of it applied, an 8-token request done; per stream,
   its longest stall and whether it finished whole.
2. **Restart one replica** into its new phase, as a system without phase flips must: r1 is stopped
   (SIGTERM) and started again as a decode process (imports, weights from the local cache, NATS). Timed:
   stop -> an 8-token request is done (sent from r1's exit on, again after each refusal).
3. **Restart everything** with the new plan (r0 prefill, r1 decode): the whole deployment stopped and
   started again (NATS, router, replicas, planner). Timed: stop -> the first 8-token request is done.
   Requests in flight at the stop would be lost; none run here.

On GPUs a restart also reloads the weights from storage (LLaMA-30B: ~60 GB); here SmolLM2 loads from a
safetensors cache in about a second, so the restarts are as cheap as they get. Prints JSON; writes
docs/replan_vs_restart.png unless --no-plot.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import tempfile
import time
from pathlib import Path

import httpx
import nats
from backbone_common import finish, host_info, progress, r, save_plot, sdk_stream

from thunderserve.common import protocol
from thunderserve.common.client import Client
from thunderserve.common.planstore import EpochAcks, current_plan
from thunderserve.common.protocol import Heartbeat, Subjects
from thunderserve.launcher.cluster import LocalCluster
from thunderserve.planner.cluster import Cluster
from thunderserve.planner.model import ModelSpec
from thunderserve.planner.planner import Planner
from thunderserve.planner.workload import Workload

IDS = ["r0", "r1", "r2"]
log = logging.getLogger(__name__)


def _write_plans(folder: Path) -> tuple[Path, Path]:
    """The starting plan (r0, r1 prefill; r2 decode) and the layout a re-plan without r2 gives
    (r0 prefill, r1 decode), for three one-GPU groups (llama-7b on A40s, the code workload)."""
    spec = {"name": "local-3", "nodes": [{"name": "h", "gpu": "A40", "count": 3, "intra_gbps": 100}],
            "network": {"default_gbps": 10}}
    planner = Planner(Cluster.from_dict(spec), ModelSpec.load("llama-7b"), Workload.from_name("code", rate=1.0))
    start = planner.build_plan([["h:0"], ["h:1"], ["h:2"]], ["prefill", "prefill", "decode"], ids=IDS)
    after = planner.build_plan([["h:0"], ["h:1"]], ["prefill", "decode"], ids=IDS[:2])
    paths = folder / "plan.json", folder / "plan-without-r2.json"
    for path, plan in zip(paths, (start, after)):
        path.write_text(plan.to_json())
    return paths


async def _until_served(url: str, since: float, timeout_s: float = 300.0) -> float:
    """Send 8-token completions (again 0.1 s after each refusal, as a client would retry) until one is
    done; seconds from `since`. The router refuses (503) what no replica can take at the time."""
    async with httpx.AsyncClient(timeout=timeout_s) as http:
        while time.monotonic() - since < timeout_s:
            with contextlib.suppress(httpx.HTTPError):
                resp = await http.post(url + "/v1/completions", json={"prompt": "The lighthouse", "max_tokens": 8,
                                                                        "temperature": 0, "ignore_eos": True})
                if resp.status_code == 200:
                    return time.monotonic() - since
            await asyncio.sleep(0.1)
    raise RuntimeError(f"nothing served within {timeout_s:.0f} s")


async def _hot_replan(cluster: LocalCluster, args) -> dict:
    subjects = Subjects(cluster.subject_prefix)
    nc = await nats.connect(cluster.nats_url)
    acks = EpochAcks()  # when each replica applied the re-plan (its heartbeats carry the epoch once it has)

    async def on_beat(msg) -> None:
        beat = protocol.decode_or_warn(Heartbeat, msg.data, log)
        if beat is not None:
            acks.beat(beat)

    await nc.subscribe(subjects.heartbeats, cb=on_beat)
    prompts = [f"Write a long story about a lighthouse keeper, part {i}." for i in range(args.requests)]
    times: list[list[float]] = [[] for _ in prompts]
    try:
        async with Client(cluster.nats_url, timeout_s=300) as client:
            t0 = time.monotonic()
            tasks = [asyncio.create_task(sdk_stream(client, p, args.max_tokens, t)) for p, t in zip(prompts, times)]
            while min(len(t) for t in times) < args.kill_after:
                if all(task.done() for task in tasks):
                    raise RuntimeError("the requests finished before the kill")
                await asyncio.sleep(0.01)
            progress("killing r2 (the decode replica)")
            killed = time.monotonic()
            acks.expect(2, ["r0", "r1"], now=killed)  # the planner's first re-plan, without r2
            cluster.kill("r2")
            short = asyncio.create_task(_until_served(cluster.http_url, killed))
            published = None
            while published is None and time.monotonic() - killed < 60:
                plan = await current_plan(nc, subjects)
                if plan is not None and plan.epoch >= 2:
                    published = time.monotonic(), plan
                await asyncio.sleep(0.02)
            if published is None:
                raise RuntimeError("the planner published no plan within 60 s of the kill")
            t_pub, plan = published
            if plan.epoch != 2 or sorted(rep.id for rep in plan.replicas) != ["r0", "r1"]:
                raise RuntimeError(f"unexpected re-plan: epoch {plan.epoch}, replicas {plan.ids('prefill')} "
                                   f"prefill and {plan.ids('decode')} decode")
            while not acks.done(2) and time.monotonic() - killed < 60:
                await asyncio.sleep(0.02)
            applied = max(acks.ack_times(2).values()) if acks.done(2) else None
            results = await asyncio.gather(*tasks)
            served_s = await short
    finally:
        await nc.close()
    rows = []
    for res, t in zip(results, times):
        gaps = [b - a for a, b in zip(t, t[1:])]
        whole = res["finish_reason"] == "length" and res["tokens"] == args.max_tokens
        rows.append({"whole": whole, "tokens": res["tokens"], "error": res["error"],
                     "longest_stall_s": r(max(gaps) if gaps else 0.0)})
    return {"killed_at_s": r(killed - t0), "epoch": plan.epoch,
            "phases": {rep.id: rep.phase for rep in plan.replicas},
            "published_s": r(t_pub - killed), "applied_s": r(applied) if applied is not None else None,
            "served_again_s": r(served_s), "streams": rows,
            "requests_lost": sum(not row["whole"] for row in rows)}


async def _restart_replica(cluster: LocalCluster) -> dict:
    """Stop r1 and start it again as a decode process; seconds from the stop until a request is served."""
    progress("restarting r1 as a decode process")
    stopped = time.monotonic()
    await asyncio.to_thread(cluster.kill, "r1", signal.SIGTERM)  # it drains what it holds (nothing) first
    exited = time.monotonic()
    cluster.start_replica("decode", "r1")
    done = await _until_served(cluster.http_url, stopped)
    return {"process_exit_s": r(exited - stopped), "served_again_s": r(done)}


def _restart_all(cluster: LocalCluster, after: Path, args) -> dict:
    progress("restarting the whole deployment with the plan without r2")
    stopped = time.monotonic()
    cluster.stop()
    down = time.monotonic()
    fresh = LocalCluster(model=args.model, plan_file=str(after), kv_codec="int4", threads_per_replica=1,
                         log_level="WARNING", planner_args=["--shift", "0"])
    try:
        fresh.start()
        up = time.monotonic()
        done = asyncio.run(_until_served(fresh.http_url, stopped))
    finally:
        fresh.stop()
    return {"stop_s": r(down - stopped), "start_s": r(up - down), "served_again_s": r(done)}


def plot(result: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = ["hot re-plan\n(phase flip)", "restart r1\nas decode", "restart\neverything"]
    values = [result["hot_replan"]["served_again_s"], result["restart_replica"]["served_again_s"],
              result["restart_all"]["served_again_s"]]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    bars = ax.bar(labels, values, color=["tab:green", "tab:orange", "tab:red"],
                  label="until an 8-token request is done")
    ax.bar_label(bars, fmt="%.2f s", fontsize=8)
    ax.set_ylabel("seconds from the change")
    ax.set_title(f"{result['model']}: a decode replica dies; the same new layout three ways", fontsize=9)
    save_plot(fig, ax, path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2", help="model (default smollm2; 'tiny-random' is quicker)")
    p.add_argument("--requests", type=int, default=3, help="concurrent streamed requests during the hot re-plan")
    p.add_argument("--max-tokens", type=int, default=120, help="tokens per streamed request")
    p.add_argument("--kill-after", type=int, default=30, help="kill r2 once every stream has this many tokens")
    p.add_argument("--no-plot", action="store_true", help="do not write docs/replan_vs_restart.png")
    args = p.parse_args()
    if not 0 < args.kill_after < args.max_tokens:
        p.error("--kill-after must be between 0 and --max-tokens")
    info = host_info()
    with tempfile.TemporaryDirectory() as tmp:
        start, after = _write_plans(Path(tmp))
        progress(f"starting {args.model}: r0, r1 prefill, r2 decode, and the live planner")
        cluster = LocalCluster(model=args.model, plan_file=str(start), kv_codec="int4", threads_per_replica=1,
                               log_level="WARNING", planner_args=["--shift", "0"]).start()
        try:
            hot = asyncio.run(_hot_replan(cluster, args))
            one = asyncio.run(_restart_replica(cluster))
            everything = _restart_all(cluster, after, args)
        finally:
            with contextlib.suppress(Exception):
                cluster.stop()
    result = {"benchmark": "replan_vs_restart", "model": args.model, "host": info, "hot_replan": hot,
              "restart_replica": one, "restart_all": everything}
    finish(result, "replan_vs_restart", plot, args.no_plot)


if __name__ == "__main__":
    main()
