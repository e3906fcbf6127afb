"""The reproduce plan of the embedded runs: both models, three calibrations x three seeds, the
limited-item named sweep and the limited-item grid sweep in separate results roots (no notebook runs)."""

from pathlib import Path

import pytest

from moepaper import reproduce
from moepaper.pipeline.calibration import parse_calibration_name
from moepaper.pipeline.results import result_path

REPO = Path(__file__).resolve().parents[2]
SOURCES = ["embedded:mixed", "embedded:code", "embedded:math"]
GENERAL = ["embedded:literature@draw0of3", "embedded:literature@draw1of3", "embedded:literature@draw2of3"]
SETTING = {"embedded:literature": "task-agnostic", "embedded:mixed": "all-domain", "embedded:code": "task-specific",
           "embedded:math": "task-specific"}


def steps_of(config_name, notebook):
    return [(out, params) for nb, out, params in reproduce.plan(reproduce.CONFIGS[config_name], REPO) if nb.startswith(notebook)]


@pytest.mark.parametrize("name", ["embedded", "embedded-16e"])
def test_embedded_plan_collects_every_draw_and_sweeps_named_on_all_and_grid_apart(name):
    collect = steps_of(name, "01")
    general = GENERAL if name == "embedded" else []  # the 16-expert ablation has no general-domain draws
    assert [(p["calibration"], p["seed"]) for _, p in collect] == [(d, 0) for d in general] + [(s, k) for s in SOURCES for k in (0, 1, 2)]
    assert all(p["model"] == name == p["model_name"] for _, p in collect)
    # disjoint draws: 28 windows of 512 tokens; seeded draws keep their 80
    assert [p["n_sequences"] for _, p in collect] == [28] * len(general) + [80] * 9
    paths = [p["output"] for _, p in collect]
    assert len(set(paths)) == 9 + len(general)
    assert f"data/statistics/{name}/embedded-mixed.safetensors" in paths  # seed 0 keeps the committed name
    assert f"data/statistics/{name}/embedded-mixed-seed1.safetensors" in paths
    assert f"data/statistics/{name}/embedded-math-seed2.safetensors" in paths

    evaluate = steps_of(name, "02")
    named = [p for _, p in evaluate if p["criteria"] == "named"]
    grid = [p for _, p in evaluate if p["criteria"] == "grid"]
    assert len(named) + len(grid) == len(evaluate)
    # the named sweep: every draw, every item, one results root
    assert sorted(p["calibration"] for p in named) == sorted(
        ["embedded:mixed", "embedded:mixed@seed1", "embedded:mixed@seed2", "embedded:code", "embedded:code@seed1",
         "embedded:code@seed2", "embedded:math", "embedded:math@seed1", "embedded:math@seed2"] + general)
    assert all(p["limit"] == reproduce.NAMED_LIMIT and p["results_dir"] == "data/results/named" for p in named)
    # the grid sweep: seed 0 only, the suite's former 80 / 30 items, another root
    assert all(p["limit"] == {"mc": 80, "ppl": 30} and p["results_dir"] == "data/results/grid" for p in grid)
    expected_grid = ["embedded:mixed"] if name == "embedded" else SOURCES
    assert [p["calibration"] for p in grid] == expected_grid
    for p in named + grid:
        source, seed = parse_calibration_name(p["calibration"])  # the name matches the statistics it sweeps
        assert p["statistics"] == next(c["output"] for _, c in collect
                                       if parse_calibration_name(c["calibration"])[0] == source
                                       and (c["seed"] if "@draw" not in c["calibration"] else parse_calibration_name(c["calibration"])[1]) == seed
                                       and ("@draw" in c["calibration"]) == ("@draw" in p["calibration"]))
        assert p["setting"] == SETTING[source]
        assert p["ratios"] == [0.25, 0.5] and p["suite"] == "local" and p["threads"] == 1
    # each draw is collected before it is swept
    steps = reproduce.plan(reproduce.CONFIGS[name], REPO)
    for i, (notebook, _, params) in enumerate(steps):
        if notebook.startswith("02"):
            assert any(nb.startswith("01") and c["output"] == params["statistics"] for nb, _, c in steps[:i])
    executed = [out.name for out, _ in steps_of(name, "01") + steps_of(name, "02")]
    assert len(set(executed)) == len(executed)  # no two steps share an executed copy

    (_, tables), = steps_of(name, "04")
    assert tables["results_dir"] == "data/results/named" and tables["grid_results_dir"] == "data/results/grid"
    assert tables["statistics"] == {s: f"data/statistics/{name}/{s.replace(':', '-').replace('@', '-')}.safetensors"
                                    for s in general[:1] + SOURCES}
    science = [p for nb, _, p in reproduce.plan(reproduce.CONFIGS[name], REPO) if nb.startswith(("00", "03"))]
    assert len(science) == 3 and all(p["model"] == name for p in science)  # 00, its solutions, 03
    # the default model's tables compare both models' rankings; the ablation's do not
    assert tables.get("compare_models") == (["embedded", "embedded-16e"] if name == "embedded" else None)
    # and set its task-agnostic ranking beside the retrained and the same-shape pooled models'
    assert tables.get("shift_models") == (["embedded-pooled", "embedded-seed1"] if name == "embedded" else None)


def test_seeded_results_land_in_their_own_folder():
    path = result_path("data/results/named", "embedded", "embedded:mixed@seed1", "man", 8, "code_mc")
    assert str(path) == "data/results/named/embedded/embedded-mixed-seed1/S_1_0_1__removed8/code_mc.json"


def test_committed_pooled_results_are_the_grid_sweeps_seed_zero():
    """The moved results sit where the embedded-16e grid sweep writes, under its settings (moved twice:
    from data/results/embedded, then from embedded-pooled when that name went to the same-shape ablation)."""
    import json

    folder = REPO / "data" / "results" / "grid" / "embedded-16e"
    settings = json.loads((folder / "evaluation_settings.json").read_text())
    assert settings["limit"] == reproduce.GRID_LIMIT and settings["suite"] == "local"
    assert {p.name for p in folder.iterdir() if p.is_dir()} == {"none", "embedded-mixed", "embedded-code", "embedded-math"}
    record = json.loads(next((folder / "embedded-code").rglob("code_mc.json")).read_text())
    assert record["model"] == "embedded-16e" and record["calibration"] == "embedded:code"
    statistics = record["provenance"]["statistics"]
    assert statistics["file"] == "data/statistics/embedded-16e/embedded-code.safetensors"
    assert (REPO / statistics["file"]).exists()
    from moepaper import ExpertStatistics

    stats = ExpertStatistics.load(REPO / statistics["file"])
    assert stats.checksum == record["provenance"]["statistics_hash"] and stats.metadata["model_name"] == "embedded-16e"


def test_default_runs_both_embedded_models_and_the_others_keep_one_sweep(capsys):
    assert reproduce.DEFAULT_CONFIGS == ("embedded-16e", "embedded")  # the comparison in embedded's 04 sees both
    assert reproduce.main(["--list"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert any("runs/embedded/01__embedded__embedded-mixed-seed2" in line for line in listed)
    assert any("runs/embedded-16e/02__embedded-16e__embedded-code__grid" in line for line in listed)
    assert not any("runs/embedded-pooled/" in line or "runs/embedded-seed1/" in line for line in listed)  # not default yet
    for name in ("paper", "tiny"):
        steps = reproduce.plan(reproduce.CONFIGS[name], REPO)
        models = reproduce.CONFIGS[name].models
        calibrations = sum(len(m.calibrations) for m in models)
        assert sum(nb.startswith("01") for nb, _, _ in steps) == calibrations == sum(nb.startswith("02") for nb, _, _ in steps)
        assert all(p["calibration"] in m.calibrations for m in models for nb, _, p in steps if nb.startswith("02"))


def test_a_sweep_over_an_uncollected_draw_is_refused():
    config = reproduce.CONFIGS["tiny"]
    model = config.models[0]
    bad = reproduce.ModelRun(model.name, model.model, model.calibrations, model.ratios, seeds=(0,),
                             sweeps=[reproduce.Sweep("x", seeds=(1,))])
    with pytest.raises(ValueError, match=r"seeds \[1\]"):
        reproduce.plan(reproduce.RunConfig("t", [bad], "s", "r", "f"), REPO)


# ---------------------------------------------------------------- names and roots (issue 22)


@pytest.mark.parametrize("argv, valid", [
    (["--only", "04_tables", "--list"], "04_tables_and_figures.ipynb"),  # a typo
    (["--only", "04", "05_nothing.ipynb", "--list"], "01_collect_statistics.ipynb"),  # one good name, one unknown
    (["--config", "embeded", "--list"], "embedded-pooled"),
])
def test_an_unknown_notebook_or_configuration_exits_non_zero_listing_the_valid_names(argv, valid, capsys):
    with pytest.raises(SystemExit) as exit_info:
        reproduce.main(argv)
    assert exit_info.value.code != 0
    error = capsys.readouterr().err
    assert valid in error and argv[1 if argv[0] == "--config" else -2] in error


def test_only_accepts_file_names_names_without_ipynb_and_numbers(capsys):
    listed = {}
    for name in ("04_tables_and_figures.ipynb", "04_tables_and_figures", "04"):
        assert reproduce.main(["--config", "tiny", "--only", name, "--list"]) == 0
        listed[name] = capsys.readouterr().out.splitlines()
    assert len(listed["04"]) == 1 and listed["04"][0].startswith("04_tables_and_figures.ipynb runs/tiny/04__tiny-qwen3")
    assert listed["04_tables_and_figures.ipynb"] == listed["04_tables_and_figures"] == listed["04"]


def test_outside_a_checkout_the_root_is_the_working_directory_never_the_installed_one(tmp_path, monkeypatch, capsys):
    from moepaper.project import project_root

    monkeypatch.delenv("MOEPAPER_ROOT", raising=False)
    monkeypatch.chdir(tmp_path)
    assert project_root() == tmp_path.resolve()  # not the checkout moepaper is installed from
    assert project_root(REPO / "moepaper") == REPO  # inside a checkout: that checkout
    for argv in (["--list"], ["--root", str(tmp_path), "--list"]):
        with pytest.raises(SystemExit) as exit_info:
            reproduce.main(argv)
        assert exit_info.value.code != 0
        assert f"{tmp_path.resolve()} is not a moepaper checkout" in capsys.readouterr().err
    assert reproduce.main(["--root", str(REPO), "--config", "tiny", "--list"]) == 0
    assert "runs/tiny/04__tiny-qwen3" in capsys.readouterr().out
