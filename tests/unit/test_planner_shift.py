"""Workload shifts: the routers' reports turned into a Workload, and when it counts as shifted."""

from __future__ import annotations

import pytest

from thunderserve.common.protocol import WorkloadReport
from thunderserve.planner.shift import ShiftPolicy, WorkloadWindow, shift_reasons
from thunderserve.planner.workload import Workload

PLANNED = Workload(2.0, [1000], [100], ttft_slo=3.0, tpot_slo=0.05, attainment=0.95)


def _report(router: str, period: float, arrivals: int, pairs: list[tuple[int, int]], of: int | None = None):
    return WorkloadReport(router, period, arrivals, [p for p, _ in pairs], [o for _, o in pairs],
                          len(pairs) if of is None else of)


def test_rate_is_each_routers_arrivals_over_its_own_time_summed():
    win = WorkloadWindow(60.0)
    win.add(_report("a", 5.0, 10, [(100, 10)] * 10), now=0.0)
    win.add(_report("a", 5.0, 20, [(300, 30)] * 10), now=5.0)
    win.add(_report("b", 2.0, 4, []), now=5.0)  # a second router, reporting every 2 s
    seen = win.observed(PLANNED, now=5.0)
    assert seen.rate == pytest.approx(30 / 10 + 4 / 2)
    assert seen.prompt_mean == pytest.approx(200) and seen.output_mean == pytest.approx(20)
    # the plan's SLOs and attainment carry over: only the traffic is observed
    assert (seen.ttft_slo, seen.tpot_slo, seen.attainment) == (3.0, 0.05, 0.95)
    # lengths stay paired, so the decode batch's length bias is the traffic's
    assert seen.decode_hold_tokens == pytest.approx((110 * 9 + 330 * 29) / (9 + 29))


def test_old_reports_leave_the_window_and_too_few_requests_give_nothing():
    win = WorkloadWindow(10.0)
    win.add(_report("a", 5.0, 5, [(100, 10)] * 5), now=0.0)
    win.add(_report("a", 5.0, 5, [(900, 90)] * 5), now=8.0)
    assert win.observed(PLANNED, min_requests=10, now=8.0).prompt_mean == pytest.approx(500)
    assert win.finished(now=12.0) == 5  # the first report is older than 10 s
    assert win.observed(PLANNED, min_requests=10, now=12.0) is None
    assert win.observed(PLANNED, min_requests=5, now=12.0).prompt_mean == pytest.approx(900)
    assert WorkloadWindow(10.0).observed(PLANNED) is None  # nothing reported yet
    idle = WorkloadWindow(10.0)
    idle.add(_report("a", 5.0, 0, [(100, 10)] * 5), now=0.0)  # finishes but no arrivals: rate 0
    assert idle.observed(PLANNED, now=1.0) is None


def test_a_sampled_report_weighs_as_many_requests_as_it_stands_for():
    win = WorkloadWindow(60.0)
    win.add(_report("a", 5.0, 100, [(1000, 10)] * 10, of=90), now=0.0)  # 10 pairs stand for 90 requests
    win.add(_report("a", 5.0, 10, [(100, 100)] * 10), now=1.0)  # 10 pairs for 10
    seen = win.observed(PLANNED, now=1.0)
    assert seen.prompt_mean == pytest.approx(0.9 * 1000 + 0.1 * 100, rel=0.05)


def test_a_shift_is_a_move_past_the_threshold_either_way():
    same = Workload(2.2, [1100], [95])
    assert shift_reasons(PLANNED, same, 0.25) == []
    longer = Workload(2.0, [2600], [100])
    assert shift_reasons(PLANNED, longer, 0.25) == ["mean prompt 1e+03 -> 2.6e+03 (+160%)"]
    slower = Workload(1.0, [1000], [30])  # halved rate, output cut to 30%: both count
    reasons = shift_reasons(PLANNED, slower, 0.25)
    assert [r.split(" ")[0] + " " + r.split(" ")[1] for r in reasons] == ["rate 2", "mean output"]
    assert "(-50%)" in reasons[0] and "(-70%)" in reasons[1]
    assert shift_reasons(PLANNED, slower, 3.0) == []


@pytest.mark.parametrize("kwargs", [{"window_s": 0}, {"threshold": 0}, {"min_requests": 0}, {"cooldown_s": -1}])
def test_a_policy_refuses_values_that_make_no_sense(kwargs):
    with pytest.raises(ValueError, match="shift policy"):
        ShiftPolicy(**kwargs)
