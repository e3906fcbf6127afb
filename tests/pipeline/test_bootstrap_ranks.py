"""Average ranks with bootstrap intervals (`bootstrap_average_ranks`) on synthetic records with per-item outcomes."""

import math
import re

import numpy as np
import pandas as pd
import pytest

from moepaper.pipeline.figures import PAGE_WIDTH_CM, plot_rank_intervals, save_figure
from moepaper.pipeline.results import write_json_atomic
from moepaper.pipeline.tables import (
    ItemsError,
    _average_ranks,
    average_rank_summary,
    bootstrap_average_ranks,
    calibration_domain,
    calibration_seed,
    load_results,
    rank_interval_table,
    write_rank_intervals,
)

# benchmark -> (domain, kind); kind "mc" (acc, higher is better) or "ppl" (bits per byte, lower is better)
BENCHMARKS = {"code_mc": ("code", "mc"), "code_ppl": ("code", "ppl"), "math_mc": ("math", "mc"),
              "math_ppl": ("math", "ppl"), "literature_mc": ("literature", "mc")}
# criterion -> quality (higher = better outcomes on every benchmark)
QUALITY = {"frequency": 0.00, "seer": 0.02, "ean": 0.05, "reap": 0.08, "man": -0.03, "msan": -0.05, "mone": 0.03}
CALIBRATIONS = {"embedded:mixed": "task-agnostic", "embedded:code": "task-specific", "embedded:math": "task-specific"}


def calibration_name(base: str, seed: int) -> str:
    return base if seed == 0 else f"{base}@seed{seed}"


def item_outcomes(rng, kind: str, doc_ids: list[str], quality: float, oracle: bool = False) -> dict:
    """Per-item outcomes in the record format: acc (0/1), or loglikelihood (nats) and bytes."""
    I = len(doc_ids)
    if kind == "mc":
        acc = np.ones(I) if oracle else (rng.random(I) < np.clip(0.45 + quality, 0.01, 0.99)).astype(float)
        return {"doc_id": doc_ids, "acc": acc.tolist()}
    size = rng.integers(50, 200, size=I).astype(float)
    bpb = np.zeros(I) if oracle else np.clip(1.5 - quality + 0.4 * rng.standard_normal(I), 0.05, None)
    return {"doc_id": doc_ids, "loglikelihood": (-bpb * size * math.log(2)).tolist(), "bytes": size.tolist()}


def item_value(items: dict) -> float:
    if "acc" in items:
        return float(np.mean(items["acc"]))
    return -float(np.sum(items["loglikelihood"])) / math.log(2) / float(np.sum(items["bytes"]))


def synthetic_records(*, models=("toy",), quality=QUALITY, seeds=(0, 1, 2), ratios=(0.25, 0.5), items=60,
                      calibrations=CALIBRATIONS, draw_noise=0.02, oracle=None, calibration_free=None, seed=0) -> list[dict]:
    """Result records with items for every (model, calibration draw, ratio, criterion, benchmark).

    quality: per criterion, added to the probability of a correct answer and subtracted from
    bits per byte; draw_noise: the spread of a per-(draw, ratio, criterion) quality shift.
    oracle: a criterion correct on every item (and 0 bits per byte). calibration_free: a
    criterion stored once, under calibration "none", for every ratio. doc_ids are shuffled
    per record (the bootstrap aligns them).
    """
    rng = np.random.default_rng(seed)
    doc_ids = {b: [f"{b}-{k}" for k in range(items)] for b in BENCHMARKS}
    records = []

    def add(model, calibration, setting, criterion, ratio, benchmark, q, is_oracle=False):
        domain, kind = BENCHMARKS[benchmark]
        ids = list(rng.permutation(doc_ids[benchmark]))
        outcome = item_outcomes(rng, kind, ids, q, is_oracle)
        records.append({
            "model": model, "calibration": calibration, "setting": setting, "criterion": criterion, "ratio": ratio,
            "benchmark": benchmark, "label": benchmark, "task": benchmark, "suite": "toy", "domain": domain,
            "metric": "acc,none" if kind == "mc" else "bits_per_byte,none", "higher_is_better": kind == "mc",
            "value": item_value(outcome), "stderr": None, "n": items, "status": "ok", "note": "",
            "b": None, "alpha": None, "beta": None, "evaluation": {"limit": None}, "items": outcome,
        })

    for model in models:
        for base, setting in calibrations.items():
            for s in seeds:
                for ratio in ratios:
                    for criterion, q in quality.items():
                        shift = draw_noise * rng.standard_normal()
                        for benchmark in BENCHMARKS:
                            add(model, calibration_name(base, s), setting, criterion, ratio, benchmark, q + shift)
                    if oracle:
                        for benchmark in BENCHMARKS:
                            add(model, calibration_name(base, s), setting, oracle, ratio, benchmark, 0.0, True)
        if calibration_free:
            for ratio in ratios:
                for benchmark in BENCHMARKS:
                    add(model, "none", None, calibration_free, ratio, benchmark, 0.04)
    return records


def as_frame(records: list[dict]) -> pd.DataFrame:
    """Records as `load_results` rows, with the items in an ``items`` column."""
    frame = pd.DataFrame(records)
    frame["path"] = [f"<{r['model']}/{r['calibration']}/{r['criterion']}/{r['ratio']}/{r['benchmark']}>" for r in records]
    return frame


def write_records(out, records: list[dict]) -> pd.DataFrame:
    for k, record in enumerate(records):
        write_json_atomic(out / record["model"] / f"r{k:05d}.json", record)
    return load_results(out)


@pytest.fixture(scope="module")
def records():
    return synthetic_records()


# ---------------------------------------------------------------- helpers


def test_calibration_seed_and_domain():
    assert calibration_seed("embedded:mixed") == ("embedded:mixed", 0)
    assert calibration_seed("embedded:code@seed2") == ("embedded:code", 2)
    assert calibration_seed("none") == ("none", 0)
    assert calibration_domain("embedded:code@seed1") == "code"
    assert calibration_domain("embedded:math") == "math"
    assert calibration_domain("embedded:mixed@seed1") is None


def test_average_ranks_match_pandas_with_ties():
    rng = np.random.default_rng(3)
    values = rng.integers(0, 4, size=(50, 7)).astype(float)  # many ties
    expected = np.stack([pd.Series(row).rank(method="average").to_numpy() for row in values])
    np.testing.assert_array_equal(_average_ranks(values), expected)


# ---------------------------------------------------------------- the estimate and its interval


def test_point_estimate_is_the_plain_average_rank(tmp_path, records):
    """Mean ranks = average_rank_summary averaged over ratios and draws (task-specific: matched benchmarks)."""
    df = write_records(tmp_path, records)  # items read back from the files
    boot = bootstrap_average_ranks(df, n=50)
    summary = average_rank_summary(df, model="toy", criteria=None)
    agnostic = summary.loc[:, [c for c in summary.columns if c[0] == "task-agnostic" and c[2] == "all"]].mean(axis=1)
    specific = summary.loc[:, [c for c in summary.columns if c[0] == "task-specific" and c[2] == "matched"]].mean(axis=1)
    assert len([c for c in summary.columns if c[0] == "task-specific" and c[2] == "matched"]) == 2 * 3 * 2  # code, math x seeds x ratios
    for setting, expected in (("task-agnostic", agnostic), ("task-specific", specific)):
        got = boot[boot["setting"] == setting].set_index("criterion")["mean_rank"]
        assert set(got.index) == set(QUALITY)
        np.testing.assert_allclose(got.sort_index(), expected.reindex(got.index).sort_index(), rtol=0, atol=1e-12)
    row = boot.iloc[0]
    assert (row["n_criteria"], row["n_ratios"], row["n_draws"], row["n_seeds"], row["n_boot"]) == (len(QUALITY), 2, 3, 3, 50)
    specific_rows = boot[boot["setting"] == "task-specific"]
    assert set(specific_rows["n_benchmarks"]) == {4} and set(specific_rows["n_items"]) == {4 * 60}  # code and math benchmarks
    assert set(boot.loc[boot["setting"] == "task-agnostic", "n_benchmarks"]) == {5}


def test_interval_contains_the_mean_and_is_deterministic(records):
    df = as_frame(records)
    boot = bootstrap_average_ranks(df, n=200, seed=1)
    assert len(boot) == 2 * len(QUALITY)
    assert (boot["low"] <= boot["mean_rank"]).all() and (boot["mean_rank"] <= boot["high"]).all()
    assert (boot["low"] < boot["high"]).any()
    again = bootstrap_average_ranks(df, n=200, seed=1)
    pd.testing.assert_frame_equal(boot, again)
    other = bootstrap_average_ranks(df, n=200, seed=2)
    np.testing.assert_array_equal(other["mean_rank"], boot["mean_rank"])  # the point estimate does not depend on the seed
    assert not np.array_equal(other[["low", "high"]].to_numpy(), boot[["low", "high"]].to_numpy())
    wider = bootstrap_average_ranks(df, n=200, seed=1, level=0.99)
    assert (wider["high"] - wider["low"] >= boot["high"] - boot["low"] - 1e-12).all()


def test_a_criterion_best_on_every_item_ranks_first_with_no_width():
    df = as_frame(synthetic_records(oracle="oracle", seeds=(0, 1), items=40))
    boot = bootstrap_average_ranks(df, n=100)
    oracle = boot[boot["criterion"] == "oracle"]
    assert len(oracle) == 2
    assert (oracle["mean_rank"] == 1).all() and (oracle["low"] == 1).all() and (oracle["high"] == 1).all()
    assert (boot.loc[boot["criterion"] != "oracle", "low"] >= 2).all()


def test_intervals_shrink_with_more_items():
    quality = {"frequency": 0.00, "seer": 0.08, "ean": 0.16, "reap": 0.24}
    widths = []
    for items in (20, 800):
        df = as_frame(synthetic_records(quality=quality, items=items, seeds=(0, 1, 2), draw_noise=0.0, seed=4))
        boot = bootstrap_average_ranks(df, n=300)
        widths.append((boot["high"] - boot["low"]).mean())
    assert widths[1] < 0.5 * widths[0]


def test_seed_draws_widen_the_interval():
    """Criteria far apart on items but shifted per calibration draw: the width comes from resampling the seeds."""
    quality = {"frequency": 0.0, "seer": 0.1, "ean": 0.2}
    widths = {}
    for noise in (0.0, 0.3):
        df = as_frame(synthetic_records(quality=quality, seeds=(0, 1, 2, 3), draw_noise=noise, items=400, seed=5))
        boot = bootstrap_average_ranks(df, n=300)
        assert set(boot["n_seeds"]) == {4}
        assert set(boot["n_draws"]) == {4, 8}  # task-agnostic: mixed x 4 seeds; task-specific: code and math x 4
        widths[noise] = (boot["high"] - boot["low"]).mean()
    assert widths[0.3] > widths[0.0] + 0.2


def test_calibration_free_criterion_applies_to_every_draw():
    """AIMER stored once under "none" gives the same answer as the same records copied to every draw."""
    records = synthetic_records(calibration_free="aimer", seeds=(0, 1), items=40)
    boot = bootstrap_average_ranks(as_frame(records), n=100)
    assert boot.attrs["calibration_free"] == {"toy": ["aimer"]}
    assert set(boot.loc[boot["criterion"] == "aimer", "setting"]) == {"task-agnostic", "task-specific"}
    free = [r for r in records if r["criterion"] == "aimer"]
    copied = [r for r in records if r["criterion"] != "aimer"]
    for base, setting in CALIBRATIONS.items():
        for s in (0, 1):
            copied += [{**r, "calibration": calibration_name(base, s), "setting": setting} for r in free]
    explicit = bootstrap_average_ranks(as_frame(copied), n=100)
    assert explicit.attrs["calibration_free"] == {"toy": []}
    pd.testing.assert_frame_equal(boot.reset_index(drop=True), explicit.reset_index(drop=True))


def test_models_are_ranked_separately_and_model_selects():
    both = as_frame(synthetic_records(models=("embedded", "embedded-pooled"), seeds=(0, 1), items=30))
    boot = bootstrap_average_ranks(both, n=50)
    assert list(dict.fromkeys(boot["model"])) == ["embedded", "embedded-pooled"]
    alone = bootstrap_average_ranks(both, n=50, model="embedded-pooled")
    pd.testing.assert_frame_equal(alone.reset_index(drop=True),
                                  boot[boot["model"] == "embedded-pooled"].reset_index(drop=True))
    with pytest.raises(ValueError, match="no results of model 'other'"):
        bootstrap_average_ranks(both, n=5, model="other")


# ---------------------------------------------------------------- errors


def test_records_without_items_are_named(records):
    df = as_frame(records)
    df["items"] = df["items"].astype(object)
    df.at[7, "items"] = None
    with pytest.raises(ItemsError, match=r"1 result records have no per-item outcomes.*" + re.escape(df.at[7, "path"])):
        bootstrap_average_ranks(df, n=5)


def test_items_that_do_not_give_the_value(records):
    df = as_frame(records)
    df.loc[3, "value"] = df.loc[3, "value"] + 0.01
    with pytest.raises(ItemsError, match=r"give .* the record's value is"):
        bootstrap_average_ranks(df, n=5)


def test_mismatched_doc_ids(records):
    df = as_frame(records)
    items = dict(df.at[12, "items"])
    items["doc_id"] = ["other"] + list(items["doc_id"][1:])
    df.at[12, "items"] = items
    with pytest.raises(ItemsError, match=r"doc_ids of .* differ from those of .*only here \['other'\]"):
        bootstrap_average_ranks(df, n=5)


def test_missing_record_is_named(records):
    df = as_frame(records).drop(index=[20])
    with pytest.raises(ValueError, match="without an 'ok' record"):
        bootstrap_average_ranks(df, n=5)


def test_bad_arguments(records):
    with pytest.raises(ValueError, match="level"):
        bootstrap_average_ranks(as_frame(records), level=1.5)


# ---------------------------------------------------------------- table and figure


def test_table_and_figure(tmp_path):
    df = as_frame(synthetic_records(models=("embedded", "embedded-pooled"), seeds=(0, 1), items=30))
    boot = bootstrap_average_ranks(df, n=100)
    table = rank_interval_table(boot)
    assert list(table.columns) == [(s, m) for s in ("task-agnostic", "task-specific") for m in ("embedded", "embedded-pooled")]
    assert list(table.index)[:6] == ["frequency", "seer", "ean", "reap", "man", "msan"]
    row = boot[(boot["model"] == "embedded") & (boot["setting"] == "task-agnostic") & (boot["criterion"] == "man")].iloc[0]
    assert table.loc["man", ("task-agnostic", "embedded")] == f"{row['mean_rank']:.2f} [{row['low']:.2f}, {row['high']:.2f}]"
    md, tex = write_rank_intervals(boot, tmp_path)
    text = md.read_text()
    assert "MAN" in text and "lower is better" in text and "90% percentile bootstrap" in text and "100 replicates" in text
    assert "120 items" in text  # task-specific: code and math, 2 benchmarks each, 30 items
    latex = tex.read_text()
    assert r"90\% percentile" in latex and r"\caption" in latex and "[" in latex

    fig = plot_rank_intervals(boot)
    assert len(fig.axes) == 2
    sizes = [t.get_fontsize() for t in fig.findobj(lambda a: hasattr(a, "get_fontsize") and hasattr(a, "get_text") and a.get_text())]
    assert sizes and min(sizes) >= 9
    first = save_figure(fig, "rank_intervals", tmp_path / "a")
    second = save_figure(plot_rank_intervals(boot), "rank_intervals", tmp_path / "b")
    assert first[1].read_bytes() == second[1].read_bytes()  # reproducible PDF
    box = re.search(rb"/MediaBox \[\s*([\d.]+) ([\d.]+) ([\d.]+) ([\d.]+)\s*\]", first[1].read_bytes())
    width_cm = (float(box[3]) - float(box[1])) / 72 * 2.54
    assert 12 < width_cm <= PAGE_WIDTH_CM + 0.01


# ---------------------------------------------------------------- metric and ratio filters, paired tests, probabilities


def _hand_frame(outcomes: dict, *, pruned: dict | None = None, calibration="embedded:literature@draw0of3",
                setting="task-agnostic") -> pd.DataFrame:
    """One model, one draw, one ratio, one accuracy benchmark: criterion -> per-item acc."""
    records = []
    for criterion, acc in outcomes.items():
        items = {"doc_id": [str(k) for k in range(len(acc))], "acc": list(acc)}
        records.append({"model": "toy", "calibration": calibration, "setting": setting, "criterion": criterion,
                        "ratio": 0.25, "benchmark": "literature_mc", "label": "x", "task": "x", "suite": "toy",
                        "domain": "literature", "metric": "acc,none", "higher_is_better": True, "value": float(np.mean(acc)),
                        "stderr": None, "n": len(acc), "status": "ok", "note": "", "b": None, "alpha": None, "beta": None,
                        "evaluation": {"limit": None}, "items": items,
                        "pruned": (pruned or {}).get(criterion, f"model-{criterion}")})
    return as_frame(records)


def test_paired_difference_and_rank_probabilities_against_a_hand_computation():
    """Two items; a is right on the first, b on the second, c on neither. A replicate draws the items
    (0,0), (1,1) (1/4 each) or one of each (1/2): a beats b, b beats a, or they tie. By hand:
    P(a better than b) = 1/4 + 1/2 * 1/2 = 1/2; P(a best) = 1/4 + 1/2 = 3/4 (best with a tie);
    P(c in the top two) = 1/4 + 1/4 = 1/2; rank differences a - b: -1.5, +1.5 or 0."""
    from moepaper.pipeline.tables import paired_rank_differences, rank_probabilities

    df = _hand_frame({"a": [1, 0], "b": [0, 1], "c": [0, 0]})
    n = 4000
    diff = paired_rank_differences(df, "a", "b", n=n, level=0.9).iloc[0]
    assert diff["mean"] == 0.0  # point: a and b tie at 1.5
    assert abs(diff["p_better"] - 0.5) < 0.03
    assert (diff["low"], diff["high"]) == (-1.5, 1.5)
    probs = rank_probabilities(df, n=n).set_index("criterion")
    assert abs(probs.loc["a", "p_best"] - 0.75) < 0.03 and abs(probs.loc["b", "p_best"] - 0.75) < 0.03
    assert probs.loc["c", "p_best"] == 0.0 and abs(probs.loc["c", "p_top2"] - 0.5) < 0.03
    assert probs.loc["a", "p_top2"] == 1.0
    # the difference is the difference of the replicates bootstrap_average_ranks summarises
    boot = bootstrap_average_ranks(df, n=n).set_index("criterion")
    assert diff["mean"] == boot.loc["a", "mean_rank"] - boot.loc["b", "mean_rank"]
    with pytest.raises(ValueError, match="no criterion"):
        paired_rank_differences(df, "a", "nope", n=10)


def test_identical_pruned_models_are_ranked_once():
    from moepaper.pipeline.tables import identical_pruned_models

    outcomes = {"x": [1, 1, 0, 1], "y": [1, 1, 0, 1], "z": [0, 0, 0, 1]}
    same = _hand_frame(outcomes, pruned={"x": "k1", "y": "k1", "z": "k2"})
    distinct = bootstrap_average_ranks(same, n=20).set_index("criterion")["mean_rank"]
    assert (distinct["x"], distinct["y"], distinct["z"]) == (1.0, 1.0, 2.0)
    counted_twice = bootstrap_average_ranks(same, n=20, distinct=False).set_index("criterion")["mean_rank"]
    assert (counted_twice["x"], counted_twice["y"], counted_twice["z"]) == (1.5, 1.5, 3.0)
    groups = identical_pruned_models(same)
    assert list(groups["criteria"]) == [("x", "y")]
    # equal values but different pruned models are ordinary ties
    apart = bootstrap_average_ranks(_hand_frame(outcomes), n=20).set_index("criterion")["mean_rank"]
    assert (apart["x"], apart["z"]) == (1.5, 3.0)


def test_metric_and_ratio_filters(tmp_path, records):
    df = write_records(tmp_path, records)
    accuracy = bootstrap_average_ranks(df, n=30, metric="accuracy", ratio=0.25)
    assert set(accuracy["metric"]) == {"accuracy"} and set(accuracy["ratio"]) == {0.25}
    assert set(accuracy.loc[accuracy["setting"] == "task-agnostic", "n_benchmarks"]) == {3}  # the three _mc benchmarks
    assert set(accuracy["n_ratios"]) == {1}
    bpb = bootstrap_average_ranks(df, n=30, metric="bits_per_byte", ratio=0.5)
    assert set(bpb.loc[bpb["setting"] == "task-agnostic", "n_benchmarks"]) == {2}
    # by hand: the accuracy point estimate is average_rank_summary on the accuracy benchmarks at 25%
    mc = [b for b, (_, kind) in BENCHMARKS.items() if kind == "mc"]
    summary = average_rank_summary(df, model="toy", criteria=None, benchmarks=mc)
    expected = summary.loc[:, [c for c in summary.columns if c[0] == "task-agnostic" and c[3] == "25%"]].mean(axis=1)
    got = accuracy[accuracy["setting"] == "task-agnostic"].set_index("criterion")["mean_rank"]
    np.testing.assert_allclose(got.sort_index(), expected.reindex(got.index).sort_index(), atol=1e-12)
    averaged = bootstrap_average_ranks(df, n=30)
    assert averaged["ratio"].isna().all() and set(averaged["n_ratios"]) == {2}
    for bad, match in ((dict(metric="acc"), "metric="), (dict(ratio=1.5), "ratio=")):
        with pytest.raises(ValueError, match=match):
            bootstrap_average_ranks(df, n=5, **bad)


def test_paper_suite_metrics_are_read_with_their_direction():
    """Records of the paper suite store items under the metric's own name (acc_norm, exact_match, pass@1)."""
    records = []
    for criterion, good in (("man", 1), ("reap", 0)):
        for benchmark, metric in (("arc_c", "acc_norm,none"), ("gsm8k", "exact_match,strict-match"), ("humaneval", "pass@1,create_test")):
            name = metric.split(",")[0]
            acc = [good, good, 1 - good, 1]
            records.append({"model": "m", "calibration": "c4", "setting": "task-agnostic", "criterion": criterion, "ratio": 0.25,
                            "benchmark": benchmark, "label": benchmark, "task": benchmark, "suite": "toy", "domain": "x",
                            "metric": metric, "higher_is_better": True, "value": float(np.mean(acc)), "stderr": None,
                            "n": 4, "status": "ok", "note": "", "b": None, "alpha": None, "beta": None,
                            "evaluation": {"limit": None}, "items": {"doc_id": [0, 1, 2, 3], name: acc}})
    boot = bootstrap_average_ranks(as_frame(records), n=20).set_index("criterion")
    assert boot.loc["man", "mean_rank"] == 1.0 and boot.loc["reap", "mean_rank"] == 2.0
    assert set(boot["n_benchmarks"]) == {3}


def test_a_criterion_missing_on_a_draw_is_an_error_unless_declared_calibration_free():
    """An interrupted sweep (a criterion present on one draw only) is never taken for a calibration-free criterion."""
    records = synthetic_records(seeds=(0, 1), items=20)
    partial = [r for r in records if not (r["criterion"] == "frequency" and r["calibration"] != "embedded:mixed")]
    with pytest.raises(ValueError, match=r"without an .ok. record.*embedded:mixed@seed1 / frequency"):
        bootstrap_average_ranks(as_frame(partial), n=5)


def test_seeded_and_disjoint_draws_of_one_source_are_not_mixed():
    records = synthetic_records(seeds=(0, 1), items=20, calibrations={"embedded:mixed": "task-agnostic"})
    records += [{**r, "calibration": "embedded:mixed@draw0of3"} for r in records if r["calibration"] == "embedded:mixed"]
    with pytest.raises(ValueError, match="both seeded draws"):
        bootstrap_average_ranks(as_frame(records), n=5)


def test_rank_report_is_the_filtered_bootstraps_and_its_verdicts_follow_the_numbers(tmp_path, records):
    """rank_report's cells equal bootstrap_average_ranks / rank_probabilities / paired_rank_differences
    with the same filters and seed; each verdict sentence names the leader and says whether the paired
    interval excludes zero."""
    from moepaper.pipeline.figures import plot_rank_report
    from moepaper.pipeline.tables import (
        paired_rank_differences,
        rank_probabilities,
        rank_report,
        rank_report_table,
        rank_verdicts,
        write_rank_report,
    )

    df = as_frame(records)
    ranks, paired = rank_report(df, model="toy", n=200)
    assert set(zip(ranks["ratio"], ranks["metric"])) == {(r, m) for r in (0.25, 0.5) for m in ("accuracy", "bits_per_byte")}
    cell = ranks[(ranks["ratio"] == 0.5) & (ranks["metric"] == "accuracy")].set_index(["setting", "criterion"])
    boot = bootstrap_average_ranks(df, n=200, metric="accuracy", ratio=0.5).set_index(["setting", "criterion"])
    probs = rank_probabilities(df, n=200, metric="accuracy", ratio=0.5).set_index(["setting", "criterion"])
    for column in ("mean_rank", "low", "high"):
        np.testing.assert_array_equal(cell[column], boot.loc[cell.index, column])
    np.testing.assert_array_equal(cell["p_top2"], probs.loc[cell.index, "p_top2"])
    agnostic = cell.loc["task-agnostic"]
    rival = agnostic.drop(index=["man", "msan"])["mean_rank"].idxmin()
    row = paired[(paired["ratio"] == 0.5) & (paired["metric"] == "accuracy") & (paired["setting"] == "task-agnostic")
                 & (paired["a"] == "man")].iloc[0]
    assert row["b"] == rival
    direct = paired_rank_differences(df, "man", rival, n=200, metric="accuracy", ratio=0.5)
    assert row["mean"] == direct[direct["setting"] == "task-agnostic"]["mean"].iloc[0]
    assert row["low"] == direct[direct["setting"] == "task-agnostic"]["low"].iloc[0]

    sentences = rank_verdicts(ranks, paired)
    assert len(sentences) == 2 * 2 * 2  # settings x ratios x metrics
    first = sentences[0]
    leader = ranks[(ranks["setting"] == "task-agnostic") & (ranks["ratio"] == 0.25)
                                          & (ranks["metric"] == "accuracy")].sort_values("mean_rank").iloc[0]
    assert first.startswith("Task-agnostic") and "25% removed, accuracy" in first
    assert f"lead {display(leader['criterion'])} {leader['mean_rank']:.2f}" in first
    p = paired[(paired["setting"] == "task-agnostic") & (paired["ratio"] == 0.25) & (paired["metric"] == "accuracy")
               & (paired["a"] == "man")].iloc[0]
    expected = "ranks better than" if p["high"] < 0 else "ranks worse than" if p["low"] > 0 else "is not distinguishable from"
    assert "MAN is" in first and expected in first.split("MAN is", 1)[1]

    table = rank_report_table(ranks, paired, setting="task-agnostic")
    assert list(table.columns) == ["25% · accuracy", "25% · bits per byte", "50% · accuracy", "50% · bits per byte"]
    assert table.index[-2].startswith("MAN − strongest other")
    md, tex = write_rank_report(ranks, paired, tmp_path, "report")
    assert sentences[0] in md.read_text() and r"\caption" in tex.read_text()
    fig = plot_rank_report(ranks, setting="task-specific")
    assert [ax.get_title() for ax in fig.axes] == ["accuracy", "bits per byte"]
    with pytest.raises(ValueError, match="no rows of setting"):
        plot_rank_report(ranks, setting="all-domain")


def display(criterion: str) -> str:
    from moepaper.pipeline.tables import display_name

    return display_name(criterion)


def test_rank_report_leaves_out_a_metric_family_the_suite_lacks():
    """The paper suite has accuracy-type tasks only: its report has no bits-per-byte cells, and no error."""
    from moepaper.pipeline.tables import rank_report

    df = as_frame([r for r in synthetic_records(seeds=(0, 1), items=20) if r["metric"].startswith("acc")])
    ranks, paired = rank_report(df, model="toy", n=20)
    assert set(ranks["metric"]) == {"accuracy"} and set(paired["metric"]) == {"accuracy"}


def test_rank_shift_between_two_models_against_a_hand_computation(tmp_path):
    """Every item orders a > b > c on model "toy" and c > b > a on model "other": ranks 1, 2, 3 and
    3, 2, 1 in every replicate, so the shifts are +2, 0, -2 with no width, Spearman's rho is -1
    and the leader changes; the same model twice shifts nothing and rho is 1."""
    from moepaper.pipeline.tables import rank_shift, rank_shift_table, rank_shift_verdicts, write_rank_shifts

    ref = _hand_frame({"a": [1.0, 1.0, 1.0], "b": [0.5, 0.5, 0.5], "c": [0.0, 0.0, 0.0]})
    other = _hand_frame({"a": [0.0, 0.0, 0.0], "b": [0.5, 0.5, 0.5], "c": [1.0, 1.0, 1.0]}).assign(model="other")
    df = pd.concat([ref, other], ignore_index=True)
    shift, summary = rank_shift(df, "toy", "other", n=200)
    rows = shift.set_index("criterion")
    assert rows["reference_rank"].to_dict() == {"a": 1.0, "b": 2.0, "c": 3.0}
    assert rows["other_rank"].to_dict() == {"a": 3.0, "b": 2.0, "c": 1.0}
    assert rows["shift"].to_dict() == {"a": 2.0, "b": 0.0, "c": -2.0}
    assert (rows["shift_low"] == rows["shift"]).all() and (rows["shift_high"] == rows["shift"]).all()
    assert summary["spearman"] == -1.0 and summary["spearman_low"] == summary["spearman_high"] == -1.0
    assert summary["same_leader"] is False and abs(summary["mean_abs_shift"] - 4 / 3) < 1e-12
    table = rank_shift_table([shift])
    assert table.loc["a", "other − toy"] == "+2.00 [+2.00, +2.00]"
    assert table.loc["Spearman ρ (ranking vs the reference)", "other − toy"] == "-1.00 [-1.00, -1.00]"
    (sentence,) = rank_shift_verdicts([shift], criteria=("a", "b"))
    assert "Spearman ρ -1.00" in sentence and "a different leader" in sentence
    assert "a 1.00 → 3.00, moves down" in sentence and "b 2.00 → 2.00, does not move distinguishably" in sentence
    md, tex = write_rank_shifts([[shift]], tmp_path, "shift")
    assert md.read_text().startswith("**Task-agnostic") and sentence.split(" a 1.00")[0] in md.read_text() and "+2.00 [+2.00, +2.00]" in md.read_text()
    assert r"25\% removed" in tex.read_text()
    # a model against an identical copy of itself
    copy = ref.assign(model="copy")
    _, same = rank_shift(pd.concat([ref, copy], ignore_index=True), "toy", "copy", n=50)
    assert same["spearman"] == 1.0 and same["mean_abs_shift"] == 0.0 and same["same_leader"] is True
    with pytest.raises(ValueError, match="no results of model 'nope'"):
        rank_shift(df, "toy", "nope", n=10)
    with pytest.raises(ValueError, match="compare two models"):
        rank_shift(df, "toy", "toy", n=10)
    with pytest.raises(ValueError, match="no 'task-specific' results"):
        rank_shift(df, "toy", "other", setting="task-specific", n=10)


def test_rank_shift_beyond_a_yardstick_against_a_hand_computation():
    """Reference orders a > b > c on every item; the yardstick (a retrained copy) keeps the order,
    the changed recipe reverses it: rho 1 and -1 in every replicate, difference +2 with no width,
    so the change moves the ranking further than retraining. A changed recipe that keeps the order
    too does not (difference 0)."""
    from moepaper.pipeline.tables import rank_shift_beyond

    ref = _hand_frame({"a": [1.0, 1.0, 1.0], "b": [0.5, 0.5, 0.5], "c": [0.0, 0.0, 0.0]})
    reversed_ = _hand_frame({"a": [0.0, 0.0, 0.0], "b": [0.5, 0.5, 0.5], "c": [1.0, 1.0, 1.0]}).assign(model="pooled")
    df = pd.concat([ref, ref.assign(model="seed1"), reversed_], ignore_index=True)
    out = rank_shift_beyond(df, "toy", "pooled", "seed1", n=200)
    assert out["rho_other"] == out["rho_other_low"] == out["rho_other_high"] == -1.0
    assert out["rho_yardstick"] == out["rho_yardstick_low"] == out["rho_yardstick_high"] == 1.0
    assert out["difference"] == out["difference_low"] == out["difference_high"] == 2.0 and out["beyond"] is True
    assert abs(out["mean_abs_shift_other"] - 4 / 3) < 1e-12 and out["mean_abs_shift_yardstick"] == 0.0
    assert "pooled moves the ranking further than retraining does" in out["sentence"] and "ρ -1.00 [-1.00, -1.00]" in out["sentence"]
    same = rank_shift_beyond(pd.concat([ref, ref.assign(model="seed1"), ref.assign(model="pooled")], ignore_index=True),
                             "toy", "pooled", "seed1", n=50)
    assert same["difference"] == 0.0 and same["beyond"] is False and "does not move the ranking distinguishably" in same["sentence"]
    with pytest.raises(ValueError, match="three models"):
        rank_shift_beyond(df, "toy", "pooled", "pooled", n=10)
    with pytest.raises(ValueError, match="no results of model 'nope'"):
        rank_shift_beyond(df, "toy", "pooled", "nope", n=10)
