"""Where the current plan lives: the JetStream KV bucket `<prefix>-plan`, key `current`.

The planner (or an operator) `publish`es a plan with a higher epoch than the stored one;
the router and every replica `watch` the key and hot-apply each newer plan. Replicas
acknowledge by carrying the applied epoch in their heartbeats.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

import nats
from nats.js.errors import BucketNotFoundError, KeyNotFoundError

from thunderserve.common.plan import Plan
from thunderserve.common.protocol import Subjects

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
