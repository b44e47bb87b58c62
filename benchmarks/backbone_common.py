"""Helpers shared by the backbone benchmarks (`benchmarks/backbone_*.py`).

Each benchmark is a script run as `python benchmarks/backbone_<name>.py`; this module sits
next to them, so they import it as `backbone_common`.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"

# A neutral English paragraph; prompts are cut from repetitions of it to an exact token count.
FILLER = (
    "The history of the printing press begins in the fifteenth century, when movable metal type "
    "made it possible to reproduce books quickly and cheaply. Within a few decades presses spread "
    "across Europe, and the number of books in circulation grew from thousands to millions. "
    "Scholars argue about how much this changed the way people read, argued and learned, but few "
    "doubt that cheap printed pages helped new ideas travel further and faster than before. "
)


def prompt_text(tokenizer, n_tokens: int, salt: int = 0) -> str:
    """Text that tokenizes (without special tokens) to exactly `n_tokens` tokens; `salt` varies it."""
    head = f"Document {salt}. "
    ids = tokenizer.encode(head + FILLER * (2 + n_tokens // 40), add_special_tokens=False)[:n_tokens]
    text = tokenizer.decode(ids)
    # Decoding and re-encoding can merge tokens at the cut; trim until it is exact.
    while len(tokenizer.encode(text, add_special_tokens=False)) > n_tokens:
        ids = ids[:-1]
        text = tokenizer.decode(ids)
    return text


def prompt_ids(tokenizer, n_tokens: int, salt: int = 0) -> list[int]:
    head = tokenizer.encode(f"Document {salt}. ", add_special_tokens=False)
    body = tokenizer.encode(FILLER * (2 + n_tokens // 40), add_special_tokens=False)
    return (head + body)[:n_tokens]


def chat_prompt_for(tokenizer, n_tokens: int, salt: int = 0) -> str:
    """User-message text whose chat-templated prompt has about `n_tokens` tokens."""
    overhead = len(tokenizer.apply_chat_template([{"role": "user", "content": "x"}], add_generation_prompt=True,
                                                 tokenize=True, return_dict=True)["input_ids"]) - 1
    return prompt_text(tokenizer, max(1, n_tokens - overhead), salt)


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile, q in [0, 100]."""
    if not values:
        return float("nan")
    xs = sorted(values)
    if len(xs) == 1:
        return xs[0]
    pos = (len(xs) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


async def sdk_stream(client, prompt: str, max_tokens: int, times: list[float]) -> dict[str, Any]:
    """Stream one greedy chat request of exactly `max_tokens` tokens through the SDK `client`,
    appending each token's arrival time to `times`. A failure is a result here, not a crash."""
    tokens, finish_reason, error = 0, None, ""
    try:
        async for chunk in client.stream(messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens,
                                         temperature=0, ignore_eos=True):
            tokens += len(chunk.token_ids)
            times.extend([time.monotonic()] * len(chunk.token_ids))
            finish_reason = chunk.finish_reason
    except Exception as exc:
        error = str(exc)
    return {"tokens": tokens, "finish_reason": finish_reason, "error": error}


def save_plot(fig, ax, path, grid: str = "y") -> None:
    """The benchmarks' common finish of a plot: small legend, light grid (`grid`: "y" or "both"), file."""
    ax.legend(fontsize=8)
    ax.grid(axis=grid, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def r(x: float, nd: int = 3) -> float:
    return round(float(x), nd)


def host_info() -> dict[str, Any]:
    """What the numbers depend on: cores, load when the run started, versions."""
    import torch

    info: dict[str, Any] = {
        "cpus": os.cpu_count(),
        "loadavg_1m_at_start": r(os.getloadavg()[0], 2),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    try:
        rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=5).stdout.strip()
        info["git"] = rev or None
    except OSError:
        pass
    return info


def finish(result: dict[str, Any], name: str, plot, no_plot: bool) -> None:
    """Write docs/<name>.png with `plot(result, path)` unless asked not to, then print the JSON."""
    if not no_plot:
        path = DOCS / f"{name}.png"
        plot(result, path)
        result["plot"] = str(path.relative_to(DOCS.parent))
    emit(result)


def emit(result: dict[str, Any]) -> None:
    """Print the benchmark's one JSON object on stdout (progress goes to stderr)."""
    print(json.dumps(result, indent=2))


def progress(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)
