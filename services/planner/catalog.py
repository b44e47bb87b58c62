"""GPU catalog: peak FP16 compute, memory size and bandwidth, price. Loaded from data/gpus.yaml."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import yaml

DEFAULT_CATALOG = Path(__file__).with_name("data") / "gpus.yaml"


@dataclass(frozen=True)
class GPUSpec:
    name: str
    tflops: float  # peak dense FP16/BF16 tensor TFLOP/s
    mem_gb: float
    mem_gbps: float  # GB/s
    price: float  # $/GPU-hour
    source: str = ""

    @property
    def flops(self) -> float:
        return self.tflops * 1e12

    @property
    def mem_bytes(self) -> float:
        return self.mem_gb * 1e9

    @property
    def mem_bw(self) -> float:
        return self.mem_gbps * 1e9


def _norm(name: str) -> str:
    # "RTX 3090 Ti", "rtx-3090ti" and "RTX3090Ti" are the same card
    return "".join(ch for ch in name.lower() if ch.isalnum())


class Catalog:
    def __init__(self, gpus: dict[str, GPUSpec], aliases: dict[str, str] | None = None):
        self.gpus = dict(gpus)
        self._index = {_norm(n): n for n in gpus}
        for alias, target in (aliases or {}).items():
            self._index.setdefault(_norm(alias), target)

    @classmethod
    def from_yaml(cls, path: str | Path) -> Catalog:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
        entries = data.get("gpus", data)
        if not isinstance(entries, dict):
            raise ValueError(f"{path}: expected a mapping of GPU name -> spec")
        gpus: dict[str, GPUSpec] = {}
        aliases: dict[str, str] = {}
        for name, e in entries.items():
            try:
                gpus[name] = GPUSpec(
                    name=name,
                    tflops=float(e["tflops"]),
                    mem_gb=float(e["mem_gb"]),
                    mem_gbps=float(e["mem_gbps"]),
                    price=float(e.get("price", 0.0)),
                    source=str(e.get("source", "")),
                )
            except (KeyError, TypeError, ValueError) as exc:
                raise ValueError(f"{path}: GPU {name!r}: missing or bad field ({exc})") from None
            for a in e.get("aliases") or []:
                aliases[str(a)] = name
        return cls(gpus, aliases)

    def get(self, name: str) -> GPUSpec:
        key = self._index.get(_norm(name))
        if key is None:
            raise KeyError(f"unknown GPU type {name!r} (known: {', '.join(sorted(self.gpus))})")
        return self.gpus[key]

    def __contains__(self, name: str) -> bool:
        return _norm(name) in self._index

    def names(self) -> list[str]:
        return sorted(self.gpus)


@lru_cache(maxsize=1)
def default_catalog() -> Catalog:
    return Catalog.from_yaml(DEFAULT_CATALOG)


def get_gpu(name: str) -> GPUSpec:
    return default_catalog().get(name)
