"""The planner's live loop (DESIGN.md §2): keep a deployment's plan right as replicas die and return,
and as the traffic shifts.

`LivePlanner` watches the replicas' heartbeats and the routers' workload reports. It re-plans with
the lightweight rescheduling (`Planner.reschedule`: phases and routing only, grouping and layouts
stay, so no weights move) when
- a replica of the base plan has been silent for `dead_after_s`, or is gone from NATS (a late one is
  probed as the router probes it: "no responders" on its control subject means its process died), or
  a silent one heart-beats again: the new plan covers the replicas alive, and is always published;
- the workload of the last `shift.window_s` (rate, mean prompt or output length) is off from the one
  the current plan was made for by more than `shift.threshold`, and steady (`shift.steady_shift`):
  the new plan is published if it serves differently (phases, routes, codec), else the observed
  workload just becomes the reference.
A published plan is the next epoch; the router and the replicas hot-apply it (a replica whose phase
changes drains and flips in place, and the requests the router parked when their replica died
resume on it). The planner records when each replica acknowledged the epoch (its heartbeats carry
it): `history[-1]["acks_s"]`, and `applied_s` once every replica of the plan has.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import nats

from thunderserve.common import aio, protocol
from thunderserve.common.plan import Plan
from thunderserve.common.planstore import EpochAcks, StalePlanError, current_plan, publish_plan
from thunderserve.common.protocol import Heartbeat, Subjects, WorkloadReport

from .planner import Planner
from .shift import DEFAULT_SHIFT, ShiftPolicy, WorkloadWindow, steady_shift
from .workload import Workload

log = logging.getLogger(__name__)


class LivePlanner:
    def __init__(self, nc: nats.NATS, subjects: Subjects, planner: Planner, base: Plan,
                 dead_after_s: float = 2.0, poll_s: float = 0.25, shift: ShiftPolicy | None = DEFAULT_SHIFT):
        self.nc, self.subjects, self.planner, self.base = nc, subjects, planner, base
        self.dead_after_s, self.poll_s, self.shift = dead_after_s, poll_s, shift
        self.seen: dict[str, float] = {}  # replica id -> monotonic time of its last heartbeat
        self.dead: frozenset[str] = frozenset()  # what the published plan leaves out
        self.workload: Workload = planner.workload  # what the current plan was made for
        self.window = WorkloadWindow(shift.window_s if shift else 60.0)
        self.current: Plan | None = None  # the last plan this planner published
        self.epoch = 0  # its epoch
        self.history: list[dict] = []  # one entry per published plan
        self.acks = EpochAcks()
        self._started = 0.0
        self._last_shift = float("-inf")  # when the workload last made it re-plan
        self._subs: list = []
        self._task: asyncio.Task | None = None
        self._probes: dict[str, asyncio.Task] = {}  # replica id -> its probe in flight

    async def start(self) -> None:
        """Publish the base plan (as the next epoch) and start watching."""
        self._subs.append(await self.nc.subscribe(self.subjects.heartbeats, cb=self._on_heartbeat))
        if self.shift is not None:
            self._subs.append(await self.nc.subscribe(self.subjects.workload, cb=self._on_workload))
        self._started = time.monotonic()
        await self._publish(self._copy(self.base), frozenset(), self.workload, "start", 0.0)
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        for task in [self._task, *self._probes.values()]:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def _on_heartbeat(self, msg) -> None:
        beat = protocol.decode_or_warn(Heartbeat, msg.data, log)
        if beat is not None and beat.state != "stopping":
            self.seen[beat.replica_id] = time.monotonic()
            self.acks.beat(beat)

    async def _on_workload(self, msg) -> None:
        report = protocol.decode_or_warn(WorkloadReport, msg.data, log)
        if report is not None:
            self.window.add(report)

    def silent(self, now: float) -> frozenset[str]:
        """The base plan's replicas with no heartbeat for `dead_after_s` (never seen: since the start)."""
        return frozenset(r.id for r in self.base.replicas
                         if now - self.seen.get(r.id, self._started) > self.dead_after_s)

    def _probe_late(self, now: float) -> None:
        """Probe each replica heard from before whose heartbeat is late but not yet past `dead_after_s`."""
        for r in self.base.replicas:
            last = self.seen.get(r.id)
            if (last is not None and protocol.PROBE_AFTER_S < now - last <= self.dead_after_s
                    and r.id not in self._probes):
                self._probes[r.id] = asyncio.create_task(self._probe(r.id, last))

    async def _probe(self, replica_id: str, last: float) -> None:
        try:
            if await aio.replica_gone(self.nc, self.subjects, replica_id) and self.seen.get(replica_id) == last:
                log.warning("replica %s is gone from NATS (late heartbeat, no responders)", replica_id)
                self.seen[replica_id] = float("-inf")  # silent from now on, until it heart-beats again
        finally:
            self._probes.pop(replica_id, None)

    def shifted(self, now: float) -> tuple[Workload, list[str]] | None:
        """The observed workload and what moved, if it moved past the threshold and is steady (and
        the cool-down is over)."""
        if self.shift is None or now - self._last_shift < self.shift.cooldown_s:
            return None
        return steady_shift(self.window, self.workload, self.shift, now)

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.poll_s)
            self._note_acks()
            now = time.monotonic()
            self._probe_late(now)
            dead = self.silent(now)
            if dead != self.dead:
                gone, back = sorted(dead - self.dead), sorted(self.dead - dead)
                why = "; ".join(([f"silent: {', '.join(gone)}"] if gone else []) +
                                ([f"back: {', '.join(back)}"] if back else []))
                await self._replan(dead, self.workload, why)
            elif (moved := self.shifted(now)) is not None:
                self._last_shift = now
                observed, reasons = moved
                await self._replan(dead, observed, "workload shift: " + ", ".join(reasons))

    def _note_acks(self) -> None:
        if not self.history or "applied_s" in self.history[-1]:
            return
        entry = self.history[-1]
        entry["acks_s"] = {rid: round(s, 3) for rid, s in self.acks.ack_times(self.epoch).items()}
        if self.acks.done(self.epoch):
            entry["applied_s"] = max(entry["acks_s"].values(), default=0.0)
            log.info("plan epoch %d applied by all %d replicas in %.2f s", self.epoch, len(entry["acks_s"]),
                     entry["applied_s"])

    async def _replan(self, dead: frozenset[str], workload: Workload, why: str) -> None:
        t0 = time.monotonic()
        if dead or workload is not self.planner.workload:  # off the event loop: heartbeats keep arriving
            plan = await asyncio.get_running_loop().run_in_executor(
                None, lambda: self.planner.reschedule(self.base, workload=workload, failed=dead))
        else:
            plan = self._copy(self.base)
        took = time.monotonic() - t0
        missing = [phase for phase, ids in (("prefill", plan.prefill_ids), ("decode", plan.decode_ids)) if not ids]
        if missing and not plan.ids("colocated"):  # e.g. no replica left for a phase: keep the current plan
            log.error("%s, and no plan can serve without them (no replica left for %s); keeping epoch %d",
                      why, " and ".join(missing), self.epoch)
            self.dead = dead
            return
        if dead == self.dead and self.current is not None and _serves_alike(plan, self.current):
            log.info("%s; re-planned in %.0f ms: the plan serves it as it is (epoch %d stays)",
                     why, took * 1e3, self.epoch)
            self.workload = workload
            return
        await self._publish(plan, dead, workload, why, took)

    async def _publish(self, plan: Plan, dead: frozenset[str], workload: Workload, why: str, took_s: float) -> None:
        for _ in range(3):  # another planner may publish in between: take the next free epoch
            current = await current_plan(self.nc, self.subjects)
            plan.epoch = max(self.epoch, current.epoch if current else 0) + 1
            try:
                await publish_plan(self.nc, self.subjects, plan)
                break
            except StalePlanError:
                continue
        else:
            raise ValueError("could not publish: the stored plan's epoch keeps moving")
        self.acks.forget(self.epoch)  # a replaced epoch's late acknowledgements no longer matter
        self.acks.expect(plan.epoch, [r.id for r in plan.replicas])
        self.current, self.epoch, self.dead, self.workload = plan, plan.epoch, dead, workload
        phases = {r.id: r.phase for r in plan.replicas}
        self.history.append({"epoch": plan.epoch, "trigger": why, "dead": sorted(dead), "phases": phases,
                             "workload": workload.summary(), "replan_ms": round(took_s * 1e3, 1)})
        log.warning("published plan epoch %d (%s; re-planned in %.0f ms): %s", plan.epoch, why, took_s * 1e3,
                    ", ".join(f"{rid} {ph}" for rid, ph in phases.items()))
        if workload.rate > plan.objective > 0:
            log.warning("the arrival rate (%.3g req/s) is above what this plan can serve within the SLOs (%.3g)",
                        workload.rate, plan.objective)

    @staticmethod
    def _copy(plan: Plan) -> Plan:
        return Plan.from_json(plan.to_json())


def _serves_alike(a: Plan, b: Plan, tol: float = 0.02) -> bool:
    """Same replicas in the same phases, same codec and first-token routes, and dispatch and routing
    weights within `tol` of each other: publishing `a` over `b` would change nothing that matters."""
    if ({r.id: r.phase for r in a.replicas} != {r.id: r.phase for r in b.replicas} or a.kv_codec != b.kv_codec
            or sorted(a.first_token_from_decode) != sorted(b.first_token_from_decode)):
        return False
    if not _close(a.dispatch, b.dispatch, tol):
        return False
    return set(a.routing) == set(b.routing) and all(_close(a.routing[p], b.routing[p], tol) for p in a.routing)


def _close(x: dict[str, float], y: dict[str, float], tol: float) -> bool:
    return all(abs(x.get(k, 0.0) - y.get(k, 0.0)) <= tol for k in set(x) | set(y))
