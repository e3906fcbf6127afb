"""A named sweep in one process against the same sweep in worker processes, in one run.

    .venv/bin/python benchmarks/sweep_workers.py [--model embedded] [--workers 2]
        [--criteria man msan reap frequency] [--ratios 0.25] [--limit all] [--json out.json]

What `make reproduce` runs for one calibration draw of an embedded model is notebook 02's
`sweep(...)`: the unpruned model, then every criterion at every ratio, each evaluated on the
whole local suite (every item with ``--limit all``). This script times, on the committed
statistics of the model's first general-domain draw, with results written to temporary folders:

- one:     `sweep(..., workers=1)` in this process at one torch thread (what a draw cost before
           worker processes; the embedded runs use one thread, the fastest for these models);
- workers: `sweep(..., workers=N)`: N spawned processes of one thread, each loading the model
           and evaluating the next entry not yet taken (worker start-up included in the time).

It reports both wall times and one / workers (the speed-up), and checks that the two runs wrote
the same records: every value and every per-item outcome bit for bit (dates, seconds and the
timing note aside). A subset of the named criteria keeps the run short; per entry the work is
the same whichever criterion chose the kept experts, so the ratio carries over to a full draw.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from moepaper import ExpertStatistics  # noqa: E402
from moepaper.pipeline import load_model  # noqa: E402
from moepaper.pipeline.calibration import calibration_name_from_description  # noqa: E402
from moepaper.pipeline.results import read_result, sweep  # noqa: E402


def records(root: Path) -> dict:
    out = {}
    for path in sorted(root.rglob("*.json")):
        if path.name == "evaluation_settings.json":
            continue
        record = read_result(path)
        record["provenance"].pop("date", None)
        record["provenance"].pop("seconds", None)
        record.pop("note", None)
        out[str(path.relative_to(root))] = json.dumps(record, sort_keys=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded", help="an embedded model (its committed statistics are used)")
    parser.add_argument("--statistics", default=None,
                        help="statistics file (default: the model's first general-domain draw under data/statistics)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--criteria", nargs="+", default=["man", "msan", "reap", "frequency"])
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.25])
    parser.add_argument("--limit", default="all", help="'all' (every item, as the named sweep) or items per task")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--json", help="write the numbers here")
    args = parser.parse_args()
    limit = args.limit if args.limit == "all" else int(args.limit)
    root = Path(__file__).resolve().parents[1]
    stats_path = Path(args.statistics or root / "data" / "statistics" / args.model / "embedded-literature-draw0of3.safetensors")

    torch.set_num_threads(1)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"one torch thread per process; {args.model}, {stats_path.name}, criteria {args.criteria}, ratios {args.ratios}, "
          f"limit {limit}", flush=True)
    model, tokenizer = load_model(args.model)
    stats = ExpertStatistics.load(stats_path)
    calibration = calibration_name_from_description(stats.metadata.get("calibration", "")) or stats_path.stem
    common = dict(criteria=args.criteria, ratios=args.ratios, suite="local", model_name=args.model, calibration=calibration,
                  statistics_path=stats_path, limit=limit, batch_size=args.batch_size, progress=True)
    seconds = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for mode, options in (("one", {}), ("workers", {"workers": args.workers, "load": {"spec": args.model}})):
            started = time.perf_counter()
            sweep(model, tokenizer, stats, out_dir=tmp / mode, **common, **options)
            seconds[mode] = time.perf_counter() - started
            print(f"{mode}: {seconds[mode]:.1f} s", flush=True)
        a, b = records(tmp / "one"), records(tmp / "workers")
    identical = a.keys() == b.keys() and all(a[k] == b[k] for k in a)
    entries = 1 + len(args.criteria) * len(args.ratios)
    result = {
        "model": args.model, "statistics": stats_path.name, "criteria": args.criteria, "ratios": args.ratios,
        "limit": limit, "entries": entries, "workers": args.workers, "cores": os.cpu_count(),
        "seconds_one": round(seconds["one"], 1), "seconds_workers": round(seconds["workers"], 1),
        "speedup": round(seconds["one"] / seconds["workers"], 3), "records": len(a), "identical_records": identical,
        "torch": torch.__version__,
    }
    print(f"{entries} entries ({len(a)} records): one process {result['seconds_one']} s, {args.workers} workers "
          f"{result['seconds_workers']} s, speed-up {result['speedup']}x; records identical: {identical}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    if not identical:
        sys.exit("the worker processes wrote other records than one process")


if __name__ == "__main__":
    main()
