"""Cost model against hand-computed values, and memory feasibility."""

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from thunderserve.planner import Cluster, ModelSpec, Workload
from thunderserve.planner import costmodel as cm
from thunderserve.planner.catalog import GPUSpec, default_catalog
from thunderserve.planner.parallel import best_layout

IDEAL = cm.Calibration(compute_eff=1.0, mem_eff=1.0, net_eff=1.0, collective_latency=0.0, hop_latency=0.0,
                       mem_usable=1.0, stage_overhead=0.0)
GPU = GPUSpec("test", tflops=100.0, mem_gb=80.0, mem_gbps=1000.0, price=1.0)
TINY = ModelSpec("tiny", layers=4, hidden=1024, heads=8, kv_heads=8, intermediate=4096, vocab=1000)


def test_catalog_has_required_types_with_sources():
    cat = default_catalog()
    for name in ["A100-40G", "A100-80G", "H100", "L40S", "L40", "A40", "A6000", "A5000", "RTX 3090 Ti",
                 "RTX4090", "L4", "A10G", "T4", "V100"]:
        g = cat.get(name)
        assert g.tflops > 0 and g.mem_gb > 0 and g.mem_gbps > 0 and g.price > 0 and g.source
    assert cat.get("a40").mem_gb == 48 and cat.get("A40").mem_gbps == 696


def test_model_counts():
    m = ModelSpec.from_name("llama-7b")
    assert m.params == pytest.approx(6.74e9, rel=0.01)  # the published 6.7B
    assert m.kv_bytes_per_token == 2 * 32 * 32 * 128 * 2  # 2 * layers * kv_heads * head_dim * bytes
    assert ModelSpec.from_name("llama-2-70b").kv_bytes_per_token == 2 * 80 * 8 * 128 * 2
    assert ModelSpec.from_name("llama-30b").params == pytest.approx(32.5e9, rel=0.01)
    assert ModelSpec.from_name("smollm2-135m").params == pytest.approx(134.5e6, rel=0.01)
    assert not ModelSpec.from_name("llama-30b").valid_tp(8)  # 52 heads do not split 8 ways


def test_hf_config(tmp_path):
    cfg = {"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
           "intermediate_size": 128, "vocab_size": 100, "tie_word_embeddings": True, "torch_dtype": "float32"}
    p = tmp_path / "config.json"
    p.write_text(__import__("json").dumps(cfg))
    m = ModelSpec.from_hf_config(p)
    assert (m.layers, m.head_dim, m.kv_heads, m.bytes_per_weight, m.tied_embeddings) == (2, 16, 2, 4, True)
    assert ModelSpec.load(str(tmp_path)) == m


def test_allreduce_and_transfer_by_hand():
    # ring all-reduce of 1 GB over 4 GPUs on 80 Gbit/s (10 GB/s): 2 * 3/4 * 1e9 / 1e10 = 0.15 s
    assert cm.allreduce_time(1e9, 4, 80.0, IDEAL) == pytest.approx(0.15)
    assert cm.allreduce_time(1e9, 1, 80.0, IDEAL) == 0.0
    # KV of 1000 tokens of llama-7b: 1000 * 524288 B = 524.288 MB; over 8 Gbit/s (1 GB/s)
    m = ModelSpec.from_name("llama-7b")
    assert cm.kv_transfer_time(m, 1000, 32, 8.0, "none", IDEAL) == pytest.approx(0.524288)
    assert cm.kv_transfer_time(m, 1000, 32, 8.0, "int4", IDEAL) == pytest.approx(0.524288 * 0.28)
    assert cm.kv_transfer_bytes(m, 1000, 32, "int8") == pytest.approx(524288e3 * 0.53)


def test_prefill_stage_time_by_hand():
    st_ = cm.StageHW(GPU, tp=1, layers=4, intra_gbps=100.0, first=False, last=False)
    s = 2000
    flops = 4 * (2 * TINY.layer_params * s + 2 * s * s * 8 * 128)
    assert cm.prefill_stage_time(TINY, st_, s, IDEAL) == pytest.approx(flops / 100e12)
    # TP2 halves the compute and adds 2 all-reduces per layer of s * hidden * 2 bytes
    st2 = cm.StageHW(GPU, tp=2, layers=4, intra_gbps=100.0, first=False, last=False)
    ar = 2 * 0.5 * (s * 1024 * 2) / (100e9 / 8)
    assert cm.prefill_stage_time(TINY, st2, s, IDEAL) == pytest.approx(flops / 200e12 + 8 * ar)


def test_decode_step_is_memory_bound_by_hand():
    st_ = cm.StageHW(GPU, tp=1, layers=4, intra_gbps=100.0, first=False, last=False)
    b, ctx = 8, 1000
    nbytes = 4 * TINY.layer_weight_bytes + b * ctx * 4 * TINY.kv_bytes_per_token_layer
    t = cm.decode_stage_time(TINY, st_, b, ctx, IDEAL)
    assert t == pytest.approx(nbytes / 1000e9)
    flops = 4 * (2 * TINY.layer_params + 4 * ctx * 1024) * b
    assert flops / 100e12 < t  # memory-bound
    # a 2-stage pipeline with 2 micro-batches: TPOT = max(chain, 2 * slowest)
    half = cm.StageHW(GPU, tp=1, layers=2, intra_gbps=100.0, next_gbps=8.0, first=True, last=False)
    tail = cm.StageHW(GPU, tp=1, layers=2, intra_gbps=100.0, first=False, last=True)
    t1 = cm.decode_stage_time(TINY, half, b, ctx, IDEAL)
    t2 = cm.decode_stage_time(TINY, tail, b, ctx, IDEAL)
    hop = b * 1024 * 2 / 1e9
    assert cm.decode_step_time(TINY, [half, tail], b, ctx, IDEAL) == pytest.approx(max(t1 + t2 + hop, 2 * max(t1, t2)))


def test_mg1_wait_hand_value():
    # rate 2/s, E[S] = 0.3 s, E[S^2] = 0.15 s^2: rho = 0.6, E[W] = 2 * 0.15 / (2 * 0.4) = 0.375 s
    assert cm.mg1_wait(2.0, 0.3, 0.15) == pytest.approx(0.375)
    assert cm.mg1_wait(1.0, 0.3, 0.09) == pytest.approx(0.09 / 1.4)  # M/D/1: rho S / (2 (1 - rho))
    assert cm.mg1_wait(4.0, 0.3, 0.15) == math.inf
    # the tail: P(W > 0) = rho; conditional mean E[W] / rho
    assert cm.wait_tail(0.0, 0.6, 0.3, 0.15) == pytest.approx(0.6)
    assert cm.wait_tail(0.5, 0.6, 0.3, 0.15) == pytest.approx(0.6 * math.exp(-0.5 / (0.375 / 0.6)))
    assert cm.wait_tail(-0.1, 0.6, 0.3, 0.15) == 1.0


def test_split_attainment():
    assert cm.split_attainment(0.9) == pytest.approx(0.95)
    assert cm.split_attainment(0.9, 1.0) == pytest.approx(0.9)


def test_prefill_capacity_mg1():
    # budget 1 s, S = 0.5 s deterministic, 90%: the largest rho with rho exp(-B 2 S (1 - rho) / S^2) <= 0.1
    cap = cm.prefill_capacity(1.0, 0.5, 2.0, 0.0, 0.9)
    rho = cap * 0.5
    assert rho * math.exp(-1.0 * 2 * 0.5 * (1 - rho) / 0.25) == pytest.approx(0.1, rel=1e-6)
    assert cm.prefill_capacity(1.0, 0.5, 2.0, 1.0, 0.9) == 0.0  # transfer eats the budget
    assert cm.prefill_capacity(1.0, 0.5, 3.0, 0.0, 0.9) > cap
    # variable prompt lengths (E[S^2] > E[S]^2) wait longer: less capacity
    assert cm.prefill_capacity(1.0, 0.5, 2.0, 0.0, 0.9, service2=0.5) < cap


def test_erlang_c_and_decode_capacity():
    assert cm.erlang_c(1, 0.7) == pytest.approx(0.7)  # M/M/1: P(wait) = rho
    assert cm.erlang_c(2, 1.0) == pytest.approx(1 / 3)  # hand value: A^2/2 / (1 - rho) over the sum
    cap = cm.decode_capacity(8, 0.05, 100, 0.1, [100.0], 0.95)
    assert 0 < cap < 8 / (100 * 0.05)  # below saturation: some waiting is allowed, not all
    assert cm.decode_capacity(8, 0.05, 100, 0.1, [100.0], 0.99) < cap


def _cluster(gpu: str, count: int) -> Cluster:
    return Cluster.from_dict({"name": "c", "nodes": [{"name": "n0", "gpu": gpu, "count": count}]})


@pytest.mark.parametrize("gpu,count", [("A40", 1), ("A5000", 2), ("RTX3090Ti", 2), ("T4", 4), ("L4", 2)])
def test_30b_never_lands_on_a_group_that_cannot_hold_it(gpu, count):
    c = _cluster(gpu, count)
    m = ModelSpec.from_name("llama-30b")
    w = Workload.from_name("code", rate=1.0)
    for phase in ("prefill", "decode"):
        assert best_layout(c, m, w, c.gpu_ids(), phase) is None


def _check_fits(c: Cluster, m: ModelSpec, w: Workload, perf) -> None:
    hws = perf.layout.hw(c)
    for s in hws:
        weights = cm.stage_weight_bytes(m, s)
        if perf.phase == "prefill":
            need = weights + cm.activation_bytes(m, s, w.prompt_q) + w.prompt_q * cm.kv_bytes_per_token_gpu(m, s)
        else:
            need = weights + perf.sequences * (w.prompt_mean + w.output_mean) * cm.kv_bytes_per_token_gpu(m, s)
        assert need <= s.gpu.mem_bytes


@settings(max_examples=25, deadline=None)
@given(gpu=st.sampled_from(["A40", "A5000", "RTX3090Ti", "A100-80G", "L4", "T4"]),
       count=st.sampled_from([1, 2, 4]), model=st.sampled_from(["llama-13b", "llama-30b", "llama-2-70b"]),
       phase=st.sampled_from(["prefill", "decode"]))
def test_feasible_layouts_fit_memory(gpu, count, model, phase):
    c = _cluster(gpu, count)
    m = ModelSpec.from_name(model)
    w = Workload.from_name("conversation", rate=1.0)
    perf = best_layout(c, m, w, c.gpu_ids(), phase)
    if perf is None:
        return
    assert perf.capacity > 0
    _check_fits(c, m, w, perf)
    assert sum(s.layers for s in perf.layout.stages) == m.layers
    assert all(s.tp == len(s.gpus) for s in perf.layout.stages)


def test_a_streamed_transfer_leaves_only_its_tail_after_the_pass():
    """The replicas stream a compressed KV in runs during the forward pass (`run_layers`,
    `streamed_transfer_after`): run j of 4 is ready at j/4 of the pass and goes once the link has sent
    the run before it. By hand, on TINY (4 layers, one per run) with an ideal link."""
    early, late = IDEAL, cm.Calibration(**{**IDEAL.__dict__, "kv_stream_early": False})
    assert cm.run_layers(TINY, [(0, 4)], "int4", early) == [(0.25, 1), (0.5, 1), (0.75, 1), (1.0, 1)]
    assert cm.run_layers(TINY, [(1, 3)], "int4", early) == [(0.5, 1), (0.75, 1)]  # a link's share only
    assert cm.run_layers(TINY, [(0, 4)], "none", early) == [(1.0, 4)]  # `none` goes after the pass
    assert cm.run_layers(TINY, [(0, 4)], "int4", late) == [(1.0, 4)]
    one = cm.kv_transfer_time(TINY, 1000, 1, 10, "int4", IDEAL)  # a run's time on the link
    runs = cm.run_layers(TINY, [(0, 4)], "int4", early)
    # a slow pass (each run waits for the pass): only the last run is left after it
    assert cm.streamed_transfer_after(TINY, 1000, runs, 10, "int4", 100 * one, IDEAL) == pytest.approx(one)
    # a pass too quick to matter: the whole chain, as if sent after it
    assert cm.streamed_transfer_after(TINY, 1000, runs, 10, "int4", 0.0, IDEAL) == pytest.approx(4 * one)
    # in between (pass = 2 runs' time): ready at -1.5, -1, -0.5, 0 runs' time, sent over -1.5 .. +2.5
    assert cm.streamed_transfer_after(TINY, 1000, runs, 10, "int4", 2 * one, IDEAL) == pytest.approx(2.5 * one)
    assert cm.streamed_transfer_after(TINY, 1000, runs, 10, "int4", 1 * one, IDEAL) == pytest.approx(3.25 * one)
    # a link busy until 2 runs' time after the pass's end: everything waits for it
    assert cm.streamed_transfer_after(TINY, 1000, runs, 10, "int4", 100 * one, IDEAL,
                                      link_free=2 * one) == pytest.approx(6 * one)
