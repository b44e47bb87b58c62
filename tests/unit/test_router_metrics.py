"""The router's latency histograms in Prometheus' text format."""

from __future__ import annotations

from thunderserve.router.metrics import Histogram


def test_buckets_are_cumulative_with_sum_and_count():
    h = Histogram("x_seconds", "a test", (0.1, 1.0))
    h.observe(0.05)
    h.observe(0.5, times=2)  # one gap shared out among two tokens
    h.observe(7.0)
    assert h.render() == ["# HELP x_seconds a test", "# TYPE x_seconds histogram",
                          'x_seconds_bucket{le="0.1"} 1', 'x_seconds_bucket{le="1"} 3', 'x_seconds_bucket{le="+Inf"} 4',
                          "x_seconds_sum 8.050000", "x_seconds_count 4"]
    h.observe(0.1)  # a value on a bound falls in that bucket (le: less than or equal)
    assert 'x_seconds_bucket{le="0.1"} 2' in h.render()
