"""Workload shifts (DESIGN.md §3): the workload the routers see, against the one the plan was made for.

The routers report what arrived and finished every few seconds (`protocol.WorkloadReport` on
`<prefix>.workload`). `WorkloadWindow` keeps the reports of a sliding window and turns them into a
`Workload` (rate, paired prompt/output lengths, the plan's SLOs). `shift_reasons` says whether that
differs from the plan's workload by more than a threshold: the live planner then re-plans.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

import numpy as np

from thunderserve.common.protocol import WorkloadReport

from .workload import Workload

MAX_SAMPLE = 4096  # (prompt, output) pairs a window's Workload keeps at most


@dataclass(frozen=True)
class ShiftPolicy:
    """When the live planner re-plans for the traffic it sees."""

    window_s: float = 60.0  # statistics over the reports of the last window_s
    threshold: float = 0.25  # a shift: rate, mean prompt or mean output length off by more than this factor - 1
    min_requests: int = 50  # finished requests the window needs before it counts (fewer: too noisy)
    cooldown_s: float = 30.0  # at least this long between two re-plans for the workload

    def __post_init__(self) -> None:
        if self.window_s <= 0 or self.threshold <= 0 or self.min_requests < 1 or self.cooldown_s < 0:
            raise ValueError("a shift policy needs window_s > 0, threshold > 0, min_requests >= 1, cooldown_s >= 0")


DEFAULT_SHIFT = ShiftPolicy()


class WorkloadWindow:
    """The routers' reports of the last `window_s` seconds."""

    def __init__(self, window_s: float):
        self.window_s = window_s
        self._reports: deque[tuple[float, WorkloadReport]] = deque()

    def add(self, report: WorkloadReport, now: float | None = None) -> None:
        if report.period_s > 0 and len(report.prompt_lens) == len(report.output_lens):
            self._reports.append((time.monotonic() if now is None else now, report))

    def _expire(self, now: float) -> None:
        while self._reports and now - self._reports[0][0] > self.window_s:
            self._reports.popleft()

    def finished(self, now: float | None = None) -> int:
        self._expire(time.monotonic() if now is None else now)
        return sum(r.sampled_of for _, r in self._reports)

    def observed(self, like: Workload, min_requests: int = 1, now: float | None = None,
                 last_s: float | None = None) -> Workload | None:
        """The window's workload with `like`'s SLOs, or None while it has fewer than `min_requests`
        finished requests or no arrivals. Rate: each router's arrivals over the time its reports cover,
        summed over routers. Lengths: the finished requests' pairs, each report's sample weighted by
        how many requests it stands for. `last_s`: only the reports of the last `last_s` seconds."""
        now = time.monotonic() if now is None else now
        self._expire(now)
        reports = [r for t, r in self._reports if last_s is None or now - t <= last_s]
        spans: dict[str, list[float]] = {}  # router -> [seconds covered, arrivals]
        prompts: list[int] = []
        outputs: list[int] = []
        weights: list[float] = []
        for r in reports:
            span = spans.setdefault(r.router_id, [0.0, 0.0])
            span[0] += r.period_s
            span[1] += r.arrivals
            if r.prompt_lens:
                prompts += [max(1, n) for n in r.prompt_lens]
                outputs += [max(1, n) for n in r.output_lens]
                weights += [max(r.sampled_of, len(r.prompt_lens)) / len(r.prompt_lens)] * len(r.prompt_lens)
        rate = sum(arrivals / seconds for seconds, arrivals in spans.values())
        if rate <= 0 or sum(r.sampled_of for r in reports) < min_requests or not prompts:
            return None
        w = np.asarray(weights)
        if len(prompts) > MAX_SAMPLE or not np.allclose(w, w[0]):  # resample the pairs to equal weights
            pick = np.random.default_rng(0).choice(len(prompts), size=min(len(prompts), MAX_SAMPLE), p=w / w.sum())
            prompts, outputs = [prompts[i] for i in pick], [outputs[i] for i in pick]
        return Workload(rate, prompts, outputs, like.ttft_slo, like.tpot_slo, like.attainment, "observed")


def shift_reasons(reference: Workload, observed: Workload, threshold: float) -> list[str]:
    """What moved by more than a factor of 1 + threshold (either way): rate, mean prompt or output length."""
    out = []
    for name, ref, obs in (("rate", reference.rate, observed.rate),
                           ("mean prompt", reference.prompt_mean, observed.prompt_mean),
                           ("mean output", reference.output_mean, observed.output_mean)):
        if max(obs / ref, ref / obs) > 1 + threshold:
            out.append(f"{name} {ref:.3g} -> {obs:.3g} ({obs / ref - 1:+.0%})")
    return out


def steady_shift(window: WorkloadWindow, reference: Workload, policy: ShiftPolicy,
                 now: float | None = None) -> tuple[Workload, list[str]] | None:
    """The window's workload and what moved, if it moved past the threshold and is steady: the
    window's newer half looks like the whole. While the window still mixes the old traffic with the
    new, a plan made for the mixture would soon be re-planned again (a needless phase flip)."""
    observed = window.observed(reference, policy.min_requests, now)
    if observed is None:
        return None
    reasons = shift_reasons(reference, observed, policy.threshold)
    if not reasons:
        return None
    recent = window.observed(reference, max(1, policy.min_requests // 2), now, last_s=window.window_s / 2)
    if recent is None or shift_reasons(observed, recent, policy.threshold):
        return None
    return observed, reasons
