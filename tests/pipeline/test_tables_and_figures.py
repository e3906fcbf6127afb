"""Tables, ranks and figures on hand-made results and tiny-model statistics."""

import pytest

from moepaper import collect_statistics
from moepaper.criteria import CRITERIA
from moepaper.pipeline.figures import (
    accuracy_stderr,
    damage_intervals,
    figure_width,
    grid_changes,
    grid_limits,
    kept_overlap,
    min_font_size,
    plot_damage_correlation,
    plot_frequency_vs_norm,
    plot_grid_heatmap,
    plot_kept_overlap,
    plot_rank_correlation,
    plot_score_vs_ratio,
    rank_correlation,
    save_figure,
    small_text,
)
from moepaper.pipeline.tables import (
    AVERAGE,
    AVERAGE_RANK,
    average_rank_summary,
    gap_to_baseline,
    load_results,
    rank_table,
    results_table,
    table_caption,
    to_latex,
    to_markdown,
    write_tables,
)
from moepaper.pipeline.results import UNPRUNED, result_path, write_json_atomic
from moepaper.testbed.tiny import random_batch, tiny_model

# benchmark -> (metric, higher_is_better); b4 was not run
BENCHMARKS = {"b1": ("acc,none", True), "b2": ("acc_norm,none", True), "b3": ("bits_per_byte,none", False), "b4": (None, None)}
# criterion -> values on b1, b2, b3 (ratio 0.5, calibration "c")
VALUES = {
    "man": (0.60, 0.30, 1.0),
    "msan": (0.60, 0.50, 1.2),
    "frequency": (0.50, 0.50, 1.1),
    "reap": (0.40, 0.70, 1.3),
}
UNPRUNED_VALUES = (0.70, 0.80, 0.9)


def _write(out, criterion, ratio, calibration, values, setting="task-agnostic"):
    c = CRITERIA.get(criterion)
    for (name, (metric, higher)), value in zip(BENCHMARKS.items(), list(values) + [None]):
        record = {
            "model": "toy", "calibration": calibration, "setting": None if criterion == UNPRUNED else setting,
            "criterion": criterion, "b": c and c.b, "alpha": c and c.alpha, "beta": c and c.beta, "ratio": ratio,
            "benchmark": name, "label": name.upper(), "task": name, "metric": metric, "value": value,
            "stderr": None, "higher_is_better": higher, "n": 10, "status": "ok" if value is not None else "not run",
            "note": "" if value is not None else "not in lm-eval", "suite": "toy", "evaluation": {"limit": None},
            "domain": "code" if name == "b1" else "text",
            "provenance": {"date": "2026-01-01T00:00:00+00:00"},
        }
        write_json_atomic(result_path(out, "toy", calibration, criterion, round(ratio * 8), name), record)


@pytest.fixture
def results(tmp_path):
    for criterion, values in VALUES.items():
        _write(tmp_path, criterion, 0.5, "c", values)
        _write(tmp_path, criterion, 0.25, "c", tuple(v + 0.05 if i < 2 else v for i, v in enumerate(values)))
    _write(tmp_path, UNPRUNED, 0.0, "none", UNPRUNED_VALUES)
    return load_results(tmp_path)


def test_load_results_scales_proportions(results):
    assert len(results) == 2 * 4 * 4 + 4
    row = results[(results["criterion"] == "man") & (results["ratio"] == 0.5) & (results["benchmark"] == "b1")].iloc[0]
    assert row["score"] == pytest.approx(60.0)
    bpb = results[(results["criterion"] == "man") & (results["ratio"] == 0.5) & (results["benchmark"] == "b3")].iloc[0]
    assert bpb["score"] == pytest.approx(1.0)  # not a proportion: unchanged


def test_results_table_and_average(results):
    table = results_table(results, calibration="c", ratio=0.5)
    assert list(table.index) == [UNPRUNED, "frequency", "reap", "man", "msan"]
    assert list(table.columns) == ["b1", "b2", "b3", "b4", AVERAGE]
    # the average covers the higher-is-better benchmarks that ran: b1, b2
    assert table.loc["man", AVERAGE] == pytest.approx(45.0)
    assert table.loc["msan", AVERAGE] == pytest.approx(55.0)
    assert table.loc[UNPRUNED, AVERAGE] == pytest.approx(75.0)
    assert table["b4"].isna().all()


def test_ranks_with_ties(results):
    table = results_table(results, calibration="c", ratio=0.5)
    ranks = rank_table(table)
    assert UNPRUNED not in ranks.index
    assert list(ranks.columns) == ["b1", "b2", "b3", AVERAGE_RANK]  # b4 (not run) has no ranks
    # b1: man and msan tie for first -> 1.5 each; b2: msan and frequency tie for 2nd -> 2.5
    assert ranks.loc["man", "b1"] == ranks.loc["msan", "b1"] == 1.5
    assert ranks.loc["msan", "b2"] == ranks.loc["frequency", "b2"] == 2.5
    # b3 is bits per byte: lower is better, so man (1.0) ranks first
    assert ranks.loc["man", "b3"] == 1 and ranks.loc["reap", "b3"] == 4
    expected = {"man": (1.5 + 4 + 1) / 3, "msan": (1.5 + 2.5 + 3) / 3, "frequency": (3 + 2.5 + 2) / 3, "reap": (4 + 1 + 4) / 3}
    for name, value in expected.items():
        assert ranks.loc[name, AVERAGE_RANK] == pytest.approx(value)
    # ranks of each benchmark sum to 1 + 2 + 3 + 4 whatever the ties
    assert (ranks[["b1", "b2", "b3"]].sum() == 10).all()


def test_gap_to_strongest_baseline(results):
    gap = gap_to_baseline(results_table(results, calibration="c", ratio=0.5))
    assert set(gap.index) == {"man", "msan"}
    assert (gap["strongest baseline"] == "reap").all()  # reap 55 > frequency 50
    assert gap.loc["man", "gap"] == pytest.approx(-10.0) and gap.loc["msan", "gap"] == pytest.approx(0.0)


def test_a_failed_result_shows_as_failed_in_its_cell(results):
    df = results.copy()
    cell = (df["criterion"] == "reap") & (df["benchmark"] == "b1")
    df.loc[cell, ["status", "value", "score"]] = ["failed", float("nan"), float("nan")]
    md = to_markdown(results_table(df, calibration="c", ratio=0.5))
    reap = next(line for line in md.splitlines() if line.startswith("| REAP"))
    assert reap.split("|")[2].strip() == "failed"  # its own status, not "not run" or "–"
    b4 = next(line for line in md.splitlines() if line.startswith("| MAN")).split("|")[5].strip()
    assert b4 == "not run"


def test_markdown_and_latex(results):
    table = results_table(results, calibration="c", ratio=0.5)
    md = to_markdown(table)
    assert "| MAN" in md and "**60.0**" in md and "not run" in md  # tie: both bold
    assert md.count("**60.0**") == 2
    assert "**1.000**" in md and "| 1.200 " in md  # lowest bits per byte is the best; 3 decimals
    tex = to_latex(table, caption="toy")
    assert r"\textbf{60.0}" in tex and r"\begin{tabular}" in tex and "B4" in tex


def test_average_rank_summary_and_written_tables(results, tmp_path):
    summary = average_rank_summary(results, model="toy")
    assert summary.shape == (4, 2)
    assert summary.loc["man", ("task-agnostic", "c", "all", "50%")] == pytest.approx((1.5 + 4 + 1) / 3)
    written = write_tables(results, tmp_path / "tables")
    names = {p.name for p in written}
    assert {"results__toy__c__0.5.md", "ranks__toy__c__0.25.tex", "gap__toy__c__0.5.md", "average_rank__toy.md"} <= names


def test_task_specific_calibration_also_ranked_on_its_domain(tmp_path):
    for criterion, values in VALUES.items():
        _write(tmp_path, criterion, 0.5, "embedded:code", values, setting="task-specific")
    summary = average_rank_summary(load_results(tmp_path), model="toy")
    assert list(summary.columns) == [("task-specific", "embedded:code", "all", "50%"), ("task-specific", "embedded:code", "matched", "50%")]
    matched = summary[("task-specific", "embedded:code", "matched", "50%")]  # b1 only: man and msan tie first
    assert list(matched[["man", "msan", "frequency", "reap"]]) == [1.5, 1.5, 3.0, 4.0]


# ---------------------------------------------------------------- figures


@pytest.fixture(scope="module")
def stats():
    model = tiny_model("olmoe")
    return collect_statistics(model, [random_batch(batch=4, seq_len=32, seed=i) for i in range(3)], progress=False, calibration="random")


def test_overlap_and_correlation_values(stats):
    overlap = kept_overlap(stats, ["man", "msan", "frequency"], ratio=0.5)
    assert overlap.shape == (3, 3, 3)
    assert (overlap[:, range(3), range(3)] == 1).all() and ((overlap >= 0) & (overlap <= 1)).all()
    rho = rank_correlation(stats, ["man", "ean", "frequency"])
    assert rho.shape == (3, 3, 3) and (abs(rho[:, range(3), range(3)] - 1) < 1e-12).all()


def _correlations():
    """Damage correlations as notebook 03 builds them: MAN best, frequency worst, 2 settings x 4 layers."""
    rows = []
    for setting, shift in (("matched", 0.0), ("mismatched", -0.1)):
        for layer in range(4):
            for name, rho in (("man", 0.6), ("frequency", -0.2), ("S(0,2,0)", 0.1)):
                rows.append({"criterion": name, "measure": "loss_change", "layer": layer, "setting": setting,
                             "calibration": "c", "evaluation": "e", "rho": rho + shift + 0.05 * (layer - 1.5)})
    import pandas as pd

    return pd.DataFrame(rows)


def _all_figures(results, stats):
    return {
        "heatmap": plot_grid_heatmap(results, calibration="c", ratio=0.5),
        "ratio": plot_score_vs_ratio(results, calibration="c"),
        "overlap": plot_kept_overlap(stats, ratio=0.5),
        "correlation": plot_rank_correlation(stats),
        "frequency": plot_frequency_vs_norm(stats),
        "damage": plot_damage_correlation(_correlations()),
    }


def test_figures_saved_as_png_and_pdf(results, stats, tmp_path):
    first, second = _all_figures(results, stats), _all_figures(results, stats)
    for name in first:
        paths = save_figure(first[name], name, tmp_path / "a")
        assert [p.suffix for p in paths] == [".png", ".pdf"]
        again = save_figure(second[name], name, tmp_path / "b")  # byte-for-byte reproducible: no timestamps
        assert [p.read_bytes() for p in paths] == [p.read_bytes() for p in again], name
        assert paths[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and paths[1].read_bytes()[:5] == b"%PDF-"


def test_every_figure_is_readable_at_16_cm(results, stats, tmp_path):
    """No text under 9 pt when a figure is shown 16 cm wide: smallest font >= 9 * width / 6.3 in, as drawn and as saved."""
    from matplotlib.text import Text
    from PIL import Image

    for name, fig in _all_figures(results, stats).items():
        width = figure_width(fig)
        sizes = [t.get_fontsize() for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip()]
        assert min(sizes) >= min_font_size(width) - 1e-9, (name, min(sizes), width)
        assert small_text(fig) == [], name  # drawn readable: save_figure has nothing to enlarge
        png, _ = save_figure(fig, name, tmp_path)
        saved = Image.open(png).size[0] / 150  # inches at the PNG's 150 dpi
        assert saved <= width + 0.02, (name, saved, width)  # the measured width bounds the saved one: the check is conservative
        assert width <= 7.0, (name, width)  # drawn about a text width wide, not shrunk onto the page


def test_save_figure_enlarges_small_text(tmp_path):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 3))
    ax = fig.subplots()
    ax.set_title("tiny", fontsize=6)
    assert ("tiny", 6) in small_text(fig)  # 12 inches wide needs 9 * 12 / 6.3 = 17.1 pt
    save_figure(fig, "tiny", tmp_path)
    assert small_text(fig) == [] and ax.title.get_fontsize() >= min_font_size(figure_width(fig)) - 1e-9


def test_grid_heatmap_shows_change_from_unpruned_on_one_scale(results):
    changes = grid_changes(results, calibration="c", ratio=0.5)
    assert changes.loc["man", "accuracy"] == pytest.approx(45.0 - 75.0)  # mean of b1, b2 minus unpruned
    assert changes.loc["reap", "bits per byte"] == pytest.approx(1.3 - 0.9)  # b3, lower is better
    # the largest change over both ratios: man at 50% (-30 points), reap's bits per byte (+0.4)
    assert grid_limits(results) == pytest.approx({"accuracy": 30.0, "bits per byte": 0.4})
    for ratio in (0.25, 0.5):
        fig = plot_grid_heatmap(results, calibration="c", ratio=ratio)
        meshes = [ax.collections[0] for ax in fig.axes if ax.collections and ax.get_label() != "<colorbar>"][:2]
        assert [m.get_clim() for m in meshes] == [pytest.approx((-30.0, 30.0)), pytest.approx((-0.4, 0.4))]
    caption = fig.get_supxlabel()
    assert "standard error" in caption and "n = 10 items" in caption


def test_accuracy_standard_error_from_item_counts(results):
    table = results_table(results, calibration="c", ratio=0.5)
    se = accuracy_stderr(results, table)
    # man: accuracies 0.6 and 0.3 over 10 items each: sqrt(0.024 + 0.021) / 2, in points
    assert se["man"] == pytest.approx(100 * (0.024 + 0.021) ** 0.5 / 2)
    assert se[UNPRUNED] == pytest.approx(100 * (0.7 * 0.3 / 10 + 0.8 * 0.2 / 10) ** 0.5 / 2)


def test_frequency_vs_norm_log_axis_and_kept_classes(stats):
    fig = plot_frequency_vs_norm(stats, ratio=0.5)
    ax = fig.axes[0]
    assert ax.get_xscale() == "log"
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert [l.split(" (")[0] for l in labels] == ["both kept", "both pruned", "kept only by MAN", "kept only by Frequency"]
    counts = [int(l.split("(")[1].rstrip(")")) for l in labels]
    assert sum(counts) == sum(stats.num_experts)
    assert counts[2] == counts[3]  # each keeps half: what MAN alone keeps, Frequency alone drops
    colors = {tuple(c.get_facecolor()[0]) for c in ax.collections if len(c.get_offsets())}
    assert len(colors) == sum(1 for c in counts if c)


def test_damage_dot_plot_sorted_with_bootstrap_intervals():
    correlations = _correlations()
    intervals = damage_intervals(correlations)
    man = intervals[(intervals.criterion == "man") & (intervals.setting == "matched")].iloc[0]
    assert man["mean"] == pytest.approx(0.6) and man["low"] <= man["mean"] <= man["high"] and man["units"] == 4
    assert man["high"] - man["low"] > 0  # the layers differ: a real interval
    assert intervals.equals(damage_intervals(correlations))  # fixed seed: reproducible
    fig = plot_damage_correlation(correlations)
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert labels[-1].startswith("MAN") and labels[0].startswith("Frequency")  # best at the top
    assert [ax.get_title().split("\n")[0] for ax in fig.axes] == ["matched", "mismatched"]


def test_tables_have_captions_item_counts_and_direction(results, tmp_path):
    table = results_table(results, calibration="c", ratio=0.5)
    md = to_markdown(table, caption=table_caption(table))
    assert md.startswith("Table: Scores of each criterion (toy, calibration c, 50% of experts removed")
    header = md.splitlines()[2]
    assert "B1 (n=10)" in header and "B3 ↓ (n=10)" in header and "B1 ↓" not in header
    assert "lower is better" in table_caption(rank_table(table), "ranks")
    tex = to_latex(table, caption=table_caption(table))
    assert r"\caption{" in tex and r"B3 $\downarrow$ (n=10)" in tex and r"50\% of experts" in tex
    written = {p.name: p for p in write_tables(results, tmp_path / "tables")}
    assert written["average_rank__toy.md"].read_text().startswith("Table: toy: Average rank")
    assert "gap = new criterion minus baseline" in written["gap__toy__c__0.5.md"].read_text()


def test_report_on_a_subset_of_criteria_without_man_or_msan(tmp_path):
    from moepaper.pipeline.figures import write_report

    results = tmp_path / "results"
    for criterion in ("frequency", "reap"):
        _write(results, criterion, 0.5, "c", VALUES[criterion])
    _write(results, UNPRUNED, 0.0, "none", UNPRUNED_VALUES)
    df = load_results(results)
    table = results_table(df, model="toy", calibration="c", ratio=0.5)
    assert gap_to_baseline(table).empty
    written = write_report(df, None, tmp_path / "figures", model="toy")
    assert any(p.name.startswith("average_rank__toy") for p in written)
    assert not any(p.name.startswith("gap__") for p in written)  # no new criterion: no gap table


def test_unreadable_result_files_are_skipped_with_a_warning_naming_them(results, tmp_path):
    stray = tmp_path / "toy" / "c" / "broken.json"
    stray.write_text('{"benchmark": "b1", "crit')  # a truncated file
    other = tmp_path / "toy" / "notes.json"
    other.write_text('["not", "a", "record"]')
    with pytest.warns(UserWarning) as caught:
        df = load_results(tmp_path)
    messages = [str(w.message) for w in caught]
    assert any(str(stray) in m and "not a readable JSON file" in m for m in messages)
    assert any(str(other) in m and "not a result record" in m for m in messages)
    assert len(df) == len(results)


def test_every_calibration_draw_targets_its_source_domain():
    from moepaper.pipeline.tables import calibration_domain

    assert [calibration_domain(c) for c in ("embedded:code", "embedded:code@seed1", "math", "standin:math", "embedded:math@seed2",
                                            "embedded:mixed@seed1", "c4")] == ["code", "code", "math", "math", "math", None, None]
