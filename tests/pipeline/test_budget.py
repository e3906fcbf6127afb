"""The GPU budget: its grid is the `paper` configuration of moepaper.reproduce, and docs/gpu.md shows its table."""

from pathlib import Path

from moepaper.criteria import resolve_criteria
from moepaper.pipeline import budget
from moepaper.pipeline.evaluation import PAPER_BENCHMARKS
from moepaper.reproduce import CONFIGS

GPU_DOC = Path(__file__).resolve().parents[2] / "docs" / "gpu.md"


def test_grid_counts_match_the_paper_configuration():
    paper = CONFIGS["paper"]
    assert [m.name for m in paper.models] == list(budget.PAPER_MODELS)
    for m in paper.models:
        grid = budget.grid(m.name)
        criteria = resolve_criteria(m.evaluate["criteria"])
        assert grid["criteria"] == [c.name for c in criteria] and "mone" in grid["criteria"]
        assert grid["ratios"] == list(m.ratios)
        assert grid["calibrations"] == list(m.calibrations)
        assert grid["evaluations"] == len(criteria) * len(m.ratios) * len(m.calibrations) + 1
        assert grid["benchmark_runs"] == grid["evaluations"] * 14
    assert {m.name: grid_size for m in paper.models for grid_size in [budget.grid(m.name)["evaluations"]]} == {
        "olmoe": 34, "deepseek_v2_lite": 34, "ernie": 67, "qwen3": 67}


def test_workload_covers_the_benchmarks_lm_eval_runs():
    assert list(budget.WORKLOAD) == [b.name for b in PAPER_BENCHMARKS if b.task is not None]


def test_estimate_is_consistent():
    row = budget.estimate("qwen3")
    assert row["gpus"] == {80: 1, 141: 1}
    assert 0 < row["hours"]["calibration"] < row["hours"]["vllm"] < row["hours"]["hf"]
    assert row["tokens_per_s"]["vllm"] > row["tokens_per_s"]["hf"]


def test_gpu_doc_shows_the_computed_table():
    table = budget.budget_table()
    assert table in GPU_DOC.read_text(), "docs/gpu.md's budget table is stale: paste `python -m moepaper.pipeline.budget`"
