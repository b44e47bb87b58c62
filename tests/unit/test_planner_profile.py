"""Calibrating the cost model from the engine: the fit recovers known rates, a real engine's timings
give a usable profile, and a plan made with the efficiencies records them for its live planner."""

from __future__ import annotations

import dataclasses
import json

import pytest

from thunderserve.planner import costmodel as cm
from thunderserve.planner import profile
from thunderserve.planner.catalog import get_gpu
from thunderserve.planner.cli import main as plan_main
from thunderserve.planner.model import ModelSpec
from thunderserve.planner.planner import Planner
from thunderserve.planner.profile_cli import main as profile_main
from thunderserve.planner.simulate_cli import main as simulate_main

PAIR = "deploy/clusters/a40-3090ti-40g.yaml"


def _points(model: ModelSpec, truth: profile.Fit) -> list[profile.Point]:
    """What a device with exactly `truth`'s rates would measure, per the cost model."""
    gpu, calib = truth.device(), dataclasses.replace(cm.DEFAULT_CALIBRATION, compute_eff=1.0, mem_eff=1.0,
                                                     stage_overhead=truth.overhead_s, overlap=truth.overlap)
    shapes = [profile.Point("prefill", n) for n in (32, 256, 2048)]
    shapes += [profile.Point("decode", b, c) for b in (1, 8, 64, 256) for c in (256, 4096)]
    return [dataclasses.replace(p, seconds=profile.predict(p, model, gpu, calib)) for p in shapes]


@pytest.mark.parametrize("truth", [profile.Fit(90.0, 700.0, 2e-3, 0.0), profile.Fit(0.05, 15.0, 0.03, 0.0, 0.0),
                                   profile.Fit(20.0, 300.0, 5e-3, 0.0, 0.4)])
def test_the_fit_recovers_the_rates_that_made_the_points(truth):
    model = ModelSpec.load("llama-7b")
    found = profile.fit(_points(model, truth), model)
    assert found.tflops == pytest.approx(truth.tflops, rel=0.02)
    assert found.mem_gbps == pytest.approx(truth.mem_gbps, rel=0.02)
    assert found.overhead_s == pytest.approx(truth.overhead_s, rel=0.05)
    assert found.overlap == pytest.approx(truth.overlap, abs=0.03)
    assert found.rms_rel_error < 0.01


def test_the_fit_needs_both_phases():
    model = ModelSpec.load("llama-7b")
    with pytest.raises(ValueError, match="prefill and one decode"):
        profile.fit([profile.Point("prefill", 64, 0, 0.1)], model)


def test_efficiencies_are_the_rates_over_the_datasheet_and_a_plan_keeps_them(tmp_path):
    a40 = get_gpu("A40")
    calib = profile.Fit(a40.tflops * 0.4, a40.mem_gbps * 0.6, 3e-3, 0.0).calibration(a40)
    assert (calib.compute_eff, calib.mem_eff, calib.stage_overhead) == pytest.approx((0.4, 0.6, 3e-3))
    (tmp_path / "profile.json").write_text(json.dumps({"calibration": dataclasses.asdict(calib)}))
    out = tmp_path / "plan.json"
    args = ["--cluster", PAIR, "--model", "llama-7b", "--workload", "code", "--rate", "1", "--quiet"]
    assert plan_main([*args, "--calibration", str(tmp_path / "profile.json"), "--json", str(out)]) == 0
    from thunderserve.common.plan import Plan

    plan = Plan.from_json(out.read_text())
    assert Planner.from_plan(plan).calib == calib  # the live planner re-plans with the same efficiencies
    assert plan_main([*args, "--json", str(tmp_path / "default.json")]) == 0
    default = Plan.from_json((tmp_path / "default.json").read_text())
    assert plan.objective < default.objective  # 40% of peak compute against the default guess of 55%
    # `simulate` judges the plan under the cost model it was made with
    stripped = json.loads(out.read_text())
    del stripped["meta"]["planner"]["calibration"]
    (tmp_path / "stripped.json").write_text(json.dumps(stripped))
    ttft = {}
    for name in ("plan", "stripped"):
        sim_args = ["--plan", str(tmp_path / f"{name}.json"), "--workload", "code", "--rate", "0.2", "--duration", "60",
                    "--cluster", PAIR, "--json", str(tmp_path / f"sim-{name}.json")]
        assert simulate_main(sim_args) == 0
        ttft[name] = json.loads((tmp_path / f"sim-{name}.json").read_text())["ttft_s"]["p50"]
    assert ttft["plan"] > ttft["stripped"] * 1.2  # 40% of peak compute, not 55%: prefill takes longer
    (tmp_path / "rates-only.json").write_text(json.dumps({"fit": {}}))
    assert plan_main([*args, "--calibration", str(tmp_path / "rates-only.json")]) == 2


def test_profiling_the_real_engine(tmp_path, capsys):
    """`thunderserve profile` on the tiny random Llama: every point timed, rates fitted, efficiencies
    against the named type."""
    out = tmp_path / "profile.json"
    rc = profile_main(["--model", "tiny-random", "--prompts", "16", "64", "--batches", "1", "4", "--contexts", "32",
                       "--repeats", "2", "--gpu", "A40", "--json", str(out)])
    assert rc == 0
    body = json.loads(out.read_text())
    kinds = [(p["kind"], p["tokens"], p["context"]) for p in body["points"]]
    assert kinds == [("prefill", 16, 0), ("prefill", 64, 0), ("decode", 1, 32), ("decode", 4, 32)]
    assert all(p["seconds"] > 0 for p in body["points"])
    assert body["fit"]["tflops"] > 0 and body["fit"]["mem_gbps"] > 0 and body["fit"]["overhead_s"] >= 0
    assert body["gpu"] == "A40"
    assert body["calibration"]["compute_eff"] == pytest.approx(body["fit"]["tflops"] / get_gpu("A40").tflops)
    assert "achieved:" in capsys.readouterr().out
    assert profile_main(["--model", "tiny-random", "--gpu", "no-such-gpu"]) == 2
