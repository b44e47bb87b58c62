"""Calibrate the cost model from the engine itself (DESIGN.md §3: "efficiencies calibrate from profiling").

`measure` times the real engine on this machine: prefill forward passes at several prompt lengths
and decode steps at several batch sizes. `fit` finds the device rates that make the cost model's
own formulas (`costmodel.prefill_stage_time`, `costmodel.decode_step_time`: a roofline of FLOPs and
bytes plus a fixed per-pass overhead) match those times best, in relative error. The result is the
achieved FLOP/s and memory bandwidth; against a catalog type's datasheet peaks they become the
`Calibration`'s `compute_eff` and `mem_eff` (and its `stage_overhead`), which `thunderserve plan
--calibration PROFILE.json` plans with. `check` compares the fitted model with other measured points.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from . import costmodel as cm
from .catalog import GPUSpec
from .model import ModelSpec


@dataclass(frozen=True)
class Point:
    """One measured shape: a prefill of `tokens` prompt tokens, or one decode step of `tokens`
    sequences with `context` tokens of KV each; `seconds` is the median of the repeats."""

    kind: str  # "prefill" | "decode"
    tokens: int
    context: int = 0
    seconds: float = 0.0


@dataclass(frozen=True)
class Fit:
    """The device as the cost model sees it, fitted to measured points."""

    tflops: float  # achieved dense TFLOP/s
    mem_gbps: float  # achieved memory bandwidth, GB/s
    overhead_s: float  # fixed cost per forward pass
    rms_rel_error: float  # over the points fitted
    overlap: float = 1.0  # of compute and memory traffic (`Calibration.overlap`)

    def calibration(self, gpu: GPUSpec, base: cm.Calibration = cm.DEFAULT_CALIBRATION) -> cm.Calibration:
        """The efficiencies against `gpu`'s datasheet peaks (what the planner multiplies them by)."""
        return dataclasses.replace(base, compute_eff=self.tflops / gpu.tflops, mem_eff=self.mem_gbps / gpu.mem_gbps,
                                   stage_overhead=self.overhead_s, overlap=self.overlap)

    def device(self, name: str = "measured", mem_gb: float = 0.0, price: float = 0.0) -> GPUSpec:
        """A catalog entry whose peaks are the achieved rates (efficiencies 1 against it)."""
        return GPUSpec(name, self.tflops, mem_gb, self.mem_gbps, price, source="thunderserve profile")


def spec_for(model: ModelSpec, dtype_bytes: int, kv_bytes: int) -> ModelSpec:
    """`model` at the engine's weight and KV element sizes (the engine keeps its decode KV in fp32)."""
    return dataclasses.replace(model, bytes_per_weight=dtype_bytes, kv_bytes=kv_bytes)


def predict(point: Point, model: ModelSpec, gpu: GPUSpec, calib: cm.Calibration) -> float:
    """The cost model's time for `point` on one `gpu` (no tensor or pipeline parallelism)."""
    stage = cm.StageHW(gpu, tp=1, layers=model.layers, intra_gbps=0.0)
    if point.kind == "prefill":
        return cm.prefill_stage_time(model, stage, point.tokens, calib)
    return cm.decode_step_time(model, [stage], point.tokens, point.context, calib)


def _rates_calib(overhead_s: float, overlap: float = 1.0) -> cm.Calibration:
    return dataclasses.replace(cm.DEFAULT_CALIBRATION, compute_eff=1.0, mem_eff=1.0, stage_overhead=overhead_s,
                               overlap=overlap)


def errors(points: Sequence[Point], model: ModelSpec, fit: Fit) -> list[float]:
    """Relative error (predicted / measured - 1) of each point under `fit`."""
    gpu, calib = fit.device(), _rates_calib(fit.overhead_s, fit.overlap)
    return [predict(p, model, gpu, calib) / p.seconds - 1.0 for p in points]


def fit(points: Sequence[Point], model: ModelSpec) -> Fit:
    """Achieved TFLOP/s, GB/s, per-pass overhead and compute/memory overlap minimising the squared
    log error of the cost model's predictions over `points` (at least one prefill and one decode point)."""
    from scipy.optimize import least_squares

    if not any(p.kind == "prefill" for p in points) or not any(p.kind == "decode" for p in points):
        raise ValueError("fitting needs at least one prefill and one decode point")
    if any(p.seconds <= 0 for p in points):
        raise ValueError("every point needs a positive time")
    measured = np.log([p.seconds for p in points])

    def residuals(x: np.ndarray) -> np.ndarray:
        gpu = GPUSpec("fit", math.exp(x[0]), 0.0, math.exp(x[1]), 0.0)
        calib = _rates_calib(math.exp(x[2]), x[3])
        return np.log([predict(p, model, gpu, calib) for p in points]) - measured

    # Start from each bound alone: the longest prompt for compute, the smallest batch for bytes.
    longest = max((p for p in points if p.kind == "prefill"), key=lambda p: p.tokens)
    smallest = min((p for p in points if p.kind == "decode"), key=lambda p: p.tokens)
    unit = GPUSpec("unit", 1.0, 0.0, 1.0, 0.0)  # 1 TFLOP/s, 1 GB/s, no overhead: time = work
    work_flops = predict(longest, model, dataclasses.replace(unit, mem_gbps=1e12), _rates_calib(0.0))
    work_bytes = predict(smallest, model, dataclasses.replace(unit, tflops=1e12), _rates_calib(0.0))
    # Rates within 1e-6..1e6 TFLOP/s and GB/s: a bound the points barely touch (a tiny model moves few
    # bytes) must not drift off to where exp() overflows.
    lo, hi = [math.log(1e-6)] * 2 + [math.log(1e-7), 0.0], [math.log(1e6)] * 2 + [0.0, 1.0]
    start = [math.log(work_flops / longest.seconds), math.log(work_bytes / smallest.seconds), math.log(1e-3)]
    start = [min(max(x, lo[i] + 1e-9), hi[i] - 1e-9) for i, x in enumerate(start)]
    best = None
    for overlap in (1.0, 0.5, 0.0):  # the overlap's error surface can have a local minimum at either end
        result = least_squares(residuals, [*start, overlap], method="trf", bounds=(lo, hi))
        if best is None or result.cost < best.cost:
            best = result
    x = best.x
    found = Fit(math.exp(x[0]), math.exp(x[1]), math.exp(x[2]), 0.0, float(x[3]))
    rel = errors(points, model, found)
    return dataclasses.replace(found, rms_rel_error=math.sqrt(sum(e * e for e in rel) / len(rel)))


def measure(engine, prompt_lengths: Sequence[int], batches: Sequence[int], contexts: Sequence[int],
            repeats: int = 5, progress: Callable[[str], None] = lambda _: None) -> list[Point]:
    """Time `engine` (a `thunderserve.common.engine.Engine`): a prefill of each prompt length, and a
    decode step of each batch size at each context (tokens of KV per sequence); the median of
    `repeats` runs after one warm-up."""
    import torch

    gen = torch.Generator().manual_seed(0)
    vocab = int(engine.config.vocab_size)

    def ids(n: int) -> list[int]:
        return torch.randint(0, vocab, (n,), generator=gen).tolist()

    def median_time(run: Callable[[], object]) -> float:
        run()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            run()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    points = []
    for n in prompt_lengths:
        progress(f"prefill of {n} tokens")
        prompt = ids(n)
        points.append(Point("prefill", n, 0, median_time(lambda prompt=prompt: engine.prefill(prompt))))
    for context in contexts:
        kv = engine.prefill(ids(context)).kv
        for b in batches:
            progress(f"decode step of {b} sequences at {context} tokens")
            batch = engine.new_batch()
            for i in range(b):
                batch.add(f"s{i}", kv, 0)
            points.append(Point("decode", b, context, median_time(batch.step)))
    return points
