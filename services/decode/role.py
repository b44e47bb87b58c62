"""The decode phase role: receive KV over the direct channel, join the continuous batch, stream tokens.

Handoffs arrive on `<prefix>.decode.<replica>`; their KV comes on the channel pair they name.
A dedicated step thread owns the `DecodeBatch`: between steps it admits received sequences
and drops finished or aborted ones, then advances every sequence by one token and publishes
each new token to the request's reply subject. The event loop only moves messages, so
heartbeats and aborts keep flowing while the batch computes.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from dataclasses import dataclass

import torch

from thunderserve.common import aio, protocol, tracing
from thunderserve.common.kvchannel import BACKENDS, ChannelCancelled, detach_from, recv_parts
from thunderserve.common.kvcodec import unpack_cache, unpack_runs
from thunderserve.common.protocol import (
    ConnectReply,
    ConnectRequest,
    FirstToken,
    KVHandoff,
    TokenChunk,
    TokenLogprob,
    Usage,
)
from thunderserve.common.sequence import OutputTracker, sample_token, token_logprob

log = logging.getLogger(__name__)

PAIR_WAIT_S = 15.0
# How long an early handoff's KV may take to start coming, run by run: the prefill's forward pass
# computes it while this replica waits (KVHandoff.first_token_later).
EARLY_WAIT_S = 600.0


class _DroppedByPrefill(Exception):
    """An early handoff's prefill sends no KV after all, and has told the client why."""


@dataclass
class _Sequence:
    handoff: KVHandoff
    tracker: OutputTracker
    span: tracing.Span  # this replica's span of the request; the chunks it sends carry it
    index: int = 0  # the next chunk index

    @property
    def headers(self) -> dict[str, str]:
        return self.span.headers


class DecodeRole:
    phase = "decode"

    def __init__(self, host):
        self.host = host
        self.engine = host.engine
        self.channel = host.channel_host  # created on first use; outlives the role
        self.max_batch = host.args.max_batch
        self._subs = []
        # Channel pairs prefill replicas set up with this replica, by pair id: the host keeps them, so they
        # outlive this role (a flip to another phase and back finds its pairs, as its prefill peers do).
        self._pairs: dict[str, asyncio.Future] = host.channel_pairs
        self._joins: queue.Queue = queue.Queue()
        self._aborts: queue.Queue = queue.Queue()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._takes: set[asyncio.Task] = set()  # handoffs being received
        self._active: dict[str, _Sequence] = {}
        self._aborted: dict[str, None] = {}  # aborted before they joined (ordered, bounded)
        # Requests whose KV is awaited -> what calls the wait off: an abort (the router gave up on
        # the prefill, e.g. a frozen one) frees the channel thread instead of holding it for EARLY_WAIT_S.
        self._awaited: dict[str, threading.Event] = {}
        self._accepting = False

    async def start(self) -> None:
        self._accepting = True
        self._stopping.clear()
        self._thread = threading.Thread(target=self._step_loop, name="decode-steps", daemon=True)
        self._thread.start()
        nc, subjects, rid = self.host.nc, self.host.subjects, self.host.replica_id
        self._subs = [
            await nc.subscribe(subjects.decode(rid), cb=self._on_handoff),
            await nc.subscribe(subjects.connect(rid), cb=self._on_connect),
        ]

    async def drain(self) -> None:
        self._accepting = False
        for sub in self._subs:
            await sub.unsubscribe()
        self._subs = []
        while self._busy():
            await asyncio.sleep(0.05)

    def _busy(self) -> bool:
        """Work taken and not finished (what `drain` waits out)."""
        return bool(self._takes or self._active or not self._joins.empty())

    async def stop(self) -> None:
        await self.drain()
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join, 5)

    def abort(self, request_id: str) -> None:
        awaited = self._awaited.get(request_id)
        if awaited is not None:
            awaited.set()
        self._aborts.put(request_id)
        self._wake.set()

    def load(self) -> tuple[int, int, int]:
        return len(self._active), self._joins.qsize() + len(self._takes), self.max_batch

    # --- channel set-up ---------------------------------------------------------------------

    async def _on_connect(self, msg) -> None:
        try:
            request = protocol.decode(ConnectRequest, msg.data)
        except protocol.ProtocolError as exc:
            await aio.respond(self.host.nc, msg, protocol.encode(ConnectReply(False, str(exc))))
            return
        if request.backend not in BACKENDS:
            refusal = ConnectReply(False, f"unknown channel backend {request.backend!r}")
            await aio.respond(self.host.nc, msg, protocol.encode(refusal))
            return
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self.host.channel_executor, self.channel.accept, request.pair_id,
                                      request.backend)
        self._pairs[request.pair_id] = future
        await aio.respond(self.host.nc, msg, protocol.encode(ConnectReply(True)))

        def accepted(done: asyncio.Future) -> None:  # (not awaited here: the next connect must not wait on it)
            if done.cancelled() or done.exception() is not None:
                log.warning("channel pair %s failed: %s", request.pair_id, "cancelled" if done.cancelled()
                            else done.exception())
                if self._pairs.get(request.pair_id) is done:
                    self._pairs.pop(request.pair_id)
            else:
                log.info("channel pair %s with %s is up", request.pair_id, request.prefill_replica)

        future.add_done_callback(accepted)

    # --- receiving --------------------------------------------------------------------------

    async def _on_handoff(self, msg) -> None:
        handoff = protocol.decode_or_warn(KVHandoff, msg.data, log)
        if handoff is None:
            return
        # Each handoff in a task of its own: NATS runs a subscription's callbacks one at a time, and
        # an early handoff's KV comes over a whole forward pass, which must not hold up the next one.
        task = asyncio.create_task(self._take(handoff, tracing.traceparent_of(msg)))
        self._takes.add(task)
        task.add_done_callback(self._takes.discard)

    async def _take(self, handoff: KVHandoff, parent: str | None) -> None:
        span = tracing.start_span("decode.request", parent, request_id=handoff.request_id,
                                  prefill_replica=handoff.prefill_replica)
        cancel = self._awaited[handoff.request_id] = threading.Event()
        try:
            await self._receive(handoff, span, cancel)
        except _DroppedByPrefill as exc:
            span.end(cancelled=str(exc))
        except ChannelCancelled:
            log.info("request %s: aborted while its KV was awaited", handoff.request_id)
            span.end(cancelled="aborted while its KV was awaited")
        except Exception as exc:
            log.warning("request %s: KV receive failed: %s", handoff.request_id, exc)
            span.end(error=f"KV receive failed: {exc}")
            self._publish_error(handoff, f"KV receive failed: {exc}", span.headers, retryable=True)
        finally:
            self._awaited.pop(handoff.request_id, None)

    async def _receive(self, handoff: KVHandoff, span: tracing.Span, cancel: threading.Event) -> None:
        future = self._pairs.get(handoff.pair_id)
        if future is None:
            raise RuntimeError(f"unknown channel pair {handoff.pair_id}")
        pair = await asyncio.wait_for(asyncio.shield(future), PAIR_WAIT_S)
        loop = asyncio.get_running_loop()

        tokens = handoff.prompt_token_ids + handoff.resume_token_ids  # what the KV covers

        def rebuild():
            return self.engine.first_layer_kv(tokens)

        def receive_one() -> list[torch.Tensor]:
            nbytes = int(handoff.kv_manifest["nbytes"])
            buf = self.channel.buffers.take(nbytes)
            try:
                recv = span.child("kv.receive", bytes=nbytes)
                payload = pair.recv(nbytes, handoff.tag, out=buf, cancel=cancel)
                recv.end()
                unpack = span.child("kv.decode", codec=handoff.kv_manifest.get("codec"))
                layers = unpack_cache(payload, handoff.kv_manifest, rebuild, threads=self.host.codec_threads)
                flat = detach_from(buf, [t for kv in layers for t in kv])
                unpack.end()
                return flat
            finally:
                self.channel.buffers.give(buf)

        def receive_runs() -> list[torch.Tensor]:
            # Each run is decoded (kvcodec's run thread) while the next one is on its way; the two
            # spans cover the whole overlapped stretch. After an early handoff the first token
            # follows the runs (or comes in place of one, if the prefill sends no KV after all).
            head = handoff.kv_manifest
            recv, unpack = span.child("kv.receive"), span.child("kv.decode", codec=head.get("codec"))
            received = []
            later = handoff.first_token_later
            count, wait_s = int(head["runs"]) + later, EARLY_WAIT_S if later else None

            def parts():
                for payload, manifest in recv_parts(pair, handoff.tag, count, self.channel.buffers, wait_s, cancel):
                    if manifest.get("first_token"):
                        first = protocol.decode(FirstToken, payload.numpy().tobytes())
                        self.channel.buffers.give(payload)
                        if first.cancelled:
                            raise _DroppedByPrefill(first.cancelled)
                        handoff.first_token_id, handoff.first_chunk_sent = first.token_id, first.chunk_sent
                        handoff.first_logprob = first.logprob
                        break
                    received.append(payload.numel())
                    yield payload, manifest
                recv.end(bytes=sum(received), runs=len(received))

            layers = unpack_runs(head, parts(), rebuild, self.host.codec_threads, release=self.channel.buffers.give)
            unpack.end()
            return [t for kv in layers for t in kv]

        def receive() -> None:
            # Received, unpacked and queued for the step thread here, in the channel thread:
            # no round trip through the event loop between the payload and the batch.
            flat = receive_runs() if "runs" in handoff.kv_manifest else receive_one()
            self._join(handoff, span, [(flat[i], flat[i + 1]) for i in range(0, len(flat), 2)])

        await loop.run_in_executor(self.host.channel_executor, receive)

    def _join(self, handoff: KVHandoff, span: tracing.Span, kv: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Queue a prefilled request, its KV in hand, for the step thread to admit to the batch."""
        tracker = OutputTracker(
            params=handoff.sampling,
            prompt_len=len(handoff.prompt_token_ids),
            max_context=self.engine.max_context,
            eos_token_ids=self.engine.eos_token_ids,
            tokenizer=self.engine.tokenizer,
        )
        tracker.resume(handoff.resume_token_ids)
        self._joins.put((_Sequence(handoff, tracker, span, index=len(handoff.resume_token_ids)), kv))
        self._wake.set()

    # --- the step thread --------------------------------------------------------------------

    def _step_loop(self) -> None:
        batch = self.engine.new_batch()
        while not self._stopping.is_set():
            self._apply_aborts(batch)
            self._admit(batch)
            more = self._between_steps(batch)
            if not len(batch):
                if not more:
                    self._wake.wait(0.5)
                    self._wake.clear()
                continue
            try:
                logits = batch.step()
            except Exception as exc:  # a broken step fails its sequences, not the replica
                log.exception("decode step failed")
                for seq_id in list(batch.seq_ids):
                    seq = self._active.pop(seq_id)
                    batch.remove(seq_id)
                    seq.span.end(error=f"decode step failed: {exc}")
                    self._publish_error(seq.handoff, f"decode step failed: {exc}", seq.headers)
                continue
            for seq_id, row in logits.items():
                seq = self._active[seq_id]
                step = seq.tracker.completion_tokens
                sampling = seq.handoff.sampling
                token = sample_token(row, sampling, step, self.engine.eos_token_ids, seq.tracker.token_ids)
                logprob = token_logprob(row, token, sampling.logprobs) if sampling.logprobs is not None else None
                if self._emit(seq, token, logprob):
                    batch.remove(seq_id)
                    del self._active[seq_id]
                else:
                    batch.set_next_token(seq_id, token)

    def _between_steps(self, batch) -> bool:
        """Step thread, before each step: other model work to interleave with the steps (a colocated
        replica's prefill chunks). True while some is left."""
        return False

    def _admit(self, batch) -> None:
        while len(batch) < self.max_batch:
            try:
                seq, kv = self._joins.get_nowait()
            except queue.Empty:
                return
            request_id = seq.handoff.request_id
            if request_id in self._aborted:
                del self._aborted[request_id]
                seq.span.end(aborted=True)
                continue
            seq.span.attributes["batch_on_join"] = len(batch)
            if seq.handoff.first_chunk_sent:
                # Prefill streamed it; track it so text deltas and stops continue from there.
                seq.tracker.add(seq.handoff.first_token_id)
                seq.index += 1
            elif self._emit(seq, seq.handoff.first_token_id, seq.handoff.first_logprob):
                continue  # finished on its first token (EOS, max_tokens=1, ...)
            batch.add(request_id, kv, seq.handoff.first_token_id)
            self._active[request_id] = seq

    def _apply_aborts(self, batch) -> None:
        while True:
            try:
                request_id = self._aborts.get_nowait()
            except queue.Empty:
                return
            if request_id in self._active:
                seq = self._active.pop(request_id)
                batch.remove(request_id)
                seq.span.end(aborted=True, completion_tokens=seq.tracker.completion_tokens)
                log.info("request %s aborted after %d tokens", request_id, seq.tracker.completion_tokens)
            else:
                self._aborted[request_id] = None
                while len(self._aborted) > 10_000:
                    self._aborted.pop(next(iter(self._aborted)))

    def _emit(self, seq: _Sequence, token: int, logprob: TokenLogprob | None = None) -> bool:
        """Record and publish one generated token; True when the request is finished."""
        out = seq.tracker.add(token)
        usage = None
        if out.finish_reason is not None:
            usage = Usage(seq.tracker.prompt_len, seq.tracker.completion_tokens)
        chunk = TokenChunk(
            request_id=seq.handoff.request_id,
            index=seq.index,
            token_ids=[token],
            text=out.text,
            finish_reason=out.finish_reason,
            usage=usage,
            logprobs=[logprob] if logprob is not None else [],
        )
        seq.index += 1
        if out.finish_reason is not None:  # ended before the last chunk goes: the router's span outlasts it
            seq.span.end(completion_tokens=seq.tracker.completion_tokens, finish_reason=out.finish_reason)
        self.host.publish_soon(seq.handoff.reply_subject, chunk, seq.headers)
        return out.finish_reason is not None

    def _publish_error(self, handoff: KVHandoff, error: str, headers: dict[str, str], retryable: bool = False) -> None:
        chunk = TokenChunk.failure(handoff.request_id, error, len(handoff.prompt_token_ids), retryable=retryable)
        self.host.publish_soon(handoff.reply_subject, chunk, headers)


def create_role(host) -> DecodeRole:
    return DecodeRole(host)
