"""Roofline cost model (reconstruction, HexGen-style).

Per pipeline stage: time = max(FLOPs / (peak * compute_eff), bytes / (mem_bw * mem_eff))
                           + tensor-parallel all-reduces, plus a hand-off to the next stage.
Prefill is compute-bound (~2 * params * tokens FLOPs plus attention); decode is memory-bound
(the stage's weights and the batch's KV cache are read once per step). Memory is a hard limit:
weights/TP + KV cache + activations must fit every GPU.

The functions here are pure (numbers in, numbers out) so the parallel-config search, the LP, the
simulator and the baselines can share them. Times are seconds, sizes bytes, rates per second.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .catalog import GPUSpec
from .model import ModelSpec

# KV-codec payload size relative to fp16, at 2,000 tokens (docs/benchmarks.md, "KV codec": int4 is
# entropy-coded, ~4.45 bits per value on a real SmolLM2 cache; int4-fixed 4.56; int8 is int4 plus 4 bits
# sent as they are, ~8.5; int8-fixed 8.51).
CODEC_RATIO: dict[str, float] = {"none": 1.0, "int8": 0.53, "int8-fixed": 0.53, "int4": 0.28, "int4-fixed": 0.285}
CODECS: tuple[str, ...] = ("none", "int8", "int4")  # least to most compressed


@dataclass(frozen=True)
class Calibration:
    """Efficiencies and overheads; defaults are reconstruction guesses, calibrate from profiling."""

    compute_eff: float = 0.55  # achieved / peak tensor FLOP/s in prefill GEMMs
    mem_eff: float = 0.75  # achieved / peak memory bandwidth in decode
    net_eff: float = 0.80  # achieved / nominal link bandwidth
    collective_latency: float = 20e-6  # fixed cost of one all-reduce, s
    hop_latency: float = 50e-6  # fixed cost of one point-to-point transfer, s
    mem_usable: float = 0.90  # fraction of device memory left after CUDA context, allocator slack
    prefill_kv_buffers: int = 2  # prompts whose KV a prefill stage holds at once (compute + send)
    stage_overhead: float = 1e-3  # per stage and forward pass: kernel launches, scheduling, sync, s
    # How far a pass's compute and memory traffic overlap: 1 = the roofline (time = the larger), 0 = one
    # after the other (time = the sum). `thunderserve profile` fits it; a single CPU thread is near 0.
    overlap: float = 1.0
    link_util_max: float = 0.6  # KV links are FIFO servers: the LP loads them at most this much, and TTFT
    # pays the M/G/1 mean wait at that load
    ttft_miss_share: float = 0.5  # share of the miss budget (1 - attainment) planned for TTFT; TPOT gets the rest
    # How the replicas move a compressed KV cache (their --kv-stream-runs and --kv-stream-early defaults): in
    # runs of consecutive layers, each sent as soon as the prefill's forward pass has computed it
    # (`streamed_transfer_after`); `none` goes as one payload after the pass.
    kv_runs: int = 4
    kv_stream_early: bool = True


DEFAULT_CALIBRATION = Calibration()


@dataclass(frozen=True)
class StageHW:
    """What the cost model needs to know about one pipeline stage."""

    gpu: GPUSpec
    tp: int
    layers: int
    intra_gbps: float  # link between the stage's TP GPUs, Gbit/s
    next_gbps: float = 0.0  # link to the next stage (0 for the last stage), Gbit/s
    first: bool = True
    last: bool = True


def gbps_to_Bps(gbps: float, calib: Calibration = DEFAULT_CALIBRATION) -> float:
    return gbps * 1e9 / 8 * calib.net_eff


# --- building blocks -------------------------------------------------------------------------------
def allreduce_time(nbytes: float, tp: int, gbps: float, calib: Calibration = DEFAULT_CALIBRATION) -> float:
    """Ring all-reduce: each GPU sends and receives 2 (tp-1)/tp of the buffer."""
    if tp <= 1:
        return 0.0
    return calib.collective_latency + 2 * (tp - 1) / tp * nbytes / gbps_to_Bps(gbps, calib)


def transfer_time(nbytes: float, gbps: float, calib: Calibration = DEFAULT_CALIBRATION) -> float:
    return calib.hop_latency + nbytes / gbps_to_Bps(gbps, calib)


def handoff_time(model: ModelSpec, tokens: float, gbps: float, calib: Calibration = DEFAULT_CALIBRATION) -> float:
    """Pipeline hand-off: the hidden states of `tokens` tokens to the next stage."""
    return transfer_time(tokens * model.hidden * model.bytes_per_weight, gbps, calib)


def stage_weight_bytes(model: ModelSpec, st: StageHW) -> float:
    """Weight bytes per GPU of a stage (embedding on the first, LM head on the last stage)."""
    b = st.layers * model.layer_weight_bytes
    if st.first:
        b += model.embed_params * model.bytes_per_weight
    if st.last:
        head = model.head_params if not (model.tied_embeddings and st.first) else 0
        if model.tied_embeddings and not st.first:
            head = model.embed_params  # the last stage needs its own copy of the tied matrix
        b += (head + model.hidden) * model.bytes_per_weight
    return b / st.tp


def kv_bytes_per_token_gpu(model: ModelSpec, st: StageHW) -> float:
    """KV bytes one token costs on each GPU of the stage (KV heads split by TP, replicated past it)."""
    share = max(1.0 / st.tp, 1.0 / model.kv_heads)
    return st.layers * model.kv_bytes_per_token_layer * share


def activation_bytes(model: ModelSpec, st: StageHW, tokens: float) -> float:
    """Transient activations of one layer for `tokens` tokens (flash attention: no s^2 buffer)."""
    per_tok = 4 * model.hidden + 2 * model.intermediate / st.tp
    return tokens * per_tok * model.bytes_per_weight + (model.vocab * 4 if st.last else 0)  # fp32 logits


def free_bytes(model: ModelSpec, st: StageHW, calib: Calibration = DEFAULT_CALIBRATION) -> float:
    """Memory per GPU left for KV cache and activations once weights are loaded."""
    return st.gpu.mem_bytes * calib.mem_usable - stage_weight_bytes(model, st)


# --- prefill --------------------------------------------------------------------------------------
def stage_pass_time(model: ModelSpec, st: StageHW, tokens: float, attn_pairs: float, kv_tokens: float,
                    logits: float, calib: Calibration = DEFAULT_CALIBRATION) -> float:
    """One forward pass through one stage, whatever its mix of prefill and decode tokens: `tokens` tokens go
    through the GEMMs (and the TP all-reduces), attention scores `attn_pairs` (query, key) pairs at 4 FLOPs
    per pair and head dimension (a causal prompt of s tokens: s*s/2; a decode token at context c: c),
    `kv_tokens` tokens of KV are written or read (weights are read once) and `logits` rows go through the
    LM head on the last stage. Prefill, batched prefill, decode steps and chunked-prefill steps all use it."""
    flops = st.layers * (2 * model.layer_params * tokens + 4 * attn_pairs * model.heads * model.head_dim)
    if st.last:
        flops += 2 * model.hidden * model.vocab * logits
    compute = flops / (st.tp * st.gpu.flops * calib.compute_eff)
    mem = (stage_weight_bytes(model, st) + kv_tokens * kv_bytes_per_token_gpu(model, st)) / (
        st.gpu.mem_bw * calib.mem_eff)
    comm = 2 * st.layers * allreduce_time(tokens * model.hidden * model.bytes_per_weight, st.tp,
                                          st.intra_gbps, calib)
    return max(compute, mem) + (1.0 - calib.overlap) * min(compute, mem) + comm + calib.stage_overhead


def prefill_stage_time(model: ModelSpec, st: StageHW, tokens: float,
                       calib: Calibration = DEFAULT_CALIBRATION) -> float:
    """One prompt of `tokens` tokens through one stage (logits for the last position only)."""
    return stage_pass_time(model, st, tokens, tokens * tokens / 2, tokens, 1, calib)


def prefill_latency(model: ModelSpec, stages: list[StageHW], tokens: float,
                    calib: Calibration = DEFAULT_CALIBRATION) -> float:
    """Time from the start of a prompt's prefill to its last stage finishing (no queueing)."""
    t = 0.0
    for st in stages:
        t += prefill_stage_time(model, st, tokens, calib)
        if not st.last:
            t += handoff_time(model, tokens, st.next_gbps, calib)
    return t


def prefill_service_time(model: ModelSpec, stages: list[StageHW], tokens: float,
                         calib: Calibration = DEFAULT_CALIBRATION) -> float:
    """Time per prompt at steady state: prompts are pipelined, so the slowest stage or link sets it."""
    worst = 0.0
    for st in stages:
        worst = max(worst, prefill_stage_time(model, st, tokens, calib))
        if not st.last:
            worst = max(worst, handoff_time(model, tokens, st.next_gbps, calib))
    return worst


def _prefill_latency_service(model: ModelSpec, stages: list[StageHW], tokens: float,
                             calib: Calibration = DEFAULT_CALIBRATION) -> tuple[float, float]:
    """(prefill_latency, prefill_service_time) in one pass over the stages (same arithmetic)."""
    t = worst = 0.0
    for st in stages:
        x = prefill_stage_time(model, st, tokens, calib)
        t += x
        worst = max(worst, x)
        if not st.last:
            h = handoff_time(model, tokens, st.next_gbps, calib)
            t += h
            worst = max(worst, h)
    return t, worst


def prefill_fits(model: ModelSpec, stages: list[StageHW], tokens: float,
                 calib: Calibration = DEFAULT_CALIBRATION) -> bool:
    """Weights + activations + the KV of a few prompts (being computed / sent) fit every GPU."""
    for st in stages:
        need = activation_bytes(model, st, tokens) + calib.prefill_kv_buffers * tokens * kv_bytes_per_token_gpu(
            model, st)
        if free_bytes(model, st, calib) < need:
            return False
    return True


def queue_wait_factor(attainment: float) -> float:
    """Quantile of the waiting time in units of its mean (exponential-tail approximation).

    Kept for callers that want the old M/D/1-style shortcut; the planner uses `mg1_wait` / `wait_tail`."""
    return math.log(1.0 / (1.0 - attainment))


def split_attainment(attainment: float, share: float = 0.5) -> float:
    """Per-SLO attainment target when a request must meet TTFT and TPOT at once: the miss budget
    1 - attainment is split, `share` of it to this SLO (0.5: plan each at 1 - (1 - a)/2)."""
    return 1.0 - (1.0 - attainment) * share


def mg1_wait(rate: float, s1: float, s2: float) -> float:
    """Mean waiting time of an M/G/1 FIFO queue (Pollaczek-Khinchine): E[W] = rate E[S^2] / (2 (1 - rho)),
    rho = rate E[S]; s1 = E[S], s2 = E[S^2]. inf when rho >= 1."""
    rho = rate * s1
    if rho >= 1.0:
        return math.inf
    return rate * s2 / (2.0 * (1.0 - rho))


def wait_tail(t: float, rho: float, s1: float, s2: float) -> float:
    """P(wait > t) in an M/G/1 queue at utilisation rho: the wait is 0 with probability 1 - rho, else
    approximately exponential with mean E[W] / rho = E[S^2] / (2 E[S] (1 - rho)) (exact for M/M/1)."""
    if t < 0:
        return 1.0
    if rho <= 0:
        return 0.0
    if rho >= 1:
        return 1.0
    cond_mean = s2 / (2.0 * s1 * (1.0 - rho))
    return rho * math.exp(-t / cond_mean)


def prefill_miss(rho: float, budgets: tuple[float, ...] | list[float], s1: float, s2: float) -> float:
    """Fraction of requests whose TTFT misses the SLO at utilisation rho: `budgets` holds, for prompts
    spread evenly over the length distribution (equal weights), SLO - (latency + transfer) of each."""
    if rho <= 0 or rho >= 1:
        return sum(wait_tail(b, rho, s1, s2) for b in budgets) / len(budgets)
    cond_mean = s2 / (2.0 * s1 * (1.0 - rho))  # wait_tail inlined: this runs inside bisections
    return sum(1.0 if b < 0 else rho * math.exp(-b / cond_mean) for b in budgets) / len(budgets)


def prefill_capacity_dist(budgets: tuple[float, ...] | list[float], s1: float, s2: float,
                          attainment: float) -> float:
    """Largest request rate at which at most 1 - attainment of the TTFTs miss (M/G/1 waits, FIFO; the
    wait is independent of the request's own prompt). `budgets` as in `prefill_miss`."""
    if s1 <= 0 or not budgets:
        return 0.0
    miss = 1.0 - attainment
    if prefill_miss(1e-9, budgets, s1, s2) > miss:
        return 0.0
    # prefill_miss, vectorised for the bisection: (#negative budgets + rho sum_b exp(-b / cond_mean)) / n
    b = np.asarray(budgets, dtype=float)
    n_neg = float((b < 0).sum())
    pos = -b[b >= 0] * (2.0 * s1 / s2)  # exponent per budget is pos * (1 - rho)
    n = len(b)
    lo, hi = 0.0, 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        if (n_neg + mid * float(np.exp(pos * (1.0 - mid)).sum())) / n <= miss:
            lo = mid
        else:
            hi = mid
    return lo / s1


def prefill_capacity(latency_q: float, service: float, ttft_slo: float, extra: float = 0.0,
                     attainment: float = 0.9, service2: float | None = None) -> float:
    """Requests/s a prefill replica takes while the `attainment` quantile of TTFT meets the SLO, for
    one prompt length: TTFT = M/G/1 wait + latency_q (+ `extra`, e.g. the KV transfer) <= ttft_slo.
    `service2` = E[S^2] (default service^2, i.e. M/D/1)."""
    budget = ttft_slo - latency_q - extra
    if budget <= 0 or service <= 0:
        return 0.0
    s2 = service * service if service2 is None else service2
    return prefill_capacity_dist((budget,), service, s2, attainment)


# --- decode ---------------------------------------------------------------------------------------
def decode_stage_time(model: ModelSpec, st: StageHW, batch: float, context: float,
                      calib: Calibration = DEFAULT_CALIBRATION) -> float:
    """One decode step of `batch` sequences with mean `context` tokens through one stage."""
    return stage_pass_time(model, st, batch, batch * context, batch * context, batch, calib)


def pipeline_pass_time(model: ModelSpec, stages: list[StageHW], tokens: float, attn_pairs: float,
                       kv_tokens: float, logits: float, calib: Calibration = DEFAULT_CALIBRATION,
                       micro_batches: float | None = None) -> float:
    """One iteration of a pipelined replica with `micro_batches` (default: one per stage) micro-batches in
    flight (arguments as `stage_pass_time`, per micro-batch): each must pass every stage before its next
    iteration, and the slowest stage serves all of them in turn: max(sum of stages + hand-offs, m * slowest)."""
    chain = 0.0
    worst = 0.0
    for st in stages:
        t = stage_pass_time(model, st, tokens, attn_pairs, kv_tokens, logits, calib)
        worst = max(worst, t)
        chain += t
        if not st.last:
            chain += handoff_time(model, tokens, st.next_gbps, calib)
    return max(chain, (len(stages) if micro_batches is None else micro_batches) * worst)


def chunked_iteration_time(model: ModelSpec, stages: list[StageHW], decode: float, context: float,
                           chunk_tokens: float = 0.0, chunk_attn: float = 0.0, chunk_kv: float = 0.0,
                           chunks: float = 0.0, calib: Calibration = DEFAULT_CALIBRATION) -> float:
    """One chunked-prefill iteration of a colocated replica: `decode` sequences at mean `context` advance one
    token each, beside `chunks` prefill chunks of `chunk_tokens` tokens in all that score `chunk_attn`
    attention pairs and read or write `chunk_kv` KV tokens (their prefixes). The work is spread evenly over
    min(pp, items) micro-batches (a request sits in one micro-batch) and costed by `pipeline_pass_time`. The
    simulator passes whole counts; the colocated capacity model (`colocated.py`) passes steady-state means,
    so both cost an iteration alike."""
    n_mb = min(len(stages), decode + chunks)
    if n_mb <= 0:
        return 0.0
    n_mb = max(1.0, n_mb)  # fractional means below one item still run one pass
    attn = decode * context + chunk_attn
    kv = decode * context + chunk_kv
    return pipeline_pass_time(model, stages, (decode + chunk_tokens) / n_mb, attn / n_mb, kv / n_mb,
                              (decode + chunks) / n_mb, calib, n_mb)


def decode_step_time(model: ModelSpec, stages: list[StageHW], micro_batch: float, context: float,
                     calib: Calibration = DEFAULT_CALIBRATION) -> float:
    """Time per output token (TPOT) with one micro-batch per pipeline stage in flight (`pipeline_pass_time`)."""
    return pipeline_pass_time(model, stages, micro_batch, micro_batch * context, micro_batch * context,
                              micro_batch, calib)


def decode_max_sequences(model: ModelSpec, stages: list[StageHW], context: float,
                         calib: Calibration = DEFAULT_CALIBRATION) -> int:
    """Concurrent sequences whose KV (at `context` tokens each) fits on every stage."""
    n = math.inf
    for st in stages:
        room = free_bytes(model, st, calib) - activation_bytes(model, st, 64)
        n = min(n, room / (context * kv_bytes_per_token_gpu(model, st)))
    return max(0, int(n)) if n != math.inf else 0


def erlang_c(servers: int, load: float) -> float:
    """Probability that an arrival waits in an M/M/c queue (Erlang C), c = servers, load = lambda / mu."""
    if load <= 0:
        return 0.0
    if load >= servers:
        return 1.0
    blocking = 1.0
    for k in range(1, servers + 1):  # Erlang B by recursion
        blocking = load * blocking / (k + load * blocking)
    rho = load / servers
    return blocking / (1.0 - rho * (1.0 - blocking))


def decode_capacity(sequences: int, tpot: float, output_mean: float, tpot_slo: float,
                    output_points: tuple[float, ...] | list[float], attainment: float) -> float:
    """Requests/s a decode replica of `sequences` slots takes while at most 1 - attainment of the
    requests miss the TPOT SLO. A request waits for a slot (M/M/c: P(wait > t) = C(c, A) e^{-(c mu -
    lambda) t}, mu = 1 / (output_mean * tpot)); the wait is spread over its output tokens, so an
    output of o tokens tolerates (tpot_slo - tpot) * (o - 1) of waiting."""
    if sequences < 1 or tpot <= 0 or tpot > tpot_slo:
        return 0.0
    mu = 1.0 / (max(output_mean, 1.0) * tpot)
    slack = [(tpot_slo - tpot) * max(o - 1.0, 0.0) for o in output_points] or [math.inf]
    miss_budget = 1.0 - attainment

    def miss(lam: float) -> float:
        c_wait = erlang_c(sequences, lam / mu)
        rate = sequences * mu - lam
        return sum(c_wait * math.exp(-rate * t) if math.isfinite(t) else 0.0 for t in slack) / len(slack)

    lo, hi = 0.0, sequences * mu
    for _ in range(25):
        mid = (lo + hi) / 2
        if miss(mid) <= miss_budget:
            lo = mid
        else:
            hi = mid
    return lo


@dataclass(frozen=True)
class DecodePerf:
    sequences: int  # concurrent sequences (all micro-batches)
    tpot: float  # s per output token at that concurrency
    tokens_per_s: float
    requests_per_s: float


def decode_perf(model: ModelSpec, stages: list[StageHW], prompt_mean: float, output_mean: float,
                tpot_slo: float, calib: Calibration = DEFAULT_CALIBRATION,
                output_points: tuple[float, ...] | list[float] = (), attainment: float = 0.95,
                ctx_mem: float | None = None, ctx_read: float | None = None) -> DecodePerf:
    """Largest batch that meets the TPOT SLO and fits KV memory, and the throughput it gives.

    With `output_points` (output lengths spread over the distribution), requests/s is the rate at
    which waiting for a free slot still leaves `attainment` of the requests within the TPOT SLO
    (`decode_capacity`); without, the saturation rate tokens/s / output_mean."""
    zero = DecodePerf(0, 0.0, 0.0, 0.0)
    pp = len(stages)
    # KV reserved per sequence in the batch, and the mean context a step reads per sequence (callers pass
    # the length-biased values of Workload.decode_hold_tokens / decode_read_tokens)
    ctx_mem = prompt_mean + output_mean if ctx_mem is None else ctx_mem
    ctx_read = prompt_mean + output_mean / 2 if ctx_read is None else ctx_read
    b_mem = decode_max_sequences(model, stages, ctx_mem, calib) // pp
    if b_mem < 1:
        return zero
    if decode_step_time(model, stages, 1, ctx_read, calib) > tpot_slo:
        return zero
    lo, hi = 1, b_mem  # largest b with step time <= SLO (step time grows with b)
    if decode_step_time(model, stages, hi, ctx_read, calib) <= tpot_slo:
        lo = hi
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if decode_step_time(model, stages, mid, ctx_read, calib) <= tpot_slo:
            lo = mid
        else:
            hi = mid - 1
    tpot = decode_step_time(model, stages, lo, ctx_read, calib)
    tok_s = pp * lo / tpot
    if output_points:
        req_s = decode_capacity(pp * lo, tpot, output_mean, tpot_slo, output_points, attainment)
        return DecodePerf(pp * lo, tpot, req_s * output_mean, req_s)
    return DecodePerf(pp * lo, tpot, tok_s, tok_s / output_mean)


@dataclass(frozen=True)
class PrefillPerf:
    latency: float  # s, prompt at the attainment quantile, no queueing
    service: float  # s per prompt at steady state (mean over the prompt lengths): E[S]
    tokens_per_s: float  # prompt tokens/s at saturation
    requests_per_s: float  # capacity under the TTFT SLO with no KV-transfer time
    service2: float = 0.0  # E[S^2] over the prompt lengths (M/G/1 waits)
    latencies: tuple[float, ...] = ()  # latency of each of the workload's prompt points


def prefill_perf(model: ModelSpec, stages: list[StageHW], prompt_mean: float, prompt_q: float,
                 ttft_slo: float, attainment: float, calib: Calibration = DEFAULT_CALIBRATION,
                 prompt_points: tuple[float, ...] | list[float] = ()) -> PrefillPerf:
    """Prefill latency, service-time moments and TTFT-feasible capacity.

    With `prompt_points` (prompt lengths spread evenly over the workload's distribution), the service
    time's moments come from them and the capacity counts each point's own latency (M/G/1); without,
    the mean prompt sets a deterministic service time and prompt_q the latency (M/D/1)."""
    zero = PrefillPerf(0.0, 0.0, 0.0, 0.0)
    if not prefill_fits(model, stages, prompt_q, calib):
        return zero
    lat = prefill_latency(model, stages, prompt_q, calib)
    if prompt_points:
        both = [_prefill_latency_service(model, stages, x, calib) for x in prompt_points]
        svcs = [sv for _, sv in both]
        lats = tuple(la for la, _ in both)
        s1 = sum(svcs) / len(svcs)
        s2 = sum(v * v for v in svcs) / len(svcs)
        cap = prefill_capacity_dist([ttft_slo - x for x in lats], s1, s2, attainment)
    else:
        s1 = prefill_service_time(model, stages, prompt_mean, calib)
        s2, lats = s1 * s1, ()
        cap = prefill_capacity(lat, s1, ttft_slo, 0.0, attainment)
    if cap <= 0:
        return zero
    return PrefillPerf(lat, s1, prompt_mean / s1, cap, s2, lats)


# --- KV transfer ----------------------------------------------------------------------------------
def kv_transfer_bytes(model: ModelSpec, tokens: float, layers: int, codec: str = "none") -> float:
    """Bytes of the KV cache of `tokens` tokens over `layers` layers after the codec."""
    return tokens * layers * model.kv_bytes_per_token_layer * CODEC_RATIO[codec]


def kv_transfer_time(model: ModelSpec, tokens: float, layers: int, gbps: float, codec: str = "none",
                     calib: Calibration = DEFAULT_CALIBRATION) -> float:
    return transfer_time(kv_transfer_bytes(model, tokens, layers, codec), gbps, calib)


def run_layers(model: ModelSpec, ranges: Sequence[tuple[int, int]], codec: str,
               calib: Calibration = DEFAULT_CALIBRATION) -> list[tuple[float, int]]:
    """A link's share of a streamed KV transfer, run by run: (fraction of the forward pass done when the
    run is ready, layers of `ranges` in it), for the runs the replicas cut the model's layers into. One
    run, ready at the pass's end, when the KV moves after the pass (`none`, or early streaming off)."""
    total = sum(b - a for a, b in ranges)
    if codec == "none" or not calib.kv_stream_early or calib.kv_runs <= 1:
        return [(1.0, total)]
    n, runs = model.layers, min(calib.kv_runs, model.layers)
    cuts = [n * i // runs for i in range(runs + 1)]
    out = []
    for lo, hi in zip(cuts, cuts[1:], strict=False):
        k = sum(max(0, min(b, hi) - max(a, lo)) for a, b in ranges)
        if k:
            out.append((hi / n, k))  # ready once the pass has computed the run's last layer
    return out


def streamed_transfer_after(model: ModelSpec, tokens: float, runs: Sequence[tuple[float, int]], gbps: float,
                            codec: str, latency: float, calib: Calibration = DEFAULT_CALIBRATION,
                            link_free: float = -math.inf) -> float:
    """When a streamed KV transfer has landed, relative to the end of its prefill's forward pass (of
    `latency` s): each run (`run_layers`) goes once ready and once the link (free from `link_free`, on
    the same clock) has sent the runs before it."""
    t = link_free
    for done, layers in runs:
        t = max(t, latency * (done - 1.0)) + kv_transfer_time(model, tokens, layers, gbps, codec, calib)
    return t
