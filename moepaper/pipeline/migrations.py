"""One-off moves of committed result folders when a criterion's meaning changes.

`rename_mone_ranking(results_dir, statistics_dir)`: results written as ``mone`` before MoNE was
evaluated with novices were MoNE's ranking with pruned experts re-routed, which is now the
criterion ``mone-ranking``. Their folders ``<model>/<calibration>/mone__removed<n>`` move to
``mone-ranking__removed<n>`` (and each record's ``criterion`` / ``replacement`` fields say so),
but only where the kept experts they record are the ones ``mone-ranking`` selects today: the
score changed with the move (the published routing score times the square root of the
unbiased output variance, instead of routing frequency times the biased variance), and a
folder whose kept experts differ would be taken for done by a resumed sweep. Such folders
are left where they are; the next sweep recomputes ``mone`` there (with novices: a record
without ``replacement`` is never taken for a novice result).

    python -m moepaper.pipeline.migrations data/results/embedded data/statistics/embedded [--apply]

`relabel_setting(results_dir, source, setting)`: the records of every draw of calibration
`source` (``<source>``, ``<source>@seed<k>``, ``<source>@draw<k>of<n>``) get ``setting``. The
embedded mixed calibration was first called task-agnostic; it covers every evaluation domain,
which the paper's task-agnostic calibration (C4) does not, so it is now its own setting,
"all-domain", and the general-domain draws are the task-agnostic ones:

    python -m moepaper.pipeline.migrations --relabel embedded:mixed all-domain data/results/named [--apply]

`rename_model(root, old, new)`: a committed embedded model's files move to another name --
``data/models/<old>``, ``data/statistics/<old>``, ``data/results/*/<old>`` -- and what names the
model inside them follows: each record's ``model``, its ``provenance.statistics`` file and
model_name, its ``same_kept_experts_as`` path, and the statistics files' metadata
``model_name`` (tensors and checksums unchanged, so every result stays valid and a sweep
over the moved results evaluates nothing). The 16-expert ablation moved from
``embedded-pooled`` to ``embedded-16e`` this way, when ``embedded-pooled`` became the
same-shape ablation:

    python -m moepaper.pipeline.migrations --rename-model embedded-pooled embedded-16e . [--apply]

`compact_results(results_dir)`: every record under `results_dir` rewritten in the compact format
(`results.write_result`): per-item lists on one line, float32 values at the precision they carry,
and a record whose items equal those of the record it was reused from
(``provenance.same_kept_experts_as``, followed to the first record that holds them) references
them (``items_from``) instead of copying them. A record whose source's items differ (the source
was re-evaluated since) keeps its own. Every record is checked to read back equal to what it
was (values and items bit for bit) before it is written, and each model folder is written under
its results lock. Idempotent: it can run again on a folder that mixes both formats (new sweeps
of an older writer), and rewrites only what changes:

    python -m moepaper.pipeline.migrations --compact data/results/named data/results/grid [--apply]
"""

from __future__ import annotations

import argparse
import json
import shutil
from contextlib import nullcontext
from pathlib import Path

from ..criteria import MONE_RANKING, expert_scores
from ..pruning import select_experts
from ..statistics import ExpertStatistics
from .keys import slug
from .calibration import parse_calibration_name
from .results import (ITEMS_FROM, SETTINGS, SETTINGS_FILE, format_result, items_digest, read_result, resolve_items,
                      results_lock, write_json_atomic, write_result)

OLD, NEW = "mone", MONE_RANKING.name


def _statistics(statistics_dir: Path, calibration: str, cache: dict) -> ExpertStatistics | None:
    if calibration not in cache:
        path = statistics_dir / f"{slug(calibration)}.safetensors"
        cache[calibration] = ExpertStatistics.load(path) if path.exists() else None
    return cache[calibration]


def rename_mone_ranking(results_dir: str | Path, statistics_dir: str | Path, *, apply: bool = False) -> dict[str, list[str]]:
    """Move ``mone__removed*`` folders under `results_dir` to ``mone-ranking__removed*`` where their kept
    experts equal what ``mone-ranking`` selects from the statistics ``<statistics_dir>/<calibration
    slug>.safetensors``. Returns {"renamed": [...], "kept_differ": [...], "no_statistics": [...],
    "target_exists": [...]} (folders); changes nothing unless `apply`."""
    results_dir, statistics_dir = Path(results_dir), Path(statistics_dir)
    report: dict[str, list[str]] = {"renamed": [], "kept_differ": [], "no_statistics": [], "target_exists": []}
    cache: dict = {}
    for folder in sorted(results_dir.rglob(f"{OLD}__removed*")):
        if not folder.is_dir():
            continue
        target = folder.with_name(folder.name.replace(f"{OLD}__", f"{NEW}__", 1))
        records = {p: read_result(p) for p in sorted(folder.glob("*.json"))}
        records = {p: r for p, r in records.items() if r is not None}
        if target.exists():
            report["target_exists"].append(str(folder))
            continue
        first = next(iter(records.values()), None)
        stats = None if first is None else _statistics(statistics_dir, first["calibration"], cache)
        if stats is None:
            report["no_statistics"].append(str(folder))
            continue
        kept = select_experts(expert_scores(stats, MONE_RANKING), ratio=first["ratio"])
        if any(r.get("kept") != [k.tolist() for k in kept] for r in records.values()):
            report["kept_differ"].append(str(folder))
            continue
        report["renamed"].append(str(folder))
        if apply:
            for path, record in records.items():
                write_result(path, {**record, "criterion": NEW, "replacement": "reroute"}, record.get(ITEMS_FROM))
            shutil.move(str(folder), str(target))
    return report


def relabel_setting(results_dir: str | Path, source: str, setting: str, *, apply: bool = False) -> dict[str, list[str]]:
    """Give every result record under `results_dir` whose calibration is a draw of `source` the
    setting `setting` (one of `results.SETTINGS`). Each model folder is written under its results
    lock (a running sweep there makes this fail, naming it). Returns {"relabelled": [...],
    "unchanged": [...]} (files); changes nothing unless `apply`."""
    if setting not in SETTINGS:
        raise ValueError(f"setting={setting!r}: one of {SETTINGS}")
    results_dir = Path(results_dir)
    report: dict[str, list[str]] = {"relabelled": [], "unchanged": []}
    for model_dir in sorted(p for p in results_dir.iterdir() if p.is_dir()):
        changes = []
        for path in sorted(model_dir.rglob("*.json")):
            record = read_result(path)
            if record is None or "calibration" not in record or parse_calibration_name(str(record["calibration"]))[0] != source:
                continue
            (changes if record.get("setting") != setting else report["unchanged"]).append((path, record))
        report["relabelled"] += [str(p) for p, _ in changes]
        if apply and changes:
            with results_lock(model_dir):
                for path, record in changes:
                    write_result(path, {**record, "setting": setting}, record.get(ITEMS_FROM))
    report["unchanged"] = [str(p) for p, _ in report["unchanged"]]
    return report


def rename_model(root: str | Path, old: str, new: str, *, apply: bool = False) -> dict[str, list[str]]:
    """Move embedded model `old`'s committed folders under `root` (a checkout) to `new` and rewrite the
    names inside them (module docstring). Returns {"folders": [(old, new) ...], "records": [...],
    "statistics": [...]}; changes nothing unless `apply`. Refuses when a target folder exists."""
    from ..statistics import ExpertStatistics

    root = Path(root)
    data = root / "data"
    folders = [(data / "models" / old, data / "models" / new), (data / "statistics" / old, data / "statistics" / new)]
    results = data / "results"
    folders += [(p / old, p / new) for p in sorted(results.iterdir()) if (p / old).is_dir()] if results.is_dir() else []
    folders = [(a, b) for a, b in folders if a.is_dir()]
    if not folders:
        raise FileNotFoundError(f"no committed folders of model {old!r} under {data}")
    taken = [str(b) for _, b in folders if b.exists()]
    if taken:
        raise FileExistsError(f"model {new!r} already has folders {taken}: not moving {old!r} onto them")
    report: dict[str, list] = {"folders": [(str(a), str(b)) for a, b in folders], "records": [], "statistics": []}
    prefix_old, prefix_new = f"data/statistics/{old}/", f"data/statistics/{new}/"
    for source, _ in folders:
        for path in sorted(source.rglob("*.json")):
            record = read_result(path)
            if not isinstance(record, dict) or record.get("model") != old:
                continue
            provenance = dict(record.get("provenance") or {})
            statistics = dict(provenance.get("statistics") or {})
            if str(statistics.get("file", "")).startswith(prefix_old):
                statistics["file"] = prefix_new + statistics["file"][len(prefix_old):]
            if statistics.get("model_name") == old:
                statistics["model_name"] = new
            if statistics:
                provenance["statistics"] = statistics
            same = provenance.get("same_kept_experts_as")
            if isinstance(same, str) and same.startswith(f"{old}/"):
                provenance["same_kept_experts_as"] = f"{new}/" + same[len(old) + 1:]
            reference = record.get(ITEMS_FROM)
            if reference and str(reference.get("path", "")).startswith(f"{old}/"):
                reference = {**reference, "path": f"{new}/" + reference["path"][len(old) + 1:]}
            report["records"].append(str(path))
            if apply:
                write_result(path, {**record, "model": new, "provenance": provenance}, reference)
        for path in sorted(source.glob("*.safetensors")):
            if source.parent.name != "statistics":
                continue
            stats = ExpertStatistics.load(path)
            if stats.metadata.get("model_name") == old:
                report["statistics"].append(str(path))
                if apply:
                    stats.metadata["model_name"] = new
                    stats.save(path)
    if apply:
        for a, b in folders:
            shutil.move(str(a), str(b))
    return report


def _comparable(record: dict) -> str:
    return json.dumps({k: v for k, v in record.items() if k != ITEMS_FROM}, sort_keys=True, allow_nan=True)


def compact_results(results_dir: str | Path, *, apply: bool = False) -> dict[str, int]:
    """Rewrite every record under `results_dir` compactly (module docstring). Returns counts: records,
    referenced (items_from), own_items, unchanged (already compact), stale_sources (reused records
    whose source's items differ: they keep their own); changes nothing unless `apply`."""
    results_dir = Path(results_dir)
    report = {"records": 0, "referenced": 0, "own_items": 0, "rewritten": 0, "unchanged": 0, "stale_sources": 0}
    for model_dir in sorted(p for p in results_dir.iterdir() if p.is_dir()):
        paths = [p for p in sorted(model_dir.rglob("*.json")) if p.name != SETTINGS_FILE]
        raw = {p: read_result(p, resolve=False) for p in paths}
        raw = {p: r for p, r in raw.items() if isinstance(r, dict) and "benchmark" in r}
        cache: dict = dict(raw)
        full = {p: resolve_items(r, p, cache) for p, r in raw.items()}  # every record as evaluated

        def holder(path: Path) -> Path:
            """The first record down the reuse chain from `path` that holds the same items (`path` itself if none)."""
            items, seen, current = full[path].get("items"), {path}, path
            while True:
                source = (full[current].get("provenance") or {}).get("same_kept_experts_as")
                source = results_dir / source if source else None
                if source is None or source in seen or source not in full or full[source].get("items") != items:
                    return current
                seen.add(source)
                current = source

        lock = results_lock(model_dir) if apply else nullcontext()
        with lock:
            for path, record in full.items():
                report["records"] += 1
                reference = None
                if record.get("items") is not None:
                    source = holder(path)
                    if source != path:
                        reference = {"path": str(source.relative_to(results_dir)), "sha256": items_digest(record["items"])}
                    elif (record.get("provenance") or {}).get("same_kept_experts_as"):
                        report["stale_sources"] += 1
                report["referenced" if reference else "own_items"] += 1
                text = format_result(record, reference)
                again = resolve_items(json.loads(text), path, cache)
                if _comparable(again) != _comparable(record):
                    raise AssertionError(f"{path}: the compact record does not read back equal; nothing written for it")
                if path.read_text() == text:
                    report["unchanged"] += 1
                    continue
                report["rewritten"] += 1
                if apply:
                    write_result(path, record, reference)
    return report


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results_dir")
    parser.add_argument("statistics_dir", nargs="?")
    parser.add_argument("--relabel", nargs=2, metavar=("SOURCE", "SETTING"),
                        help="give every record of calibration SOURCE's draws the setting SETTING (relabel_setting)")
    parser.add_argument("--rename-model", nargs=2, metavar=("OLD", "NEW"),
                        help="move embedded model OLD's committed folders under RESULTS_DIR (the checkout) to NEW (rename_model)")
    parser.add_argument("--compact", nargs="*", metavar="MORE_RESULTS_DIRS",
                        help="rewrite the records under RESULTS_DIR (and these) compactly (compact_results)")
    parser.add_argument("--apply", action="store_true", help="move the folders (default: only report)")
    args = parser.parse_args(argv)
    if args.compact is not None:
        for folder in [args.results_dir, args.statistics_dir, *args.compact]:
            if folder:
                print(folder, compact_results(folder, apply=args.apply))
        return
    if args.rename_model:
        report = rename_model(args.results_dir, *args.rename_model, apply=args.apply)
        print(f"folders: {len(report['folders'])}, records: {len(report['records'])}, statistics: {len(report['statistics'])}")
        return
    if args.relabel:
        report = relabel_setting(args.results_dir, *args.relabel, apply=args.apply)
        print(f"relabelled: {len(report['relabelled'])} records, unchanged: {len(report['unchanged'])}")
        return
    if args.statistics_dir is None:
        parser.error("statistics_dir is needed (or --relabel SOURCE SETTING)")
    for what, folders in rename_mone_ranking(args.results_dir, args.statistics_dir, apply=args.apply).items():
        print(f"{what}: {len(folders)}")
        for folder in folders:
            print(f"  {folder}")


if __name__ == "__main__":
    main()
