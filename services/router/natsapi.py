"""The router's NATS entry for the client SDK (`thunderserve.common.client`).

The SDK sends a `CompletionRequest` as a NATS request; the router answers at once with an
acceptance (or the same 4xx error the HTTP API would give), then streams `CompletionEvent`s
to the SDK's inbox until the final one. Events are numbered and kept until `KEEP_S` after the
request ends: an SDK that missed some (NATS keeps nothing for a client that is cut off) asks this
router to replay them (`ReplayRequest` on `<prefix>.api.replay.<router>`).
"""

from __future__ import annotations

import asyncio
import logging

from pydantic import TypeAdapter, ValidationError

from thunderserve.common import aio, protocol, tracing
from thunderserve.common.protocol import CompletionEvent, CompletionRequest, ReplayReply, ReplayRequest
from thunderserve.router.core import RequestError, RouterCore
from thunderserve.router.openai_schema import ChatMessage, ChatMessages, chat_messages, validation_message

log = logging.getLogger(__name__)

QUEUE_GROUP = "routers"
KEEP_S = 60.0  # how long a finished request's events stay available for replay
MAX_REPLAY = 4096  # events per replay reply (the SDK asks again for the rest); ~50 bytes each


_MESSAGES = TypeAdapter(ChatMessages)


def _sdk_messages(messages: list) -> list[ChatMessage]:
    """The SDK's chat messages under the HTTP API's rules (roles, text-only content parts), or its 400."""
    try:
        return _MESSAGES.validate_python(messages)
    except ValidationError as exc:
        message, param = validation_message(exc.errors(), ("messages",))
        raise RequestError(400, message, param=param) from None


class NatsEntry:
    def __init__(self, core: RouterCore):
        self.core = core
        self._subs: list = []
        self._tasks: set[asyncio.Task] = set()
        self._history: dict[str, list[CompletionEvent]] = {}  # request id -> its events so far

    @property
    def replay_subject(self) -> str:
        return self.core.subjects.api_replay(self.core.router_id)

    async def start(self) -> None:
        nc = self.core.nc
        self._subs = [await nc.subscribe(self.core.subjects.api_completions, queue=QUEUE_GROUP, cb=self._on_request),
                      await nc.subscribe(self.replay_subject, cb=self._on_replay)]

    async def stop(self) -> None:
        for sub in self._subs:
            await sub.unsubscribe()
        for task in list(self._tasks):
            task.cancel()

    async def _on_request(self, msg) -> None:
        core = self.core
        try:
            request = protocol.decode(CompletionRequest, msg.data)
            if not request.reply_subject:
                raise RequestError(400, "reply_subject is required")
            core.check_model(request.model)
            if request.messages is not None:  # checked and templated as the HTTP API's chat messages are
                prompt_ids = core.tokenize_chat(chat_messages(_sdk_messages(request.messages)))
            elif request.prompt is not None:
                prompt_ids = core.tokenize_prompt(request.prompt)
            else:
                raise RequestError(400, "either prompt or messages is required", param="prompt")
            parent = tracing.traceparent_of(msg)
            flight = await core.submit(prompt_ids, request.sampling, parent,
                                       kv_codec=request.kv_codec)
        except RequestError as exc:
            refusal = CompletionEvent("", error=exc.message, status=exc.status)
            await aio.respond(self.core.nc, msg, protocol.encode(refusal))
            return
        except protocol.ProtocolError as exc:
            await aio.respond(self.core.nc, msg, protocol.encode(CompletionEvent("", error=str(exc), status=400)))
            return
        accepted = CompletionEvent(flight.request_id, status=202, replay_subject=self.replay_subject)
        await aio.respond(self.core.nc, msg, protocol.encode(accepted))
        task = asyncio.create_task(self._relay(flight, request.reply_subject))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _relay(self, flight, reply_subject: str) -> None:
        nc = self.core.nc
        history = self._history[flight.request_id] = []
        try:
            async for chunk in self.core.events(flight):
                event = CompletionEvent(
                    request_id=flight.request_id,
                    text=chunk.text,
                    token_ids=chunk.token_ids,
                    finish_reason=chunk.finish_reason,
                    usage=chunk.usage,
                    error=chunk.error,
                    status=503 if chunk.finish_reason == "error" else 200,
                    index=len(history),
                    logprobs=chunk.logprobs,
                    prompt_logprobs=chunk.prompt_logprobs,
                )
                history.append(event)
                await nc.publish(reply_subject, protocol.encode(event),
                                 headers=tracing.headers_for(flight.traceparent))
        finally:
            asyncio.get_running_loop().call_later(KEEP_S, self._history.pop, flight.request_id, None)

    async def _on_replay(self, msg) -> None:
        ask = protocol.decode_or_warn(ReplayRequest, msg.data, log)
        if ask is None:
            return
        self.core.stats.replays += 1
        events = self._history.get(ask.request_id)
        reply = ReplayReply(events[max(0, ask.from_index):][:MAX_REPLAY]) if events is not None \
            else ReplayReply(known=False)
        await aio.respond(self.core.nc, msg, protocol.encode(reply))
