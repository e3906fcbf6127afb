"""No figure draws text over text or a legend over data, once saved (fonts enlarged to 9 pt at 16 cm).

Every figure function of `moepaper.pipeline.figures` is drawn on small synthetic data shaped like the
embedded model's (4 layers x 64 experts, 11 named criteria, two ratios) and saved with `save_figure`;
the rendered bounding boxes of titles, axis and tick labels, legends and annotations must not overlap
(`text_overlaps`), and no legend may cover a marker, scatter point or bar (`legend_overlaps_data`).
The last test draws the layout notebook 00's transfer figure had before (`figures/00_transfer__*.png`
with overlapping titles and legends) and checks that the same test catches it.
"""

import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.figure import Figure

from moepaper import ExpertStatistics
from moepaper.criteria import AIMER, CRITERIA, MONE, MONE_RANKING, criterion_grid
from moepaper.damage import transfer_factors, transfer_table
from moepaper.pipeline.figures import (
    enforce_readable,
    legend_overlaps_data,
    plot_damage_by_expert,
    plot_damage_correlation,
    plot_frequency_vs_norm,
    plot_grid_heatmap,
    plot_kept_overlap,
    plot_moe_layer,
    plot_rank_correlation,
    plot_rank_intervals,
    plot_rank_report,
    plot_score_vs_ratio,
    plot_transfer,
    save_figure,
    text_overlaps,
)
from moepaper.pipeline.results import UNPRUNED, result_path, write_json_atomic
from moepaper.pipeline.tables import load_results

LAYERS, EXPERTS, TOP_K = 4, 64, 8
NAMED = [*CRITERIA, MONE.name, MONE_RANKING.name, AIMER.name]
# benchmark -> (label, metric, higher is better): the local suite's shape, long labels included
BENCHMARKS = {"literature_mc": ("Literature acc", "acc,none", True), "code_mc": ("Code acc", "acc,none", True),
              "math_mc": ("Math acc", "acc,none", True), "literature_bpb": ("Literature bits/byte", "bits_per_byte,none", False)}


def _statistics(seed: int, name: str = "toy") -> ExpertStatistics:
    """Statistics of 4 layers x 64 experts with balanced routing (shares 0.6/E to 1.6/E) and random strengths."""
    rng = np.random.default_rng(seed)
    tokens = 40_000.0
    count = rng.uniform(0.6, 1.6, (LAYERS, EXPERTS))
    count = count / count.sum(axis=1, keepdims=True) * tokens * TOP_K  # (L, E): top-8 routing of every token
    gate, norm = rng.uniform(0.05, 0.3, (LAYERS, EXPERTS)), rng.uniform(5, 50, (LAYERS, EXPERTS))
    moments = np.zeros((LAYERS, 3, 3, EXPERTS))
    for a in range(3):
        for c in range(3):
            moments[:, a, c] = count * gate**a * norm**c
    return ExpertStatistics(layers=list(range(LAYERS)), num_experts=[EXPERTS] * LAYERS, top_k=[TOP_K] * LAYERS,
                            moments=torch.tensor(moments), output_sum=torch.zeros(LAYERS, EXPERTS, 1, dtype=torch.float64),
                            tokens=torch.full((LAYERS,), tokens, dtype=torch.float64),
                            metadata={"model_name": name, "calibration": "toy:mixed"})


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("results")
    rng = np.random.default_rng(0)
    for criterion in [UNPRUNED, *NAMED]:
        for ratio in ((0.0,) if criterion == UNPRUNED else (0.25, 0.5)):
            c = CRITERIA.get(criterion)
            for name, (label, metric, higher) in BENCHMARKS.items():
                value = (0.6 - ratio * rng.uniform(0.1, 0.4)) if higher else (1.0 + ratio * rng.uniform(0.1, 0.5))
                record = {
                    "model": "toy", "calibration": "none" if criterion == UNPRUNED else "toy:mixed",
                    "setting": None if criterion == UNPRUNED else "all-domain", "criterion": criterion,
                    "b": c and c.b, "alpha": c and c.alpha, "beta": c and c.beta, "ratio": ratio, "benchmark": name,
                    "label": label, "task": name, "metric": metric, "value": value, "stderr": None,
                    "higher_is_better": higher, "n": 240, "status": "ok", "note": "", "suite": "toy",
                    "evaluation": {"limit": None}, "domain": name.split("_")[0], "provenance": {"date": "2026-01-01T00:00:00+00:00"},
                }
                write_json_atomic(result_path(out, "toy", record["calibration"], criterion, round(ratio * 8), name), record)
    return load_results(out)


@pytest.fixture(scope="module")
def stats():
    return _statistics(0)


def _damage_frame() -> pd.DataFrame:
    rng = np.random.default_rng(1)
    return pd.DataFrame([{"layer": l, "expert": j, "evaluation": domain, "loss_change": rng.gamma(0.8, 0.004) - 0.001,
                          "output_sq": rng.gamma(1.0, 0.1)}
                         for domain in ("code", "literature") for l in range(LAYERS) for j in range(EXPERTS)])


def _correlations() -> pd.DataFrame:
    rng = np.random.default_rng(2)
    rows = []
    for setting in ("matched", "mismatched", "mixed"):
        for criterion in [c.name for c in criterion_grid()] + [MONE.name]:
            for layer in range(LAYERS):
                rows.append({"criterion": criterion, "measure": "loss_change", "layer": layer, "setting": setting,
                             "calibration": "c", "evaluation": "e", "rho": rng.uniform(-0.3, 0.8)})
    return pd.DataFrame(rows)


def _boot(models=("embedded", "embedded-16e"), settings=("task-agnostic", "task-specific", "all-domain")) -> pd.DataFrame:
    rng = np.random.default_rng(3)
    rows = []
    for model in models:
        for setting in settings:
            for criterion in NAMED:
                mean = rng.uniform(2, 10)
                rows.append({"model": model, "setting": setting, "criterion": criterion, "mean_rank": mean,
                             "low": mean - rng.uniform(0.2, 2), "high": mean + rng.uniform(0.2, 2), "n_criteria": len(NAMED)})
    frame = pd.DataFrame(rows)
    frame.attrs["level"] = 0.9
    return frame


def _rank_report() -> pd.DataFrame:
    parts = []
    for ratio in (0.25, 0.5):
        for metric in ("accuracy", "bits_per_byte"):
            part = _boot(models=("embedded",), settings=("task-agnostic",)).assign(ratio=ratio, metric=metric)
            parts.append(part)
    frame = pd.concat(parts, ignore_index=True)
    frame.attrs["level"] = 0.9
    return frame


def _figures(results, stats):
    domain_stats = {"toy:code": _statistics(4), "toy:literature": _statistics(5)}
    three_domains = {"toy:code": _statistics(4), "toy:math": _statistics(6), "toy:literature": _statistics(5)}
    return {
        "grid_heatmap": lambda: plot_grid_heatmap(results, calibration="toy:mixed", ratio=0.25),
        "score_vs_ratio": lambda: plot_score_vs_ratio(results, calibration="toy:mixed"),
        "kept_overlap": lambda: plot_kept_overlap(stats, ratio=0.5),
        "rank_correlation": lambda: plot_rank_correlation(stats),
        "frequency_vs_norm": lambda: plot_frequency_vs_norm(stats, ratio=0.5),
        "damage_correlation": lambda: plot_damage_correlation(_correlations()),
        "rank_intervals": lambda: plot_rank_intervals(_boot()),
        "rank_report": lambda: plot_rank_report(_rank_report()),
        "transfer": lambda: plot_transfer(domain_stats, transfer_table(domain_stats)[1]),
        "transfer_three_domains": lambda: plot_transfer(three_domains, transfer_table(three_domains)[1]),
        "moe_layer": lambda: plot_moe_layer(num_experts=8, top_k=2),
        "moe_layer_summarised": lambda: plot_moe_layer(num_experts=EXPERTS, top_k=TOP_K),
        "damage_by_expert": lambda: plot_damage_by_expert(_damage_frame()),
    }


FIGURES = ["grid_heatmap", "score_vs_ratio", "kept_overlap", "rank_correlation", "frequency_vs_norm", "damage_correlation",
           "rank_intervals", "rank_report", "transfer", "transfer_three_domains", "moe_layer", "moe_layer_summarised",
           "damage_by_expert"]


@pytest.mark.parametrize("name", FIGURES)
def test_saved_figure_has_no_overlapping_text_and_no_legend_over_data(name, results, stats, tmp_path):
    fig = _figures(results, stats)[name]()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        save_figure(fig, name, tmp_path)  # enlarges text to 9 pt at 16 cm first, as every saved figure
    # save_figure warns of overlaps, enforce_readable of text it could not make readable
    assert [str(w.message) for w in caught if str(w.message).startswith(("save_figure", "enforce_readable"))] == []
    assert text_overlaps(fig) == [], name
    assert legend_overlaps_data(fig) == [], name


def test_score_vs_ratio_draws_each_ratio_at_its_exact_position(results):
    fig = plot_score_vs_ratio(results, calibration="toy:mixed")
    assert [ax.get_title() for ax in fig.axes] == ["25% of experts removed", "50% of experts removed"]
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert labels[0] == "Frequency" and "MAN" in labels and len(labels) == len(NAMED)


def test_log_axes_carry_several_readable_labels(stats):
    fig = plot_frequency_vs_norm(stats, ratio=0.5)
    fig.canvas.draw() if hasattr(fig.canvas, "draw") else None
    ax = fig.axes[0]
    lo, hi = ax.get_xlim()
    shown = [t.get_text() for t, loc in zip(ax.get_xticklabels(), ax.get_xticks()) if lo <= loc <= hi and t.get_text()]
    assert len(shown) >= 3, shown  # 0.08-0.2 spans half a decade: 0.08, 0.1, 0.2 at least
    assert all(not label.startswith("$") for label in shown), shown  # plain numbers, not 10^{-1}


def test_damage_by_expert_labels_every_eighth_expert():
    fig = plot_damage_by_expert(_damage_frame())
    bottom = fig.axes[LAYERS - 1]
    assert list(bottom.get_xticks()) == list(range(0, EXPERTS, 8))
    assert [ax.get_ylabel() for ax in fig.axes[:LAYERS]] == [f"layer {l}" for l in range(LAYERS)]


def test_transfer_figure_has_one_ranking_panel_per_pair_of_domains():
    three = {"toy:code": _statistics(4), "toy:math": _statistics(6), "toy:literature": _statistics(5)}
    fig = plot_transfer(three)
    titles = [ax.get_title() for ax in fig.axes]
    assert [t for t in titles if "does the ranking" in t] == [
        f"{pair}: does the ranking of experts transfer?" for pair in ("code vs math", "code vs literature", "math vs literature")]
    with pytest.raises(ValueError, match="at least two"):
        plot_transfer(three, domains=["toy:code"])


def test_moe_layer_diagram_draws_the_chosen_experts_and_their_gates():
    from matplotlib.patches import FancyBboxPatch

    fig = plot_moe_layer(num_experts=8, top_k=2, chosen=[6, 1], gates=[0.7, 0.3])
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert [f"expert {j}" for j in range(8)] == [t for t in texts if t.startswith("expert")]
    assert "× 0.70" in texts and "× 0.30" in texts
    coloured = [p for p in fig.axes[0].patches if isinstance(p, FancyBboxPatch) and p.get_facecolor()[:3] != (1.0, 1.0, 1.0)]
    assert len(coloured) == 8  # two chosen, six grey
    summarised = [t.get_text() for t in plot_moe_layer(num_experts=64, top_k=8).axes[0].texts]
    assert "⋮ 57 more (6 chosen)" in summarised and sum(t.startswith("× ") for t in summarised) == 2
    with pytest.raises(ValueError, match="distinct experts"):
        plot_moe_layer(num_experts=8, top_k=2, chosen=[1, 1])
    with pytest.raises(ValueError, match="top_k"):
        plot_moe_layer(num_experts=4, top_k=5)


def _old_transfer_figure(domain_stats, per_layer):
    """Notebook 00's transfer figure as it was drawn before `plot_transfer` (12 inches wide, 6-pt legends)."""
    import seaborn as sns

    (domain_a, sa), (domain_b, sb) = domain_stats.items()
    fa, fb = transfer_factors(sa), transfer_factors(sb)
    shown = ["routing frequency", "mean gate S(1,1,0)", "MAN S(1,0,1)"]
    fig = Figure(figsize=(12, 3.8), layout="constrained")
    axes = fig.subplots(1, len(shown) + 1)
    colors = sns.color_palette("crest", LAYERS)
    for ax, name in zip(axes, shown):
        a, b = fa[name].numpy(), fb[name].numpy()
        for l in range(len(a)):
            ax.scatter(a[l], b[l], s=16, color=colors[l], label=f"layer {l}")
        rho = per_layer[per_layer.quantity == name].rho.mean()
        ax.set(xlabel=domain_a, ylabel=domain_b, title=f"{name}\nmean within-layer ρ = {rho:.2f}")
        if name == "routing frequency":
            ax.set(xscale="log", yscale="log")
        ax.title.set_fontsize(9)
    axes[0].legend(fontsize=6)
    bars = per_layer[per_layer.quantity.isin(shown)]
    sns.barplot(bars, x="layer", y="rho", hue="quantity", ax=axes[-1], palette="colorblind")
    axes[-1].set(ylabel="Spearman ρ between domains", title="ranking transfer per layer")
    axes[-1].legend(fontsize=6, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2)
    return fig


def test_the_check_catches_the_old_overlapping_transfer_figure():
    domain_stats = {"toy:code": _statistics(4), "toy:literature": _statistics(5)}
    fig = _old_transfer_figure(domain_stats, transfer_table(domain_stats)[1])
    enforce_readable(fig)  # what save_figure did to it: 9 pt at 16 cm is 17 pt on a 12-inch figure
    assert text_overlaps(fig) or legend_overlaps_data(fig)


def test_matrix_annotations_hold_three_characters_and_small_negatives_do_not_run_together(stats, monkeypatch):
    """A row of small negative correlations ("-.02-.03-.04" on the default model's mixed statistics,
    "-.19" beside "-.15" on its code statistics) ran together: |rho| < .05 is annotated "~0" and a
    negative value with one decimal, so every annotation is at most three characters and none overlap."""
    import moepaper.pipeline.figures as figures

    names = len(NAMED) - 2  # the statistics criteria the matrix shows
    values = np.full((LAYERS, names, names), 0.5)
    values[:, 0, 3:6] = values[:, 3:6, 0] = [-0.02, -0.03, -0.04]
    values[:, 1, 3:6] = values[:, 3:6, 1] = [-0.19, -0.15, -0.12]
    for k in range(names):
        values[:, k, k] = 1.0
    monkeypatch.setattr(figures, "rank_correlation", lambda stats, criteria=None: values[:, :names, :names])
    fig = plot_rank_correlation(stats)
    enforce_readable(fig)
    texts = {t.get_text() for t in fig.axes[0].texts}
    assert {"~0", "-.2", "-.1", ".50", "1"} <= texts and max(len(t) for t in texts) <= 3
    assert text_overlaps(fig) == []
