"""The prefill phase role: prompt -> KV cache -> compressed -> direct channel -> decode replica.

Requests arrive on `<prefix>.prefill.<replica>`. The model thread runs one prompt at a time;
while it computes the next prompt, channel threads ship the previous one's KV, so compute
and transfer overlap. Any failure ends that request with an error chunk on its reply
subject, so the router never waits on a request that is gone.
"""

from __future__ import annotations

import asyncio
import logging
import uuid

from thunderserve.common import protocol, tracing
from thunderserve.common.kvchannel import PART_TAGS, ChannelError, ChannelPair, send_parts
from thunderserve.common.kvcodec import DEFAULT_CODEC, get_codec, pack_cache, pack_runs
from thunderserve.common.protocol import (
    ConnectReply,
    ConnectRequest,
    KVHandoff,
    PrefillRequest,
    TokenChunk,
    Usage,
)
from thunderserve.common.sequence import OutputTracker, prompt_token_logprobs, sample_token, token_logprob

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 10.0


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
        loop = asyncio.get_running_loop()
        parent = span.traceparent  # what this replica sends continues its span
        self._waiting += 1
        try:
            # Connect first (cheap when the pair exists) so a dead decode replica fails fast.
            pair = await self._pair_for(request.decode_replica, request.decode_endpoint)
            outcome = await loop.run_in_executor(self.host.model_executor, self._compute, request, span)
        except Exception as exc:
            self._waiting -= 1
            span.attributes["error"] = str(exc)
            await self._fail(request, f"prefill failed: {exc}", parent)
            return
        self._waiting -= 1
        if outcome is None:  # aborted while queued
            span.attributes["aborted"] = True
            return
        if isinstance(outcome, TokenChunk):  # the first token finished it: nothing to hand off
            await self.host.nc.publish(request.reply_subject, protocol.encode(outcome), headers=span.headers)
            return
        payload, manifest, first_chunk = outcome  # (a streamed transfer: the runs to encode, and its head)
        # Stream the first token now (TTFT does not wait for the KV transfer and decode admission),
        # unless the plan has this route's decode replica send it once the KV has landed.
        plan = self.host.plan
        # (The prompt's log-probabilities ride on the first chunk: this replica sends it then.)
        first_here = plan is None or bool(first_chunk.prompt_logprobs) or not plan.first_token_waits(
            self.host.replica_id, request.decode_replica)
        if first_here:
            await self.host.nc.publish(request.reply_subject, protocol.encode(first_chunk), headers=span.headers)
        handoff = KVHandoff(
            request_id=request.request_id,
            prefill_replica=self.host.replica_id,
            pair_id=pair.pair_id,
            tag=pair.next_tag(PART_TAGS * manifest["runs"] if "runs" in manifest else 1),
            prompt_token_ids=request.prompt_token_ids,
            first_token_id=first_chunk.token_ids[0],
            sampling=request.sampling,
            reply_subject=request.reply_subject,
            kv_manifest=manifest,
            first_chunk_sent=first_here,
            resume_token_ids=request.resume_token_ids,
            first_logprob=first_chunk.logprobs[0] if first_chunk.logprobs else None,
        )
        try:
            await self.host.nc.publish(
                self.host.subjects.decode(request.decode_replica),
                protocol.encode(handoff),
                headers=span.headers,
            )
            if "runs" in manifest:
                await loop.run_in_executor(self.host.channel_executor, self._stream, pair, payload, handoff.tag,
                                           manifest["codec"], span)
            else:
                send = span.child("kv.send", bytes=int(payload.numel()))
                await loop.run_in_executor(self.host.channel_executor, pair.send, payload, handoff.tag)
                send.end()
        except (ChannelError, Exception) as exc:
            span.attributes["error"] = str(exc)
            self.host.channel_client.drop(request.decode_endpoint)
            await self._fail(request, f"KV transfer to {request.decode_replica} failed: {exc}", parent,
                             retryable=True)

    def _compute(self, request: PrefillRequest, span: tracing.Span):
        """Model thread: prefill, choose the first token, compress the KV (child spans of `span`).

        Returns None if aborted, the final chunk if the first token ends the request (EOS,
        a stop, max_tokens=1: no KV needs to move), else (payload, manifest, first chunk).
        """
        if request.request_id in self._aborted:
            self._aborted.discard(request.request_id)
            return None
        self._running += 1
        try:
            resumed = request.resume_token_ids  # a request taken over from a dead replica: go on after these
            # The prompt's own log-probabilities, if asked: on the first attempt only (a resumed one's
            # router has them already).
            scored = request.sampling.prompt_logprobs is not None and not resumed
            forward = span.child("prefill.forward", tokens=len(request.prompt_token_ids) + len(resumed))
            result = self.engine.prefill(request.prompt_token_ids + resumed, prompt_logits=scored)
            forward.end()
            prompt_lps = prompt_token_logprobs(result.prompt_logits, request.prompt_token_ids,
                                               request.sampling.prompt_logprobs) if scored else []
            if request.sampling.max_tokens == 0:  # scoring only: nothing to generate
                return TokenChunk(request.request_id, 0, [], "", "length",
                                  usage=Usage(len(request.prompt_token_ids), 0), prompt_logprobs=prompt_lps)
            tracker = OutputTracker(request.sampling, len(request.prompt_token_ids), self.engine.max_context,
                                    self.engine.eos_token_ids, self.engine.tokenizer)
            tracker.resume(resumed)
            step = tracker.completion_tokens  # also the chunk index: one token per chunk
            first = sample_token(result.logits, request.sampling, step, self.engine.eos_token_ids, resumed)
            out = tracker.add(first)
            first_chunk = TokenChunk(request.request_id, step, [first], out.text, out.finish_reason,
                                     prompt_logprobs=prompt_lps)
            if request.sampling.logprobs is not None:
                first_chunk.logprobs = [token_logprob(result.logits, first, request.sampling.logprobs)]
            if out.finish_reason is not None:  # the first token ends it: nothing to hand off
                first_chunk.usage = Usage(tracker.prompt_len, tracker.completion_tokens)
                return first_chunk
            # The request's codec, else the current plan's, else this replica's default.
            codec = get_codec(request.kv_codec or self.host.plan_kv_codec or self.default_codec)
            # The decode replica (same model) rebuilds the first layer from the token ids, if the engine can.
            rebuild, threads = self.engine.rebuilds_first_layer, self.host.codec_threads
            if self.host.kv_runs > 1 and codec.name != "none":
                # streamed: the channel thread encodes each run and sends it while the decode replica
                # decodes the one before (`_stream`); `none` has nothing to overlap
                head, runs = pack_runs(codec, result.kv, model=self.engine.name, rebuild=rebuild,
                                       runs=self.host.kv_runs, threads=threads)
                return runs, head, first_chunk
            encode = span.child("kv.encode", codec=codec.name)
            payload, manifest = pack_cache(codec, result.kv, model=self.engine.name, rebuild=rebuild, threads=threads)
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
