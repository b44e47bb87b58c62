"""KV compression on the real prefill -> decode hop: int8 near-exact, int4 still fluent."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from thunderserve.common.client import Client

pytestmark = pytest.mark.slow

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers.",
    "Explain gravity to a child in two sentences.",
    "What is the boiling point of water?",
    "Give me a tip for learning to code.",
    "Who painted the Mona Lisa?",
    "Describe a cat in one sentence.",
]
N = 32


_REFERENCE: dict[str, tuple] = {}  # prompt -> (ids, full-precision cache, first token, reference tokens)


def _offline(reference, text: str, codec: str) -> tuple[list[int], list[int]]:
    """(reference, codec path) tokens computed in this process on the served hop: the whole prompt
    prefilled in full precision, its first token chosen there, the cache through `codec`. The
    reference does not depend on the codec: it is computed once per prompt."""
    from thunderserve.common import kvaccuracy as ka
    from thunderserve.common.kvcodec import get_codec

    model, tokenizer = reference
    eos = tokenizer.eos_token_id
    if text not in _REFERENCE:
        ids = reference.chat_ids(text)
        layers, first = ka.prefill(model, ids)
        ref = [first, *ka.greedy(model, layers, first, N - 1, eos)] if first != eos else [first]
        _REFERENCE[text] = (ids, layers, first, ref)
    ids, layers, first, ref = _REFERENCE[text]
    compressed, _ = ka.roundtrip(get_codec(codec), layers, model, ids)
    got = [first, *ka.greedy(model, compressed, first, N - 1, eos)] if first != eos else [first]
    return ref, got


async def _agreement(cluster, reference, codec: str) -> tuple[list[float], list[float], dict[str, str]]:
    """Per prompt: the services' prefix agreement with the uncompressed reference, the same
    figure computed offline on the same hop, and the services' texts. The offline figures are
    computed on one worker thread while the services answer, one prompt at a time."""
    from thunderserve.common.kvaccuracy import prefix_length

    model, tokenizer = reference
    loop = asyncio.get_running_loop()
    with ThreadPoolExecutor(1) as worker:
        pending = [loop.run_in_executor(worker, _offline, reference, text, codec) for text in PROMPTS]
        served_ids, texts = [], {}
        async with Client(cluster.nats_url) as client:
            for text in PROMPTS:
                got = await client.complete(messages=[{"role": "user", "content": text}], max_tokens=N,
                                            temperature=0, kv_codec=codec)
                served_ids.append(got.token_ids)
                texts[text] = got.text
        computed = await asyncio.gather(*pending)
    served = [prefix_length(got, ref) / len(ref) for got, (ref, _) in zip(served_ids, computed, strict=True)]
    offline = [prefix_length(got, ref) / len(ref) for ref, got in computed]
    print(f"{codec}: served agreement {sum(served) / len(served):.3f} per prompt {[round(x, 2) for x in served]}; "
          f"offline {[round(x, 2) for x in offline]}")
    return served, offline, texts


def _holds(served: list[float], offline: list[float]) -> None:
    """The agreement figure holds through the real services: prompt by prompt, the replicas
    (their own batched engine, the KV over the channel) diverge where the offline measurement
    does; one prompt may differ, at a near-tie that another attention kernel's rounding flips."""
    same = sum(abs(a - b) < 1e-9 for a, b in zip(served, offline))
    assert same >= len(served) - 1, (served, offline)


async def test_int8_is_near_exact(smollm2_cluster, smollm2_reference):
    served, offline, _ = await _agreement(smollm2_cluster, smollm2_reference, "int8")
    # measured: 0.914, every prompt 1.0 but "List three prime numbers." (0.31, the same offline), a near-tie
    # that int8's 16x finer steps flip and int4's do not; the fixed-rate int8 (20x the KL) agreed on all 8.
    # One near-tie moves the mean by up to 1/8, so the floor leaves room for one.
    assert sum(served) / len(served) >= 0.85
    _holds(served, offline)


async def test_int4_stays_fluent(smollm2_cluster, smollm2_reference):
    served, offline, texts = await _agreement(smollm2_cluster, smollm2_reference, "int4")
    # measured: 0.914 on these prompts with the calibrated transforms (0.688 without them, 0.723 before the
    # first layer was rebuilt; int4-fixed: 0.555), the same per prompt offline (docs/benchmarks.md "KV codec");
    # 8 prompts are few, so the floor is loose
    assert sum(served) / len(served) >= 0.75
    _holds(served, offline)
    assert "Paris" in texts["What is the capital of France?"]
    assert "100" in texts["What is the boiling point of water?"]
    for text in texts.values():  # fluent: words and numbers, not byte soup (a list of numbers may be short)
        assert len(text) >= 10 and sum(c.isalnum() or c.isspace() for c in text) / len(text) > 0.7, text


def test_unknown_codec_is_refused(smollm2_cluster):
    resp = httpx.post(smollm2_cluster.http_url + "/v1/completions",
                      json={"prompt": "hi", "max_tokens": 2, "kv_codec": "zip"}, timeout=30)
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "kv_codec"
