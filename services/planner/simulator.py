"""Discrete-event simulator of a Plan under a request stream (DESIGN.md §3, "Simulator").

What it models, per replica phase:
  * prefill replicas: one FIFO queue; a batch (up to `prefill_batch_tokens` prompt tokens) occupies the
    replica for its steady-state service time (the slowest pipeline stage or hand-off, since batches are
    pipelined) and finishes after its latency (all stages + hand-offs) - the cost model's S and L;
  * KV transfer: layer l's KV goes from the node holding l on the prefill replica to the node holding it
    on the decode replica, compressed by the plan's codec; every node pair's link is a FIFO server, and
    so is each node's NIC, out and in: a transfer is done once the link and both NICs have each sent it
    at their own rate, so transfers queue behind each other (the LP only bounds their mean bandwidth), and
    four peers sending to one node at once share its NIC; a compressed KV goes in
    runs during the prefill's forward pass, as the replicas send it (`costmodel.streamed_transfer_after`);
  * decode replicas: continuous batching; a sequence joins at a step boundary when the batch is below
    its cap (the plan's `max_sequences`) and its KV (prompt + output tokens) fits the free KV memory;
    one step costs `decode_step_time` at the batch's current mean context;
  * colocated replicas (vLLM-style): one queue and iteration scheduling, by `SimConfig.colocated_policy`:
    "stall" (vLLM V0 without chunked prefill): prefill first - a prefill batch stalls the running decode
    batch, otherwise the batch takes a decode step; "chunked" (vLLM V1's default, Sarathi-Serve): every
    iteration runs all running decode sequences plus prefill chunks filling a token budget
    (`token_budget`, vLLM's max_num_batched_tokens), so a long prompt never stalls decode for long. An
    iteration costs `iteration_time`: the cost model's forward pass for its decode and chunk tokens.

TTFT ends when the first token reaches the client: when prefill finishes - a disaggregated prefill
replica streams it before the KV moves, as services/prefill/role.py does - or, on the routes the plan
lists in `first_token_from_decode`, once the KV has landed on the decode replica. TPOT = (finish
- first token) / (output - 1), so an early first token puts the KV transfer (with its link queueing) in
TPOT, and waiting for a decode slot always shows up there; a request that its first token ends moves
no KV. A request meets its SLOs when TTFT <= ttft_slo and
TPOT <= tpot_slo. The router splits requests at random by the plan's dispatch and routing weights
(colocated replicas by predicted capacity): a Poisson stream stays Poisson per replica, which is what
the planner assumes. Every time comes from costmodel.py, so plan and simulation agree where the
planner's steady-state model holds and differ where queueing, burstiness or batching matter.
Deterministic for a seed.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from thunderserve.common.plan import Plan, Replica

from . import costmodel as cm
from .cluster import Cluster
from .model import ModelSpec
from .parallel import Layout, StageSpec

Progress = Callable[[float], None]  # fraction of requests finished


# --- requests -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Request:
    id: int
    arrival: float  # s
    prompt: int  # tokens
    output: int  # tokens (the first one comes from prefill)


def poisson_requests(rate: float, prompts: Sequence[int], outputs: Sequence[int], n: int | None = None,
                     duration: float | None = None, seed: int = 0) -> list[Request]:
    """Poisson arrivals at `rate`, (prompt, output) pairs drawn jointly from the given lengths.

    The same seed gives the same unit-rate gaps and lengths at every rate (common random numbers),
    so attainment changes smoothly with the rate during the goodput search.
    """
    if rate <= 0:
        raise ValueError("rate must be > 0")
    if (n is None) == (duration is None):
        raise ValueError("give exactly one of n and duration")
    if len(prompts) != len(outputs) or not prompts:
        raise ValueError("prompts and outputs must be non-empty and of equal length")
    count = n if n is not None else int(rate * duration * 1.3 + 10 * math.sqrt(rate * duration) + 20)
    rng = np.random.default_rng(seed)
    times = np.cumsum(rng.exponential(1.0, size=count)) / rate
    pick = rng.integers(0, len(prompts), size=count)
    reqs = [Request(i, float(t), int(prompts[k]), int(outputs[k])) for i, (t, k) in enumerate(zip(times, pick))]
    if duration is not None:
        reqs = [r for r in reqs if r.arrival < duration]
    return reqs


def trace_requests(times: Sequence[float], prompts: Sequence[int], outputs: Sequence[int],
                   rate: float | None = None, duration: float | None = None) -> list[Request]:
    """Requests at a trace's own arrival times (from 0), time-scaled to `rate` if given (keeps bursts)."""
    t = np.asarray(times, dtype=float) - float(times[0])
    if rate is not None and len(t) > 1 and t[-1] > 0:
        t = t * ((len(t) - 1) / t[-1]) / rate
    reqs = [Request(i, float(a), int(p), int(o)) for i, (a, p, o) in enumerate(zip(t, prompts, outputs))]
    if duration is not None:
        reqs = [r for r in reqs if r.arrival < duration]
    return reqs


# --- results ------------------------------------------------------------------------------------------
@dataclass
class RequestResult:
    id: int
    arrival: float
    prompt: int
    output: int
    first_token: float = math.inf  # absolute time the first token reached the client
    finish: float = math.inf  # absolute time the last token did
    prefill: str = ""
    decode: str = ""
    kv_ready: float = math.nan  # disaggregated: absolute time the KV landed on the decode replica

    @property
    def ttft(self) -> float:
        return self.first_token - self.arrival

    @property
    def tpot(self) -> float:
        if not math.isfinite(self.finish):
            return math.inf
        return (self.finish - self.first_token) / (self.output - 1) if self.output > 1 else 0.0

    @property
    def e2e(self) -> float:
        return self.finish - self.arrival

    def slo_scale(self, ttft_slo: float, tpot_slo: float) -> float:
        """Smallest factor on both SLOs this request would meet."""
        return max(self.ttft / ttft_slo, self.tpot / tpot_slo)


@dataclass(frozen=True)
class SLO:
    ttft: float
    tpot: float
    attainment: float = 0.9

    def scaled(self, s: float) -> SLO:
        return SLO(self.ttft * s, self.tpot * s, self.attainment)


@dataclass
class SimResult:
    requests: list[RequestResult]
    slo: SLO
    rate: float
    sim_time: float  # s of simulated time until the last request finished (or the horizon)
    events: int = 0

    def _arr(self, name: str) -> np.ndarray:
        return np.array([getattr(r, name) for r in self.requests], dtype=float)

    def met(self, scale: float = 1.0) -> np.ndarray:
        s = self.slo.scaled(scale)
        return (self._arr("ttft") <= s.ttft) & (self._arr("tpot") <= s.tpot)

    def attainment(self, scale: float = 1.0) -> float:
        return float(self.met(scale).mean()) if self.requests else 0.0

    def min_slo_scale(self, attainment: float | None = None) -> float:
        """Smallest factor on both SLOs at which `attainment` of the requests meet them (inf if never)."""
        q = self.slo.attainment if attainment is None else attainment
        need = np.sort([r.slo_scale(self.slo.ttft, self.slo.tpot) for r in self.requests])
        if not len(need):
            return math.inf
        return float(need[max(0, math.ceil(q * len(need) - 1e-9) - 1)])  # the ceil(q n)-th smallest

    def percentile(self, name: str, q: float) -> float:
        vals = self._arr(name)
        method = "linear" if np.isfinite(vals).all() else "higher"  # no inf - inf interpolation
        return float(np.percentile(vals, q, method=method))

    @property
    def span(self) -> float:
        """Arrival window (s): the denominators of the throughput figures."""
        if len(self.requests) < 2:
            return 1.0
        return max(1e-9, self.requests[-1].arrival - self.requests[0].arrival) * len(self.requests) / (
            len(self.requests) - 1)

    def tokens_per_s(self) -> float:
        """Output tokens/s of the requests that met their SLOs, over the arrival window."""
        met = self.met()
        return float(sum(r.output for r, m in zip(self.requests, met) if m)) / self.span

    def summary(self) -> dict:
        def pct(name: str) -> dict:
            out = {}
            for q in (50, 90, 99):
                v = self.percentile(name, q) if self.requests else math.inf
                out[f"p{q}"] = round(v, 4) if math.isfinite(v) else None  # None: unfinished requests
            return out
        return {"rate": self.rate, "requests": len(self.requests),
                "finished": int(sum(math.isfinite(r.finish) for r in self.requests)),
                "attainment": round(self.attainment(), 4),
                "slo": {"ttft": self.slo.ttft, "tpot": self.slo.tpot, "target": self.slo.attainment},
                "ttft_s": pct("ttft"), "tpot_s": pct("tpot"), "e2e_s": pct("e2e"),
                "slo_tokens_per_s": round(self.tokens_per_s(), 2),
                "min_slo_scale": round(self.min_slo_scale(), 4),
                "sim_time_s": round(self.sim_time, 3), "events": self.events}


@dataclass(frozen=True)
class SimConfig:
    prefill_batch_tokens: int = 1024  # prompt tokens per prefill batch (one prompt always goes): long
    # prompts saturate compute alone, so batching them would only delay the first ones
    max_prefill_batch: int = 32  # prompts per prefill batch
    decode_cap: str = "plan"  # "plan": the replica's max_sequences (if set) caps the batch; "memory": KV only
    horizon: float = 1e6  # s: stop simulating here (unfinished requests miss their SLOs)
    colocated_policy: str = "stall"  # colocated replicas: "stall" (vLLM V0: each prefill batch runs alone and
    # stalls decode) or "chunked" (vLLM V1: decode tokens + prefill chunks within `token_budget` per iteration)
    token_budget: int = 2048  # "chunked": tokens per iteration and micro-batch (vLLM's max_num_batched_tokens,
    # default 2048); decode tokens count 1 each, a prompt is prefilled in chunks of at most this many tokens

    def __post_init__(self) -> None:
        if self.colocated_policy not in COLOCATED_POLICIES:
            raise ValueError(f"colocated_policy must be one of {', '.join(COLOCATED_POLICIES)}, "
                             f"not {self.colocated_policy!r}")
        if self.token_budget < 1:
            raise ValueError("token_budget must be >= 1")


COLOCATED_POLICIES = ("stall", "chunked")


# --- batch costs (the cost model's formulas for several prompts at once) -------------------------------
def prefill_batch_stage_time(model: ModelSpec, st: cm.StageHW, prompts: Sequence[int],
                             calib: cm.Calibration = cm.DEFAULT_CALIBRATION) -> float:
    """`costmodel.prefill_stage_time` for a batch: attention is per prompt (sum of squares), the rest
    scales with the batch's tokens; one prompt gives exactly the cost model's value."""
    tokens = float(sum(prompts))
    return cm.stage_pass_time(model, st, tokens, float(sum(p * p for p in prompts)) / 2, tokens, len(prompts),
                              calib)


def iteration_time(model: ModelSpec, stages: Sequence[cm.StageHW], decode: int, context: float,
                   chunks: Sequence[tuple[int, int]], calib: cm.Calibration = cm.DEFAULT_CALIBRATION) -> float:
    """One chunked-prefill iteration (every running sequence advances one token): `decode` sequences at mean
    `context` plus prefill chunks (prompt tokens already done, chunk length), each chunk attending causally
    to itself and its prefix (whose KV it reads). The work is spread evenly over min(pp, items) micro-batches
    (a request sits in one micro-batch, as `decode_step_time`'s max(1, b / pp)) and costed by
    `costmodel.chunked_iteration_time`, which the planner's colocated capacity model uses too: decode only
    with b >= pp, it is `decode_step_time`; one chunk of a fresh prompt alone, `prefill_latency`."""
    return cm.chunked_iteration_time(model, list(stages), decode, context, float(sum(c for _, c in chunks)),
                                     float(sum(c * done + c * c / 2 for done, c in chunks)),
                                     float(sum(done + c for done, c in chunks)), len(chunks), calib)


def prefill_batch_times(model: ModelSpec, stages: Sequence[cm.StageHW], prompts: Sequence[int],
                        calib: cm.Calibration = cm.DEFAULT_CALIBRATION) -> tuple[float, float]:
    """(service, latency) of a prefill batch: the slowest stage/hand-off, and the whole pipeline."""
    tokens = float(sum(prompts))
    service = latency = 0.0
    for st in stages:
        t = prefill_batch_stage_time(model, st, prompts, calib)
        service, latency = max(service, t), latency + t
        if not st.last:
            h = cm.handoff_time(model, tokens, st.next_gbps, calib)
            service, latency = max(service, h), latency + h
    return service, latency


def kv_token_capacity(model: ModelSpec, stages: Sequence[cm.StageHW],
                      calib: cm.Calibration = cm.DEFAULT_CALIBRATION) -> int:
    """KV tokens a replica can hold (the tightest stage), as `decode_max_sequences` counts memory."""
    return cm.decode_max_sequences(model, list(stages), 1.0, calib)


def replica_hw(cluster: Cluster, replica: Replica) -> list[cm.StageHW]:
    """The cost model's view of a plan replica's pipeline."""
    if not replica.stages:
        raise ValueError(f"replica {replica.id}: the plan gives no stages")
    stages = tuple(StageSpec(s.node or s.gpus[0].split(":", 1)[0], tuple(s.gpus), s.tp, s.layer_start,
                             s.layer_end) for s in replica.stages)
    for s in stages:
        try:
            cluster.node(s.node)
        except KeyError:
            raise ValueError(f"replica {replica.id}: node {s.node!r} is not in cluster {cluster.name!r}") from None
    return Layout(stages).hw(cluster)


# --- the simulation -----------------------------------------------------------------------------------
class _Engine:
    """Event heap + bookkeeping shared by the servers."""

    def __init__(self) -> None:
        self.now = 0.0
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = 0
        self.events = 0

    def at(self, t: float, fn: Callable[[], None]) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (t, self._seq, fn))

    def run(self, horizon: float) -> None:
        while self._heap:
            if self._heap[0][0] > horizon:  # leave it for a later call (progress slices)
                self.now = horizon
                return
            t, _, fn = heapq.heappop(self._heap)
            self.now = t
            self.events += 1
            fn()


class _DecodeBatch:
    """Continuous decode batch of one replica: KV-memory admission, one step at a time."""

    def __init__(self, model: ModelSpec, hw: list[cm.StageHW], cap: float, kv_tokens: int, calib: cm.Calibration):
        self.model, self.hw, self.calib = model, hw, calib
        self.pp = len(hw)
        self.cap = cap
        self.kv_tokens = kv_tokens
        self.reserved = 0
        self.waiting: deque[RequestResult] = deque()
        self.running: dict[int, tuple[RequestResult, int]] = {}  # id -> (request, step it joined)
        self._ends: list[tuple[int, int]] = []  # (step at which it finishes, id)
        self.steps = 0
        self._prompt_sum = 0
        self._joined_sum = 0

    def need(self, r: RequestResult) -> int:
        return r.prompt + r.output

    def can_admit(self, r: RequestResult, extra: int = 0, extra_tokens: int = 0) -> bool:
        """Room for `r` beside the running batch and `extra` sequences holding `extra_tokens` KV tokens."""
        return (len(self.running) + extra < self.cap
                and self.reserved + extra_tokens + self.need(r) <= self.kv_tokens)

    def admit(self, r: RequestResult) -> None:
        self.reserved += self.need(r)
        self.running[r.id] = (r, self.steps)
        self._prompt_sum += r.prompt
        self._joined_sum += self.steps
        heapq.heappush(self._ends, (self.steps + r.output - 1, r.id))

    def admit_waiting(self) -> None:
        while self.waiting and self.can_admit(self.waiting[0]):
            self.admit(self.waiting.popleft())

    def context(self) -> float:
        """Mean context of the running sequences: prompt + first token + tokens decoded so far."""
        b = len(self.running)
        return (self._prompt_sum + b * (self.steps + 1) - self._joined_sum) / b

    def step_time(self) -> float:
        b = len(self.running)
        return cm.decode_step_time(self.model, self.hw, max(1.0, b / self.pp), self.context(), self.calib)

    def finish_step(self, now: float) -> None:
        self.steps += 1
        while self._ends and self._ends[0][0] <= self.steps:
            _, rid = heapq.heappop(self._ends)
            r, joined = self.running.pop(rid)
            r.finish = now
            self.reserved -= self.need(r)
            self._prompt_sum -= r.prompt
            self._joined_sum -= joined


class _DecodeServer:
    def __init__(self, eng: _Engine, batch: _DecodeBatch):
        self.eng, self.batch = eng, batch
        self.busy = False

    def arrive(self, r: RequestResult) -> None:
        self.batch.waiting.append(r)
        if not self.busy:
            self._next()

    def _next(self) -> None:
        self.batch.admit_waiting()
        if not self.batch.running:
            self.busy = False
            return
        self.busy = True
        self.eng.at(self.eng.now + self.batch.step_time(), self._step_done)

    def _step_done(self) -> None:
        self.batch.finish_step(self.eng.now)
        self._next()


class _PrefillServer:
    """FIFO prefill queue; `done(batch, latency)` receives each batch when its last stage finishes."""

    def __init__(self, eng: _Engine, model: ModelSpec, hw: list[cm.StageHW], cfg: SimConfig, calib: cm.Calibration,
                 done: Callable[[list[RequestResult], float], None]):
        self.eng, self.model, self.hw, self.cfg, self.calib, self.done = eng, model, hw, cfg, calib, done
        self.queue: deque[RequestResult] = deque()
        self.busy = False

    def arrive(self, r: RequestResult) -> None:
        self.queue.append(r)
        if not self.busy:
            self._start()

    def _take(self) -> list[RequestResult]:
        batch = [self.queue.popleft()]
        tokens = batch[0].prompt
        while (self.queue and len(batch) < self.cfg.max_prefill_batch
               and tokens + self.queue[0].prompt <= self.cfg.prefill_batch_tokens):
            tokens += self.queue[0].prompt
            batch.append(self.queue.popleft())
        return batch

    def _start(self) -> None:
        if not self.queue:
            self.busy = False
            return
        self.busy = True
        batch = self._take()
        service, latency = prefill_batch_times(self.model, self.hw, [r.prompt for r in batch], self.calib)
        now = self.eng.now
        self.eng.at(now + latency, lambda: self.done(batch, latency))
        self.eng.at(now + service, self._start)


class _ColocatedServer:
    """vLLM-style replica: prefill batches first (stalling decode), decode steps otherwise."""

    def __init__(self, eng: _Engine, model: ModelSpec, hw: list[cm.StageHW], batch: _DecodeBatch, cfg: SimConfig,
                 calib: cm.Calibration):
        self.eng, self.model, self.hw, self.batch, self.cfg, self.calib = eng, model, hw, batch, cfg, calib
        self.queue: deque[RequestResult] = deque()
        self.busy = False

    def arrive(self, r: RequestResult) -> None:
        self.queue.append(r)
        if not self.busy:
            self._next()

    def _take(self) -> list[RequestResult]:
        batch: list[RequestResult] = []
        tokens = 0
        reserved = 0
        while self.queue and len(batch) < self.cfg.max_prefill_batch:
            r = self.queue[0]
            if not self.batch.can_admit(r, len(batch), reserved) or (
                    batch and tokens + r.prompt > self.cfg.prefill_batch_tokens):
                break
            batch.append(self.queue.popleft())
            tokens += r.prompt
            reserved += self.batch.need(r)
        return batch

    def _next(self) -> None:
        batch = self._take()
        now = self.eng.now
        if batch:
            self.busy = True
            service, latency = prefill_batch_times(self.model, self.hw, [r.prompt for r in batch], self.calib)
            for r in batch:
                r.first_token = now + latency
                if r.output > 1:
                    self.batch.admit(r)  # KV stays here; the sequence decodes from the next iteration
                else:
                    r.finish = r.first_token
            self.eng.at(now + service, self._prefill_done)
            return
        if not self.batch.running:
            self.busy = False
            return
        self.busy = True
        self.eng.at(now + self.batch.step_time(), self._step_done)

    def _prefill_done(self) -> None:
        self._next()

    def _step_done(self) -> None:
        self.batch.finish_step(self.eng.now)
        self._next()


class _ChunkedColocatedServer:
    """vLLM V1-style replica (chunked prefill): each iteration runs every running decode sequence (one token
    each) and then prefill chunks, FIFO - prompts already part-way first, then new ones while the decode
    cap and KV memory admit them (their KV is reserved on admission, as `_DecodeBatch` does) - until the
    iteration's `token_budget` per micro-batch is used; a prompt gets at most one chunk of at most
    `token_budget` tokens per iteration. Its first token leaves at the end of the iteration that ran its
    last chunk; it decodes from the next iteration."""

    def __init__(self, eng: _Engine, model: ModelSpec, hw: list[cm.StageHW], batch: _DecodeBatch, cfg: SimConfig,
                 calib: cm.Calibration):
        self.eng, self.model, self.hw, self.batch, self.cfg, self.calib = eng, model, hw, batch, cfg, calib
        self.queue: deque[RequestResult] = deque()
        self.prefilling: list[list] = []  # [request, prompt tokens done], admitted, FIFO
        self.prefill_reserved = 0  # KV tokens reserved by the requests in `prefilling`
        self.busy = False

    def arrive(self, r: RequestResult) -> None:
        self.queue.append(r)
        if not self.busy:
            self._next()

    def _schedule(self) -> list[tuple[list, int]]:
        """The prefill chunks of the next iteration: (item of `prefilling`, chunk tokens)."""
        per = self.cfg.token_budget
        left = per * self.batch.pp - len(self.batch.running)  # decode tokens are never skipped
        chunks: list[tuple[list, int]] = []
        for item in self.prefilling:
            if left <= 0:
                return chunks
            c = min(item[0].prompt - item[1], per, left)
            chunks.append((item, c))
            left -= c
        while left > 0 and self.queue and self.batch.can_admit(self.queue[0], len(self.prefilling),
                                                                self.prefill_reserved):
            r = self.queue.popleft()
            item = [r, 0]
            self.prefilling.append(item)
            self.prefill_reserved += self.batch.need(r)
            c = min(r.prompt, per, left)
            chunks.append((item, c))
            left -= c
        return chunks

    def _next(self) -> None:
        chunks = self._schedule()
        b = len(self.batch.running)
        if not b and not chunks:
            self.busy = False
            return
        self.busy = True
        t = iteration_time(self.model, self.hw, b, self.batch.context() if b else 0.0,
                           [(item[1], c) for item, c in chunks], self.calib)
        self.eng.at(self.eng.now + t, lambda: self._iteration_done(b > 0, chunks))

    def _iteration_done(self, decoded: bool, chunks: list[tuple[list, int]]) -> None:
        now = self.eng.now
        if decoded:
            self.batch.finish_step(now)
        for item, c in chunks:
            item[1] += c
            r = item[0]
            if item[1] >= r.prompt:
                self.prefilling.remove(item)
                self.prefill_reserved -= self.batch.need(r)
                r.first_token = now
                if r.output > 1:
                    self.batch.admit(r)
                else:
                    r.finish = now
        self._next()


@dataclass
class _Route:
    # (from node, to node)'s links and NICs (`Cluster.transfer_resources`) -> its runs (`costmodel.run_layers`)
    pieces: list[tuple[list[tuple[tuple[str, ...], float]], list[tuple[float, int]]]]


class Simulator:
    """Simulates one plan on one cluster and model; `run(requests)` can be called many times."""

    def __init__(self, plan: Plan, cluster: Cluster, model: ModelSpec, slo: SLO,
                 calib: cm.Calibration = cm.DEFAULT_CALIBRATION, config: SimConfig = SimConfig()):
        if model.layers != plan.model_layers and plan.model_layers:
            raise ValueError(f"plan is for a {plan.model_layers}-layer model, {model.name} has {model.layers}")
        self.plan, self.cluster, self.model, self.slo, self.calib, self.cfg = plan, cluster, model, slo, calib, config
        self.hw = {r.id: replica_hw(cluster, r) for r in plan.replicas}
        self.kv_tokens = {r.id: kv_token_capacity(model, self.hw[r.id], calib) for r in plan.replicas}
        self.codec = plan.kv_codec if plan.kv_codec in cm.CODEC_RATIO else "none"
        self._entry = self._entry_weights()
        self._routes = {p: {d: self._route(plan.replica(p), plan.replica(d)) for d in row}
                        for p, row in plan.routing.items()}
        self._first_from_decode = {tuple(k.split("->", 1)) for k in plan.first_token_from_decode}

    # --- static structure ---------------------------------------------------------------------------
    def _entry_weights(self) -> dict[str, float]:
        """Where new requests go: by the dispatch weights when they name colocated replicas too (the
        planner's plans); else prefill replicas by dispatch, colocated ones by predicted capacity."""
        w: dict[str, float] = {}
        pre = self.plan.prefill_ids
        colo = [r for r in self.plan.replicas if r.phase == "colocated"]
        mixed = any(r.id in self.plan.dispatch for r in colo)
        if pre or mixed:
            if not self.plan.dispatch:
                raise ValueError("plan has prefill replicas but no dispatch weights")
            w.update({p: v for p, v in self.plan.dispatch.items() if v > 0})
            for p in w:
                if p in pre and not self.plan.routing.get(p):
                    raise ValueError(f"plan routes nothing from prefill replica {p}")
        if colo and not mixed:
            weights = self.plan.meta.get("colocated_dispatch") or {r.id: max(r.capacity, 0.0) for r in colo}
            tot = sum(weights.values())
            share = 1.0 if not w else float(self.plan.meta.get("colocated_share", 0.5))
            for r in colo:
                wi = weights.get(r.id, 0.0) / tot if tot > 0 else 1.0 / len(colo)
                if wi > 0:
                    w[r.id] = wi * share
            if pre:
                for p in list(w):
                    if p in pre:
                        w[p] *= 1 - share
        if not w:
            raise ValueError("plan has no replica that takes requests")
        tot = sum(w.values())
        return {k: v / tot for k, v in w.items()}

    def _route(self, p: Replica, d: Replica) -> _Route:
        ranges: dict[tuple[str, str], list[tuple[int, int]]] = {}
        for sa in p.stages:
            for sb in d.stages:
                lo, hi = max(sa.layer_start, sb.layer_start), min(sa.layer_end, sb.layer_end)
                if hi > lo:
                    na = sa.node or sa.gpus[0].split(":", 1)[0]
                    nb = sb.node or sb.gpus[0].split(":", 1)[0]
                    ranges.setdefault((na, nb), []).append((lo, hi))
        return _Route([(self.cluster.transfer_resources(*k), cm.run_layers(self.model, spans, self.codec, self.calib))
                       for k, spans in sorted(ranges.items())])

    # --- one run -----------------------------------------------------------------------------------
    def run(self, requests: Sequence[Request], seed: int = 0, progress: Progress | None = None) -> SimResult:
        eng = _Engine()
        rng = np.random.default_rng(seed + 7919)
        results = [RequestResult(q.id, q.arrival, q.prompt, q.output) for q in requests]
        busy_until: dict[tuple[str, ...], float] = {}  # link or NIC -> when it has sent what it was given
        decoders: dict[str, _DecodeServer] = {}
        entry: dict[str, _PrefillServer | _ColocatedServer | _ChunkedColocatedServer] = {}
        colocated = _ChunkedColocatedServer if self.cfg.colocated_policy == "chunked" else _ColocatedServer
        for r in self.plan.replicas:
            hw = self.hw[r.id]
            cap = r.max_sequences if (self.cfg.decode_cap == "plan" and r.max_sequences > 0) else math.inf
            if r.phase == "decode":
                decoders[r.id] = _DecodeServer(eng, _DecodeBatch(self.model, hw, cap, self.kv_tokens[r.id],
                                                                 self.calib))
            elif r.phase == "colocated":
                entry[r.id] = colocated(eng, self.model, hw, _DecodeBatch(
                    self.model, hw, cap, self.kv_tokens[r.id], self.calib), self.cfg, self.calib)

        def after_prefill(batch: list[RequestResult], latency: float) -> None:
            for r in batch:
                transfer(r, latency)

        def transfer(r: RequestResult, latency: float) -> None:
            # the prefill replica streams the first token before the KV moves (services/prefill/role.py),
            # unless the plan has the route's first token wait for the KV; a request that its first token
            # ends moves no KV. A compressed KV streams run by run during the forward pass (of `latency`
            # s, ending now): a run goes once computed and once its link is free. (A link idle since
            # busy_until can take a run from before now: nothing else was scheduled on it meanwhile.)
            r.first_token = eng.now
            if r.output <= 1:
                r.finish = eng.now
                return
            done = eng.now
            for resources, runs in self._routes[r.prefill][r.decode].pieces:
                for key, gbps in resources:  # a piece has gone once its link and both NICs have sent it
                    free = busy_until.get(key, 0.0) - eng.now  # on the clock of `streamed_transfer_after`
                    end = eng.now + cm.streamed_transfer_after(self.model, r.prompt, runs, gbps, self.codec,
                                                               latency, self.calib, free)
                    busy_until[key] = end
                    done = max(done, end)
            r.kv_ready = done
            if (r.prefill, r.decode) in self._first_from_decode:
                r.first_token = done
            eng.at(done, lambda: decoders[r.decode].arrive(r))

        for r in self.plan.replicas:
            if r.phase == "prefill" and r.id in self._entry:
                entry[r.id] = _PrefillServer(eng, self.model, self.hw[r.id], self.cfg, self.calib, after_prefill)

        ids = list(self._entry)
        probs = np.array([self._entry[i] for i in ids])
        first = rng.choice(len(ids), size=len(results), p=probs / probs.sum())
        u = rng.random(len(results))
        for r, k, x in zip(results, first, u):
            r.prefill = ids[k]
            row = self.plan.routing.get(r.prefill)
            if row:  # the decode replica: by the routing row's weights
                acc = 0.0
                r.decode = next(iter(row))
                for d, wgt in row.items():
                    acc += wgt
                    if x < acc:
                        r.decode = d
                        break
            else:
                r.decode = r.prefill
            for_kv = self.kv_tokens[r.decode] if r.decode in decoders or r.decode in entry else 0
            if r.prompt + r.output > for_kv:  # can never be held: fails at once, as a real server would
                continue
            eng.at(r.arrival, (lambda rr=r: entry[rr.prefill].arrive(rr)))

        if progress is None:
            eng.run(self.cfg.horizon)
        else:
            self._run_with_progress(eng, results, progress)
        last = max((r.finish for r in results if math.isfinite(r.finish)), default=0.0)
        return SimResult(results, self.slo, _rate_of(requests), min(eng.now, last) if last else eng.now,
                         eng.events)

    def _run_with_progress(self, eng: _Engine, results: list[RequestResult], progress: Progress) -> None:
        # run in slices of simulated time so a CLI can print progress without a callback per event
        t_end = (results[-1].arrival if results else 0.0) + 1.0
        step = max(t_end / 20, 1.0)
        t = step
        while eng._heap:
            eng.run(min(t, self.cfg.horizon))
            if eng._heap and eng._heap[0][0] > self.cfg.horizon:
                break
            done = sum(math.isfinite(r.finish) for r in results)
            progress(done / max(1, len(results)))
            t += step
            if eng._heap and eng._heap[0][0] > t:
                t = eng._heap[0][0] + step * 0.5


def _rate_of(requests: Sequence[Request]) -> float:
    if len(requests) < 2:
        return 0.0
    span = requests[-1].arrival - requests[0].arrival
    return (len(requests) - 1) / span if span > 0 else 0.0


# --- goodput ---------------------------------------------------------------------------------------------
@dataclass
class GoodputResult:
    goodput: float  # req/s: the highest rate found with attainment >= target
    result: SimResult | None  # the simulation at that rate
    probes: list[tuple[float, float]] = field(default_factory=list)  # (rate, attainment), in probe order


def find_goodput(sim: Simulator, prompts: Sequence[int], outputs: Sequence[int], n: int = 800, seed: int = 0,
                 hint: float = 0.0, rel_tol: float = 0.03, max_probes: int = 14) -> GoodputResult:
    """Highest Poisson rate whose attainment (both SLOs) is at least the target, by bracketing and
    bisection over the rate with common random numbers (the same gaps and lengths at every rate)."""
    target = sim.slo.attainment
    probes: list[tuple[float, float]] = []
    cache: dict[float, SimResult] = {}

    def att(rate: float) -> float:
        res = sim.run(poisson_requests(rate, prompts, outputs, n=n, seed=seed), seed=seed)
        cache[rate] = res
        a = res.attainment()
        probes.append((rate, a))
        return a

    lo, hi = 0.0, math.inf
    x = hint if hint > 0 else 1.0
    while len(probes) < max_probes and not math.isfinite(hi):  # bracket
        if att(x) >= target:
            lo, x = x, x * 2
        else:
            hi = x
            if lo == 0.0:
                x = x / 2
                if x < 1e-3:
                    break
                if att(x) >= target:
                    lo = x
                else:
                    hi = x
                    while len(probes) < max_probes and lo == 0.0:
                        x /= 2
                        if att(x) >= target:
                            lo = x
                        else:
                            hi = x
    while len(probes) < max_probes and math.isfinite(hi) and hi - lo > rel_tol * max(lo, 1e-9):
        mid = (lo + hi) / 2
        if att(mid) >= target:
            lo = mid
        else:
            hi = mid
    return GoodputResult(lo, cache.get(lo), probes)
