"""Lower level, step 1: the parallel configuration of one GPU group.

TP stays inside a node (all GPUs of a node share a type and the fast intra-node link); pipeline
stages span nodes (or split a node). Stages are ordered along the fastest links, and a dynamic
program assigns contiguous layer ranges to heterogeneous stages so the slowest stage is as fast as
possible under each stage's memory limit. Prefill groups are ranked by their capacity under the
TTFT SLO (then latency); decode groups by their throughput under the TPOT SLO.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass

import numpy as np

from . import costmodel as cm
from .cluster import Cluster
from .model import ModelSpec
from .workload import Workload

PHASES = ("prefill", "decode")


@dataclass(frozen=True)
class StageSpec:
    node: str
    gpus: tuple[str, ...]
    tp: int
    layer_start: int
    layer_end: int  # exclusive

    @property
    def layers(self) -> int:
        return self.layer_end - self.layer_start


@dataclass(frozen=True)
class Layout:
    stages: tuple[StageSpec, ...]

    @property
    def pp(self) -> int:
        return len(self.stages)

    @property
    def gpus(self) -> tuple[str, ...]:
        return tuple(g for s in self.stages for g in s.gpus)

    @property
    def tp_label(self) -> str:
        tps = {s.tp for s in self.stages}
        return f"{self.stages[0].tp}" if len(tps) == 1 else "/".join(str(s.tp) for s in self.stages)

    def hw(self, cluster: Cluster) -> list[cm.StageHW]:
        out = []
        n = len(self.stages)
        for i, s in enumerate(self.stages):
            node = cluster.node(s.node)
            nxt = cluster.gbps(s.node, self.stages[i + 1].node) if i + 1 < n else 0.0
            out.append(cm.StageHW(node.gpu, s.tp, s.layers, node.intra_gbps, nxt, i == 0, i == n - 1))
        return out

    def layer_map(self) -> tuple[tuple[str, int, int], ...]:
        """(node, first layer, end layer) per stage: where each layer's KV lives."""
        return tuple((s.node, s.layer_start, s.layer_end) for s in self.stages)

    def remap(self, ids_by_node: dict[str, list[str]]) -> Layout:
        """The same layout on other GPUs of the same nodes (GPUs of one node are interchangeable)."""
        pools = {k: list(v) for k, v in ids_by_node.items()}
        stages = []
        for s in self.stages:
            take, pools[s.node] = pools[s.node][: len(s.gpus)], pools[s.node][len(s.gpus):]
            stages.append(StageSpec(s.node, tuple(take), s.tp, s.layer_start, s.layer_end))
        return Layout(tuple(stages))


@dataclass(frozen=True)
class GroupPerf:
    """A group's layout and predicted performance in one phase."""

    layout: Layout
    phase: str
    capacity: float  # req/s (prefill: under the TTFT SLO, before any KV-transfer time)
    tokens_per_s: float  # prefill: prompt tokens/s; decode: output tokens/s
    latency: float = 0.0  # prefill: latency of a prompt at the attainment quantile
    service: float = 0.0  # prefill: s per prompt at steady state
    tpot: float = 0.0  # decode: time per output token at full batch
    sequences: int = 0  # decode: concurrent sequences
    service2: float = 0.0  # prefill: E[S^2] over the prompt lengths
    latencies: tuple[float, ...] = ()  # prefill: latency at each of the workload's prompt points


# --- the layer-partition dynamic program ---------------------------------------------------------------
def partition_layers(n_layers: int, per_layer: list[float], caps: list[int],
                     fixed: list[float] | None = None) -> list[int] | None:
    """Split n_layers into len(per_layer) contiguous, non-empty parts, in order, minimising
    max_i(fixed_i + n_i * per_layer_i) subject to n_i <= caps_i. None when impossible."""
    k = len(per_layer)
    fixed = fixed or [0.0] * k
    if k == 0 or n_layers < k or sum(min(c, n_layers) for c in caps) < n_layers:
        return None
    inf = math.inf
    dp = np.full(n_layers + 1, inf)
    dp[0] = 0.0
    choice = np.zeros((k, n_layers + 1), dtype=np.int64)
    j = np.arange(n_layers + 1)
    for i in range(k):
        cap = min(caps[i], n_layers)
        if cap < 1:
            return None
        n = np.arange(1, cap + 1)
        prev_idx = j[:, None] - n[None, :]  # (j, n): layers before this stage
        valid = prev_idx >= 0
        prev = np.where(valid, dp[np.clip(prev_idx, 0, None)], inf)
        cost = np.maximum(prev, fixed[i] + n * per_layer[i])
        best = np.argmin(cost, axis=1)
        dp = cost[j, best]
        choice[i] = best + 1
    if not np.isfinite(dp[n_layers]):
        return None
    out = []
    rem = n_layers
    for i in range(k - 1, -1, -1):
        c = int(choice[i][rem])
        out.append(c)
        rem -= c
    return out[::-1] if rem == 0 else None


# --- layout search ---------------------------------------------------------------------------------
def _node_orders(cluster: Cluster, nodes: list[str]) -> list[tuple[str, ...]]:
    if len(nodes) <= 3:
        return [tuple(p) for p in itertools.permutations(nodes)]
    # greedy widest-link chain from each possible start (the "pipeline routing" heuristic)
    orders = set()
    for start in nodes:
        chain, left = [start], set(nodes) - {start}
        while left:
            nxt = max(sorted(left), key=lambda b: cluster.gbps(chain[-1], b))
            chain.append(nxt)
            left.discard(nxt)
        orders.add(tuple(chain))
    return sorted(orders)[:6]


def _tp_options(model: ModelSpec, count: int, max_stages: int) -> list[int]:
    """TP degrees for a node's GPUs (the node then holds count/tp stages), largest first."""
    opts = [t for t in range(count, 0, -1) if count % t == 0 and model.valid_tp(t) and count // t <= max_stages]
    return opts[:3]  # the largest few: tiny TP degrees on big nodes are rarely competitive


def _layer_caps(model: ModelSpec, hws: list[cm.StageHW], workload: Workload, phase: str,
                calib: cm.Calibration) -> list[int]:
    """Most layers each stage can hold next to the memory its phase needs."""
    caps = []
    for st in hws:
        empty = cm.StageHW(st.gpu, st.tp, 0, st.intra_gbps, st.next_gbps, st.first, st.last)
        one = cm.StageHW(st.gpu, st.tp, 1, st.intra_gbps, st.next_gbps, False, False)
        room = st.gpu.mem_bytes * calib.mem_usable - cm.stage_weight_bytes(model, empty)
        if phase == "prefill":
            tok = workload.prompt_q
            room -= cm.activation_bytes(model, st, tok)
            per = cm.stage_weight_bytes(model, one) + calib.prefill_kv_buffers * tok * cm.kv_bytes_per_token_gpu(
                model, one)
        else:
            room -= cm.activation_bytes(model, st, 64)
            per = cm.stage_weight_bytes(model, one) + workload.decode_hold_tokens * cm.kv_bytes_per_token_gpu(
                model, one)
        caps.append(max(0, int(room // per)))
    return caps


def _per_layer_times(model: ModelSpec, hws: list[cm.StageHW], workload: Workload, phase: str,
                     micro_batch: float, calib: cm.Calibration) -> list[float]:
    out = []
    for st in hws:
        one = cm.StageHW(st.gpu, st.tp, 1, st.intra_gbps, 0.0, False, False)
        if phase == "prefill":
            out.append(cm.prefill_stage_time(model, one, workload.prompt_mean, calib))
        else:
            ctx = workload.decode_read_tokens
            out.append(cm.decode_stage_time(model, one, micro_batch, ctx, calib))
    return out


def evaluate_layout(cluster: Cluster, model: ModelSpec, workload: Workload, layout: Layout, phase: str,
                    calib: cm.Calibration = cm.DEFAULT_CALIBRATION) -> GroupPerf:
    """Predicted performance of a fixed layout in a phase (capacity 0 when it cannot serve it)."""
    hws = layout.hw(cluster)
    if phase == "prefill":
        p = cm.prefill_perf(model, hws, workload.prompt_mean, workload.prompt_q, workload.ttft_slo,
                            cm.split_attainment(workload.attainment, calib.ttft_miss_share), calib,
                            workload.prompt_points)
        return GroupPerf(layout, phase, p.requests_per_s, p.tokens_per_s, latency=p.latency, service=p.service,
                         service2=p.service2, latencies=p.latencies)
    if phase == "decode":
        d = cm.decode_perf(model, hws, workload.prompt_mean, workload.output_mean, workload.tpot_slo, calib,
                           workload.output_points,
                           cm.split_attainment(workload.attainment, 1.0 - calib.ttft_miss_share),
                           workload.decode_hold_tokens, workload.decode_read_tokens)
        return GroupPerf(layout, phase, d.requests_per_s, d.tokens_per_s, tpot=d.tpot, sequences=d.sequences)
    raise ValueError(f"unknown phase {phase!r}")


def _better(a: GroupPerf, b: GroupPerf | None) -> bool:
    if b is None:
        return True
    if a.capacity != b.capacity:
        return a.capacity > b.capacity
    if a.phase == "prefill":
        return a.latency < b.latency
    return a.tpot < b.tpot


def best_layout(cluster: Cluster, model: ModelSpec, workload: Workload, gpus: list[str] | tuple[str, ...],
                phase: str, calib: cm.Calibration = cm.DEFAULT_CALIBRATION, max_pp: int = 4,
                cache: dict | None = None) -> GroupPerf | None:
    """The best parallel configuration of a GPU group for a phase; None if it cannot serve it.

    Pipelines are at most `max_pp` stages deep: deeper ones multiply per-stage overheads, bubbles with
    uneven prompts and the blast radius of one failed GPU, which the roofline model does not see.
    `cache` (a dict the caller keeps for one model, workload and calibration) memoises the layer fit
    per stage hardware sequence: groups of other GPUs with the same stage hardware share it.
    """
    by_node: dict[str, list[str]] = {}
    for g in sorted(gpus, key=_gpu_sort_key):
        by_node.setdefault(cluster.node_of(g).name, []).append(g)
    total_mem = sum(cluster.node(n).gpu.mem_bytes * len(ids) for n, ids in by_node.items())
    if total_mem * calib.mem_usable < model.weight_bytes:
        return None
    best: GroupPerf | None = None
    nodes = list(by_node)
    if len(nodes) > max_pp:
        return None
    tp_choices = [_tp_options(model, len(by_node[n]), max_pp - len(nodes) + 1) for n in nodes]
    combos = [c for c in itertools.product(*tp_choices)
              if sum(len(by_node[n]) // t for n, t in zip(nodes, c, strict=True)) <= max_pp][:27]
    for order in _node_orders(cluster, nodes):
        for combo in combos:
            tp_of = dict(zip(nodes, combo, strict=True))
            skeleton: list[tuple[str, tuple[str, ...], int]] = []
            for n in order:
                t, ids = tp_of[n], by_node[n]
                skeleton += [(n, tuple(ids[i:i + t]), t) for i in range(0, len(ids), t)]
            if len(skeleton) > model.layers:
                continue
            perf = _fit_layers(cluster, model, workload, skeleton, phase, calib, cache)
            if perf is not None and _better(perf, best):
                best = perf
    return best


def _fit_layers(cluster: Cluster, model: ModelSpec, workload: Workload,
                skeleton: list[tuple[str, tuple[str, ...], int]], phase: str,
                calib: cm.Calibration, cache: dict | None = None) -> GroupPerf | None:
    proto = Layout(tuple(StageSpec(n, ids, t, 0, 1) for n, ids, t in skeleton))
    hws = proto.hw(cluster)
    if cache is None:
        return _fit_layers_hw(cluster, model, workload, skeleton, hws, phase, calib)
    # everything below depends on the stages' hardware only, not on which GPUs they are
    key = (phase, tuple(hws))
    if key not in cache:
        cache[key] = _fit_layers_hw(cluster, model, workload, skeleton, hws, phase, calib)
    perf = cache[key]
    if perf is None:
        return None
    stages = tuple(StageSpec(n, ids, t, s.layer_start, s.layer_end)
                   for (n, ids, t), s in zip(skeleton, perf.layout.stages, strict=True))
    return dataclasses.replace(perf, layout=Layout(stages))


def _fit_layers_hw(cluster: Cluster, model: ModelSpec, workload: Workload,
                   skeleton: list[tuple[str, tuple[str, ...], int]], hws: list[cm.StageHW], phase: str,
                   calib: cm.Calibration) -> GroupPerf | None:
    k = len(skeleton)
    caps = _layer_caps(model, hws, workload, phase, calib)
    best: GroupPerf | None = None
    micro = 8.0
    for _ in range(2 if phase == "decode" else 1):  # decode: re-balance at the batch actually reached
        per = _per_layer_times(model, hws, workload, phase, micro, calib)
        parts = partition_layers(model.layers, per, caps)
        if parts is None:
            return best
        stages, start = [], 0
        for (n, ids, t), c in zip(skeleton, parts, strict=True):
            stages.append(StageSpec(n, ids, t, start, start + c))
            start += c
        perf = evaluate_layout(cluster, model, workload, Layout(tuple(stages)), phase, calib)
        if perf.capacity > 0 and _better(perf, best):
            best = perf
        if perf.sequences <= 0:
            break
        micro = max(1.0, perf.sequences / k)
    return best


def _gpu_sort_key(g: str) -> tuple[str, int]:
    node, _, idx = g.rpartition(":")
    return (node, int(idx) if idx.isdigit() else 0)
