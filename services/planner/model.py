"""Model specs (Llama-style decoder): parameter, FLOP and byte counts the cost model needs."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4, "float8": 1, "int8": 1}


@dataclass(frozen=True)
class ModelSpec:
    name: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    bytes_per_weight: int = 2  # fp16/bf16 weights
    head_dim: int = 0  # 0 -> hidden // heads
    tied_embeddings: bool = False
    kv_bytes: int = 2  # KV cache element size (fp16)

    def __post_init__(self) -> None:
        for f in ("layers", "hidden", "heads", "kv_heads", "intermediate", "vocab"):
            if getattr(self, f) <= 0:
                raise ValueError(f"model {self.name}: {f} must be > 0")
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.hidden // self.heads)

    # --- counts ------------------------------------------------------------------------------
    @property
    def layer_params(self) -> int:
        q_o = 2 * self.hidden * self.heads * self.head_dim
        k_v = 2 * self.hidden * self.kv_heads * self.head_dim
        mlp = 3 * self.hidden * self.intermediate  # gated MLP: gate, up, down
        return q_o + k_v + mlp + 2 * self.hidden  # + two RMSNorm weights

    @property
    def embed_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def head_params(self) -> int:
        """LM head (shares the embedding matrix when tied, so no extra weight bytes then)."""
        return 0 if self.tied_embeddings else self.vocab * self.hidden

    @property
    def params(self) -> int:
        return self.layers * self.layer_params + self.embed_params + self.head_params + self.hidden

    @property
    def layer_weight_bytes(self) -> int:
        return self.layer_params * self.bytes_per_weight

    @property
    def weight_bytes(self) -> int:
        return self.params * self.bytes_per_weight

    @property
    def kv_bytes_per_token_layer(self) -> int:
        return 2 * self.kv_heads * self.head_dim * self.kv_bytes

    @property
    def kv_bytes_per_token(self) -> int:
        """2 (K and V) * layers * kv_heads * head_dim * bytes."""
        return self.layers * self.kv_bytes_per_token_layer

    def valid_tp(self, tp: int) -> bool:
        """Tensor parallelism splits attention heads, so it must divide them evenly."""
        if tp == 1:
            return True
        kv_ok = self.kv_heads % tp == 0 or tp % self.kv_heads == 0  # small kv_heads get replicated
        return self.heads % tp == 0 and kv_ok and self.intermediate % tp == 0

    # --- construction ------------------------------------------------------------------------
    @classmethod
    def from_name(cls, name: str) -> ModelSpec:
        key = name.lower().replace("_", "-")
        if key not in BUILTIN_MODELS:
            raise KeyError(f"unknown model {name!r} (built-in: {', '.join(BUILTIN_MODELS)}; "
                           "or pass a HuggingFace config.json)")
        return BUILTIN_MODELS[key]

    @classmethod
    def from_hf_config(cls, path: str | Path) -> ModelSpec:
        p = Path(path)
        if p.is_dir():
            p = p / "config.json"
        with open(p) as f:
            cfg = json.load(f)
        try:
            return cls.from_config(cfg, str(cfg.get("_name_or_path") or p.parent.name or "hf-model"))
        except KeyError as exc:
            raise ValueError(f"{p}: config.json lacks {exc.args[0]!r}") from None

    @classmethod
    def from_config(cls, cfg: dict, name: str) -> ModelSpec:
        """From a HuggingFace config's fields (a KeyError names a missing one)."""
        if "text_config" in cfg:  # multimodal wrappers keep the LM config nested
            cfg = cfg["text_config"]
        heads = int(cfg["num_attention_heads"])
        return cls(
            name=name,
            layers=int(cfg["num_hidden_layers"]),
            hidden=int(cfg["hidden_size"]),
            heads=heads,
            kv_heads=int(cfg.get("num_key_value_heads") or heads),
            intermediate=int(cfg["intermediate_size"]),
            vocab=int(cfg["vocab_size"]),
            bytes_per_weight=DTYPE_BYTES.get(str(cfg.get("torch_dtype", "float16")), 2),
            head_dim=int(cfg.get("head_dim") or 0),
            tied_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        )

    @classmethod
    def load(cls, name_or_path: str) -> ModelSpec:
        """A built-in name, a config.json path, or a folder holding one."""
        p = Path(name_or_path)
        if p.suffix == ".json" or p.is_dir():
            if not p.exists():
                raise ValueError(f"model config {name_or_path!r} not found")
            return cls.from_hf_config(p)
        try:
            return cls.from_name(name_or_path)
        except KeyError as exc:
            raise ValueError(exc.args[0]) from None


# Published architecture hyper-parameters (LLaMA paper / the models' HuggingFace config.json files).
BUILTIN_MODELS: dict[str, ModelSpec] = {
    "llama-7b": ModelSpec("llama-7b", 32, 4096, 32, 32, 11008, 32000),
    "llama-13b": ModelSpec("llama-13b", 40, 5120, 40, 40, 13824, 32000),
    "llama-30b": ModelSpec("llama-30b", 60, 6656, 52, 52, 17920, 32000),
    "llama-2-70b": ModelSpec("llama-2-70b", 80, 8192, 64, 8, 28672, 32000),
    "smollm2-135m": ModelSpec("smollm2-135m", 30, 576, 9, 3, 1536, 49152, tied_embeddings=True),
}
