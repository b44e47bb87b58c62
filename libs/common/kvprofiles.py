"""Calibrated profiles for the int4 KV codec (issue 3, docs/benchmarks.md "KV codec").

A profile belongs to one model and tells the *encoder* what it cannot see in a KV cache:
the RoPE base (keys are quantized pre-RoPE), how much energy the model's queries put in each
key channel (an error e in a key moves an attention logit by q.e, so channels that queries
weigh heavily get more bits), and how many bits each layer's keys and values get (layers
differ ~30x in sensitivity). For int4 it also holds a transform per layer, KV head and kind: the
head's error weighting times a basis in which the weighted channels are uncorrelated (a KLT,
`transforms`). The encoder codes each token's vector in it, and the decoder needs its inverse,
so a packed tensor names the profile and the transform file's digest, and a receiver without
that file refuses it. Everything else the decoder reads off the packed tensor. Profiles are
written by `benchmarks/kvcodec_calibrate.py` from prompts that are not in the accuracy set
(`tests/data/kv_calib_prompts.json`) into `kvprofiles_data.py`, and the transforms into
`data/<profile>.kvtransforms.safetensors`.

`pack_cache` picks the profile of the model that made the cache when the caller names it (the
replicas do), else the one whose geometry (layers, KV heads, head_dim) matches; a cache of
another model or geometry is encoded without one (correct, only less accurate).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from pathlib import Path

import torch

from thunderserve.common.kvprofiles_data import PROFILES

IMPORTANCE_CONTEXT = 2048  # tokens over which a "slow" RoPE pair turns at most a radian
DATA_DIR = Path(__file__).resolve().parent / "data"


def transforms_path(name: str) -> Path:
    """Where profile `name`'s transforms live (written by the calibration, shipped with the package)."""
    return DATA_DIR / f"{name}.kvtransforms.safetensors"


@lru_cache(maxsize=4)
def _transforms(name: str) -> tuple[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] | None:
    """(digest, {"key"|"value": (encode, decode) [layer, kv_head, d, d]}) of a profile's transform
    file, or None. The file holds the encode matrices in fp16; the decode matrices are their
    inverses, computed here in float64, so both sides of the hop invert exactly what was sent."""
    path = transforms_path(name)
    if not path.is_file():
        return None
    from safetensors.torch import load

    raw = path.read_bytes()  # read once: the digest and the matrices come from the same bytes
    pairs = {}
    for kind, encode in load(raw).items():
        encode = encode.double()
        pairs[kind] = (encode.float(), torch.linalg.inv(encode).float())
    return hashlib.sha256(raw).hexdigest()[:16], pairs


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
    # the entropy-coded codec (kventropy): KL per unit of weighted error variance [layer][kv_head]
    head_sensitivity: dict[str, tuple] = field(default_factory=dict)  # "key" | "value" -> [layer][kv_head]
    entropy_step: float = 0.0  # s: a head's step is s / sqrt(a) (0 = no entropy calibration)
    mean_query: tuple = ()  # [layer][kv_head][head_dim]: mean pre-RoPE query (the head's query heads pooled)

    def key_weights(self, layer: int) -> torch.Tensor:
        """[kv_heads, head_dim]: a RoPE pair's energy for both of its channels (RoPE mixes
        the pair at every position, so only the pair's total is position-independent)."""
        pairs = torch.tensor(self.query_energy[layer], dtype=torch.float32)
        return torch.cat((pairs, pairs), -1)

    def importance_query(self, context: int = IMPORTANCE_CONTEXT) -> torch.Tensor | None:
        """[layer, kv_head, head_dim]: the mean query on the RoPE pairs that turn by at most a
        radian over `context` tokens, zero elsewhere; q . k on those pairs is the part of a
        logit that does not depend on where the query is (`kventropy.token_exponents`)."""
        if not self.mean_query:
            return None
        half = self.head_dim // 2
        freq = self.rope_theta ** (-torch.arange(half, dtype=torch.float64) * 2 / self.head_dim)
        slow = (freq * context <= 1.0).float().repeat(2)
        return self._mean_query * slow

    @cached_property
    def _mean_query(self) -> torch.Tensor:
        """mean_query as a tensor, converted once (from nested tuples it takes ~0.6 ms, on every
        transfer's encoding)."""
        return torch.tensor(self.mean_query, dtype=torch.float32)

    @property
    def transform_id(self) -> str | None:
        """The digest of this profile's transform file (None: it has none)."""
        found = _transforms(self.name)
        return found[0] if found else None

    def transforms(self, kind: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(encode, decode) matrices [layer, kv_head, d, d] of int4's transform, or None: a token's
        vector x (pre-RoPE for keys) goes on the wire as round((x @ encode) / step) and comes back
        as (code * step) @ decode. The encode matrix carries every sensitivity (see
        `benchmarks/kvcodec_calibrate.py`), so every coefficient of every head takes the same step s."""
        found = _transforms(self.name)
        return found[1].get(kind) if found else None

    def entropy_steps(self, kind: str, transformed: bool = False) -> torch.Tensor:
        """[layer, kv_head, head_dim] steps of the entropy-coded codec: s / sqrt(a) for a head,
        and / sqrt(w) for a key channel of query energy w (each head's KL share then equal).
        `transformed`: the steps of the coefficients of `transforms`, which carry the sensitivities
        themselves: s for every one."""
        if transformed:
            return torch.full((self.layers, self.kv_heads, self.head_dim), self.entropy_step)
        a = torch.tensor(self.head_sensitivity[kind], dtype=torch.float32).clamp_min(1e-12).unsqueeze(-1)
        if kind == "key":
            w = torch.stack([self.key_weights(i) for i in range(self.layers)]).clamp_min(1e-6)
            return self.entropy_step / (a * w).sqrt()
        return (self.entropy_step / a.sqrt()).expand(self.layers, self.kv_heads, self.head_dim)


@lru_cache(maxsize=1)
def profiles() -> tuple[Profile, ...]:
    out = []
    for name, p in PROFILES.items():
        out.append(Profile(name, p["model"], p["layers"], p["kv_heads"], p["head_dim"], float(p["rope_theta"]),
                           tuple(p["key_bits"]), tuple(p["value_bits"]), p["query_energy"],
                           p.get("head_sensitivity", {}), float(p.get("entropy_step", 0.0)),
                           p.get("mean_query", ())))
    return tuple(out)


def by_name(name: str) -> Profile | None:
    return next((p for p in profiles() if p.name == name), None)


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
