"""The allocator setting the replicas apply at start-up (thunderserve.common.memory)."""

from __future__ import annotations

import ctypes.util
import subprocess
import sys

import pytest


@pytest.mark.skipif(not sys.platform.startswith("linux") or not ctypes.util.find_library("c"), reason="glibc only")
def test_keep_freed_memory_applies_on_glibc() -> None:
    # A fresh interpreter: the settings are process-wide and must not leak into the test run.
    code = "from thunderserve.common.memory import keep_freed_memory; print(keep_freed_memory())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "True"


def test_keep_freed_memory_reports_a_missing_libc(monkeypatch: pytest.MonkeyPatch) -> None:
    from thunderserve.common import memory

    def no_libc(name: str):
        raise OSError("no libc")

    monkeypatch.setattr(memory.ctypes, "CDLL", no_libc)
    assert memory.keep_freed_memory() is False
