"""The prefill phase role: prompt -> KV cache -> compressed -> direct channel -> decode replica.

Requests arrive on `<prefix>.prefill.<replica>`. The model thread runs one prompt at a time;
while it computes the next prompt, channel threads ship the previous one's KV, so compute
and transfer overlap. Any failure ends that request with an error chunk on its reply
subject, so the router never waits on a request that is gone.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import Future

import torch

from thunderserve.common import protocol, tracing
from thunderserve.common.kvchannel import PART_TAGS, ChannelError, ChannelPair, send_parts
from thunderserve.common.kvcodec import (
    DEFAULT_CODEC,
    FeedClosed,
    KVCodec,
    LayerFeed,
    get_codec,
    pack_cache,
    pack_runs,
)
from thunderserve.common.protocol import (
    ConnectReply,
    ConnectRequest,
    FirstToken,
    KVHandoff,
    PrefillRequest,
    TokenChunk,
)
from thunderserve.common.sequence import first_token_chunk, scores_prompt

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 10.0


class _EarlyRuns:
    """A streamed transfer that travels while the forward pass runs. The handoff goes out as the pass
    starts (`KVHandoff.first_token_later`); a channel thread encodes each run as soon as the pass has
    computed its layers (`LayerFeed`), another sends each run once encoded, and then the first token
    (`FirstToken`) once the pass is done. The decode replica receives and decodes the KV while the
    prefill still computes it. If no KV is to come after all (the pass failed, or its first token
    ended the request), the sender says so in place of the next run."""

    def __init__(self, request_id: str, codec: KVCodec, feed: LayerFeed, head: dict, runs: Iterator,
                 span: tracing.Span, loop: asyncio.AbstractEventLoop):
        self.request_id, self.codec, self.feed, self.head, self._runs = request_id, codec, feed, head, runs
        self._span, self._loop = span, loop
        self.started = asyncio.Event()  # the forward pass has begun (set from the model thread)
        self._parts: queue.Queue = queue.Queue()
        self._cancelled = threading.Event()
        self._first: Future[FirstToken] = Future()

    def begin(self) -> None:
        """Model thread: the pass starts now."""
        self._loop.call_soon_threadsafe(self.started.set)

    def encode(self) -> None:
        """Channel thread: encode each run as its layers come in, into the queue `_encoded` reads."""
        span = self._span.child("kv.encode", codec=self.codec.name)
        nbytes, t0 = 0, time.perf_counter()
        try:
            for part in self._runs:
                if self._cancelled.is_set():
                    break
                nbytes += part[0].numel()
                self._parts.put(part)
        except BaseException as exc:  # handed to the sender, if there is one
            self._parts.put(exc)
        busy = time.perf_counter() - t0 - self.feed.waited_s
        span.end(bytes=nbytes, busy_ms=round(busy * 1e3, 2), early=True)
        self._parts.put(None)

    def _encoded(self, sent: list[int]) -> Iterator:
        """The encoded runs in order, as they are ready; `sent[0]` counts those handed on and sent."""
        while (item := self._parts.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item
            sent[0] += 1

    def send(self, pair: ChannelPair, tag: int) -> None:
        """Channel thread: send the runs as they are encoded, then the first token (or the reason
        none comes) as the next part."""
        span = self._span.child("kv.send")
        sent, nbytes, sending, failure = [0], 0, 0.0, None
        try:
            nbytes, _, sending = send_parts(pair, tag, self._encoded(sent))
        except ChannelError:
            raise
        except FeedClosed:  # cancelled: the layers stopped coming
            pass
        except Exception as exc:  # the encoding failed: no KV will come, and the request fails
            failure = exc
            self.cancel(f"the KV encoding failed: {exc}")
        first = self._first.result()
        if sent[0] < int(self.head["runs"]) and not first.cancelled:  # the runs stopped short
            first = FirstToken(self.request_id, cancelled="the KV encoding stopped short")
        last = torch.frombuffer(bytearray(protocol.encode(first)), dtype=torch.uint8)
        send_parts(pair, tag + PART_TAGS * sent[0], iter([(last, {"first_token": True})]))
        span.end(bytes=nbytes, busy_ms=round(sending * 1e3, 2), runs=sent[0])
        if failure is not None:
            raise failure

    def finish(self, first: FirstToken) -> None:
        """The pass is done: the first token goes after the KV."""
        if not self._first.done():
            self._first.set_result(first)

    def cancel(self, reason: str) -> None:
        """No KV will be sent after all: stop encoding (a layer still to come ends its wait with an
        error) and tell the decode replica, if it has the handoff, in place of the next run."""
        self._cancelled.set()
        self.feed.close(reason)
        if not self._first.done():
            self._first.set_result(FirstToken(self.request_id, cancelled=reason))


class PrefillRole:
    phase = "prefill"

    def __init__(self, host):
        self.host = host
        self.engine = host.engine
        self.default_codec = host.args.kv_codec or DEFAULT_CODEC
        self._sub = None
        self._waiting = 0
        self._running = 0
        self._inflight: set[asyncio.Task] = set()
        self._aborted: set[str] = set()
        self._connect_locks: dict[str, asyncio.Lock] = {}
        self._accepting = False

    async def start(self) -> None:
        self._accepting = True
        self._sub = await self.host.nc.subscribe(self.host.subjects.prefill(self.host.replica_id), cb=self._on_request)

    async def drain(self) -> None:
        self._accepting = False
        if self._sub is not None:
            await self._sub.unsubscribe()
            self._sub = None
        while self._inflight:
            await asyncio.gather(*list(self._inflight), return_exceptions=True)

    async def stop(self) -> None:
        await self.drain()

    def abort(self, request_id: str) -> None:
        self._aborted.add(request_id)

    def load(self) -> tuple[int, int, int]:
        return self._running, self._waiting, 1

    async def _on_request(self, msg) -> None:
        parent = tracing.traceparent_of(msg)
        request = protocol.decode_or_warn(PrefillRequest, msg.data, log)
        if request is None:
            return
        if not self._accepting:
            await self._fail(request, "replica is no longer serving prefill", parent)
            return
        task = asyncio.create_task(self._handle(request, parent))
        self._inflight.add(task)
        task.add_done_callback(self._inflight.discard)

    async def _handle(self, request: PrefillRequest, parent: str | None) -> None:
        span = tracing.start_span("prefill.request", parent, request_id=request.request_id,
                                  prompt_tokens=len(request.prompt_token_ids) + len(request.resume_token_ids),
                                  decode_replica=request.decode_replica)
        try:
            await self._handle_in(request, span)
        finally:
            span.end()

    async def _handle_in(self, request: PrefillRequest, span: tracing.Span) -> None:
        held: list[_EarlyRuns] = []
        try:
            await self._prefill_and_hand_off(request, span, held)
        finally:  # whatever happened, an early transfer's sender must not wait for a token forever
            for early in held:
                early.cancel("the prefill replica did not finish the request")

    async def _prefill_and_hand_off(self, request: PrefillRequest, span: tracing.Span, held: list) -> None:
        loop = asyncio.get_running_loop()
        parent = span.traceparent  # what this replica sends continues its span
        self._waiting += 1
        early = sending = None
        try:
            # Connect first (cheap when the pair exists) so a dead decode replica fails fast.
            pair = await self._pair_for(request.decode_replica, request.decode_endpoint)
            early = self._early_runs(request, pair, span)
            held += [early] if early is not None else []
            compute = loop.run_in_executor(self.host.model_executor, self._compute, request, span, early)
            if early is not None:
                sending = await self._hand_off_early(request, pair, early, compute, span)
            outcome = await compute
        except Exception as exc:
            self._waiting -= 1
            if early is not None:
                early.cancel("the prefill failed")
            span.attributes["error"] = str(exc)
            await self._fail(request, f"prefill failed: {exc}", parent)
            await self._quietly(sending)
            return
        self._waiting -= 1
        if early is not None and not (isinstance(outcome, tuple) and outcome[0] is early):
            early.cancel("the first token ended the request" if outcome is not None else "aborted")
        if outcome is None:  # aborted while queued
            span.attributes["aborted"] = True
            await self._quietly(sending)
            return
        if isinstance(outcome, TokenChunk):  # the first token finished it: nothing to hand off
            await self.host.nc.publish(request.reply_subject, protocol.encode(outcome), headers=span.headers)
            await self._quietly(sending)
            return
        # (payload, manifest, first chunk); the payload is an _EarlyRuns whose KV is on its way, or, for
        # a streamed transfer encoded after the pass, the runs to encode, with the transfer's head
        payload, manifest, first_chunk = outcome
        # Stream the first token now (TTFT does not wait for the KV transfer and decode admission),
        # unless the plan has this route's decode replica send it once the KV has landed.
        plan = self.host.plan
        # (The prompt's log-probabilities ride on the first chunk: this replica sends it then.)
        first_here = plan is None or bool(first_chunk.prompt_logprobs) or not plan.first_token_waits(
            self.host.replica_id, request.decode_replica)
        if first_here:
            await self.host.nc.publish(request.reply_subject, protocol.encode(first_chunk), headers=span.headers)
        first_logprob = first_chunk.logprobs[0] if first_chunk.logprobs else None
        try:
            if isinstance(payload, _EarlyRuns):
                if sending is None:
                    raise ChannelError("the KV handoff did not go out")
                payload.finish(FirstToken(request.request_id, first_chunk.token_ids[0], first_here, first_logprob))
                await sending
                return
            tag = pair.next_tag(PART_TAGS * manifest["runs"] if "runs" in manifest else 1)
            await self._publish_handoff(request, pair, tag, manifest, span, first_token_id=first_chunk.token_ids[0],
                                        first_chunk_sent=first_here, first_logprob=first_logprob)
            if "runs" in manifest:
                await loop.run_in_executor(self.host.channel_executor, self._stream, pair, payload, tag,
                                           manifest["codec"], span)
            else:
                send = span.child("kv.send", bytes=int(payload.numel()))
                await loop.run_in_executor(self.host.channel_executor, pair.send, payload, tag)
                send.end()
        except (ChannelError, Exception) as exc:
            span.attributes["error"] = str(exc)
            self.host.channel_client.drop(request.decode_endpoint)
            await self._fail(request, f"KV transfer to {request.decode_replica} failed: {exc}", parent,
                             retryable=True)

    async def _hand_off_early(self, request: PrefillRequest, pair: ChannelPair, early: _EarlyRuns,
                              compute: asyncio.Future, span: tracing.Span) -> asyncio.Future | None:
        """Once the forward pass starts: the handoff, and the channel threads that encode and send the
        KV while it runs. None if the pass ended before it began (aborted while queued)."""
        loop = asyncio.get_running_loop()
        started = asyncio.ensure_future(early.started.wait())
        await asyncio.wait({started, compute}, return_when=asyncio.FIRST_COMPLETED)
        if not early.started.is_set():
            started.cancel()
            return None
        tag = pair.next_tag(PART_TAGS * (int(early.head["runs"]) + 1))  # the runs, then the first token
        await self._publish_handoff(request, pair, tag, early.head, span, first_token_id=-1, first_token_later=True)
        loop.run_in_executor(self.host.channel_executor, early.encode)
        return loop.run_in_executor(self.host.channel_executor, early.send, pair, tag)

    async def _publish_handoff(self, request: PrefillRequest, pair: ChannelPair, tag: int, manifest: dict,
                               span: tracing.Span, **first) -> None:
        """The `KVHandoff` to the request's decode replica; `first`: its first-token fields."""
        handoff = KVHandoff(request_id=request.request_id, prefill_replica=self.host.replica_id, pair_id=pair.pair_id,
                            tag=tag, prompt_token_ids=request.prompt_token_ids, sampling=request.sampling,
                            reply_subject=request.reply_subject, kv_manifest=manifest,
                            resume_token_ids=request.resume_token_ids, **first)
        await self.host.nc.publish(self.host.subjects.decode(request.decode_replica), protocol.encode(handoff),
                                   headers=span.headers)

    @staticmethod
    async def _quietly(sending: asyncio.Future | None) -> None:
        """Wait for a cancelled early transfer's sender to have told the decode replica."""
        if sending is None:
            return
        try:
            await sending
        except Exception as exc:
            log.info("a cancelled KV transfer's last part was not sent: %s", exc)

    def _codec_for(self, request: PrefillRequest) -> KVCodec:
        """The request's codec, else the current plan's, else this replica's default."""
        return get_codec(request.kv_codec or self.host.plan_kv_codec or self.default_codec)

    def _early_runs(self, request: PrefillRequest, pair: ChannelPair, span: tracing.Span) -> _EarlyRuns | None:
        """A streamed transfer that travels during the forward pass (`--kv-stream-early`), else None: the
        codec must have something to encode, the request something to generate, and the channel must
        let the decode replica wait for the KV as long as the pass takes."""
        codec = self._codec_for(request)
        if not (self.host.kv_stream_early and self.host.kv_runs > 1 and codec.name != "none"
                and pair.waits_longer and request.sampling.max_tokens != 0
                and request.request_id not in self._aborted):
            return None
        feed = LayerFeed(self.engine.num_layers)
        head, runs = self._pack_runs(codec, feed)
        return _EarlyRuns(request.request_id, codec, feed, head, runs, span, asyncio.get_running_loop())

    def _pack_runs(self, codec: KVCodec, layers):
        """`pack_runs` with this replica's settings; the decode replica (same model) rebuilds the first
        layer from the token ids, if the engine can."""
        return pack_runs(codec, layers, model=self.engine.name, rebuild=self.engine.rebuilds_first_layer,
                         runs=self.host.kv_runs, threads=self.host.codec_threads)

    def _compute(self, request: PrefillRequest, span: tracing.Span, early: _EarlyRuns | None = None):
        """Model thread: prefill, choose the first token, compress the KV (child spans of `span`).

        Returns None if aborted, the final chunk if the first token ends the request (EOS,
        a stop, max_tokens=1: no KV needs to move), else (payload, manifest, first chunk), with
        `early` as the payload when given (its layers are fed to it as the pass computes them).
        """
        if request.request_id in self._aborted:
            self._aborted.discard(request.request_id)
            return None
        self._running += 1
        try:
            resumed = request.resume_token_ids  # a request taken over from a dead replica: go on after these
            forward = span.child("prefill.forward", tokens=len(request.prompt_token_ids) + len(resumed))
            if early is not None:
                early.begin()
            try:
                result = self.engine.prefill(request.prompt_token_ids + resumed, prompt_logits=scores_prompt(request),
                                             on_layer=early.feed.put if early is not None else None)
            finally:
                forward.end()
            first_chunk = first_token_chunk(request, result.logits, result.prompt_logits, self.engine)
            if first_chunk.finish_reason is not None:  # the first token ends it: nothing to hand off
                return first_chunk
            if early is not None:
                return early, early.head, first_chunk
            codec = self._codec_for(request)
            if self.host.kv_runs > 1 and codec.name != "none":
                # streamed: the channel thread encodes each run and sends it while the decode replica
                # decodes the one before (`_stream`); `none` has nothing to overlap
                head, runs = self._pack_runs(codec, result.kv)
                return runs, head, first_chunk
            encode = span.child("kv.encode", codec=codec.name)
            payload, manifest = pack_cache(codec, result.kv, model=self.engine.name,
                                           rebuild=self.engine.rebuilds_first_layer, threads=self.host.codec_threads)
            encode.end(bytes=int(payload.numel()))
            return payload, manifest, first_chunk
        finally:
            self._running -= 1

    @staticmethod
    def _stream(pair: ChannelPair, runs, tag: int, codec: str, span: tracing.Span) -> None:
        """Channel thread: encode each run and send it (`kvchannel.send_parts`). The two spans cover
        the whole interleaved stretch; their attributes say how much of it each part took."""
        encode, send = span.child("kv.encode", codec=codec), span.child("kv.send")
        nbytes, encoding, sending = send_parts(pair, tag, runs)
        encode.end(bytes=nbytes, busy_ms=round(encoding * 1e3, 2))
        send.end(bytes=nbytes, busy_ms=round(sending * 1e3, 2))

    async def _pair_for(self, decode_replica: str, endpoint: str) -> ChannelPair:
        pair = self.host.channel_client.get(endpoint)
        if pair is not None:
            return pair
        lock = self._connect_locks.setdefault(endpoint, asyncio.Lock())
        async with lock:
            pair = self.host.channel_client.get(endpoint)
            if pair is not None:
                return pair
            pair_id = f"{self.host.replica_id}-{uuid.uuid4().hex[:8]}"
            reply = await self.host.nc.request(
                self.host.subjects.connect(decode_replica),
                protocol.encode(ConnectRequest(self.host.replica_id, pair_id, self.host.channel_client.backend)),
                timeout=CONNECT_TIMEOUT_S, headers=tracing.headers_for(None),
            )
            answer = protocol.decode(ConnectReply, reply.data)
            if not answer.ok:
                raise ChannelError(f"decode replica {decode_replica} refused the channel: {answer.error}")
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(
                self.host.channel_executor, self.host.channel_client.connect, endpoint, pair_id
            )

    async def _fail(self, request: PrefillRequest, error: str, parent: str | None, retryable: bool = False) -> None:
        log.warning("request %s: %s", request.request_id, error)
        chunk = TokenChunk.failure(request.request_id, error, len(request.prompt_token_ids), retryable=retryable)
        try:
            headers = tracing.headers_for(parent)
            await self.host.nc.publish(request.reply_subject, protocol.encode(chunk), headers=headers)
        except Exception as exc:
            log.warning("could not report failure of %s: %s", request.request_id, exc)


def create_role(host) -> PrefillRole:
    return PrefillRole(host)
