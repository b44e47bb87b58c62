"""How well the planner's cost model predicts the real engine once calibrated from it.

    python benchmarks/planner_calibration.py [--model smollm2] [--threads 1] [--repeats 5] [--no-plot]

`thunderserve profile`'s default points (prefills of 32, 128 and 512 tokens; decode steps of 1, 4 and
16 sequences at 128 and 1,024 tokens of KV each) are timed and fitted (`planner/profile.py`: achieved
FLOP/s, memory bandwidth, per-pass overhead and how far compute and memory traffic overlap, through the
cost model's own formulas). Then
other shapes, not used by the fit, are timed and predicted: prefills of 64, 256, 1,024 and 2,000 tokens,
decode steps of 2, 8 and 32 sequences at 512 and 2,000 tokens. Prints JSON (each point's measured and
predicted time and relative error); writes docs/planner_calibration.png unless --no-plot.
"""

from __future__ import annotations

import argparse

from backbone_common import finish, host_info, progress, r, save_plot

from thunderserve.common.engine import create_engine
from thunderserve.planner import profile
from thunderserve.planner.model import ModelSpec


def _rows(points: list[profile.Point], errors: list[float]) -> list[dict]:
    return [{"kind": p.kind, "tokens": p.tokens, "context": p.context, "measured_s": r(p.seconds, 4),
             "predicted_s": r(p.seconds * (1 + e), 4), "error": r(e)} for p, e in zip(points, errors)]


def plot(result: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 5))
    for key, marker in (("fitted", "o"), ("held_out", "^")):
        for kind, color in (("prefill", "tab:blue"), ("decode", "tab:orange")):
            rows = [x for x in result[key] if x["kind"] == kind]
            ax.scatter([x["measured_s"] for x in rows], [x["predicted_s"] for x in rows], marker=marker, color=color,
                       label=f"{kind}, {key.replace('_', '-')}")
    lo = min(x["measured_s"] for x in result["fitted"] + result["held_out"]) * 0.7
    hi = max(x["measured_s"] for x in result["fitted"] + result["held_out"]) * 1.4
    ax.plot([lo, hi], [lo, hi], color="grey", lw=1, ls="--", label="prediction = measurement")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("measured, s")
    ax.set_ylabel("cost model, s")
    ax.set_title(f"{result['model']} on {result['threads']} CPU thread(s): the calibrated cost model", fontsize=9)
    save_plot(fig, ax, path, grid="both")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2", help="model (default smollm2)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--repeats", type=int, default=5, help="runs per point, median counts (default 5)")
    p.add_argument("--no-plot", action="store_true", help="do not write docs/planner_calibration.png")
    args = p.parse_args()
    info = host_info()
    engine = create_engine(args.model, "float32", threads=args.threads)
    spec = profile.spec_for(ModelSpec.from_config(engine.config.to_dict(), engine.name), 4, engine.kv_dtype.itemsize)
    progress("timing the calibration points")
    fitted = profile.measure(engine, [32, 128, 512], [1, 4, 16], [128, 1024], args.repeats, progress)
    fit = profile.fit(fitted, spec)
    progress(f"fitted: {fit}")
    held = profile.measure(engine, [64, 256, 1024, 2000], [2, 8, 32], [512, 2000], args.repeats, progress)
    held_errors = profile.errors(held, spec, fit)
    result = {"benchmark": "planner_calibration", "model": engine.name, "threads": args.threads, "host": info,
              "fit": {"tflops": r(fit.tflops, 4), "mem_gbps": r(fit.mem_gbps, 2),
                      "overhead_ms": r(fit.overhead_s * 1e3, 2), "overlap": r(fit.overlap, 2),
                      "rms_rel_error": r(fit.rms_rel_error)},
              "fitted": _rows(fitted, profile.errors(fitted, spec, fit)), "held_out": _rows(held, held_errors),
              "held_out_rms_rel_error": r((sum(e * e for e in held_errors) / len(held_errors)) ** 0.5),
              "held_out_max_abs_error": r(max(abs(e) for e in held_errors))}
    finish(result, "planner_calibration", plot, args.no_plot)


if __name__ == "__main__":
    main()
