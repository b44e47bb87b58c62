"""Analytic capacity of a colocated replica (one replica runs both phases), for both iteration schedulers the
simulator runs (`SimConfig.colocated_policy`):

  stall    vLLM V0: prefill first, each prefill batch stalls the running decode batch (`token_budget=None`);
  chunked  vLLM V1 / Sarathi-Serve: every iteration runs all running decode sequences plus prefill chunks up
           to `token_budget` tokens per micro-batch (`token_budget=B`).

Both are steady-state models on the roofline cost model (reconstructions). The planner uses them for the groups
it designates "colocated", the baselines for their colocated replicas.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from . import costmodel as cm
from .cluster import Cluster
from .model import ModelSpec
from .parallel import PHASES, Layout, best_layout
from .workload import Workload


@dataclass(frozen=True)
class ColocatedPerf:
    capacity: float  # req/s within both SLOs (at the attainment quantile, approximately)
    sequences: int  # cap on the sequences the replica holds (decode batch, plus prompts being chunked)
    latency: float  # prefill latency of the attainment-quantile prompt, s (chunked: its chunk iterations)
    service: float  # s of prefill work per mean prompt (chunked: at the prefill rate of a full-budget iteration)
    tpot: float  # predicted TPOT at capacity, s


ZERO = ColocatedPerf(0.0, 0, 0.0, 0.0, 0.0)
# check(rate) -> (meets both SLOs and memory, TPOT, latency, service) at that rate
_Check = Callable[[float], tuple[bool, float, float, float]]


def colocated_perf(model: ModelSpec, hws: list[cm.StageHW], w: Workload,
                   calib: cm.Calibration = cm.DEFAULT_CALIBRATION, token_budget: int | None = None) -> ColocatedPerf:
    """Capacity of a replica that runs both phases: the largest rate meeting both SLOs and memory, by
    bisection over the rate. `token_budget=None`: prefill-first (stall) scheduling; else chunked prefill
    with that many tokens per iteration and micro-batch (`_chunked_model`)."""
    if token_budget is not None and token_budget < 1:
        raise ValueError("token_budget must be >= 1")
    model_fn = _stall_model if token_budget is None else _chunked_model
    found = model_fn(model, hws, w, calib, token_budget or 0)
    if found is None:
        return ZERO
    check, sequences, hi = found
    if not check(1e-9)[0]:
        return ZERO
    lo = 0.0
    for _ in range(40):
        mid = (lo + hi) / 2
        if check(mid)[0]:
            lo = mid
        else:
            hi = mid
    _, tpot, latency, service = check(lo)
    return ColocatedPerf(lo, sequences, latency, service, tpot)


def _stall_model(model: ModelSpec, hws: list[cm.StageHW], w: Workload, calib: cm.Calibration,
                 _budget: int) -> tuple[_Check, int, float] | None:
    """Prefill first (vLLM V0). At rate lam the replica spends u = lam*S on prefill; decode steps fill the
    rest, so a sequence's TPOT is T(B)/(1-u), and Little's law gives the batch B = lam*(o-1)*TPOT (fixed
    point). TTFT is the prefill latency + an M/D/1 wait at utilisation u (quantile ~ f * mean, as the
    planner's prefill model) + one decode step in progress. The batch cap: the decode step meets the TPOT
    SLO and the KV fits."""
    if not cm.prefill_fits(model, hws, w.prompt_q, calib):
        return None
    dec = cm.decode_perf(model, hws, w.prompt_mean, w.output_mean, w.tpot_slo, calib,
                         ctx_mem=w.decode_hold_tokens, ctx_read=w.decode_read_tokens)
    if dec.sequences <= 0:
        return None
    pp = len(hws)
    svc = cm.prefill_service_time(model, hws, w.prompt_mean, calib)
    lat = cm.prefill_latency(model, hws, w.prompt_q, calib)
    ctx = w.decode_read_tokens
    f = cm.queue_wait_factor(w.attainment)
    decode_tokens = max(w.output_mean - 1, 0.0)

    def check(lam: float) -> tuple[bool, float, float, float]:
        u = lam * svc
        if u >= 1:
            return False, math.inf, lat, svc
        b, tpot = 1.0, 0.0
        for _ in range(60):
            tpot = cm.decode_step_time(model, hws, max(1.0, b / pp), ctx, calib) / (1 - u)
            nb = max(1.0, lam * decode_tokens * tpot)
            if nb > dec.sequences:
                return False, tpot, lat, svc
            if abs(nb - b) < 1e-3:
                break
            b = nb
        step = tpot * (1 - u)
        ttft = lat + f * u * svc / (2 * (1 - u)) + step
        return tpot <= w.tpot_slo and ttft <= w.ttft_slo, tpot, lat, svc

    return check, dec.sequences, 1.0 / svc


def _chunked_model(model: ModelSpec, hws: list[cm.StageHW], w: Workload, calib: cm.Calibration,
                   budget: int) -> tuple[_Check, int, float] | None:
    """Chunked prefill (vLLM V1), in steady state at rate lam with b decode sequences running.

    An iteration is either decode-only (time Td(b)) or, while prompts wait, full: b decode tokens plus
    B*pp - b chunk tokens (time Tf(b)), `costmodel.chunked_iteration_time` for both, the simulator's cost. A
    prompt gets at most one chunk of share = min(B, B*pp - b) tokens per iteration. Prefill runs at R = (B*pp
    - b)/Tf tokens/s while busy, so it is busy a fraction rho = lam*E[p]/R of the time and the mean iteration
    (= TPOT: every running sequence gains a token per iteration) is T = 1/((1-rho)/Td + rho/Tf); Little's law
    gives b = lam*(o-1)*T (fixed point). TPOT: T and Tf within the SLO - short outputs can spend all their
    tokens in full iterations - and b within the cap (the largest batch whose full iteration meets the SLO, and
    the KV memory). TTFT: prompt p takes ceil(p/share) full iterations plus half of one in progress, after an
    M/G/1 wait for the prefill server (service p/R); the miss rate over the prompt points must stay within
    the TTFT share of the miss budget, as the planner's prefill replicas."""
    pp = len(hws)
    total = budget * pp
    if not cm.prefill_fits(model, hws, min(float(budget), w.prompt_q), calib):
        return None
    mem = cm.decode_max_sequences(model, hws, w.decode_hold_tokens, calib)
    if mem < 1 or w.prompt_q + w.output_mean > cm.decode_max_sequences(model, hws, 1.0, calib):
        return None
    ctx = w.decode_read_tokens
    pts = np.asarray(w.prompt_points, dtype=float)
    p1, p2 = float(pts.mean()), float((pts * pts).mean())
    attn_per_token = p2 / (2 * p1)  # a prompt of p tokens scores p^2/2 pairs, whatever its chunking
    decode_tokens = max(w.output_mean - 1, 0.0)
    miss_budget = 1.0 - cm.split_attainment(w.attainment, calib.ttft_miss_share)
    tpot_miss_budget = 1.0 - cm.split_attainment(w.attainment, 1.0 - calib.ttft_miss_share)
    steps = np.maximum(np.asarray(w.output_points, dtype=float) - 1.0, 1.0)  # decode iterations per request

    def iteration(b: float, chunk: float) -> tuple[float, np.ndarray]:
        """(time of an iteration of b decode sequences and `chunk` prefill tokens, chunks per prompt point)."""
        share = min(float(budget), total - b)  # the most one prompt gets per iteration
        n = np.ceil(pts / share)
        kv_per_token = float((share * n * (n - 1) / 2 + pts).mean()) / p1  # chunk k reads its k*share prefix
        t = cm.chunked_iteration_time(model, hws, b, ctx, chunk, chunk * attn_per_token, chunk * kv_per_token,
                                      chunk * float(n.mean()) / p1, calib)
        return t, n

    def decode_only(b: float) -> float:
        return cm.chunked_iteration_time(model, hws, b, ctx, calib=calib)

    # the batch cap: the largest b whose decode-only iteration meets the TPOT SLO, within KV memory
    lo, hi = 0, min(mem, total - 1)
    if hi < 1 or decode_only(1.0) > w.tpot_slo:
        return None
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if decode_only(float(mid)) <= w.tpot_slo:
            lo = mid
        else:
            hi = mid - 1
    cap = lo
    k_q = math.ceil(float(np.quantile(pts, w.attainment)) / min(float(budget), total - 1.0))

    def check(lam: float) -> tuple[bool, float, float, float]:
        b = 0.0
        for _ in range(60):
            c = total - b  # chunk tokens of a full iteration
            tf, n = iteration(b, c)
            rate = c / tf
            rho = lam * p1 / rate
            if rho >= 1:
                return False, math.inf, math.inf, p1 / rate
            t = 1.0 / ((1 - rho) / decode_only(max(b, 1.0)) + rho / tf)  # a sequence's own step at least
            nb = lam * decode_tokens * t
            if nb > cap:
                return False, t, k_q * tf, p1 / rate
            if abs(nb - b) < 1e-3:
                break
            b = nb
        # a prompt's chunk rides with the decode batch and, as often as prefill is busy, other prompts' chunks
        share = min(float(budget), c)
        own = iteration(b, share + rho * (c - share))[0]
        budgets = [w.ttft_slo - k * own - 0.5 * t for k in n]  # + half an iteration in progress on arrival
        s1 = p1 / rate
        td = decode_only(max(b, 1.0))
        ok = (t <= w.tpot_slo and _tpot_miss(td, tf, rho, steps / float(n.mean()), w.tpot_slo) <= tpot_miss_budget
              and cm.prefill_miss(rho, budgets, s1, p2 / rate**2) <= miss_budget)
        return ok, t, k_q * own, s1

    return check, cap, total / (iteration(0.0, total)[0] * p1)


def _tpot_miss(td: float, tf: float, rho: float, draws: np.ndarray, slo: float) -> float:
    """Share of requests whose TPOT (the mean of their iterations) misses the SLO when a fraction u of the
    iterations are full (time tf) and the rest decode-only (td). Full iterations come in runs (a prompt's
    chunks), so a request of k iterations makes ~k / (chunks per prompt) independent draws (`draws`); its full
    share is then ~Binomial(draws, u) / draws (normal approximation): short outputs carry the tail."""
    if tf <= slo:
        return 0.0
    if td > slo:
        return 1.0
    u = (rho / tf) / (rho / tf + (1 - rho) / td)
    x = (slo - td) / (tf - td)  # the largest fraction of full iterations that still meets the SLO
    sd = np.sqrt(max(u * (1 - u), 1e-12) / np.maximum(draws, 1.0))
    return float((0.5 * np.vectorize(math.erfc)((x - u) / (sd * math.sqrt(2)))).mean())


def best_colocated_layout(cluster: Cluster, model: ModelSpec, w: Workload, gpus: Sequence[str],
                          calib: cm.Calibration = cm.DEFAULT_CALIBRATION, max_pp: int = 4,
                          token_budget: int | None = None, cache: dict | None = None
                          ) -> tuple[Layout, ColocatedPerf] | None:
    """The planner's best prefill and best decode layouts of a group, whichever serves more colocated.
    `cache`: `parallel.best_layout`'s layer-fit cache (the planner shares its own)."""
    best: tuple[Layout, ColocatedPerf] | None = None
    for phase in PHASES:
        g = best_layout(cluster, model, w, list(gpus), phase, calib, max_pp, cache=cache)
        if g is None:
            continue
        perf = colocated_perf(model, g.layout.hw(cluster), w, calib, token_budget)
        if perf.capacity > 0 and (best is None or perf.capacity > best[1].capacity):
            best = (g.layout, perf)
    return best
