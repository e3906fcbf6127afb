"""`python -m moepaper.testbed.tasks [--model embedded-16e] [--limit N]`: the local suite on an embedded model, as a table."""

from __future__ import annotations

import argparse
import json
import os
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="embedded", help="embedded model: embedded (default), embedded-pooled, embedded-seed1 or embedded-16e")
    parser.add_argument("--limit", type=int, default=None, help="items per task (default: all)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--output", default=None, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

    import lm_eval
    from lm_eval.models.huggingface import HFLM

    from ..embedded import load_embedded_model
    from . import CHANCE, LOCAL_TASKS, MC_TASKS, task_manager

    model, tokenizer = load_embedded_model(args.model)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, device="cpu", batch_size=args.batch_size)
    output = lm_eval.simple_evaluate(model=lm, tasks=LOCAL_TASKS, task_manager=task_manager(), limit=args.limit)
    rows = {}
    print(f"{'task':34} {'items':>5} {'metric':>14} {'value':>7} {'stderr':>7} {'chance':>6}")
    for task in LOCAL_TASKS:
        result = output["results"][task]
        n = output["n-samples"][task]["effective"]
        metric = "acc,none" if task in MC_TASKS else "bits_per_byte,none"
        stderr = result.get(metric.replace(",", "_stderr,"), float("nan"))
        stderr = stderr if isinstance(stderr, float) and stderr == stderr else None  # "N/A" for rolling tasks
        chance = CHANCE.get(task)
        rows[task] = {"items": n, "metric": metric, "value": result[metric], "stderr": stderr, "chance": chance}
        if task in MC_TASKS:
            rows[task]["acc_norm"] = result["acc_norm,none"]
        print(f"{task:34} {n:5d} {metric:>14} {result[metric]:7.3f} {stderr if stderr is None else round(stderr, 3)!s:>7} {chance if chance else '':>6}")
    if args.output:
        with open(args.output, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
