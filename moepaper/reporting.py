"""Tables and figures from result files and expert statistics.

Tables (pandas DataFrames, and as Markdown and LaTeX):
- `results_table`: criterion x benchmark for one model, calibration and ratio, with the
  unpruned model's row and the average over benchmarks.
- `rank_table`: each criterion's rank per benchmark (1 = best; ties share the average
  rank) and its average rank, the paper's headline number.
- `gap_to_baseline`: MAN's and MSAN's average minus the strongest baseline's.
- `average_rank_summary`: average rank of each criterion in every (calibration, ratio).

Figures (one style, `set_style`; saved as PNG and PDF by `save_figure`) are plain
`matplotlib.figure.Figure` objects, never attached to pyplot or a GUI backend (what the
Agg backend does): nothing leaks between figures, and a notebook shows one returned as a
cell's value.
- `plot_grid_heatmap`: the whole criterion grid, rows b, columns (alpha, beta).
- `plot_score_vs_ratio`: average score against the fraction of experts removed.
- `plot_kept_overlap`: Jaccard overlap of the kept expert sets between criteria, per layer.
- `plot_rank_correlation`: Spearman correlation of criteria's expert scores within layers.
- `plot_frequency_vs_norm`: routing frequency against mean activation norm, per expert.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from .criteria import CRITERIA, Criterion, criterion_grid, expert_scores
from .results import MONE, RESULTS_DIR, UNPRUNED, criterion_scores, resolve_criteria
from .statistics import ExpertStatistics

REPO_ROOT = Path(__file__).resolve().parent.parent
FIGURES_DIR = REPO_ROOT / "figures"

NEW_CRITERIA = ("man", "msan")
# The paper's comparison: its named criteria and the MoNE baseline (grid points are extra).
NAMED = (*CRITERIA, MONE)
# Existing criteria the paper compares against (gated (0,1,1) / (0,2,2) included: they are
# points of the family that earlier work used, reported best task-specific).
BASELINES = ("frequency", "seer", "ean", "reap", "gated_ean", "gated_squared", MONE)

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
    MONE: "MoNE",
}


# ---------------------------------------------------------------- loading


def load_results(out_dir: str | Path = RESULTS_DIR) -> pd.DataFrame:
    """Every result file under `out_dir` as one row; ``score`` is the value in table units.

    Columns: model, calibration, setting, criterion, b, alpha, beta, ratio, benchmark, label,
    task, metric, value, score (value x 100 for proportion metrics), stderr,
    higher_is_better, n, status, note, suite, domain, limit, date, path.
    """
    rows = []
    for path in sorted(Path(out_dir).rglob("*.json")):
        record = json.loads(path.read_text())
        if "benchmark" not in record or "criterion" not in record:
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
    named = [UNPRUNED, *CRITERIA, MONE]
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
    table.attrs.update(model=model or both["model"].iloc[0], calibration=calibration, ratio=ratio,
                       info=info, averaged=averaged)
    return table


def suite_order(df: pd.DataFrame) -> list[str]:
    """The benchmarks of `df` in their suite's order (paper or local), others after them by name."""
    from . import evaluation

    names = sorted(df["benchmark"].unique())
    order: list[str] = []
    for suite in dict.fromkeys(df["suite"].dropna()) if "suite" in df else ():
        try:
            order += [b.name for b in evaluation.get_suite(suite).benchmarks if b.name in names and b.name not in order]
        except (ValueError, RuntimeError):  # a custom suite: no known order
            continue
    return order + [n for n in names if n not in order]


def benchmark_info(df: pd.DataFrame, order: Sequence[str] | None = None) -> pd.DataFrame:
    """Per benchmark: label, metric, higher_is_better, status ("ok" if any criterion ran it), note."""
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
    """For each new criterion: its average, the strongest baseline, its average and the gap (points)."""
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
    gap = pd.DataFrame(rows).set_index("criterion")
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
                status = info.loc[column, "status"] if info is not None and column in info.index else ""
                out.loc[index, column] = "not run" if status and status != "ok" else "–"
            else:
                out.loc[index, column] = display_name(str(value)) if names else str(value)
    if isinstance(out.columns, pd.MultiIndex):  # summary columns: short names, "all" benchmarks implied
        short = {"task-agnostic": "agnostic", "task-specific": "specific", "all": ""}
        out.columns = pd.MultiIndex.from_tuples(
            [tuple(short.get(str(p), str(p).split(":")[-1]) for p in c) for c in out.columns], names=out.columns.names)
    elif info is not None:
        out.columns = [info.loc[c, "label"] if c in info.index else c for c in out.columns]
    if names:
        out.index = [display_name(i) for i in out.index]
    return out


def to_markdown(table: pd.DataFrame, *, digits: int = 1, **kwargs) -> str:
    """The table in Markdown (GitHub pipes); best pruned criterion per column in bold."""
    formatted = format_table(table, digits=digits, **kwargs)
    if isinstance(formatted.columns, pd.MultiIndex):
        formatted.columns = [" ".join(str(p) for p in c if p) for c in formatted.columns]
    return formatted.to_markdown(disable_numparse=True)


def to_latex(table: pd.DataFrame, *, digits: int = 1, caption: str | None = None, label: str | None = None, **kwargs) -> str:
    """The table as a LaTeX tabular (booktabs); best pruned criterion per column in bold."""
    formatted = format_table(table, digits=digits, bold=r"\textbf{", bold_end="}", **kwargs)
    formatted = formatted.map(lambda s: s.replace("–", "--"))
    escape = lambda s: str(s).replace("_", r"\_").replace("%", r"\%").replace("&", r"\&").replace("#", r"\#")  # noqa: E731
    formatted.index = [escape(i) for i in formatted.index]
    if isinstance(formatted.columns, pd.MultiIndex):
        formatted.columns = pd.MultiIndex.from_tuples([tuple(escape(p) for p in c) for c in formatted.columns])
    else:
        formatted.columns = [escape(c) for c in formatted.columns]
    return formatted.to_latex(escape=False, caption=caption, label=label, column_format="l" + "r" * formatted.shape[1],
                              multicolumn_format="c")


def write_table(table: pd.DataFrame, name: str, out_dir: str | Path = FIGURES_DIR, **kwargs) -> list[Path]:
    """Write `name`.md and `name`.tex under `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    md, tex = out_dir / f"{name}.md", out_dir / f"{name}.tex"
    md.write_text(to_markdown(table, **kwargs) + "\n")
    tex.write_text(to_latex(table, **kwargs))
    return [md, tex]


def write_tables(df: pd.DataFrame, out_dir: str | Path = FIGURES_DIR, *, model: str | None = None,
                 criteria: Sequence[str] | None = NAMED) -> list[Path]:
    """Every table of one model under `out_dir` (Markdown and LaTeX).

    Per (calibration, ratio): ``results__*`` (scores), ``ranks__*`` and ``gap__*`` (MAN and
    MSAN against the strongest baseline); for task-specific calibrations also ``*__matched``
    on the targeted domain's benchmarks; and ``average_rank__<model>``, the summary. These
    compare `criteria` (default: the paper's named criteria and MoNE). When more criteria
    were evaluated (the grid), ``average_rank__<model>__all`` ranks all of them.
    """
    from .results import slug

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
            written += write_table(table, f"results__{stem}", out_dir)
            written += write_table(rank_table(table), f"ranks__{stem}", out_dir, digits=2)
            try:
                written += write_table(gap_to_baseline(table), f"gap__{stem}", out_dir)
            except ValueError:  # no baseline evaluated
                pass
    summary = average_rank_summary(df, model=model, criteria=criteria)
    written += write_table(summary, f"average_rank__{slug(model)}", out_dir, digits=2)
    if criteria is not None and not set(pruned["criterion"]) <= set(criteria):
        everything = average_rank_summary(df, model=model, criteria=None)
        written += write_table(everything, f"average_rank__{slug(model)}__all", out_dir, digits=2)
    return written


# ---------------------------------------------------------------- figure style


PALETTE = {
    UNPRUNED: "#4d4d4d",
    "frequency": "#8da0cb",
    "seer": "#66c2a5",
    "ean": "#a6d854",
    "reap": "#e78ac3",
    "gated_ean": "#e5c494",
    "gated_squared": "#b3b3b3",
    MONE: "#ffd92f",
    "man": "#d62728",
    "msan": "#1f77b4",
}


def set_style() -> None:
    """The one figure style of the package (seaborn whitegrid, paper context, colourblind palette)."""
    import seaborn as sns

    sns.set_theme(context="paper", style="whitegrid", palette="colorblind", font_scale=1.1,
                  rc={"figure.dpi": 110, "savefig.bbox": "tight", "axes.titleweight": "bold", "legend.frameon": False})


def criterion_color(name: str) -> str:
    if name in PALETTE:
        return PALETTE[name]
    import seaborn as sns

    grid = [c.name for c in criterion_grid()]
    colors = sns.color_palette("Greys", len(grid) + 4).as_hex()
    return colors[2 + grid.index(name)] if name in grid else "#999999"


def save_figure(fig, name: str, out_dir: str | Path = FIGURES_DIR) -> list[Path]:
    """Save `fig` as `name`.png (150 dpi) and `name`.pdf under `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{name}.png", out_dir / f"{name}.pdf"]
    fig.savefig(paths[0], dpi=150)
    fig.savefig(paths[1], metadata={"CreationDate": None, "ModDate": None})  # reproducible PDF bytes
    return paths


# ---------------------------------------------------------------- figures from results


def plot_grid_heatmap(df: pd.DataFrame, *, model: str | None = None, calibration: str, ratio: float,
                      value: str = AVERAGE, benchmarks: Sequence[str] | None = None):
    """Heatmap of the criterion grid: rows b, columns (alpha, beta); cells the average score (or rank).

    value: `AVERAGE` (mean score over benchmarks) or `AVERAGE_RANK`. Grid points not evaluated
    are blank; (1, 0, 0), constant for every routed expert, is marked "const".
    """
    import seaborn as sns

    set_style()
    table = results_table(df, model=model, calibration=calibration, ratio=ratio, benchmarks=benchmarks)
    values = table[AVERAGE] if value == AVERAGE else rank_table(table)[AVERAGE_RANK]
    pruned, _ = _select(df, model, calibration, ratio)
    points = pruned.dropna(subset=["b"]).drop_duplicates("criterion").set_index("criterion")[["b", "alpha", "beta"]]
    columns = [(a, be) for a in (0, 1, 2) for be in (0, 1, 2)]
    grid = pd.DataFrame(np.nan, index=[0, 1], columns=pd.MultiIndex.from_tuples(columns, names=["α", "β"]))
    names = pd.DataFrame("", index=[0, 1], columns=grid.columns)
    for name, (b, a, be) in points.iterrows():
        if name in values.index:
            grid.loc[int(b), (int(a), int(be))] = values[name]
            names.loc[int(b), (int(a), int(be))] = display_name(name) if name in CRITERIA else ""
    annotations = grid.map(lambda v: "" if pd.isna(v) else (f"{v:.1f}" if value == AVERAGE else f"{v:.2f}"))
    annotations = annotations + names.map(lambda n: f"\n{n}" if n else "")
    fig = Figure(figsize=(10.5, 3), layout="constrained")
    ax = fig.subplots()
    cmap = "viridis" if value == AVERAGE else "viridis_r"
    sns.heatmap(grid.astype(float), annot=annotations.values, fmt="", cmap=cmap, ax=ax, linewidths=0.5,
                annot_kws={"fontsize": 8}, cbar_kws={"label": "average score" if value == AVERAGE else "average rank (1 = best)"})
    ax.grid(False)
    const = columns.index((0, 0))  # (b=1, alpha=0, beta=0) is the constant 1
    ax.add_patch(Rectangle((const, 1), 1, 1, facecolor="#e0e0e0", edgecolor="white", hatch="//"))
    ax.text(const + 0.5, 1.5, "constant", ha="center", va="center", fontsize=8, color="#555555")
    ax.set_xticklabels([f"({a},{be})" for a, be in columns])
    ax.set_xlabel("(α, β): gate exponent, activation-norm exponent")
    ax.set_ylabel("b (1 = routed-token average)")
    unpruned = table.loc[UNPRUNED, AVERAGE] if UNPRUNED in table.index and value == AVERAGE else None
    extra = f"; unpruned {unpruned:.1f}" if unpruned is not None and not pd.isna(unpruned) else ""
    what = f"average of {averages_of(df, model=model, calibration=calibration, ratio=ratio, benchmarks=benchmarks)}" \
        if value == AVERAGE else "average rank over benchmarks"
    ax.set_title(f"{table.attrs['model']}: {calibration}, {ratio:.0%} experts removed{extra}\ncells: {what}", fontsize=10)
    return fig


def plot_score_vs_ratio(df: pd.DataFrame, *, model: str | None = None, calibration: str,
                        criteria: Sequence[str] | None = None, benchmarks: Sequence[str] | None = None):
    """Average score against the fraction of experts removed, one line per criterion (0 = unpruned)."""
    set_style()
    pruned, unpruned = _select(df, model, calibration, None)
    ratios = sorted(pruned["ratio"].unique())
    averages = {r: results_table(df, model=model, calibration=calibration, ratio=r, benchmarks=benchmarks)[AVERAGE] for r in ratios}
    frame = pd.DataFrame(averages)  # (criterion, ratio)
    base = frame.loc[UNPRUNED].dropna().iloc[0] if UNPRUNED in frame.index and frame.loc[UNPRUNED].notna().any() else None
    names = [c for c in criterion_order(frame.index) if c != UNPRUNED]
    if criteria is None:
        criteria = [c for c in names if c in CRITERIA or c == MONE]
    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.subplots()
    for name in criteria:
        if name not in frame.index:
            continue
        xs = ([0.0] if base is not None else []) + ratios
        ys = ([base] if base is not None else []) + [frame.loc[name, r] for r in ratios]
        strong = name in NEW_CRITERIA
        ax.plot(np.array(xs) * 100, ys, marker="o", color=criterion_color(name), label=display_name(name),
                linewidth=2.4 if strong else 1.4, zorder=3 if strong else 2)
    ax.set_xlabel("experts removed per MoE layer (%)")
    averaged = averages_of(df, model=model, calibration=calibration, ratio=ratios[0], benchmarks=benchmarks)
    ax.set_ylabel(f"average of {averaged}")
    ax.set_title(f"{pruned['model'].iloc[0]}: {calibration}")
    ax.legend(ncol=2, fontsize=8)
    return fig


# ---------------------------------------------------------------- figures from statistics


def _layer_positions(stats: ExpertStatistics, layers: Sequence[int] | None, most: int = 4) -> list[int]:
    """MoE layer positions to draw: the given decoder layers, else all (at most `most`, evenly spaced)."""
    if layers is not None:
        return [stats.layers.index(l) for l in layers]
    n = stats.num_layers
    return list(range(n)) if n <= most else sorted({round(i * (n - 1) / (most - 1)) for i in range(most)})


def short_calibration(description: str) -> str:
    """The source name of a calibration description: ``"embedded:mixed (...): 80 x 512 tokens"`` -> ``"embedded:mixed"``."""
    return description.split(" (")[0].split(":  ")[0]


def averages_of(df: pd.DataFrame, **select) -> str:
    """What `AVERAGE` averages in a results table, in words (benchmark labels), for axis labels."""
    table = results_table(df, **select)
    labels = [table.attrs["info"].loc[b, "label"] for b in table.attrs["averaged"]]
    return ", ".join(labels) if len(labels) <= 4 else f"{len(labels)} benchmarks"


def _stats_title(stats: ExpertStatistics, what: str) -> str:
    model = Path(stats.metadata.get("model_name") or "").name
    calibration = short_calibration(stats.metadata.get("calibration") or "")
    return f"{model + ': ' if model else ''}{what}{f' ({calibration})' if calibration else ''}"


def _named(criteria) -> list:
    return resolve_criteria(criteria if criteria is not None else "named")


def _crit_name(c) -> str:
    return c.name if isinstance(c, Criterion) else c


def kept_overlap(stats: ExpertStatistics, criteria=None, *, ratio: float = 0.5) -> np.ndarray:
    """Jaccard overlap of kept expert sets, [layers, criteria, criteria]."""
    from .pruning import select_experts

    criteria = _named(criteria)
    kept = [select_experts(criterion_scores(stats, c), ratio=ratio, statistics=stats) for c in criteria]
    L, C = stats.num_layers, len(criteria)
    overlap = np.zeros((L, C, C))
    for l in range(L):
        sets = [set(k[l].tolist()) for k in kept]
        for i in range(C):
            for j in range(C):
                overlap[l, i, j] = len(sets[i] & sets[j]) / len(sets[i] | sets[j])
    return overlap


def rank_correlation(stats: ExpertStatistics, criteria=None) -> np.ndarray:
    """Spearman correlation of the criteria's expert scores within each layer, [layers, criteria, criteria]."""
    from scipy.stats import spearmanr

    criteria = _named(criteria)
    scores = [criterion_scores(stats, c) for c in criteria]
    L, C = stats.num_layers, len(criteria)
    rho = np.zeros((L, C, C))
    for l in range(L):
        E = stats.num_experts[l]
        matrix = np.stack([s[l, :E].numpy() for s in scores], axis=1)  # (E, C)
        with np.errstate(invalid="ignore", divide="ignore"):
            r = spearmanr(matrix).statistic
        rho[l] = np.atleast_2d(r) if C > 2 else np.array([[1, r], [r, 1]])
    return rho


def _matrix_panels(values: np.ndarray, stats: ExpertStatistics, criteria, layers, title: str, vmin: float, vmax: float, cmap: str):
    import seaborn as sns

    set_style()
    names = [display_name(_crit_name(c)) for c in _named(criteria)]
    positions = _layer_positions(stats, layers)
    panels = [(f"layer {stats.layers[p]}", values[p]) for p in positions] + [("mean over all MoE layers", np.nanmean(values, axis=0))]
    size = 0.42 * len(names) + 1.2
    fig = Figure(figsize=(size * len(panels), size), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)
    for k, (ax, (name, matrix)) in enumerate(zip(axes[0], panels)):
        ax.grid(False)
        sns.heatmap(matrix, ax=ax, vmin=vmin, vmax=vmax, cmap=cmap, square=True, cbar=k == len(panels) - 1,
                    annot=len(names) <= 10, fmt=".2f", annot_kws={"fontsize": 6},
                    xticklabels=names, yticklabels=names if k == 0 else False)
        ax.set_title(name, fontsize=9)
        ax.tick_params(axis="x", labelrotation=90, labelsize=7)
        ax.tick_params(axis="y", labelsize=7)
    fig.suptitle(title)
    return fig


def plot_kept_overlap(stats: ExpertStatistics, criteria=None, *, ratio: float = 0.5, layers: Sequence[int] | None = None):
    """Jaccard overlap of the experts each criterion keeps, per layer and averaged over layers."""
    overlap = kept_overlap(stats, criteria, ratio=ratio)
    return _matrix_panels(overlap, stats, criteria, layers, _stats_title(stats, f"kept-set Jaccard overlap at {ratio:.0%} removed"),
                          0.0, 1.0, "mako")


def plot_rank_correlation(stats: ExpertStatistics, criteria=None, *, layers: Sequence[int] | None = None):
    """Spearman rank correlation between criteria's expert scores within layers."""
    rho = rank_correlation(stats, criteria)
    return _matrix_panels(rho, stats, criteria, layers, _stats_title(stats, "Spearman correlation of expert scores within layers"),
                          -1.0, 1.0, "vlag")


def plot_frequency_vs_norm(stats: ExpertStatistics, *, ratio: float | None = 0.5):
    """Routing frequency (share of a layer's tokens routed to the expert) against mean activation norm (MAN).

    Each point is an expert; colour is its layer. With `ratio`, experts that Frequency would
    remove but MAN keeps are drawn as triangles, and the reverse as squares.
    """
    import seaborn as sns

    from .pruning import select_experts

    set_style()
    frequency = (stats.count / stats.tokens.unsqueeze(-1).clamp(min=1)).numpy()  # (L, E)
    man = expert_scores(stats, "man").numpy()
    rows = []
    kept_f = kept_m = None
    if ratio is not None:
        kept_f = select_experts(criterion_scores(stats, CRITERIA["frequency"]), ratio=ratio, statistics=stats)
        kept_m = select_experts(criterion_scores(stats, CRITERIA["man"]), ratio=ratio, statistics=stats)
    for l in range(stats.num_layers):
        for j in range(stats.num_experts[l]):
            kind = "both agree"
            if kept_f is not None:
                in_f, in_m = j in set(kept_f[l].tolist()), j in set(kept_m[l].tolist())
                kind = "both agree" if in_f == in_m else ("kept by MAN only" if in_m else "kept by Frequency only")
            rows.append({"layer": stats.layers[l], "frequency": frequency[l, j], "MAN": man[l, j], "kind": kind})
    frame = pd.DataFrame(rows)
    fig = Figure(figsize=(6, 4.2), layout="constrained")
    ax = fig.subplots()
    sns.scatterplot(frame, x="frequency", y="MAN", hue="layer", style="kind", palette="crest", ax=ax,
                    markers={"both agree": "o", "kept by MAN only": "^", "kept by Frequency only": "s"}, s=40)
    from scipy.stats import spearmanr

    rhos = [spearmanr(frequency[l, : stats.num_experts[l]], man[l, : stats.num_experts[l]]).statistic for l in range(stats.num_layers)]
    ax.set_xlabel("routing frequency N_j / N (share of the layer's tokens)")
    ax.set_ylabel("mean activation norm (MAN)")
    ax.set_title(_stats_title(stats, "routing frequency vs MAN") + f"\nmean within-layer Spearman ρ = {np.nanmean(rhos):.2f}",
                 fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    return fig


# ---------------------------------------------------------------- everything at once


def write_report(
    df: pd.DataFrame,
    statistics: dict[str, ExpertStatistics] | None = None,
    out_dir: str | Path = FIGURES_DIR,
    *,
    model: str | None = None,
    overlap_ratio: float = 0.5,
) -> list[Path]:
    """Every table and figure of one model under `out_dir`.

    df: `load_results` output. statistics: calibration name -> its `ExpertStatistics`
    (figures from statistics: kept-set overlap at `overlap_ratio`, rank correlation,
    frequency vs MAN). Figures from results: the grid heatmap per (calibration, ratio)
    and score vs ratio per calibration.
    """
    from .results import slug

    pruned, _ = _select(df, model, None, None)
    model = model or pruned["model"].iloc[0]
    written = write_tables(df, out_dir, model=model)
    for calibration, group in pruned.groupby("calibration", sort=True):
        for ratio in sorted(group["ratio"].unique()):
            fig = plot_grid_heatmap(df, model=model, calibration=calibration, ratio=ratio)
            written += save_figure(fig, f"grid_heatmap__{slug(model)}__{slug(calibration)}__{ratio:g}", out_dir)
        fig = plot_score_vs_ratio(df, model=model, calibration=calibration)
        written += save_figure(fig, f"score_vs_ratio__{slug(model)}__{slug(calibration)}", out_dir)
    for calibration, stats in (statistics or {}).items():
        stem = f"{slug(model)}__{slug(calibration)}"
        written += save_figure(plot_kept_overlap(stats, ratio=overlap_ratio), f"kept_overlap__{stem}", out_dir)
        written += save_figure(plot_rank_correlation(stats), f"rank_correlation__{stem}", out_dir)
        written += save_figure(plot_frequency_vs_norm(stats, ratio=overlap_ratio), f"frequency_vs_norm__{stem}", out_dir)
    return written
