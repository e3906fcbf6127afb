"""Where one full-suite evaluation's time goes: lm-eval against a plain forward over the same tokens.

    .venv/bin/python benchmarks/evaluation.py [--model embedded|embedded-16e|random|both] [--threads 2]
        [--batch-size 8] [--limit all] [--experts grouped_mm] [--json out.json]

For each model, in one process (the machine is noisy, so we report ratios measured in the
same run), on the local suite (6 benchmarks):
- build:   lm-eval's task manager (first use) and loading the 6 tasks (datasets, documents);
- stock:   `moepaper.pipeline.evaluation.evaluate(..., fast=False, packed=False)`: stock HFLM,
           one `simple_evaluate` per benchmark (tasks re-loaded per call), per-benchmark seconds;
- fast:    `evaluate(..., packed=False)`: stock HFLM, tasks loaded once per process and reused,
           one `lm_eval.evaluator.evaluate` over the whole suite with per-item logging;
- model:   inside the fast run, the seconds spent in HFLM's model call (forward + log-softmax
           excluded) and the padded token count it was fed;
- plain:   a plain batched forward (`model(ids).logits`, no lm-eval) over exactly the token
           rows the fast run fed the model, length-sorted into batches of --batch-size
           (right-padded), and the real (unpadded) token count;
- packed:  `evaluate(...)`, the default: one lm-eval call with `moepaper.pipeline.packed.PackedHFLM`
           (a multiple-choice item's context once for its four choices, only scored positions
           through the vocabulary head, rows sorted by length), and the tokens it fed the model.
Ratios: stock / fast, fast / plain (lm-eval overhead), padded / real tokens, stock / packed and
fast / packed (the speed-up), tokens fed fast / packed. Values: max |fast - stock| and
max |packed - fast| per benchmark, and whether every per-item accuracy of packed equals fast's.

`--model random` builds an untrained model of the default embedded shape (Qwen3-MoE, 64
experts, top-8, expert width 32, hidden 256, 4 layers, vocab 4096) with the embedded
tokenizer; `embedded` and `embedded-16e` load the committed embedded models (`both`: these two).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from contextlib import contextmanager

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from moepaper.pipeline import evaluation  # noqa: E402


def build(name: str):
    from moepaper.testbed.embedded import load_embedded_model

    model, tokenizer = load_embedded_model("embedded-16e" if name == "embedded-16e" else "embedded")
    if name in ("embedded", "embedded-16e"):
        return model, tokenizer
    from moepaper.testbed.train import TrainConfig, build_model

    return build_model(TrainConfig(), tokenizer).eval(), tokenizer


@contextmanager
def packed_recording():
    """Count what PackedHFLM feeds the model: calls, padded tokens (rows x longest row), real tokens."""
    from moepaper.pipeline.packed import PackedHFLM

    record = {"calls": 0, "padded_tokens": 0, "real_tokens": 0}
    score = PackedHFLM._score

    def counted(self, batch):
        record["calls"] += 1
        record["padded_tokens"] += len(batch) * len(batch[0])
        record["real_tokens"] += sum(len(t) for t in batch)
        return score(self, batch)

    PackedHFLM._score = counted
    try:
        yield record
    finally:
        PackedHFLM._score = score


@contextmanager
def recording():
    """Record what HFLM feeds the model: the seconds in `_model_call`, padded shapes, unpadded rows."""
    import lm_eval.models.huggingface as hf

    record = {"model_seconds": 0.0, "padded_tokens": 0, "calls": 0, "rows": []}
    call, pad = hf.HFLM._model_call, hf.pad_and_concat

    def timed_call(self, inps, *args, **kwargs):
        start = time.perf_counter()
        out = call(self, inps, *args, **kwargs)
        record["model_seconds"] += time.perf_counter() - start
        record["padded_tokens"] += inps.numel()
        record["calls"] += 1
        return out

    def recorded_pad(max_length, tensors, *args, **kwargs):
        record["rows"] += [t.tolist() for t in tensors]
        return pad(max_length, tensors, *args, **kwargs)

    hf.HFLM._model_call, hf.pad_and_concat = timed_call, recorded_pad
    try:
        yield record
    finally:
        hf.HFLM._model_call, hf.pad_and_concat = call, pad


def plain_forward(model, rows: list[list[int]], batch_size: int) -> float:
    """Seconds of `model(ids).logits` over `rows` (token id lists), longest first, right-padded batches."""
    ordered = sorted(rows, key=len, reverse=True)
    start = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(ordered), batch_size):
            chunk = ordered[i : i + batch_size]
            ids = torch.zeros(len(chunk), len(chunk[0]), dtype=torch.long)  # (B, T)
            for j, row in enumerate(chunk):
                ids[j, : len(row)] = torch.tensor(row)
            model(ids).logits
    return time.perf_counter() - start


def measure(name: str, batch_size: int, limit, experts: str | None) -> dict:
    model, tokenizer = build(name)
    if experts:
        model.set_experts_implementation(experts)
    out = {"model": name, "experts": model.config._experts_implementation, "experts_per_layer": model.config.num_experts}
    start = time.perf_counter()
    suite = evaluation.get_suite("local")
    manager = evaluation.task_manager(suite.include_path, suite.include_defaults)
    out["task_manager_s"] = time.perf_counter() - start
    start = time.perf_counter()
    manager.load([b.task for b in suite.benchmarks])
    out["load_tasks_s"] = time.perf_counter() - start

    evaluation.evaluate(model, tokenizer, "local", limit=1, batch_size=batch_size)  # warm-up (imports, env report)
    start = time.perf_counter()
    stock = evaluation.evaluate(model, tokenizer, "local", limit=limit, batch_size=batch_size, fast=False, packed=False)
    out["stock_s"] = time.perf_counter() - start
    out["stock_per_benchmark_s"] = {r.benchmark: float(r.note.split()[0]) for r in stock.itertuples()}
    with recording() as rec:
        start = time.perf_counter()
        fast = evaluation.evaluate(model, tokenizer, "local", limit=limit, batch_size=batch_size, fast=True, packed=False)
        out["fast_s"] = time.perf_counter() - start
    with packed_recording() as packed_rec:
        start = time.perf_counter()
        packed = evaluation.evaluate(model, tokenizer, "local", limit=limit, batch_size=batch_size)
        out["packed_s"] = time.perf_counter() - start
    out["packed_calls"] = packed_rec["calls"]
    out["packed_padded_tokens"] = packed_rec["padded_tokens"]
    out["packed_real_tokens"] = packed_rec["real_tokens"]
    out["max_abs_packed_difference"] = float((packed["value"] - fast["value"]).abs().max())
    out["packed_items_equal"] = {
        r.benchmark: r.items == f.items if "acc" in r.items else None
        for r, f in zip(packed.itertuples(), fast.itertuples())
    }
    out["fast_model_call_s"] = rec["model_seconds"]
    out["model_calls"] = rec["calls"]
    out["padded_tokens"] = rec["padded_tokens"]
    out["real_tokens"] = sum(len(r) for r in rec["rows"])
    out["rows"] = len(rec["rows"])
    out["plain_s"] = plain_forward(model, rec["rows"], batch_size)
    out["items"] = {r.benchmark: int(r.n) for r in fast.itertuples()}
    out["max_abs_value_difference"] = float((fast["value"] - stock["value"]).abs().max())
    out["values"] = {r.benchmark: r.value for r in fast.itertuples()}
    out["packed_values"] = {r.benchmark: r.value for r in packed.itertuples()}
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("embedded", "embedded-16e", "random", "both"), default="both")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--batch-size", type=int, default=evaluation.DEFAULT_BATCH_SIZE)
    parser.add_argument("--limit", default="all", help="'all' (every item) or items per task")
    parser.add_argument("--experts", default=None, help="experts implementation (default: the model's)")
    parser.add_argument("--json", help="write raw numbers here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    limit = "all" if args.limit == "all" else int(args.limit)
    names = ["embedded", "embedded-16e"] if args.model == "both" else [args.model]
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}; batch size {args.batch_size}; limit {args.limit}")
    results = []
    for name in names:
        r = measure(name, args.batch_size, limit, args.experts)
        results.append(r)
        print(f"\n## {name} ({r['experts_per_layer']} experts, {r['experts']}); items {r['items']}")
        print(f"task manager {r['task_manager_s']:.2f} s, loading 6 tasks {r['load_tasks_s']:.2f} s")
        print("stock per benchmark (s): " + ", ".join(f"{k} {v:.1f}" for k, v in r["stock_per_benchmark_s"].items()))
        print("| stock s | fast s | stock / fast | model call s | plain forward s | fast / plain | model call / plain "
              "| padded / real tokens | real tokens | rows | max |fast - stock| |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        print(f"| {r['stock_s']:.2f} | {r['fast_s']:.2f} | {r['stock_s'] / r['fast_s']:.2f}x | {r['fast_model_call_s']:.2f} "
              f"| {r['plain_s']:.2f} | {r['fast_s'] / r['plain_s']:.2f}x | {r['fast_model_call_s'] / r['plain_s']:.2f}x "
              f"| {r['padded_tokens'] / r['real_tokens']:.2f} | {r['real_tokens']} | {r['rows']} "
              f"| {r['max_abs_value_difference']:.2e} |", flush=True)
        print("| packed s | stock / packed | fast / packed | packed calls | tokens fed (fast / packed) "
              "| packed padded / real | max |packed - fast| | accuracies per item equal |")
        print("|---|---|---|---|---|---|---|---|")
        equal = [k for k, v in r["packed_items_equal"].items() if v is not None]
        print(f"| {r['packed_s']:.2f} | {r['stock_s'] / r['packed_s']:.2f}x | {r['fast_s'] / r['packed_s']:.2f}x "
              f"| {r['packed_calls']} | {r['padded_tokens']} / {r['packed_padded_tokens']} "
              f"({r['padded_tokens'] / r['packed_padded_tokens']:.2f}x) "
              f"| {r['packed_padded_tokens'] / r['packed_real_tokens']:.2f} | {r['max_abs_packed_difference']:.2e} "
              f"| {sum(r['packed_items_equal'][k] for k in equal)} of {len(equal)} benchmarks |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
