"""`python -m moepaper.reproduce --config paper --rehearsal --allow-code-execution`, end to end on a CPU.

The four paper architectures at rehearsal size, the three calibration sources' stand-in rows,
the paper suite on stand-in data with the paper's protocol, two criteria at 25% plus the
unpruned model: notebooks 01, 02 and 04, in a fresh project root. About 10 minutes on 2 cores.
"""

import json
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from moepaper.pipeline.evaluation import PAPER_BENCHMARKS
from moepaper.pipeline.paper_models import PAPER_MODELS

REPO = Path(__file__).resolve().parents[2]
CALIBRATIONS = ("standin-c4", "standin-code", "standin-math")
CRITERIA = ("man", "frequency")
NOT_IN_LM_EVAL = {"livecodebench": "LiveCodeBench", "wildbench": "WildBench"}


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    root = tmp_path_factory.mktemp("rehearsal_root")
    shutil.copy(REPO / "pyproject.toml", root / "pyproject.toml")  # a checkout: pyproject.toml + notebooks/
    shutil.copytree(REPO / "notebooks", root / "notebooks")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", MPLBACKEND="Agg", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    cmd = [sys.executable, "-m", "moepaper.reproduce", "--config", "paper", "--rehearsal", "--allow-code-execution",
           "--root", str(root)]
    started = time.time()
    done = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=3600)
    print(f"\nrehearsal: {time.time() - started:.0f} s")
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return root / "runs" / "paper-rehearsal"


@pytest.mark.slow
def test_rehearsal_leaves_every_result(rehearsal):
    records = [json.loads(p.read_text()) for p in sorted((rehearsal / "results").rglob("*/*/*/*.json"))]  # not the settings records
    assert len(list((rehearsal / "results").glob("*/evaluation_settings.json"))) == len(PAPER_MODELS)
    per_model = len(PAPER_BENCHMARKS) * (1 + len(CALIBRATIONS) * len(CRITERIA))  # the unpruned model once per model
    assert len(records) == len(PAPER_MODELS) * per_model
    cells = Counter((r["model"], r["calibration"], r["criterion"]) for r in records)
    for model in PAPER_MODELS:
        assert cells[(model, "none", "unpruned")] == len(PAPER_BENCHMARKS)
        for calibration in CALIBRATIONS:
            for criterion in CRITERIA:
                assert cells[(model, calibration.replace("-", ":", 1), criterion)] == len(PAPER_BENCHMARKS), (model, calibration)
    for r in records:
        if r["benchmark"] in NOT_IN_LM_EVAL:
            assert r["status"] == "not run" and NOT_IN_LM_EVAL[r["benchmark"]] in r["note"], r
        else:  # MATH-500 checked by math-verify, HumanEval(+)/MBPP(+) executed
            assert r["status"] == "ok" and r["value"] is not None and r["n"] > 0, r
            assert r["evaluation"]["suite"] == "paper-rehearsal"
    ok = Counter(r["benchmark"] for r in records if r["status"] == "ok")
    assert set(ok) == {b.name for b in PAPER_BENCHMARKS} - set(NOT_IN_LM_EVAL)


@pytest.mark.slow
def test_rehearsal_leaves_statistics_tables_and_figures_per_model(rehearsal):
    for model in PAPER_MODELS:
        stats = sorted(p.name for p in (rehearsal / "statistics" / model).glob("*.safetensors"))
        assert stats == [f"{c}.safetensors" for c in CALIBRATIONS]
        figures = [p for p in (rehearsal / "figures").iterdir() if f"__{model}" in p.name]
        assert {".png", ".pdf", ".md", ".tex"} <= {p.suffix for p in figures}, (model, figures)
    executed = sorted(p.name for p in rehearsal.glob("*.ipynb"))
    assert len(executed) == len(PAPER_MODELS) * (2 * len(CALIBRATIONS) + 1)


def test_rehearsal_plan_swaps_only_weights_and_data():
    from moepaper import reproduce

    paper = reproduce.CONFIGS["paper"]
    config = reproduce.rehearsal(paper)
    steps = reproduce.plan(config, REPO, allow_code_execution=True)
    assert [m.model for m in config.models] == [f"rehearsal:{m.model}" for m in paper.models]
    assert all(m.calibrations == {f"standin:{k}": v for k, v in p.calibrations.items()} for m, p in zip(config.models, paper.models))
    evaluations = [params for notebook, _, params in steps if notebook.startswith("02")]
    assert len(evaluations) == 12 and all(p["suite"] == "paper-rehearsal" and p["allow_code_execution"] for p in evaluations)
    assert all(p["criteria"] == list(CRITERIA) and p["ratios"] == [0.25] for p in evaluations)
    assert all(str(out.relative_to(REPO)).startswith("runs/paper-rehearsal/") for _, out, _ in steps)
    assert not any("allow_code_execution" in p for _, _, p in reproduce.plan(paper, REPO))  # off unless asked
    with pytest.raises(SystemExit):
        reproduce.main(["--config", "tiny", "--rehearsal", "--list"])


@pytest.mark.slow
def test_bootstrap_reads_every_paper_suite_benchmark(rehearsal):
    """Issue 22, case 4: the per-item outcomes of every benchmark the paper suite runs (acc, acc_norm,
    exact_match, math_verify, pass@1, ...) are read with their direction, and each record's items give
    back its value (checked inside the bootstrap)."""
    from moepaper.pipeline.tables import bootstrap_average_ranks, load_results

    df = load_results(rehearsal / "results")
    ok = df[df["status"] == "ok"]
    metrics = {m.split(",")[0] for m in ok["metric"]}
    assert len(metrics) >= 3, metrics  # more than accuracy alone
    boot = bootstrap_average_ranks(df, n=50)
    assert set(boot["model"]) == set(PAPER_MODELS)
    assert set(boot["criterion"]) == set(CRITERIA)
    ranked = {b.name for b in PAPER_BENCHMARKS} - set(NOT_IN_LM_EVAL)
    assert set(boot.loc[boot["setting"] == "task-agnostic", "n_benchmarks"]) == {len(ranked)}
