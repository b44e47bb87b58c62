"""The planner's live loop (DESIGN.md §2): keep a deployment's plan right as replicas die and return.

`LivePlanner` watches the replicas' heartbeats. Suppose a replica of the base plan has been silent for
`dead_after_s`, or a silent one heart-beats again. It re-plans with the lightweight rescheduling
(`Planner.reschedule`: phases and routing only, grouping and layouts stay, so no weights move). That
covers the replicas alive, and the result is published as the next epoch. The router and the
replicas hot-apply it: a replica whose phase changes drains and flips in place, and the requests the
router parked when their replica died resume on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import nats

from thunderserve.common import protocol
from thunderserve.common.plan import Plan
from thunderserve.common.planstore import StalePlanError, current_plan, publish_plan
from thunderserve.common.protocol import Heartbeat, Subjects

from .planner import Planner

log = logging.getLogger(__name__)


class LivePlanner:
    def __init__(self, nc: nats.NATS, subjects: Subjects, planner: Planner, base: Plan,
                 dead_after_s: float = 2.0, poll_s: float = 0.25):
        self.nc, self.subjects, self.planner, self.base = nc, subjects, planner, base
        self.dead_after_s, self.poll_s = dead_after_s, poll_s
        self.seen: dict[str, float] = {}  # replica id -> monotonic time of its last heartbeat
        self.dead: frozenset[str] = frozenset()  # what the published plan leaves out
        self.epoch = 0  # the last epoch this planner published
        self.history: list[dict] = []  # one entry per published plan
        self._started = 0.0
        self._sub = None
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        """Publish the base plan (as the next epoch) and start watching."""
        self._sub = await self.nc.subscribe(self.subjects.heartbeats, cb=self._on_heartbeat)
        self._started = time.monotonic()
        await self._publish(self._copy(self.base), frozenset(), 0.0)
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()

    async def _on_heartbeat(self, msg) -> None:
        beat = protocol.decode_or_warn(Heartbeat, msg.data, log)
        if beat is not None and beat.state != "stopping":
            self.seen[beat.replica_id] = time.monotonic()

    def silent(self, now: float) -> frozenset[str]:
        """The base plan's replicas with no heartbeat for `dead_after_s` (never seen: since the start)."""
        return frozenset(r.id for r in self.base.replicas
                         if now - self.seen.get(r.id, self._started) > self.dead_after_s)

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.poll_s)
            dead = self.silent(time.monotonic())
            if dead != self.dead:
                await self._replan(dead)

    async def _replan(self, dead: frozenset[str]) -> None:
        t0 = time.monotonic()
        if dead:  # off the event loop: heartbeats keep arriving while it searches
            plan = await asyncio.get_running_loop().run_in_executor(
                None, lambda: self.planner.reschedule(self.base, failed=dead))
        else:
            plan = self._copy(self.base)
        took = time.monotonic() - t0
        try:
            missing = [phase for phase, ids in (("prefill", plan.prefill_ids), ("decode", plan.decode_ids)) if not ids]
            if missing:
                raise ValueError(f"no replica left for {' and '.join(missing)}")
            await self._publish(plan, dead, took)
        except ValueError as exc:  # e.g. no replica left for a phase: keep the current plan
            log.error("replicas %s are gone and no plan can serve without them: %s", ", ".join(sorted(dead)), exc)
            self.dead = dead

    async def _publish(self, plan: Plan, dead: frozenset[str], took_s: float) -> None:
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
        self.epoch, self.dead = plan.epoch, dead
        phases = {r.id: r.phase for r in plan.replicas}
        self.history.append({"epoch": plan.epoch, "dead": sorted(dead), "phases": phases,
                             "replan_ms": round(took_s * 1e3, 1)})
        log.warning("published plan epoch %d (%s; re-planned in %.0f ms): %s", plan.epoch,
                    f"without {', '.join(sorted(dead))}" if dead else "every replica", took_s * 1e3,
                    ", ".join(f"{rid} {ph}" for rid, ph in phases.items()))

    @staticmethod
    def _copy(plan: Plan) -> Plan:
        return Plan.from_json(plan.to_json())
