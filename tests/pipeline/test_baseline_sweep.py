"""The sweep evaluates MoNE with novices, its ranking re-routed, and AIMER once for every calibration.

A fake `evaluation.evaluate` stands in for lm-eval: it records which way the model was pruned
when it was called (novices on the experts modules, or masks on the routers).
"""

from pathlib import Path

import pandas as pd
import pytest

from moepaper import collect_statistics
from moepaper.architecture import find_moe_layers
from moepaper.pipeline import checkpoints, evaluation
from moepaper.pipeline.results import read_result, sweep, write_json_atomic
from moepaper.testbed.tiny import random_batch, tiny_model, tiny_tokenizer

BASELINES = ["mone", "mone-ranking", "aimer"]


class FakeEvaluate:
    def __init__(self):
        self.calls = []

    def __call__(self, model, tokenizer, suite, *, benchmarks, **kwargs):
        layers = find_moe_layers(model)
        self.calls.append({
            "novices": any(getattr(l.experts.__dict__.get("forward"), "_moepaper_novice", False) for l in layers),
            "masked": any(getattr(l.router.__dict__.get("forward"), "_moepaper_mask", False) for l in layers),
        })
        suite = evaluation.get_suite(suite)
        return pd.DataFrame([evaluation._row(b, suite, value=0.5, stderr=0.01, n=3, status=evaluation.OK, higher_is_better=True)
                             for b in suite.benchmarks if b.name in benchmarks], columns=evaluation.RESULT_COLUMNS)


@pytest.fixture(scope="module")
def tiny():
    model = tiny_model("qwen3_moe")
    stats = [collect_statistics(model, [random_batch(batch=4, seq_len=32, seed=10 * c + i) for i in range(2)], progress=False,
                                calibration=name) for c, name in enumerate(("cal-a", "cal-b"))]
    return model, tiny_tokenizer(), stats


def test_novices_for_mone_masks_for_the_others_aimer_reused_across_calibrations(tiny, tmp_path, monkeypatch):
    model, tokenizer, (stats_a, stats_b) = tiny
    fake = FakeEvaluate()
    monkeypatch.setattr(evaluation, "evaluate", fake)
    options = dict(criteria=BASELINES, ratios=[0.5], suite="smoke", model_name="tiny", out_dir=tmp_path, progress=False)
    seen = []
    paths = sweep(model, tokenizer, stats_a, include_unpruned=False, on_entry=lambda e, p: seen.append(e.name), **options)
    assert seen == BASELINES
    assert [(c["novices"], c["masked"]) for c in fake.calls] == [(True, False), (False, True), (False, True)]
    records = {read_result(p)["criterion"]: read_result(p) for p in paths}
    assert records["mone"]["replacement"] == "novice" and records["mone-ranking"]["replacement"] == "reroute"
    assert records["mone"]["kept"] == records["mone-ranking"]["kept"]  # one ranking, two evaluations
    assert records["mone"]["provenance"]["same_kept_experts_as"] is None
    assert records["mone-ranking"]["provenance"]["same_kept_experts_as"] is None
    assert {p.parent.name for p in paths} == {"mone__removed4", "mone-ranking__removed4", "aimer__removed4"}

    # another calibration: AIMER keeps the same experts (weights only), so its results are copied
    fake.calls.clear()
    paths_b = sweep(model, tokenizer, stats_b, include_unpruned=False, **options)
    aimer_b = [read_result(p) for p in paths_b if read_result(p)["criterion"] == "aimer"]
    assert aimer_b and all(r["provenance"]["same_kept_experts_as"].startswith("tiny/cal-a/aimer__removed4") for r in aimer_b)
    assert aimer_b[0]["kept"] == records["aimer"]["kept"] and aimer_b[0]["calibration"] == "cal-b"
    # MoNE's novices are means over cal-b: never copied from cal-a, even where the kept experts agree
    mone_b = [read_result(p) for p in paths_b if read_result(p)["criterion"] == "mone"]
    assert all(r["provenance"]["same_kept_experts_as"] is None for r in mone_b)
    assert sum(c["novices"] for c in fake.calls) == 1

    # resuming skips everything
    fake.calls.clear()
    sweep(model, tokenizer, stats_b, include_unpruned=False, **options)
    assert fake.calls == []


def test_a_masked_mone_result_of_before_novices_is_recomputed(tiny, tmp_path, monkeypatch):
    model, tokenizer, (stats_a, _) = tiny
    fake = FakeEvaluate()
    monkeypatch.setattr(evaluation, "evaluate", fake)
    options = dict(criteria=["mone"], ratios=[0.5], suite="smoke", model_name="tiny", out_dir=tmp_path, progress=False,
                   include_unpruned=False)
    paths = sweep(model, tokenizer, stats_a, **options)
    for path in paths:  # make it look like a record written before novices existed
        record = read_result(path)
        record.pop("replacement")
        write_json_atomic(path, record)
    fake.calls.clear()
    sweep(model, tokenizer, stats_a, **options)
    assert [c["novices"] for c in fake.calls] == [True]


def test_vllm_backend_refuses_novices(tiny, tmp_path):
    model, tokenizer, (stats_a, _) = tiny
    with pytest.raises(NotImplementedError, match="novices"):
        sweep(model, tokenizer, stats_a, criteria=["man", "mone"], ratios=[0.5], suite="smoke", model_name="tiny",
              out_dir=tmp_path / "results", progress=False, backend="vllm",
              checkpoints={"checkpoint_dir": tmp_path / "ckpt", "evaluate_checkpoint": lambda *a, **k: None})
    assert not (tmp_path / "ckpt").exists() or not list((tmp_path / "ckpt").rglob("config.json"))
    with pytest.raises(NotImplementedError, match="novices"):
        checkpoints.plan_checkpoints(model, stats_a, criteria=["mone"], ratios=[0.5], checkpoint_dir=tmp_path / "plan")
    plan = checkpoints.plan_checkpoints(model, stats_a, criteria=["aimer", "mone-ranking"], ratios=[0.5],
                                        checkpoint_dir=tmp_path / "plan", model_name="tiny", include_unpruned=False)
    assert [Path(str(r.checkpoint)).name for r in plan] == ["aimer__removed4", "mone-ranking__removed4"]


def test_migration_renames_only_folders_whose_kept_experts_mone_ranking_selects(tiny, tmp_path):
    from moepaper.criteria import expert_scores
    from moepaper.pipeline.keys import slug
    from moepaper.pipeline.migrations import rename_mone_ranking
    from moepaper.pruning import select_experts

    _, _, (stats_a, _) = tiny
    stats_dir = tmp_path / "statistics"
    stats_dir.mkdir()
    stats_a.save(stats_dir / f"{slug('cal-a')}.safetensors")
    kept = [k.tolist() for k in select_experts(expert_scores(stats_a, "mone-ranking"), ratio=0.5)]
    other = [[e for e in range(8) if e not in k][:4] for k in kept]  # a different selection
    for folder, chosen in (("mone__removed4", kept), ("mone__removed2", other)):
        path = tmp_path / "results" / "tiny" / "cal-a" / folder / "t.json"
        path.parent.mkdir(parents=True)
        write_json_atomic(path, {"criterion": "mone", "calibration": "cal-a", "ratio": 0.5, "kept": chosen})
    dry = rename_mone_ranking(tmp_path / "results", stats_dir)
    assert [Path(f).name for f in dry["renamed"]] == ["mone__removed4"]
    assert [Path(f).name for f in dry["kept_differ"]] == ["mone__removed2"]
    assert (tmp_path / "results" / "tiny" / "cal-a" / "mone__removed4").exists(), "a dry run moves nothing"
    rename_mone_ranking(tmp_path / "results", stats_dir, apply=True)
    moved = read_result(tmp_path / "results" / "tiny" / "cal-a" / "mone-ranking__removed4" / "t.json")
    assert moved["criterion"] == "mone-ranking" and moved["replacement"] == "reroute" and moved["kept"] == kept
    assert not (tmp_path / "results" / "tiny" / "cal-a" / "mone__removed4").exists()
    assert (tmp_path / "results" / "tiny" / "cal-a" / "mone__removed2").exists()


def test_relabel_setting_rewrites_only_the_draws_of_one_source(tmp_path):
    """The mixed calibration's records (every draw) become "all-domain"; other calibrations and
    non-result files are untouched; a dry run changes nothing; an unknown setting is refused."""
    import json

    from moepaper.pipeline.migrations import relabel_setting
    from moepaper.pipeline.results import results_lock, write_json_atomic, ResultsLockedError

    files = {}
    for calibration in ("embedded:mixed", "embedded:mixed@seed1", "embedded:mixed@draw0of3", "embedded:code", "embedded:mixedup"):
        path = tmp_path / "m" / calibration.replace(":", "-").replace("@", "-") / "x" / "code_mc.json"
        write_json_atomic(path, {"calibration": calibration, "setting": "task-agnostic", "benchmark": "code_mc", "criterion": "man"})
        files[calibration] = path
    write_json_atomic(tmp_path / "m" / "evaluation_settings.json", {"suite": "local"})
    report = relabel_setting(tmp_path, "embedded:mixed", "all-domain")
    assert len(report["relabelled"]) == 3
    assert all(json.loads(p.read_text())["setting"] == "task-agnostic" for p in files.values())  # dry run
    relabel_setting(tmp_path, "embedded:mixed", "all-domain", apply=True)
    settings = {c: json.loads(p.read_text())["setting"] for c, p in files.items()}
    assert settings == {"embedded:mixed": "all-domain", "embedded:mixed@seed1": "all-domain",
                        "embedded:mixed@draw0of3": "all-domain", "embedded:code": "task-agnostic",
                        "embedded:mixedup": "task-agnostic"}
    assert relabel_setting(tmp_path, "embedded:mixed", "all-domain")["relabelled"] == []
    with pytest.raises(ValueError, match="setting="):
        relabel_setting(tmp_path, "embedded:mixed", "general")
    with results_lock(tmp_path / "m"):  # a sweep writing there: refused, naming the lock
        with pytest.raises(ResultsLockedError):
            relabel_setting(tmp_path, "embedded:code", "task-specific", apply=True)
