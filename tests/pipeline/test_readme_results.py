"""The README's headline table and verdicts are the committed results' (figures/rank_report__embedded.md,
which notebook 04 writes), recomputed here from data/results/named."""

from pathlib import Path

import pytest

from moepaper.pipeline.tables import load_results, rank_report, rank_report_table, rank_verdicts, to_markdown

REPO = Path(__file__).resolve().parents[2]
REPORT = REPO / "figures" / "rank_report__embedded.md"


@pytest.fixture(scope="module")
def results():
    return load_results(REPO / "data" / "results" / "named")


@pytest.fixture(scope="module")
def report(results):
    return rank_report(results[results["model"] == "embedded"], model="embedded", n=1000, seed=0)  # notebook 04's defaults


def test_committed_report_is_what_the_committed_results_give(report):
    ranks, paired = report
    text = REPORT.read_text()
    assert set(ranks["setting"]) == {"task-agnostic", "task-specific", "all-domain"}
    for setting in ("task-agnostic", "task-specific", "all-domain"):
        assert to_markdown(rank_report_table(ranks, paired, setting=setting)) in text, setting
    for sentence in rank_verdicts(ranks, paired):
        assert sentence in text


def test_readme_shows_the_task_agnostic_table_and_its_verdicts(report):
    ranks, paired = report
    readme = (REPO / "README.md").read_text()
    assert to_markdown(rank_report_table(ranks, paired, setting="task-agnostic")) in readme
    agnostic = [s for s in rank_verdicts(ranks, paired) if s.startswith("Task-agnostic")]
    assert len(agnostic) == 4 and all(s in readme for s in agnostic)
    # the task-agnostic setting is the paper's: three disjoint general-domain draws, every benchmark
    cell = ranks[ranks["setting"] == "task-agnostic"]
    assert set(cell["n_draws"]) == {3} and set(cell["n_benchmarks"]).issubset({3, 6})


def test_readme_sets_the_retrained_models_ranking_beside_the_default(results):
    """The retrained model's (embedded-seed1) task-agnostic ranking at 25%, accuracy, beside the
    default's: the README's table and sentence are what the committed results give, and notebook
    04 wrote the same table (figures/rank_shift__embedded.md)."""
    from moepaper.pipeline.tables import rank_shift, rank_shift_table, rank_shift_verdicts

    shift, summary = rank_shift(results, "embedded", "embedded-seed1", setting="task-agnostic", ratio=0.25,
                                metric="accuracy", n=1000, seed=0)  # notebook 04's defaults
    table = to_markdown(rank_shift_table([shift]))
    readme = (REPO / "README.md").read_text()
    assert table in readme
    assert rank_shift_verdicts([shift])[0] in readme and rank_shift_verdicts([shift])[0] in (REPO / "figures" / "rank_shift__embedded.md").read_text()
    assert summary["n_criteria"] == 11


def test_readme_answers_the_balance_question_with_the_same_shape_ablation(results):
    """The same-shape ablation (embedded-pooled) beside the default and the retrained default at 25%,
    accuracy: the README's table is notebook 04's (figures/rank_shift__embedded.md, the models in
    notebook 04's order), and its sentences, the pooled model against the default and against the
    retraining yardstick, are what the committed results give."""
    from moepaper.pipeline.tables import rank_shift, rank_shift_beyond, rank_shift_table, rank_shift_verdicts

    kw = dict(setting="task-agnostic", ratio=0.25, metric="accuracy", n=1000, seed=0)  # notebook 04's defaults
    pooled, summary = rank_shift(results, "embedded", "embedded-pooled", **kw)
    seed1, _ = rank_shift(results, "embedded", "embedded-seed1", **kw)
    table = to_markdown(rank_shift_table([pooled, seed1]))
    readme = (REPO / "README.md").read_text()
    written = (REPO / "figures" / "rank_shift__embedded.md").read_text()
    assert table in readme and table in written
    assert rank_shift_verdicts([pooled])[0] in readme
    beyond = rank_shift_beyond(results, "embedded", "embedded-pooled", "embedded-seed1", **kw)
    assert beyond["sentence"] in readme and beyond["sentence"] in written
    assert summary["n_criteria"] == 11
