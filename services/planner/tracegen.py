"""Deterministic synthetic request traces in the Azure LLM inference trace format.

`TIMESTAMP,ContextTokens,GeneratedTokens`, one request per row, Poisson arrivals at 1 req/s.
The two shapes follow the public Azure 2023 traces' broad shape (not their data):
  code          - long prompts (~2k tokens), short outputs (~30 tokens)
  conversation  - medium prompts (~1k tokens), longer outputs (~250 tokens)

    python -m thunderserve.planner.tracegen [--out DIR] [--n 1000]
"""

from __future__ import annotations

import argparse
import datetime as dt
from pathlib import Path

import numpy as np

TRACE_DIR = Path(__file__).with_name("data") / "traces"

# shape -> (prompt median, prompt sigma, output median, output sigma, max prompt, max output)
SHAPES: dict[str, tuple[float, float, float, float, int, int]] = {
    "code": (1800.0, 0.55, 24.0, 0.6, 7800, 400),
    "conversation": (850.0, 0.65, 190.0, 0.75, 4000, 1500),
}
_SEEDS = {"code": 20231116, "conversation": 20231117}
_START = dt.datetime(2023, 11, 16, 18, 0, 0)


def generate(shape: str, n: int = 1000, rate: float = 1.0) -> list[tuple[str, int, int]]:
    med_p, sig_p, med_o, sig_o, max_p, max_o = SHAPES[shape]
    rng = np.random.default_rng(_SEEDS[shape])
    gaps = rng.exponential(1.0 / rate, size=n)
    prompts = np.clip(np.round(med_p * np.exp(sig_p * rng.standard_normal(n))), 16, max_p).astype(int)
    outputs = np.clip(np.round(med_o * np.exp(sig_o * rng.standard_normal(n))), 1, max_o).astype(int)
    t = np.cumsum(gaps)
    rows = []
    for ti, p, o in zip(t, prompts, outputs, strict=True):
        stamp = (_START + dt.timedelta(seconds=float(ti))).strftime("%Y-%m-%d %H:%M:%S.%f")
        rows.append((stamp, int(p), int(o)))
    return rows


def write(shape: str, path: Path, n: int = 1000) -> None:
    with open(path, "w") as f:
        f.write("TIMESTAMP,ContextTokens,GeneratedTokens\n")
        for stamp, p, o in generate(shape, n):
            f.write(f"{stamp},{p},{o}\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=TRACE_DIR, help="output folder (default: package data)")
    ap.add_argument("--n", type=int, default=1000, help="requests per trace")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for shape in SHAPES:
        write(shape, args.out / f"{shape}.csv", args.n)
        print(args.out / f"{shape}.csv")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
