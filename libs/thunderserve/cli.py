"""The `thunderserve` command: one entry point, one sub-command per job.

Sub-commands live in the package that owns them and are imported only when used, so
`thunderserve up --help` does not pay for importing the planner, and the reverse.
"""

from __future__ import annotations

import importlib
import sys

# sub-command -> (module with a `main(argv) -> int`, one-line summary)
COMMANDS: dict[str, tuple[str, str]] = {
    "up": ("thunderserve.launcher.cli", "serve a model locally: NATS, router, prefill and decode replicas"),
    "plan": ("thunderserve.planner.cli", "plan a cluster: grouping, phases, parallel layout, routing"),
    "simulate": ("thunderserve.planner.simulate_cli", "simulate a plan under a request stream"),
    "apply": ("thunderserve.planner.apply_cli", "publish a plan to a running deployment (hot-applied)"),
    "profile": ("thunderserve.planner.profile_cli", "time the engine here and calibrate the planner's cost model"),
    "status": ("thunderserve.planner.status_cli", "show a running deployment: plan, replicas, traffic"),
}


def _usage() -> str:
    lines = ["usage: thunderserve <command> [options]", "", "commands:"]
    lines += [f"  {name:<10} {summary}" for name, (_, summary) in COMMANDS.items()]
    lines += ["", "Run `thunderserve <command> --help` for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"thunderserve: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
