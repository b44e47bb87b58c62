"""`thunderserve up`'s argument checks: bad input is one error line and exit 2, before anything starts."""

from __future__ import annotations

import json

import pytest
import torch

from thunderserve.launcher.cli import main


def _plan(tmp_path, phases: list[str], ids: list[str] | None = None) -> str:
    ids = ids or [f"r{i}" for i in range(len(phases))]
    plan = {"replicas": [{"id": rid, "phase": ph, "gpus": [f"h:{i}"]} for i, (rid, ph) in enumerate(zip(ids, phases))],
            "dispatch": {}, "routing": {}}
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan))
    return str(path)


@pytest.mark.parametrize("make_args,needle", [
    (lambda t: ["--plan", str(t / "missing.json")], "No such file"),
    (lambda t: ["--plan", _plan(t, ["prefill", "prefill"])], "no decode replica"),
    (lambda t: ["--plan", _plan(t, ["prefill", "decode"], ids=["p.0", "d 1"])], "replica ids may hold only"),
    (lambda t: ["--plan", _plan(t, ["prefill", "colocated"])], "no decode replica"),
    (lambda t: ["--plan", _plan(t, ["prefill", "decode"]), "--decode", "2"], "drop --prefill, --decode"),
    (lambda t: ["--plan", _plan(t, ["colocated"]), "--colocated", "1"], "drop --prefill, --decode"),
    (lambda t: ["--prefill", "0"], "at least 1 of each"),
    (lambda t: ["--colocated", "1", "--decode", "0"], "at least 1 of each"),
    (lambda t: ["--colocated", "-1"], "cannot be negative"),
    (lambda t: ["--restart-limit", "-1"], "cannot be negative"),
    (lambda t: ["--device", "tpu"], "unknown device 'tpu'"),
    pytest.param(lambda t: ["--device", "cuda"], "no CUDA GPU",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this host has a GPU")),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, make_args, needle):
    assert main(make_args(tmp_path)) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_a_file_that_is_not_a_plan_is_refused(tmp_path, capsys):
    bad = tmp_path / "plan.json"
    bad.write_text("{not json")
    assert main(["--plan", str(bad)]) == 2
    assert "--plan" in capsys.readouterr().err


def test_colocated_replicas_serve_alone_or_beside_pairs(tmp_path):
    """A plan of colocated replicas alone is servable, and `--colocated` names its processes like the others."""
    from thunderserve.launcher.cluster import LocalCluster

    alone = LocalCluster(plan_file=_plan(tmp_path, ["colocated", "colocated"], ids=["c0", "c1"]))
    assert alone.replica_specs() == [("c0", "colocated"), ("c1", "colocated")]
    assert (alone.prefill, alone.decode, alone.colocated) == (0, 0, 2)
    mixed = LocalCluster(prefill=1, decode=1, colocated=1)
    assert mixed.replica_specs() == [("prefill-0", "prefill"), ("decode-0", "decode"), ("colocated-0", "colocated")]
    with pytest.raises(ValueError, match="no decode replica"):
        LocalCluster(prefill=1, decode=0, colocated=1)


@pytest.mark.parametrize("phase", ["prefill", "decode", "colocated"])
@pytest.mark.parametrize("argv,needle", [
    (["--model", "/no/such/model"], "unknown model '/no/such/model'"),
    (["--model", "tiny-random", "--device", "gpu0"], "unknown device 'gpu0'"),
    (["--model", "tiny-random", "--channel-backend", "nccl"], "needs --device cuda"),
])
def test_a_replica_refuses_a_model_or_device_it_cannot_use_in_one_line(phase, argv, needle, capsys):
    """Before it connects anywhere: argparse's usage, one error line and exit 2, no traceback."""
    from thunderserve.common.replica import main as replica_main

    with pytest.raises(SystemExit) as exit_:
        replica_main(phase, [*argv, "--nats", "nats://127.0.0.1:1"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert needle in err.splitlines()[-1] and "Traceback" not in err


def test_replicas_spread_over_the_gpus_and_keep_theirs_on_restart(monkeypatch):
    """`--device cuda`: the k-th replica started gets GPU k mod the count, and a restarted one its old GPU."""
    from thunderserve.launcher.cluster import LocalCluster

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)  # the GPUs this host would have
    cluster = LocalCluster(model="mocker", prefill=2, decode=1, device="cuda")
    names = [name for name, _ in cluster.replica_specs()]
    assert [cluster._device_of(n) for n in names] == ["cuda:0", "cuda:1", "cuda:0"]
    assert cluster._device_of("prefill-1") == "cuda:1"
    pinned = LocalCluster(model="mocker", device="cuda:1")
    assert {pinned._device_of(n) for n, _ in pinned.replica_specs()} == {"cuda:1"}
