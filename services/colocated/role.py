"""The colocated role: one replica prefills a request and decodes it too, with no KV transfer.

Requests arrive on `<prefix>.prefill.<replica>`, as for a prefill replica. The decode role's step
thread owns the engine and runs the prompts' prefills there in chunks between decode steps: each
iteration runs one decode step for the whole batch, then prompt chunks of at most the token budget
less the batch size (vLLM's chunked prefill, without fusing the two into one pass). A long prompt then
delays the running sequences by one chunk, not by its whole prefill, and a finished prefill's KV
joins the batch where it lies. The replica also takes KV handoffs as a decode replica does, so a plan
may route prefill replicas to it, and a plan can flip it to either phase and back (weights stay).
"""

from __future__ import annotations

import logging
import queue
from dataclasses import dataclass

from thunderserve.common import protocol, tracing
from thunderserve.common.engine import ChunkedPrefill
from thunderserve.common.protocol import KVHandoff, PrefillRequest
from thunderserve.common.sequence import first_token_chunk, scores_prompt
from thunderserve.decode.role import DecodeRole

log = logging.getLogger(__name__)

DEFAULT_TOKEN_BUDGET = 512  # vLLM's best budget in the planner's simulations (docs/benchmarks.md)
MIN_CHUNK = 16  # prompt tokens an iteration runs even when the decode batch fills the budget


@dataclass
class _Prefill:
    request: PrefillRequest
    span: tracing.Span
    work: ChunkedPrefill | None = None  # started once the step thread takes it up
    chunks: int = 0

    def handoff(self, first_token_id: int = -1) -> KVHandoff:
        """The request as this replica's own decode side takes it: its first token already sent, no KV to
        receive."""
        r = self.request
        return KVHandoff(request_id=r.request_id, prefill_replica="", pair_id="", tag=0,
                         prompt_token_ids=r.prompt_token_ids, first_token_id=first_token_id, sampling=r.sampling,
                         reply_subject=r.reply_subject, kv_manifest={}, first_chunk_sent=True,
                         resume_token_ids=r.resume_token_ids)


class ColocatedRole(DecodeRole):
    phase = "colocated"

    def __init__(self, host):
        super().__init__(host)
        self._arrivals: queue.Queue[_Prefill] = queue.Queue()  # from the event loop
        self._current: _Prefill | None = None  # step thread: the prompt being prefilled (one at a time, in order)
        self._prefill_sub = None

    async def start(self) -> None:
        await super().start()
        self._prefill_sub = await self.host.nc.subscribe(self.host.subjects.prefill(self.host.replica_id),
                                                         cb=self._on_request)

    async def drain(self) -> None:
        if self._prefill_sub is not None:
            await self._prefill_sub.unsubscribe()
            self._prefill_sub = None
        await super().drain()

    def _busy(self) -> bool:
        return super()._busy() or self._current is not None or not self._arrivals.empty()

    def load(self) -> tuple[int, int, int]:
        running, waiting, capacity = super().load()
        return running, waiting + self._arrivals.qsize() + (self._current is not None), capacity

    @property
    def token_budget(self) -> int:
        """Tokens per iteration, decode steps included: the plan's, else this replica's flag."""
        plan = self.host.plan
        budget = plan.meta.get("token_budget") if plan is not None else None
        return int(budget or getattr(self.host.args, "token_budget", 0) or DEFAULT_TOKEN_BUDGET)

    # --- requests ---------------------------------------------------------------------------

    async def _on_request(self, msg) -> None:
        request = protocol.decode_or_warn(PrefillRequest, msg.data, log)
        if request is None:
            return
        span = tracing.start_span("colocated.request", tracing.traceparent_of(msg), request_id=request.request_id,
                                  prompt_tokens=len(request.prompt_token_ids) + len(request.resume_token_ids))
        job = _Prefill(request, span)
        if not self._accepting:
            span.end(error="not serving")
            self._publish_error(job.handoff(), "replica is no longer serving requests", span.headers, retryable=True)
            return
        self._arrivals.put(job)
        self._wake.set()

    # --- the step thread --------------------------------------------------------------------

    def _between_steps(self, batch) -> bool:
        """Prompt chunks up to the token budget less the batch's decode tokens (at least MIN_CHUNK), in
        arrival order. A prompt is started only while the batch has room for it."""
        budget = max(self.token_budget - len(batch), MIN_CHUNK)
        while budget > 0:
            job = self._next_prefill(batch)
            if job is None:
                break
            n = min(budget, job.work.remaining)
            budget -= n
            self._advance(job, n)
        return self._current is not None or (not self._arrivals.empty() and self._has_room(batch))

    def _has_room(self, batch) -> bool:
        return len(batch) + self._joins.qsize() + (self._current is not None) < self.max_batch

    def _next_prefill(self, batch) -> _Prefill | None:
        """The prefill in progress, else the next arrival (aborted ones dropped), if the batch has room."""
        while self._current is not None or (self._has_room(batch) and not self._arrivals.empty()):
            if self._current is None:
                self._current = self._arrivals.get_nowait()
            job = self._current
            request_id = job.request.request_id
            if request_id in self._aborted:
                del self._aborted[request_id]
                self._current = None
                job.span.end(aborted=True)
                continue
            if job.work is None:
                try:
                    tokens = job.request.prompt_token_ids + job.request.resume_token_ids
                    job.work = self.engine.start_prefill(tokens, prompt_logits=scores_prompt(job.request))
                except Exception as exc:
                    self._current = None
                    self._prefill_failed(job, exc)
                    continue
                job.span.attributes["prefill_started_batch"] = len(batch)
            return job
        return None

    def _advance(self, job: _Prefill, tokens: int) -> None:
        """Run one chunk of `job`'s prompt; once its last chunk is in, send its first token and queue it to
        join the batch (or finish it there, if that token ends it)."""
        try:
            result = job.work.advance(tokens)
            job.chunks += 1
            if result is None:
                return
            self._current = None
            chunk = first_token_chunk(job.request, result.logits, result.prompt_logits, self.engine)
        except Exception as exc:
            self._current = None
            self._prefill_failed(job, exc)
            return
        job.span.attributes["prefill_chunks"] = job.chunks
        if chunk.finish_reason is not None:  # (ended before its last chunk goes, as the decode role's)
            job.span.end(completion_tokens=len(chunk.token_ids), finish_reason=chunk.finish_reason)
        self.host.publish_soon(job.request.reply_subject, chunk, job.span.headers)
        if chunk.finish_reason is None:
            self._join(job.handoff(chunk.token_ids[0]), job.span, result.kv)

    def _prefill_failed(self, job: _Prefill, exc: Exception) -> None:
        log.warning("request %s: prefill failed: %s", job.request.request_id, exc)
        job.span.end(error=f"prefill failed: {exc}")
        self._publish_error(job.handoff(), f"prefill failed: {exc}", job.span.headers)


def create_role(host) -> ColocatedRole:
    return ColocatedRole(host)
