"""The ThunderServe client SDK: completions over NATS, no HTTP in between.

    async with Client("nats://127.0.0.1:4222") as client:
        result = await client.complete("Hello", max_tokens=16)
        async for chunk in client.stream(messages=[{"role": "user", "content": "Hi"}]):
            print(chunk.text, end="")

NATS keeps nothing for a client that is cut off. Events are numbered, so when the connection drops
and comes back (or an event is missing) the client asks the request's router to replay what it
missed, and the stream goes on whole.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import nats
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError

from thunderserve.common import aio, protocol, tracing
from thunderserve.common.protocol import (
    CompletionEvent,
    CompletionRequest,
    ReplayReply,
    ReplayRequest,
    SamplingParams,
    Subjects,
    TokenLogprob,
    Usage,
)

REPLAY_RETRY_S = 0.5  # after a failed replay (the router not back yet), ask again this much later


class ThunderServeError(Exception):
    """The service refused or failed a request; `status` follows HTTP conventions."""

    def __init__(self, message: str, status: int = 500):
        super().__init__(message)
        self.status = status


@dataclass
class Chunk:
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    usage: Usage | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)  # with logprobs=k: one per token
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)  # with prompt_logprobs=k, on the first


@dataclass
class Completion:
    text: str
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    usage: Usage = field(default_factory=Usage)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)  # prompt tokens 1..n-1


class Client:
    def __init__(self, nats_url: str = "nats://127.0.0.1:4222", subject_prefix: str = "ts",
                 timeout_s: float = 120.0):
        self.nats_url = nats_url
        self.subjects = Subjects(subject_prefix)
        self.timeout_s = timeout_s
        self.nc: nats.NATS | None = None
        self._streams: set[asyncio.Queue] = set()  # the event queues of the streams running now

    async def __aenter__(self) -> Client:
        await self.connect()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def connect(self) -> None:
        self.nc = await nats.connect(self.nats_url, name="thunderserve-client", reconnected_cb=self._on_reconnected)

    async def _on_reconnected(self) -> None:
        for queue in self._streams:  # events may have been lost: each stream asks for a replay
            queue.put_nowait(None)

    async def _replay(self, subject: str, request_id: str, from_index: int) -> list[CompletionEvent] | None:
        """The request's events from `from_index` on, from its router; None if it cannot answer now."""
        try:
            reply = await self.nc.request(subject, protocol.encode(ReplayRequest(request_id, from_index)),
                                          timeout=5.0, headers=tracing.headers_for(None))
        except (NoRespondersError, NatsTimeoutError):
            return None
        answer = protocol.decode(ReplayReply, reply.data)
        if not answer.known:
            raise ThunderServeError("the router no longer holds this request's events; they were lost", 502)
        return answer.events

    async def close(self) -> None:
        await aio.close_nats(self.nc)

    async def complete(self, prompt: str | None = None, *, messages: list[dict[str, str]] | None = None,
                       **params) -> Completion:
        """Run one request to the end and return its whole text."""
        result = Completion("")
        parts: list[str] = []
        async for chunk in self.stream(prompt, messages=messages, **params):
            parts.append(chunk.text)
            result.token_ids.extend(chunk.token_ids)
            result.logprobs.extend(chunk.logprobs)
            result.prompt_logprobs.extend(chunk.prompt_logprobs)
            if chunk.finish_reason is not None:
                result.finish_reason = chunk.finish_reason
                result.usage = chunk.usage or Usage()
        result.text = "".join(parts)
        return result

    async def stream(self, prompt: str | None = None, *, messages: list[dict[str, str]] | None = None,
                     model: str | None = None, kv_codec: str | None = None,
                     **params) -> AsyncIterator[Chunk]:
        """Yield the request's text chunks as they are generated; the last has `finish_reason`.

        Keyword parameters are SamplingParams fields: max_tokens, temperature, top_p, top_k, min_p,
        seed, stop, stop_token_ids, ignore_eos, min_tokens, logit_bias, presence_penalty,
        frequency_penalty, logprobs (k: each chunk's `logprobs` has its tokens' and k alternatives),
        prompt_logprobs (k: the first chunk's `prompt_logprobs` scores the prompt's tokens after the
        first; max_tokens may then be 0). `kv_codec` ("none", "int8", "int4") overrides the
        deployment's KV compression for this request.
        """
        if self.nc is None:
            raise RuntimeError("Client is not connected: use `async with Client(...)` or await connect()")
        if (prompt is None) == (messages is None):
            raise ValueError("give exactly one of prompt or messages")
        if isinstance(params.get("stop"), str):
            params["stop"] = [params["stop"]]
        try:
            sampling = SamplingParams(**params)
        except TypeError as exc:
            raise ValueError(f"unknown sampling parameter: {exc}") from None
        if sampling.seed is not None and not protocol.SEED_RANGE[0] <= sampling.seed < protocol.SEED_RANGE[1]:
            raise ValueError("seed must be a 64-bit integer")  # (msgpack could not carry it to the router)
        inbox = self.nc.new_inbox()
        events: asyncio.Queue[CompletionEvent | None] = asyncio.Queue()  # None: ask for a replay

        async def on_event(msg):
            events.put_nowait(protocol.decode(CompletionEvent, msg.data))

        sub = await self.nc.subscribe(inbox, cb=on_event)
        self._streams.add(events)
        try:
            request = CompletionRequest(prompt=prompt, messages=messages, model=model, sampling=sampling,
                                        reply_subject=inbox, kv_codec=kv_codec)
            try:
                reply = await self.nc.request(self.subjects.api_completions, protocol.encode(request),
                                              timeout=10.0, headers=tracing.headers_for(None))
            except NoRespondersError:
                raise ThunderServeError("no ThunderServe router is listening", 503) from None
            except NatsTimeoutError:
                raise ThunderServeError("the router did not answer within 10 s", 504) from None
            accepted = protocol.decode(CompletionEvent, reply.data)
            if accepted.status >= 400:
                raise ThunderServeError(accepted.error, accepted.status)
            expected, early = 0, {}  # the next event's index; events that came before it
            loop = asyncio.get_running_loop()
            while True:
                try:
                    event = await asyncio.wait_for(events.get(), self.timeout_s)
                except TimeoutError:
                    raise ThunderServeError(f"no progress for {self.timeout_s} s", 504) from None
                if event is not None:
                    if not accepted.replay_subject:  # a router without replay: events in arrival order
                        event.index = expected
                    if event.index >= expected:
                        early[event.index] = event
                    if expected in early or not early:
                        received = []
                    else:  # a gap: the events before this one were lost
                        received = await self._replay(accepted.replay_subject, accepted.request_id, expected)
                elif accepted.replay_subject:  # reconnected: ask for whatever came meanwhile
                    received = await self._replay(accepted.replay_subject, accepted.request_id, expected)
                else:
                    received = []
                if received is None:  # the router is not back yet: ask again shortly
                    loop.call_later(REPLAY_RETRY_S, events.put_nowait, None)
                    received = []
                for ev in received:
                    if ev.index >= expected:
                        early.setdefault(ev.index, ev)
                while expected in early:
                    ev = early.pop(expected)
                    expected += 1
                    if ev.error:
                        raise ThunderServeError(ev.error, ev.status)
                    yield Chunk(ev.text, ev.token_ids, ev.finish_reason, ev.usage, ev.logprobs, ev.prompt_logprobs)
                    if ev.finish_reason is not None:
                        return
        finally:
            self._streams.discard(events)
            await sub.unsubscribe()
