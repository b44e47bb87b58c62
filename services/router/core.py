"""The router's engine room: validate, dispatch to a prefill and a decode replica, track to the end.

Both front doors (HTTP in `app`, the SDK's NATS entry in `natsapi`) go through `RouterCore`:
`prepare` checks a request against the model, `submit` dispatches it, `events` yields its
token chunks in order and ends with the final one. Every request in flight is watched: if a
replica it depends on stops heart-beating (or reports that the KV hop broke), the request is
resumed on other replicas: they prefill the prompt plus the tokens already streamed and go on
from there, so the client's stream continues (up to `max_resumes` times). With no replica free to
take it, the request waits up to `resume_wait_s` for one (a restarted replica, a phase flip). If
none comes, or nothing arrives for `request_timeout_s`, it ends with an error instead of hanging.

A replica whose heartbeat is late is probed: a NATS request to its control subject. "No
responders" means its connection is gone (the process died), and it counts as dead at once, well
before the heartbeat timeout; a replica that is only slow answers, or times out, and waits.

NATS core keeps nothing for a subscriber that is cut off, so a reconnect may have lost messages.
When the router reconnects, every request in flight is resumed on replicas heard from since; when a
replica's heartbeat shows a new session (it reconnected, or restarted under its id), the requests
sent to it before are resumed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import nats

from thunderserve.common import aio, config, protocol, tracing
from thunderserve.common.plan import Plan
from thunderserve.common.planstore import PlanWatcher
from thunderserve.common.protocol import (
    MAX_LOGPROBS,
    MAX_PENALTY,
    MAX_STOPS,
    SEED_RANGE,
    Abort,
    Heartbeat,
    PrefillRequest,
    SamplingParams,
    Subjects,
    TokenChunk,
)
from thunderserve.router.metrics import LatencyMetrics
from thunderserve.router.replicas import NoReplicaError, ReplicaTable
from thunderserve.router.workload import WorkloadRecorder

log = logging.getLogger(__name__)

PROMPT_LOGPROBS_BYTES = 900_000  # a prompt's log-probabilities, encoded, at most (NATS' default max payload: 1 MB)



class RequestError(Exception):
    """A request the router refuses or cannot finish; `status` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code


@dataclass
class InFlight:
    request_id: str  # what the client sees; stays the same when the request is resumed
    prompt_ids: list[int]
    sampling: SamplingParams
    kv_codec: str
    span: tracing.Span  # the router's span of this request: every hop's spans descend from it
    prefill_id: str = ""  # the current attempt's replicas ("" while parked), set by `_dispatch`
    decode_id: str = ""
    wire_id: str = ""  # the id replicas know this attempt by ("" = request_id); new on each resume
    resumes: int = 0
    waiting_since: float | None = None  # its replica failed and no other has taken it yet
    wait_reason: str = ""
    avoid: frozenset[str] = frozenset()  # the failed attempt's replicas
    fresh_after: float = 0.0  # resume only on replicas heard from after this (the router reconnected then)
    token_ids: list[int] = field(default_factory=list)  # streamed to the client so far
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    next_index: int = 0
    pending: dict[int, TokenChunk] = field(default_factory=dict)
    in_decode: bool = False  # decode's tokens arrive: the prefill replica is done with it
    finished: bool = False
    last_activity: float = field(default_factory=time.monotonic)
    submitted_at: float = field(default_factory=time.monotonic)
    last_token_at: float | None = None  # when its latest token reached the router

    def __post_init__(self) -> None:
        self.wire_id = self.wire_id or self.request_id

    @property
    def traceparent(self) -> str:
        return self.span.traceparent

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)


@dataclass
class RouterStats:
    requests: int = 0
    errors: int = 0
    resumed: int = 0
    replays: int = 0  # SDK requests to send events again (it missed some in a NATS drop)
    rejected: int = 0
    completion_tokens: int = 0
    prompt_tokens: int = 0


class RouterCore:
    def __init__(
        self,
        nats_url: str,
        subjects: Subjects,
        tokenizer,
        model_name: str,
        model_aliases: set[str],
        max_context: int,
        kv_codec: str | None = None,
        replica_timeout_s: float = 2.0,
        request_timeout_s: float = 120.0,
        max_resumes: int = 2,
        resume_wait_s: float = 30.0,
        workload_period_s: float = 5.0,
        max_inflight: int = 0,
    ):
        self.nats_url = nats_url
        self.subjects = subjects
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.model_aliases = model_aliases | {model_name}
        self.max_context = max_context
        self.kv_codec = kv_codec
        self.request_timeout_s = request_timeout_s
        self.max_resumes = max_resumes
        self.resume_wait_s = resume_wait_s
        self.workload_period_s = workload_period_s  # 0: send no workload reports
        self.max_inflight = max_inflight  # 0: no limit
        self.router_id = f"router-{uuid.uuid4().hex[:8]}"
        self.workload = WorkloadRecorder(self.router_id)
        self.replicas = ReplicaTable(replica_timeout_s)
        self.inflight: dict[str, InFlight] = {}
        self.stats = RouterStats()
        self.latency = LatencyMetrics()
        self.nc: nats.NATS | None = None
        self.plan: Plan | None = None  # replaced whole, never mutated: a request sees one plan
        self.draining = False  # stopping: no new requests, the ones in flight may finish
        self._plan_watcher: PlanWatcher | None = None
        self._tasks: list[asyncio.Task] = []
        self._probing: set[str] = set()  # replicas with a probe in flight

    async def start(self) -> None:
        self.nc = await aio.connect_nats(self.nats_url, self.router_id, max_reconnect_attempts=-1,
                                         reconnect_time_wait=0.5, reconnected_cb=self._on_reconnected)
        await self.nc.subscribe(self.subjects.heartbeats, cb=self._on_heartbeat)
        await self.nc.subscribe(self.subjects.tokens_wildcard(self.router_id), cb=self._on_chunk)
        self._tasks.append(asyncio.create_task(self._watchdog()))
        if self.workload_period_s > 0:
            self._tasks.append(asyncio.create_task(self._report_workload()))
        self._plan_watcher = PlanWatcher(self.nc, self.subjects, self._apply_plan)
        await self._plan_watcher.start()

    async def _apply_plan(self, plan: Plan) -> None:
        """New requests follow the new plan's tables; requests in flight keep their replicas."""
        self.plan = plan
        log.info("plan epoch %d: %d prefill, %d decode replicas", plan.epoch, len(plan.prefill_ids),
                 len(plan.decode_ids))

    def begin_drain(self) -> None:
        """Take no new requests (503); the ones in flight go on."""
        self.draining = True
        log.warning("draining: refusing new requests, %d in flight", len(self.inflight))

    async def drain(self, timeout_s: float) -> None:
        """Refuse new requests and wait up to `timeout_s` for the ones in flight to finish."""
        if not self.draining:
            self.begin_drain()
        deadline = time.monotonic() + timeout_s
        while self.inflight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.inflight:
            log.warning("drain timed out with %d request(s) in flight; failing them", len(self.inflight))

    async def stop(self) -> None:
        if self._plan_watcher is not None:
            await self._plan_watcher.stop()
        for task in self._tasks:
            task.cancel()
        for flight in list(self.inflight.values()):
            self._fail(flight, "router is shutting down")
        await aio.close_nats(self.nc)

    # --- request preparation ----------------------------------------------------------------

    def check_model(self, model: str | None) -> None:
        if model is not None and model not in self.model_aliases:
            raise RequestError(
                404, f"The model '{model}' does not exist; this server serves '{self.model_name}'",
                param="model", code="model_not_found",
            )

    def tokenize_prompt(self, prompt: str) -> list[int]:
        return list(self.tokenizer.encode(prompt, add_special_tokens=False))

    def tokenize_chat(self, messages: list[dict[str, str]]) -> list[int]:
        try:
            encoded = self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=True, return_dict=True
            )
        except Exception as exc:
            raise RequestError(400, f"cannot apply the chat template: {exc}", param="messages") from None
        return list(encoded["input_ids"])

    def check_request(self, prompt_ids: list[int], sampling: SamplingParams) -> None:
        if not prompt_ids:
            raise RequestError(400, "the prompt is empty", param="prompt")
        if len(prompt_ids) >= self.max_context:
            raise RequestError(
                400,
                f"This model's maximum context length is {self.max_context} tokens; the prompt has "
                f"{len(prompt_ids)} tokens.",
                param="prompt", code="context_length_exceeded",
            )
        scoring = sampling.prompt_logprobs is not None
        if sampling.max_tokens < (0 if scoring else 1):
            raise RequestError(400, "max_tokens must be at least 1 (0 only to score the prompt, with echo and "
                               "logprobs)", param="max_tokens")
        if scoring:
            k = sampling.prompt_logprobs
            if not 0 <= k <= MAX_LOGPROBS:
                raise RequestError(400, f"logprobs must be between 0 and {MAX_LOGPROBS}", param="logprobs")
            # They ride on one NATS message (~35 bytes per token, ~12 more per alternative; 1 MB at most).
            if len(prompt_ids) * (35 + 12 * k) > PROMPT_LOGPROBS_BYTES:
                raise RequestError(400, f"the prompt's log-probabilities with {k} alternatives each are too large "
                                   f"for one message at {len(prompt_ids)} prompt tokens; ask for fewer "
                                   "alternatives or a shorter prompt", param="logprobs")
        if len(prompt_ids) + sampling.max_tokens > self.max_context:
            raise RequestError(
                400,
                f"This model's maximum context length is {self.max_context} tokens; the prompt has "
                f"{len(prompt_ids)} tokens and max_tokens asks for {sampling.max_tokens} more.",
                param="max_tokens", code="context_length_exceeded",
            )
        if sampling.min_tokens > sampling.max_tokens:
            raise RequestError(400, "min_tokens cannot exceed max_tokens", param="min_tokens")
        if not 0.0 <= sampling.temperature <= 2.0:
            raise RequestError(400, "temperature must be between 0 and 2", param="temperature")
        if not 0.0 < sampling.top_p <= 1.0:
            raise RequestError(400, "top_p must be in (0, 1]", param="top_p")
        if sampling.top_k < 0:
            raise RequestError(400, "top_k must be at least 0 (0: no limit)", param="top_k")
        if not 0.0 <= sampling.min_p <= 1.0:
            raise RequestError(400, "min_p must be between 0 and 1", param="min_p")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -MAX_PENALTY <= getattr(sampling, name) <= MAX_PENALTY:
                raise RequestError(400, f"{name} must be between -{MAX_PENALTY:g} and {MAX_PENALTY:g}", param=name)
        if sampling.logprobs is not None and not 0 <= sampling.logprobs <= MAX_LOGPROBS:
            raise RequestError(400, f"logprobs must be between 0 and {MAX_LOGPROBS}", param="logprobs")
        if len(sampling.stop) > MAX_STOPS:
            raise RequestError(400, f"at most {MAX_STOPS} stop sequences", param="stop")
        if any(s == "" for s in sampling.stop):
            raise RequestError(400, "stop sequences must not be empty", param="stop")
        if sampling.seed is not None and not SEED_RANGE[0] <= sampling.seed < SEED_RANGE[1]:
            raise RequestError(400, "seed must be a 64-bit integer", param="seed")
        vocab = len(self.tokenizer)
        if any(not 0 <= t < vocab for t in sampling.logit_bias):
            raise RequestError(400, f"logit_bias keys must be token ids in [0, {vocab})", param="logit_bias")
        if any(not 0 <= t < vocab for t in sampling.stop_token_ids):
            raise RequestError(400, f"stop_token_ids must be token ids in [0, {vocab})", param="stop_token_ids")

    # --- dispatch and tracking --------------------------------------------------------------

    async def submit(
        self,
        prompt_ids: list[int],
        sampling: SamplingParams,
        traceparent: str | None = None,
        kv_codec: str | None = None,
    ) -> InFlight:
        """Dispatch a request. `kv_codec` overrides the deployment's codec for this request;
        `traceparent`: the caller's trace context (None: the request starts a trace)."""
        if self.draining:
            raise RequestError(503, "this router is shutting down; send the request to another router",
                               code="shutting_down")
        self.check_request(prompt_ids, sampling)
        if kv_codec is not None and kv_codec not in config.KV_CODECS:
            raise RequestError(400, f"unknown kv_codec {kv_codec!r}; choose one of {', '.join(config.KV_CODECS)}",
                               param="kv_codec")
        self.workload.arrived()  # demand, whether or not a replica takes it
        if 0 < self.max_inflight <= len(self.inflight):
            self.stats.rejected += 1
            raise RequestError(429, f"the server is at its limit of {self.max_inflight} requests in flight; "
                               "retry shortly", code="overloaded")
        try:
            prefill, decode = self._choose_pair()
        except NoReplicaError as exc:
            self.stats.rejected += 1
            raise RequestError(503, f"{exc}; try again shortly", code="no_replica") from None
        request_id = uuid.uuid4().hex
        span = tracing.start_span("router.request", traceparent, request_id=request_id,
                                  prompt_tokens=len(prompt_ids), max_tokens=sampling.max_tokens)
        flight = InFlight(request_id, prompt_ids, sampling, kv_codec or self.kv_codec or "", span)
        self.stats.requests += 1
        self.stats.prompt_tokens += len(prompt_ids)
        await self._dispatch(flight, prefill, decode)
        return flight

    def _choose_pair(self, avoid: frozenset[str] = frozenset(), seen_after: float = 0.0):
        """A prefill (or colocated) replica by the plan's dispatch weights, then a decode replica by its
        routes (a colocated replica decodes what it prefills); replicas in `avoid` (those a failed attempt
        used) only if there is no other, and only replicas heard from after `seen_after`."""
        plan = self.plan
        entry: tuple[str, ...] = ("prefill", "colocated")
        if not self.replicas.ready("decode", seen_after):  # a prefill replica could hand its KV to no one
            if not self.replicas.ready("colocated", seen_after):
                raise NoReplicaError("no decode (or colocated) replica is available")
            entry = ("colocated",)
        prefill = self.replicas.choose(entry, plan.dispatch if plan else None, avoid, seen_after)
        if prefill.beat.phase == "colocated":  # it decodes what it prefills
            return prefill, prefill
        routes = plan.routing.get(prefill.beat.replica_id) if plan else None
        return prefill, self.replicas.choose("decode", routes, avoid, seen_after)

    async def _dispatch(self, flight: InFlight, prefill, decode) -> None:
        """Send the flight's current attempt to this prefill/decode pair."""
        flight.prefill_id, flight.decode_id = prefill.beat.replica_id, decode.beat.replica_id
        self.inflight[flight.wire_id] = flight
        for view in {id(v): v for v in (prefill, decode)}.values():  # (once for a colocated replica)
            view.assigned += 1
            view.dispatched += 1
        prefill.prompts += 1
        message = PrefillRequest(
            request_id=flight.wire_id,
            prompt_token_ids=flight.prompt_ids,
            sampling=flight.sampling,
            reply_subject=self.subjects.tokens(self.router_id, flight.wire_id),
            decode_replica=flight.decode_id,
            decode_endpoint=decode.beat.endpoint,
            kv_codec=flight.kv_codec,
            resume_token_ids=list(flight.token_ids),
        )
        await self.nc.publish(
            self.subjects.prefill(flight.prefill_id),
            protocol.encode(message),
            headers=flight.span.headers,
        )

    async def _resume(self, flight: InFlight, why: str, avoid_failed: bool = True) -> bool:
        """Move a request whose replica failed to another pair, after the tokens it has streamed.

        True if dispatched, or parked until a replica can take it (the watchdog calls again; the
        failed attempt's replicas only if no other is ready, unless not `avoid_failed`). False if it
        cannot be resumed (resumed too often, or parked for `resume_wait_s`): the caller fails it."""
        # One token per chunk, so the stream so far is exactly `token_ids`; anything else: no resume.
        if flight.finished or flight.next_index != len(flight.token_ids):
            return False
        now = time.monotonic()
        if flight.waiting_since is None:
            if flight.resumes >= self.max_resumes:
                return False
            # Let go of the failed attempt; whichever of its replicas still lives drops it.
            flight.avoid = frozenset((flight.prefill_id, flight.decode_id)) if avoid_failed else frozenset()
            self._release_attempt(flight)
            with contextlib.suppress(Exception):
                await self.nc.publish(self.subjects.abort, protocol.encode(Abort(flight.wire_id, "resumed elsewhere")),
                                      headers=tracing.headers_for(flight.traceparent))
            flight.pending.clear()  # the old attempt's out-of-order chunks: its tokens come again
            flight.in_decode = False
            flight.waiting_since, flight.wait_reason = now, why
        try:
            prefill, decode = self._choose_pair(avoid=flight.avoid, seen_after=flight.fresh_after)
        except NoReplicaError:
            return now - flight.waiting_since < self.resume_wait_s
        self.inflight.pop(flight.wire_id, None)
        flight.waiting_since = None
        flight.resumes += 1
        flight.wire_id = f"{flight.request_id}-{flight.resumes}"  # no ".": it ends a NATS subject
        flight.last_activity = now
        self.stats.resumed += 1
        log.warning("request %s: %s; resuming after %d tokens on %s -> %s", flight.request_id, flight.wait_reason,
                    len(flight.token_ids), prefill.beat.replica_id, decode.beat.replica_id)
        flight.span.attributes[f"resume_{flight.resumes}"] = f"{flight.wait_reason}; {len(flight.token_ids)} tokens in"
        await self._dispatch(flight, prefill, decode)
        return True

    async def events(self, flight: InFlight) -> AsyncIterator[TokenChunk]:
        """The request's chunks in order; the last has `finish_reason` set. Aborts if abandoned."""
        try:
            while True:
                chunk = await flight.queue.get()
                yield chunk
                if chunk.finish_reason is not None:
                    return
        finally:
            if not flight.finished:
                await self.abort(flight, "client went away")

    async def abort(self, flight: InFlight, reason: str) -> None:
        self._finish(flight)
        with contextlib.suppress(Exception):
            await self.nc.publish(self.subjects.abort, protocol.encode(Abort(flight.wire_id, reason)),
                                  headers=tracing.headers_for(flight.traceparent))

    def _finish(self, flight: InFlight) -> None:
        if flight.finished:
            return
        flight.finished = True
        self.inflight.pop(flight.wire_id, None)
        self._release_attempt(flight)
        flight.span.end(completion_tokens=len(flight.token_ids), resumes=flight.resumes)

    def _release_attempt(self, flight: InFlight) -> None:
        """The flight's current attempt no longer occupies its replicas (prefill's share ends
        once decode's tokens flow)."""
        for rid in (flight.decode_id,) if flight.in_decode else dict.fromkeys((flight.prefill_id, flight.decode_id)):
            self._release(rid)
        if not flight.in_decode:
            self._prompt_done(flight.prefill_id)
        flight.prefill_id = flight.decode_id = ""

    def _release(self, replica_id: str) -> None:
        """A request no longer occupies this replica (for load-aware choice)."""
        view = self.replicas.replicas.get(replica_id)
        if view is not None and view.assigned > 0:
            view.assigned -= 1

    def _prompt_done(self, replica_id: str) -> None:
        """A request's prompt no longer waits on this entry replica (its first token came, or it left)."""
        view = self.replicas.replicas.get(replica_id)
        if view is not None and view.prompts > 0:
            view.prompts -= 1

    def _fail(self, flight: InFlight, error: str) -> None:
        if flight.finished:
            return
        self.stats.errors += 1
        flight.span.attributes["error"] = error
        chunk = TokenChunk.failure(flight.request_id, error, flight.prompt_len, flight.next_index,
                                   len(flight.token_ids))
        self._finish(flight)
        flight.queue.put_nowait(chunk)

    async def _resume_or_fail(self, flight: InFlight, why: str, avoid_failed: bool = True) -> None:
        if not await self._resume(flight, why, avoid_failed):
            self._fail(flight, why)

    async def _on_reconnected(self) -> None:
        """Back on NATS after a drop: what the replicas sent meanwhile, and what this router sent them,
        may be lost. Resume every request in flight on replicas heard from from now on."""
        now = time.monotonic()
        flights = [f for f in self.inflight.values() if f.waiting_since is None]  # parked ones wait anyway
        log.warning("reconnected to NATS; resuming the %d request(s) in flight", len(flights))
        for flight in flights:
            flight.fresh_after = now
            await self._resume_or_fail(flight, "the router's NATS connection dropped", avoid_failed=False)
        if self._plan_watcher is not None:  # in the background: nats.py awaits this callback mid-reconnect
            self._tasks.append(asyncio.create_task(self._plan_watcher.restart()))

    async def _on_heartbeat(self, msg) -> None:
        beat = protocol.decode_or_warn(Heartbeat, msg.data, log)
        if beat is None or not self.replicas.update(beat):
            return
        # A new session (it reconnected to NATS, or restarted): what was sent to it before may be lost.
        # A flight sent after this heartbeat went to the new session, so only the ones in flight now.
        rid = beat.replica_id
        for flight in list(self.inflight.values()):
            uses = flight.decode_id == rid or (not flight.in_decode and flight.prefill_id == rid)
            if uses and flight.waiting_since is None:
                await self._resume_or_fail(flight, f"replica {rid} reconnected to NATS or restarted")

    async def _on_chunk(self, msg) -> None:
        chunk = protocol.decode_or_warn(TokenChunk, msg.data, log)
        if chunk is None:
            return
        flight = self.inflight.get(chunk.request_id)
        if flight is None or flight.finished or flight.waiting_since is not None:  # parked: a dead attempt's
            return
        flight.last_activity = time.monotonic()
        if chunk.finish_reason == "error":
            if not (chunk.retryable and await self._resume(flight, chunk.error)):
                self._fail(flight, chunk.error or "request failed")
            return
        if chunk.index < flight.next_index:  # already streamed (a resumed attempt starts after it)
            return
        flight.pending[chunk.index] = chunk
        while flight.next_index in flight.pending:
            ready = flight.pending.pop(flight.next_index)
            flight.next_index += 1
            flight.token_ids += ready.token_ids
            self._time_tokens(flight, len(ready.token_ids))
            # The prefill replica streams index 0 itself; it is done once decode's tokens flow.
            if not flight.in_decode and (ready.index >= 1 or ready.finish_reason is not None):
                flight.in_decode = True
                self._prompt_done(flight.prefill_id)
                if flight.prefill_id != flight.decode_id:  # (a colocated replica goes on decoding it)
                    self._release(flight.prefill_id)
            self.stats.completion_tokens += len(ready.token_ids)
            if ready.finish_reason is not None:
                flight.span.attributes["finish_reason"] = ready.finish_reason
                self._finish(flight)
                self.latency.e2e.observe(time.monotonic() - flight.submitted_at)  # finished, not failed
                self.workload.finished(flight.prompt_len, len(flight.token_ids))
            flight.queue.put_nowait(ready)

    def _time_tokens(self, flight: InFlight, n: int) -> None:
        if n == 0:
            return
        now = time.monotonic()
        if flight.last_token_at is None:
            self.latency.ttft.observe(now - flight.submitted_at)
            n -= 1
        if n > 0:  # a chunk of several tokens: its gap is shared out among them
            self.latency.inter_token.observe((now - (flight.last_token_at or now)) / n, n)
        flight.last_token_at = now

    async def _probe(self, replica_id: str) -> None:
        """Is a late replica still on NATS? No responders on its control subject: it is gone."""
        try:
            if await aio.replica_gone(self.nc, self.subjects, replica_id):
                log.warning("replica %s is gone from NATS (late heartbeat, no responders)", replica_id)
                self.replicas.forget(replica_id)
        finally:
            self._probing.discard(replica_id)

    async def _watchdog(self) -> None:
        while True:
            await asyncio.sleep(0.2)
            for rid in self.replicas.overdue(protocol.PROBE_AFTER_S):
                if rid not in self._probing:
                    self._probing.add(rid)
                    self._tasks.append(asyncio.create_task(self._probe(rid)))
            self._tasks = [t for t in self._tasks if not t.done()]
            expired = self.replicas.expired()
            gone = set(expired)
            if left := sorted(rid for rid, clean in expired.items() if clean):
                log.info("replicas stopped: %s", ", ".join(left))
            if lost := sorted(rid for rid, clean in expired.items() if not clean):
                log.warning("replicas stopped responding: %s", ", ".join(lost))
            now = time.monotonic()
            for flight in list(self.inflight.values()):
                if flight.waiting_since is not None:  # parked: is there a replica for it now?
                    if not await self._resume(flight, flight.wait_reason):
                        self._fail(flight, f"{flight.wait_reason}; no replica could take the request within "
                                   f"{self.resume_wait_s:.0f} s")
                    continue
                lost = flight.decode_id if flight.decode_id in gone else None
                if not flight.in_decode and flight.prefill_id in gone:
                    lost = flight.prefill_id
                if lost is not None:
                    if not await self._resume(flight, f"replica {lost} stopped responding"):
                        self._fail(flight, f"replica {lost} stopped responding")
                        await self.abort(flight, "replica lost")
                elif now - flight.last_activity > self.request_timeout_s:
                    self._fail(flight, f"no progress for {self.request_timeout_s:.0f} s")
                    await self.abort(flight, "timeout")

    async def _report_workload(self) -> None:
        """Every `workload_period_s`, what arrived and finished: the planner's view of the load."""
        while True:
            await asyncio.sleep(self.workload_period_s)
            report = self.workload.report()
            with contextlib.suppress(Exception):  # NATS reconnecting: this period's figures are lost
                await self.nc.publish(self.subjects.workload, protocol.encode(report),
                                      headers=tracing.headers_for(None))  # a trace of its own

    def health(self) -> dict:
        prefill, decode = self.replicas.ready("prefill"), self.replicas.ready("decode")
        colocated = self.replicas.ready("colocated")
        return {
            "status": "ok" if (prefill and decode) or colocated else "unavailable",
            "model": self.model_name,
            "prefill_replicas": len(prefill),
            "decode_replicas": len(decode),
            "colocated_replicas": len(colocated),
            "in_flight": len(self.inflight),
            "plan_epoch": self.plan.epoch if self.plan else 0,
            "replicas": self.replicas.snapshot(),
        }
