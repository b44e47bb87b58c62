"""Calibrated profiles for the int4 KV codec (issue 3, docs/benchmarks.md "KV codec").

A profile belongs to one model and tells the *encoder* what it cannot see in a KV cache:
the RoPE base (keys are quantized pre-RoPE), how much energy the model's queries put in each
key channel (an error e in a key moves an attention logit by q.e, so channels that queries
weigh heavily get more bits), and how many bits each layer's keys and values get (layers
differ ~30x in sensitivity). The decoder never needs it: every packed tensor carries its own
params and bit widths. Profiles are written by `benchmarks/kvcodec_calibrate.py` from
prompts that are not in the accuracy set (`tests/data/kv_calib_prompts.json`) into
`kvprofiles_data.py`.

`pack_cache` picks the profile of the model that made the cache when the caller names it (the
replicas do), else the one whose geometry (layers, KV heads, head_dim) matches; a cache of
another model or geometry is encoded without one (correct, only less accurate).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from thunderserve.common.kvprofiles_data import PROFILES


@dataclass(frozen=True)
class Profile:
    name: str  # key in PROFILES
    model: str  # the served model name it was calibrated on
    layers: int
    kv_heads: int
    head_dim: int
    rope_theta: float
    key_bits: tuple[int, ...]  # per layer: mean key width per channel
    value_bits: tuple[int, ...]  # per layer
    query_energy: tuple  # [layer][kv_head][head_dim // 2]: mean q_i^2 + q_{i+d/2}^2, mean 1

    def key_weights(self, layer: int) -> torch.Tensor:
        """[kv_heads, head_dim]: a RoPE pair's energy for both of its channels (RoPE mixes
        the pair at every position, so only the pair's total is position-independent)."""
        pairs = torch.tensor(self.query_energy[layer], dtype=torch.float32)
        return torch.cat((pairs, pairs), -1)


@lru_cache(maxsize=1)
def profiles() -> tuple[Profile, ...]:
    out = []
    for name, p in PROFILES.items():
        out.append(Profile(name, p["model"], p["layers"], p["kv_heads"], p["head_dim"], float(p["rope_theta"]),
                           tuple(p["key_bits"]), tuple(p["value_bits"]), p["query_energy"]))
    return tuple(out)


def find(layers: int, kv_heads: int, head_dim: int, model: str | None = None) -> Profile | None:
    """The profile for a cache of this geometry; with `model` (a served model name or a
    profile's key, any case), only that model's: two models can share a geometry but not
    their calibration."""
    for p in profiles():
        if (p.layers, p.kv_heads, p.head_dim) != (layers, kv_heads, head_dim):
            continue
        if model is None or model.lower() in (p.name.lower(), p.model.lower()):
            return p
    return None
