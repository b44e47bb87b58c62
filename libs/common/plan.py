"""The plan: what the planner decides and every service reads.

A plan is versioned by a monotonic `epoch`. It round-trips through plain dicts of str/int/float/bool/
list/dict (`to_dict`/`from_dict`, `to_json`/`from_json`), so it can be msgpack-encoded and stored in
the NATS JetStream KV bucket. Only the planner makes plans; the router reads `replicas` (`id`,
`phase`), `dispatch` (prefill replica id -> weight) and `routing` (prefill id -> {decode id -> weight}).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any

SCHEMA_VERSION = 1
PHASES = ("prefill", "decode", "colocated")  # "colocated": room for baselines / later issues


@dataclass
class Stage:
    """One pipeline stage: its GPUs run the layers [layer_start, layer_end) with tensor parallelism."""

    gpus: list[str]
    tp: int
    layer_start: int
    layer_end: int  # exclusive
    node: str = ""
    gpu_type: str = ""

    @property
    def layers(self) -> int:
        return self.layer_end - self.layer_start


@dataclass
class Replica:
    id: str
    phase: str  # "prefill" | "decode" (| "colocated")
    gpus: list[str]
    stages: list[Stage] = field(default_factory=list)
    capacity: float = 0.0  # predicted req/s this replica serves within SLOs in its phase
    tokens_per_s: float = 0.0  # prefill: prompt tokens/s; decode: output tokens/s
    price_per_hour: float = 0.0
    latency_s: float = 0.0  # prefill: predicted prefill latency (attainment-quantile prompt)
    tpot_s: float = 0.0  # decode: predicted time per output token at full batch
    max_sequences: int = 0  # decode: concurrent sequences at full batch

    @property
    def pp(self) -> int:
        return max(1, len(self.stages))

    @property
    def tp(self) -> int:
        return max((s.tp for s in self.stages), default=len(self.gpus))

    @property
    def layout(self) -> str:
        """E.g. "TP4xPP2" or "TP4/2xPP2" for heterogeneous stages."""
        tps = [s.tp for s in self.stages] or [len(self.gpus)]
        tp = str(tps[0]) if len(set(tps)) == 1 else "/".join(map(str, tps))
        return f"TP{tp}xPP{self.pp}"


@dataclass
class Plan:
    replicas: list[Replica] = field(default_factory=list)
    dispatch: dict[str, float] = field(default_factory=dict)
    routing: dict[str, dict[str, float]] = field(default_factory=dict)
    kv_codec: str = "none"
    epoch: int = 1
    model: str = ""
    model_layers: int = 0
    cluster: str = ""
    objective: float = 0.0  # SLO-meeting req/s the plan sustains (what the planner maximises)
    predicted_goodput: float = 0.0  # req/s served within SLOs at the workload's rate: min(rate, objective)
    predicted_tokens_per_s: float = 0.0  # output tokens/s at predicted_goodput
    price_per_hour: float = 0.0  # $/h of the GPUs the plan uses
    workload: dict[str, Any] = field(default_factory=dict)
    unused_gpus: list[str] = field(default_factory=list)
    # "prefill->decode" routes whose first token leaves the decode replica once the KV has landed
    # (on the others the prefill replica streams it at once): over a slow link a short request
    # would otherwise wait for its KV between its first and second token and miss TPOT.
    first_token_from_decode: list[str] = field(default_factory=list)
    created_at: float = field(default_factory=time.time)
    schema: int = SCHEMA_VERSION
    meta: dict[str, Any] = field(default_factory=dict)

    # --- lookups ------------------------------------------------------------------------------
    def replica(self, replica_id: str) -> Replica:
        for r in self.replicas:
            if r.id == replica_id:
                return r
        raise KeyError(replica_id)

    def first_token_waits(self, prefill: str, decode: str) -> bool:
        """Whether the route prefill -> decode sends its first token from the decode replica."""
        return f"{prefill}->{decode}" in self.first_token_from_decode

    def ids(self, phase: str) -> list[str]:
        return [r.id for r in self.replicas if r.phase == phase]

    @property
    def prefill_ids(self) -> list[str]:
        return self.ids("prefill")

    @property
    def decode_ids(self) -> list[str]:
        return self.ids("decode")

    # --- serialisation ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Plan:
        if not isinstance(d, dict):
            raise ValueError("plan must be a mapping")
        schema = int(d.get("schema", SCHEMA_VERSION))
        if schema > SCHEMA_VERSION:
            raise ValueError(f"plan schema {schema} is newer than this reader ({SCHEMA_VERSION})")
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}  # unknown keys: from a newer minor writer
        kw["replicas"] = [_replica_from_dict(r) for r in d.get("replicas", [])]
        kw["dispatch"] = {str(k): float(v) for k, v in d.get("dispatch", {}).items()}
        kw["routing"] = {str(p): {str(q): float(w) for q, w in row.items()}
                         for p, row in d.get("routing", {}).items()}
        kw["unused_gpus"] = list(d.get("unused_gpus", []))
        kw["first_token_from_decode"] = [str(k) for k in d.get("first_token_from_decode", [])]
        kw["workload"] = dict(d.get("workload", {}))
        kw["meta"] = dict(d.get("meta", {}))
        return cls(**kw)

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=False)

    @classmethod
    def from_json(cls, s: str | bytes) -> Plan:
        return cls.from_dict(json.loads(s))

    # --- checks -------------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise ValueError if the plan is inconsistent."""
        ids = [r.id for r in self.replicas]
        if len(set(ids)) != len(ids):
            raise ValueError("duplicate replica ids")
        seen: set[str] = set()
        for r in self.replicas:
            if r.phase not in PHASES:
                raise ValueError(f"replica {r.id}: unknown phase {r.phase!r}")
            if seen & set(r.gpus):
                raise ValueError(f"replica {r.id}: GPU used twice")
            seen |= set(r.gpus)
            stage_gpus = [g for s in r.stages for g in s.gpus]
            if r.stages and sorted(stage_gpus) != sorted(r.gpus):
                raise ValueError(f"replica {r.id}: stages do not cover its GPUs")
            end = 0
            for s in r.stages:
                if s.layer_start != end or s.layer_end <= s.layer_start or s.tp != len(s.gpus):
                    raise ValueError(f"replica {r.id}: bad stage {s}")
                end = s.layer_end
            if r.stages and self.model_layers and end != self.model_layers:
                raise ValueError(f"replica {r.id}: stages cover {end} of {self.model_layers} layers")
        if seen & set(self.unused_gpus):
            raise ValueError("a GPU is both used and unused")
        pre, dec = set(self.prefill_ids), set(self.decode_ids)
        colo = {r.id for r in self.replicas if r.phase == "colocated"}
        if not set(self.dispatch) <= pre | colo:  # colocated replicas take requests directly too
            raise ValueError("dispatch names a replica that is not a prefill or colocated replica")
        if any(w < 0 for w in self.dispatch.values()):
            raise ValueError("negative dispatch weight")
        total = sum(self.dispatch.values())
        if self.dispatch and total > 0 and abs(total - 1) > 1e-6:
            raise ValueError(f"dispatch weights sum to {total}, not 1")
        for p, row in self.routing.items():
            if p not in pre or not set(row) <= dec:
                raise ValueError(f"routing row {p}: unknown prefill or decode replica")
            s = sum(row.values())
            if row and abs(s - 1) > 1e-6:
                raise ValueError(f"routing row {p} sums to {s}, not 1")


def _replica_from_dict(d: dict[str, Any]) -> Replica:
    known = {f.name for f in fields(Replica)}
    kw = {k: v for k, v in d.items() if k in known}
    kw["stages"] = [Stage(**{k: v for k, v in s.items() if k in {f.name for f in fields(Stage)}})
                    for s in d.get("stages", [])]
    kw["gpus"] = list(d.get("gpus", []))
    return Replica(**kw)
