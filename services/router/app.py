"""The HTTP front end: OpenAI-compatible completions and chat, models, health and metrics."""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from thunderserve.common import tracing
from thunderserve.common.protocol import SamplingParams, TokenChunk, Usage
from thunderserve.router.core import RequestError, RouterCore
from thunderserve.router.natsapi import NatsEntry
from thunderserve.router.openai_schema import (
    ChatBody,
    CompletionBody,
    DetokenizeBody,
    ResponseBuilder,
    TokenizeBody,
    error_body,
    validation_message,
)

log = logging.getLogger(__name__)

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
OPEN_PATHS = frozenset({"/health", "/metrics"})  # answered without the API key


def _error(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    # A client told to come back (overloaded, no replica yet) learns when: one second is a replica's heartbeat or two.
    headers = {"Retry-After": "1"} if status in (429, 503) else None
    return JSONResponse(error_body(message, status, param, code), status_code=status, headers=headers)


def create_app(core: RouterCore, drain_timeout_s: float = 0.0, api_key: str | None = None) -> FastAPI:
    """`api_key`: the /v1 endpoints want `Authorization: Bearer <api_key>` (None: open to all)."""
    entry = NatsEntry(core)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await core.start()
        await entry.start()
        try:
            yield
        finally:
            # HTTP streams have drained (uvicorn waited for them); the SDK's get the same chance
            await core.drain(drain_timeout_s)
            await entry.stop()
            await core.stop()

    app = FastAPI(title="ThunderServe router", lifespan=lifespan)
    app.state.core = core

    if api_key:
        expected = f"Bearer {api_key}".encode()

        @app.middleware("http")
        async def _authorized(request: Request, call_next):
            # /health and /metrics stay open (probes and scrapers); the API needs the key
            given = request.headers.get("authorization", "").encode()
            if request.url.path not in OPEN_PATHS and not hmac.compare_digest(given, expected):
                return _error(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                              code="invalid_api_key")
            return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def _on_invalid(request: Request, exc: RequestValidationError):
        message, param = validation_message(exc.errors())
        return _error(400, message, param)

    @app.exception_handler(StarletteHTTPException)
    async def _on_http(request: Request, exc: StarletteHTTPException):
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestError)
    async def _on_request_error(request: Request, exc: RequestError):
        return _error(exc.status, exc.message, exc.param, exc.code)

    @app.exception_handler(Exception)
    async def _on_unexpected(request: Request, exc: Exception):
        log.exception("unexpected error")
        return _error(500, f"internal error: {type(exc).__name__}")

    @app.get("/health")
    async def health():
        body = core.health()
        return JSONResponse(body, status_code=200 if body["status"] == "ok" else 503)

    @app.get("/v1/models")
    async def models():
        return {
            "object": "list",
            "data": [{"id": core.model_name, "object": "model", "created": 0, "owned_by": "thunderserve"}],
        }

    @app.get("/metrics")
    async def metrics():
        s = core.stats
        lines = [
            "# TYPE thunderserve_requests_total counter",
            f"thunderserve_requests_total {s.requests}",
            "# TYPE thunderserve_request_errors_total counter",
            f"thunderserve_request_errors_total {s.errors}",
            "# TYPE thunderserve_requests_rejected_total counter",
            f"thunderserve_requests_rejected_total {s.rejected}",
            "# TYPE thunderserve_requests_resumed_total counter",
            f"thunderserve_requests_resumed_total {s.resumed}",
            "# TYPE thunderserve_sdk_replays_total counter",
            f"thunderserve_sdk_replays_total {s.replays}",
            "# TYPE thunderserve_prompt_tokens_total counter",
            f"thunderserve_prompt_tokens_total {s.prompt_tokens}",
            "# TYPE thunderserve_completion_tokens_total counter",
            f"thunderserve_completion_tokens_total {s.completion_tokens}",
            "# TYPE thunderserve_requests_in_flight gauge",
            f"thunderserve_requests_in_flight {len(core.inflight)}",
        ]
        for phase in ("prefill", "decode", "colocated"):
            lines.append(f'thunderserve_replicas_ready{{phase="{phase}"}} {len(core.replicas.ready(phase))}')
        lines += core.latency.render()
        return PlainTextResponse("\n".join(lines) + "\n")

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, request: Request):
        core.check_model(body.model)
        vocab = len(core.tokenizer)
        prompts, prompt_ids = body.prompts(), []
        for prompt in prompts:
            ids = core.tokenize_prompt(prompt) if isinstance(prompt, str) else list(prompt)
            if any(not 0 <= t < vocab for t in ids):
                raise RequestError(400, f"prompt token ids must be in [0, {vocab})", param="prompt")
            prompt_ids.append(ids)
        sampling = body.sampling(COMPLETIONS_DEFAULT_MAX_TOKENS)
        echo = None
        if body.echo:  # per prompt: its text as given (or decoded from its ids), and its ids
            echo = [(p if isinstance(p, str) else core.tokenizer.decode(ids), ids)
                    for p, ids in zip(prompts, prompt_ids)]
        return await _serve(core, request, prompt_ids, sampling, body, chat=False, echo=echo)

    @app.post("/tokenize")
    async def tokenize(body: TokenizeBody):
        """The token ids the server would prefill for a prompt or a chat, and the room left after them."""
        ids = core.tokenize_prompt(body.prompt) if body.prompt is not None else core.tokenize_chat(body.chat())
        return {"tokens": ids, "count": len(ids), "max_model_len": core.max_context}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeBody):
        vocab = len(core.tokenizer)
        if any(not 0 <= t < vocab for t in body.tokens):
            raise RequestError(400, f"token ids must be in [0, {vocab})", param="tokens")
        return {"prompt": core.tokenizer.decode(body.tokens)}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatBody, request: Request):
        core.check_model(body.model)
        prompt_ids = core.tokenize_chat(body.chat())
        # Chat has no fixed default: generate until the model stops or the context is full.
        sampling = body.sampling(max(core.max_context - len(prompt_ids), 1))
        return await _serve(core, request, [prompt_ids], sampling, body, chat=True)

    return app


async def _serve(core: RouterCore, request: Request, prompt_ids: list[list[int]], sampling, body, chat: bool,
                 echo: list[tuple[str, list[int]]] | None = None):
    """Serve `body.n` choices of each prompt in `prompt_ids` (choice index = prompt * n + i);
    `echo`: each prompt's (text, ids) to put first."""
    parent = request.headers.get(tracing.TRACEPARENT)
    flights = await _submit_choices(core, prompt_ids, sampling, body.n, parent, body.kv_codec)
    echo_per_choice = [e for e in echo for _ in range(body.n)] if echo is not None else None
    builder = ResponseBuilder(flights[0].request_id, core.model_name, chat, core.tokenizer, echo=echo_per_choice)
    show_prompt_logprobs = echo is not None and body.logprobs is not None
    if body.stream:
        return StreamingResponse(
            _sse(core, flights, builder, body.include_usage, show_prompt_logprobs,
                 sum(len(ids) for ids in prompt_ids)),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Request-Id": flights[0].request_id},
        )
    parts: list[list[str]] = [[] for _ in flights]
    logprobs: list[list] = [[] for _ in flights]
    last: list[TokenChunk | None] = [None] * len(flights)
    prompt_logprobs: list[list | None] = [None] * len(flights)
    async for index, chunk in _choice_events(core, flights):
        if chunk.finish_reason == "error":
            return _error(503, chunk.error, code="replica_failure")
        if show_prompt_logprobs and prompt_logprobs[index] is None and chunk.index == 0:
            prompt_logprobs[index] = chunk.prompt_logprobs
        parts[index].append(chunk.text)
        logprobs[index] += chunk.logprobs
        last[index] = chunk
    if any(chunk is None for chunk in last):
        return _error(503, "request ended without output", code="replica_failure")
    choices = [("".join(p), chunk.finish_reason, lp) for p, chunk, lp in zip(parts, last, logprobs)]
    usage = Usage(sum(len(ids) for ids in prompt_ids), sum(chunk.usage.completion_tokens for chunk in last
                                                             if chunk.usage is not None))
    return JSONResponse(builder.full(choices, usage, prompt_logprobs if show_prompt_logprobs else None))


async def _submit_choices(core: RouterCore, prompt_ids: list[list[int]], sampling: SamplingParams, n: int,
                          parent: str | None, kv_codec: str | None) -> list:
    """One request to the replicas per choice: n per prompt, in order. With a seed, choice i of a prompt
    samples with seed + i: the choices differ, and the same request gives the same choices again. If one
    cannot be placed, none runs."""
    flights = []
    try:
        for ids in prompt_ids:
            for i in range(n):
                seed = sampling.seed
                if seed is not None and i:  # wrapped into the 64 bits a seed has (core checks the first as sent)
                    seed = (seed + i + (1 << 63)) % (1 << 64) - (1 << 63)
                flights.append(await core.submit(ids, dataclasses.replace(sampling, seed=seed), parent,
                                                 kv_codec=kv_codec))
    except BaseException:
        for flight in flights:
            await core.abort(flight, "another choice of the request was refused")
        raise
    return flights


async def _choice_events(core: RouterCore, flights: list) -> AsyncIterator[tuple[int, TokenChunk]]:
    """Every choice's chunks as they come, tagged with the choice's index; each choice's end is its
    chunk with a finish_reason. Leaving early (the client went away, an error) aborts the rest."""
    if len(flights) == 1:  # the common case: no tasks
        async for chunk in core.events(flights[0]):
            yield 0, chunk
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, flight) -> None:
        try:
            async for chunk in core.events(flight):
                queue.put_nowait((index, chunk))
        except Exception as exc:  # never leave the merge waiting on a choice that cannot end
            log.exception("choice %d of request %s failed", index, flight.request_id)
            queue.put_nowait((index, TokenChunk.failure(flight.request_id, f"internal error: {exc}", 0)))

    tasks = [asyncio.create_task(pump(i, f)) for i, f in enumerate(flights)]
    try:
        for _ in flights:
            while True:
                index, chunk = await queue.get()
                yield index, chunk
                if chunk.finish_reason is not None:
                    break
    finally:
        for task in tasks:
            task.cancel()
        for flight in flights:
            if not flight.finished:
                await core.abort(flight, "client went away")


def _sse_line(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _sse(core: RouterCore, flights: list, builder: ResponseBuilder, include_usage: bool,
               show_prompt_logprobs: bool, prompt_tokens: int) -> AsyncIterator[str]:
    started: set[int] = set()
    completion_tokens = 0
    async for index, chunk in _choice_events(core, flights):
        if chunk.finish_reason == "error":
            yield _sse_line(error_body(chunk.error, 503, code="replica_failure"))
            break
        first = index not in started
        if first and builder.echo is not None:
            yield _sse_line(builder.echo_chunk(chunk.prompt_logprobs if show_prompt_logprobs else None, index))
        if chunk.text or chunk.finish_reason is not None or first or chunk.logprobs:
            yield _sse_line(builder.chunk(chunk.text, chunk.finish_reason, first=first, logprobs=chunk.logprobs,
                                          index=index))
            started.add(index)
        if chunk.finish_reason is not None and chunk.usage is not None:
            completion_tokens += chunk.usage.completion_tokens
    else:
        if include_usage:
            yield _sse_line(builder.usage_chunk(Usage(prompt_tokens, completion_tokens)))
    yield "data: [DONE]\n\n"
