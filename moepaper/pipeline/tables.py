"""Tables from result files: the paper's results, ranks and gaps (pandas, Markdown, LaTeX).

- `results_table`: criterion x benchmark for one model, calibration and ratio, with the
  unpruned model's row and the average over benchmarks.
- `rank_table`: each criterion's rank per benchmark (1 = best; ties share the average
  rank) and its average rank, the paper's headline number.
- `gap_to_baseline`: MAN's and MSAN's average minus the strongest baseline's.
- `average_rank_summary`: average rank of each criterion in every (calibration, ratio).
- `bootstrap_average_ranks`: each criterion's average rank per setting with percentile
  bootstrap intervals (items resampled within benchmarks, calibration seeds resampled);
  `rank_interval_table` / `write_rank_intervals` show it as "mean [low, high]".
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from ..criteria import AIMER, MONE, MONE_RANKING, NAMED_CRITERIA, criterion_grid
from .calibration import parse_calibration_name
from .evaluation import get_suite
from .results import (ITEMS_FROM, SETTINGS_FILE, UNPRUNED, VERSION_KEYS, ItemsSourceError, _release, record_versions, resolve_items,
                      slug)

NEW_CRITERIA = ("man", "msan")
# The paper's comparison: its named criteria and the baselines MoNE (as published, with novices),
# MoNE's ranking with re-routing, and the calibration-free AIMER (grid points are extra).
NAMED = tuple(NAMED_CRITERIA)
# Existing criteria the paper compares against (gated (0,1,1) / (0,2,2) included: they are
# points of the family that earlier work used, reported best task-specific).
BASELINES = ("frequency", "seer", "ean", "reap", "gated_ean", "gated_squared", MONE.name, MONE_RANKING.name, AIMER.name)

# Metrics that are proportions: shown as points (x 100) in tables and figures.
PERCENT_METRICS = ("acc", "acc_norm", "exact_match", "pass@1", "pass_at_1", "math_verify", "mcc", "f1")

AVERAGE = "Avg"
AVERAGE_RANK = "Avg rank"

DISPLAY_NAMES = {
    UNPRUNED: "Unpruned",
    "frequency": "Frequency",
    "seer": "SEER",
    "ean": "EAN",
    "reap": "REAP",
    "man": "MAN",
    "msan": "MSAN",
    "gated_ean": "Gated EAN",
    "gated_squared": "Gated squared",
    MONE.name: "MoNE (novice replacement)",
    MONE_RANKING.name: "MoNE ranking (removal)",
    AIMER.name: "AIMER",
}


# ---------------------------------------------------------------- loading


def load_results(out_dir: str | Path) -> pd.DataFrame:
    """Every result file under `out_dir` as one row; ``score`` is the value in table units.

    Columns: model, calibration, setting, criterion, b, alpha, beta, ratio, benchmark, label,
    task, metric, value, score (value x 100 for proportion metrics), stderr,
    higher_is_better, n, status, note, suite, domain, limit, date, pruned (`pruned_model_key`), path.

    A file under `out_dir` that is not a result record (unreadable, not JSON, or JSON without
    ``benchmark`` and ``criterion``) is skipped with a warning naming it; the folders'
    ``evaluation_settings.json`` records are not results and are skipped silently.

    The records of one model must name the same versions of moepaper, lm-eval, transformers
    and torch (`moepaper.pipeline.results.record_versions`; torch's build label aside): a model
    whose results were made partly by other versions (a sweep interrupted after an upgrade) is a
    ValueError naming both makes, never a silently mixed table; its sweeps re-evaluate the others.

    A compact record that takes its per-item outcomes from another (``items_from``) must resolve:
    a missing or changed source is a `results.ItemsSourceError` naming both files.
    """
    makes: dict[str, dict[tuple, Path]] = {}  # model -> versions -> a file made with them
    rows, sources = [], {}  # sources: path -> parsed record, for the items_from references
    for path in sorted(Path(out_dir).rglob("*.json")):
        if path.name == SETTINGS_FILE:
            continue
        try:
            record = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            warnings.warn(f"load_results: skipped {path}: not a readable JSON file ({error})", stacklevel=2)
            continue
        if not isinstance(record, dict) or "benchmark" not in record or "criterion" not in record:
            warnings.warn(f"load_results: skipped {path}: not a result record (no benchmark and criterion)", stacklevel=2)
            continue
        if record.get(ITEMS_FROM):  # a reference to another record's items: it must resolve (ItemsSourceError naming both)
            resolve_items(record, path, sources)
        evaluation = record.get("evaluation") or {}
        make = tuple(_release(v) for v in record_versions(record).values())
        makes.setdefault(str(record.get("model")), {}).setdefault(make, path)
        rows.append(
            {
                **{k: record.get(k) for k in (
                    "model", "calibration", "setting", "criterion", "b", "alpha", "beta", "ratio", "benchmark",
                    "label", "task", "metric", "value", "stderr", "higher_is_better", "n", "status", "note", "suite",
                    "domain",
                )},
                "limit": evaluation.get("limit"),
                "date": (record.get("provenance") or {}).get("date"),
                "pruned": pruned_model_key(record),
                "path": str(path),
            }
        )
    for model, found in makes.items():
        if len(found) > 1:
            named = "; ".join(f"{dict(zip(VERSION_KEYS, make))} ({path})" for make, path in found.items())
            raise ValueError(f"load_results: the results of model {model!r} under {out_dir} were made with different "
                             f"versions: {named}; rerun its sweeps (they re-evaluate results of other versions) "
                             "before tabulating them together")
    columns = ["model", "calibration", "setting", "criterion", "b", "alpha", "beta", "ratio", "benchmark", "label",
               "task", "metric", "value", "score", "stderr", "higher_is_better", "n", "status", "note", "suite",
               "domain", "limit", "date", "pruned", "path"]
    frame = pd.DataFrame(rows)
    if frame.empty:
        return pd.DataFrame(columns=columns)
    frame["value"] = pd.to_numeric(frame["value"], errors="coerce")
    frame["ratio"] = frame["ratio"].astype(float)
    frame["score"] = [score_units(v, m) for v, m in zip(frame["value"], frame["metric"])]
    return frame[columns]


def pruned_model_key(record: dict) -> str | None:
    """What identifies a record's pruned model: its kept experts and how pruned experts are treated
    (re-routed or replaced by novices), as a short hash; None when the record has no kept experts
    (the unpruned model). Two criteria with the same key evaluated the same model."""
    kept = record.get("kept")
    if kept is None:
        return None
    blob = json.dumps([record.get("replacement") or "reroute", kept], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def score_units(value: float, metric: str | None) -> float:
    """A metric value in table units: proportions as points (0-100), anything else unchanged."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return float("nan")
    name = (metric or "").split(",")[0]
    return 100.0 * value if name in PERCENT_METRICS else float(value)


def display_name(criterion: str) -> str:
    return DISPLAY_NAMES.get(criterion, criterion)


def criterion_order(names: Sequence[str]) -> list[str]:
    """Unpruned, the named criteria in the paper's order, the baselines (MoNE, MoNE ranking, AIMER), then
    grid points by (b, alpha, beta)."""
    named = [UNPRUNED, *NAMED_CRITERIA]
    grid = [c.name for c in criterion_grid()]
    rank = {n: i for i, n in enumerate(named)}
    rank.update({n: len(named) + i for i, n in enumerate(grid) if n not in rank})
    return sorted(dict.fromkeys(names), key=lambda n: (rank.get(n, 10_000), n))


# ---------------------------------------------------------------- tables


def _select(df: pd.DataFrame, model: str | None, calibration: str | None, ratio: float | None) -> pd.DataFrame:
    if model is None:
        models = df["model"].unique()
        if len(models) != 1:
            raise ValueError(f"results hold several models {sorted(models)}: pass model=")
        model = models[0]
    pruned = df[(df["model"] == model) & (df["criterion"] != UNPRUNED)]
    if calibration is not None:
        pruned = pruned[pruned["calibration"] == calibration]
    if ratio is not None:
        pruned = pruned[np.isclose(pruned["ratio"], ratio)]
    return pruned, df[(df["model"] == model) & (df["criterion"] == UNPRUNED)]


def results_table(
    df: pd.DataFrame,
    *,
    model: str | None = None,
    calibration: str,
    ratio: float,
    benchmarks: Sequence[str] | None = None,
    criteria: Sequence[str] | None = None,
    include_unpruned: bool = True,
) -> pd.DataFrame:
    """Criterion x benchmark scores (table units) for one model, calibration and ratio.

    criteria: criterion names to show (default: every criterion evaluated; `NAMED` gives the
    paper's comparison: its named criteria and MoNE).

    Rows: "unpruned" (when evaluated) then the criteria; columns: benchmark names in the
    order of the results, then `AVERAGE`, the mean over the benchmarks that ran, whose
    higher score is better (lower-is-better metrics such as bits per byte are shown but
    not averaged: an average of both directions means nothing). Benchmarks that were not
    run are NaN; `benchmark_info(table)` tells which.
    """
    pruned, unpruned = _select(df, model, calibration, ratio)
    if pruned.empty:
        raise ValueError(f"no results for calibration={calibration!r}, ratio={ratio} (model {model!r})")
    if criteria is not None:
        pruned = pruned[pruned["criterion"].isin(list(criteria))]
        if pruned.empty:
            raise ValueError(f"none of the criteria {list(criteria)} evaluated for calibration={calibration!r}, ratio={ratio}")
    frames = [pruned] + ([unpruned] if include_unpruned and not unpruned.empty else [])
    both = pd.concat(frames)
    order = suite_order(both)
    if benchmarks is not None:
        order = [b for b in benchmarks if b in set(order)]
    ok = both[both["status"] == "ok"]
    table = ok.pivot_table(index="criterion", columns="benchmark", values="score", aggfunc="first")
    table = table.reindex(index=criterion_order(both["criterion"].unique()), columns=order)
    info = benchmark_info(both, order)
    averaged = [b for b in order if info.loc[b, "higher_is_better"] and info.loc[b, "status"] == "ok"]
    table[AVERAGE] = table[averaged].mean(axis=1, skipna=False) if averaged else np.nan
    table.index.name = "criterion"
    table.columns.name = None
    statuses = both.pivot_table(index="criterion", columns="benchmark", values="status", aggfunc="first")
    table.attrs.update(model=model or both["model"].iloc[0], calibration=calibration, ratio=ratio,
                       info=info, averaged=averaged, statuses=statuses)  # statuses: each cell's ("ok", "failed", "not run")
    return table


def suite_order(df: pd.DataFrame) -> list[str]:
    """The benchmarks of `df` in their suite's order (paper or local), others after them by name."""
    names = sorted(df["benchmark"].unique())
    order: list[str] = []
    for suite in dict.fromkeys(df["suite"].dropna()) if "suite" in df else ():
        try:
            order += [b.name for b in get_suite(suite).benchmarks if b.name in names and b.name not in order]
        except (ValueError, RuntimeError):  # a custom suite: no known order
            continue
    return order + [n for n in names if n not in order]


def benchmark_info(df: pd.DataFrame, order: Sequence[str] | None = None) -> pd.DataFrame:
    """Per benchmark: label, metric, higher_is_better, status ("ok" if any criterion ran it), note, n (items; NaN unknown)."""
    rows = {}
    for name, group in df.groupby("benchmark", sort=False):
        ran = group[group["status"] == "ok"]
        first = (ran if not ran.empty else group).iloc[0]
        rows[name] = {
            "label": first["label"] or name,
            "metric": first["metric"],
            "higher_is_better": bool(first["higher_is_better"]) if first["higher_is_better"] is not None else True,
            "status": "ok" if not ran.empty else first["status"],
            "note": first["note"] if ran.empty else "",
            "n": float(pd.to_numeric(ran["n"], errors="coerce").max()) if not ran.empty and "n" in ran else float("nan"),
        }
    info = pd.DataFrame.from_dict(rows, orient="index")
    return info.reindex(order) if order is not None else info


def rank_table(table: pd.DataFrame, *, higher_is_better: dict | None = None, exclude: Sequence[str] = (UNPRUNED,)) -> pd.DataFrame:
    """Each criterion's rank per benchmark among the pruned criteria, and their average.

    Rank 1 is the best score; tied criteria share the mean of the ranks they span
    (pandas ``method="average"``). A benchmark with a missing score for any criterion is
    left out of every criterion's average, so all averages cover the same benchmarks.
    higher_is_better: per benchmark column (default: from ``table.attrs["info"]``, else True).
    """
    info = table.attrs.get("info")
    columns = [c for c in table.columns if c != AVERAGE]
    rows = table.drop(index=[e for e in exclude if e in table.index])[columns]
    ranks = pd.DataFrame(index=rows.index)
    for column in columns:
        if rows[column].isna().any():
            continue
        if higher_is_better is not None:
            higher = higher_is_better.get(column, True)
        elif info is not None and column in info.index:
            higher = bool(info.loc[column, "higher_is_better"])
        else:
            higher = True
        ranks[column] = rows[column].rank(ascending=not higher, method="average")
    ranks[AVERAGE_RANK] = ranks.mean(axis=1) if len(ranks.columns) else np.nan
    ranks.attrs.update(table.attrs)
    ranks.attrs["lower_is_better"] = list(ranks.columns)
    return ranks


def gap_to_baseline(
    table: pd.DataFrame, *, new: Sequence[str] = NEW_CRITERIA, baselines: Sequence[str] = BASELINES, column: str = AVERAGE
) -> pd.DataFrame:
    """For each new criterion: its average, the strongest baseline, its average and the gap (points).

    New criteria absent from `table` are left out (an empty table when none is there)."""
    present = [b for b in baselines if b in table.index and not pd.isna(table.loc[b, column])]
    if not present:
        raise ValueError(f"no baseline of {list(baselines)} in the table")
    best = max(present, key=lambda b: table.loc[b, column])
    rows = []
    for name in new:
        if name not in table.index:
            continue
        rows.append({
            "criterion": name,
            column: table.loc[name, column],
            "strongest baseline": best,
            f"baseline {column}": table.loc[best, column],
            "gap": table.loc[name, column] - table.loc[best, column],
        })
    columns = ["criterion", column, "strongest baseline", f"baseline {column}", "gap"]
    gap = pd.DataFrame(rows, columns=columns).set_index("criterion")
    gap.attrs.update({k: v for k, v in table.attrs.items() if k in ("model", "calibration", "ratio", "info", "averaged")})
    gap.attrs["bold"] = False
    return gap


def calibration_seed(calibration: str) -> tuple[str, int]:
    """A calibration draw's base name and seed: ``embedded:code@seed2`` -> ``("embedded:code", 2)``;
    a name without a ``@seed<k>`` suffix is seed 0 (`calibration.parse_calibration_name`, which
    refuses a malformed suffix)."""
    return parse_calibration_name(str(calibration))


def calibration_domain(calibration: str) -> str | None:
    """The benchmark domain a task-specific calibration targets: ``embedded:code`` / ``code`` /
    ``embedded:code@seed1`` (another draw) -> ``"code"``."""
    name = calibration_seed(calibration)[0].split(":")[-1]
    return name if name in ("code", "math", "literature") else None


def matched_benchmarks(df: pd.DataFrame, calibration: str) -> list[str] | None:
    """Benchmarks of the domain a task-specific calibration targets (None when it targets none)."""
    domain = calibration_domain(calibration)
    if domain is None or "domain" not in df:
        return None
    names = list(dict.fromkeys(df.loc[df["domain"] == domain, "benchmark"]))
    return names or None


def average_rank_summary(df: pd.DataFrame, *, model: str | None = None, benchmarks: Sequence[str] | None = None,
                         criteria: Sequence[str] | None = NAMED, matched_domain: bool = True) -> pd.DataFrame:
    """Average rank of every criterion (rows) in every (setting, calibration, ratio) (columns).

    With `matched_domain`, each task-specific calibration targeting a domain (code, math)
    gets a second column ranked on that domain's benchmarks only (benchmarks "matched").
    criteria: the criteria ranked against each other (default `NAMED`, the paper's
    comparison; None: every criterion evaluated, e.g. the whole grid).
    """
    pruned, _ = _select(df, model, None, None)
    columns = {}
    for (calibration, setting, ratio), _group in pruned.groupby(["calibration", "setting", "ratio"], sort=True):
        table = results_table(df, model=model, calibration=calibration, ratio=ratio, benchmarks=benchmarks, criteria=criteria)
        columns[(setting, calibration, "all", f"{ratio:.0%}")] = rank_table(table)[AVERAGE_RANK]
        matched = matched_benchmarks(df, calibration) if matched_domain and setting == "task-specific" else None
        if matched:
            table = results_table(df, model=model, calibration=calibration, ratio=ratio, benchmarks=matched, criteria=criteria)
            columns[(setting, calibration, "matched", f"{ratio:.0%}")] = rank_table(table)[AVERAGE_RANK]
    summary = pd.DataFrame(columns)
    summary = summary.reindex(criterion_order(summary.index))
    setting_rank = {s: i for i, s in enumerate(SETTING_ORDER)}
    summary = summary[sorted(summary.columns, key=lambda c: (setting_rank.get(c[0], 2), c[1], float(c[3].rstrip("%")), c[2]))]
    summary.columns = pd.MultiIndex.from_tuples(summary.columns, names=["setting", "calibration", "benchmarks", "pruned"])
    summary.attrs["lower_is_better"] = list(summary.columns)
    return summary


# ---------------------------------------------------------------- bootstrap intervals on average ranks


SETTING_ORDER = ("task-agnostic", "task-specific", "all-domain")
# Metric families (`metric_family`): task scores (accuracy, exact match, pass@1, ...: the paper's kind of
# number) and held-out perplexities (bits per byte and the other perplexities: lower is better).
ACCURACY, BITS_PER_BYTE, ALL_METRICS = "accuracy", "bits_per_byte", "all"
METRIC_FAMILIES = (ACCURACY, BITS_PER_BYTE, ALL_METRICS)
PERPLEXITY_METRICS = ("bits_per_byte", "byte_perplexity", "word_perplexity")
# An item list must give back its record's value within these (value recomputed from the items).
ITEMS_RTOL, ITEMS_ATOL = 1e-6, 1e-9
BOOTSTRAP_COLUMNS = ["model", "setting", "metric", "ratio", "criterion", "mean_rank", "low", "high", "boot_mean", "n_criteria",
                     "n_benchmarks", "n_items", "n_ratios", "n_draws", "n_seeds", "n_boot"]


class ItemsError(ValueError):
    """Per-item outcomes missing, not reproducing a record's value, or not aligned between entries."""


def metric_family(metric: str | None) -> str:
    """``"bits_per_byte"`` for a perplexity metric (``"bits_per_byte,none"``, word / byte perplexity), else ``"accuracy"``."""
    return BITS_PER_BYTE if str(metric).split(",")[0] in PERPLEXITY_METRICS else ACCURACY


def _entry(row) -> str:
    return (f"{row['model']} / {row['calibration']} / {row['criterion']} / ratio {float(row['ratio']):g} / {row['benchmark']}"
            f" ({row.get('path')})")


def _record_items(row) -> dict | None:
    """A result row's ``items``: its ``items`` cell when the frame has one, else read from its file."""
    items = row.get("items")
    if isinstance(items, dict):
        return items
    path = row.get("path")
    if isinstance(path, str) and path:
        from .results import read_result

        try:
            return (read_result(path) or {}).get("items")  # float32 values restored, items_from resolved
        except ItemsSourceError:  # a reference that does not resolve is an error, never "no items"
            raise
        except (OSError, AttributeError):
            return None
    return None


def _item_arrays(row, items: dict) -> tuple[list, tuple, np.ndarray, np.ndarray]:
    """(doc_ids, kind, numerator [I], denominator [I]) of one record's items, checked against its value.

    Every per-item outcome `evaluation.item_outcomes` writes: a mean metric stored under its own
    name (``acc``, ``acc_norm``, ``exact_match``, ``pass@1``, ``math_verify``, ...: value = mean),
    or a perplexity (``loglikelihood`` with ``bytes`` or ``words``: value = f(sum(ll) / sum(count)),
    f = -x / ln 2 for bits per byte, exp(-x) for byte and word perplexity). The record's
    ``metric`` names which; kind = (``"mean"``, name) or (``"ppl"``, name). Value = f(sum(num) / sum(den)).
    """
    doc_ids = list(items.get("doc_id") or [])
    name = str(row.get("metric") or "").split(",")[0]
    if "loglikelihood" in items and ("bytes" in items or "words" in items):
        if name not in PERPLEXITY_METRICS:
            name = "bits_per_byte" if "bytes" in items else "word_perplexity"
        count = items["bytes"] if "bytes" in items else items["words"]
        kind, num, den = ("ppl", name), np.asarray(items["loglikelihood"], dtype=float), np.asarray(count, dtype=float)
    else:
        names = [k for k in items if k != "doc_id"]
        if name not in items:
            name = names[0] if len(names) == 1 else None
        if name is None:
            raise ItemsError(f"items of {_entry(row)} hold {sorted(items)}: expected doc_id with the metric's own "
                             f"outcomes ({row.get('metric')!r}), or doc_id with loglikelihood and bytes / words")
        kind, num = ("mean", name), np.asarray(items[name], dtype=float)
        den = np.ones_like(num)
    if not (len(doc_ids) == len(num) == len(den)) or not doc_ids:
        raise ItemsError(f"items of {_entry(row)}: {len(doc_ids)} doc_id, {len(num)} outcomes, {len(den)} denominators (need equal, > 0)")
    if len(set(map(str, doc_ids))) != len(doc_ids):
        raise ItemsError(f"items of {_entry(row)}: repeated doc_id")
    value = float(_transform(kind, num.sum() / den.sum()))
    if not abs(value - float(row["value"])) <= ITEMS_ATOL + ITEMS_RTOL * abs(float(row["value"])):
        raise ItemsError(f"items of {_entry(row)} give {value!r}, the record's value is {row['value']!r}")
    return [str(d) for d in doc_ids], kind, num, den


def _transform(kind: tuple, ratio):
    """A record's value from sum(num) / sum(den) (`_item_arrays`)."""
    if kind[0] == "mean":
        return ratio
    return -ratio / math.log(2) if kind[1] == "bits_per_byte" else np.exp(-ratio)


def _average_ranks(badness: np.ndarray) -> np.ndarray:
    """Ranks along the last axis: 1 = smallest, tied values share the mean of the ranks they span
    (``pandas.Series.rank(method="average")``); same shape as `badness`, [..., C]."""
    order = np.argsort(badness, axis=-1, kind="stable")
    s = np.take_along_axis(badness, order, axis=-1)
    C = s.shape[-1]
    pos = np.broadcast_to(np.arange(C), s.shape)
    first = np.ones(s.shape, bool)
    first[..., 1:] = s[..., 1:] != s[..., :-1]
    last = np.ones(s.shape, bool)
    last[..., :-1] = first[..., 1:]
    start = np.maximum.accumulate(np.where(first, pos, 0), axis=-1)
    end = np.flip(np.minimum.accumulate(np.flip(np.where(last, pos, C), axis=-1), axis=-1), axis=-1)
    ranks = np.empty(s.shape)
    np.put_along_axis(ranks, order, (start + end) / 2 + 1, axis=-1)
    return ranks


def _distinct_ranks(badness: np.ndarray, groups: np.ndarray | None) -> np.ndarray:
    """`_average_ranks` with each group of identical pruned models ranked once: the criteria of a group
    (same ``groups`` id) take the rank of their group's first member among the groups' representatives."""
    if groups is None:
        return _average_ranks(badness)
    _, first, inverse = np.unique(groups, return_index=True, return_inverse=True)
    return _average_ranks(badness[..., first])[..., inverse]


def identical_pruned_models(results: pd.DataFrame) -> pd.DataFrame:
    """Criteria whose pruned models are identical (same kept experts, same replacement) in a
    (model, calibration, ratio): one row per group of two or more, with columns model,
    calibration, ratio, criteria (tuple, in `criterion_order`). Needs `load_results`' ``pruned``
    column; an empty frame when it is absent."""
    columns = ["model", "calibration", "ratio", "criteria"]
    if "pruned" not in results or results.empty:
        return pd.DataFrame(columns=columns)
    frame = results.dropna(subset=["pruned"])
    frame = frame[(frame["status"] == "ok") & (frame["criterion"] != UNPRUNED)] if "status" in frame else frame
    rows = []
    for (model, calibration, ratio), group in frame.groupby(["model", "calibration", "ratio"], sort=True):
        for _, same in group.groupby("pruned", sort=False):
            names = criterion_order(list(same["criterion"].unique()))
            if len(names) > 1:
                rows.append({"model": model, "calibration": calibration, "ratio": float(ratio), "criteria": tuple(names)})
    return pd.DataFrame(rows, columns=columns)


def _select_frame(results: pd.DataFrame, model, exclude, criteria) -> tuple[pd.DataFrame, list[str]]:
    frame = results[results["status"] == "ok"] if "status" in results else results
    frame = frame[~frame["criterion"].isin(list(exclude))]
    if criteria is not None:
        frame = frame[frame["criterion"].isin(list(criteria))]
    if model is not None:
        if model not in set(frame["model"]):
            raise ValueError(f"no results of model {model!r} (models: {sorted(set(results['model']))})")
        return frame, [model]
    return frame, sorted(frame["model"].dropna().unique())


def _check_filters(level: float, n: int, metric: str, ratio) -> None:
    if not 0 < level < 1:
        raise ValueError(f"level={level}: a coverage in (0, 1)")
    if n < 1:
        raise ValueError(f"n={n}: at least one bootstrap replicate")
    if metric not in METRIC_FAMILIES:
        raise ValueError(f"metric={metric!r}: one of {METRIC_FAMILIES}")
    if ratio is not None and not (isinstance(ratio, (int, float)) and 0 < float(ratio) < 1):
        raise ValueError(f"ratio={ratio!r}: a fraction of experts removed in (0, 1), or None for the average over ratios")


def _replicates(results: pd.DataFrame, n: int, seed: int, model, exclude, criteria, metric: str, ratio,
                distinct: bool) -> tuple[list[dict], dict]:
    """Per (model, setting): the criteria, the point average ranks [C] and the bootstrap replicates [n, C]."""
    frame, models = _select_frame(results, model, exclude, criteria)
    if metric != ALL_METRICS:
        frame = frame[[metric_family(m) == metric for m in frame["metric"]]]
    if ratio is not None:
        frame = frame[np.isclose(frame["ratio"].astype(float), float(ratio))]
    out, free = [], {}
    for name in models:
        part = frame[frame["model"] == name]
        if part.empty:
            raise ValueError(f"model {name!r}: no 'ok' records with metric={metric!r}, ratio={ratio!r}")
        cells, free[name] = _bootstrap_model(part, name, n, seed, distinct)
        out += [{**cell, "metric": metric, "ratio": float(ratio) if ratio is not None else float("nan")} for cell in cells]
    return out, free


def _interval(boot: np.ndarray, level: float) -> np.ndarray:
    """The percentile interval of each column of replicates [n, C]: [2, C] (low, high)."""
    return np.quantile(boot, [(1 - level) / 2, (1 + level) / 2], axis=0)


def _standing(boot: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """P(best) and P(top 2) per column of replicates [n, C]: no other column strictly lower, at most one."""
    better = (boot[:, None, :] < boot[:, :, None]).sum(axis=2)  # [n, C]: how many rank strictly better
    return (better == 0).mean(axis=0), (better <= 1).mean(axis=0)


def _paired(cell: dict, i: int, j: int, level: float) -> dict:
    """Criterion i minus criterion j of one cell: point difference, interval, P(i ranks better), ties half."""
    diff = cell["boot"][:, i] - cell["boot"][:, j]
    low, high = _interval(diff, level)
    return {"mean": cell["point"][i] - cell["point"][j], "low": low, "high": high,
            "p_better": float(np.mean((diff < 0) + 0.5 * (diff == 0)))}


def bootstrap_average_ranks(results: pd.DataFrame, n: int = 1000, *, level: float = 0.9, seed: int = 0,
                            model: str | None = None, exclude: Sequence[str] = (UNPRUNED,),
                            criteria: Sequence[str] | None = None, metric: str = ALL_METRICS, ratio: float | None = None,
                            distinct: bool = True) -> pd.DataFrame:
    """Average rank of every criterion per (model, setting) with a percentile bootstrap interval.

    results: `load_results` output whose records carry per-item outcomes, ``record["items"]``
    (an ``items`` column of dicts, else read from each row's ``path``): the metric's own per-item
    outcomes (``acc``, ``acc_norm``, ``exact_match``, ``pass@1``, ...: value = their mean, direction
    from ``higher_is_better``) or ``{"doc_id", "loglikelihood", "bytes"}`` (value = bits per byte
    = -sum(ll) / ln 2 / sum(bytes), lower is better). Only "ok" records count.

    Settings: "task-agnostic" (general-domain calibration) and "all-domain" (a calibration covering
    every evaluation domain) records are ranked on every benchmark; "task-specific" records on
    the benchmarks of their calibration's domain (`matched_benchmarks`; all benchmarks for a
    calibration targeting no domain). A calibration draw is a calibration name with an optional
    ``@seed<k>`` or ``@draw<k>of<n>`` suffix (`calibration_seed`); the draws of one source
    (``embedded:code``, ``embedded:code@seed1``) form one calibration. A source with draws of both
    kinds (overlapping seeds and disjoint draws) is refused: they are not exchangeable.

    metric: ``"accuracy"`` (task scores only: the paper's kind of number), ``"bits_per_byte"``
    (held-out perplexities only) or ``"all"`` (both, each benchmark one vote).
    ratio: rank at this fraction removed only; None averages the ranks over the ratios present
    (a labelled average: the ``ratio`` column is NaN).
    distinct: criteria whose pruned models are identical in a (draw, ratio) (same kept experts and
    replacement, `load_results`' ``pruned`` column) are ranked once: each takes the rank of its
    pruned model among the cell's distinct pruned models, so k copies of one model neither split
    a rank between them nor push the other criteria down (`identical_pruned_models` lists them).

    Point estimate: for every (ratio, calibration draw), rank the criteria on each benchmark
    (1 = best, ties averaged) using the records' values, average over the benchmarks, then over
    the ratios, the draws of each calibration, and the calibrations of the setting
    (task-specific: code and math with equal weight). Replicate: resample each benchmark's items
    with replacement -- the same items for every entry of the model (paired, aligned by doc_id)
    -- recompute every value from its items; resample the draws of each calibration with
    replacement; recompute the average ranks. low, high: the (1 - level)/2 and (1 + level)/2
    quantiles of the `n` replicates; boot_mean: their mean. Resampling adds noise to every value,
    which pulls a rank near 1 or near the last rank toward the middle: for a criterion that is
    clearly first or last, mean_rank can lie just outside [low, high] (boot_mean - mean_rank
    shows that bias); the interval is reported as computed, not widened.

    Calibration-free criteria are declared (`criteria.CALIBRATION_FREE`: AIMER), never inferred:
    such a criterion stored under a single calibration (e.g. ``none``) answers every draw of the
    model at the same ratio (at every ratio when it has one ratio only); listed in
    ``attrs["calibration_free"]`` per model. Every other criterion must have a record for every
    (draw, ratio, benchmark) of a setting: a missing one is an error naming it.

    exclude: criteria left out (default the unpruned model); criteria: keep only these (None: all).
    Returns one row per (model, setting, criterion) with `BOOTSTRAP_COLUMNS`: metric, ratio (NaN:
    averaged), mean_rank, low, high, n_criteria (ranked together), n_benchmarks, n_items (over
    those benchmarks), n_ratios, n_draws (calibration draws), n_seeds (fewest draws of a
    calibration), n_boot (= n); ``attrs``: n, level, seed, metric, ratio, calibration_free.
    Raises ItemsError for records without items (naming them), items that do not give back the
    record's value, and doc_ids that differ between entries of one benchmark; ValueError for
    missing records.
    """
    _check_filters(level, n, metric, ratio)
    cells, free = _replicates(results, n, seed, model, exclude, criteria, metric, ratio, distinct)
    rows = []
    for cell in cells:
        low, high = _interval(cell["boot"], level)
        for k, criterion in enumerate(cell["criteria"]):
            rows.append({**{c: cell[c] for c in ("model", "setting", "metric", "ratio")}, "criterion": criterion,
                         "mean_rank": cell["point"][k], "low": low[k], "high": high[k], "boot_mean": cell["boot"][:, k].mean(),
                         **{c: cell[c] for c in BOOTSTRAP_COLUMNS[9:-1]}, "n_boot": n})
    out = pd.DataFrame(rows, columns=BOOTSTRAP_COLUMNS)
    out.attrs.update(n=n, level=level, seed=seed, metric=metric, ratio=ratio, calibration_free=free)
    return out


def paired_rank_differences(results: pd.DataFrame, a: str, b: str, n: int = 1000, *, level: float = 0.9, seed: int = 0,
                            model: str | None = None, exclude: Sequence[str] = (UNPRUNED,),
                            criteria: Sequence[str] | None = None, metric: str = ALL_METRICS, ratio: float | None = None,
                            distinct: bool = True) -> pd.DataFrame:
    """Average rank of criterion `a` minus that of `b` per (model, setting), with a paired bootstrap interval.

    The replicates are `bootstrap_average_ranks`' (same arguments, same seed: the same resampled
    items and draws for both criteria), so the interval is that of the difference itself, not
    two marginal intervals compared. Negative = `a` ranks better. Columns: model, setting,
    metric, ratio, a, b, mean (point difference), low, high, p_better (the fraction of replicates
    in which `a`'s average rank is lower than `b`'s, ties counting one half), n_boot.
    """
    _check_filters(level, n, metric, ratio)
    cells, _ = _replicates(results, n, seed, model, exclude, criteria, metric, ratio, distinct)
    rows = []
    for cell in cells:
        missing = [c for c in (a, b) if c not in cell["criteria"]]
        if missing:
            raise ValueError(f"{cell['model']} / {cell['setting']}: no criterion {missing} (criteria: {cell['criteria']})")
        i, j = cell["criteria"].index(a), cell["criteria"].index(b)
        rows.append({**{c: cell[c] for c in ("model", "setting", "metric", "ratio")}, "a": a, "b": b,
                     **_paired(cell, i, j, level), "n_boot": n})
    out = pd.DataFrame(rows, columns=["model", "setting", "metric", "ratio", "a", "b", "mean", "low", "high", "p_better", "n_boot"])
    out.attrs.update(n=n, level=level, seed=seed, metric=metric, ratio=ratio)
    return out


def rank_probabilities(results: pd.DataFrame, n: int = 1000, *, seed: int = 0, model: str | None = None,
                       exclude: Sequence[str] = (UNPRUNED,), criteria: Sequence[str] | None = None,
                       metric: str = ALL_METRICS, ratio: float | None = None, distinct: bool = True) -> pd.DataFrame:
    """Per (model, setting, criterion): how often the criterion is best and in the top two, over
    `bootstrap_average_ranks`' replicates (same arguments, same seed).

    In a replicate a criterion is best when no other criterion has a strictly lower average rank,
    and in the top two when at most one has; criteria that tie (identical pruned models always
    do) are each counted, so P(best) can sum to more than 1 over criteria. Columns: model, setting,
    metric, ratio, criterion, mean_rank (point estimate), p_best, p_top2, n_boot.
    """
    _check_filters(0.5, n, metric, ratio)
    cells, _ = _replicates(results, n, seed, model, exclude, criteria, metric, ratio, distinct)
    rows = []
    for cell in cells:
        best, top2 = _standing(cell["boot"])
        for k, criterion in enumerate(cell["criteria"]):
            rows.append({**{c: cell[c] for c in ("model", "setting", "metric", "ratio")}, "criterion": criterion,
                         "mean_rank": cell["point"][k], "p_best": float(best[k]), "p_top2": float(top2[k]), "n_boot": n})
    out = pd.DataFrame(rows, columns=["model", "setting", "metric", "ratio", "criterion", "mean_rank", "p_best", "p_top2", "n_boot"])
    out.attrs.update(n=n, seed=seed, metric=metric, ratio=ratio)
    return out


def _bootstrap_model(frame: pd.DataFrame, model: str, n: int, seed: int, distinct: bool) -> tuple[list[dict], list[str]]:
    from ..criteria import CALIBRATION_FREE

    rng = np.random.default_rng([seed, zlib.crc32(str(model).encode())])
    frame = frame.reset_index(drop=True)
    recs = frame.to_dict("records")  # row access by position (pandas row lookups are slow)
    value = frame["value"].to_numpy(dtype=float)
    pruned = frame["pruned"].tolist() if distinct and "pruned" in frame else None
    calibrations = frame.groupby("criterion")["calibration"].nunique()
    # declared calibration-free criteria stored under one calibration answer every draw
    free = sorted(c for c, k in calibrations.items() if c in CALIBRATION_FREE and k == 1) if frame["calibration"].nunique() > 1 else []
    dependent = frame[~frame["criterion"].isin(free)]
    if dependent.empty:
        raise ValueError(f"model {model!r}: no criterion evaluated on a calibration besides the calibration-free {free}")
    # records: (calibration, ratio, criterion, benchmark) -> row index; free criteria answer every draw
    index: dict[tuple, int] = {}
    for i in dependent.index:
        row = recs[i]
        key = (row["calibration"], float(row["ratio"]), row["criterion"], row["benchmark"])
        if key in index:
            raise ValueError(f"two records for {_entry(row)} and {recs[index[key]].get('path')}")
        index[key] = i
    free_index: dict[tuple, int] = {}
    for name in free:
        records = frame[frame["criterion"] == name]
        one_ratio = records["ratio"].nunique() == 1
        for i in records.index:
            row = recs[i]
            free_index[(None if one_ratio else float(row["ratio"]), name, row["benchmark"])] = i

    def record(calibration, ratio, criterion, benchmark) -> int | None:
        if criterion in free:
            found = free_index.get((None, criterion, benchmark))
            return found if found is not None else free_index.get((ratio, criterion, benchmark))
        return index.get((calibration, ratio, criterion, benchmark))

    all_benchmarks = suite_order(frame)
    higher = {b: bool(g["higher_is_better"].iloc[0]) if g["higher_is_better"].iloc[0] is not None else True
              for b, g in frame.groupby("benchmark")}
    plans = []  # (setting, criteria, {base: {draw: [(calibration, ratio, benchmarks)]}})
    matched = {c: matched_benchmarks(frame, c) for c in dependent["calibration"].unique()}
    for setting, group in dependent.groupby("setting", sort=False):
        criteria = criterion_order(list(group["criterion"].unique()) + free)
        bases: dict[str, dict[int, list]] = {}
        kinds: dict[str, set] = {}
        for (calibration, ratio), _ in group.groupby(["calibration", "ratio"], sort=True):
            benchmarks = (matched[calibration] if setting == "task-specific" else None) or all_benchmarks
            benchmarks = [b for b in benchmarks if b in higher]
            if not benchmarks:
                continue
            base, draw = calibration_seed(calibration)
            kinds.setdefault(base, set()).add("disjoint" if "@draw" in str(calibration) else "seeded")
            bases.setdefault(base, {}).setdefault(draw, []).append((calibration, float(ratio), benchmarks))
        mixed = sorted(b for b, k in kinds.items() if len(k) > 1)
        if mixed:
            raise ValueError(f"model {model!r}, {setting}: calibration {mixed} has both seeded draws (@seed<k>, overlapping) "
                             "and disjoint draws (@draw<k>of<n>); rank one kind (filter the results by calibration)")
        if bases:
            plans.append((setting, criteria, bases))
    plans.sort(key=lambda p: (SETTING_ORDER.index(p[0]) if p[0] in SETTING_ORDER else len(SETTING_ORDER), str(p[0])))

    # every record used, complete grid
    used: dict[str, set[int]] = {}
    missing = []
    for _setting, criteria, bases in plans:
        for draws in bases.values():
            for cells in draws.values():
                for calibration, ratio, benchmarks in cells:
                    for benchmark in benchmarks:
                        for criterion in criteria:
                            i = record(calibration, ratio, criterion, benchmark)
                            if i is None:
                                missing.append(f"{calibration} / {criterion} / ratio {ratio:g} / {benchmark}")
                            else:
                                used.setdefault(benchmark, set()).add(i)
    if missing:
        raise ValueError(f"model {model!r}: {len(missing)} (calibration, criterion, ratio, benchmark) without an 'ok' record, "
                         f"so the criteria cannot be ranked together (an incomplete sweep? only "
                         f"{', '.join(sorted(CALIBRATION_FREE))} may be stored once for every calibration): "
                         f"{', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''}")

    # items per benchmark: distinct outcome rows, aligned by doc_id; replicate values [u, n]
    values: dict[int, tuple[str, int]] = {}  # row -> (benchmark, distinct-row index)
    replicate: dict[str, np.ndarray] = {}
    n_items: dict[str, int] = {}
    items = {i: _record_items(recs[i]) for ids in used.values() for i in ids}
    without = [i for i, found in items.items() if not isinstance(found, dict)]
    if without:
        names = [_entry(recs[i]) for i in sorted(without)]
        raise ItemsError(f"model {model!r}: {len(names)} result records have no per-item outcomes ('items'): "
                         f"{'; '.join(names[:10])}{' ...' if len(names) > 10 else ''}")
    for benchmark in [b for b in all_benchmarks if b in used]:
        reference = kinds = None
        distinct_rows: dict[bytes, int] = {}
        nums, dens = [], []
        for i in sorted(used[benchmark]):
            row = recs[i]
            doc_ids, kind, num, den = _item_arrays(row, items[i])
            if reference is None:
                reference, kinds, first = {d: k for k, d in enumerate(doc_ids)}, kind, row
            if kind != kinds:
                raise ItemsError(f"{_entry(row)} holds {kind} items, {_entry(first)} {kinds} items")
            if len(doc_ids) != len(reference) or not reference.keys() >= set(doc_ids):
                only = sorted(set(doc_ids) - set(reference))[:5]
                lacking = sorted(set(reference) - set(doc_ids))[:5]
                raise ItemsError(f"doc_ids of {_entry(row)} differ from those of {_entry(first)}: "
                                 f"{len(doc_ids)} against {len(reference)} items; only here {only}, only there {lacking}")
            order = np.fromiter((reference[d] for d in doc_ids), dtype=np.int64, count=len(doc_ids))
            aligned_num, aligned_den = np.empty_like(num), np.empty_like(den)
            aligned_num[order], aligned_den[order] = num, den
            key = aligned_num.tobytes() + aligned_den.tobytes()
            if key not in distinct_rows:
                distinct_rows[key] = len(nums)
                nums.append(aligned_num)
                dens.append(aligned_den)
            values[i] = (benchmark, distinct_rows[key])
        I = len(reference)
        draws = rng.integers(0, I, size=(n, I))
        weights = np.bincount((draws + I * np.arange(n)[:, None]).ravel(), minlength=n * I).reshape(n, I).astype(float)
        replicate[benchmark] = _transform(kinds, (np.stack(nums) @ weights.T) / (np.stack(dens) @ weights.T))  # [u, n]
        n_items[benchmark] = I

    cells_out = []
    for setting, criteria, bases in plans:
        C = len(criteria)
        point_bases, boot_bases = [], []
        benchmarks_seen, ratios_seen, n_draws = set(), set(), 0
        for base in sorted(bases):
            draws = bases[base]
            point_draws, boot_draws = [], []
            for draw in sorted(draws):
                point_cells, boot_cells = [], []
                for calibration, ratio, benchmarks in draws[draw]:
                    ratios_seen.add(ratio)
                    benchmarks_seen.update(benchmarks)
                    point_rank, boot_rank = np.zeros(C), np.zeros((n, C))
                    groups = None
                    for benchmark in benchmarks:
                        ids = [record(calibration, ratio, c, benchmark) for c in criteria]
                        if pruned is not None and groups is None:
                            keys = [pruned[i] if isinstance(pruned[i], str) else f"#{i}" for i in ids]
                            groups = np.unique(keys, return_inverse=True)[1]
                        point = value[ids]  # [C]
                        boot = np.stack([replicate[benchmark][values[i][1]] for i in ids], axis=1)  # [n, C]
                        sign = -1.0 if higher[benchmark] else 1.0
                        point_rank += _distinct_ranks(sign * point, groups)
                        boot_rank += _distinct_ranks(sign * boot, groups)
                    point_cells.append(point_rank / len(benchmarks))
                    boot_cells.append(boot_rank / len(benchmarks))
                point_draws.append(np.mean(point_cells, axis=0))
                boot_draws.append(np.mean(boot_cells, axis=0))
            n_draws += len(draws)
            S = len(point_draws)
            picks = rng.integers(0, S, size=(n, S))
            counts = np.stack([(picks == s).sum(axis=1) for s in range(S)], axis=1)  # [n, S]
            point_bases.append(np.mean(point_draws, axis=0))
            boot_bases.append(np.einsum("ns,snc->nc", counts, np.stack(boot_draws)) / S)
        cells_out.append({"model": model, "setting": setting, "criteria": criteria,
                          "point": np.mean(point_bases, axis=0), "boot": np.mean(boot_bases, axis=0),  # [C], [n, C]
                          "n_criteria": C, "n_benchmarks": len(benchmarks_seen),
                          "n_items": sum(n_items[b] for b in benchmarks_seen), "n_ratios": len(ratios_seen),
                          "n_draws": n_draws, "n_seeds": min(len(d) for d in bases.values())})
    return cells_out, free


# ---------------------------------------------------------------- the paper's question, per setting, ratio and metric


REPORT_COLUMNS = ["model", "setting", "ratio", "metric", "criterion", "mean_rank", "low", "high", "p_best", "p_top2",
                  "n_criteria", "n_benchmarks", "n_items", "n_draws", "n_seeds"]
PAIRED_COLUMNS = ["model", "setting", "ratio", "metric", "a", "b", "mean", "low", "high", "p_better"]


def rank_report(results: pd.DataFrame, *, model: str, ratios: Sequence[float] | None = None,
                metrics: Sequence[str] = (ACCURACY, BITS_PER_BYTE), new: Sequence[str] = NEW_CRITERIA,
                n: int = 1000, level: float = 0.9, seed: int = 0, distinct: bool = True) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The ranking per (setting, ratio, metric family) of one model, from one set of replicates per
    (ratio, metric): what `bootstrap_average_ranks`, `rank_probabilities` and `paired_rank_differences`
    give with the same arguments, computed once.

    Returns (ranks, paired). ranks: one row per (setting, ratio, metric, criterion) with the average
    rank, its interval, P(best) and P(top 2) (`REPORT_COLUMNS`). paired: per (setting, ratio,
    metric), each criterion of `new` (MAN, MSAN) against the best-ranked other criterion of that
    cell (by point estimate; the strongest competitor there): the paired difference of average
    ranks (negative = the new criterion ranks better), its interval and P(new ranks better).
    ratios: default every ratio of the model's records. A metric family the model's records do not
    have (the paper suite has no bits-per-byte task) is left out.
    """
    frame = results[results["model"] == model]
    if frame.empty:
        raise ValueError(f"no results of model {model!r}")
    ratios = sorted(frame.loc[frame["criterion"] != UNPRUNED, "ratio"].astype(float).unique()) if ratios is None else list(ratios)
    families = {metric_family(m) for m in frame.loc[frame["status"] == "ok", "metric"]} if "status" in frame else \
        {metric_family(m) for m in frame["metric"]}
    ranks, paired = [], []
    for ratio in ratios:
        for metric in metrics:
            _check_filters(level, n, metric, ratio)
            if metric != ALL_METRICS and metric not in families:
                continue  # a suite without this family (the paper suite has no bits-per-byte task)
            cells, _ = _replicates(frame, n, seed, model, (UNPRUNED,), None, metric, ratio, distinct)
            for cell in cells:
                point, names = cell["point"], cell["criteria"]
                low, high = _interval(cell["boot"], level)
                best, top2 = _standing(cell["boot"])
                key = {"model": model, "setting": cell["setting"], "ratio": float(ratio), "metric": metric}
                for k, criterion in enumerate(names):
                    ranks.append({**key, "criterion": criterion, "mean_rank": point[k], "low": low[k], "high": high[k],
                                  "p_best": float(best[k]), "p_top2": float(top2[k]),
                                  **{c: cell[c] for c in REPORT_COLUMNS[10:]}})
                others = [k for k, c in enumerate(names) if c not in new]
                if not others:
                    continue
                rival = min(others, key=lambda k: point[k])
                for criterion in [c for c in new if c in names]:
                    paired.append({**key, "a": criterion, "b": names[rival], **_paired(cell, names.index(criterion), rival, level)})
    ranks_frame = pd.DataFrame(ranks, columns=REPORT_COLUMNS)
    paired_frame = pd.DataFrame(paired, columns=PAIRED_COLUMNS)
    for out in (ranks_frame, paired_frame):
        out.attrs.update(n=n, level=level, seed=seed, model=model)
    return ranks_frame, paired_frame


SETTING_WORDS = {
    "task-agnostic": "task-agnostic (general-domain calibration, every benchmark)",
    "task-specific": "task-specific (code and math calibrations, their own benchmarks)",
    "all-domain": "all-domain (calibration covering every evaluation domain, every benchmark)",
}
METRIC_WORDS = {ACCURACY: "accuracy", BITS_PER_BYTE: "bits per byte"}


def rank_verdicts(ranks: pd.DataFrame, paired: pd.DataFrame, *, top: int = 2) -> list[str]:
    """One sentence per (setting, ratio, metric) of `rank_report`, computed from its numbers: the
    `top` leading criteria with average rank, interval and P(top 2); where MAN and MSAN rank; and
    their paired difference to the strongest other criterion, with a verdict that says whether
    the interval excludes zero."""
    level = ranks.attrs.get("level", 0.9)
    sentences = []
    def order(key):
        setting, ratio, metric = key
        return (SETTING_ORDER.index(setting) if setting in SETTING_ORDER else len(SETTING_ORDER), ratio,
                METRIC_FAMILIES.index(metric) if metric in METRIC_FAMILIES else len(METRIC_FAMILIES))

    groups = dict(list(ranks.groupby(["setting", "ratio", "metric"], sort=False)))
    for (setting, ratio, metric) in sorted(groups, key=order):
        cell = groups[(setting, ratio, metric)].sort_values("mean_rank", kind="stable")
        lead = "; ".join(f"{display_name(r.criterion)} {r.mean_rank:.2f} [{r.low:.2f}, {r.high:.2f}], P(top 2) {r.p_top2:.2f}"
                         for r in cell.head(top).itertuples())
        text = (f"{SETTING_WORDS.get(setting, setting).capitalize()}, {ratio:.0%} removed, {METRIC_WORDS.get(metric, metric)} "
                f"({int(cell['n_criteria'].iloc[0])} criteria): lead {lead}.")
        for p in paired[(paired["setting"] == setting) & (paired["ratio"] == ratio) & (paired["metric"] == metric)].itertuples():
            place = cell.reset_index(drop=True).index[cell["criterion"].to_numpy() == p.a][0] + 1
            if p.high < 0:
                verdict = f"ranks better than {display_name(p.b)}"
            elif p.low > 0:
                verdict = f"ranks worse than {display_name(p.b)}"
            else:
                verdict = f"is not distinguishable from {display_name(p.b)}"
            text += (f" {display_name(p.a)} is {_ordinal(place)} and {verdict} (paired difference {p.mean:+.2f}, "
                     f"{level:.0%} interval [{p.low:+.2f}, {p.high:+.2f}], P(better) {p.p_better:.2f}).")
        sentences.append(text)
    return sentences


def _ordinal(k: int) -> str:
    return f"{k}{'th' if 10 <= k % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(k % 10, 'th')}"


def rank_report_table(ranks: pd.DataFrame, paired: pd.DataFrame | None = None, *, setting: str, digits: int = 2) -> pd.DataFrame:
    """One setting of `rank_report` as criterion rows x (ratio, metric) columns of "mean [low, high]",
    with a last row per column for each new criterion's paired difference to the strongest other."""
    rows = ranks[ranks["setting"] == setting]
    if rows.empty:
        raise ValueError(f"no rows of setting {setting!r} (settings: {sorted(set(ranks['setting']))})")
    cell = [f"{m:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]" for m, lo, hi in zip(rows["mean_rank"], rows["low"], rows["high"])]
    rows = rows.assign(cell=cell, column=[f"{r:.0%} · {METRIC_WORDS.get(m, m)}" for r, m in zip(rows["ratio"], rows["metric"])])
    columns = list(dict.fromkeys(rows.sort_values(["ratio"], kind="stable")["column"]))
    table = rows.pivot_table(index="criterion", columns="column", values="cell", aggfunc="first")
    table = table.reindex(index=criterion_order(table.index), columns=columns)
    table.index = [display_name(c) for c in table.index]
    if paired is not None and not paired.empty:
        part = paired[paired["setting"] == setting]
        for a in dict.fromkeys(part["a"]):
            line = {}
            for p in part[part["a"] == a].itertuples():
                line[f"{p.ratio:.0%} · {METRIC_WORDS.get(p.metric, p.metric)}"] = (
                    f"{p.mean:+.{digits}f} [{p.low:+.{digits}f}, {p.high:+.{digits}f}] vs {display_name(p.b)}")
            table.loc[f"{display_name(a)} − strongest other (paired)"] = pd.Series(line)
    table = table.fillna("–")
    table.columns.name = None
    table.attrs.update(ranks.attrs, bold=False)
    return table


def rank_report_caption(ranks: pd.DataFrame, setting: str, *, latex: bool = False) -> str:
    """What `rank_report_table` shows, in words."""
    rows = ranks[ranks["setting"] == setting]
    level, n = ranks.attrs.get("level", 0.9), ranks.attrs.get("n", 1000)
    first = rows.iloc[0]
    percent = r"\%" if latex else "%"
    return (f"{SETTING_WORDS.get(setting, setting).capitalize()}: average rank of {int(first['n_criteria'])} criteria "
            f"(1 = best; lower is better) per ratio removed and metric family, with {level:.0%} percentile bootstrap "
            f"intervals from {n} replicates (items resampled within each benchmark, paired across criteria; calibration "
            f"draws resampled, {int(first['n_draws'])} draws). Identical pruned models are ranked once. Last rows: the "
            f"paired difference of MAN's and MSAN's average rank to the strongest other criterion of the column "
            f"(negative = better), with its interval.").replace("%", percent)


def write_rank_report(ranks: pd.DataFrame, paired: pd.DataFrame, out_dir: str | Path, name: str) -> list[Path]:
    """`name`.md: the verdict sentences (`rank_verdicts`) and one table per setting (`rank_report_table`);
    `name`.tex: the tables with captions."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = sorted(set(ranks["setting"]), key=lambda s: (SETTING_ORDER.index(s) if s in SETTING_ORDER else len(SETTING_ORDER), s))
    md = ["\n".join(f"- {sentence}" for sentence in rank_verdicts(ranks, paired))]
    tex = []
    for setting in settings:
        table = rank_report_table(ranks, paired, setting=setting)
        md.append(to_markdown(table) + "\n\n" + rank_report_caption(ranks, setting))
        tex.append(to_latex(table, caption=rank_report_caption(ranks, setting), label=f"tab:{name}:{setting}"))
    paths = [out_dir / f"{name}.md", out_dir / f"{name}.tex"]
    paths[0].write_text("\n\n".join(md) + "\n")
    paths[1].write_text("\n\n".join(tex))
    return paths


# ---------------------------------------------------------------- one ranking across trained models (seed, balance)


SHIFT_COLUMNS = ["setting", "ratio", "metric", "criterion", "reference", "other", "reference_rank", "reference_low",
                 "reference_high", "other_rank", "other_low", "other_high", "shift", "shift_low", "shift_high"]


def _spearman(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Spearman's rho between the rows of x and y [..., C] (ties averaged), [...]."""
    rx, ry = _average_ranks(x), _average_ranks(y)
    rx = rx - rx.mean(axis=-1, keepdims=True)
    ry = ry - ry.mean(axis=-1, keepdims=True)
    den = np.sqrt((rx * rx).sum(axis=-1) * (ry * ry).sum(axis=-1))
    return np.where(den > 0, (rx * ry).sum(axis=-1) / np.where(den > 0, den, 1.0), np.nan)


def _shared_cells(results: pd.DataFrame, models, setting: str, ratio, metric: str, n: int, seed: int,
                  distinct: bool) -> dict:
    """Per model, its (setting, ratio, metric) cell of `_replicates` over the criteria every one of
    `models` has; a ValueError names a model without results or without that cell."""
    shared = None
    for name in models:
        names = set(results.loc[(results["model"] == name) & (results["criterion"] != UNPRUNED), "criterion"])
        if not names:
            raise ValueError(f"no results of model {name!r} (models: {sorted(set(results['model']))})")
        shared = names if shared is None else shared & names
    cells = {}
    for name in models:
        found, _ = _replicates(results, n, seed, name, (UNPRUNED,), sorted(shared), metric, ratio, distinct)
        found = [c for c in found if c["setting"] == setting]
        if not found:
            raise ValueError(f"model {name!r}: no {setting!r} results at ratio {ratio} for metric {metric!r}")
        cells[name] = found[0]
    return cells


def rank_shift(results: pd.DataFrame, reference: str, other: str, *, setting: str = "task-agnostic", ratio: float = 0.25,
               metric: str = ACCURACY, n: int = 1000, level: float = 0.9, seed: int = 0,
               distinct: bool = True) -> tuple[pd.DataFrame, dict]:
    """How the ranking of one (setting, ratio, metric) cell moves from model `reference` to model `other`
    (another training seed, or another training recipe such as the pooled balance loss).

    Both models are ranked over the criteria they share (the same benchmarks and items), each with
    `bootstrap_average_ranks`' replicates; the two models are trained apart, so their replicates are
    drawn independently and the shift's interval is that of the difference of two independent
    estimates. Returns (per_criterion, summary). per_criterion: one row per criterion
    (`SHIFT_COLUMNS`): each model's average rank with its interval, and shift = other - reference
    (positive = ranks worse on `other`) with its interval. summary: ``spearman`` (Spearman's rho
    between the two models' average ranks), ``spearman_low``/``spearman_high`` (its interval over
    the paired replicates), ``mean_abs_shift``, ``same_leader`` (whether both models rank the same
    criterion first), ``n_criteria``, and the arguments.
    """
    _check_filters(level, n, metric, ratio)
    if reference == other:
        raise ValueError(f"reference and other are both {reference!r}: compare two models")
    cells = _shared_cells(results, (reference, other), setting, ratio, metric, n, seed, distinct)
    criteria = [c for c in cells[reference]["criteria"] if c in cells[other]["criteria"]]
    a = cells[reference]
    b = cells[other]
    ia = [a["criteria"].index(c) for c in criteria]
    ib = [b["criteria"].index(c) for c in criteria]
    point_a, point_b = a["point"][ia], b["point"][ib]
    boot_a, boot_b = a["boot"][:, ia], b["boot"][:, ib]
    low_a, high_a = _interval(boot_a, level)
    low_b, high_b = _interval(boot_b, level)
    low_d, high_d = _interval(boot_b - boot_a, level)
    rows = [{"setting": setting, "ratio": float(ratio), "metric": metric, "criterion": c, "reference": reference, "other": other,
             "reference_rank": point_a[k], "reference_low": low_a[k], "reference_high": high_a[k],
             "other_rank": point_b[k], "other_low": low_b[k], "other_high": high_b[k],
             "shift": point_b[k] - point_a[k], "shift_low": low_d[k], "shift_high": high_d[k]} for k, c in enumerate(criteria)]
    rho_low, rho_high = _interval(_spearman(boot_a, boot_b)[:, None], level)[:, 0]
    summary = {"reference": reference, "other": other, "setting": setting, "ratio": float(ratio), "metric": metric,
               "spearman": float(_spearman(point_a, point_b)), "spearman_low": float(rho_low), "spearman_high": float(rho_high),
               "mean_abs_shift": float(np.abs(point_b - point_a).mean()),
               "same_leader": criteria[int(np.argmin(point_a))] == criteria[int(np.argmin(point_b))],
               "n_criteria": len(criteria), "n": n, "level": level, "seed": seed}
    out = pd.DataFrame(rows, columns=SHIFT_COLUMNS)
    out.attrs.update(summary)
    return out, summary


def rank_shift_beyond(results: pd.DataFrame, reference: str, other: str, yardstick: str, *,
                      setting: str = "task-agnostic", ratio: float = 0.25, metric: str = ACCURACY, n: int = 1000,
                      level: float = 0.9, seed: int = 0, distinct: bool = True) -> dict:
    """Does model `other` (a changed recipe, e.g. the pooled balance loss) move `reference`'s ranking
    of one cell further than `yardstick` (the same recipe retrained with another seed) does?

    Each model is ranked over the criteria all three share, with `bootstrap_average_ranks`'
    replicates (the reference's replicates are the same in both comparisons, the other two models'
    are drawn independently). Returns a dict: ``rho_other`` and ``rho_yardstick`` (Spearman's rho of
    each model's ranking with the reference's) with ``_low``/``_high`` intervals; ``difference`` =
    rho_yardstick - rho_other with its interval over the replicates (paired through the
    reference's); ``mean_abs_shift_other`` / ``_yardstick``; ``beyond``: True when the difference's
    interval lies wholly above zero (the changed recipe moves the ranking further than retraining),
    False otherwise; ``sentence``: the verdict in words, computed from these numbers."""
    _check_filters(level, n, metric, ratio)
    if len({reference, other, yardstick}) != 3:
        raise ValueError(f"reference, other and yardstick must be three models, got {reference!r}, {other!r}, {yardstick!r}")
    cells = _shared_cells(results, (reference, other, yardstick), setting, ratio, metric, n, seed, distinct)
    criteria = [c for c in cells[reference]["criteria"] if all(c in cells[m]["criteria"] for m in (other, yardstick))]
    point, boot = {}, {}
    for name, cell in cells.items():
        idx = [cell["criteria"].index(c) for c in criteria]
        point[name], boot[name] = cell["point"][idx], cell["boot"][:, idx]
    rho = {m: float(_spearman(point[reference], point[m])) for m in (other, yardstick)}
    reps = {m: _spearman(boot[reference], boot[m]) for m in (other, yardstick)}
    out = {"reference": reference, "other": other, "yardstick": yardstick, "setting": setting, "ratio": float(ratio),
           "metric": metric, "n_criteria": len(criteria), "n": n, "level": level, "seed": seed}
    for m, key in ((other, "other"), (yardstick, "yardstick")):
        low, high = _interval(reps[m][:, None], level)[:, 0]
        out.update({f"rho_{key}": rho[m], f"rho_{key}_low": float(low), f"rho_{key}_high": float(high),
                    f"mean_abs_shift_{key}": float(np.abs(point[m] - point[reference]).mean())})
    low, high = _interval((reps[yardstick] - reps[other])[:, None], level)[:, 0]
    out.update(difference=rho[yardstick] - rho[other], difference_low=float(low), difference_high=float(high),
               beyond=bool(low > 0))
    cell = f"{SETTING_WORDS.get(setting, setting)}, {float(ratio):.0%} removed, {METRIC_WORDS.get(metric, metric)}"
    out["sentence"] = (
        f"{other} against {reference} ({cell}): Spearman ρ {out['rho_other']:.2f} [{out['rho_other_low']:.2f}, "
        f"{out['rho_other_high']:.2f}], mean |shift| {out['mean_abs_shift_other']:.2f} ranks; the retrained {yardstick}: "
        f"ρ {out['rho_yardstick']:.2f} [{out['rho_yardstick_low']:.2f}, {out['rho_yardstick_high']:.2f}], mean |shift| "
        f"{out['mean_abs_shift_yardstick']:.2f}. Difference in ρ (retrained − {other}) {out['difference']:+.2f} "
        f"[{out['difference_low']:+.2f}, {out['difference_high']:+.2f}]: "
        + (f"{other} moves the ranking further than retraining does." if out["beyond"] else
           f"{other} does not move the ranking distinguishably further than retraining with another seed does."))
    return out


def rank_shift_table(shifts: Sequence[pd.DataFrame], *, digits: int = 2) -> pd.DataFrame:
    """`rank_shift` results of one reference model side by side: criterion rows; the reference's
    average rank, then per other model its average rank and its shift, each "mean [low, high]";
    a last row with Spearman's rho between the two rankings."""
    if not shifts:
        raise ValueError("no rank_shift results to show")
    first = shifts[0]
    fmt = lambda m, lo, hi, sign="": f"{m:{sign}.{digits}f} [{lo:{sign}.{digits}f}, {hi:{sign}.{digits}f}]"
    table = pd.DataFrame(index=list(first["criterion"]))
    reference = first["reference"].iloc[0]
    table[reference] = [fmt(r.reference_rank, r.reference_low, r.reference_high) for r in first.itertuples()]
    rho = {reference: "–"}
    for shift in shifts:
        other = shift["other"].iloc[0]
        rows = shift.set_index("criterion")
        table[other] = [fmt(*rows.loc[c, ["other_rank", "other_low", "other_high"]]) if c in rows.index else "–" for c in table.index]
        table[f"{other} − {reference}"] = [fmt(*rows.loc[c, ["shift", "shift_low", "shift_high"]], sign="+") if c in rows.index
                                           else "–" for c in table.index]
        s = shift.attrs
        rho[other] = "–"
        rho[f"{other} − {reference}"] = f"{s['spearman']:.{digits}f} [{s['spearman_low']:.{digits}f}, {s['spearman_high']:.{digits}f}]"
    table = table.reindex(index=criterion_order(table.index))
    table.index = [display_name(c) for c in table.index]
    table.loc["Spearman ρ (ranking vs the reference)"] = pd.Series(rho)
    table = table.fillna("–")
    table.attrs.update(bold=False)
    return table


def rank_shift_verdicts(shifts: Sequence[pd.DataFrame], *, criteria: Sequence[str] = NEW_CRITERIA + ("reap", "frequency")) -> list[str]:
    """One sentence per `rank_shift` result, computed from its numbers: how far the ranking moves
    (Spearman's rho, mean |shift|, whether the leader stays) and where the named `criteria` move,
    with the verdict that the shift's interval excludes zero or not."""
    sentences = []
    for shift in shifts:
        s = shift.attrs
        words = (f"{s['other']} against {s['reference']} ({SETTING_WORDS.get(s['setting'], s['setting'])}, "
                 f"{s['ratio']:.0%} removed, {METRIC_WORDS.get(s['metric'], s['metric'])}): Spearman ρ {s['spearman']:.2f} "
                 f"[{s['spearman_low']:.2f}, {s['spearman_high']:.2f}], mean |shift| {s['mean_abs_shift']:.2f} ranks, "
                 f"{'the same' if s['same_leader'] else 'a different'} leader.")
        rows = shift.set_index("criterion")
        for c in [c for c in criteria if c in rows.index]:
            r = rows.loc[c]
            moved = ("moves up" if r["shift_high"] < 0 else "moves down" if r["shift_low"] > 0 else "does not move distinguishably")
            words += (f" {display_name(c)} {r['reference_rank']:.2f} → {r['other_rank']:.2f}, {moved} "
                      f"(shift {r['shift']:+.2f} [{r['shift_low']:+.2f}, {r['shift_high']:+.2f}]).")
        sentences.append(words)
    return sentences


def write_rank_shifts(groups: Sequence[Sequence[pd.DataFrame]], out_dir: str | Path, name: str) -> list[Path]:
    """`name`.md: per group of `rank_shift` results (one cell: setting, ratio, metric; one result
    per other model) a heading, the verdict sentences (`rank_shift_verdicts`) and the table
    (`rank_shift_table`); `name`.tex: the tables with captions."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    md, tex = [], []
    for shifts in groups:
        s = shifts[0].attrs
        head = (f"{SETTING_WORDS.get(s['setting'], s['setting']).capitalize()}, {s['ratio']:.0%} removed, "
                f"{METRIC_WORDS.get(s['metric'], s['metric'])}")
        caption = (f"{head}: average rank (1 = best) of {s['n_criteria']} criteria on each model, and the shift "
                   f"other − {s['reference']} (positive = ranks worse on the other model), with {s['level']:.0%} "
                   f"percentile bootstrap intervals from {s['n']} replicates (items and calibration draws resampled; "
                   f"the models' replicates independent); last row: Spearman's ρ between the two rankings.")
        table = rank_shift_table(shifts)
        md.append(f"**{head}**\n\n" + "\n".join(f"- {v}" for v in rank_shift_verdicts(shifts)) + "\n\n" + to_markdown(table)
                  + "\n\n" + caption)
        tex.append(to_latex(table, caption=caption, label=f"tab:{name}:{s['ratio']}:{s['metric']}"))
    paths = [out_dir / f"{name}.md", out_dir / f"{name}.tex"]
    paths[0].write_text("\n\n".join(md) + "\n")
    paths[1].write_text("\n\n".join(tex))
    return paths


def rank_interval_table(boot: pd.DataFrame, *, digits: int = 2) -> pd.DataFrame:
    """`bootstrap_average_ranks` as criterion rows x (setting, model) columns of "mean [low, high]"."""
    cells = boot.assign(cell=[f"{m:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"
                              for m, lo, hi in zip(boot["mean_rank"], boot["low"], boot["high"])])
    table = cells.pivot_table(index="criterion", columns=["setting", "model"], values="cell", aggfunc="first")
    settings = sorted(table.columns.get_level_values(0).unique(),
                      key=lambda s: (SETTING_ORDER.index(s) if s in SETTING_ORDER else len(SETTING_ORDER), s))
    models = list(dict.fromkeys(boot["model"]))
    table = table.reindex(index=criterion_order(table.index),
                          columns=pd.MultiIndex.from_tuples([(s, m) for s in settings for m in models if (s, m) in table.columns],
                                                            names=["setting", "model"]))
    table = table.fillna("–")
    table.attrs.update(boot.attrs, bold=False)
    return table


def rank_interval_caption(boot: pd.DataFrame, *, latex: bool = False) -> str:
    """What `rank_interval_table` shows, in words: replicates, level, items, draws, direction."""
    level, n = boot.attrs.get("level", 0.9), boot.attrs.get("n", int(boot["n_boot"].max()))
    parts = []
    for (model, setting), g in boot.groupby(["model", "setting"], sort=False):
        first = g.iloc[0]
        parts.append(f"{model} {setting}: {first['n_criteria']} criteria, {first['n_benchmarks']} benchmarks, "
                     f"{first['n_items']} items, {first['n_draws']} calibration draws ({first['n_seeds']}+ seeds each), "
                     f"{first['n_ratios']} ratios")
    percent = r"\%" if latex else "%"
    free = {m: c for m, c in (boot.attrs.get("calibration_free") or {}).items() if c}
    extra = ("; calibration-free, the same for every draw: "
             + ", ".join(f"{m}: {', '.join(display_name(x) for x in c)}" for m, c in free.items())) if free else ""
    return (f"Average rank (1 = best; lower is better) with {level:.0%}".replace("%", percent)
            + f" percentile bootstrap intervals, mean [low, high], from {n} replicates resampling the items of each "
            f"benchmark (paired across criteria) and the calibration seeds of each calibration. "
            + "; ".join(parts) + extra + ".")


def write_rank_intervals(boot: pd.DataFrame, out_dir: str | Path, name: str = "rank_intervals", *, digits: int = 2) -> list[Path]:
    """Write `name`.md (table and caption) and `name`.tex (table with caption) of `rank_interval_table`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table = rank_interval_table(boot, digits=digits)
    md, tex = out_dir / f"{name}.md", out_dir / f"{name}.tex"
    md.write_text(to_markdown(table) + "\n\n" + rank_interval_caption(boot) + "\n")
    tex.write_text(to_latex(table, caption=rank_interval_caption(boot), label=f"tab:{name}"))  # to_latex escapes
    return [md, tex]


# ---------------------------------------------------------------- formatting


def _best(series: pd.Series, higher: bool) -> set:
    values = series.dropna()
    if values.empty:
        return set()
    target = values.max() if higher else values.min()
    return set(values.index[np.isclose(values, target)])


def format_table(table: pd.DataFrame, *, digits: int = 1, other_digits: int = 3, bold: str = "**", bold_end: str | None = None,
                 lower_is_better: Sequence | None = None, names: bool = True) -> pd.DataFrame:
    """Strings for display: `digits` decimals (`other_digits` for benchmarks whose metric is not a
    proportion, e.g. bits per byte), the best pruned criterion per column in bold, "not run" for NaN.

    Best is the maximum, or the minimum for lower-is-better benchmarks (``table.attrs["info"]``),
    for the columns in `lower_is_better`, and for every column of a rank table
    (``attrs["lower_is_better"]``). Tables with ``attrs["bold"] = False`` get no bold.
    Rows and criterion-valued cells are shown with display names (MAN, MSAN, ...).
    """
    bold_end = bold if bold_end is None else bold_end
    info = table.attrs.get("info")
    lower = set(lower_is_better if lower_is_better is not None else table.attrs.get("lower_is_better", ()))
    use_bold = table.attrs.get("bold", True)
    out = pd.DataFrame(index=table.index, columns=table.columns, dtype=object)
    pruned = table.drop(index=[UNPRUNED], errors="ignore")
    for column in table.columns:
        if column in lower:
            higher = False
        elif info is not None and column in info.index:
            higher = bool(info.loc[column, "higher_is_better"])
        else:
            higher = True
        numeric = pd.api.types.is_numeric_dtype(table[column])
        places = digits
        metric = info.loc[column, "metric"] if info is not None and column in info.index else None
        if isinstance(metric, str) and metric.split(",")[0] not in PERCENT_METRICS:
            places = other_digits
        best = _best(pruned[column], higher) if numeric and use_bold else set()
        for index, value in table[column].items():
            if isinstance(value, (float, int, np.floating, np.integer)) and not pd.isna(value):
                text = f"{value:.{places}f}"
                out.loc[index, column] = f"{bold}{text}{bold_end}" if index in best and len(best) < len(pruned) else text
            elif value is None or (not isinstance(value, str) and pd.isna(value)):
                cells = table.attrs.get("statuses")
                status = cells.loc[index, column] if cells is not None and index in cells.index and column in cells.columns else None
                if not isinstance(status, str):  # no record of this cell: what its benchmark did elsewhere
                    status = info.loc[column, "status"] if info is not None and column in info.index else ""
                out.loc[index, column] = status if status and status != "ok" else "–"
            else:
                out.loc[index, column] = display_name(str(value)) if names else str(value)
    if isinstance(out.columns, pd.MultiIndex):  # summary columns: short names, "all" benchmarks implied
        short = {"task-agnostic": "agnostic", "task-specific": "specific", "all": ""}
        out.columns = pd.MultiIndex.from_tuples(
            [tuple(short.get(str(p), str(p).split(":")[-1]) for p in c) for c in out.columns], names=out.columns.names)
    elif info is not None:
        out.columns = [column_label(info, c) if c in info.index else c for c in out.columns]
    if names:
        out.index = [display_name(i) for i in out.index]
    return out


def column_label(info: pd.DataFrame, benchmark: str) -> str:
    """A benchmark's column header: its label, "↓" when lower is better, and its item count:
    ``"Code bpb ↓ (n=30)"``."""
    row = info.loc[benchmark]
    arrow = "" if row["higher_is_better"] else " ↓"
    n = row["n"] if "n" in row.index else float("nan")
    return f"{row['label']}{arrow}" + (f" (n={int(n)})" if not pd.isna(n) else "")


def _settings(table: pd.DataFrame) -> str:
    attrs = table.attrs
    if "calibration" not in attrs:
        return ""
    ratio = attrs.get("ratio")
    return f"{attrs.get('model')}, calibration {attrs['calibration']}" + (f", {ratio:.0%} of experts removed per MoE layer" if ratio is not None else "")


def table_caption(table: pd.DataFrame, kind: str = "results") -> str:
    """A caption saying what a table's cells are, their units and direction, and the item counts.

    kind: "results" (`results_table`), "ranks" (`rank_table`), "gap" (`gap_to_baseline`) or
    "summary" (`average_rank_summary`).
    """
    info = table.attrs.get("info")
    averaged = table.attrs.get("averaged") or []
    labels = ", ".join(info.loc[b, "label"] for b in averaged) if info is not None and averaged else "the higher-is-better benchmarks"
    where = _settings(table)
    counts = " n = items (documents for bits per byte) per benchmark, in each column's header." if info is not None else ""
    if kind == "results":
        return (f"Scores of each criterion ({where}). Accuracy in points (higher is better); columns marked ↓ "
                f"(bits per byte) are lower is better and not averaged; {AVERAGE} = mean of {labels}.{counts} "
                "Best pruned criterion per column in bold.")
    if kind == "ranks":
        return (f"Rank of each pruned criterion per benchmark ({where}): 1 = best, lower is better; ties share their mean "
                f"rank; {AVERAGE_RANK} = mean over the benchmarks.{counts}")
    if kind == "gap":
        return (f"MAN and MSAN against the strongest baseline ({where}): mean accuracy of {labels} in points, higher is better; "
                "gap = new criterion minus baseline, positive = the new criterion is better.")
    if kind == "summary":
        return ("Average rank of each criterion (1 = best, lower is better) per setting, calibration, benchmarks and fraction "
                "of experts removed; \"matched\" ranks on the benchmarks of the calibration's domain only.")
    raise ValueError(f"table_caption: unknown kind {kind!r}; use results, ranks, gap or summary")


def to_markdown(table: pd.DataFrame, *, digits: int = 1, caption: str | None = None, **kwargs) -> str:
    """The table in Markdown (GitHub pipes), with `caption` as a paragraph above it; best pruned criterion per column in bold."""
    formatted = format_table(table, digits=digits, **kwargs)
    if isinstance(formatted.columns, pd.MultiIndex):
        formatted.columns = [" ".join(str(p) for p in c if p) for c in formatted.columns]
    text = formatted.to_markdown(disable_numparse=True)
    return f"Table: {caption}\n\n{text}" if caption else text


def to_latex(table: pd.DataFrame, *, digits: int = 1, caption: str | None = None, label: str | None = None, **kwargs) -> str:
    """The table as a LaTeX tabular (booktabs); best pruned criterion per column in bold."""
    formatted = format_table(table, digits=digits, bold=r"\textbf{", bold_end="}", **kwargs)
    formatted = formatted.map(lambda s: s.replace("–", "--"))
    escape = lambda s: (str(s).replace("_", r"\_").replace("%", r"\%").replace("&", r"\&").replace("#", r"\#")  # noqa: E731
                        .replace("↓", r"$\downarrow$"))
    formatted.index = [escape(i) for i in formatted.index]
    if isinstance(formatted.columns, pd.MultiIndex):
        formatted.columns = pd.MultiIndex.from_tuples([tuple(escape(p) for p in c) for c in formatted.columns])
    else:
        formatted.columns = [escape(c) for c in formatted.columns]
    caption = escape(caption).replace('"', "''") if caption else caption
    return formatted.to_latex(escape=False, caption=caption, label=label, column_format="l" + "r" * formatted.shape[1],
                              multicolumn_format="c")


def write_table(table: pd.DataFrame, name: str, out_dir: str | Path, *, caption: str | None = None, **kwargs) -> list[Path]:
    """Write `name`.md and `name`.tex under `out_dir`, with `caption` (see `table_caption`)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    md, tex = out_dir / f"{name}.md", out_dir / f"{name}.tex"
    md.write_text(to_markdown(table, caption=caption, **kwargs) + "\n")
    tex.write_text(to_latex(table, caption=caption, **kwargs))
    return [md, tex]


def write_tables(df: pd.DataFrame, out_dir: str | Path, *, model: str | None = None,
                 criteria: Sequence[str] | None = NAMED) -> list[Path]:
    """Every table of one model under `out_dir` (Markdown and LaTeX).

    Per (calibration, ratio): ``results__*`` (scores), ``ranks__*`` and ``gap__*`` (MAN and
    MSAN against the strongest baseline); for task-specific calibrations also ``*__matched``
    on the targeted domain's benchmarks; and ``average_rank__<model>``, the summary. These
    compare `criteria` (default: the paper's named criteria and MoNE). When more criteria
    were evaluated (the grid), ``average_rank__<model>__all`` ranks all of them.
    """
    pruned, _ = _select(df, model, None, None)
    model = model or pruned["model"].iloc[0]
    written = []
    for (calibration, setting, ratio), _group in pruned.groupby(["calibration", "setting", "ratio"], sort=True):
        variants = [("", None)]
        matched = matched_benchmarks(df, calibration) if setting == "task-specific" else None
        if matched:
            variants.append(("__matched", matched))
        for suffix, benchmarks in variants:
            table = results_table(df, model=model, calibration=calibration, ratio=ratio, benchmarks=benchmarks, criteria=criteria)
            stem = f"{slug(model)}__{slug(calibration)}__{ratio:g}{suffix}"
            written += write_table(table, f"results__{stem}", out_dir, caption=table_caption(table, "results"))
            ranks = rank_table(table)
            written += write_table(ranks, f"ranks__{stem}", out_dir, digits=2, caption=table_caption(ranks, "ranks"))
            try:
                gap = gap_to_baseline(table)
            except ValueError:  # no baseline evaluated
                gap = None
            if gap is not None and len(gap):  # no MAN / MSAN evaluated: no gap table
                written += write_table(gap, f"gap__{stem}", out_dir, caption=table_caption(gap, "gap"))
    summary = average_rank_summary(df, model=model, criteria=criteria)
    written += write_table(summary, f"average_rank__{slug(model)}", out_dir, digits=2,
                           caption=f"{model}: " + table_caption(summary, "summary"))
    if criteria is not None and not set(pruned["criterion"]) <= set(criteria):
        everything = average_rank_summary(df, model=model, criteria=None)
        written += write_table(everything, f"average_rank__{slug(model)}__all", out_dir, digits=2,
                               caption=f"{model}, every criterion evaluated (the grid): " + table_caption(everything, "summary"))
    return written
