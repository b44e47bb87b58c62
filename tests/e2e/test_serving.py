"""End to end: the real SmolLM2 served through router -> prefill -> KV channel -> decode."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest
import torch

from thunderserve.common.client import Client, ThunderServeError

pytestmark = pytest.mark.slow

PROMPTS = [
    ("What is the capital of France?", 12),
    ("Write a haiku about the sea.", 24),
    ("List three prime numbers.", 7),
    ("Explain gravity to a child in two sentences.", 30),
    ("def fibonacci(n):", 16),
]


def _trim_eos(tokens: list[int], eos: int) -> list[int]:
    return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens


async def test_greedy_matches_generate(smollm2_cluster, smollm2_reference):
    """Token for token equal to in-process model.generate(do_sample=False), KV uncompressed."""
    model, tokenizer = smollm2_reference
    eos = tokenizer.eos_token_id
    async with Client(smollm2_cluster.nats_url) as client:
        for text, n in PROMPTS:
            expected = _trim_eos(smollm2_reference.generate(smollm2_reference.chat_ids(text), n), eos)
            got = await client.complete(messages=[{"role": "user", "content": text}], max_tokens=n, temperature=0)
            assert got.token_ids == expected, text
            assert got.finish_reason == ("stop" if expected[-1] == eos else "length")
            assert got.usage.completion_tokens == len(expected)
            assert got.text == tokenizer.decode(expected, skip_special_tokens=True)
        # a raw completion prompt too (no chat template)
        ids = tokenizer.encode("The three primary colors are", add_special_tokens=False)
        expected = _trim_eos(smollm2_reference.generate(ids, 20), eos)
        got = await client.complete("The three primary colors are", max_tokens=20, temperature=0)
        assert got.token_ids == expected


async def test_penalties_match_an_in_process_greedy_loop(smollm2_cluster, smollm2_reference):
    """presence/frequency penalties through the services (the first token on prefill, the rest on decode)
    give the tokens of an in-process greedy loop that applies them, and differ from plain greedy."""
    from thunderserve.common.protocol import SamplingParams
    from thunderserve.common.sequence import sample_token

    model, tokenizer = smollm2_reference
    text, n = "List the days of the week, then list them again.", 24
    ids = smollm2_reference.chat_ids(text)
    params = SamplingParams(max_tokens=n, temperature=0, frequency_penalty=2.0, presence_penalty=2.0)
    expected: list[int] = []
    with torch.inference_mode():
        for step in range(n):
            logits = model(torch.tensor([ids + expected])).logits[0, -1]
            expected.append(sample_token(logits, params, step, frozenset(), expected))
    expected = _trim_eos(expected, tokenizer.eos_token_id)
    async with Client(smollm2_cluster.nats_url) as client:
        got = await client.complete(messages=[{"role": "user", "content": text}], max_tokens=n, temperature=0,
                                    frequency_penalty=2.0, presence_penalty=2.0)
        plain = await client.complete(messages=[{"role": "user", "content": text}], max_tokens=n, temperature=0)
    assert got.token_ids == expected
    assert got.token_ids != plain.token_ids


async def test_logprobs_are_the_models(smollm2_cluster, smollm2_reference):
    """Each generated token's log-probability and its top alternatives, over HTTP (completions and chat,
    whole and streamed) and the SDK, equal the reference model's log-softmax at that step (KV uncompressed)."""
    model, tokenizer = smollm2_reference
    prompt, n = "The capital of France is", 6
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    expected = smollm2_reference.generate(ids, n)
    with torch.inference_mode():
        logits = model(torch.tensor([ids + expected])).logits[0, len(ids) - 1:-1]
    ref = torch.log_softmax(logits.float(), dim=-1)
    ref_top = torch.topk(ref, 3)

    http = httpx.post(smollm2_cluster.http_url + "/v1/completions", timeout=60, json={
        "prompt": prompt, "max_tokens": n, "temperature": 0, "ignore_eos": True, "logprobs": 3}).json()
    lp = http["choices"][0]["logprobs"]
    assert lp["tokens"] == [tokenizer.decode([t]) for t in expected]
    assert lp["token_logprobs"] == pytest.approx(ref[range(n), expected].tolist(), abs=2e-4)
    for step, top in enumerate(lp["top_logprobs"]):
        want = {tokenizer.decode([t]): v for t, v in zip(ref_top.indices[step].tolist(), ref_top.values[step].tolist())}
        assert top.keys() == want.keys() and list(top.values()) == pytest.approx(list(want.values()), abs=2e-4)
    assert lp["text_offset"][0] == 0 and lp["text_offset"][1] == len(lp["tokens"][0])

    chat_body = {"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 5, "temperature": 0,
                 "logprobs": True, "top_logprobs": 2}
    whole = httpx.post(smollm2_cluster.http_url + "/v1/chat/completions", json=chat_body, timeout=60).json()
    content = whole["choices"][0]["logprobs"]["content"]
    assert len(content) == whole["usage"]["completion_tokens"] and all(len(c["top_logprobs"]) == 2 for c in content)
    assert all(c["logprob"] <= 0 and c["bytes"] == list(c["token"].encode()) for c in content)
    streamed = []
    with httpx.stream("POST", smollm2_cluster.http_url + "/v1/chat/completions", timeout=60,
                      json={**chat_body, "stream": True}) as resp:
        for line in resp.iter_lines():
            if line.startswith("data: {"):
                choice = (json.loads(line[6:])["choices"] or [{}])[0]
                streamed += (choice.get("logprobs") or {}).get("content", [])
    assert [c["logprob"] for c in streamed] == pytest.approx([c["logprob"] for c in content], abs=1e-6)

    async with Client(smollm2_cluster.nats_url) as client:
        got = await client.complete(prompt, max_tokens=n, temperature=0, ignore_eos=True, logprobs=0)
    assert [x.token_id for x in got.logprobs] == got.token_ids == expected
    assert [x.logprob for x in got.logprobs] == pytest.approx(ref[range(n), expected].tolist(), abs=2e-4)
    assert all(x.top == {} for x in got.logprobs)


def test_openai_sdk(smollm2_cluster, smollm2_reference):
    _, tokenizer = smollm2_reference
    client = openai.OpenAI(base_url=smollm2_cluster.http_url + "/v1", api_key="unused")
    models = client.models.list()
    model = models.data[0].id
    assert model == "SmolLM2-135M-Instruct"

    chat = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=12, temperature=0)
    assert "Paris" in chat.choices[0].message.content
    assert chat.usage.completion_tokens >= 1
    assert chat.usage.prompt_tokens == len(smollm2_reference.chat_ids("What is the capital of France?"))

    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=12, temperature=0, stream=True, stream_options={"include_usage": True})
    parts, usage, finish = [], None, None
    for event in stream:
        if event.usage is not None:
            usage = event.usage
        for choice in event.choices:
            parts.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert "".join(parts) == chat.choices[0].message.content
    assert usage is not None and usage.completion_tokens == chat.usage.completion_tokens
    assert finish == chat.choices[0].finish_reason

    comp = client.completions.create(model=model, prompt="The capital of Germany is", max_tokens=8, temperature=0)
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(model=model, prompt="The capital of Germany is", max_tokens=8,
                                           temperature=0, stream=True)
        if c.choices
    )
    assert comp.choices[0].text == streamed
    assert comp.usage.completion_tokens == 8 and comp.choices[0].finish_reason == "length"


async def test_concurrent_streams_are_independent(smollm2_cluster, smollm2_reference):
    """8 streamed requests at once, different prompts and lengths: each gets its own right output."""
    model, tokenizer = smollm2_reference
    cases = [
        ("Name a color.", 6), ("What is 2 plus 2?", 10), ("Write a short poem about cats.", 28),
        ("Who wrote Hamlet?", 9), ("Give me a synonym for happy.", 14), ("Describe the moon.", 22),
        ("What is Python?", 18), ("Say hello in Spanish.", 5),
    ]
    generate, chat_ids = smollm2_reference.generate, smollm2_reference.chat_ids
    expected = {text: tokenizer.decode(generate(chat_ids(text), n), skip_special_tokens=True) for text, n in cases}
    client = openai.AsyncOpenAI(base_url=smollm2_cluster.http_url + "/v1", api_key="unused")

    async def one(text: str, n: int) -> str:
        stream = await client.chat.completions.create(
            model="SmolLM2-135M-Instruct", messages=[{"role": "user", "content": text}], max_tokens=n,
            temperature=0, stream=True)
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    results = await asyncio.gather(*(one(t, n) for t, n in cases))
    for (text, _), got in zip(cases, results):
        assert got == expected[text], text


BAD_REQUESTS = [
    ("/v1/completions", b"{not json", "JSON"),
    ("/v1/completions", b"", "no body"),
    ("/v1/completions", b"[1, 2]", "JSON object"),
    ("/v1/completions", {"max_tokens": 4}, "prompt"),
    ("/v1/completions", {"prompt": 42}, "prompt"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": "many"}, "max_tokens"),
    ("/v1/completions", {"prompt": ""}, "empty"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": -3}, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 10_000_000}, "context"),
    ("/v1/completions", {"prompt": "hello " * 9000, "max_tokens": 4}, "context"),
    ("/v1/completions", {"prompt": "hi", "model": "gpt-5"}, "gpt-5"),
    ("/v1/completions", {"prompt": "hi", "n": 17}, "n"),
    ("/v1/completions", {"prompt": "hi", "n": 0}, "n"),
    ("/v1/completions", {"prompt": "hi", "temperature": "hot"}, "temperature"),
    ("/v1/completions", {"prompt": "hi", "temperature": 5}, "temperature"),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {"abc": 1}}, "logit_bias"),
    ("/v1/completions", {"prompt": "hi", "presence_penalty": 3}, "presence_penalty"),
    ("/v1/completions", {"prompt": "hi", "logprobs": 50}, "logprobs"),
    ("/v1/completions", {"prompt": "hi", "best_of": 3}, "best_of"),
    ("/v1/completions", {"prompt": "hi", "suffix": "end"}, "suffix"),
    ("/v1/completions", {"prompt": "hi", "repetition_penalty": 1.2}, "repetition_penalty"),
    ("/v1/completions", {"prompt": "hi", "top_k": -2}, "top_k"),
    ("/v1/completions", {"prompt": "hi", "min_p": 1.5}, "min_p"),
    ("/v1/completions", {"prompt": "hi", "stop_token_ids": [10**9]}, "stop_token_ids"),
    ("/v1/completions", {"prompt": "hi", "seed": 2**64}, "seed"),  # past 64 bits (was a 500)
    ("/v1/completions", {"prompt": "hi", "seed": 2**64, "n": 2}, "seed"),
    ("/v1/completions", {"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ("/v1/completions", {"prompt": "hi", "stop": ""}, "stop"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]}]}, "image_url"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                              "response_format": {"type": "json_object"}}, "response_format"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                              "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, "top_logprobs"),
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, "messages"),
    ("/v1/chat/completions", {"messages": "hi"}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "stream": "yes"}, "stream"),
]


@pytest.mark.parametrize(("path", "body", "mentions"), BAD_REQUESTS)
def test_bad_input_gets_clear_4xx(smollm2_cluster, path, body, mentions):
    url = smollm2_cluster.http_url + path
    if isinstance(body, bytes):
        resp = httpx.post(url, content=body, headers={"content-type": "application/json"}, timeout=30)
    else:
        resp = httpx.post(url, json=body, timeout=30)
    assert 400 <= resp.status_code < 500, resp.text
    error = resp.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert mentions.lower() in error["message"].lower() or mentions == error.get("param")
    # ... and the service keeps serving
    ok = httpx.post(smollm2_cluster.http_url + "/v1/completions",
                    json={"prompt": "Hi", "max_tokens": 2, "temperature": 0}, timeout=60)
    assert ok.status_code == 200


def _decode_running(cluster) -> int:
    health = cluster.health() or {}
    return sum(r["running"] + r["waiting"] for r in health.get("replicas", []) if r["phase"] == "decode")


@pytest.mark.parametrize("n", [1, 2])
def test_client_disconnect_frees_its_batch_slot(smollm2_cluster, n):
    body = {"prompt": "Count from one to one thousand:", "max_tokens": 2000, "ignore_eos": True, "stream": True,
            "n": n}
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", smollm2_cluster.http_url + "/v1/completions", json=body) as resp:
            assert resp.status_code == 200
            events = []
            # Keep a reference to the iterator: a dropped one is closed, and with it the connection.
            lines = resp.iter_lines()
            while len(events) < 3:
                line = next(lines)
                if line.startswith("data: {"):
                    events.append(json.loads(line[6:]))
            assert len(events) == 3 and not any("error" in e for e in events), events
            deadline = time.monotonic() + 10
            while _decode_running(smollm2_cluster) < n and time.monotonic() < deadline:
                time.sleep(0.1)
            assert _decode_running(smollm2_cluster) == n, smollm2_cluster.health()["replicas"]
    # the connection is closed: the decode replica must drop the sequence
    deadline = time.monotonic() + 10
    while _decode_running(smollm2_cluster) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _decode_running(smollm2_cluster) == 0


async def test_sdk_reports_bad_input(smollm2_cluster):
    async with Client(smollm2_cluster.nats_url) as client:
        with pytest.raises(ThunderServeError) as err:
            await client.complete("hi", max_tokens=0)
        assert err.value.status == 400
        with pytest.raises(ThunderServeError) as err:
            await client.complete("hi", model="not-a-model")
        assert err.value.status == 404
        # the same checks as over HTTP (RouterCore.check_request): five stop strings were once taken here
        for bad in ({"temperature": -1.0}, {"top_k": -1}, {"min_p": 2.0}, {"stop": list("abcde")}):
            with pytest.raises(ThunderServeError) as err:
                await client.complete("hi", max_tokens=2, **bad)
            assert err.value.status == 400 and next(iter(bad)) in str(err.value)
        with pytest.raises(ValueError, match="seed must be a 64-bit integer"):  # msgpack could not carry it
            await client.complete("hi", max_tokens=2, seed=1 << 64)
        # chat messages under the HTTP API's rules, so one conversation is one prompt whichever way it comes:
        # before, the SDK's took any role, failed on text parts and kept "developer" out of the system turn
        for bad in ([{"role": "wizard", "content": "hi"}], [{"role": "user", "content": [{"type": "image_url"}]}]):
            with pytest.raises(ThunderServeError) as err:
                await client.complete(messages=bad, max_tokens=2)
            assert err.value.status == 400 and "messages.0" in str(err.value)
        chat = [{"role": "developer", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Hi!"}]}]
        sdk = await client.complete(messages=chat, max_tokens=1)
        http = httpx.post(smollm2_cluster.http_url + "/v1/chat/completions", timeout=60,
                          json={"messages": chat, "max_tokens": 1}).json()
        assert sdk.usage.prompt_tokens == http["usage"]["prompt_tokens"]
        chunks = [c async for c in client.stream("Once upon a time", max_tokens=5, temperature=0)]
        assert chunks[-1].finish_reason == "length" and sum(len(c.token_ids) for c in chunks) == 5


async def test_top_k_and_stop_token_ids_reach_both_phases(smollm2_cluster, smollm2_reference):
    """top_k=1 samples the most likely token at any temperature: the greedy tokens, on the prefill's
    first token and decode's after it. A stop token id ends the request where it is generated."""
    model, tokenizer = smollm2_reference
    prompt = "The three primary colours are"
    expected = smollm2_reference.generate(tokenizer.encode(prompt, add_special_tokens=False), 12)
    async with Client(smollm2_cluster.nats_url) as client:
        sampled = await client.complete(prompt, max_tokens=12, temperature=1.5, top_k=1, seed=1, ignore_eos=True)
        assert sampled.token_ids == expected
        stop_at = next(i for i in range(1, 12) if expected[i] not in expected[:i])
        stopped = await client.complete(prompt, max_tokens=12, temperature=0, stop_token_ids=[expected[stop_at]])
        assert stopped.finish_reason == "stop" and stopped.token_ids == expected[:stop_at + 1]


async def test_requests_that_end_on_their_first_token(smollm2_cluster, smollm2_reference):
    """Finished at prefill (no KV moves): max_tokens=1, or EOS forced by logit_bias."""
    model, tokenizer = smollm2_reference
    async with Client(smollm2_cluster.nats_url) as client:
        one = await client.complete("The capital of France is", max_tokens=1, temperature=0)
        expected = smollm2_reference.generate(tokenizer.encode("The capital of France is", add_special_tokens=False), 1)
        assert one.token_ids == expected and one.finish_reason == "length"
        eos = await client.complete("Hello", max_tokens=10, logit_bias={tokenizer.eos_token_id: 100.0})
        assert eos.finish_reason == "stop" and eos.text == "" and eos.usage.completion_tokens == 1


async def test_requests_past_the_inflight_limit_get_a_429_to_retry(make_cluster):
    cluster = make_cluster(model="tiny-random", threads_per_replica=1, extra_env={"THUNDERSERVE_MAX_INFLIGHT": "2"})
    body = {"prompt": "Count:", "max_tokens": 400, "ignore_eos": True, "stream": True}
    async with httpx.AsyncClient(timeout=60) as http, Client(cluster.nats_url) as client:
        async def stream() -> int:
            async with http.stream("POST", cluster.http_url + "/v1/completions", json=body) as resp:
                return sum([line.startswith("data: {") async for line in resp.aiter_lines()])

        running = [asyncio.create_task(stream()) for _ in range(2)]
        deadline = time.monotonic() + 20
        while (cluster.health() or {}).get("in_flight", 0) < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        extra = await http.post(cluster.http_url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2})
        assert extra.status_code == 429 and extra.headers["retry-after"] == "1"
        assert "limit of 2 requests in flight" in extra.json()["error"]["message"]
        with pytest.raises(ThunderServeError) as err:
            await client.complete("Hi", max_tokens=2)
        assert err.value.status == 429
        assert all(n > 0 for n in await asyncio.gather(*running))  # the two in flight were not disturbed
        again = await http.post(cluster.http_url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2})
        assert again.status_code == 200


def test_n_choices_are_the_seeded_requests_one_by_one(smollm2_cluster):
    """n choices, whole and streamed: choice i is what the same request with seed + i gives alone; the
    usage counts the prompt once and every choice's tokens."""
    url = smollm2_cluster.http_url
    body = {"prompt": "Once upon a time", "max_tokens": 6, "temperature": 1.0, "seed": 5, "ignore_eos": True}
    with httpx.Client(timeout=60) as http:
        whole = http.post(url + "/v1/completions", json={**body, "n": 3}).json()
        alone = [http.post(url + "/v1/completions", json={**body, "seed": 5 + i}).json() for i in range(3)]
        assert [c["index"] for c in whole["choices"]] == [0, 1, 2]
        assert [c["text"] for c in whole["choices"]] == [a["choices"][0]["text"] for a in alone]
        assert len({c["text"] for c in whole["choices"]}) > 1  # the seeds differ, so do the choices
        prompt_tokens = alone[0]["usage"]["prompt_tokens"]
        assert whole["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": 18,
                                  "total_tokens": prompt_tokens + 18}
        # the largest seed's next choice wraps round to the smallest seed, still a 64-bit integer
        top = http.post(url + "/v1/completions", json={**body, "seed": 2**63 - 1, "n": 2}).json()
        bottom = http.post(url + "/v1/completions", json={**body, "seed": -2**63}).json()
        assert top["choices"][1]["text"] == bottom["choices"][0]["text"]

        chat = {"messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 5, "temperature": 1.0,
                "seed": 9, "n": 2, "stream": True, "stream_options": {"include_usage": True}}
        texts, roles, finishes, usage = {0: "", 1: ""}, [], [], None
        with http.stream("POST", url + "/v1/chat/completions", json=chat) as resp:
            for line in resp.iter_lines():
                if not line.startswith("data: {"):
                    continue
                event = json.loads(line[6:])
                if event.get("usage"):
                    usage = event["usage"]
                for choice in event["choices"]:
                    texts[choice["index"]] += choice["delta"].get("content", "")
                    roles += [choice["index"]] if choice["delta"].get("role") else []
                    finishes += [choice["index"]] if choice["finish_reason"] else []
        assert sorted(roles) == [0, 1] and sorted(finishes) == [0, 1]  # each choice starts and ends once
        singles = [http.post(url + "/v1/chat/completions", json={**chat, "n": 1, "stream": False, "seed": 9 + i}
                             ).json() for i in range(2)]
        assert [texts[0], texts[1]] == [one["choices"][0]["message"]["content"] for one in singles]
        assert usage["completion_tokens"] == sum(one["usage"]["completion_tokens"] for one in singles)


def test_metrics_time_the_first_token_the_gaps_and_the_request(smollm2_cluster):
    def counts() -> dict[str, float]:
        text = httpx.get(smollm2_cluster.http_url + "/metrics", timeout=10).text
        return {name: float(value) for name, value in (line.split() for line in text.splitlines()
                                                        if line and not line.startswith("#"))}

    before = counts()
    t0 = time.monotonic()
    resp = httpx.post(smollm2_cluster.http_url + "/v1/completions", timeout=60,
                      json={"prompt": "Hello", "max_tokens": 5, "temperature": 0, "ignore_eos": True})
    took = time.monotonic() - t0
    assert resp.status_code == 200
    after = counts()
    delta = {k: after[k] - before.get(k, 0.0) for k in after}
    assert delta["thunderserve_time_to_first_token_seconds_count"] == 1
    assert delta["thunderserve_inter_token_latency_seconds_count"] == 4
    assert delta["thunderserve_e2e_request_latency_seconds_count"] == 1
    ttft = delta["thunderserve_time_to_first_token_seconds_sum"]
    e2e = delta["thunderserve_e2e_request_latency_seconds_sum"]
    assert 0 < ttft < e2e <= took
    assert delta['thunderserve_e2e_request_latency_seconds_bucket{le="+Inf"}'] == 1


def test_an_api_key_guards_the_api_but_not_health_or_metrics(make_cluster):
    cluster = make_cluster(model="tiny-random", threads_per_replica=1, extra_env={"THUNDERSERVE_API_KEY": "sekret"})
    url, body = cluster.http_url, {"prompt": "Hi", "max_tokens": 2}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekret"}):
        resp = httpx.post(url + "/v1/completions", json=body, headers=headers, timeout=30)
        assert resp.status_code == 401 and resp.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(url + "/v1/models", timeout=10).status_code == 401
    assert httpx.post(url + "/tokenize", json={"prompt": "x"}, timeout=10).status_code == 401
    ok = httpx.post(url + "/v1/completions", json=body, headers={"Authorization": "Bearer sekret"}, timeout=30)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2
    assert httpx.get(url + "/health", timeout=10).status_code == 200
    assert httpx.get(url + "/metrics", timeout=10).status_code == 200


def test_echo_scores_the_prompt_as_the_model_does(smollm2_cluster, smollm2_reference):
    """echo + logprobs (what evaluation harnesses send to score text): the prompt comes back with each
    token's log-probability under the reference model, then the completion; max_tokens 0 scores only."""
    model, tokenizer = smollm2_reference
    prompt = "The capital of France is Paris"
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    with torch.inference_mode():
        ref = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
    want = [ref[i - 1, ids[i]].item() for i in range(1, len(ids))]
    url = smollm2_cluster.http_url + "/v1/completions"
    scored = httpx.post(url, timeout=60, json={"prompt": prompt, "echo": True, "logprobs": 2, "max_tokens": 0}).json()
    choice = scored["choices"][0]
    assert choice["text"] == prompt and choice["finish_reason"] == "length"
    assert scored["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 0, "total_tokens": len(ids)}
    lp = choice["logprobs"]
    assert lp["tokens"] == [tokenizer.decode([t]) for t in ids]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert lp["token_logprobs"][1:] == pytest.approx(want, abs=2e-4)
    top = torch.topk(ref[0], 2)
    assert lp["top_logprobs"][1] == pytest.approx(
        {tokenizer.decode([t]): v for t, v in zip(top.indices.tolist(), top.values.tolist())}, abs=2e-4)

    body = {"prompt": prompt, "echo": True, "logprobs": 0, "max_tokens": 3, "temperature": 0, "ignore_eos": True}
    both = httpx.post(url, timeout=60, json=body).json()["choices"][0]
    plain = httpx.post(url, timeout=60, json={**body, "echo": False}).json()["choices"][0]
    assert both["text"] == prompt + plain["text"]
    assert both["logprobs"]["tokens"] == lp["tokens"] + plain["logprobs"]["tokens"]
    # (the same up to float rounding: scoring every position runs the LM head over all rows at once)
    assert both["logprobs"]["token_logprobs"][len(ids):] == pytest.approx(plain["logprobs"]["token_logprobs"],
                                                                           abs=1e-4)
    offsets = both["logprobs"]["text_offset"]
    assert offsets[0] == 0 and offsets == sorted(offsets) and offsets[len(ids)] == len("".join(lp["tokens"]))

    with httpx.stream("POST", url, timeout=60, json={**body, "stream": True}) as resp:
        events = [json.loads(line[6:]) for line in resp.iter_lines() if line.startswith("data: {")]
    assert events[0]["choices"][0]["text"] == prompt
    assert "".join(e["choices"][0]["text"] for e in events) == both["text"]

    too_big = httpx.post(url, timeout=60, json={"prompt": "word " * 4000, "echo": True, "logprobs": 20,
                                                 "max_tokens": 0})
    assert too_big.status_code == 400 and "too large" in too_big.json()["error"]["message"]
    no_echo = httpx.post(url, timeout=60, json={"prompt": prompt, "max_tokens": 0})
    assert no_echo.status_code == 400 and "max_tokens" in no_echo.json()["error"]["message"]


async def test_the_sdk_scores_a_prompt(smollm2_cluster, smollm2_reference):
    model, tokenizer = smollm2_reference
    prompt = "Water boils at one hundred degrees"
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    with torch.inference_mode():
        ref = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
    async with Client(smollm2_cluster.nats_url) as client:
        result = await client.complete(prompt, max_tokens=0, prompt_logprobs=0)
    assert result.token_ids == [] and result.finish_reason == "length"
    assert [lp.token_id for lp in result.prompt_logprobs] == ids[1:]
    assert [lp.logprob for lp in result.prompt_logprobs] == pytest.approx(
        [ref[i - 1, ids[i]].item() for i in range(1, len(ids))], abs=2e-4)


def test_tokenize_and_detokenize(smollm2_cluster, smollm2_reference):
    _, tokenizer = smollm2_reference
    url = smollm2_cluster.http_url
    text = "Hello, world!"
    got = httpx.post(url + "/tokenize", json={"prompt": text}, timeout=30).json()
    assert got["tokens"] == tokenizer.encode(text, add_special_tokens=False) and got["count"] == len(got["tokens"])
    assert got["max_model_len"] == 8192
    chat = httpx.post(url + "/tokenize", json={"messages": [{"role": "user", "content": text}]}, timeout=30).json()
    reply = httpx.post(url + "/v1/chat/completions", timeout=60, json={
        "messages": [{"role": "user", "content": text}], "max_tokens": 1}).json()
    assert chat["count"] == reply["usage"]["prompt_tokens"] > got["count"]  # what the chat request prefills
    back = httpx.post(url + "/detokenize", json={"tokens": got["tokens"]}, timeout=30).json()
    assert back == {"prompt": text}
    both = {"prompt": "a", "messages": [{"role": "user", "content": "b"}]}
    for path, body in (("/tokenize", {}), ("/tokenize", both), ("/tokenize", {"messages": []}),
                       ("/detokenize", {"tokens": [-1]}), ("/detokenize", {"tokens": "abc"})):
        resp = httpx.post(url + path, json=body, timeout=30)
        assert resp.status_code == 400 and resp.json()["error"]["message"], (path, body, resp.text)


def test_several_prompts_in_one_completions_request(smollm2_cluster, smollm2_reference):
    """A list of prompts (texts or token ids), n choices each: choice prompt * n + i is what that prompt
    alone gives with seed + i; echo puts each choice's own prompt first."""
    _, tokenizer = smollm2_reference
    url = smollm2_cluster.http_url + "/v1/completions"
    prompts = ["The sky is", "Two plus two is"]
    base = {"max_tokens": 4, "temperature": 1.0, "seed": 3, "ignore_eos": True}
    many = httpx.post(url, timeout=60, json={**base, "prompt": prompts, "n": 2, "echo": True}).json()
    assert [c["index"] for c in many["choices"]] == [0, 1, 2, 3]
    for p, prompt in enumerate(prompts):
        for i in range(2):
            alone = httpx.post(url, timeout=60, json={**base, "prompt": prompt, "seed": 3 + i}).json()
            assert many["choices"][p * 2 + i]["text"] == prompt + alone["choices"][0]["text"]
    prompt_tokens = sum(len(tokenizer.encode(p, add_special_tokens=False)) for p in prompts)
    assert many["usage"]["prompt_tokens"] == prompt_tokens and many["usage"]["completion_tokens"] == 16
    ids = [tokenizer.encode(p, add_special_tokens=False) for p in prompts]
    as_ids = httpx.post(url, timeout=60, json={**base, "prompt": ids}).json()
    assert [c["text"] for c in as_ids["choices"]] == [many["choices"][0]["text"][len(prompts[0]):],
                                                      many["choices"][2]["text"][len(prompts[1]):]]
    scored = httpx.post(url, timeout=60, json={"prompt": prompts, "echo": True, "logprobs": 0, "max_tokens": 0,
                                               "stream": True})
    texts = [json.loads(line[6:])["choices"][0] for line in scored.text.splitlines()
             if line.startswith("data: {") and json.loads(line[6:])["choices"]]
    echoed = {c["index"]: c for c in texts if c["text"]}
    assert {i: c["text"] for i, c in echoed.items()} == {0: prompts[0], 1: prompts[1]}
    assert [len(echoed[i]["logprobs"]["tokens"]) for i in (0, 1)] == [len(x) for x in ids]
    too_many = httpx.post(url, timeout=60, json={"prompt": ["x"] * 20, "n": 8})
    assert too_many.status_code == 400 and "choices in one request" in too_many.json()["error"]["message"]
