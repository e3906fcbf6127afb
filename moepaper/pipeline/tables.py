"""Tables from result files: the paper's results, ranks and gaps (pandas, Markdown, LaTeX).

- `results_table`: criterion x benchmark for one model, calibration and ratio, with the
  unpruned model's row and the average over benchmarks.
- `rank_table`: each criterion's rank per benchmark (1 = best; ties share the average
  rank) and its average rank, the paper's headline number.
- `gap_to_baseline`: MAN's and MSAN's average minus the strongest baseline's.
- `average_rank_summary`: average rank of each criterion in every (calibration, ratio).
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from ..criteria import MONE, NAMED_CRITERIA, criterion_grid
from .evaluation import get_suite
from .results import SETTINGS_FILE, UNPRUNED, slug

NEW_CRITERIA = ("man", "msan")
# The paper's comparison: its named criteria and the MoNE baseline (grid points are extra).
NAMED = tuple(NAMED_CRITERIA)
# Existing criteria the paper compares against (gated (0,1,1) / (0,2,2) included: they are
# points of the family that earlier work used, reported best task-specific).
BASELINES = ("frequency", "seer", "ean", "reap", "gated_ean", "gated_squared", MONE.name)

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
    MONE.name: "MoNE",
}


# ---------------------------------------------------------------- loading


def load_results(out_dir: str | Path) -> pd.DataFrame:
    """Every result file under `out_dir` as one row; ``score`` is the value in table units.

    Columns: model, calibration, setting, criterion, b, alpha, beta, ratio, benchmark, label,
    task, metric, value, score (value x 100 for proportion metrics), stderr,
    higher_is_better, n, status, note, suite, domain, limit, date, path.

    A file under `out_dir` that is not a result record (unreadable, not JSON, or JSON without
    ``benchmark`` and ``criterion``) is skipped with a warning naming it; the folders'
    ``evaluation_settings.json`` records are not results and are skipped silently.
    """
    rows = []
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
        evaluation = record.get("evaluation") or {}
        rows.append(
            {
                **{k: record.get(k) for k in (
                    "model", "calibration", "setting", "criterion", "b", "alpha", "beta", "ratio", "benchmark",
                    "label", "task", "metric", "value", "stderr", "higher_is_better", "n", "status", "note", "suite",
                    "domain",
                )},
                "limit": evaluation.get("limit"),
                "date": (record.get("provenance") or {}).get("date"),
                "path": str(path),
            }
        )
    columns = ["model", "calibration", "setting", "criterion", "b", "alpha", "beta", "ratio", "benchmark", "label",
               "task", "metric", "value", "score", "stderr", "higher_is_better", "n", "status", "note", "suite",
               "domain", "limit", "date", "path"]
    frame = pd.DataFrame(rows)
    if frame.empty:
        return pd.DataFrame(columns=columns)
    frame["value"] = pd.to_numeric(frame["value"], errors="coerce")
    frame["ratio"] = frame["ratio"].astype(float)
    frame["score"] = [score_units(v, m) for v, m in zip(frame["value"], frame["metric"])]
    return frame[columns]


def score_units(value: float, metric: str | None) -> float:
    """A metric value in table units: proportions as points (0-100), anything else unchanged."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return float("nan")
    name = (metric or "").split(",")[0]
    return 100.0 * value if name in PERCENT_METRICS else float(value)


def display_name(criterion: str) -> str:
    return DISPLAY_NAMES.get(criterion, criterion)


def criterion_order(names: Sequence[str]) -> list[str]:
    """Unpruned, the named criteria in the paper's order, MoNE, then grid points by (b, alpha, beta)."""
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


def calibration_domain(calibration: str) -> str | None:
    """The benchmark domain a task-specific calibration targets: ``embedded:code`` / ``code`` -> ``"code"``."""
    name = str(calibration).split(":")[-1]
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
    setting_rank = {"task-agnostic": 0, "task-specific": 1}
    summary = summary[sorted(summary.columns, key=lambda c: (setting_rank.get(c[0], 2), c[1], float(c[3].rstrip("%")), c[2]))]
    summary.columns = pd.MultiIndex.from_tuples(summary.columns, names=["setting", "calibration", "benchmarks", "pruned"])
    summary.attrs["lower_is_better"] = list(summary.columns)
    return summary


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
