"""`thunderserve plan` / `python -m thunderserve.planner`."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from thunderserve.common.plan import Plan
from thunderserve.planner.cli import main

ROOT = Path(__file__).resolve().parents[2]
PAIR = str(ROOT / "deploy" / "clusters" / "a40-3090ti-40g.yaml")


def test_plan_prints_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "plan.json"
    rc = main(["--cluster", PAIR, "--model", "llama-13b", "--workload", "conversation", "--rate", "3",
               "--json", str(out)])
    cap = capsys.readouterr()
    assert rc == 0
    assert "replica" in cap.out and "TPxPP" in cap.out and "$/h" in cap.out and "req/s" in cap.out
    assert "searching" in cap.err  # progress on stderr
    plan = Plan.from_json(out.read_text())
    plan.validate()
    assert plan.replicas and plan.objective > 0 and plan.epoch == 1
    assert plan.model == "llama-13b" and plan.workload["rate"] == 3
    # the KV traffic the plan puts on the network, busiest first, on the screen and in the plan
    load = plan.meta["network_load"]
    assert list(load.values()) == sorted(load.values(), reverse=True) and max(load.values()) <= 0.6 + 1e-6
    busiest = next(iter(load))
    assert f"busiest first (share of bandwidth): {busiest} {load[busiest]:.0%}" in cap.out


def test_trace_workload_and_hf_config(tmp_path, capsys):
    trace = tmp_path / "t.csv"
    trace.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n"
                     "2023-11-16 18:15:46.6805900,1000,50\n2023-11-16 18:15:47.6805900,2000,30\n"
                     "2023-11-16 18:15:48.6805900,1500,40\n")
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"num_hidden_layers": 32, "hidden_size": 4096, "num_attention_heads": 32,
                               "intermediate_size": 11008, "vocab_size": 32000}))
    rc = main(["--cluster", PAIR, "--model", str(cfg), "--workload", str(trace), "--json", "-", "--quiet"])
    cap = capsys.readouterr()
    assert rc == 0 and cap.err == ""
    plan = Plan.from_json(cap.out)
    assert plan.workload["rate"] == pytest.approx(1.0)  # the trace's own rate
    assert plan.workload["prompt_mean"] == pytest.approx(1500)


def _run(args) -> int:
    try:
        return main(args)
    except SystemExit as exc:  # argparse-level errors exit from inside the parser
        return int(exc.code)


@pytest.mark.parametrize("args,needle", [
    (["--cluster", "missing.yaml", "--model", "llama-7b", "--workload", "code", "--rate", "1"], "not found"),
    (["--cluster", PAIR, "--model", "llama-9b", "--workload", "code", "--rate", "1"], "unknown model"),
    (["--cluster", PAIR, "--model", "llama-7b", "--workload", "code"], "--rate is required"),
    (["--cluster", PAIR, "--model", "llama-7b", "--workload", "code", "--rate", "0"], "--rate"),
    (["--cluster", PAIR, "--model", "llama-7b", "--workload", "nope.csv", "--rate", "1"], "nope.csv"),
    (["--cluster", PAIR, "--model", "llama-7b", "--workload", "code", "--rate", "x"], "invalid float"),
    (["--cluster", PAIR], "required"),
    (["--cluster", PAIR, "--model", "llama-7b", "--workload", "code", "--rate", "1", "--from-plan", "p.json"],
     "--from-plan needs --live"),
    (["--cluster", PAIR, "--model", "llama-7b", "--workload", "code", "--rate", "1", "--live", "--shift", "-0.5"],
     "--shift must be >= 0"),
    (["--cluster", PAIR, "--model", "llama-7b", "--workload", "code", "--rate", "1", "--live",
      "--shift-min-requests", "0"], "--shift-min-requests must be > 0"),
])
def test_bad_input_is_one_line_and_exit_2(args, needle, capsys):
    assert _run(args) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_bad_cluster_yaml(tmp_path, capsys):
    bad = tmp_path / "c.yaml"
    bad.write_text("nodes:\n  - {name: n0, gpu: Z900, count: 2}\n")
    assert main(["--cluster", str(bad), "--model", "llama-7b", "--workload", "code", "--rate", "1"]) == 2
    err = capsys.readouterr().err
    assert "unknown GPU type 'Z900'" in err and len(err.strip().splitlines()) == 1


def test_module_entry_point_help():
    r = subprocess.run([sys.executable, "-m", "thunderserve.planner", "--help"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0
    for flag in ("--cluster", "--model", "--workload", "--rate", "--ttft", "--tpot", "--time-limit", "--json"):
        assert flag in r.stdout


def test_live_publishes_the_plan_and_stops_on_sigint(tmp_path, nats_url):
    """`--live --from-plan`: the plan goes to the store as the next epoch; Ctrl-C ends it cleanly.
    (Re-planning on a replica's death: tests/e2e/test_live_planner.py.)"""
    import asyncio
    import signal
    import time

    import nats

    from thunderserve.common.planstore import current_plan
    from thunderserve.common.protocol import Subjects

    plan_file = tmp_path / "plan.json"
    assert main(["--cluster", PAIR, "--model", "llama-7b", "--workload", "code", "--rate", "1", "--quiet",
                 "--json", str(plan_file)]) == 0
    subjects = Subjects(f"live{int(time.time() * 1000) % 100000}")  # a store of this test's own
    proc = subprocess.Popen(
        [sys.executable, "-m", "thunderserve.planner", "--cluster", PAIR, "--model", "llama-7b", "--workload",
         "code", "--rate", "1", "--live", "--from-plan", str(plan_file), "--nats", nats_url,
         "--subject-prefix", subjects.prefix],
        stderr=subprocess.PIPE, text=True)
    try:
        lines = [proc.stderr.readline() for _ in range(2)]  # the planner's log line, then the CLI's
        assert any("live: published plan epoch 1" in line for line in lines), lines

        async def stored() -> Plan | None:
            nc = await nats.connect(nats_url)
            try:
                return await current_plan(nc, subjects)
            finally:
                await nc.close()

        got = asyncio.run(stored())
        assert got is not None and got.epoch == 1
        assert [r.id for r in got.replicas] == [r.id for r in Plan.from_json(plan_file.read_text()).replicas]
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
