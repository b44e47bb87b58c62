"""How much a KV codec changes what the model generates (issue 3, DESIGN.md §4).

For each prompt, one of two hops (`build_cases(..., first_from_prefill=)`):

- strict (the default): prefill the first n-1 tokens, and decode from the last prompt token on,
  so even the first generated token sees the codec;
- served: what the prefill and decode replicas do. The prefill replica runs the whole prompt in
  full precision and picks the first token itself; the whole prompt's cache crosses the hop, and
  decode generates the tokens after the first one on it.

Either way the cache continues in two ways that differ only in the codec:

- reference: the cache goes through `pack_cache`/`unpack_cache` with the `none` codec;
- codec: the cache goes through `pack_cache`/`unpack_cache` with the codec under test.

Both rebuild a `DynamicCache` from the (key, value) tensors and decode in full precision.

Metrics:
- *prefix agreement*: of the reference's greedy tokens (32, or up to and including EOS if it
  comes first), the share the codec path generates before its first divergence;
- *KL*: mean KL(reference || codec) of the next-token distributions over the reference's
  tokens (both paths teacher-forced on the reference tokens), in nats;
- *bits per value*: the whole cache's wire bytes (`pack_cache` payload) * 8 / number of values.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from thunderserve.common.engine import first_layer_kv
from thunderserve.common.kvcodec import KVCodec, KVLayers, get_codec, pack_cache, unpack_cache

MAX_NEW_TOKENS = 32
PROMPTS_FILE = Path(__file__).resolve().parents[2] / "tests" / "data" / "kv_prompts.json"


@dataclass
class Case:
    """One prompt, prefilled once; every codec is compared against its reference."""

    prompt_id: str
    layers: KVLayers  # the cache that crosses the hop, fp32
    last_token: int  # the token decode is fed first: the last prompt token, or the prefill's first token
    reference: list[int]  # greedy continuation from the uncompressed cache
    ref_logprobs: torch.Tensor  # [len(reference), vocab], teacher-forced, uncompressed
    token_ids: list[int] = field(default_factory=list)  # the tokens whose cache `layers` is


@dataclass
class CodecResult:
    codec: str
    agreement: float  # mean share of reference tokens before the first divergence
    kl: float  # mean KL(reference || codec) per generated position, nats
    bits_per_value: float  # over every case's whole cache
    exact_match: float  # share of prompts with no divergence at all
    per_prompt: list[dict[str, Any]] = field(default_factory=list)

    @property
    def agreement_se(self) -> float:
        """Standard error of `agreement` over the prompts: one near-tie moves a whole prompt,
        so differences smaller than about two of these are noise."""
        values = [r["agreement"] for r in self.per_prompt]
        return statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0

    def summary(self) -> dict[str, Any]:
        return {
            "codec": self.codec,
            "agreement": round(self.agreement, 4),
            "agreement_se": round(self.agreement_se, 4),
            "kl": self.kl,
            "bits_per_value": round(self.bits_per_value, 4),
            "exact_match": round(self.exact_match, 4),
            "prompts": len(self.per_prompt),
        }


def load_prompts(path: Path = PROMPTS_FILE) -> list[dict[str, Any]]:
    return json.loads(Path(path).read_text())


def prompt_ids(tokenizer, prompt: dict[str, Any]) -> list[int]:
    """Token ids of a prompt: chat prompts through the chat template, raw ones as they are."""
    if not prompt.get("chat", True):
        return tokenizer(prompt["text"])["input_ids"]
    turns = prompt.get("turns") or [["user", prompt["text"]]]
    messages = [{"role": role, "content": content} for role, content in turns]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text)["input_ids"]


def _cache(model, layers: KVLayers):
    from transformers import DynamicCache

    return DynamicCache(list(layers), config=model.config)


@torch.inference_mode()
def prefill(model, ids: Sequence[int]) -> tuple[KVLayers, int]:
    """The cache of `ids` and the greedy token after them, both in full precision."""
    out = model(input_ids=torch.tensor([list(ids)]), use_cache=True)
    return [(layer.keys, layer.values) for layer in out.cache.layers], int(out.logits[0, -1].argmax())


@torch.inference_mode()
def greedy(model, layers: KVLayers, first: int, max_new: int, eos: int | None, until: list[int] | None = None):
    """Greedy tokens after `layers`, fed `first`; stops at EOS, or at the first token that
    differs from `until` (there is no need to go past a divergence)."""
    cache = _cache(model, layers)
    token, out = first, []
    for step in range(max_new):
        logits = model(input_ids=torch.tensor([[token]]), cache=cache, use_cache=True).logits
        token = int(logits[0, -1].argmax())
        out.append(token)
        if token == eos or (until is not None and (step >= len(until) or token != until[step])):
            break
    return out


@torch.inference_mode()
def teacher_forced_logprobs(model, layers: KVLayers, first: int, tokens: list[int]) -> torch.Tensor:
    """Log-probs of the next token at each of len(tokens) positions, fed [first, tokens[:-1]]."""
    ids = torch.tensor([[first, *tokens[:-1]]])
    logits = model(input_ids=ids, cache=_cache(model, layers), use_cache=True).logits[0]
    return F.log_softmax(logits.float(), dim=-1)


def roundtrip(codec: KVCodec, layers: KVLayers, model=None, token_ids: Sequence[int] = ()) -> tuple[KVLayers, int]:
    """The cache as the decode side sees it, and its wire bytes. With `model` and the cache's
    `token_ids`, the decode side rebuilds the first layer from the tokens, as a replica does."""
    rebuild = (lambda: first_layer_kv(model, list(token_ids))) if model is not None and token_ids else None
    payload, manifest = pack_cache(codec, layers, rebuild=rebuild is not None)
    return unpack_cache(payload, manifest, rebuild), int(payload.numel())


def build_cases(model, tokenizer, prompts: list[dict[str, Any]], max_new: int = MAX_NEW_TOKENS,
                first_from_prefill: bool = False) -> list[Case]:
    """One case per prompt. `first_from_prefill`: the served hop (the whole prompt's cache, decode
    fed the prefill's own first token), else the strict one (see the module's docstring)."""
    eos = tokenizer.eos_token_id
    cases = []
    for prompt in prompts:
        ids = prompt_ids(tokenizer, prompt)
        if not first_from_prefill:
            ids, first = ids[:-1], ids[-1]
        layers, greedy_first = prefill(model, ids)
        if first_from_prefill:
            first = greedy_first
            if first == eos:  # the request ends on the prefill replica: no cache crosses the hop
                continue
        layers, _ = roundtrip(get_codec("none"), layers)
        reference = greedy(model, layers, first, max_new, eos)
        ref_lp = teacher_forced_logprobs(model, layers, first, reference)
        cases.append(Case(prompt["id"], layers, first, reference, ref_lp, list(ids)))
    return cases


def long_prompt_cache(model, tokenizer, prompts: list[dict[str, Any]], tokens: int) -> KVLayers:
    """The cache of a `tokens`-long prompt: the prompts' token ids one after another, repeated
    as needed (a real cache of a given length, for wire sizes and speeds)."""
    ids: list[int] = []
    while len(ids) < tokens:
        ids += [t for p in prompts for t in prompt_ids(tokenizer, p)]
    return prefill(model, ids[:tokens])[0]


def prefix_length(a: list[int], b: list[int]) -> int:
    """How many leading tokens two sequences share."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def evaluate(model, cases: list[Case], codec: KVCodec, exact: bool = True, eos: int | None = 2) -> CodecResult:
    """Agreement, KL and bits/value of `codec` over `cases`.

    exact=True generates greedily on the codec path (the metric's definition); exact=False
    reads the divergence off the teacher-forced argmax, which is the same up to fp rounding
    of a batched vs step-by-step forward and ~30x faster (for sweeps).
    """
    rows, wire_bytes, values, kls = [], 0, 0, []
    for case in cases:
        layers, nbytes = roundtrip(codec, case.layers, model, case.token_ids)
        wire_bytes += nbytes
        values += sum(k.numel() + v.numel() for k, v in case.layers)
        lp = teacher_forced_logprobs(model, layers, case.last_token, case.reference)
        kl = F.kl_div(lp, case.ref_logprobs, log_target=True, reduction="none").sum(-1)
        kls.append(kl)
        if exact:
            got = greedy(model, layers, case.last_token, len(case.reference), eos, until=case.reference)
        else:
            got = lp.argmax(-1).tolist()
        agree = prefix_length(got, case.reference) / len(case.reference)
        rows.append({"id": case.prompt_id, "agreement": agree, "kl": float(kl.mean()), "bytes": nbytes})
    n = max(len(rows), 1)
    return CodecResult(
        codec=codec.name,
        agreement=sum(r["agreement"] for r in rows) / n,
        kl=float(torch.cat(kls).mean()) if kls else 0.0,
        bits_per_value=wire_bytes * 8 / max(values, 1),
        exact_match=sum(r["agreement"] == 1.0 for r in rows) / n,
        per_prompt=rows,
    )
