"""End to end: a colocated replica, which prefills (in chunks between decode steps) and decodes its own
requests with no KV transfer (flips to and from the colocated phase: test_phase_flip.py)."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest
import torch

from thunderserve.common import tracing
from thunderserve.common.client import Client

pytestmark = pytest.mark.slow

BUDGET = 16  # tokens per iteration: every chat prompt here takes several chunks, interleaved with decode steps
CASES = [("What is the capital of France?", 12), ("Write a haiku about the sea.", 16), ("def fibonacci(n):", 16),
         ("Name a color.", 6), ("Who wrote Hamlet?", 9), ("Say hello in Spanish.", 5)]


@pytest.fixture(scope="module")
def colocated(cluster_starter, tmp_path_factory):
    """One colocated SmolLM2 replica and nothing else (no prefill or decode replica), its spans recorded."""
    trace_dir = tmp_path_factory.mktemp("colocated-spans")
    cluster = cluster_starter(model="smollm2", prefill=0, decode=0, colocated=1, token_budget=BUDGET,
                              threads_per_replica=1, extra_env={"THUNDERSERVE_TRACE_DIR": str(trace_dir)})
    cluster.trace_dir = trace_dir
    yield cluster
    cluster.stop()


def _running(cluster) -> int:
    return sum(r["running"] for r in cluster.health()["replicas"])


async def test_a_colocated_replica_alone_serves_generates_tokens(colocated, smollm2_reference):
    """Greedy tokens equal model.generate's, one request at a time and six at once (each prompt's chunks
    then run between the other requests' decode steps); the prompts were prefilled in several chunks."""
    model, tokenizer = smollm2_reference
    health = colocated.health()
    assert (health["status"], health["prefill_replicas"], health["decode_replicas"]) == ("ok", 0, 0)
    expected = {text: smollm2_reference.generate(smollm2_reference.chat_ids(text), n) for text, n in CASES}
    async with Client(colocated.nats_url) as client:
        for text, n in CASES[:2]:
            got = await client.complete(messages=[{"role": "user", "content": text}], max_tokens=n, temperature=0)
            assert got.token_ids == expected[text], text
    api = openai.AsyncOpenAI(base_url=colocated.http_url + "/v1", api_key="unused")

    async def one(text: str, n: int) -> str:
        stream = await api.chat.completions.create(model="SmolLM2-135M-Instruct", max_tokens=n, temperature=0,
                                                   messages=[{"role": "user", "content": text}], stream=True)
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    results = await asyncio.gather(*(one(text, n) for text, n in CASES))
    for (text, _), got in zip(CASES, results, strict=True):
        assert got == tokenizer.decode(expected[text], skip_special_tokens=True), text
    await asyncio.sleep(0.5)  # the replica writes a span once its request ends
    spans = [s for s in tracing.read_spans(colocated.trace_dir) if s["name"] == "colocated.request"]
    assert len(spans) >= len(CASES) + 2
    chunks = [s["attributes"]["prefill_chunks"] for s in spans]
    assert min(chunks) >= 2, chunks  # (the shortest chat prompt has more than 16 tokens)


def test_first_token_endings_logprobs_and_prompt_scoring(colocated, smollm2_reference):
    """What the prefill side decides is decided here too: max_tokens 1 ends at the first token, log-probs are
    the model's, and echo with max_tokens 0 scores the prompt (every position's logits, over the chunks)."""
    model, tokenizer = smollm2_reference
    url = colocated.http_url + "/v1/completions"
    prompt = "The capital of France is Paris, the capital of Italy is Rome, and the capital of Germany is"
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    assert len(ids) > BUDGET
    with torch.inference_mode():
        ref = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
    one = httpx.post(url, timeout=60, json={"prompt": prompt, "max_tokens": 1, "temperature": 0, "logprobs": 0})
    choice = one.json()["choices"][0]
    assert choice["finish_reason"] == "length" and one.json()["usage"]["completion_tokens"] == 1
    assert choice["logprobs"]["token_logprobs"][0] == pytest.approx(ref[-1].max().item(), abs=2e-4)
    scored = httpx.post(url, timeout=60, json={"prompt": prompt, "echo": True, "logprobs": 1, "max_tokens": 0})
    lp = scored.json()["choices"][0]["logprobs"]
    want = [ref[i - 1, ids[i]].item() for i in range(1, len(ids))]
    assert lp["token_logprobs"][0] is None and lp["token_logprobs"][1:] == pytest.approx(want, abs=2e-4)


async def test_a_prompt_that_fails_fails_alone(colocated):
    """A prompt whose prefill fails (a token id past the vocabulary, sent straight to the replica: the router
    would refuse it) ends with an error to its caller, while a request decoding beside it goes on to its end."""
    import nats

    from thunderserve.common import protocol
    from thunderserve.common.protocol import PrefillRequest, SamplingParams, Subjects, TokenChunk

    nc = await nats.connect(colocated.nats_url)
    try:
        chunks: asyncio.Queue = asyncio.Queue()
        inbox = nc.new_inbox()

        async def on_chunk(msg) -> None:
            chunks.put_nowait(protocol.decode(TokenChunk, msg.data))

        await nc.subscribe(inbox, cb=on_chunk)
        async with Client(colocated.nats_url, timeout_s=60) as client:
            beside = asyncio.create_task(client.complete("Count to ten:", max_tokens=24, ignore_eos=True))
            await asyncio.sleep(0.3)
            bad = PrefillRequest("bad-1", [1, 2, 10**9], SamplingParams(max_tokens=4), inbox, "colocated-0", "")
            await nc.publish(Subjects().prefill("colocated-0"), protocol.encode(bad),
                             headers=tracing.headers_for(None))
            failure = await asyncio.wait_for(chunks.get(), 30)
            assert failure.finish_reason == "error" and "prefill failed" in failure.error
            assert len((await beside).token_ids) == 24
            assert len((await client.complete("And now?", max_tokens=4, ignore_eos=True)).token_ids) == 4
    finally:
        await nc.close()


def test_a_dropped_client_frees_its_place_in_the_colocated_batch(colocated):
    body = {"prompt": "Count from one to one thousand:", "max_tokens": 2000, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=60) as http, http.stream("POST", colocated.http_url + "/v1/completions",
                                                       json=body) as resp:
        lines = resp.iter_lines()  # (held: a dropped iterator closes the connection)
        events = []
        for line in lines:
            if line.startswith("data: {"):
                events.append(json.loads(line[6:]))
                if len(events) == 3:
                    break
        deadline = time.monotonic() + 10
        while _running(colocated) < 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _running(colocated) == 1
    deadline = time.monotonic() + 10
    while _running(colocated) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _running(colocated) == 0


async def test_without_a_plan_requests_spread_over_a_pair_and_a_colocated_replica(make_cluster):
    """Beside a prefill/decode pair and with no plan, a colocated replica takes a share of the requests by the
    prompts each entry holds (not its decode batch, which would make it look idle), and both paths give the
    same tokens (KV uncompressed)."""
    cluster = make_cluster(model="tiny-random", prefill=1, decode=1, colocated=1, kv_codec="none",
                           threads_per_replica=1)
    async with Client(cluster.nats_url) as client:
        results = await asyncio.gather(*(client.complete("The same prompt, every time:", max_tokens=24,
                                                         ignore_eos=True, temperature=0) for _ in range(12)))
    assert {tuple(r.token_ids) for r in results} == {tuple(results[0].token_ids)} and len(results[0].token_ids) == 24
    dispatched = {r["id"]: r["dispatched"] for r in cluster.health()["replicas"]}
    assert dispatched["colocated-0"] >= 3 and dispatched["prefill-0"] >= 3, dispatched
    assert dispatched["colocated-0"] + dispatched["prefill-0"] == 12
