"""Figures from result files and expert statistics, in one style, and `write_report`.

Figures (one style, `set_style`; saved as PNG and PDF by `save_figure`, with no timestamps
so the bytes are reproducible) are plain `matplotlib.figure.Figure` objects, never attached
to pyplot or a GUI backend (what the Agg backend does): nothing leaks between figures, and
a notebook shows one returned as a cell's value.
- `plot_grid_heatmap`: the whole criterion grid, rows b, columns (alpha, beta).
- `plot_score_vs_ratio`: average score against the fraction of experts removed.
- `plot_kept_overlap`: Jaccard overlap of the kept expert sets between criteria, per layer.
- `plot_rank_correlation`: Spearman correlation of criteria's expert scores within layers.
- `plot_frequency_vs_norm`: routing frequency against mean activation norm, per expert.
- `plot_rank_intervals`: average ranks with bootstrap intervals, per setting, models side by side.
`write_report` writes every table (`moepaper.pipeline.tables`) and figure of one model.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from ..criteria import AIMER, CRITERIA, MONE, MONE_RANKING, WeightCriterion, criterion_grid, expert_scores, resolve_criteria
from ..project import check_writable
from ..pruning import select_experts
from ..statistics import ExpertStatistics
from .results import UNPRUNED, slug
from .tables import (
    AVERAGE,
    AVERAGE_RANK,
    NEW_CRITERIA,
    _select,
    SETTING_ORDER,
    criterion_order,
    display_name,
    rank_table,
    results_table,
    write_tables,
)


# ---------------------------------------------------------------- figure style


PALETTE = {
    UNPRUNED: "#4d4d4d",
    "frequency": "#8da0cb",
    "seer": "#66c2a5",
    "ean": "#a6d854",
    "reap": "#e78ac3",
    "gated_ean": "#e5c494",
    "gated_squared": "#b3b3b3",
    MONE.name: "#ffd92f",
    MONE_RANKING.name: "#fc8d62",
    AIMER.name: "#17becf",
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


def save_figure(fig, name: str, out_dir: str | Path) -> list[Path]:
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
        criteria = [c for c in names if c in CRITERIA or c in (MONE.name, MONE_RANKING.name, AIMER.name)]
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


MODEL_STYLES = (("#0173b2", "o"), ("#de8f05", "s"), ("#029e73", "D"), ("#cc78bc", "^"))
PAGE_WIDTH_CM = 16.0  # the text width a figure is drawn for: fonts are >= 9 pt at this width


def plot_rank_intervals(boot: pd.DataFrame, *, models: Sequence[str] | None = None, settings: Sequence[str] | None = None,
                        criteria: Sequence[str] | None = None, width_cm: float = PAGE_WIDTH_CM):
    """Average rank (dot) and its bootstrap interval (bar) per criterion, one panel per setting,
    the models' estimates side by side on each criterion's row (`bootstrap_average_ranks` output).

    Drawn `width_cm` wide (default 16 cm, the text width; every font >= 9 pt there); rank 1 =
    best is at the left. models / settings / criteria: which to show and in what order
    (default: all, models in the order of `boot`, criteria in the paper's order).
    """
    set_style()
    models = list(models) if models is not None else list(dict.fromkeys(boot["model"]))
    present = set(boot["setting"])
    settings = list(settings) if settings is not None else sorted(
        present, key=lambda s: (SETTING_ORDER.index(s) if s in SETTING_ORDER else len(SETTING_ORDER), s))
    names = list(criteria) if criteria is not None else criterion_order(boot["criterion"].unique())
    if boot.empty or not settings or not names:
        raise ValueError("nothing to draw: no bootstrap rows for these models, settings and criteria")
    width = width_cm / 2.54 - 0.2  # save_figure's tight bounding box adds 0.1 inch on each side
    fig = Figure(figsize=(width, 0.28 * len(names) + 1.3), layout="constrained")
    axes = fig.subplots(1, len(settings), sharey=True, squeeze=False)[0]
    y = {name: len(names) - 1 - k for k, name in enumerate(names)}
    step = 0.6 / max(len(models), 1)
    level = boot.attrs.get("level", 0.9)
    for ax, setting in zip(axes, settings):
        rows = boot[boot["setting"] == setting]
        for k, model in enumerate(models):
            color, marker = MODEL_STYLES[k % len(MODEL_STYLES)]
            part = rows[(rows["model"] == model) & rows["criterion"].isin(names)]
            if part.empty:
                continue
            ys = np.array([y[c] for c in part["criterion"]]) + (len(models) - 1) / 2 * step - k * step
            # the bar spans [low, high] as computed, even where a rank near 1 or last lies outside it
            ax.hlines(ys, part["low"].to_numpy(), part["high"].to_numpy(), color=color, linewidth=1.4)
            ax.plot(part["mean_rank"].to_numpy(), ys, marker, color=color, markersize=4.5, label=model)
        top = int(rows["n_criteria"].max()) if not rows.empty else len(names)
        ax.set_xlim(0.5, top + 0.5)
        ax.set_xticks(range(1, top + 1, 1 if top <= 10 else 2))
        ax.set_title(setting, fontsize=10)
        ax.set_xlabel("average rank (1 = best)", fontsize=9.5)
        ax.tick_params(labelsize=9)
        ax.grid(axis="y", visible=False)
    axes[0].set_yticks([y[c] for c in names], [display_name(c) for c in names])
    axes[0].set_ylim(-0.6, len(names) - 0.4)
    handles, labels = axes[0].get_legend_handles_labels()
    if not handles:
        for ax in axes[1:]:
            handles, labels = ax.get_legend_handles_labels()
            if handles:
                break
    fig.legend(handles, labels, loc="outside upper center", ncol=len(models), fontsize=9,
               title=f"dot: mean rank; bar: {level:.0%} bootstrap interval", title_fontsize=9)
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
    """The criteria to compare from statistics alone; by default the named ones that need no model
    (AIMER scores weights) and with one MoNE (its ranking-only variant has the same scores)."""
    if criteria is not None:
        return resolve_criteria(criteria)
    return [c for c in resolve_criteria("named") if not isinstance(c, WeightCriterion) and c is not MONE_RANKING]


def _crit_name(c) -> str:
    return c if isinstance(c, str) else c.name


def kept_overlap(stats: ExpertStatistics, criteria=None, *, ratio: float = 0.5) -> np.ndarray:
    """Jaccard overlap of kept expert sets, [layers, criteria, criteria]."""
    criteria = _named(criteria)
    kept = [select_experts(expert_scores(stats, c), ratio=ratio) for c in criteria]
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
    scores = [expert_scores(stats, c) for c in criteria]
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

    set_style()
    frequency = (stats.count / stats.tokens.unsqueeze(-1).clamp(min=1)).numpy()  # (L, E)
    man = expert_scores(stats, "man").numpy()
    rows = []
    kept_f = kept_m = None
    if ratio is not None:
        kept_f = select_experts(expert_scores(stats, "frequency"), ratio=ratio)
        kept_m = select_experts(expert_scores(stats, "man"), ratio=ratio)
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
    statistics: dict[str, ExpertStatistics] | None,
    out_dir: str | Path,
    *,
    model: str | None = None,
    overlap_ratio: float = 0.5,
) -> list[Path]:
    """Every table and figure of one model under `out_dir`.

    df: `load_results` output. statistics: calibration name -> its `ExpertStatistics`
    (figures from statistics: kept-set overlap at `overlap_ratio`, rank correlation,
    frequency vs MAN). Figures from results: the grid heatmap per (calibration, ratio)
    and score vs ratio per calibration. `out_dir` is checked for writing before any figure is drawn.
    """
    check_writable(out_dir)
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
