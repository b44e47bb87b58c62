"""The router's NATS entry for the client SDK (`thunderserve.common.client`).

The SDK sends a `CompletionRequest` as a NATS request; the router answers at once with an
acceptance (or the same 4xx error the HTTP API would give), then streams `CompletionEvent`s
to the SDK's inbox until the final one.
"""

from __future__ import annotations

import asyncio
import logging

from thunderserve.common import aio, protocol, tracing
from thunderserve.common.protocol import CompletionEvent, CompletionRequest
from thunderserve.router.core import RequestError, RouterCore

log = logging.getLogger(__name__)

QUEUE_GROUP = "routers"


class NatsEntry:
    def __init__(self, core: RouterCore):
        self.core = core
        self._sub = None
        self._tasks: set[asyncio.Task] = set()

    async def start(self) -> None:
        self._sub = await self.core.nc.subscribe(
            self.core.subjects.api_completions, queue=QUEUE_GROUP, cb=self._on_request
        )

    async def stop(self) -> None:
        if self._sub is not None:
            await self._sub.unsubscribe()
        for task in list(self._tasks):
            task.cancel()

    async def _on_request(self, msg) -> None:
        core = self.core
        try:
            request = protocol.decode(CompletionRequest, msg.data)
            if not request.reply_subject:
                raise RequestError(400, "reply_subject is required")
            core.check_model(request.model)
            if request.messages is not None:
                prompt_ids = core.tokenize_chat(request.messages)
            elif request.prompt is not None:
                prompt_ids = core.tokenize_prompt(request.prompt)
            else:
                raise RequestError(400, "either prompt or messages is required", param="prompt")
            parent = tracing.traceparent_of(msg)
            flight = await core.submit(prompt_ids, request.sampling, tracing.child_traceparent(parent),
                                       kv_codec=request.kv_codec)
        except RequestError as exc:
            refusal = CompletionEvent("", error=exc.message, status=exc.status)
            await aio.respond(self.core.nc, msg, protocol.encode(refusal))
            return
        except protocol.ProtocolError as exc:
            await aio.respond(self.core.nc, msg, protocol.encode(CompletionEvent("", error=str(exc), status=400)))
            return
        await aio.respond(self.core.nc, msg, protocol.encode(CompletionEvent(flight.request_id, status=202)))
        task = asyncio.create_task(self._relay(flight, request.reply_subject))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _relay(self, flight, reply_subject: str) -> None:
        nc = self.core.nc
        async for chunk in self.core.events(flight):
            event = CompletionEvent(
                request_id=flight.request_id,
                text=chunk.text,
                token_ids=chunk.token_ids,
                finish_reason=chunk.finish_reason,
                usage=chunk.usage,
                error=chunk.error,
                status=503 if chunk.finish_reason == "error" else 200,
            )
            await nc.publish(reply_subject, protocol.encode(event), headers=tracing.headers_for(flight.traceparent))
