"""The router's workload recorder: what it reports to the planner on `<prefix>.workload`."""

from __future__ import annotations

from thunderserve.common import protocol
from thunderserve.common.protocol import WorkloadReport
from thunderserve.router.workload import WorkloadRecorder


def test_a_report_covers_its_period_and_starts_the_next():
    rec = WorkloadRecorder("router-a")
    rec._since = 100.0
    for _ in range(3):
        rec.arrived()
    rec.finished(12, 40)
    rec.finished(7, 3)
    first = rec.report(now=105.0)
    assert (first.router_id, first.period_s, first.arrivals, first.sampled_of) == ("router-a", 5.0, 3, 2)
    assert list(zip(first.prompt_lens, first.output_lens, strict=True)) == [(12, 40), (7, 3)]
    second = rec.report(now=107.5)
    assert (second.period_s, second.arrivals, second.sampled_of, second.prompt_lens) == (2.5, 0, 0, [])
    again = protocol.decode(WorkloadReport, protocol.encode(first))  # it survives the wire
    assert again == first


def test_past_the_cap_the_pairs_are_a_uniform_sample_that_stays_paired():
    rec = WorkloadRecorder("r", max_pairs=50, seed=1)
    for i in range(1000):
        rec.finished(i, 2 * i + 1)  # each pair identifiable
    report = rec.report()
    assert report.sampled_of == 1000 and len(report.prompt_lens) == len(report.output_lens) == 50
    assert all(o == 2 * p + 1 for p, o in zip(report.prompt_lens, report.output_lens, strict=True))
    assert len(set(report.prompt_lens)) == 50
    # a uniform sample of 0..999 is not the first 50 (what a plain cap would keep): its mean is near 500
    assert 300 < sum(report.prompt_lens) / 50 < 700
