"""The replica process: one engine (the weights, loaded once) hosting a swappable phase role.

`python -m thunderserve.prefill`, `.decode` and `.colocated` all run `ReplicaHost`; they differ
only in the role it starts with. A role is found by name (`ROLE_MODULES`), so
this shared library never imports a service statically, and a plan can flip a running
replica's phase: the host drains the old role and starts the other, the engine stays.

The host owns what outlives a role: the NATS connection, the heartbeat, the abort
subscription, the KV channel endpoints and the threads that run model work off the loop.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import os
import signal
import socket
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

import nats
import torch

from thunderserve.common import aio, config, kventropy, protocol, tracing
from thunderserve.common.engine import Engine, MockEngine, create_engine
from thunderserve.common.kvchannel import BACKENDS, DEFAULT_BACKEND, ChannelClient, ChannelHost
from thunderserve.common.memory import keep_freed_memory
from thunderserve.common.models import ModelNotFoundError, check_device, resolve_model
from thunderserve.common.plan import Plan
from thunderserve.common.planstore import PlanWatcher
from thunderserve.common.protocol import Abort, ControlCommand, Heartbeat, Subjects

log = logging.getLogger(__name__)

CHANNEL_THREADS = 32  # threads that accept pairs and send, receive, encode and decode KV

ROLE_MODULES = {"prefill": "thunderserve.prefill.role", "decode": "thunderserve.decode.role",
                "colocated": "thunderserve.colocated.role"}


class PhaseRole(Protocol):
    """What a phase role gives its host. Each role module exposes `create_role(host) -> PhaseRole`."""

    phase: str

    async def start(self) -> None: ...

    async def drain(self) -> None:
        """Stop taking new work and return once everything taken has finished."""

    async def stop(self) -> None: ...

    def abort(self, request_id: str) -> None: ...

    def load(self) -> tuple[int, int, int]:
        """(running, waiting, capacity)."""


def load_role(phase: str, host: ReplicaHost) -> PhaseRole:
    if phase not in ROLE_MODULES:
        raise ValueError(f"unknown phase {phase!r}; choose one of {', '.join(ROLE_MODULES)}")
    return importlib.import_module(ROLE_MODULES[phase]).create_role(host)


class ReplicaHost:
    def __init__(self, args: argparse.Namespace, phase: str):
        self.args = args
        self.phase = phase
        self.replica_id: str = args.replica_id or f"{phase}-{socket.gethostname()}-{uuid.uuid4().hex[:6]}"
        self.subjects = Subjects(args.subject_prefix)
        self.engine: Engine | MockEngine | None = None
        self.nc: nats.NATS | None = None
        self.role: PhaseRole | None = None
        self.state = "starting"
        self.plan: Plan | None = None  # the plan in force, once one is published
        self.plan_epoch = 0
        self.plan_kv_codec: str | None = None  # the current plan's codec, when a plan names one
        self.codec_threads = 1  # threads per KV cache encode/decode (set with the engine)
        self.kv_runs = max(1, args.kv_stream_runs)  # runs a compressed KV cache is streamed in
        self.kv_stream_early = bool(args.kv_stream_early)  # send those runs during the forward pass
        self._plan_watcher: PlanWatcher | None = None
        self.connection = 0  # NATS (re)connections so far
        self.incarnation = uuid.uuid4().hex[:12]  # this process; with `connection`, the heartbeat's session
        # One thread runs the model (torch work is serial per replica); others move KV.
        self.model_executor = ThreadPoolExecutor(1, thread_name_prefix="model")
        # Mostly waiting on sockets: a decode replica holds one for each early handoff whose prefill pass is still
        # running (one per prefill replica sending to it), so a small pool would hold the next one's KV back.
        self.channel_executor = ThreadPoolExecutor(CHANNEL_THREADS, thread_name_prefix="kvchannel")
        self._channel_host: ChannelHost | None = None
        self.channel_pairs: dict[str, asyncio.Future] = {}  # pair id -> its accept, for the roles that receive KV
        self.gpu = args.device if args.device.startswith("cuda") else None  # nccl pairs move KV through it
        self.channel_client = ChannelClient(timeout_s=args.channel_timeout, backend=args.channel_backend,
                                            gpu=self.gpu)
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task] = []

    # --- shared resources for roles ---------------------------------------------------------

    @property
    def channel_host(self) -> ChannelHost:
        if self._channel_host is None:
            self._channel_host = ChannelHost(host=self.args.channel_host, port=self.args.channel_port,
                                             timeout_s=self.args.channel_timeout, gpu=self.gpu)
        return self._channel_host

    def publish_soon(self, subject: str, message, headers: dict | None = None) -> None:
        """Publish from any thread (the decode step loop publishes tokens this way)."""
        data = protocol.encode(message)
        self.loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self._publish(subject, data, headers)))

    async def _publish(self, subject: str, data: bytes, headers: dict | None) -> None:
        try:
            await self.nc.publish(subject, data, headers=headers)
        except Exception as exc:  # a closed connection during shutdown is not worth a crash
            log.warning("publish to %s failed: %s", subject, exc)

    # --- life cycle -------------------------------------------------------------------------

    async def run(self) -> None:
        self.loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.loop.add_signal_handler(sig, self._stop.set)
        log.info("%s: loading model %s", self.replica_id, self.args.model)
        self.engine = await self.loop.run_in_executor(self.model_executor, self._load_engine)
        self.nc = await aio.connect_nats(self.args.nats, self.replica_id, max_reconnect_attempts=-1,
                                         reconnect_time_wait=0.5, reconnected_cb=self._on_reconnected)
        self.connection = 1
        await self.nc.subscribe(self.subjects.abort, cb=self._on_abort)
        await self.nc.subscribe(self.subjects.control(self.replica_id), cb=self._on_control)
        self.role = load_role(self.phase, self)
        await self.role.start()
        self.state = "ready"
        self._tasks.append(asyncio.create_task(self._heartbeat_loop()))
        self._plan_watcher = PlanWatcher(self.nc, self.subjects, self.apply_plan)
        await self._plan_watcher.start()
        log.info("%s: ready as %s (model %s)", self.replica_id, self.phase, self.engine.name)
        await self._stop.wait()
        await self.shutdown()

    def _load_engine(self) -> Engine:
        engine = create_engine(self.args.model, self.args.dtype, self.args.threads, self.args.device)
        # the int4 codec's compiled parts, so the first transfer does not wait
        log.info("%s: loading the KV codec's kernels (compiled once, ~25 s, on a first start)", self.replica_id)
        kventropy.warm_up()
        self.codec_threads = self.args.kv_codec_threads or torch.get_num_threads()
        return engine

    async def _on_reconnected(self) -> None:
        """Back on NATS: say so in the next heartbeat (the router re-sends what it may have lost) and
        watch the plan afresh."""
        self.connection += 1
        log.warning("%s: reconnected to NATS (connection %d)", self.replica_id, self.connection)
        await self._send_heartbeat()
        if self._plan_watcher is not None:  # in the background: nats.py awaits this callback mid-reconnect
            self._tasks.append(asyncio.create_task(self._plan_watcher.restart()))

    async def shutdown(self) -> None:
        log.info("%s: stopping (draining in-flight work)", self.replica_id)
        self.state = "stopping"
        if self._plan_watcher is not None:
            await self._plan_watcher.stop()
        await self._send_heartbeat()
        if self.role is not None:
            try:
                await asyncio.wait_for(self.role.drain(), timeout=self.args.drain_timeout)
            except TimeoutError:
                log.warning("%s: drain timed out; stopping anyway", self.replica_id)
            await self.role.stop()
        for task in self._tasks:
            task.cancel()
        await aio.close_nats(self.nc)
        self.model_executor.shutdown(wait=False, cancel_futures=True)
        self.channel_executor.shutdown(wait=False, cancel_futures=True)
        if self._channel_host is not None:
            self._channel_host.close()

    async def set_phase(self, phase: str) -> None:
        """Swap the phase role in place: drain the old one, start the new one; weights stay."""
        if phase == self.phase:
            return
        new_role = load_role(phase, self)  # validate the name before draining anything
        self.state = "draining"
        await self._send_heartbeat()
        await self.role.drain()
        await self.role.stop()
        self.role, self.phase = new_role, phase
        await self.role.start()
        self.state = "ready"
        await self._send_heartbeat()
        log.info("%s: now serving %s", self.replica_id, phase)

    async def apply_plan(self, plan: Plan) -> None:
        """Hot-apply a plan: take the phase it gives this replica (weights stay), adopt its codec."""
        mine = next((r for r in plan.replicas if r.id == self.replica_id), None)
        if mine is not None and mine.phase in ROLE_MODULES and mine.phase != self.phase:
            await self.set_phase(mine.phase)
        self.plan = plan
        self.plan_kv_codec = plan.kv_codec or None
        self.plan_epoch = plan.epoch  # the heartbeat carries it: the planner's acknowledgement
        await self._send_heartbeat()

    # --- NATS handlers ----------------------------------------------------------------------

    async def _on_abort(self, msg) -> None:
        abort = protocol.decode_or_warn(Abort, msg.data, log)
        if abort is not None and self.role is not None:
            self.role.abort(abort.request_id)

    async def _on_control(self, msg) -> None:
        try:
            command = protocol.decode(ControlCommand, msg.data)
            if command.phase:
                await self.set_phase(command.phase)
            reply = {"ok": True, "phase": self.phase}
        except Exception as exc:
            reply = {"ok": False, "error": str(exc)}
        if msg.reply:
            await aio.respond(self.nc, msg, protocol.encode(reply))

    def heartbeat(self) -> Heartbeat:
        running, waiting, capacity = self.role.load() if self.role else (0, 0, 0)
        endpoint = self._channel_host.endpoint if self._channel_host is not None else ""
        return Heartbeat(
            replica_id=self.replica_id,
            phase=self.phase,
            model=self.engine.name if self.engine else "",
            endpoint=endpoint,
            running=running,
            waiting=waiting,
            capacity=capacity,
            plan_epoch=self.plan_epoch,
            state=self.state,
            max_context=self.engine.max_context if self.engine else 0,
            session=f"{self.incarnation}-{self.connection}",
        )

    async def _send_heartbeat(self) -> None:
        if self.nc is None or self.nc.is_closed:
            return
        try:
            await self.nc.publish(self.subjects.heartbeat(self.replica_id), protocol.encode(self.heartbeat()),
                                  headers=tracing.headers_for(None))
        except Exception as exc:
            log.debug("heartbeat failed: %s", exc)

    async def _heartbeat_loop(self) -> None:
        while True:
            await self._send_heartbeat()
            await asyncio.sleep(protocol.HEARTBEAT_INTERVAL_S)


def build_parser(phase: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"python -m thunderserve.{phase}",
        description=f"A ThunderServe replica that starts in the {phase} phase. It loads the model "
        "once, serves its phase over NATS, and can be flipped to another phase (prefill, decode, or "
        "colocated: both in one replica) by a plan without reloading weights.",
    )
    config.add_nats_args(parser)
    config.add_model_args(parser)
    group = parser.add_argument_group("replica")
    group.add_argument("--replica-id", default=config.env("REPLICA_ID", ""),
                       help="unique name of this replica (default: <phase>-<host>-<random>)")
    group.add_argument("--kv-codec", default=config.env("KV_CODEC", None),
                       help="KV codec for transfers this replica sends (default: the codec library's default)")
    group.add_argument("--kv-codec-threads", type=int, default=config.env("KV_CODEC_THREADS", 0, int),
                       help="threads that encode (prefill) or decode (decode) one KV cache, each a run of its "
                       "layers; 0 = as many as the model's torch threads (default 0)")
    group.add_argument("--kv-stream-runs", type=int, default=config.env("KV_STREAM_RUNS", 4, int),
                       help="prefill: send a compressed KV cache in this many runs of layers, each encoded while "
                       "the decode replica decodes the one before (1 = one payload; `none` always goes as one) "
                       "(default 4)")
    group.add_argument("--kv-stream-early", action=argparse.BooleanOptionalAction,
                       default=config.env("KV_STREAM_EARLY", 1, int) != 0,
                       help="prefill: hand a request off to its decode replica as the forward pass starts, and "
                       "encode and send each run of a streamed KV cache as soon as the pass has computed its "
                       "layers, the first token after them (tcp channel; default on; "
                       "THUNDERSERVE_KV_STREAM_EARLY=0 turns it off)")
    group.add_argument("--max-batch", type=int, default=config.env("MAX_BATCH", 64, int),
                       help="decode: most sequences in the running batch (default 64)")
    group.add_argument("--token-budget", type=int, default=config.env("TOKEN_BUDGET", 512, int),
                       help="colocated: tokens per iteration, one per running sequence plus prompt chunks; a plan's "
                       "meta.token_budget overrides it (default 512)")
    group.add_argument("--channel-host", default=config.env("CHANNEL_HOST", "127.0.0.1"),
                       help="decode: address the KV channel rendezvous listens on and advertises")
    group.add_argument("--channel-port", type=int, default=config.env("CHANNEL_PORT", 0, int),
                       help="decode: port of the KV channel rendezvous (0 = any free port)")
    group.add_argument("--channel-backend", default=config.env("CHANNEL_BACKEND", DEFAULT_BACKEND), choices=BACKENDS,
                       help="prefill: KV channel transport: 'tcp' (a socket per pair, CPU tensors), 'gloo' "
                       f"(torch.distributed, CPU) or 'nccl' (torch.distributed, CUDA) (default {DEFAULT_BACKEND})")
    group.add_argument("--channel-timeout", type=float, default=config.env("CHANNEL_TIMEOUT", 30.0, float),
                       help="seconds a KV transfer may take before it fails (default 30)")
    group.add_argument("--drain-timeout", type=float, default=config.env("DRAIN_TIMEOUT", 30.0, float),
                       help="seconds to finish in-flight work on shutdown or phase change (default 30)")
    group.add_argument("--nice", type=int, default=config.env("NICE", 0, int),
                       help="raise this process's nice value (lower CPU priority) by N; on a shared host, "
                       "decode replicas yield to prefill so prompts are not starved (default 0)")
    config.add_logging_args(parser)
    return parser


def main(phase: str, argv: list[str] | None = None) -> int:
    parser = build_parser(phase)
    args = parser.parse_args(argv)
    try:  # a wrong model or device is the user's to fix: say so in one line, before connecting anywhere
        resolve_model(args.model)
        device = check_device(args.device) if args.model.lower() != "mocker" else None  # (the mocker has no model)
        if args.channel_backend == "nccl" and (device is None or device.type != "cuda"):
            raise ValueError("--channel-backend nccl moves KV between GPUs: it needs --device cuda")
    except (ValueError, ModelNotFoundError) as exc:
        parser.error(str(exc))
    logging.basicConfig(level=args.log_level, format=f"%(asctime)s {phase} %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.nice:
        os.nice(args.nice)
    # Tokens cross threads here (event loop <-> model/step/channel threads); a thread waiting for
    # the GIL otherwise waits up to 5 ms for a busy one to yield it.
    sys.setswitchinterval(float(os.environ.get("THUNDERSERVE_SWITCH_INTERVAL", "0.0005")))
    keep_freed_memory()  # model steps and KV codec passes reuse mapped pages (common/memory.py)
    host = ReplicaHost(args, phase)
    tracing.configure(host.replica_id)  # spans to $THUNDERSERVE_TRACE_DIR, if set
    try:
        aio.run(host.run())
    except KeyboardInterrupt:
        pass
    return 0
