"""What the router tells the planner about its traffic (`ts.workload`, DESIGN.md §2).

`WorkloadRecorder` counts the requests that arrive and keeps the (prompt, output) lengths of the
ones that finish; `report()` hands that over as a `WorkloadReport` and starts the next period. The
planner's live loop re-plans when these statistics drift from the workload its plan was made for.
"""

from __future__ import annotations

import random
import time

from thunderserve.common.protocol import WorkloadReport

MAX_PAIRS = 256  # finished requests sent per report at most (a uniform sample past that)


class WorkloadRecorder:
    def __init__(self, router_id: str, max_pairs: int = MAX_PAIRS, seed: int | None = None):
        self.router_id = router_id
        self.max_pairs = max_pairs
        self._rng = random.Random(seed)
        self._since = time.monotonic()
        self._arrivals = 0
        self._finished = 0
        self._pairs: list[tuple[int, int]] = []

    def arrived(self) -> None:
        self._arrivals += 1

    def finished(self, prompt_len: int, output_len: int) -> None:
        """A request ended normally (stop or length) after `output_len` tokens."""
        self._finished += 1
        pair = (prompt_len, output_len)
        if len(self._pairs) < self.max_pairs:
            self._pairs.append(pair)
        else:  # reservoir sampling: every finished request equally likely to be kept
            k = self._rng.randrange(self._finished)
            if k < self.max_pairs:
                self._pairs[k] = pair

    def report(self, now: float | None = None) -> WorkloadReport:
        """The period since the last report, and start a new one."""
        now = time.monotonic() if now is None else now
        out = WorkloadReport(self.router_id, round(now - self._since, 6), self._arrivals,
                             [p for p, _ in self._pairs], [o for _, o in self._pairs], self._finished)
        self._since, self._arrivals, self._finished, self._pairs = now, 0, 0, []
        return out
