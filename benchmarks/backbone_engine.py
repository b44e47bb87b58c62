"""Engine decode throughput: the continuous batch at batch 1/4/16 against single-stream `model.generate`.

Loads the model once per dtype, prefills `--prompt-len`-token prompts with `Engine.prefill`, then
times `--steps` steps of `DecodeBatch.step` (greedy next token chosen and fed back, as the decode
role does) for every batch size. The baseline is HuggingFace `model.generate` (greedy, one stream,
same prompt length) on the same loaded weights; its decode-only rate is
(steps - 1) / (t(generate steps tokens) - t(generate 1 token)), so prefill is excluded on both
sides. Every figure is the median of `--repeats` timed runs after a warm-up.

    python benchmarks/backbone_engine.py                # fp32 + bf16, 1 thread
    python benchmarks/backbone_engine.py --threads 1 2  # also 2 threads (needs 2 idle cores)
    python benchmarks/backbone_engine.py --quick        # fp32, 1 thread, fewer steps

Prints one JSON object; writes docs/backbone_engine.png unless --no-plot.
"""

from __future__ import annotations

import argparse
import collections
import time
from typing import Any

import torch
from backbone_common import finish, host_info, median, progress, prompt_ids, r, save_plot

from thunderserve.common.engine import Engine, PrefillResult


def time_batch(engine: Engine, prefilled: list[PrefillResult], batch: int, steps: int,
               warmup: int) -> tuple[float, float]:
    """(wall s, process CPU s) for `steps` decode steps of a batch of `batch` sequences, after a warm-up."""
    b = engine.new_batch()
    for i in range(batch):
        res = prefilled[i]
        b.add(f"s{i}", res.kv, int(torch.argmax(res.logits)))
    for _ in range(warmup):
        _step(b)
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(steps):
        _step(b)
    return time.perf_counter() - t0, time.process_time() - c0


def _step(b) -> None:
    logits = b.step()
    for seq_id, row in logits.items():
        b.set_next_token(seq_id, int(torch.argmax(row)))


def time_generate(engine: Engine, ids: list[int], new_tokens: int) -> tuple[float, float]:
    inputs = torch.tensor([ids], dtype=torch.long)
    mask = torch.ones_like(inputs)
    t0, c0 = time.perf_counter(), time.process_time()
    with torch.inference_mode():
        out = engine.model.generate(
            input_ids=inputs, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
            do_sample=False, pad_token_id=engine.tokenizer.eos_token_id,
        )
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    assert out.shape[1] == len(ids) + new_tokens, out.shape
    return elapsed, cpu


def profile_step(engine: Engine, prefilled: list[PrefillResult], batch: int) -> list[dict[str, Any]]:
    """Top CPU ops of a few batch steps (where a step's time goes)."""
    from torch.profiler import ProfilerActivity, profile

    b = engine.new_batch()
    for i in range(batch):
        b.add(f"s{i}", prefilled[i].kv, int(torch.argmax(prefilled[i].logits)))
    _step(b)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(4):
            _step(b)
    rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:8]
    return [{"op": e.key, "self_ms_per_step": r(e.self_cpu_time_total / 1000 / 4, 2), "calls_per_step": e.count // 4}
            for e in rows]


def run(args: argparse.Namespace) -> dict[str, Any]:
    results: list[dict[str, Any]] = []
    for dtype in args.dtypes:
        progress(f"loading {args.model} as {dtype}")
        engine = Engine(args.model, dtype=dtype, threads=max(args.threads))
        prompts = [prompt_ids(engine.tokenizer, args.prompt_len, salt=i) for i in range(max(args.batches))]
        for threads in args.threads:
            torch.set_num_threads(threads)
            progress(f"{dtype}, {threads} thread(s): prefill {len(prompts)} x {args.prompt_len} tokens")
            prefilled = [engine.prefill(p) for p in prompts]
            row: dict[str, Any] = {"dtype": dtype, "threads": threads, "engine": {}}
            # Rounds interleave every measurement, so load from other processes on this shared host
            # hits the batch sizes and the baseline alike; each figure is the median over rounds.
            time_generate(engine, prompts[0], 4)  # warm-up
            runs: dict[Any, list[tuple[float, float]]] = collections.defaultdict(list)
            for rnd in range(args.repeats):
                runs["gen_full"].append(time_generate(engine, prompts[0], args.steps))
                runs["gen_one"].append(time_generate(engine, prompts[0], 1))
                for batch in args.batches:
                    runs[batch].append(time_batch(engine, prefilled, batch, args.steps, args.warmup))
                progress(f"  round {rnd + 1}/{args.repeats} done")
            for batch in args.batches:
                t = median([w for w, _ in runs[batch]])
                row["engine"][f"batch_{batch}"] = {
                    "tokens_per_s": r(batch * args.steps / t, 1),
                    "ms_per_step": r(1000 * t / args.steps, 2),
                    # CPU s / (wall s x threads): ~1 = the run had its cores; lower = other load took them.
                    "cpu_share": r(median([c / w for w, c in runs[batch]]) / threads, 2),
                }
                progress(f"  batch {batch}: {batch * args.steps / t:.1f} tok/s ({1000 * t / args.steps:.1f} ms/step)")
            full = median([w for w, _ in runs["gen_full"]])
            one = median([w for w, _ in runs["gen_one"]])
            decode_rate = (args.steps - 1) / max(full - one, 1e-9)
            row["generate"] = {
                "decode_tokens_per_s": r(decode_rate, 1),
                "end_to_end_tokens_per_s": r(args.steps / full, 1),
                "prefill_plus_first_token_s": r(one, 3),
                "cpu_share": r(median([c / w for w, c in runs["gen_full"]]) / threads, 2),
            }
            progress(f"  generate: {decode_rate:.1f} tok/s decode-only, {args.steps / full:.1f} tok/s end to end")
            top = max(args.batches)
            row["speedup_vs_generate"] = {
                f"batch_{b}": r(row["engine"][f"batch_{b}"]["tokens_per_s"] / decode_rate, 2) for b in args.batches
            }
            row[f"batch_{top}_meets_4x"] = row["speedup_vs_generate"][f"batch_{top}"] >= 4.0
            if args.profile:
                row[f"profile_top_ops_batch_{top}"] = profile_step(engine, prefilled, top)
            results.append(row)
        del engine
    return {
        "benchmark": "backbone_engine",
        "model": args.model,
        "prompt_tokens": args.prompt_len,
        "decode_steps": args.steps,
        "repeats": args.repeats,
        "baseline": "transformers model.generate, greedy, batch 1, same weights; decode-only rate",
        "target": "batch 16 >= 4x single-stream tokens/s",
        "host": host_info(),
        "results": results,
    }


def plot(result: dict[str, Any], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["results"]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    batches = sorted(int(k.split("_")[1]) for k in rows[0]["engine"])
    labels = ["generate"] + [f"batch {b}" for b in batches]
    for i, row in enumerate(rows):
        vals = [row["generate"]["decode_tokens_per_s"]] + [row["engine"][f"batch_{b}"]["tokens_per_s"] for b in batches]
        xs = [j + (i - len(rows) / 2 + 0.5) * 0.8 / len(rows) for j in range(len(vals))]
        ax.bar(xs, vals, width=0.8 / len(rows), label=f"{row['dtype']}, {row['threads']} thr")
    ax.set_xticks(range(len(labels)), labels)
    ax.set_ylabel("decode tokens/s")
    ax.set_title(f"{result['model']}: continuous batch vs model.generate ({result['prompt_tokens']}-token prompts)")
    save_plot(fig, ax, path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2", help="model name (default smollm2)")
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], help="dtypes to compare")
    p.add_argument("--threads", nargs="+", type=int, default=[1],
                   help="torch thread counts to try (default 1; e.g. --threads 1 2)")
    p.add_argument("--batches", nargs="+", type=int, default=[1, 4, 16], help="decode batch sizes")
    p.add_argument("--prompt-len", type=int, default=128, help="prompt tokens per sequence")
    p.add_argument("--steps", type=int, default=32, help="timed decode steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed decode steps before timing")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per figure (median)")
    p.add_argument("--profile", action="store_true", help="add the top torch ops of the largest batch's step")
    p.add_argument("--quick", action="store_true", help="fp32, 1 thread, 16 steps, 1 repeat")
    p.add_argument("--no-plot", action="store_true", help="do not write docs/backbone_engine.png")
    args = p.parse_args()
    if args.quick:
        args.dtypes, args.threads, args.steps, args.repeats = ["float32"], [1], 16, 1
    result = run(args)
    finish(result, "backbone_engine", plot, args.no_plot)


if __name__ == "__main__":
    main()
