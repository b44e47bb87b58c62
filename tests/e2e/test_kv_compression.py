"""KV compression on the real prefill -> decode hop: int8 near-exact, int4 still fluent."""

from __future__ import annotations

import httpx
import pytest
import torch

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


def _prefix_agreement(got: list[int], ref: list[int]) -> float:
    same = 0
    for a, b in zip(got, ref):
        if a != b:
            break
        same += 1
    return same / max(len(ref), 1)


def _reference(model, tokenizer, text: str) -> list[int]:
    ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                        tokenize=True, return_dict=True)["input_ids"]
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids]), max_new_tokens=N, do_sample=False)
    return out[0, len(ids):].tolist()


async def _agreement(cluster, reference, codec: str) -> tuple[float, dict[str, str]]:
    model, tokenizer = reference
    scores, texts = [], {}
    async with Client(cluster.nats_url) as client:
        for text in PROMPTS:
            ref = _reference(model, tokenizer, text)
            got = await client.complete(messages=[{"role": "user", "content": text}], max_tokens=N,
                                        temperature=0, kv_codec=codec)
            scores.append(_prefix_agreement(got.token_ids, ref))
            texts[text] = got.text
    agreement = sum(scores) / len(scores)
    print(f"{codec}: greedy prefix agreement {agreement:.3f} per prompt {[round(x, 2) for x in scores]}")
    return agreement, texts


async def test_int8_is_near_exact(smollm2_cluster, smollm2_reference):
    agreement, _ = await _agreement(smollm2_cluster, smollm2_reference, "int8")
    assert agreement >= 0.95


async def test_int4_stays_fluent(smollm2_cluster, smollm2_reference):
    agreement, texts = await _agreement(smollm2_cluster, smollm2_reference, "int4")
    # measured: 0.555 on these prompts (the previous int4 codec: 0.535; see docs/benchmarks.md "KV codec")
    assert agreement >= 0.45
    assert "Paris" in texts["What is the capital of France?"]
    assert "100" in texts["What is the boiling point of water?"]
    for text in texts.values():  # fluent: words and numbers, not byte soup (a list of numbers may be short)
        assert len(text) >= 10 and sum(c.isalnum() or c.isspace() for c in text) / len(text) > 0.7, text


def test_unknown_codec_is_refused(smollm2_cluster):
    resp = httpx.post(smollm2_cluster.http_url + "/v1/completions",
                      json={"prompt": "hi", "max_tokens": 2, "kv_codec": "zip"}, timeout=30)
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "kv_codec"
