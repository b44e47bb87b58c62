"""KV codec accuracy on the real SmolLM2 (issue 3). Slow: loads the model (~2 min at most).

Uses every 4th prompt of tests/data/kv_prompts.json; benchmarks/kvcodec_accuracy.py reports
the full set. Agreement on a small subset is noisy (one near-tie flips a whole prompt), so the
regression guards use the KL; the issue's agreement targets are asserted separately and marked
as expected failures: on this metric even a plain fp16 cast of the cache loses 0.7% (see
docs/benchmarks.md, "KV codec").
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def setup():
    from thunderserve.common import kvaccuracy as ka
    from thunderserve.common.models import ModelNotFoundError, load_model, resolve_model

    try:
        resolve_model("smollm2")
    except ModelNotFoundError as exc:
        pytest.skip(str(exc))

    torch.set_num_threads(1)
    model, tokenizer = load_model("smollm2")
    cases = ka.build_cases(model, tokenizer, ka.load_prompts()[::4])
    return ka, model, tokenizer, cases


def _eval(setup, codec):
    ka, model, tokenizer, cases = setup
    return ka.evaluate(model, cases, codec, exact=False, eos=tokenizer.eos_token_id)


def test_uncompressed_path_is_the_reference(setup) -> None:
    from thunderserve.common.kvcodec import get_codec

    result = _eval(setup, get_codec("none"))
    assert result.agreement == 1.0 and result.kl < 1e-9


def test_int8_and_int4_regression(setup) -> None:
    from thunderserve.common.kvcodec import GroupQuantCodec, QuantSpec, get_codec

    int8 = _eval(setup, get_codec("int8"))
    int8_fixed = _eval(setup, get_codec("int8-fixed"))
    fixed = _eval(setup, get_codec("int4-fixed"))
    int4 = _eval(setup, get_codec("int4"))
    plain = _eval(setup, GroupQuantCodec(QuantSpec(4, 64, "channel"), QuantSpec(4, 64, "token")))
    assert int8_fixed.kl < 1e-4 and int8_fixed.agreement >= 0.85
    # int4's method with 16x finer steps, at the same wire size: the KL over 5x smaller (measured ~20x).
    assert int8.kl < 0.2 * int8_fixed.kl and int8.agreement >= 0.9
    # Pre-RoPE keys with query-weighted widths, sink tokens, Gaussian levels for values and
    # calibrated per-layer widths: plain int4's KL divided by more than 5 (measured ~10).
    assert fixed.kl < 0.2 * plain.kl
    assert fixed.agreement >= 0.6 and fixed.agreement > plain.agreement
    # Entropy-coded steps that give every KV head the same KL share: below the fixed-rate codec's
    # KL (measured ~0.7x over the 63 prompts) at a smaller wire size on a 2,000-token cache.
    assert int4.kl < fixed.kl and int4.agreement >= 0.6


def test_int4_wire_size_on_a_real_cache(setup) -> None:
    """The issue's wire-size target on a real 2,000-token SmolLM2 cache (the accuracy prompts,
    one after another): int4 <= 4.57 bits per value, everything included; int8 no larger than
    the fixed-rate int8."""
    from thunderserve.common.kvcodec import get_codec, pack_cache

    ka, model, tokenizer, _ = setup
    layers = ka.long_prompt_cache(model, tokenizer, ka.load_prompts(), 2000)
    values = sum(k.numel() + v.numel() for k, v in layers)
    # as the replicas send it: int4 leaves the first layer to the decoder (rebuilt from the tokens)
    bits = {name: pack_cache(get_codec(name), layers, rebuild=True)[0].numel() * 8 / values
            for name in ("int4", "int4-fixed", "int8", "int8-fixed")}
    assert bits["int4"] <= 4.57 and bits["int4-fixed"] <= 4.57, bits
    assert bits["int8"] <= bits["int8-fixed"] <= 8.6, bits  # int4's coded part and 4 bits beside it


@pytest.mark.xfail(reason="issue-3 targets not reached: see docs/benchmarks.md 'KV codec'", strict=False)
def test_issue_targets(setup) -> None:
    """The agreement targets, on this quarter of the prompts. (The int4 wire-size target is a
    2,000-token cache's, asserted above: these short prompts are mostly fp16 sink and newest tokens.)"""
    from thunderserve.common.kvcodec import get_codec

    int8 = _eval(setup, get_codec("int8"))
    int4 = _eval(setup, get_codec("int4"))
    assert int8.agreement >= 0.995
    assert int4.agreement >= 0.90
