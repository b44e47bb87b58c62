"""The router only tokenizes and moves messages: it must not load torch or the KV codec's numba kernels, which
would cost it seconds at start and hundreds of MB for nothing (docs/benchmarks.md, "Router overhead")."""

from __future__ import annotations

import json
import subprocess
import sys

SCRIPT = """
import json, sys
from thunderserve.router.args import build_parser
from thunderserve.router.server import build_core
core = build_core(build_parser().parse_args(["--model", "tiny-random"]))
ids = core.tokenize_chat([{"role": "user", "content": "Hi"}])
print(json.dumps({"heavy": sorted(m for m in ("torch", "numba", "thunderserve.common.kvcodec") if m in sys.modules),
                  "tokens": len(ids), "max_context": core.max_context}))
"""


def test_the_router_starts_without_torch_or_the_codec():
    from thunderserve.common.models import load_tokenizer, max_context

    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120, check=True)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["heavy"] == []
    tokenizer = load_tokenizer("tiny-random")  # (in this process, torch or not)
    want = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True,
                                         tokenize=True, return_dict=True)["input_ids"]
    assert got["tokens"] == len(want) > 0
    assert got["max_context"] == max_context("tiny-random") > 0
