"""Workload: arrival rate, prompt/output length distributions, TTFT/TPOT SLOs, target attainment."""

from __future__ import annotations

import csv
import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .tracegen import TRACE_DIR

# Default SLOs per named shape (seconds). Reconstruction: the paper scales SLOs per experiment.
DEFAULT_SLOS = {"code": (3.0, 0.10), "conversation": (1.5, 0.10)}
PROMPT_POINTS = 32  # quantile points that stand for the prompt-length distribution in the cost model


@dataclass
class Workload:
    rate: float = 1.0  # requests/s
    prompt_lens: list[int] = field(default_factory=lambda: [1024])
    output_lens: list[int] = field(default_factory=lambda: [128])
    ttft_slo: float = 2.0  # s
    tpot_slo: float = 0.1  # s per output token
    attainment: float = 0.9  # fraction of requests that must meet both SLOs
    name: str = "custom"

    def __post_init__(self) -> None:
        if isinstance(self.prompt_lens, int):
            self.prompt_lens = [self.prompt_lens]
        if isinstance(self.output_lens, int):
            self.output_lens = [self.output_lens]
        if not self.prompt_lens or not self.output_lens:
            raise ValueError("workload needs at least one prompt and output length")
        if self.rate <= 0:
            raise ValueError("rate must be > 0")
        if self.ttft_slo <= 0 or self.tpot_slo <= 0:
            raise ValueError("SLOs must be > 0")
        if not 0 < self.attainment < 1:
            raise ValueError("attainment must be in (0, 1)")
        p = np.asarray(self.prompt_lens, dtype=float)
        o = np.asarray(self.output_lens, dtype=float)
        self._stats = (float(p.mean()), float(o.mean()), float(np.quantile(p, self.attainment)))
        k = min(PROMPT_POINTS, len(p))
        self._points = tuple(float(x) for x in np.quantile(p, (np.arange(k) + 0.5) / k))
        k = min(PROMPT_POINTS, len(o))
        self._out_points = tuple(float(x) for x in np.quantile(o, (np.arange(k) + 0.5) / k))
        # a decode batch holds a sequence for (o - 1) steps, so the sequences in it at any moment are
        # length-biased: weight each (prompt, output) pair by its decode steps (pairs as the trace has them)
        if len(p) == len(o):
            d = np.maximum(o - 1.0, 0.0)
            if d.sum() > 0:
                self._decode_ctx = (float(((p + o) * d).sum() / d.sum()), float(((p + o / 2) * d).sum() / d.sum()))
            else:
                self._decode_ctx = (float((p + o).mean()), float((p + o / 2).mean()))
        else:  # lengths not paired: independent means
            self._decode_ctx = (self._stats[0] + self._stats[1], self._stats[0] + self._stats[1] / 2)

    # --- statistics the cost model uses -------------------------------------------------------
    @property
    def prompt_mean(self) -> float:
        return self._stats[0]

    @property
    def output_mean(self) -> float:
        return self._stats[1]

    @property
    def prompt_q(self) -> float:
        """Prompt length at the attainment quantile: latency SLOs are checked at this length."""
        return self._stats[2]

    @property
    def prompt_points(self) -> tuple[float, ...]:
        """Prompt lengths at evenly spread quantiles (equal weights): the cost model's sample of the
        distribution for M/G/1 service-time moments and per-length TTFT."""
        return self._points

    @property
    def decode_hold_tokens(self) -> float:
        """KV tokens (prompt + output, reserved at admission) of a sequence found in a decode batch:
        E[(p + o)(o - 1)] / E[o - 1], not E[p + o] - long outputs stay in the batch longer."""
        return self._decode_ctx[0]

    @property
    def decode_read_tokens(self) -> float:
        """Mean context a decode step reads per sequence in the batch: E[(p + o/2)(o - 1)] / E[o - 1]."""
        return self._decode_ctx[1]

    @property
    def output_points(self) -> tuple[float, ...]:
        """Output lengths at evenly spread quantiles (equal weights), for decode slot waits."""
        return self._out_points

    def with_rate(self, rate: float) -> Workload:
        return Workload(rate, self.prompt_lens, self.output_lens, self.ttft_slo, self.tpot_slo,
                        self.attainment, self.name)

    def sample(self, max_pairs: int = 512) -> dict[str, list[int]]:
        """At most `max_pairs` of the lengths, evenly spaced in sorted order (paired lengths stay
        paired): enough to rebuild the cost model's view of this workload (`from_summary`)."""
        def pick(n: int) -> np.ndarray:
            return np.unique(np.linspace(0, n - 1, min(n, max_pairs)).round().astype(int))

        p, o = np.asarray(self.prompt_lens), np.asarray(self.output_lens)
        if len(p) == len(o):
            order = np.lexsort((o, p))
            idx = order[pick(len(p))]
            return {"prompt_lens": p[idx].tolist(), "output_lens": o[idx].tolist()}
        return {"prompt_lens": np.sort(p)[pick(len(p))].tolist(), "output_lens": np.sort(o)[pick(len(o))].tolist()}

    @classmethod
    def from_summary(cls, summary: dict, sample: dict[str, list[int]]) -> Workload:
        """The workload a plan was made for, from its `summary()` and `sample()`."""
        return cls(float(summary["rate"]), list(sample["prompt_lens"]), list(sample["output_lens"]),
                   float(summary["ttft_slo"]), float(summary["tpot_slo"]), float(summary["attainment"]),
                   str(summary.get("name", "custom")))

    def summary(self) -> dict:
        return {"name": self.name, "rate": self.rate, "prompt_mean": round(self.prompt_mean, 1),
                "output_mean": round(self.output_mean, 1), "prompt_q": round(self.prompt_q, 1),
                "ttft_slo": self.ttft_slo, "tpot_slo": self.tpot_slo, "attainment": self.attainment}

    # --- construction ------------------------------------------------------------------------
    @classmethod
    def from_name(cls, name: str, rate: float = 1.0, ttft: float | None = None,
                  tpot: float | None = None, attainment: float = 0.9) -> Workload:
        if name not in DEFAULT_SLOS:
            raise ValueError(f"unknown workload {name!r} (named shapes: {', '.join(DEFAULT_SLOS)})")
        w = cls.from_trace(TRACE_DIR / f"{name}.csv", rate=rate, ttft=ttft, tpot=tpot, attainment=attainment)
        w.name = name
        return w

    @classmethod
    def from_trace(cls, path: str | Path, rate: float | None = None, ttft: float | None = None,
                   tpot: float | None = None, attainment: float = 0.9) -> Workload:
        """Azure LLM inference trace CSV: TIMESTAMP,ContextTokens,GeneratedTokens.

        Without `rate`, the trace's own mean arrival rate is used.
        """
        times, prompts, outputs = read_trace(path)
        if rate is None:
            span = times[-1] - times[0] if len(times) > 1 else 0.0
            rate = (len(times) - 1) / span if span > 0 else 1.0
        shape = "code" if np.mean(prompts) / max(np.mean(outputs), 1) > 20 else "conversation"
        d_ttft, d_tpot = DEFAULT_SLOS[shape]
        return cls(rate, prompts, outputs, ttft or d_ttft, tpot or d_tpot, attainment, Path(path).stem)


def _parse_time(s: str) -> float:
    s = s.strip()
    try:
        return float(s)
    except ValueError:
        pass
    # Azure traces write 7 fractional digits; datetime takes at most 6
    if "." in s:
        head, frac = s.split(".", 1)
        s = f"{head}.{frac[:6]}"
    return dt.datetime.fromisoformat(s).timestamp()


def read_trace(path: str | Path) -> tuple[list[float], list[int], list[int]]:
    times: list[float] = []
    prompts: list[int] = []
    outputs: list[int] = []
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            need = {"TIMESTAMP", "ContextTokens", "GeneratedTokens"}
            if not reader.fieldnames or not need <= set(reader.fieldnames):
                raise ValueError(f"{path}: expected columns TIMESTAMP,ContextTokens,GeneratedTokens")
            for i, row in enumerate(reader):
                try:
                    times.append(_parse_time(row["TIMESTAMP"]))
                    prompts.append(max(1, int(row["ContextTokens"])))
                    outputs.append(max(1, int(row["GeneratedTokens"])))
                except (TypeError, ValueError):
                    raise ValueError(f"{path}: bad row {i + 2}: {row}") from None
    except FileNotFoundError:
        raise ValueError(f"trace file {path} not found") from None
    if not prompts:
        raise ValueError(f"{path}: trace has no rows")
    order = np.argsort(times, kind="stable")
    return [times[i] for i in order], [prompts[i] for i in order], [outputs[i] for i in order]
