"""Where the current plan lives: the JetStream KV bucket `<prefix>-plan`, key `current`.

The planner (or an operator) `publish`es a plan with a higher epoch than the stored one;
the router and every replica `watch` the key and hot-apply each newer plan. Replicas
acknowledge by carrying the applied epoch in their heartbeats (a replica whose phase changes
does so once it has drained and flipped); `EpochAcks` records when each one did.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable

import nats
from nats.js.errors import BucketNotFoundError, KeyNotFoundError

from thunderserve.common import protocol
from thunderserve.common.plan import Plan
from thunderserve.common.protocol import Heartbeat, Subjects

log = logging.getLogger(__name__)

PLAN_KEY = "current"


class StalePlanError(ValueError):
    """A plan whose epoch is not newer than the one already published."""


async def _bucket(nc: nats.NATS, subjects: Subjects, create: bool):
    js = nc.jetstream()
    try:
        return await js.key_value(subjects.plan_bucket)
    except BucketNotFoundError:
        if not create:
            raise
        return await js.create_key_value(bucket=subjects.plan_bucket, history=8)


async def current_plan(nc: nats.NATS, subjects: Subjects) -> Plan | None:
    try:
        kv = await _bucket(nc, subjects, create=False)
        entry = await kv.get(PLAN_KEY)
    except (BucketNotFoundError, KeyNotFoundError):
        return None
    return Plan.from_json(entry.value)


async def publish_plan(nc: nats.NATS, subjects: Subjects, plan: Plan) -> int:
    """Store `plan` as the current one. Its epoch must exceed the stored plan's."""
    plan.validate()
    kv = await _bucket(nc, subjects, create=True)
    try:
        entry = await kv.get(PLAN_KEY)
        stored = Plan.from_json(entry.value)
        if plan.epoch <= stored.epoch:
            raise StalePlanError(f"plan epoch {plan.epoch} is not newer than the current {stored.epoch}")
        # Compare-and-set on the revision: two planners cannot both win the same epoch.
        return await kv.update(PLAN_KEY, plan.to_json().encode(), last=entry.revision)
    except KeyNotFoundError:
        return await kv.create(PLAN_KEY, plan.to_json().encode())


class EpochAcks:
    """When each replica acknowledged each published epoch, from the heartbeats fed to `beat`.

    `expect(epoch, ids)` right after publishing; a heartbeat carrying that epoch or a later one
    acknowledges it. `done(epoch)` once every expected replica has."""

    def __init__(self) -> None:
        self._published: dict[int, float] = {}  # epoch -> monotonic time published
        self._expected: dict[int, set[str]] = {}
        self._acked: dict[int, dict[str, float]] = {}  # epoch -> replica -> seconds after publishing

    def expect(self, epoch: int, replica_ids: Iterable[str], now: float | None = None) -> None:
        self._published[epoch] = time.monotonic() if now is None else now
        self._expected[epoch] = set(replica_ids)
        self._acked[epoch] = {}

    def beat(self, beat: Heartbeat, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        for epoch, expected in self._expected.items():
            if beat.plan_epoch >= epoch and beat.replica_id in expected and beat.replica_id not in self._acked[epoch]:
                self._acked[epoch][beat.replica_id] = now - self._published[epoch]

    def pending(self, epoch: int) -> set[str]:
        return self._expected.get(epoch, set()) - set(self._acked.get(epoch, {}))

    def done(self, epoch: int) -> bool:
        return epoch in self._expected and not self.pending(epoch)

    def ack_times(self, epoch: int) -> dict[str, float]:
        """Seconds from publishing to each replica's acknowledgement."""
        return dict(self._acked.get(epoch, {}))

    def forget(self, epoch: int) -> None:
        for table in (self._published, self._expected, self._acked):
            table.pop(epoch, None)


async def wait_for_acks(nc: nats.NATS, subjects: Subjects, publish: Callable[[], Awaitable[int]],
                        replica_ids: Iterable[str], timeout_s: float) -> tuple[int, dict[str, float], set[str]]:
    """Run `publish` (it returns the epoch it published) while watching the heartbeats; wait up to
    `timeout_s` for every replica in `replica_ids` to acknowledge it. Returns (epoch, the replicas'
    acknowledgement times in s, the replicas that did not in time)."""
    acks = EpochAcks()

    async def on_beat(msg) -> None:
        beat = protocol.decode_or_warn(Heartbeat, msg.data, log)
        if beat is not None:
            acks.beat(beat)

    sub = await nc.subscribe(subjects.heartbeats, cb=on_beat)
    try:
        t0 = time.monotonic()
        epoch = await publish()
        acks.expect(epoch, replica_ids, now=t0)
        deadline = t0 + timeout_s
        while not acks.done(epoch) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return epoch, acks.ack_times(epoch), acks.pending(epoch)
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()


class PlanWatcher:
    """Calls `on_plan` with every plan newer than the last one applied (the current one first)."""

    def __init__(self, nc: nats.NATS, subjects: Subjects, on_plan: Callable[[Plan], Awaitable[None]]):
        self.nc, self.subjects, self.on_plan = nc, subjects, on_plan
        self.epoch = 0
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        kv = await _bucket(self.nc, self.subjects, create=True)
        watcher = await kv.watch(PLAN_KEY)
        self._task = asyncio.create_task(self._run(watcher))

    async def restart(self) -> None:
        """Watch afresh (after a NATS reconnect: the old watch would take several seconds to notice
        that its consumer went with the server). Plans not newer than the applied one are skipped.
        While JetStream is still recovering, it tries again (backing off to 5 s) until it can."""
        await self.stop()
        delay = 0.25
        while True:
            try:
                await self.start()
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("could not watch the plan again after reconnecting (%s); retrying in %.2g s", exc, delay)
                await asyncio.sleep(delay)
                delay = min(5.0, delay * 2)

    async def _run(self, watcher) -> None:
        async for entry in watcher:
            if entry is None or entry.value is None or entry.operation is not None and entry.operation != "PUT":
                continue  # the end-of-history marker, or a delete
            try:
                plan = Plan.from_json(entry.value)
            except ValueError as exc:
                log.warning("ignoring an unreadable plan: %s", exc)
                continue
            if plan.epoch <= self.epoch:
                continue
            try:
                await self.on_plan(plan)
                self.epoch = plan.epoch
            except Exception:
                log.exception("applying plan epoch %d failed", plan.epoch)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
