"""Figures from result files and expert statistics, in one style, and `write_report`.

Figures (one style, `set_style`; saved as PNG and PDF by `save_figure`, with no timestamps
so the bytes are reproducible) are plain `matplotlib.figure.Figure` objects, never attached
to pyplot or a GUI backend (what the Agg backend does): nothing leaks between figures, and
a notebook shows one returned as a cell's value.
Every figure is drawn to be read when shown `TEXT_WIDTH_CM` (16 cm) wide: no text under
`MIN_POINTS` (9 pt) at that size, i.e. a figure W inches wide needs fonts of at least
9 * W / 6.3 pt (`min_font_size`). `save_figure` enforces it: text under the minimum is
enlarged before saving (`small_text` lists it; the tests check every figure function draws none).
- `plot_grid_heatmap`: the whole criterion grid as change from the unpruned model, accuracy
  and bits per byte side by side, rows (alpha, beta), columns b, one diverging scale per report.
- `plot_score_vs_ratio`: average score per criterion, one panel per fraction of experts removed, with standard errors.
- `plot_kept_overlap`: Jaccard overlap of the kept expert sets between criteria, per layer.
- `plot_rank_correlation`: Spearman correlation of criteria's expert scores within layers.
- `plot_frequency_vs_norm`: routing frequency (log) against mean activation norm, per expert,
  coloured by which of Frequency and MAN keeps it.
- `plot_damage_correlation`: criteria sorted by their Spearman correlation with measured
  damage (notebook 03), with bootstrap intervals over layers.
- `plot_rank_intervals`: average ranks with bootstrap intervals, per setting, models side by side.
- `plot_transfer`: each factor of the score between calibration domains, every pair (notebook 00, §7).
- `plot_moe_layer`: a diagram of one MoE layer for one token: router, top-k gates, experts, weighted sum (notebook 00, §1).
- `plot_damage_by_expert`: the measured damage of removing each expert, per layer and domain (notebook 03).
`text_overlaps` and `legend_overlaps_data` find texts drawn over each other and legends drawn over
data (`save_figure` warns of both; the tests require none of every figure function).
`write_report` writes every table (`moepaper.pipeline.tables`) and figure of one model.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.patches import FancyBboxPatch, Rectangle

from ..criteria import AIMER, CRITERIA, MONE, MONE_RANKING, WeightCriterion, criterion_grid, expert_scores, resolve_criteria
from ..project import check_writable
from ..pruning import select_experts
from ..statistics import ExpertStatistics
from .results import UNPRUNED, slug
from .tables import (
    AVERAGE,
    NEW_CRITERIA,
    _select,
    SETTING_ORDER,
    criterion_order,
    display_name,
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


# Readability: a figure is read at `TEXT_WIDTH_CM` wide (a page's text width, a slide) with no
# text under `MIN_POINTS` at that size. Figures are drawn `FIGURE_WIDTH` inches wide, the fonts
# of `set_style` are above the minimum for that width.
TEXT_WIDTH_CM = 16.0
MIN_POINTS = 9.0
FIGURE_WIDTH = 6.3  # inches: 16 cm
PAD_INCHES = 0.03  # around the tight bounding box of a saved figure

MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "*", "h", "p")


def set_style() -> None:
    """The one figure style of the package (seaborn whitegrid, colourblind palette, fonts >= 9.5 pt)."""
    import seaborn as sns

    sns.set_theme(context="paper", style="whitegrid", palette="colorblind",
                  rc={"figure.dpi": 110, "savefig.bbox": "tight", "savefig.pad_inches": PAD_INCHES,
                      "axes.titleweight": "bold", "legend.frameon": False,
                      "font.size": 10, "axes.titlesize": 10.5, "axes.labelsize": 10, "xtick.labelsize": 9.5,
                      "ytick.labelsize": 9.5, "legend.fontsize": 9.5, "legend.title_fontsize": 10,
                      "figure.titlesize": 11})


def min_font_size(width_inches: float) -> float:
    """Smallest font (pt) readable in a figure `width_inches` wide shown `TEXT_WIDTH_CM` wide."""
    return MIN_POINTS * width_inches / (TEXT_WIDTH_CM / 2.54)


def figure_width(fig) -> float:
    """Width (inches) of `fig` as `save_figure` writes it: its tight bounding box plus the padding."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    if not isinstance(fig.canvas, FigureCanvasAgg):  # a plain Figure: the canvas savefig would use
        FigureCanvasAgg(fig)
    fig.canvas.draw()  # lays the figure out (constrained layout) as saving does
    return fig.get_tightbbox(fig.canvas.get_renderer()).width + 2 * PAD_INCHES


def _texts(fig) -> list:
    from matplotlib.text import Text

    return [t for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip()]


def small_text(fig) -> list[tuple[str, float]]:
    """(text, font size) of every visible text of `fig` under `min_font_size(figure_width(fig))`."""
    least = min_font_size(figure_width(fig))
    return [(t.get_text(), t.get_fontsize()) for t in _texts(fig) if t.get_fontsize() < least - 1e-9]


def enforce_readable(fig) -> int:
    """Enlarge every text of `fig` under the readable minimum to it; the number of texts enlarged.

    Enlarging text can widen the figure (and so raise the minimum): repeated until none is small,
    at most 5 times (then a warning names the text still small).
    """
    changed = set()
    for _ in range(5):
        least = min_font_size(figure_width(fig))
        small = [t for t in _texts(fig) if t.get_fontsize() < least - 1e-9]
        if not small:
            return len(changed)
        for t in small:
            t.set_fontsize(least)
            changed.add(id(t))
    import warnings

    warnings.warn(f"enforce_readable: text still under {least:.1f} pt after enlarging it 5 times (the figure grows with it): "
                  f"{[t.get_text()[:30] for t in small][:5]}; draw it narrower", stacklevel=2)
    return len(changed)


def _renderer(fig):
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    if not isinstance(fig.canvas, FigureCanvasAgg):
        FigureCanvasAgg(fig)
    fig.canvas.draw()  # lays the figure out as saving does
    return fig.canvas.get_renderer()


def _drawn_texts(fig) -> list:
    """Every text a draw of `fig` puts on the page: titles, axis and tick labels (only ticks inside
    the view, only of axes that are on), legends, annotations; non-empty and visible."""
    from matplotlib.text import Text

    drawn, hidden = [], set()
    for ax in fig.get_axes():
        for axis in (ax.xaxis, ax.yaxis):
            lo, hi = sorted(axis.get_view_interval())
            tol = 1e-9 * max(abs(hi - lo), 1e-300)
            shown = ax.axison and axis.get_visible()
            if not shown:
                hidden.update({id(axis.label), id(axis.get_offset_text())})
            for tick in axis.get_major_ticks() + axis.get_minor_ticks():
                for label in (tick.label1, tick.label2):
                    hidden.add(id(label))  # decided here, not by the generic pass below
                    loc = tick.get_loc()
                    if (shown and tick.get_visible() and label.get_visible() and label.get_text().strip()
                            and loc is not None and lo - tol <= loc <= hi + tol):
                        drawn.append(label)
    drawn += [t for t in fig.findobj(Text) if id(t) not in hidden and t.get_visible() and t.get_text().strip()]
    return list({id(t): t for t in drawn}.values())


def _legends(fig) -> list:
    return list(fig.legends) + [ax.get_legend() for ax in fig.get_axes() if ax.get_legend() is not None] + [
        legend for sub in fig.subfigs for legend in sub.legends]


def text_overlaps(fig, *, tolerance: float = 1.0) -> list[tuple[str, str]]:
    """Pairs of texts of `fig` whose rendered bounding boxes overlap (by more than `tolerance` pixels
    both ways): titles, axis and tick labels, legend entries, annotations. Two entries of one legend
    (laid out by the legend itself) are not compared. Empty for a readable figure."""
    renderer = _renderer(fig)
    texts = _drawn_texts(fig)
    legend_of = {id(t): k for k, legend in enumerate(_legends(fig)) for t in [*legend.get_texts(), legend.get_title()]}
    boxes = [(t, t.get_window_extent(renderer)) for t in texts]
    boxes = [(t, b) for t, b in boxes if b.width > 0 and b.height > 0]
    pairs = []
    for i, (t, a) in enumerate(boxes):
        for u, b in boxes[i + 1:]:
            if id(t) in legend_of and legend_of.get(id(t)) == legend_of.get(id(u)):
                continue
            wide = min(a.x1, b.x1) - max(a.x0, b.x0)
            high = min(a.y1, b.y1) - max(a.y0, b.y0)
            if wide > tolerance and high > tolerance:
                pairs.append((t.get_text(), u.get_text()))
    return pairs


def legend_overlaps_data(fig) -> list[tuple[str, str]]:
    """(legend, axes title) for every legend of `fig` drawn over data of an axes: a marker, a scatter
    point or a bar. Lines without markers (reference lines, error bars) do not count."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Rectangle as Box

    renderer = _renderer(fig)
    found = []
    for legend in _legends(fig):
        box = legend.get_window_extent(renderer)
        name = legend.get_title().get_text() or ", ".join(t.get_text() for t in legend.get_texts()[:2])
        for ax in fig.get_axes():
            points = [ax.transData.transform(np.column_stack(line.get_data()).astype(float)) for line in ax.lines
                      if isinstance(line, Line2D) and line.get_visible() and line.get_marker() not in (None, "", "None", " ")]
            points += [c.get_offset_transform().transform(c.get_offsets()) for c in ax.collections
                       if c.get_visible() and len(c.get_offsets()) and type(c).__name__ == "PathCollection"]
            hit = any(((p[:, 0] > box.x0) & (p[:, 0] < box.x1) & (p[:, 1] > box.y0) & (p[:, 1] < box.y1)).any()
                      for p in points if len(p))
            hit = hit or any(patch.get_visible() and patch.get_height() != 0 and patch.get_window_extent(renderer).overlaps(box)
                             for patch in ax.patches if isinstance(patch, Box))
            if hit:
                found.append((name, ax.get_title()))
    return found


def criterion_color(name: str) -> str:
    if name in PALETTE:
        return PALETTE[name]
    import seaborn as sns

    grid = [c.name for c in criterion_grid()]
    colors = sns.color_palette("Greys", len(grid) + 4).as_hex()
    return colors[2 + grid.index(name)] if name in grid else "#999999"


def save_figure(fig, name: str, out_dir: str | Path) -> list[Path]:
    """Save `fig` as `name`.png (150 dpi) and `name`.pdf under `out_dir`, readable at 16 cm wide.

    Text under the readable minimum (`min_font_size` of the saved width) is enlarged first
    (`enforce_readable`), so no saved figure has text under 9 pt when shown 16 cm wide. Enlarging
    text can make it collide: a warning names any texts that overlap (`text_overlaps`) and any
    legend drawn over data (`legend_overlaps_data`).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    enforce_readable(fig)
    clashes = text_overlaps(fig) + [(f"legend {a!r}", f"data of {b!r}") for a, b in legend_overlaps_data(fig)]
    if clashes:
        import warnings

        warnings.warn(f"save_figure {name}: {len(clashes)} overlaps of text or legend: {clashes[:4]}", stacklevel=2)
    paths = [out_dir / f"{name}.png", out_dir / f"{name}.pdf"]
    fig.savefig(paths[0], dpi=150, bbox_inches="tight", pad_inches=PAD_INCHES)
    fig.savefig(paths[1], bbox_inches="tight", pad_inches=PAD_INCHES,
                metadata={"CreationDate": None, "ModDate": None})  # reproducible PDF bytes
    return paths


# ---------------------------------------------------------------- figures from results


def _lower_is_better(table: pd.DataFrame) -> list[str]:
    """Benchmarks of a results table that ran and whose lower score is better (bits per byte)."""
    info = table.attrs["info"]
    return [c for c in info.index if not info.loc[c, "higher_is_better"] and info.loc[c, "status"] == "ok"]


def grid_changes(df: pd.DataFrame, *, model: str | None = None, calibration: str, ratio: float,
                 benchmarks: Sequence[str] | None = None) -> pd.DataFrame:
    """Per criterion: change from the unpruned model of the mean accuracy and of the mean bits per byte.

    Columns "accuracy" (`AVERAGE` minus the unpruned `AVERAGE`, points) and "bits per byte"
    (mean over the lower-is-better benchmarks that ran, minus the unpruned mean; NaN when none ran).
    Raises ValueError when the unpruned model was not evaluated.
    """
    table = results_table(df, model=model, calibration=calibration, ratio=ratio, benchmarks=benchmarks)
    if UNPRUNED not in table.index:
        raise ValueError("grid_changes: the unpruned model was not evaluated; a change from it needs its scores")
    lower = _lower_is_better(table)
    bpb = table[lower].mean(axis=1, skipna=False) if lower else pd.Series(np.nan, index=table.index)
    changes = pd.DataFrame({"accuracy": table[AVERAGE] - table.loc[UNPRUNED, AVERAGE],
                            "bits per byte": bpb - bpb[UNPRUNED]}).drop(index=UNPRUNED)
    changes.attrs.update(table.attrs, lower=lower)
    return changes


def grid_limits(df: pd.DataFrame, *, model: str | None = None, benchmarks: Sequence[str] | None = None) -> dict[str, float]:
    """One colour limit per panel of `plot_grid_heatmap` over every (calibration, ratio) of `model`:
    the largest absolute change, so the heatmaps of one report share their scales."""
    pruned, _ = _select(df, model, None, None)
    limits = {"accuracy": 0.0, "bits per byte": 0.0}
    for (calibration, ratio), _group in pruned.groupby(["calibration", "ratio"], sort=True):
        changes = grid_changes(df, model=model, calibration=calibration, ratio=ratio, benchmarks=benchmarks)
        for column in limits:
            largest = changes[column].abs().max()
            if not pd.isna(largest):
                limits[column] = max(limits[column], float(largest))
    return {k: v if v > 0 else 1.0 for k, v in limits.items()}


def accuracy_stderr(df: pd.DataFrame, table: pd.DataFrame) -> pd.Series:
    """Standard error (points) of each row's `AVERAGE` in a results table, from the item counts.

    Each benchmark's accuracy p over n items has standard error sqrt(p (1 - p) / n); the mean of
    k benchmarks (independent items) has sqrt(sum of their squares) / k. NaN where n is unknown.
    """
    averaged = table.attrs["averaged"]
    model = table.attrs["model"]
    rows = df[(df["model"] == model) & df["benchmark"].isin(averaged) & (df["status"] == "ok")]
    out = {}
    for criterion in table.index:
        mine = rows[rows["criterion"] == criterion]
        if criterion != UNPRUNED:
            mine = mine[(mine["calibration"] == table.attrs["calibration"]) & np.isclose(mine["ratio"], table.attrs["ratio"])]
        n = mine.drop_duplicates("benchmark").set_index("benchmark")["n"].reindex(averaged).astype(float)
        p = table.loc[criterion, averaged].astype(float) / 100.0
        out[criterion] = 100.0 * float(np.sqrt((p * (1 - p) / n).sum(min_count=len(averaged)))) / len(averaged) if averaged else np.nan
    return pd.Series(out, dtype=float)


def _cell_name(name: str) -> str:
    return display_name(name) if name in CRITERIA else ""


def plot_grid_heatmap(df: pd.DataFrame, *, model: str | None = None, calibration: str, ratio: float,
                      benchmarks: Sequence[str] | None = None, limits: dict[str, float] | None = None):
    """The criterion grid as change from the unpruned model: accuracy and bits per byte side by side.

    Each panel: rows (alpha, beta), columns b; a cell is the criterion's mean over the
    benchmarks minus the unpruned model's (accuracy in points, higher is better; bits per byte,
    lower is better), on a diverging scale centred at 0 with red = worse in both panels.
    limits: panel -> colour limit (default `grid_limits`: the largest change over every
    (calibration, ratio) of the model, so all heatmaps of one report share their scales).
    The caption under the panels gives the standard error of a cell (`accuracy_stderr`) and MoNE's
    changes (outside the grid). Grid points not evaluated are blank; (1, 0, 0), constant for
    every routed expert, is hatched.
    """
    import seaborn as sns

    set_style()
    changes = grid_changes(df, model=model, calibration=calibration, ratio=ratio, benchmarks=benchmarks)
    limits = limits or grid_limits(df, model=model, benchmarks=benchmarks)
    table = results_table(df, model=model, calibration=calibration, ratio=ratio, benchmarks=benchmarks)
    pruned, _ = _select(df, model, calibration, ratio)
    points = pruned.dropna(subset=["b"]).drop_duplicates("criterion").set_index("criterion")[["b", "alpha", "beta"]]
    rows = [(a, be) for a in (0, 1, 2) for be in (0, 1, 2)]
    panels = [("accuracy", "Δ mean accuracy (points)", "RdBu", "{:+.1f}"),
              ("bits per byte", "Δ mean bits per byte", "RdBu_r", "{:+.3f}")]
    fig = Figure(figsize=(FIGURE_WIDTH, 6.2), layout="constrained")
    axes = fig.subplots(1, 2)
    for k, (ax, (column, label, cmap, fmt)) in enumerate(zip(axes, panels)):
        grid = np.full((len(rows), 2), np.nan)
        text = np.full((len(rows), 2), "", dtype=object)
        for name, (b, a, be) in points.iterrows():
            if name in changes.index and not pd.isna(changes.loc[name, column]):
                value = changes.loc[name, column]
                grid[rows.index((int(a), int(be))), int(b)] = value
                text[rows.index((int(a), int(be))), int(b)] = fmt.format(value) + (f"\n{_cell_name(name)}" if _cell_name(name) else "")
        limit = limits.get(column, 1.0)
        sns.heatmap(grid, annot=text, fmt="", cmap=cmap, vmin=-limit, vmax=limit, center=0, ax=ax, linewidths=0.5,
                    annot_kws={"fontsize": 9.5}, cbar_kws={"label": label, "orientation": "horizontal", "pad": 0.02},
                    xticklabels=["b=0", "b=1"], yticklabels=[f"({a},{be})" for a, be in rows] if k == 0 else False)
        ax.grid(False)
        ax.xaxis.tick_top()
        ax.tick_params(axis="y", labelrotation=0)
        const = rows.index((0, 0))
        ax.add_patch(Rectangle((1, const), 1, 1, facecolor="#e0e0e0", edgecolor="white", hatch="//"))
        ax.text(1.5, const + 0.5, "constant", ha="center", va="center", fontsize=9.5, color="#555555")
        ax.set_title(("accuracy" if column == "accuracy" else "bits per byte") + (" (higher is better)" if column == "accuracy" else " (lower is better)"))
        if k == 0:
            ax.set_ylabel("(α, β): gate exponent, activation-norm exponent")
    fig.suptitle(f"{table.attrs['model']}: change from unpruned, {short_calibration(calibration)}, {ratio:.0%} of experts removed")
    fig.supxlabel(grid_caption(df, table, changes), fontsize=9.5, ha="left", x=0.0, multialignment="left")
    return fig


def grid_caption(df: pd.DataFrame, table: pd.DataFrame, changes: pd.DataFrame) -> str:
    """The caption of a grid heatmap: what a cell is, its standard error, the unpruned scores, MoNE."""
    import textwrap

    info = table.attrs["info"]
    averaged, lower = table.attrs["averaged"], changes.attrs["lower"]
    n = df[df["benchmark"].isin(averaged) & (df["status"] == "ok")]["n"].dropna()
    items = f"n = {int(n.min())}" if len(n) and n.min() == n.max() else (f"n = {int(n.min())}-{int(n.max())}" if len(n) else "n unknown")
    se = accuracy_stderr(df, table).drop(index=UNPRUNED, errors="ignore").dropna()
    se_text = f"{se.min():.1f}-{se.max():.1f}" if len(se) and se.max() - se.min() >= 0.05 else (f"{se.iloc[0]:.1f}" if len(se) else "unknown")
    bpb_stderr = df[df["benchmark"].isin(lower)]["stderr"].dropna() if lower else pd.Series(dtype=float)
    bpb_n = df[df["benchmark"].isin(lower)]["n"].dropna() if lower else pd.Series(dtype=float)
    if not lower:
        bpb = "No bits-per-byte benchmark ran."
    elif len(bpb_stderr):
        bpb = f"Bits per byte: standard error from the records' stderr, about {float(pd.to_numeric(bpb_stderr).mean()):.3f} per benchmark."
    else:
        documents = f" over {int(bpb_n.max())} documents" if len(bpb_n) else ""
        kept = "items" in df and df[df["benchmark"].isin(lower)]["items"].notna().all()
        why = ("lm-eval reports none for bits per byte; the per-document values are in the records" if kept
               else "lm-eval reports none for bits per byte and these records keep no per-document values")
        bpb = (f"Bits per byte (mean of {', '.join(info.loc[b, 'label'] for b in lower)}): one value{documents} per benchmark, "
               f"no standard error ({why}).")
    unpruned = table.loc[UNPRUNED]
    base = f"Unpruned: accuracy {unpruned[AVERAGE]:.1f}" + (f", bits per byte {unpruned[lower].mean():.3f}" if lower else "") + "."
    mone = ""
    if MONE.name in changes.index:
        mone = f" MoNE (outside the grid): {changes.loc[MONE.name, 'accuracy']:+.1f} points" + (
            f", {changes.loc[MONE.name, 'bits per byte']:+.3f} bits per byte." if lower else ".")
    text = (f"Accuracy: mean of {', '.join(info.loc[b, 'label'] for b in averaged)} ({items} items each); standard error of a "
            f"cell's mean accuracy {se_text} points (sqrt(p(1-p)/n) per benchmark), of a change from unpruned at most "
            f"sqrt(2) times that. {bpb} {base}{mone}")
    return textwrap.fill(text, 84)


def plot_score_vs_ratio(df: pd.DataFrame, *, model: str | None = None, calibration: str,
                        criteria: Sequence[str] | None = None, benchmarks: Sequence[str] | None = None):
    """Average score of each criterion at each fraction of experts removed: one panel per ratio.

    A panel is one ratio exactly (no criteria spread along a ratio axis): a row per criterion, its
    mean accuracy (dot) and one standard error either side (`accuracy_stderr`, from each benchmark's
    item count); the unpruned model is the dashed line with its standard error shaded, in every
    panel. The panels share their score axis, so the drop from one ratio to the next reads across.
    """
    from matplotlib.ticker import MaxNLocator

    set_style()
    pruned, unpruned = _select(df, model, calibration, None)
    ratios = sorted(pruned["ratio"].unique())
    tables = {r: results_table(df, model=model, calibration=calibration, ratio=r, benchmarks=benchmarks) for r in ratios}
    frame = pd.DataFrame({r: t[AVERAGE] for r, t in tables.items()})  # (criterion, ratio)
    errors = pd.DataFrame({r: accuracy_stderr(df, t) for r, t in tables.items()}).reindex(frame.index)
    has_base = UNPRUNED in frame.index and frame.loc[UNPRUNED].notna().any()
    base = frame.loc[UNPRUNED].dropna().iloc[0] if has_base else None
    base_error = errors.loc[UNPRUNED].dropna().iloc[0] if has_base and errors.loc[UNPRUNED].notna().any() else np.nan
    names = [c for c in criterion_order(frame.index) if c != UNPRUNED]
    if criteria is None:
        criteria = [c for c in names if c in CRITERIA or c in (MONE.name, MONE_RANKING.name, AIMER.name)]
    criteria = [c for c in criteria if c in frame.index]
    fig = Figure(figsize=(FIGURE_WIDTH, 0.3 * len(criteria) + 1.9), layout="constrained")
    axes = fig.subplots(1, max(len(ratios), 1), sharex=True, sharey=True, squeeze=False)[0]
    y = {name: len(criteria) - 1 - k for k, name in enumerate(criteria)}  # the paper's order, top to bottom
    for ax, ratio in zip(axes, ratios):
        if base is not None:
            if not pd.isna(base_error):
                ax.axvspan(base - base_error, base + base_error, color=criterion_color(UNPRUNED), alpha=0.12, linewidth=0)
            ax.axvline(base, color=criterion_color(UNPRUNED), linestyle="--", linewidth=1.2)
        for k, name in enumerate(criteria):
            strong = name in NEW_CRITERIA
            ax.errorbar([frame.loc[name, ratio]], [y[name]], xerr=[errors.loc[name, ratio]], marker=MARKERS[k % len(MARKERS)],
                        markersize=7 if strong else 6, capsize=2.5, linestyle="none", color=criterion_color(name),
                        elinewidth=2.2 if strong else 1.3, markeredgecolor="black", markeredgewidth=0.5, zorder=3)
        ax.set_title(f"{ratio:.0%} of experts removed")
        ax.grid(axis="y", visible=False)
        ax.xaxis.set_major_locator(MaxNLocator(nbins=4))
    axes[0].set_yticks(list(y.values()), [display_name(c) for c in y])
    for label, name in zip(axes[0].get_yticklabels(), y):
        if name in NEW_CRITERIA:
            label.set_fontweight("bold")
    axes[0].set_ylim(-0.6, len(criteria) - 0.4)
    averaged = averages_of(df, model=model, calibration=calibration, ratio=ratios[0], benchmarks=benchmarks)
    unpruned_note = "" if base is None else (f"\ndashed: {display_name(UNPRUNED).lower()} model, {base:.1f}"
                                             + ("" if pd.isna(base_error) else f" ± {base_error:.1f} (shaded)"))
    # one caption under the panels, not a legend: a figure legend and a supxlabel are laid out on top of each other
    fig.supxlabel(f"mean accuracy (points) of {averaged}; bars: ±1 standard error{unpruned_note}", fontsize=10)
    fig.suptitle(f"{pruned['model'].iloc[0]}: {short_calibration(calibration)} calibration")
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
        ax.tick_params(labelsize=9)
        ax.grid(axis="y", visible=False)
    axes[0].set_yticks([y[c] for c in names], [display_name(c) for c in names])
    axes[0].set_ylim(-0.6, len(names) - 0.4)
    fig.supxlabel("average rank (1 = best)", fontsize=9.5)  # once: per-panel labels collide on narrow panels
    seen: dict[str, object] = {}  # every model's handle, whichever panel has it (a model may lack a setting)
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(label, handle)
    labels = [m for m in models if m in seen]
    handles = [seen[m] for m in labels]
    fig.legend(handles, labels, loc="outside upper center", ncol=max(len(labels), 1), fontsize=9,
               title=f"dot: mean rank; bar: {level:.0%} bootstrap interval", title_fontsize=9)
    return fig


def plot_rank_report(ranks: pd.DataFrame, *, setting: str = "task-agnostic", width_cm: float = PAGE_WIDTH_CM):
    """One setting of `tables.rank_report`: a panel per metric family (accuracy, bits per byte), the
    ratios' average ranks (dots) and intervals (bars) side by side on each criterion's row."""
    from .tables import METRIC_WORDS

    rows = ranks[ranks["setting"] == setting]
    if rows.empty:
        raise ValueError(f"no rows of setting {setting!r} (settings: {sorted(set(ranks['setting']))})")
    frame = rows.assign(model=[f"{r:.0%} removed" for r in rows["ratio"]],
                        setting=[METRIC_WORDS.get(m, m) for m in rows["metric"]])
    frame.attrs.update(ranks.attrs)
    ratios = [f"{r:.0%} removed" for r in sorted(rows["ratio"].unique())]
    metrics = [METRIC_WORDS.get(m, m) for m in dict.fromkeys(rows["metric"])]
    fig = plot_rank_intervals(frame, models=ratios, settings=metrics, width_cm=width_cm)
    legend = fig.legends[0]
    legend.set_title(f"{rows['model'].iloc[0]}, {setting}: {legend.get_title().get_text()}")
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
    """The mean over layers (annotated) on top; a row of chosen layers (colours only) below."""
    import seaborn as sns

    set_style()
    names = [display_name(_crit_name(c)) for c in _named(criteria)]
    positions = _layer_positions(stats, layers)
    fig = Figure(figsize=(FIGURE_WIDTH, 6.3 + 0.12 * len(names)), layout="constrained")
    top, bottom = fig.subfigures(2, 1, height_ratios=[1.9, 1.0])
    ax = top.subplots()
    ax.grid(False)
    mean = np.nanmean(values, axis=0)
    # ".68", "1", "~0", "-.1": a cell 9 criteria wide holds three characters at 9.5 pt, not "0.68" or
    # "-.12" (a row of negative values ran together): |v| < .05 is "~0", a negative value has one decimal
    cells = np.array([["" if np.isnan(v) else "1" if v >= 0.995 else "~0" if abs(v) < 0.05
                       else f"{v:.1f}".replace("0.", ".", 1) if v < 0 else f"{v:.2f}".replace("0.", ".", 1) for v in row]
                      for row in mean], dtype=object)
    sns.heatmap(mean, ax=ax, vmin=vmin, vmax=vmax, cmap=cmap, square=True, annot=cells if len(names) <= 10 else False,
                fmt="", annot_kws={"fontsize": 9.5}, xticklabels=names, yticklabels=names, cbar_kws={"shrink": 0.8})
    ax.tick_params(axis="x", labelrotation=90)
    ax.set_title("mean over all MoE layers")
    axes = bottom.subplots(1, len(positions), squeeze=False)[0]
    for k, (lax, p) in enumerate(zip(axes, positions)):
        lax.grid(False)
        sns.heatmap(values[p], ax=lax, vmin=vmin, vmax=vmax, cmap=cmap, square=True, cbar=False, xticklabels=False,
                    yticklabels=False)
        lax.set_title(f"layer {stats.layers[p]}")
    bottom.supxlabel("single layers, same colours and criterion order as above")
    fig.suptitle("\n".join(textwrap.wrap(title, 80)))  # a long model or calibration name wraps, within the width
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


def readable_log_axis(axis, *, most: int = 6) -> None:
    """Tick a log axis so a reader can read values off it: plain numbers ("0.05", "0.1", "0.2") at
    the densest of 1-1.5-2-3-4-5-6-8, 1-2-3-5, 1-2-5 and 1 steps per power of ten that puts at most
    `most` labels in view (a log axis of 0.05-0.2 otherwise shows one or two labels)."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, NullFormatter

    axis.axes.autoscale_view()  # the limits the data give, before the ticks are chosen for them
    lo, hi = sorted(v for v in axis.get_view_interval())
    if not (lo > 0 and hi > lo):
        return
    ticks = []
    for subs in ((1, 1.5, 2, 3, 4, 5, 6, 8), (1, 2, 3, 5), (1, 2, 5), (1,)):
        ticks = [s * 10.0**d for d in range(int(np.floor(np.log10(lo))), int(np.ceil(np.log10(hi))) + 1)
                 for s in subs if lo <= s * 10.0**d <= hi]
        if len(ticks) <= most:
            break
    if len(ticks) > most:  # many decades: every k-th power of ten
        ticks = ticks[:: int(np.ceil(len(ticks) / most))]
    axis.set_major_locator(FixedLocator(ticks))
    axis.set_minor_locator(LogLocator(base=10, subs=np.arange(2, 10) * 1.0, numticks=12))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())


KEPT_COLORS = {  # plot_frequency_vs_norm: which of Frequency and MAN keeps an expert (Okabe-Ito colours)
    "both kept": "#0072B2",
    "both pruned": "#999999",
    "kept only by MAN": "#D55E00",
    "kept only by Frequency": "#009E73",
}
KEPT_MARKERS = {"both kept": "o", "both pruned": "X", "kept only by MAN": "^", "kept only by Frequency": "s"}


def plot_frequency_vs_norm(stats: ExpertStatistics, *, ratio: float | None = 0.5):
    """Routing frequency (share of a layer's tokens routed to the expert, log axis) against mean activation norm (MAN).

    Each point is an expert of any MoE layer. With `ratio`, its colour and marker say which of
    Frequency and MAN keep it at that ratio (`KEPT_COLORS`); experts never routed are drawn at
    the axis' left edge. The title gives the mean within-layer Spearman correlation.
    """
    from scipy.stats import spearmanr

    set_style()
    frequency = (stats.count / stats.tokens.unsqueeze(-1).clamp(min=1)).numpy()  # (L, E)
    man = expert_scores(stats, "man").numpy()
    kept_f = kept_m = None
    if ratio is not None:
        kept_f = select_experts(expert_scores(stats, "frequency"), ratio=ratio)
        kept_m = select_experts(expert_scores(stats, "man"), ratio=ratio)
    rows = []
    for l in range(stats.num_layers):
        in_f = set(kept_f[l].tolist()) if kept_f is not None else set()
        in_m = set(kept_m[l].tolist()) if kept_m is not None else set()
        for j in range(stats.num_experts[l]):
            if ratio is None:
                kind = "expert"
            elif j in in_f and j in in_m:
                kind = "both kept"
            elif j in in_m:
                kind = "kept only by MAN"
            elif j in in_f:
                kind = "kept only by Frequency"
            else:
                kind = "both pruned"
            rows.append({"layer": stats.layers[l], "frequency": frequency[l, j], "MAN": man[l, j], "kind": kind})
    frame = pd.DataFrame(rows)
    positive = frame["frequency"][frame["frequency"] > 0]
    floor = positive.min() / 2 if len(positive) else 1e-6
    never = int((frame["frequency"] <= 0).sum())
    frame["shown"] = frame["frequency"].clip(lower=floor)
    fig = Figure(figsize=(FIGURE_WIDTH, 4.6), layout="constrained")
    ax = fig.subplots()
    kinds = list(KEPT_COLORS) if ratio is not None else ["expert"]
    for kind in kinds:
        part = frame[frame["kind"] == kind]
        ax.scatter(part["shown"], part["MAN"], s=30, color=KEPT_COLORS.get(kind, "#0072B2"), marker=KEPT_MARKERS.get(kind, "o"),
                   label=f"{kind} ({len(part)})", edgecolors="white", linewidths=0.4, alpha=0.9)
    ax.set_xscale("log")
    readable_log_axis(ax.xaxis)
    rhos = [spearmanr(frequency[l, : stats.num_experts[l]], man[l, : stats.num_experts[l]]).statistic for l in range(stats.num_layers)]
    ax.set_xlabel("routing frequency N_j / N (share of the layer's tokens, log scale)"
                  + (f"; {never} never routed, at the left edge" if never else ""))
    ax.set_ylabel("mean activation norm (MAN)")
    ax.set_title(_stats_title(stats, "routing frequency vs MAN") + f"\nmean within-layer Spearman ρ = {np.nanmean(rhos):.2f}"
                 + (f"; kept sets at {ratio:.0%} removed" if ratio is not None else ""))
    if ratio is not None:
        fig.legend(loc="outside lower center", ncol=2)
    return fig


def damage_intervals(correlations: pd.DataFrame, *, measure: str | None = None, level: float = 0.95,
                     resamples: int = 2000, seed: int = 0) -> pd.DataFrame:
    """Mean within-layer Spearman ρ of each criterion with measured damage, with a bootstrap interval.

    correlations: `moepaper.damage.damage_correlation` rows (columns criterion, measure, layer,
    rho), optionally with setting, calibration and evaluation columns. A unit is one
    (calibration, evaluation, layer) correlation; the interval is the percentile bootstrap of the
    mean over units (units resampled with replacement, `resamples` times, fixed `seed`).
    Returns one row per (measure, setting, criterion): mean, low, high, units.
    """
    frame = correlations if measure is None else correlations[correlations["measure"] == measure]
    frame = frame.assign(setting=frame["setting"] if "setting" in frame else "all").dropna(subset=["rho"])
    rng = np.random.default_rng(seed)
    rows = []
    tail = (1 - level) / 2
    for (m, setting, criterion), group in frame.groupby(["measure", "setting", "criterion"], sort=True):
        values = group["rho"].to_numpy(dtype=float)
        means = values[rng.integers(0, len(values), size=(resamples, len(values)))].mean(axis=1)
        rows.append({"measure": m, "setting": setting, "criterion": criterion, "mean": values.mean(),
                     "low": float(np.quantile(means, tail)), "high": float(np.quantile(means, 1 - tail)), "units": len(values)})
    return pd.DataFrame(rows)


def _point_label(name: str) -> str:
    point = next((c.point for c in criterion_grid() if c.name == name), None)
    shown = display_name(name) if name in CRITERIA or name == MONE.name else ""
    return f"{shown} {point}".strip() if point else (shown or name)


def plot_damage_correlation(correlations: pd.DataFrame, *, measure: str = "loss_change", title: str | None = None):
    """Criteria sorted by their mean within-layer Spearman ρ with the measured damage, one panel per setting.

    Dots: the mean over (calibration, evaluation, layer) units; bars: 95% percentile bootstrap
    interval over those units (`damage_intervals`). Criteria are sorted by their mean over the
    settings (best at the top); MAN and MSAN in their colours, other criteria grey.
    """
    set_style()
    intervals = damage_intervals(correlations, measure=measure)
    if intervals.empty:
        raise ValueError(f"plot_damage_correlation: no correlation with measure {measure!r}")
    settings = [s for s in ("matched", "mismatched", "mixed") if s in set(intervals["setting"])]
    settings += sorted(set(intervals["setting"]) - set(settings))
    order = intervals.groupby("criterion")["mean"].mean().sort_values().index.tolist()  # best last: drawn at the top
    fig = Figure(figsize=(FIGURE_WIDTH, 0.28 * len(order) + 1.6), layout="constrained")
    axes = fig.subplots(1, len(settings), sharey=True, squeeze=False)[0]
    y = {name: k for k, name in enumerate(order)}
    for ax, setting in zip(axes, settings):
        part = intervals[intervals["setting"] == setting]
        for _, row in part.iterrows():
            name = row["criterion"]
            color = PALETTE[name] if name in NEW_CRITERIA else ("#4d4d4d" if name in CRITERIA or name == MONE.name else "#9e9e9e")
            ax.plot([row["low"], row["high"]], [y[name]] * 2, color=color, linewidth=1.6)
            ax.plot([row["mean"]], [y[name]], marker="o", color=color, markersize=6)
        ax.axvline(0, color="#555555", linewidth=0.8)
        units = int(part["units"].max()) if len(part) else 0
        ax.set_title(f"{setting}\n({units} units)")
        ax.set_xlabel("Spearman ρ")
        ax.grid(axis="y", visible=False)
    axes[0].set_yticks(range(len(order)), [_point_label(n) for n in order])
    axes[0].set_ylim(-0.7, len(order) - 0.3)
    what = measure.replace("_", " ")
    fig.suptitle(title or f"criterion score vs measured damage ({what}):\nmean within-layer ρ, 95% bootstrap interval")
    return fig


TRANSFER_SHOWN = {  # plot_transfer: quantity of `moepaper.damage.transfer_factors` -> short name
    "routing frequency": "routing frequency",
    "mean gate S(1,1,0)": "mean gate",
    "MAN S(1,0,1)": "MAN",
    "MSAN S(1,0,2)": "MSAN",
    "S(0,2,2)/N": "S(0,2,2)/N",
}


def _pair(first: str, second: str) -> str:
    """A pair of calibration domains as `moepaper.damage.transfer_table` names it ("code vs math")."""
    return f"{first.split(':')[-1]} vs {second.split(':')[-1]}"


def plot_transfer(domain_stats, per_layer: pd.DataFrame | None = None, *, domains: Sequence[str] | None = None,
                  scattered: Sequence[str] = ("routing frequency", "mean gate S(1,1,0)", "MAN S(1,0,1)")):
    """Does each factor of the score rank experts alike on different calibration domains? (notebook 00, §7)

    Top: one panel per factor in `scattered`, every expert of every MoE layer at (its value on the
    first domain, its value on the second), the diagonal dashed; the title gives the mean
    within-layer Spearman ρ. Bottom: that ρ per layer for each quantity of `TRANSFER_SHOWN`, one
    panel per pair of domains (three domains: three panels).
    domain_stats: calibration source -> `ExpertStatistics`; `domains` (default: all of them, at least
    two) are compared, the first two in the scatter panels.
    per_layer: `moepaper.damage.transfer_table`'s per-layer ρ (computed here when None).
    """
    import seaborn as sns
    from matplotlib.ticker import MaxNLocator

    from ..damage import transfer_factors, transfer_table

    set_style()
    names = list(domains) if domains is not None else list(domain_stats)
    if len(names) < 2:
        raise ValueError(f"plot_transfer compares calibration domains: it needs at least two, got {names}")
    first, second = names[:2]
    pairs = [_pair(a, b) for i, a in enumerate(names) for b in names[i + 1:]]
    if per_layer is None:
        per_layer = transfer_table({name: domain_stats[name] for name in names})[1]
    missing = [p for p in pairs if p not in set(per_layer["pair"])]
    if missing:
        raise ValueError(f"per_layer holds no ρ of {missing} (pairs: {sorted(set(per_layer['pair']))})")
    stats = domain_stats[first]
    fa, fb = transfer_factors(stats), transfer_factors(domain_stats[second])
    scatter_rows = per_layer[per_layer["pair"] == pairs[0]]
    E = min(stats.num_experts)
    fig = Figure(figsize=(FIGURE_WIDTH, 6.6 + 1.9 * (len(pairs) - 1)), layout="constrained")
    top, bottom = fig.subfigures(2, 1, height_ratios=[1.2, 1.0 + 0.85 * (len(pairs) - 1)])
    axes = top.subplots(1, len(scattered))
    colors = sns.color_palette("crest", len(stats.layers))
    for ax, name in zip(np.atleast_1d(axes), scattered):
        a, b = fa[name][:, :E].numpy(), fb[name][:, :E].numpy()  # (L, E)
        for l in range(len(a)):
            ax.scatter(a[l], b[l], s=10, color=colors[l], label=f"layer {stats.layers[l]}", linewidths=0)
        both = np.concatenate([a.ravel(), b.ravel()])
        if name == "routing frequency" and (both > 0).any():  # frequencies span orders of magnitude
            low = both[both > 0].min() / 1.5
            ax.set(xscale="log", yscale="log", xlim=(low, both.max() * 1.5), ylim=(low, both.max() * 1.5))
            readable_log_axis(ax.xaxis, most=3)
            readable_log_axis(ax.yaxis, most=4)
            ends = [low, both.max() * 1.5]
        else:
            ends = [both.min(), both.max()]
            ax.xaxis.set_major_locator(MaxNLocator(nbins=3))
            ax.yaxis.set_major_locator(MaxNLocator(nbins=4))
        ax.plot(ends, ends, color="#999999", linestyle="--", linewidth=1)
        rho = scatter_rows[scatter_rows["quantity"] == name]["rho"].mean()
        ax.set_title(f"{TRANSFER_SHOWN.get(name, name)}\nρ = {rho:.2f}")
        ax.tick_params(axis="x", labelrotation=0)
    np.atleast_1d(axes)[0].set_ylabel(f"on {second.split(':')[-1]}")
    top.supxlabel(f"value on {first.split(':')[-1]} (each dot an expert; dashed: equal)", fontsize=10)
    handles, labels = np.atleast_1d(axes)[0].get_legend_handles_labels()
    top.legend(handles, labels, loc="outside right", markerscale=1.6, handletextpad=0.2)
    bar_axes = bottom.subplots(len(pairs), 1, sharex=True, sharey=True, squeeze=False)[:, 0]
    shown = per_layer[per_layer["pair"].isin(pairs) & per_layer["quantity"].isin(TRANSFER_SHOWN)]
    quantities = [q for q in TRANSFER_SHOWN if q in set(shown["quantity"])]
    layers = sorted(shown["layer"].unique())
    width = 0.8 / max(len(quantities), 1)
    palette = sns.color_palette("colorblind", len(quantities))
    for ax, pair in zip(bar_axes, pairs):
        bars = shown[shown["pair"] == pair]
        for k, quantity in enumerate(quantities):
            part = bars[bars["quantity"] == quantity].set_index("layer").reindex(layers)
            ax.bar(np.arange(len(layers)) + (k - (len(quantities) - 1) / 2) * width, part["rho"], width=width, color=palette[k],
                   label=TRANSFER_SHOWN[quantity], linewidth=0)
        ax.axhline(0, color="#555555", linewidth=0.8)
        ax.set_ylabel("Spearman ρ")
        ax.grid(axis="x", visible=False)
        ax.set_title(f"{pair}: does the ranking of experts transfer?" if len(pairs) > 1
                     else "does the ranking of experts transfer? (per layer)")
    bar_axes[-1].set_xticks(range(len(layers)), [str(l) for l in layers])
    bar_axes[-1].set_xlabel("MoE layer")
    bar_axes[-1].set_ylim(min(-0.1, float(shown["rho"].min()) - 0.05) if len(shown) else -0.1, 1.05)
    if len(pairs) == 1:
        bar_axes[0].set_ylabel(f"Spearman ρ, {pairs[0]}")
    bottom.legend(*bar_axes[0].get_legend_handles_labels(), loc="outside right", handlelength=1.0)
    model = Path(stats.metadata.get("model_name") or "").name
    what = f"two calibration domains ({pairs[0]})" if len(pairs) == 1 else f"{len(names)} calibration domains"
    fig.suptitle(f"{model + ': ' if model else ''}the score's factors on {what}")
    return fig


def _moe_rows(num_experts: int, chosen: list[int], shown: int) -> list[tuple[str, int, int]]:
    """Rows of `plot_moe_layer`: ("expert", j, 0) for each expert drawn, then ("more", n, m) when n
    further experts (m of them chosen) are summarised in one row."""
    if num_experts <= shown:
        return [("expert", j, 0) for j in range(num_experts)]
    drawn = shown - 1
    rest = num_experts - drawn
    return [("expert", j, 0) for j in range(drawn)] + [("more", rest, sum(j >= drawn for j in chosen))]


def plot_moe_layer(num_experts: int = 8, top_k: int = 2, *, chosen: Sequence[int] | None = None,
                   gates: Sequence[float] | None = None, shown: int = 8):
    """A diagram of one MoE layer for one token (notebook 00, §1): token → router → top-k gates →
    experts → gate-weighted sum.

    The router scores all `num_experts` experts and keeps `top_k`; the chosen experts (coloured)
    compute their outputs f_i, each weighted by its gate g_i on its way to the sum y = Σ g_i f_i; the
    others (grey) are not computed for this token but stay stored. At most `shown` rows of experts
    are drawn: with more experts, the last row stands for the rest ("⋮ n more, m of them chosen").
    chosen: the top-k experts of the token (default: spread over the drawn rows); gates: their
    gates, in the order of `chosen` (default: decreasing, summing to 1; illustrative values).
    """
    set_style()
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must lie in 1..num_experts={num_experts}, got {top_k}")
    if shown < 3:
        raise ValueError(f"shown must be at least 3 rows, got {shown}")
    drawn = num_experts if num_experts <= shown else shown - 1
    if chosen is None:
        # summarising (more experts than rows): a few of the drawn experts chosen, the rest of the top-k among the summarised
        visible = min(top_k, max(1, drawn // 3)) if num_experts > shown else top_k
        picked = [int((i + 0.5) * drawn / visible) for i in range(visible)]
        rest = [j for j in range(drawn, num_experts)][: top_k - visible]  # the chosen that are not drawn
        chosen = picked + rest
    chosen = [int(j) for j in chosen]
    if len(chosen) != top_k or len(set(chosen)) != top_k or not all(0 <= j < num_experts for j in chosen):
        raise ValueError(f"chosen must be {top_k} distinct experts of 0..{num_experts - 1}, got {chosen}")
    if gates is None:
        weights = 0.75 ** np.arange(top_k)
        gates = list(weights / weights.sum())
    gates = [float(g) for g in gates]
    if len(gates) != top_k:
        raise ValueError(f"gates must give one gate per chosen expert ({top_k}), got {len(gates)}")
    gate_of = dict(zip(chosen, gates))
    rows = _moe_rows(num_experts, chosen, shown)
    n = len(rows)
    fig = Figure(figsize=(FIGURE_WIDTH, 0.36 * n + 1.5), layout="constrained")
    ax = fig.subplots()
    ax.set_xlim(0, 10)
    ax.set_ylim(-1.3, n + 0.1)
    ax.axis("off")
    on, off, edge = "#cfe2f3", "#f0f0f0", "#0173b2"
    ys = [n - 0.5 - r for r in range(n)]  # row centres, top to bottom
    middle = (ys[0] + ys[-1]) / 2

    def box(x0, x1, y, text, *, fill="white", color="#222222", line=edge, height=0.7, **kw):
        ax.add_patch(FancyBboxPatch((x0, y - height / 2), x1 - x0, height, boxstyle="round,pad=0,rounding_size=0.12",
                                    facecolor=fill, edgecolor=line, linewidth=1.0))
        ax.text((x0 + x1) / 2, y, text, ha="center", va="center", color=color, fontsize=10, **kw)

    def arrow(x0, y0, x1, y1, color="#444444"):
        ax.annotate("", xy=(x1, y1), xytext=(x0, y0), arrowprops=dict(arrowstyle="-|>", color=color, linewidth=1.0,
                                                                       shrinkA=0, shrinkB=0))

    box(0.05, 1.35, middle, "token\n$x_t$", height=1.2)
    box(2.0, 4.05, middle, f"router\nscores all {num_experts},\nkeeps top-{top_k}", height=1.9)
    arrow(1.35, middle, 2.0, middle)
    for (kind, value, more_chosen), y in zip(rows, ys):
        if kind == "more":
            label = f"⋮ {value} more" + (f" ({more_chosen} chosen)" if more_chosen else "")
            ax.text(5.6, y, label, ha="center", va="center", fontsize=10, color="#555555")
            continue
        j = value
        if j in gate_of:
            box(4.8, 6.4, y, f"expert {j}", fill=on)
            arrow(4.05, middle, 4.8, y, color=edge)
            arrow(6.4, y, 7.85, middle, color=edge)
            above = y >= middle  # the label on the side of the arrow away from the sum, never crossed by it
            ax.text(6.5, y + (0.12 if above else -0.12), f"× {gate_of[j]:.2f}", ha="left", va="bottom" if above else "top",
                    fontsize=10, color=edge)
        else:
            box(4.8, 6.4, y, f"expert {j}", fill=off, color="#999999", line="#bbbbbb")
    box(7.85, 8.75, middle, "Σ", height=0.9, fontweight="bold")
    box(9.25, 9.95, middle, "$y_t$", height=0.9)
    arrow(8.75, middle, 9.25, middle)
    ax.text(5.0, -0.45, "blue: chosen, output f computed and weighted by its gate g (× g)",
            ha="center", va="center", fontsize=10, color=edge)
    ax.text(5.0, -1.0, "grey: not chosen for this token, not computed (still stored)",
            ha="center", va="center", fontsize=10, color="#777777")
    fig.suptitle(f"one token through one MoE layer: top-{top_k} of {num_experts} experts, $y_t = \\Sigma_i\\, g_i f_i$")
    return fig


def plot_damage_by_expert(frame: pd.DataFrame, *, measure: str = "loss_change", label_every: int = 8):
    """The measured damage of removing each expert alone (notebook 03): one row per layer, the
    evaluation domains' bars side by side per expert, every `label_every`-th expert labelled.

    frame: `ExpertDamage.to_frame()` rows with an ``evaluation`` column (one frame per domain, concatenated).
    """
    import seaborn as sns
    from matplotlib.ticker import MaxNLocator

    set_style()
    layers = sorted(frame["layer"].unique())
    domains = list(dict.fromkeys(frame["evaluation"])) if "evaluation" in frame else [None]
    E = int(frame["expert"].max()) + 1
    fig = Figure(figsize=(FIGURE_WIDTH, 1.3 * len(layers) + 1.3), layout="constrained")
    axes = fig.subplots(len(layers), 1, sharex=True, squeeze=False)[:, 0]
    width = 0.85 / len(domains)
    palette = sns.color_palette("colorblind", len(domains))
    for ax, layer in zip(axes, layers):
        part = frame[frame["layer"] == layer]
        for k, domain in enumerate(domains):
            rows = (part if domain is None else part[part["evaluation"] == domain]).sort_values("expert")
            ax.bar(rows["expert"] + (k - (len(domains) - 1) / 2) * width, rows[measure], width=width, color=palette[k],
                   label=domain, linewidth=0)
        ax.axhline(0, color="#555555", linewidth=0.6)
        ax.set_ylabel(f"layer {layer}")
        ax.yaxis.set_major_locator(MaxNLocator(nbins=3))
        ax.grid(axis="x", visible=False)
    axes[-1].set_xticks(range(0, E, label_every))
    axes[-1].set_xlim(-0.7, E - 0.3)
    axes[-1].set_xlabel(f"expert (index within its layer; every {label_every}th labelled)" if E > label_every else "expert")
    what = {"loss_change": "loss change (nats/token)", "output_sq": "mean ||Δy||²",
            "relative_output_sq": "output error / ||y||²"}.get(measure, measure.replace("_", " "))
    fig.supylabel(what, fontsize=10)
    fig.suptitle("damage of removing one expert, by evaluation domain")
    if domains != [None]:
        handles, labels = axes[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside lower center", ncol=len(domains), title="evaluation domain")
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
    frequency vs MAN). Figures from results: the grid heatmap per (calibration, ratio), as change
    from the unpruned model on one colour scale for all of them (none without unpruned scores),
    and score vs ratio per calibration. `out_dir` is checked for writing before any figure is drawn.
    """
    check_writable(out_dir)
    pruned, unpruned = _select(df, model, None, None)
    model = model or pruned["model"].iloc[0]
    written = write_tables(df, out_dir, model=model)
    limits = grid_limits(df, model=model) if not unpruned.empty else None  # one colour scale for every heatmap
    for calibration, group in pruned.groupby("calibration", sort=True):
        for ratio in sorted(group["ratio"].unique()):
            if limits is None:  # no unpruned scores: no change from them to draw
                continue
            fig = plot_grid_heatmap(df, model=model, calibration=calibration, ratio=ratio, limits=limits)
            written += save_figure(fig, f"grid_heatmap__{slug(model)}__{slug(calibration)}__{ratio:g}", out_dir)
        fig = plot_score_vs_ratio(df, model=model, calibration=calibration)
        written += save_figure(fig, f"score_vs_ratio__{slug(model)}__{slug(calibration)}", out_dir)
    for calibration, stats in (statistics or {}).items():
        stem = f"{slug(model)}__{slug(calibration)}"
        written += save_figure(plot_kept_overlap(stats, ratio=overlap_ratio), f"kept_overlap__{stem}", out_dir)
        written += save_figure(plot_rank_correlation(stats), f"rank_correlation__{stem}", out_dir)
        written += save_figure(plot_frequency_vs_norm(stats, ratio=overlap_ratio), f"frequency_vs_norm__{stem}", out_dir)
    return written
