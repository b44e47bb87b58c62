"""`thunderserve up`'s argument checks: bad input is one error line and exit 2, before anything starts."""

from __future__ import annotations

import json

import pytest

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
