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
from dataclasses import dataclass

from .catalog import GPUSpec
from .model import ModelSpec

# KV-codec payload size relative to fp16 (DESIGN.md §4: int4 with fp16 scale+zero per group).
CODEC_RATIO: dict[str, float] = {"none": 1.0, "int8": 0.53, "int4": 0.28}
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
def prefill_stage_time(model: ModelSpec, st: StageHW, tokens: float,
                       calib: Calibration = DEFAULT_CALIBRATION) -> float:
    """One prompt of `tokens` tokens through one stage."""
    flops = st.layers * (2 * model.layer_params * tokens + 2 * tokens * tokens * model.heads * model.head_dim)
    if st.last:
        flops += 2 * model.hidden * model.vocab  # logits for the last position only
    compute = flops / (st.tp * st.gpu.flops * calib.compute_eff)
    mem = (stage_weight_bytes(model, st) + tokens * kv_bytes_per_token_gpu(model, st)) / (
        st.gpu.mem_bw * calib.mem_eff)
    comm = 2 * st.layers * allreduce_time(tokens * model.hidden * model.bytes_per_weight, st.tp,
                                          st.intra_gbps, calib)
    return max(compute, mem) + comm + calib.stage_overhead


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
    """Quantile of the waiting time in units of its mean (exponential-tail approximation)."""
    return math.log(1.0 / (1.0 - attainment))


def prefill_capacity(latency_q: float, service: float, ttft_slo: float, extra: float = 0.0,
                     attainment: float = 0.9) -> float:
    """Requests/s a prefill replica takes while the `attainment` quantile of TTFT meets the SLO.

    TTFT = wait + prefill latency (+ `extra`, e.g. the KV transfer to the decode replica).
    The wait is M/D/1: mean rho*S / (2 (1 - rho)); its quantile ~ f * mean. Solving
    f * rho * S / (2 (1 - rho)) <= budget for rho gives rho = 2B / (f S + 2B).
    """
    budget = ttft_slo - latency_q - extra
    if budget <= 0 or service <= 0:
        return 0.0
    f = queue_wait_factor(attainment)
    rho = 2 * budget / (f * service + 2 * budget)
    return rho / service


# --- decode ---------------------------------------------------------------------------------------
def decode_stage_time(model: ModelSpec, st: StageHW, batch: float, context: float,
                      calib: Calibration = DEFAULT_CALIBRATION) -> float:
    """One decode step of `batch` sequences with mean `context` tokens through one stage."""
    flops = st.layers * (2 * model.layer_params + 4 * context * model.heads * model.head_dim) * batch
    if st.last:
        flops += 2 * model.hidden * model.vocab * batch
    compute = flops / (st.tp * st.gpu.flops * calib.compute_eff)
    nbytes = stage_weight_bytes(model, st) + batch * context * kv_bytes_per_token_gpu(model, st)
    mem = nbytes / (st.gpu.mem_bw * calib.mem_eff)
    comm = 2 * st.layers * allreduce_time(batch * model.hidden * model.bytes_per_weight, st.tp,
                                          st.intra_gbps, calib)
    return max(compute, mem) + comm + calib.stage_overhead


def decode_step_time(model: ModelSpec, stages: list[StageHW], micro_batch: float, context: float,
                     calib: Calibration = DEFAULT_CALIBRATION) -> float:
    """Time per output token (TPOT) with one micro-batch per pipeline stage in flight.

    Each of the pp micro-batches must pass every stage before its next token, and the slowest stage
    serves all pp micro-batches in turn: TPOT = max(sum of stages + hand-offs, pp * slowest stage).
    """
    chain = 0.0
    worst = 0.0
    for st in stages:
        t = decode_stage_time(model, st, micro_batch, context, calib)
        worst = max(worst, t)
        chain += t
        if not st.last:
            chain += handoff_time(model, micro_batch, st.next_gbps, calib)
    return max(chain, len(stages) * worst)


def decode_max_sequences(model: ModelSpec, stages: list[StageHW], context: float,
                         calib: Calibration = DEFAULT_CALIBRATION) -> int:
    """Concurrent sequences whose KV (at `context` tokens each) fits on every stage."""
    n = math.inf
    for st in stages:
        room = free_bytes(model, st, calib) - activation_bytes(model, st, 64)
        n = min(n, room / (context * kv_bytes_per_token_gpu(model, st)))
    return max(0, int(n)) if n != math.inf else 0


@dataclass(frozen=True)
class DecodePerf:
    sequences: int  # concurrent sequences (all micro-batches)
    tpot: float  # s per output token at that concurrency
    tokens_per_s: float
    requests_per_s: float


def decode_perf(model: ModelSpec, stages: list[StageHW], prompt_mean: float, output_mean: float,
                tpot_slo: float, calib: Calibration = DEFAULT_CALIBRATION) -> DecodePerf:
    """Largest batch that meets the TPOT SLO and fits KV memory, and the throughput it gives."""
    zero = DecodePerf(0, 0.0, 0.0, 0.0)
    pp = len(stages)
    ctx_mem = prompt_mean + output_mean  # KV held by a sequence near its end
    ctx_read = prompt_mean + output_mean / 2  # mean context read per step
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
    return DecodePerf(pp * lo, tpot, tok_s, tok_s / output_mean)


@dataclass(frozen=True)
class PrefillPerf:
    latency: float  # s, prompt at the attainment quantile, no queueing
    service: float  # s per prompt at steady state (mean prompt)
    tokens_per_s: float  # prompt tokens/s at saturation
    requests_per_s: float  # capacity under the TTFT SLO with no KV-transfer time


def prefill_perf(model: ModelSpec, stages: list[StageHW], prompt_mean: float, prompt_q: float,
                 ttft_slo: float, attainment: float, calib: Calibration = DEFAULT_CALIBRATION) -> PrefillPerf:
    zero = PrefillPerf(0.0, 0.0, 0.0, 0.0)
    if not prefill_fits(model, stages, prompt_q, calib):
        return zero
    lat = prefill_latency(model, stages, prompt_q, calib)
    svc = prefill_service_time(model, stages, prompt_mean, calib)
    cap = prefill_capacity(lat, svc, ttft_slo, 0.0, attainment)
    if cap <= 0:
        return zero
    return PrefillPerf(lat, svc, prompt_mean / svc, cap)


# --- KV transfer ----------------------------------------------------------------------------------
def kv_transfer_bytes(model: ModelSpec, tokens: float, layers: int, codec: str = "none") -> float:
    """Bytes of the KV cache of `tokens` tokens over `layers` layers after the codec."""
    return tokens * layers * model.kv_bytes_per_token_layer * CODEC_RATIO[codec]


def kv_transfer_time(model: ModelSpec, tokens: float, layers: int, gbps: float, codec: str = "none",
                     calib: Calibration = DEFAULT_CALIBRATION) -> float:
    return transfer_time(kv_transfer_bytes(model, tokens, layers, codec), gbps, calib)
