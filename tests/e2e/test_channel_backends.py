"""Both CPU channel transports carry the KV through the real services with identical outputs."""

from __future__ import annotations

import asyncio

import pytest
import torch

from thunderserve.common.client import Client
from thunderserve.common.models import load_model

pytestmark = pytest.mark.slow

PROMPTS = ["The quick brown fox", "Once upon a time", "1, 2, 3, 4,", "def main():"]
N = 12


def _reference(text: str) -> list[int]:
    torch.set_num_threads(1)
    model, tokenizer = load_model("tiny-random")
    ids = tokenizer.encode(text, add_special_tokens=False)
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids]), max_new_tokens=N, min_new_tokens=N, do_sample=False)
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("backend", ["tcp", "gloo"])
async def test_backend_serves_concurrent_requests_exactly(make_cluster, backend):
    cluster = make_cluster(model="tiny-random", threads_per_replica=1, kv_codec="none",
                           extra_env={"THUNDERSERVE_CHANNEL_BACKEND": backend})
    async with Client(cluster.nats_url, timeout_s=60) as client:
        done = await asyncio.gather(*(client.complete(p, max_tokens=N, ignore_eos=True, temperature=0)
                                      for p in PROMPTS))
    assert [d.token_ids for d in done] == [_reference(p) for p in PROMPTS]
