"""A whole ThunderServe deployment as local processes: NATS, a router, prefill, decode and colocated replicas.

`thunderserve up` runs one; the end-to-end tests and benchmarks run the same class, so the
tested path is the one users start. Children get SIGTERM on stop (they drain and exit) and
die with the launcher if it is killed (PR_SET_PDEATHSIG), so nothing is left behind.
`supervise` restarts a router or replica that exits (`thunderserve up` runs it; tests that kill
a replica on purpose do not).

With `plan_file` (a plan made by `thunderserve plan --json`), the processes are the plan's replicas:
one per replica, under its id and in its phase, plus a live planner process
(`thunderserve plan --live --from-plan`) that publishes the plan and re-plans it when a replica
dies or the traffic shifts. The local processes stand in for the plan's GPUs.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from thunderserve.common.models import resolve_model
from thunderserve.common.natsserver import NatsServer, free_port
from thunderserve.common.plan import Plan

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


@dataclass(frozen=True)
class RestartPolicy:
    """How `LocalCluster.supervise` restarts a service that exited."""

    limit: int = 3  # restarts of one service within `window_s`; one more exit and it stays down
    window_s: float = 300.0
    backoff_s: float = 1.0  # wait before the k-th restart in the window: backoff_s * 2^(k-1), at most 30 s

    def delay(self, restarts_in_window: int) -> float:
        return min(30.0, self.backoff_s * 2 ** restarts_in_window)


@dataclass
class LocalCluster:
    model: str = "smollm2"
    prefill: int = 1
    decode: int = 1
    colocated: int = 0  # replicas that run both phases (no KV transfer)
    token_budget: int = 0  # colocated replicas' tokens per iteration (0 = the replica's default)
    kv_codec: str | None = None
    dtype: str = "float32"
    # where the replicas run their models: "cpu", "cuda:N", or "cuda": each replica on a GPU of its own
    # as far as they go (the k-th replica started on GPU k mod the host's GPU count)
    device: str = "cpu"
    http_host: str = "127.0.0.1"
    http_port: int = 0  # 0 = a free port
    nats_url: str | None = None  # None = start an embedded nats-server
    subject_prefix: str = "ts"
    threads_per_replica: int = 0  # 0 = share the cores out
    max_batch: int = 64
    # Replicas here share one host's cores. A positive value runs decode replicas at a lower CPU
    # priority, so prompts (what time-to-first-token waits on) go first (0 = equal priority).
    decode_nice: int = 0
    log_dir: str | None = None  # None = children inherit this process's stdout/stderr
    log_level: str = "INFO"
    extra_env: dict[str, str] = field(default_factory=dict)
    plan_file: str | None = None  # serve this plan's replicas, with a live planner (prefill/decode unused)
    planner_args: list[str] = field(default_factory=list)  # more flags for the live planner
    procs: dict[str, subprocess.Popen] = field(default_factory=dict, init=False)
    nats: NatsServer | None = field(default=None, init=False)
    _expected_dead: set[str] = field(default_factory=set, init=False)  # killed on purpose
    _phases: dict[str, str] = field(default_factory=dict, init=False)  # replica name -> the phase it started in
    _devices: dict[str, str] = field(default_factory=dict, init=False)  # replica name -> its device, kept on restarts

    def __post_init__(self) -> None:
        self.plan = Plan.from_json(Path(self.plan_file).read_text()) if self.plan_file else None
        if self.plan is not None:
            self.plan.validate()
            bad = [r.id for r in self.plan.replicas if not r.id or not all(c.isalnum() or c in "-_" for c in r.id)]
            if bad:  # ids end NATS subjects and log file names
                raise ValueError(f"replica ids may hold only letters, digits, '-' and '_': {', '.join(bad)}")
            self.prefill, self.decode = len(self.plan.ids("prefill")), len(self.plan.ids("decode"))
            self.colocated = len(self.plan.ids("colocated"))
        if self.device != "cpu" and self.model.lower() != "mocker":
            from thunderserve.common.models import check_device

            check_device(self.device)  # a ValueError that says what this host has
        missing = [ph for ph, n in (("prefill", self.prefill), ("decode", self.decode)) if not n]
        if (self.prefill or self.decode or not self.colocated) and missing:
            where = f"{self.plan_file}: the plan" if self.plan is not None else "the deployment"
            raise ValueError(f"{where} has no {' and no '.join(missing)} replica: prefill and decode replicas "
                             "serve in pairs, give at least 1 of each (or only colocated replicas)")

    @property
    def http_url(self) -> str:
        return f"http://{self.http_host}:{self.http_port}"

    def replica_specs(self) -> list[tuple[str, str]]:
        """(name, phase) of every replica process: the plan's, or prefill-i, decode-j and colocated-k."""
        if self.plan is not None:
            return [(r.id, r.phase) for r in self.plan.replicas]
        counts = (("prefill", self.prefill), ("decode", self.decode), ("colocated", self.colocated))
        return [(f"{phase}-{i}", phase) for phase, n in counts for i in range(n)]

    def _threads(self) -> int:
        if self.threads_per_replica > 0:
            return self.threads_per_replica
        return max(1, (os.cpu_count() or 1) // max(1, self.prefill + self.decode + self.colocated))

    def _spawn(self, name: str, module: str, args: list[str]) -> subprocess.Popen:
        cmd = [sys.executable, "-m", module, *args]
        env = {**os.environ, **self.extra_env, "TOKENIZERS_PARALLELISM": "false"}
        if self.log_dir:
            Path(self.log_dir).mkdir(parents=True, exist_ok=True)
            out = open(Path(self.log_dir) / f"{name}.log", "ab")  # noqa: SIM115 - owned by the child
        else:
            out = None
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT if out else None,
                                preexec_fn=_die_with_parent)
        if out is not None:
            out.close()
        self.procs[name] = proc
        return proc

    def _common(self) -> list[str]:
        return ["--nats", self.nats_url, "--subject-prefix", self.subject_prefix, "--log-level", self.log_level]

    def start_replica(self, phase: str, index: int | str) -> subprocess.Popen:
        """Start a replica in `phase`, named `index` (a str) or `<phase>-<index>`."""
        name = index if isinstance(index, str) else f"{phase}-{index}"
        self._phases[name] = phase
        args = [*self._common(), "--model", self.model, "--dtype", self.dtype, "--replica-id", name,
                "--threads", str(self._threads()), "--max-batch", str(self.max_batch),
                "--device", self._device_of(name)]
        if self.kv_codec:
            args += ["--kv-codec", self.kv_codec]
        if phase == "decode" and self.decode_nice:
            args += ["--nice", str(self.decode_nice)]
        if phase == "colocated" and self.token_budget:
            args += ["--token-budget", str(self.token_budget)]
        return self._spawn(name, f"thunderserve.{phase}", args)

    def _device_of(self, name: str) -> str:
        if name not in self._devices:
            device = self.device
            if device == "cuda":  # spread the replicas over the host's GPUs
                import torch

                device = f"cuda:{len(self._devices) % max(1, torch.cuda.device_count())}"
            self._devices[name] = device
        return self._devices[name]

    def start_router(self) -> subprocess.Popen:
        args = [*self._common(), "--model", self.model, "--host", self.http_host, "--http-port", str(self.http_port)]
        if self.kv_codec:
            args += ["--kv-codec", self.kv_codec]
        return self._spawn("router", "thunderserve.router", args)

    def start_planner(self) -> subprocess.Popen:
        args = ["--live", "--from-plan", str(self.plan_file), "--nats", self.nats_url,
                "--subject-prefix", self.subject_prefix, *self.planner_args]
        return self._spawn("planner", "thunderserve.planner", args)

    def respawn(self, name: str) -> subprocess.Popen:
        """Start a service that exited again, under its name and with its settings (a replica in the
        phase it first started in: a plan in force flips it again)."""
        if name == "router":
            return self.start_router()
        if name == "planner":
            return self.start_planner()
        if name == "nats-server":  # same port, same store directory
            return self.nats.start().proc
        return self.start_replica(self._phases[name], name)

    def _supervised(self) -> dict[str, subprocess.Popen]:
        """The processes `supervise` watches: the services, and the embedded nats-server if it runs one."""
        procs = dict(self.procs)
        if self.nats is not None and self.nats.proc is not None:
            procs["nats-server"] = self.nats.proc
        return procs

    def supervise(self, stop: threading.Event, policy: RestartPolicy = RestartPolicy(), poll_s: float = 1.0,
                  report: Callable[[str], None] = log.warning) -> None:
        """Until `stop` is set: restart the router, a replica or the embedded nats-server when it exits,
        as `policy` allows.

        A restarted replica loads the weights again and rejoins under its old name; meanwhile the
        router resumes what the dead one held. nats-server comes back on its port with its JetStream
        store (the plan survives), and every service reconnects to it. A process that keeps exiting
        (more than `policy.limit` restarts within `policy.window_s`) is left down and reported."""
        restarts: dict[str, list[float]] = {}  # name -> monotonic times of its restarts
        due: dict[str, float] = {}  # name -> when to restart it
        while not stop.wait(poll_s):
            now = time.monotonic()
            for name, proc in self._supervised().items():
                if name in due or proc.poll() is None:
                    continue
                recent = [t for t in restarts.get(name, []) if now - t < policy.window_s]
                restarts[name] = recent
                if len(recent) >= policy.limit:
                    report(f"{name} exited with code {proc.returncode} after {len(recent)} restart(s) within "
                           f"{policy.window_s:.0f} s; leaving it down")
                    self._abandon(name)
                    continue
                # NATS at once: every service is cut off until it is back
                due[name] = now if name == "nats-server" else now + policy.delay(len(recent))
                report(f"{name} exited with code {proc.returncode}; restarting it in {due[name] - now:.0f} s")
            for name, when in list(due.items()):
                if now >= when and not stop.is_set():
                    del due[name]
                    restarts[name].append(now)
                    self._expected_dead.discard(name)
                    try:
                        self.respawn(name)
                    except (OSError, RuntimeError) as exc:  # e.g. nats-server cannot bind its port yet
                        report(f"could not restart {name}: {exc}; trying again")
                        due[name] = time.monotonic() + policy.delay(len(restarts[name]))

    def _abandon(self, name: str) -> None:
        if name == "nats-server":
            self.nats.proc = None
        else:
            del self.procs[name]

    def start(self, timeout: float = 300.0) -> LocalCluster:
        resolve_model(self.model)  # convert/cache weights once, before several processes want them
        if not self.http_port:
            self.http_port = free_port(self.http_host)
        try:
            if self.nats_url is None:
                self.nats = NatsServer()
                self.nats_url = self.nats.url
                self.nats.start()
            for name, phase in self.replica_specs():
                self.start_replica(phase, name)
            self.start_router()
            self.wait_ready(timeout)
            if self.plan is not None:  # the planner publishes the plan; ready once the router has it
                self.start_planner()
                self.wait_for(lambda body: body.get("plan_epoch", 0) >= 1, timeout, "the router to apply the plan")
        except BaseException:
            self.stop()
            raise
        return self

    def health(self) -> dict | None:
        try:
            with urllib.request.urlopen(self.http_url + "/health", timeout=2) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return json.loads(exc.read() or b"{}")
        except (OSError, ValueError):
            return None

    def wait_ready(self, timeout: float = 300.0, prefill: int | None = None, decode: int | None = None,
                   colocated: int | None = None) -> dict:
        """Block until the router sees the wanted number of ready replicas of each phase."""
        want = {"prefill_replicas": self.prefill if prefill is None else prefill,
                "decode_replicas": self.decode if decode is None else decode,
                "colocated_replicas": self.colocated if colocated is None else colocated}
        return self.wait_for(lambda body: all(body.get(key, 0) >= n for key, n in want.items()), timeout,
                             "services to be ready")

    def wait_for(self, ready: Callable[[dict], bool], timeout: float, what: str) -> dict:
        """Block until the router's /health body passes `ready`; a service that exits meanwhile is an error."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None and (name == "router" or name not in self._expected_dead):
                    raise RuntimeError(f"{name} exited with code {proc.returncode} during start-up")
            body = self.health()
            if body and ready(body):
                return body
            time.sleep(0.2)
        raise TimeoutError(f"timed out after {timeout} s waiting for {what} (last health: {self.health()})")

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        proc = self.procs[name]
        self._expected_dead.add(name)
        proc.send_signal(sig)
        proc.wait(timeout=30)

    def stop(self, timeout: float = 20.0) -> None:
        # Router first (no new work), then the planner (no new plans), then replicas (they drain), then NATS.
        order = sorted(self.procs, key=lambda n: {"router": 0, "planner": 1}.get(n, 2))
        for name in order:
            proc = self.procs[name]
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs.clear()
        if self.nats is not None:
            self.nats.stop()
            self.nats = None

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
