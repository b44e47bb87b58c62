"""The engine's continuous batch gives the same tokens as decoding each sequence alone."""

from __future__ import annotations

import pytest
import torch

from thunderserve.common.engine import Engine, MockEngine


@pytest.fixture(scope="module")
def tiny() -> Engine:
    return Engine("tiny-random", threads=1)


def _reference(engine: Engine, ids: list[int], n: int) -> list[int]:
    with torch.inference_mode():
        out = engine.model.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0, len(ids):].tolist()


def test_prefill_returns_per_layer_kv(tiny):
    result = tiny.prefill([5, 6, 7, 8])
    cfg = tiny.config
    assert len(result.kv) == cfg.num_hidden_layers
    k, v = result.kv[0]
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    assert k.shape == v.shape == (1, cfg.num_key_value_heads, 4, head_dim)
    assert result.logits.shape == (cfg.vocab_size,)


def test_the_engine_runs_on_its_device_and_hands_the_host_cpu_tensors(tiny):
    """Weights and the batch's cache on the engine's device; logits and the rebuilt first layer (what
    sampling and the KV codec take) on the CPU; a batch takes KV from anywhere, in any dtype."""
    assert tiny.device == torch.device("cpu") and tiny.model.device == tiny.device
    result = tiny.prefill([5, 6, 7, 8])
    assert result.logits.device.type == "cpu" and result.logits.dtype == torch.float32
    key, _ = tiny.first_layer_kv([5, 6, 7, 8])
    assert key.device.type == "cpu" and torch.equal(key, result.kv[0][0].to(tiny.kv_dtype))
    batch = tiny.new_batch()
    batch.add("a", [(k.to(torch.bfloat16), v.to(torch.bfloat16)) for k, v in result.kv], 9)
    assert batch.keys[0].device == tiny.device and batch.keys[0].dtype == tiny.kv_dtype
    assert batch.step()["a"].device.type == "cpu"


@pytest.mark.parametrize("device,needle", [("tpu", "unknown device"), ("meta", "use 'cpu', 'cuda'"),
                                           ("cuda:99", "CUDA GPU")])
def test_a_device_the_host_lacks_is_a_clear_error(device, needle):
    from thunderserve.common.models import check_device

    with pytest.raises(ValueError, match=needle):
        check_device(device)
    assert check_device("cpu") == torch.device("cpu")


def test_prefill_hands_each_layer_over_as_the_pass_computes_it(tiny):
    """`on_layer` gets every layer's KV in order, on the pass's own thread, and the very tensors the
    result holds, equal to a plain prefill's."""
    seen: list[int] = []
    handed: list[tuple[torch.Tensor, torch.Tensor]] = []

    def on_layer(i, key, value):
        assert torch.is_inference_mode_enabled()  # inside the pass, not after it
        seen.append(i)
        handed.append((key, value))

    result = tiny.prefill([5, 6, 7, 8, 9], on_layer=on_layer)
    plain = tiny.prefill([5, 6, 7, 8, 9])
    assert seen == list(range(tiny.num_layers)) == list(range(len(result.kv)))
    for (k, v), (k2, v2), (k3, v3) in zip(handed, result.kv, plain.kv, strict=True):
        assert k is k2 and v is v2 and torch.equal(k, k3) and torch.equal(v, v3)
    assert torch.equal(result.logits, plain.logits)
    mock = MockEngine()
    got = []
    mock.prefill([1, 2, 3], on_layer=lambda i, k, v: got.append(i))
    assert got == list(range(mock.num_layers))


def test_prefill_rejects_empty_prompt(tiny):
    with pytest.raises(ValueError):
        tiny.prefill([])


@pytest.mark.parametrize("engine_name", ["tiny", "mock"])
def test_a_prefill_in_chunks_gives_the_whole_prefills_kv_and_logits(tiny, engine_name):
    """Chunks of any size (the last a single token) attend to the cache of the ones before: the KV, the next
    token's logits and every prompt position's logits are the one-pass prefill's (to float rounding), and the
    decode batch continues from them as from a whole prefill."""
    engine = tiny if engine_name == "tiny" else MockEngine()
    ids = list(range(5, 45))
    whole = engine.prefill(ids, prompt_logits=True)
    work = engine.start_prefill(ids, prompt_logits=True)
    results = [work.advance(n) for n in (7, 16, 0, 15, 1)]  # 0 still runs a token: every call makes progress
    assert [r is None for r in results] == [True, True, True, True, False] and work.remaining == 0
    chunked = results[-1]
    assert torch.allclose(chunked.logits, whole.logits, atol=1e-5)
    assert torch.allclose(chunked.prompt_logits, whole.prompt_logits, atol=1e-5)
    for (k, v), (k2, v2) in zip(chunked.kv, whole.kv, strict=True):
        assert k.shape == k2.shape and torch.allclose(k, k2, atol=1e-5) and torch.allclose(v, v2, atol=1e-5)
    with pytest.raises(RuntimeError, match="already done"):
        work.advance(4)
    with pytest.raises(ValueError, match="empty prompt"):
        engine.start_prefill([])
    if engine_name == "tiny":  # decoding on from the chunked cache gives generate()'s tokens
        batch = engine.new_batch()
        batch.add("s", chunked.kv, int(chunked.logits.argmax()))
        tokens = [int(chunked.logits.argmax())]
        for _ in range(5):
            tokens.append(int(batch.step()["s"].argmax()))
            batch.set_next_token("s", tokens[-1])
        assert tokens == _reference(engine, ids, 6)


@pytest.mark.parametrize("headroom", [64, 2])  # 2: the preallocated cache regrows every other step
def test_batch_with_joins_and_leaves_matches_single_sequence_decoding(tiny, headroom):
    prompts = {"a": [11, 12, 13, 14, 15, 16, 17], "b": [200, 201], "c": list(range(300, 320)), "d": [7] * 5}
    lengths = {"a": 12, "b": 5, "c": 9, "d": 14}
    expected = {k: _reference(tiny, ids, lengths[k]) for k, ids in prompts.items()}
    got: dict[str, list[int]] = {k: [] for k in prompts}
    batch = tiny.new_batch()
    batch.HEADROOM = headroom

    def join(key):
        result = tiny.prefill(prompts[key])
        token = int(result.logits.argmax())
        got[key].append(token)
        batch.add(key, result.kv, token)

    def step():
        for key, logits in batch.step().items():
            token = int(logits.argmax())
            got[key].append(token)
            if len(got[key]) >= lengths[key]:
                batch.remove(key)
            else:
                batch.set_next_token(key, token)

    join("a")
    step()
    step()
    join("b")  # shorter than the batch: left-padded
    step()
    join("c")  # longer than the batch: everyone else is padded
    for _ in range(3):
        step()
    join("d")
    while len(batch):
        step()
    assert got == expected


def test_batch_rejects_duplicate_ids_and_trims_padding(tiny):
    batch = tiny.new_batch()
    long = tiny.prefill(list(range(1, 30)))
    short = tiny.prefill([1, 2])
    batch.add("long", long.kv, 3)
    batch.add("short", short.kv, 4)
    with pytest.raises(ValueError):
        batch.add("short", short.kv, 4)
    assert batch.width == 29
    assert batch.remove("long")
    assert batch.width == 2  # the padding only "long" needed is gone
    assert not batch.remove("long")
    assert set(batch.step()) == {"short"}


def test_mock_engine_is_deterministic_and_never_eos():
    engine = MockEngine()
    batch = engine.new_batch()
    result = engine.prefill([1, 2, 3])
    batch.add("x", result.kv, int(result.logits.argmax()))
    tokens = [int(batch.step()["x"].argmax()) for _ in range(20)]
    assert not set(tokens) & engine.eos_token_ids
    assert tokens[:9] != tokens[1:10]  # it cycles through several words


def test_bf16_engine_runs_attention_in_fp32_and_masks_the_padding():
    engine = Engine("tiny-random", dtype="bfloat16", threads=1)
    assert engine.model.config._attn_implementation == "thunderserve" and engine.kv_dtype == torch.float32
    long_ids, short_ids = list(range(40, 52)), [9, 10, 11]
    result = engine.prefill(long_ids)
    assert result.kv[0][0].dtype == torch.bfloat16  # what prefill sends: the model's dtype
    batch = engine.new_batch()
    batch.add("long", result.kv, 5)
    batch.add("short", engine.prefill(short_ids).kv, 3)  # left-padded by 9 columns
    assert batch.keys[0].dtype == torch.float32
    logits = batch.step()
    # The short sequence alone (no padding) must agree with its padded row in the batch.
    alone = engine.new_batch()
    alone.add("short", engine.prefill(short_ids).kv, 3)
    expected = alone.step()["short"]
    assert set(logits) == {"long", "short"} and all(torch.isfinite(v).all() for v in logits.values())
    assert torch.allclose(logits["short"], expected, atol=0.05 * float(expected.abs().max()))
    # And attending to the padding would have changed it: the pads are not harmless zeros.
    assert int(logits["short"].argmax()) == int(expected.argmax())


def test_first_layer_kv_is_exactly_the_prefills(tiny):
    ids = [3, 50, 7, 900, 12, 12, 4]
    result = tiny.prefill(ids)
    key, value = tiny.first_layer_kv(ids)
    assert torch.equal(key, result.kv[0][0]) and torch.equal(value, result.kv[0][1])
    with pytest.raises(ValueError):
        tiny.first_layer_kv([])


def test_int4_leaves_the_first_layer_to_a_decoder_that_rebuilds_it(tiny):
    """pack_cache(rebuild=True): int4 sends every layer but the first; unpack_cache gets it from
    the tokens (bit-exact) and the rest as without rebuilding. Other codecs send everything."""
    import msgpack

    from thunderserve.common.kvcodec import get_codec, pack_cache, unpack_cache

    ids = list(range(40, 90))
    kv = tiny.prefill(ids).kv
    codec = get_codec("int4")
    full, full_manifest = pack_cache(codec, kv)
    payload, manifest = pack_cache(codec, kv, rebuild=True)
    manifest = msgpack.unpackb(msgpack.packb(manifest))
    assert manifest["rebuilt"] == 1 and "rebuilt" not in full_manifest
    assert payload.numel() < full.numel()
    assert all(0 not in e["layers"] for e in manifest["entries"])
    out = unpack_cache(payload, manifest, lambda: tiny.first_layer_kv(ids))
    reference = unpack_cache(full, full_manifest)
    assert len(out) == len(kv)
    assert torch.equal(out[0][0], kv[0][0]) and torch.equal(out[0][1], kv[0][1])
    for (k, v), (rk, rv) in zip(out[1:], reference[1:], strict=True):  # per-layer steps: the same codes
        assert torch.equal(k, rk) and torch.equal(v, rv)
    with pytest.raises(ValueError, match="cannot rebuild"):
        unpack_cache(payload, manifest)
    with pytest.raises(ValueError, match="only the first layer"):
        unpack_cache(payload, {**manifest, "rebuilt": 2}, lambda: tiny.first_layer_kv(ids))
    for name in ("none", "int8-fixed", "int4-fixed"):
        _, other = pack_cache(get_codec(name), kv, rebuild=True)
        assert "rebuilt" not in other


def test_mock_engine_does_not_offer_to_rebuild():
    engine = MockEngine()
    assert not engine.rebuilds_first_layer
    with pytest.raises(ValueError):
        engine.first_layer_kv([1, 2])
