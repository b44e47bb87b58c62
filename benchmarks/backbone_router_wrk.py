"""HTTP request rate the router sustains, driven by `wrk` (a C load generator) instead of Python.

`backbone_router.py` drives HTTP with httpx, which burns more CPU per request than the whole
server; this measures the server side with a client that does not. Needs `wrk` on PATH
(Debian: `apt-get install wrk`). Prints one JSON object.

    python benchmarks/backbone_router_wrk.py [--max-tokens 1 2] [--connections 16 64] [--duration 8]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile

from thunderserve.launcher.cluster import LocalCluster

PROMPT = " ".join(["hello"] * 120)


def _wrk(url: str, body: dict, connections: int, duration: int) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write('wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n')
        script.write(f"wrk.body = {json.dumps(json.dumps(body))}\n")
    out = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--latency", "-s", script.name, url],
                         capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    errors = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)

    def pct(p: str) -> float:
        value, unit = re.search(rf"\s{p}%\s+([\d.]+)(us|ms|s)", out).groups()
        return float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit]

    return {"connections": connections, "requests_per_s": rps, "p50_ms": pct("50"), "p99_ms": pct("99"),
            "non_2xx": int(errors.group(1)) if errors else 0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-tokens", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--connections", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--duration", type=int, default=8, help="seconds per run")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk not found: apt-get install wrk")
    cluster = LocalCluster(model="mocker", kv_codec="none", log_dir=tempfile.mkdtemp(prefix="bb-wrk-"),
                           log_level="WARNING").start()
    runs = []
    try:
        for max_tokens in args.max_tokens:
            body = {"prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0}
            for connections in args.connections:
                run = _wrk(cluster.http_url + "/v1/completions", body, connections, args.duration)
                runs.append({"max_tokens": max_tokens, **run})
                print(f"max_tokens={max_tokens} c={connections}: {run['requests_per_s']:.0f} req/s", file=sys.stderr)
    finally:
        cluster.stop()
    best = max(r["requests_per_s"] for r in runs if r["max_tokens"] == min(args.max_tokens))
    print(json.dumps({"benchmark": "backbone_router_wrk", "server": "mocker replicas, 1 prefill + 1 decode",
                      "runs": runs, "target_requests_per_s": 1000, "best_requests_per_s": best,
                      "pass": best >= 1000}, indent=2))


if __name__ == "__main__":
    main()
