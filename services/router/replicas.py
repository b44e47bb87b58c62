"""The router's live view of the replicas, built from their heartbeats, and replica choice."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass

from thunderserve.common.protocol import Heartbeat


class NoReplicaError(RuntimeError):
    """No live replica can take the request's phase right now."""


@dataclass
class ReplicaView:
    beat: Heartbeat
    last_seen: float
    assigned: int = 0  # requests this router sent there that have not finished
    dispatched: int = 0  # requests this router ever sent there
    prompts: int = 0  # requests this router sent there whose first token has not come

    @property
    def load(self) -> float:
        capacity = max(self.beat.capacity, 1)
        # The router's own count reacts at once; the heartbeat's catches other routers' work.
        return max(self.assigned, self.beat.running + self.beat.waiting) / capacity

    @property
    def entry_load(self) -> float:
        """How long one more prompt would wait here. A colocated replica prefills one prompt at a time beside its
        decode batch, which costs its prompts little until it is full (then they wait: the heartbeat's
        `waiting`), so it counts the prompts it holds, as a prefill replica does; any other replica, `load`."""
        if self.beat.phase == "colocated":
            return float(max(self.prompts, self.beat.waiting))
        return self.load


class ReplicaTable:
    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s
        self.replicas: dict[str, ReplicaView] = {}
        self._tiebreak = itertools.count()

    def update(self, beat: Heartbeat) -> bool:
        """Take a heartbeat in. True if the replica's session changed since its last one (it reconnected
        to NATS, or restarted under the same id): what was sent to it before is lost."""
        view = self.replicas.get(beat.replica_id)
        reconnected = view is not None and beat.session != view.beat.session
        if view is None:
            self.replicas[beat.replica_id] = ReplicaView(beat, time.monotonic())
        else:
            view.beat, view.last_seen = beat, time.monotonic()
        if beat.state == "stopping":
            # A replica that says it is leaving takes no new work; it still finishes its own.
            self.forget(beat.replica_id)
        return reconnected

    def alive(self, replica_id: str) -> bool:
        view = self.replicas.get(replica_id)
        return view is not None and time.monotonic() - view.last_seen <= self.timeout_s

    def overdue(self, after_s: float) -> list[str]:
        """Replicas silent for more than `after_s` but not yet past the timeout: worth a probe."""
        now = time.monotonic()
        return [rid for rid, v in self.replicas.items() if after_s < now - v.last_seen <= self.timeout_s]

    def forget(self, replica_id: str) -> None:
        """Count the replica as gone at the next `expired()` (it is known dead before its timeout)."""
        view = self.replicas.get(replica_id)
        if view is not None:
            view.last_seen = -self.timeout_s - 1.0

    def expired(self) -> dict[str, bool]:
        """Replicas whose heartbeats stopped: forget them; returns id -> whether it said it was leaving
        (its last heartbeat was "stopping": a clean stop, not a failure)."""
        now = time.monotonic()
        gone = {rid: v.beat.state == "stopping" for rid, v in self.replicas.items()
                if now - v.last_seen > self.timeout_s}
        for rid in gone:
            del self.replicas[rid]
        return gone

    def ready(self, phase: str | tuple[str, ...], seen_after: float = 0.0) -> list[ReplicaView]:
        """Replicas of `phase` (or of any of several) taking work, heard from within the timeout (and after
        `seen_after`)."""
        phases = (phase,) if isinstance(phase, str) else phase
        now = time.monotonic()
        return [
            v
            for v in self.replicas.values()
            if v.beat.phase in phases and v.beat.state == "ready" and now - v.last_seen <= self.timeout_s
            and v.last_seen > seen_after
        ]

    def choose(self, phase: str | tuple[str, ...], weights: dict[str, float] | None = None,
               avoid: frozenset[str] = frozenset(), seen_after: float = 0.0) -> ReplicaView:
        """The least-loaded ready replica of `phase` (or of any of several); plan weights scale its share when
        given. Replicas in `avoid` only if there is no other; only those heard from after `seen_after`."""
        candidates = self.ready(phase, seen_after)
        candidates = [v for v in candidates if v.beat.replica_id not in avoid] or candidates
        if weights:
            weighted = [v for v in candidates if weights.get(v.beat.replica_id, 0.0) > 0]
            candidates = weighted or candidates
        if not candidates:
            raise NoReplicaError(f"no {phase if isinstance(phase, str) else ' or '.join(phase)} replica is available")

        def key(v: ReplicaView):
            w = max(weights.get(v.beat.replica_id, 1.0) if weights else 1.0, 1e-9)
            # Equal loads (light traffic, all idle): the one sent the least for its weight, so the split over
            # time follows the plan's weights (round robin without them) rather than the table's order.
            return (v.entry_load / w, v.assigned, v.dispatched / w, next(self._tiebreak))

        return min(candidates, key=key)

    def snapshot(self) -> list[dict]:
        now = time.monotonic()
        return [
            {
                "id": rid,
                "phase": v.beat.phase,
                "state": v.beat.state,
                "running": v.beat.running,
                "waiting": v.beat.waiting,
                "assigned": v.assigned,
                "dispatched": v.dispatched,
                "plan_epoch": v.beat.plan_epoch,
                "seen_s_ago": round(now - v.last_seen, 3),
            }
            for rid, v in sorted(self.replicas.items())
        ]
