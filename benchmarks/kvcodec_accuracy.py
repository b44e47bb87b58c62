"""KV codec accuracy on the real SmolLM2-135M-Instruct (issue 3). Prints JSON, writes a plot.

    python benchmarks/kvcodec_accuracy.py [--limit N] [--hops strict served] [--no-curve]
                                          [--plot docs/kvcodec_accuracy.png]

For every prompt of tests/data/kv_prompts.json: greedy prefix agreement over 32 tokens and
mean next-token KL against the uncompressed path (see thunderserve.common.kvaccuracy), and the
wire bits per value of the whole cache. Each hop (`--hops`) is measured: "strict" (decode starts
from the last prompt token, so the first generated token already sees the codec) and "served"
(the replicas' path: the prefill picks the first token in full precision, and the 32 tokens
after it are decoded on the compressed cache of the whole prompt). The curve uses the first hop.
The registered codecs (int8, int8-fixed, int4, int4-fixed) and an fp16 cast of the cache (the metric's
floor) are measured by free-running greedy generation (the metric's definition); the trade-off curve
(agreement vs bits/value for other quantizer settings, plus plain fp16/bf16 casts of the cache as the
noise floor of the metric) uses teacher-forced argmax,
which gives the same prefix up to fp rounding of a batched forward; the JSON reports both for
the registered codecs so the two can be compared. Every row also has `bits_per_value_2000`: the
wire size of a real 2,000-token cache (these prompts one after another), where the issue's target is.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from thunderserve.common import kvaccuracy as ka
from thunderserve.common import kvprofiles, kvprofiles_data
from thunderserve.common.kvcodec import (
    EntropyCodec,
    GroupQuantCodec,
    Int4Codec,
    PackedTensor,
    QuantSpec,
    dtype_name,
    get_codec,
    pack_cache,
)
from thunderserve.common.models import load_model

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import kvcodec_calibrate as calib  # noqa: E402  (its width allocation, for the curve)


class CastCodec:
    """The cache cast to fp16/bf16 and back: how sensitive the metric is to tiny changes."""

    name = "none"

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype

    def encode(self, tensor: torch.Tensor, kind: str = "key") -> PackedTensor:
        data = tensor.to(self.dtype).contiguous()
        return PackedTensor("none", kind, tuple(tensor.shape), dtype_name(tensor.dtype), {"data": data})

    def decode(self, packed: PackedTensor) -> torch.Tensor:  # decoded by the registered `none`
        return get_codec("none").decode(packed)


class Int4Variant(Int4Codec):
    """The int4-fixed scheme with parts switched off or other per-layer widths (for the curve)."""

    def __init__(self, key_bits=None, value_bits=None, pre_rope=True, query_weights=True, profile=True):
        super().__init__()
        self.variant = (key_bits, value_bits, pre_rope, query_weights, profile)

    def for_layer(self, index: int, n_layers: int, shape: tuple[int, ...], model: str | None = None):
        key_bits, value_bits, pre_rope, query_weights, use_profile = self.variant
        p = kvprofiles.find(n_layers, shape[1], shape[-1], model)
        kb = key_bits[index] if key_bits else (p.key_bits[index] if use_profile else 4)
        vb = value_bits[index] if value_bits else (p.value_bits[index] if use_profile else 4)
        key = replace(self.key_spec, bits=kb, rope_theta=p.rope_theta if pre_rope else 0.0)
        value = replace(self.value_spec, bits=vb)
        return Int4Codec(key, value, p.key_weights(index) if query_weights else None)


def curve_points(bits_2000) -> list[tuple[str, str, object]]:
    """(series, label, codec) for the trade-off plot; `bits_2000(codec)`: its rate on a real
    2,000-token cache."""
    points: list[tuple[str, str, object]] = [
        ("cast", "fp16 cast", CastCodec(torch.float16)),
        ("cast", "bf16 cast", CastCodec(torch.bfloat16)),
    ]
    for group in (32, 64, 128):  # the baseline: KIVI-style, no outlier handling
        spec_k, spec_v = QuantSpec(4, group, "channel"), QuantSpec(4, group, "token")
        points.append(("plain int4 (K/channel, V/token)", f"plain int4 g{group}", GroupQuantCodec(spec_k, spec_v)))
    for bits in (4, 5):  # the previous int4 codec: Hadamard rotation + fp16 key sink, groups of 64
        spec_k = QuantSpec(bits, 64, "channel", rotate=64, sink_tokens=1)
        spec_v = QuantSpec(bits, 64, "token", rotate=64)
        points.append(("previous int4 (rotation + key sink, g64)", f"previous {bits}-bit",
                       GroupQuantCodec(spec_k, spec_v)))
    # The int4-fixed scheme with one part off at a time (same per-layer widths as the codec).
    points.append(("int4-fixed ablations", "no pre-RoPE", Int4Variant(pre_rope=False)))
    points.append(("int4-fixed ablations", "no query weights", Int4Variant(query_weights=False)))
    points.append(("int4-fixed ablations", "4 bits every layer", Int4Variant(profile=False)))
    # The int4-fixed scheme with the calibrated widths allocated for other budgets.
    profile = kvprofiles.find(30, 3, 64)
    assert profile is not None
    data = kvprofiles_data.PROFILES["smollm2-135m"]
    for target in (3.6, 5.1, 5.6, 6.6):
        kb, vb = calib.allocate(data["sensitivity"]["key"], data["sensitivity"]["value"], data, target, 2000)
        points.append(("int4-fixed scheme, calibrated widths", f"<= {target} b", Int4Variant(kb, vb)))
    # int4 (entropy-coded) with the profile's step s scaled, and with one part off at a time.
    for scale in (0.5, 0.7, 1.4):
        codec = EntropyCodec.from_profile(replace(profile, entropy_step=profile.entropy_step * scale))
        points.append(("int4, step s scaled", f"s x {scale}", codec))
    flat = EntropyCodec.from_profile(profile)
    flat.token_alpha = 0.0
    points.append(("int4 ablations", "no per-token steps", flat))
    target = bits_2000(EntropyCodec.from_profile(profile))
    points.append(("int4 ablations", "no transform (session 9)", _without_transform(profile, target, bits_2000)))
    return points


def _without_transform(profile: kvprofiles.Profile, target: float, bits_2000) -> EntropyCodec:
    """int4 as it was before the transform (session 9): per-channel steps s / sqrt(a w) on the
    plain channels, s bisected for the codec's own rate on the 2,000-token cache."""
    def codec(s: float) -> EntropyCodec:
        p = replace(profile, entropy_step=s)
        return EntropyCodec(p.entropy_steps("key"), p.entropy_steps("value"), p.rope_theta, p.importance_query())

    lo, hi = profile.entropy_step / 4, profile.entropy_step * 4  # bits(lo) > target >= bits(hi)
    for _ in range(14):
        mid = (lo * hi) ** 0.5
        lo, hi = (mid, hi) if bits_2000(codec(mid)) > target else (lo, mid)
    return codec(hi)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    series: dict[str, list[dict]] = {}
    for p in result["curve"]:
        series.setdefault(p["series"], []).append(p)
    for name, pts in series.items():
        pts.sort(key=lambda p: p["bits_per_value_2000"])
        style = "s" if name == "cast" else "o" if "ablations" in name else "o-"  # ablations: points, no curve
        ax.plot([p["bits_per_value_2000"] for p in pts], [100 * p["agreement"] for p in pts], style, label=name)
        for p in pts:
            ax.annotate(p["label"], (p["bits_per_value_2000"], 100 * p["agreement"]), fontsize=7,
                        xytext=(3, -9), textcoords="offset points")
    for c in (c for c in result["codecs"] if c["hop"] == result["curve_hop"] and "cast" not in c["codec"]):
        ax.plot(c["bits_per_value_2000"], 100 * c["agreement"], "k*", markersize=11)
        ax.annotate(c["codec"], (c["bits_per_value_2000"], 100 * c["agreement"]), xytext=(4, 4),
                    textcoords="offset points", fontweight="bold")
    ax.axvline(4.57, color="grey", ls=":", lw=1)
    ax.axhline(90, color="grey", ls=":", lw=1)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("wire bits per KV value, real 2,000-token cache (everything included)")
    ax.set_ylabel("greedy prefix agreement, % (32 tokens)")
    ax.set_title(f"SmolLM2-135M KV codec accuracy, {result['prompts']} prompts, {result['curve_hop']} hop")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=None, help="only the first N prompts")
    parser.add_argument("--plot", default=str(ROOT / "docs" / "kvcodec_accuracy.png"))
    parser.add_argument("--no-curve", action="store_true", help="only the registered codecs")
    parser.add_argument("--hops", nargs="+", choices=("strict", "served"), default=["strict", "served"],
                        help="which prefill->decode hop to measure (the curve uses the first)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    t0 = time.time()
    model, tokenizer = load_model("smollm2")
    prompts = ka.load_prompts()[: args.limit]
    eos = tokenizer.eos_token_id
    result: dict = {"model": "SmolLM2-135M-Instruct", "prompts": len(prompts), "max_new_tokens": ka.MAX_NEW_TOKENS,
                    "prompt_tokens": sorted(len(ka.prompt_ids(tokenizer, p)) for p in prompts),
                    "codecs": [], "curve": [], "curve_hop": args.hops[0]}
    curve_cases = None
    # the registered codecs, and an fp16 cast of the cache: the metric's floor, by the same generation
    measured = {name: get_codec(name) for name in ("int8", "int8-fixed", "int4", "int4-fixed")}
    measured["fp16 cast"] = CastCodec(torch.float16)
    for hop in dict.fromkeys(args.hops):
        print(f"{hop} hop: prefilling {len(prompts)} prompts ...", file=sys.stderr, flush=True)
        cases = ka.build_cases(model, tokenizer, prompts, first_from_prefill=hop == "served")
        curve_cases = curve_cases or cases
        for name, codec in measured.items():
            exact = ka.evaluate(model, cases, codec, exact=True, eos=eos)
            fast = ka.evaluate(model, cases, codec, exact=False, eos=eos)
            row = {"hop": hop, **exact.summary(), "codec": name}
            row["agreement_teacher_forced"] = round(fast.agreement, 4)
            row["per_prompt"] = [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}
                                 for r in exact.per_prompt]
            result["codecs"].append(row)
            print(f"  {name}: agreement {exact.agreement:.4f}, KL {exact.kl:.3g}", file=sys.stderr, flush=True)
    cases = curve_cases
    # The wire size where the issue sets its target: a real 2,000-token cache (these prompts in a row).
    long_cache = ka.long_prompt_cache(model, tokenizer, prompts, 2000)
    long_values = sum(k.numel() + v.numel() for k, v in long_cache)

    def bits_2000(codec) -> float:
        return round(pack_cache(codec, long_cache, rebuild=True)[0].numel() * 8 / long_values, 4)

    for row in result["codecs"]:
        row["bits_per_value_2000"] = bits_2000(measured[row["codec"]])
    if not args.no_curve:
        for series, label, codec in curve_points(bits_2000):
            r = ka.evaluate(model, cases, codec, exact=False, eos=eos)
            result["curve"].append({"series": series, "label": label, **r.summary(), "codec": codec.name,
                                    "bits_per_value_2000": bits_2000(codec)})
    result["seconds"] = round(time.time() - t0, 1)
    if args.plot and result["curve"]:
        plot(result, Path(args.plot))
        result["plot"] = args.plot
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
