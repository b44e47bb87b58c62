"""`thunderserve profile`: time the engine on this machine and fit the cost model's device rates to it."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from thunderserve.common.config import DEFAULT_MODEL, CliParser

from . import profile
from .catalog import Catalog, default_catalog
from .cli import INPUT_ERRORS, fail
from .model import DTYPE_BYTES, ModelSpec

PROG = "thunderserve profile"
ENGINE_DTYPES = ("float32", "bfloat16", "float16")


def build_parser() -> argparse.ArgumentParser:
    ap = CliParser(
        prog=PROG,
        description="Calibrate the planner's cost model from the real engine: time prefill passes at several "
                    "prompt lengths and decode steps at several batch sizes, fit the achieved FLOP/s, memory "
                    "bandwidth, per-pass overhead and compute/memory overlap with the cost model's own formulas, "
                    "and show how well it then predicts each point. With --gpu, the rates become efficiencies "
                    "against that catalog type's peaks, which `thunderserve plan --calibration PROFILE.json` "
                    "plans with.",
        epilog="example: thunderserve profile --gpu A40 --json a40.json && thunderserve plan --cluster "
               "deploy/clusters/cloud-32.yaml --model llama-30b --workload code --rate 2 --calibration a40.json",
    )
    ap.add_argument("--model", default=DEFAULT_MODEL,
                    help="model the engine loads (default %(default)s; 'tiny-random' for a quick check)")
    ap.add_argument("--model-spec", metavar="NAME|config.json", dest="model_spec",
                    help="the cost model's view of it (default: built from the loaded model's config)")
    ap.add_argument("--dtype", choices=ENGINE_DTYPES, default="float32", help="weights (default %(default)s)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default %(default)s)")
    ap.add_argument("--device", default="cpu",
                    help="where the engine runs: cpu (default) or cuda[:N], to profile one of this host's GPUs")
    ap.add_argument("--prompts", type=int, nargs="+", default=[32, 128, 512], metavar="N",
                    help="prompt lengths to time a prefill of (default: 32 128 512)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16], metavar="B",
                    help="decode batch sizes to time a step of (default: 1 4 16)")
    ap.add_argument("--contexts", type=int, nargs="+", default=[128, 1024], metavar="C",
                    help="tokens of KV per decoding sequence, each with every batch size (default: 128 1024)")
    ap.add_argument("--repeats", type=int, default=5, help="runs per point; the median counts (default %(default)s)")
    ap.add_argument("--gpu", metavar="TYPE", help="catalog type this machine is (e.g. A40): report efficiencies")
    ap.add_argument("--catalog", metavar="FILE", help="GPU catalog YAML (default: the shipped one)")
    ap.add_argument("--json", metavar="OUT", help="write the profile as JSON to this file ('-' for stdout)")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if min(args.prompts + args.batches + args.contexts) < 1 or args.repeats < 1:
            raise ValueError("prompt lengths, batch sizes, contexts and --repeats must be >= 1")
        gpu = (Catalog.from_yaml(args.catalog) if args.catalog else default_catalog()).get(args.gpu) \
            if args.gpu else None
        from thunderserve.common.engine import create_engine

        print(f"loading {args.model} ({args.dtype}, {args.threads} thread(s), {args.device})...", file=sys.stderr)
        engine = create_engine(args.model, args.dtype, threads=args.threads, device=args.device)
        if not hasattr(engine, "config"):
            raise ValueError(f"{args.model} has no real engine to profile")
        spec = ModelSpec.load(args.model_spec) if args.model_spec else \
            ModelSpec.from_config(engine.config.to_dict(), engine.name)
        spec = profile.spec_for(spec, DTYPE_BYTES[args.dtype], engine.kv_dtype.itemsize)
        if max(args.prompts + args.contexts) >= engine.max_context:
            raise ValueError(f"prompt lengths and contexts must be below the model's {engine.max_context} tokens")
    except INPUT_ERRORS as exc:
        return fail(PROG, str(exc))

    def progress(msg: str) -> None:
        print(f"timing: {msg}", file=sys.stderr, flush=True)

    points = profile.measure(engine, args.prompts, args.batches, args.contexts, args.repeats, progress)
    fit = profile.fit(points, spec)
    errors = profile.errors(points, spec, fit)
    print(f"{'point':<34} {'measured':>10} {'model':>10} {'error':>7}")
    for p, e in zip(points, errors):
        what = f"prefill {p.tokens} tokens" if p.kind == "prefill" else f"decode {p.tokens} seqs x {p.context} tokens"
        print(f"{what:<34} {p.seconds * 1e3:>8.1f}ms {p.seconds * (1 + e) * 1e3:>8.1f}ms {e:>+7.1%}")
    print(f"achieved: {fit.tflops:.4g} TFLOP/s, {fit.mem_gbps:.4g} GB/s, {fit.overhead_s * 1e3:.2f} ms per pass, "
          f"compute/memory overlap {fit.overlap:.2f} (RMS error {fit.rms_rel_error:.1%})")
    out: dict = {"model": spec.name, "dtype": args.dtype, "threads": args.threads,
                 "points": [dataclasses.asdict(p) for p in points], "fit": dataclasses.asdict(fit)}
    if gpu is not None:
        calib = fit.calibration(gpu)
        out["gpu"] = gpu.name
        out["calibration"] = dataclasses.asdict(calib)
        print(f"against {gpu.name} ({gpu.tflops:g} TFLOP/s, {gpu.mem_gbps:g} GB/s): compute_eff "
              f"{calib.compute_eff:.3g}, mem_eff {calib.mem_eff:.3g}, "
              f"stage_overhead {calib.stage_overhead * 1e3:.2f} ms, overlap {calib.overlap:.2f}")
    if args.json:
        text = json.dumps(out, indent=2)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text + "\n")
            print(f"wrote {args.json}", file=sys.stderr)
    return 0
