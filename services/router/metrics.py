"""Prometheus histograms of what clients feel: time to first token, the gap between tokens, the whole
request. Rendered in the text exposition format by `/metrics`."""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

# Seconds: from a few ms (a mocker deployment, a fast GPU) to minutes (a long CPU prefill).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TOKEN_GAP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0)


@dataclass
class Histogram:
    name: str
    help: str
    buckets: tuple[float, ...]
    counts: list[int] = field(init=False)  # per bucket (not cumulative), the last one for +Inf
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.buckets) + 1)

    def observe(self, value: float, times: int = 1) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += times
        self.total += value * times
        self.count += times

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        running = 0
        for bound, n in zip((*self.buckets, float("inf")), self.counts):
            running += n
            le = "+Inf" if bound == float("inf") else f"{bound:g}"
            lines.append(f'{self.name}_bucket{{le="{le}"}} {running}')
        lines += [f"{self.name}_sum {self.total:.6f}", f"{self.name}_count {self.count}"]
        return lines


@dataclass
class LatencyMetrics:
    ttft: Histogram = field(default_factory=lambda: Histogram(
        "thunderserve_time_to_first_token_seconds", "from the router taking a request to its first token",
        LATENCY_BUCKETS))
    inter_token: Histogram = field(default_factory=lambda: Histogram(
        "thunderserve_inter_token_latency_seconds", "gap between two tokens of a request, per token",
        TOKEN_GAP_BUCKETS))
    e2e: Histogram = field(default_factory=lambda: Histogram(
        "thunderserve_e2e_request_latency_seconds", "from the router taking a request to its last token",
        LATENCY_BUCKETS))

    def render(self) -> list[str]:
        return [*self.ttft.render(), *self.inter_token.render(), *self.e2e.render()]
