"""KV codec throughput and wire size (issue 3). Prints JSON.

    python benchmarks/kvcodec_throughput.py [--tokens 2000] [--repeats 5] [--source smollm2|synthetic] [--threads 1]

Encode = quantize + pack, decode = unpack + dequantize, in GB/s of fp32 input (best and
median run), on one core (torch.set_num_threads(1); `--threads N` codes N runs of layers at
once, as `pack_cache(threads=N)` does). The tensor set is a SmolLM2 cache of a real prompt
(30 layers x (key, value) of [1, 3 KV heads, tokens, 64]), or with `--source synthetic` a
random one of that shape with a few outlier key channels like the real model's.
Wire size counts everything `pack_cache` puts on the wire (codes, scales, zeros, fp16 parts).
int4's and int8's entropy coder, and int4's product with its transforms, run the C kernels where
they can (`simd_kernels` in the output); THUNDERSERVE_SIMD=0 measures the numba and torch paths.
The process keeps freed memory mapped, as the replicas do (`thunderserve.common.memory`);
`--default-malloc` measures with glibc's defaults instead.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from thunderserve.common import native
from thunderserve.common.kvcodec import codec_names, get_codec, pack_cache, unpack_cache
from thunderserve.common.memory import keep_freed_memory

LAYERS, KV_HEADS, HEAD_DIM = 30, 3, 64


def smollm2_like_cache(tokens: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    layers = []
    for _ in range(LAYERS):
        k = torch.randn(1, KV_HEADS, tokens, HEAD_DIM, generator=g)
        k[..., :4] *= 8.0  # outlier channels
        v = torch.randn(1, KV_HEADS, tokens, HEAD_DIM, generator=g) * 0.5
        layers.append((k, v))
    return layers


def _times(fn, repeats: int) -> tuple[float, float]:
    """(best, median) seconds of `repeats` calls after a warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times), statistics.median(times)


def measure(name: str, layers, repeats: int, threads: int = 1) -> dict:
    codec = get_codec(name)
    values = sum(k.numel() + v.numel() for k, v in layers)
    fp32_bytes = values * 4
    payload, manifest = pack_cache(codec, layers, threads=threads)
    t_enc, med_enc = _times(lambda: pack_cache(codec, layers, threads=threads), repeats)
    t_dec, med_dec = _times(lambda: unpack_cache(payload, manifest, threads=threads), repeats)
    wire = int(payload.numel())
    return {
        "codec": name,
        "encode_gbps": round(fp32_bytes / t_enc / 1e9, 3),  # best run
        "decode_gbps": round(fp32_bytes / t_dec / 1e9, 3),
        "encode_gbps_median": round(fp32_bytes / med_enc / 1e9, 3),
        "decode_gbps_median": round(fp32_bytes / med_dec / 1e9, 3),
        "encode_ms": round(t_enc * 1e3, 2),
        "decode_ms": round(t_dec * 1e3, 2),
        "wire_bytes": wire,
        "bits_per_value": round(wire * 8 / values, 4),
        "ratio_vs_fp16": round(values * 2 / wire, 3),
        "ratio_vs_fp32": round(fp32_bytes / wire, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--codecs", nargs="*", default=None)
    parser.add_argument("--threads", type=int, default=1,
                        help="codec threads (default 1: the issue's one-core figure)")
    parser.add_argument("--source", choices=("smollm2", "synthetic"), default="smollm2",
                        help="the cache: SmolLM2's of a real prompt (the accuracy prompts one after another; "
                             "int4's size depends on the content), or random with outlier channels")
    parser.add_argument("--default-malloc", action="store_true",
                        help="leave glibc's allocator settings alone (fresh mmap per large tensor)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    kept = False if args.default_malloc else keep_freed_memory()
    layers, source = smollm2_like_cache(args.tokens), "synthetic"
    if args.source == "smollm2":
        from thunderserve.common import kvaccuracy as ka
        from thunderserve.common.models import load_model

        model, tokenizer = load_model("smollm2")
        layers, source = ka.long_prompt_cache(model, tokenizer, ka.load_prompts(), args.tokens), "smollm2"
    names = args.codecs or [n for n in codec_names()]
    result = {
        "tokens": args.tokens,
        "source": source,
        "shape": [1, KV_HEADS, args.tokens, HEAD_DIM],
        "layers": LAYERS,
        "fp32_mb": round(sum(k.numel() + v.numel() for k, v in layers) * 4 / 1e6, 2),
        "threads": torch.get_num_threads(),
        "codec_threads": args.threads,
        "keep_freed_memory": kept,
        # the codec's C kernels: "avx512", "avx2", or None for the numba and torch paths (THUNDERSERVE_SIMD=0)
        "simd_kernels": native.level_name(),
        "load_1min": round(os.getloadavg()[0], 2),
        "codecs": [measure(n, layers, args.repeats, args.threads) for n in names],
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
