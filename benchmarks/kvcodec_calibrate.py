"""Calibrate the KV codecs' profile for SmolLM2 (issue 3). Writes libs/common/kvprofiles_data.py.

    python benchmarks/kvcodec_calibrate.py [--target-bits 4.56] [--entropy-bits 4.55] [--tokens 2000]
                                           [--entropy-only | --bases-only | --step-only]

Uses only tests/data/kv_calib_prompts.json (none of them is in the accuracy set
tests/data/kv_prompts.json). Steps:

1. query statistics: mean q_i^2 + q_{i+d/2}^2 per RoPE pair of each KV head's queries (pre-RoPE,
   pooled over the query heads that share it), and their mean, over each prompt and 48 greedy tokens;
2. (int4-fixed) per-layer sensitivity: mean next-token KL when only one layer's keys (or values) go
   through the int4-fixed scheme at 4 bits, everything else exact;
3. (int4-fixed) per-layer widths: starting from 3 bits everywhere, greedily add a bit where it removes
   the most estimated KL (a bit divides a layer's KL by ~4) while a `--tokens` cache stays within
   `--target-bits` bits per value, all metadata included (checked with `pack_cache`);
4. (int4) per-head sensitivity: KL per unit of error variance of each layer's keys or values, one KV
   head at a time (`head_sensitivity`);
5. (int4) the transforms: per layer, KV head and kind, the head's error weighting (a, and the
   query energies for keys) times the eigenvectors of the covariance of the weighted vectors over
   the calibration caches (keys pre-RoPE), written to `libs/common/data/<profile>.kvtransforms.safetensors`;
6. (int4) the step s: bisection until a real `--tokens` cache (the calibration prompts one after
   another) costs `--entropy-bits` bits per value, everything included, as the replicas send it
   (the first layer is rebuilt by the decoder from the tokens, so it costs nothing).

`--entropy-only` keeps the profile's int4-fixed fields (steps 2-3, ~6 min) and redoes the rest (~10 min);
`--bases-only` keeps every field but s, and redoes steps 5 and 6 (~2 min);
`--step-only` keeps every field but s and redoes step 6 (~1 min).
"""

from __future__ import annotations

import argparse
import json
import math
import pprint
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

from thunderserve.common import kvaccuracy as ka
from thunderserve.common.kvcodec import Int4Codec, pack_cache
from thunderserve.common.models import load_model

ROOT = Path(__file__).resolve().parents[1]
CALIB_PROMPTS = ROOT / "tests" / "data" / "kv_calib_prompts.json"
OUT = ROOT / "libs" / "common" / "kvprofiles_data.py"
BITS = (3, 4, 5, 6)
PROFILE = "smollm2-135m"


@torch.inference_mode()
def query_stats(model, tokenizer, prompts) -> tuple[torch.Tensor, torch.Tensor]:
    """Per layer and KV head (pooled over its query heads), pre-RoPE: the energy of each RoPE
    pair [layers, kv_heads, d / 2] (mean 1 per head) and the mean query [layers, kv_heads, d]."""
    cfg = model.config
    heads, kv_heads, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    sums = torch.zeros(cfg.num_hidden_layers, kv_heads, d, dtype=torch.float64)
    means = torch.zeros_like(sums)
    count = [0]
    hooks = []
    for i, layer in enumerate(model.model.layers):
        def hook(_mod, _inp, out, i=i):
            q = out[0].double().view(-1, kv_heads, heads // kv_heads, d)
            sums[i] += q.square().sum((0, 2))
            means[i] += q.sum((0, 2))
            if i == 0:
                count[0] += q.shape[0] * q.shape[2]
        hooks.append(layer.self_attn.q_proj.register_forward_hook(hook))
    try:
        for p in prompts:
            ids = torch.tensor([ka.prompt_ids(tokenizer, p)])
            model.generate(ids, max_new_tokens=48, do_sample=False)
    finally:
        for h in hooks:
            h.remove()
    pairs = sums[..., : d // 2] + sums[..., d // 2 :]
    return pairs / pairs.mean(-1, keepdim=True), means / max(count[0], 1)


def sensitivity(model, cases, codecs, kind: str) -> list[float]:
    out = []
    for index, codec in enumerate(codecs):
        kls = []
        for case in cases:
            layers = list(case.layers)
            k, v = layers[index]
            if kind == "key":
                layers[index] = (codec.decode(codec.encode(k, kind="key")), v)
            else:
                layers[index] = (k, codec.decode(codec.encode(v, kind="value")))
            lp = ka.teacher_forced_logprobs(model, layers, case.last_token, case.reference)
            kls.append(F.kl_div(lp, case.ref_logprobs, log_target=True, reduction="none").sum(-1))
        out.append(float(torch.cat(kls).mean()))
        print(f"{kind} layer {index}: KL {out[-1]:.3e}", flush=True)
    return out


@torch.inference_mode()
def head_sensitivity(model, cases, energy: torch.Tensor, noise: float = 0.1, seed: int = 0) -> dict[str, list]:
    """KL per unit of weighted error variance, per layer, kind and KV head: the `a` that sets the
    entropy-coded codec's step (step = s / sqrt(a), and / sqrt(w) per key channel).

    Gaussian noise of variance noise^2 / 12 (a uniform quantizer's error at step `noise`) goes
    into one head's keys or values at a time, every token but the sink; key channel c gets
    variance / w_c, w the query energy (RoPE turns a pair's isotropic noise into the same, so it
    can be added after RoPE). a = mean KL / (noise^2 / 12).
    """
    n_layers, kv_heads, half = energy.shape
    weights = torch.cat((energy, energy), -1).float()  # [layer, head, head_dim]
    var = noise * noise / 12
    out: dict[str, list] = {"key": [], "value": []}
    g = torch.Generator().manual_seed(seed)
    for kind in ("key", "value"):
        for index in range(n_layers):
            row = []
            for head in range(kv_heads):
                kls = []
                for case in cases:
                    layers = list(case.layers)
                    k, v = layers[index]
                    x = (k if kind == "key" else v).clone()
                    std = math.sqrt(var) / weights[index, head].sqrt() if kind == "key" else math.sqrt(var)
                    body = x[:, head, 1:, :]
                    body += torch.randn(body.shape, generator=g) * std
                    layers[index] = (x, v) if kind == "key" else (k, x)
                    lp = ka.teacher_forced_logprobs(model, layers, case.last_token, case.reference)
                    kls.append(F.kl_div(lp, case.ref_logprobs, log_target=True, reduction="none").sum(-1))
                row.append(float(torch.cat(kls).mean()) / var)
            out[kind].append(row)
            print(f"{kind} layer {index}: a = {', '.join(f'{a:.3g}' for a in row)}", flush=True)
    return out


def _vectors(case, index: int, kind: str, theta: float) -> torch.Tensor:
    """A calibration cache's vectors [head, n - 1, d] as the codec sees them: the sink token left
    out (it travels in fp16), keys pre-RoPE."""
    from thunderserve.common import kvquant

    x = case.layers[index][0 if kind == "key" else 1][0, :, 1:, :].double()
    return kvquant.rope(x, theta, 1, inverse=True) if kind == "key" else x


def error_weights(profile: dict) -> dict[str, torch.Tensor]:
    """{"key"|"value": [layers, kv_heads, d, d]}: what a unit of error in each direction of a
    head's vector costs in KL, as far as the profile knows it: a for values (the head's measured
    sensitivity, the same in every direction), a x diag(w) for pre-RoPE keys (w: the queries'
    energy in each channel, which multiplies a key error in the attention logits)."""
    energy = torch.tensor(profile["query_energy"], dtype=torch.float64)
    a = {kind: torch.tensor(profile["head_sensitivity"][kind], dtype=torch.float64)[..., None, None]
         for kind in ("key", "value")}
    d = int(profile["head_dim"])
    return {"key": a["key"] * torch.diag_embed(torch.cat((energy, energy), -1)),
            "value": a["value"] * torch.eye(d, dtype=torch.float64)}


@torch.inference_mode()
def transforms(cases, theta: float, weights: dict[str, torch.Tensor], floor: float = 1e-4) -> dict[str, torch.Tensor]:
    """{"key"|"value": [layers, kv_heads, d, d]} encode matrices W R: W = weights^(1/2) (a
    head's error weighting, `error_weights`; eigenvalues floored at `floor` x the largest), R the
    eigenvectors of the covariance of the weighted vectors x W over the calibration caches,
    strongest first. The coefficients are then uncorrelated (a KLT: their entropies sum to less
    than the channels' did) and a unit of error in any of them costs the same KL, so one step s
    serves every coefficient of every head."""
    out = {}
    for kind in ("key", "value"):
        per_layer = []
        for index in range(weights[kind].shape[0]):
            vals, vecs = torch.linalg.eigh(weights[kind][index])
            vals = vals.clamp_min(floor * vals[..., -1:].clamp_min(1e-300))
            root = vecs @ torch.diag_embed(vals.sqrt()) @ vecs.transpose(-1, -2)  # [head, d, d]
            x = torch.cat([_vectors(case, index, kind, theta) for case in cases], 1) @ root
            x = x - x.mean(1, keepdim=True)
            basis = torch.linalg.eigh(x.transpose(-1, -2) @ x / x.shape[1])[1].flip(-1)
            per_layer.append(root @ basis)
        out[kind] = torch.stack(per_layer).to(torch.float16).contiguous()
    return out


def save_transforms(name: str, found: dict[str, torch.Tensor]) -> Path:
    from safetensors.torch import save_file

    from thunderserve.common import kvprofiles

    path = kvprofiles.transforms_path(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(found, str(path))
    kvprofiles._transforms.cache_clear()
    return path


def entropy_step(profile: dict, layers, target: float) -> tuple[float, float]:
    """The largest-quality step s (smallest) whose entropy-coded cache `layers` costs at most
    `target` bits per value, everything included, as the replicas send it (the first layer
    rebuilt by the decoder); bisection on log s. Returns (s, bits)."""
    from thunderserve.common import kvprofiles
    from thunderserve.common.kvcodec import EntropyCodec

    values = sum(k.numel() + v.numel() for k, v in layers)

    def bits(s: float) -> float:
        p = kvprofiles.Profile(PROFILE, profile["model"], profile["layers"], profile["kv_heads"],
                               profile["head_dim"], profile["rope_theta"], (), (), profile["query_energy"],
                               profile["head_sensitivity"], s, profile["mean_query"])
        return pack_cache(EntropyCodec.from_profile(p), layers, rebuild=True)[0].numel() * 8 / values

    lo, hi = 1e-4, 1.0  # bits(lo) > target >= bits(hi)
    for _ in range(20):
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if bits(mid) > target else (lo, mid)
    return hi, bits(hi)


def bits_per_value(profile: dict, tokens: int) -> float:
    from thunderserve.common import kvprofiles

    p = kvprofiles.Profile("calib", profile["model"], profile["layers"], profile["kv_heads"], profile["head_dim"],
                           profile["rope_theta"], tuple(profile["key_bits"]), tuple(profile["value_bits"]),
                           profile["query_energy"])
    g = torch.Generator().manual_seed(0)
    shape = (1, p.kv_heads, tokens, p.head_dim)
    layers = [(torch.randn(shape, generator=g), torch.randn(shape, generator=g)) for _ in range(p.layers)]
    base = Int4Codec()
    nbytes = 0
    for i, (k, v) in enumerate(layers):
        key = replace(base.key_spec, bits=p.key_bits[i], rope_theta=p.rope_theta)
        value = replace(base.value_spec, bits=p.value_bits[i])
        nbytes += pack_cache(Int4Codec(key, value, p.key_weights(i)), [(k, v)])[0].numel()
    return nbytes * 8 / sum(k.numel() + v.numel() for k, v in layers)


def allocate(sens_k, sens_v, profile: dict, target: float, tokens: int) -> tuple[list[int], list[int]]:
    n = len(sens_k)
    bits = {"key": [BITS[0]] * n, "value": [BITS[0]] * n}
    sens = {"key": sens_k, "value": sens_v}
    frozen: set[tuple[str, int]] = set()
    while True:
        best = None
        for kind in bits:
            for i in range(n):
                b = bits[kind][i]
                if b == BITS[-1] or (kind, i) in frozen:
                    continue
                gain = sens[kind][i] * 4.0 ** (4 - b) * 0.75  # KL removed by one more bit
                if best is None or gain > best[0]:
                    best = (gain, kind, i)
        if best is None:
            break
        _, kind, i = best
        bits[kind][i] += 1
        trial = dict(profile, key_bits=bits["key"], value_bits=bits["value"])
        if bits_per_value(trial, tokens) > target:
            bits[kind][i] -= 1
            frozen.add((kind, i))  # a bigger step does not fit; smaller ones still may
    return bits["key"], bits["value"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target-bits", type=float, default=4.56)
    parser.add_argument("--entropy-bits", type=float, default=4.55,
                        help="bits per value the entropy-coded codec's step s aims at on a --tokens cache")
    parser.add_argument("--tokens", type=int, default=2000)
    parser.add_argument("--entropy-only", action="store_true",
                        help="keep the profile's other fields; recalibrate the entropy-coded codec's only")
    parser.add_argument("--bases-only", action="store_true",
                        help="keep the profile's fields but s; recompute the int4 bases, then re-bisect s")
    parser.add_argument("--step-only", action="store_true",
                        help="keep every other field of the profile; only re-bisect the entropy-coded step s")
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args()
    torch.set_num_threads(1)
    t0 = time.time()
    model, tokenizer = load_model("smollm2")
    prompts = ka.load_prompts(CALIB_PROMPTS)
    if args.step_only or args.bases_only:
        from thunderserve.common.kvprofiles_data import PROFILES

        profile = dict(PROFILES[PROFILE])
        if args.bases_only:
            cases = ka.build_cases(model, tokenizer, prompts)
            save_transforms(PROFILE, transforms(cases, profile["rope_theta"], error_weights(profile)))
    else:
        profile = calibrate(model, tokenizer, prompts, args)
    step, bits = entropy_step(profile, ka.long_prompt_cache(model, tokenizer, prompts, args.tokens), args.entropy_bits)
    profile.update(entropy_step=float(f"{step:.5g}"), entropy_bits_per_value=round(bits, 4))
    text = ('"""Generated by benchmarks/kvcodec_calibrate.py: do not edit by hand.\n\n'
            f'{len(prompts)} calibration prompts (tests/data/kv_calib_prompts.json); widths for '
            f'<= {args.target_bits} bits/value at {args.tokens} tokens;\nentropy-coded step for '
            f'{args.entropy_bits} bits/value on a {args.tokens}-token calibration cache.\n"""\n\n'
            f"PROFILES = {pprint.pformat({PROFILE: profile}, width=110, compact=True)}\n")
    Path(args.out).write_text(text)
    print(json.dumps({"out": args.out, "key_bits": profile["key_bits"], "value_bits": profile["value_bits"],
                      "bits_per_value": profile["bits_per_value"], "entropy_step": profile["entropy_step"],
                      "entropy_bits_per_value": profile["entropy_bits_per_value"],
                      "seconds": round(time.time() - t0, 1)}))


def calibrate(model, tokenizer, prompts, args) -> dict:
    """Every field of the profile but the entropy-coded step s (with --entropy-only, only the
    entropy-coded codec's fields: the mean queries and the head sensitivities)."""
    cfg = model.config
    cases = ka.build_cases(model, tokenizer, prompts)
    energy, mean_query = query_stats(model, tokenizer, prompts)
    if args.entropy_only:
        from thunderserve.common.kvprofiles_data import PROFILES

        profile = dict(PROFILES[PROFILE])
        energy = torch.tensor(profile["query_energy"], dtype=torch.float64)
    else:
        theta = float(cfg.rope_parameters["rope_theta"])
        profile = {"model": "SmolLM2-135M-Instruct", "layers": cfg.num_hidden_layers,
                   "kv_heads": cfg.num_key_value_heads, "head_dim": cfg.head_dim, "rope_theta": theta,
                   "query_energy": [[[float(f"{x:.4g}") for x in h] for h in layer] for layer in energy.tolist()]}
        base = Int4Codec()
        codecs = [Int4Codec(replace(base.key_spec, rope_theta=theta), base.value_spec,
                            torch.cat((energy[i], energy[i]), -1).float()) for i in range(cfg.num_hidden_layers)]
        sens_k = sensitivity(model, cases, codecs, "key")
        sens_v = sensitivity(model, cases, codecs, "value")
        key_bits, value_bits = allocate(sens_k, sens_v, profile, args.target_bits, args.tokens)
        profile.update(key_bits=key_bits, value_bits=value_bits,
                       bits_per_value=round(bits_per_value(dict(profile, key_bits=key_bits, value_bits=value_bits),
                                                           args.tokens), 4),
                       sensitivity={"key": [float(f"{x:.3g}") for x in sens_k],
                                    "value": [float(f"{x:.3g}") for x in sens_v]})
    profile["mean_query"] = [[[float(f"{x:.4g}") for x in h] for h in layer] for layer in mean_query.tolist()]
    heads = head_sensitivity(model, cases, energy.float())
    profile["head_sensitivity"] = {k: [[float(f"{a:.4g}") for a in row] for row in v] for k, v in heads.items()}
    save_transforms(PROFILE, transforms(cases, profile["rope_theta"], error_weights(profile)))
    return profile


if __name__ == "__main__":
    main()
