"""The paper notebooks: committed clean, and every one executes under papermill (tiny model)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from moepaper import reproduce

REPO = Path(__file__).resolve().parents[2]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
EXPECTED = {"00_formulation", "01_collect_statistics", "02_prune_and_evaluate", "03_damage_check", "04_tables_and_figures"}


def test_every_notebook_is_there():
    assert {p.stem for p in NOTEBOOKS} == EXPECTED


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_without_outputs_and_parameterised(path):
    nb = json.loads(path.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert all(not c.get("outputs") for c in code), f"{path.name} carries outputs: strip them"
    assert all(c.get("execution_count") is None for c in code), f"{path.name} carries execution counts"
    tagged = [c for c in code if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, f"{path.name} needs exactly one cell tagged 'parameters'"
    assert nb["metadata"]["kernelspec"] == {"name": reproduce.KERNEL_NAME, "display_name": "Python (moepaper)", "language": "python"}


def test_plan_covers_every_notebook_per_configuration():
    for name, config in reproduce.CONFIGS.items():
        notebooks = {step[0] for step in reproduce.plan(config, REPO)}
        assert {"01_collect_statistics.ipynb", "02_prune_and_evaluate.ipynb", "04_tables_and_figures.ipynb"} <= notebooks, name
    paper = reproduce.CONFIGS["paper"]
    assert len(paper.models) == 4
    from moepaper.pipeline.models import resolve_model_name

    assert {resolve_model_name(m.model) for m in paper.models} == {
        "allenai/OLMoE-1B-7B-0125-Instruct",
        "deepseek-ai/DeepSeek-V2-Lite-Chat",
        "baidu/ERNIE-4.5-21B-A3B-PT",
        "Qwen/Qwen3-30B-A3B-Instruct-2507",
    }
    assert all(set(m.calibrations.values()) == {"task-agnostic", "task-specific"} for m in paper.models)


@pytest.mark.slow
def test_tiny_configuration_executes_every_notebook_and_resumes():
    """`python -m moepaper.reproduce --config tiny`: all notebooks, then a rerun that skips them."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", MPLBACKEND="Agg", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "moepaper.reproduce", "--config", "tiny", "--force"]
    first = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    runs = REPO / "runs" / "tiny"
    for notebook in EXPECTED:
        assert list(runs.glob(f"{notebook[:2]}*.ipynb")), f"no executed copy of {notebook}"
    assert list((runs / "statistics").rglob("*.safetensors"))
    assert list((runs / "results").rglob("*.json"))
    figures = {p.suffix for p in (runs / "figures").iterdir()}
    assert {".png", ".pdf", ".md", ".tex"} <= figures
    # executed copies carry outputs; the committed notebooks stay clean (checked above)
    again = subprocess.run(cmd[:-1], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("(done)") == len(reproduce.plan(reproduce.CONFIGS["tiny"], REPO))


def test_notebooks_run_in_the_given_root_whatever_the_environment_says(tmp_path, monkeypatch):
    """The kernel sees the run's project root (MOEPAPER_ROOT) and cwd; the environment is restored after."""
    import papermill

    root = tmp_path / "clone"
    (root / "notebooks").mkdir(parents=True)
    (root / "notebooks" / "x.ipynb").write_text("{}")
    seen = {}

    def execute(path, output, *, cwd, **kwargs):
        seen.update(root=os.environ.get("MOEPAPER_ROOT"), cwd=cwd, path=path)
        Path(output).write_text("{}")

    monkeypatch.setattr(papermill, "execute_notebook", execute)
    monkeypatch.setattr(reproduce, "ensure_kernel", lambda: "moepaper")
    monkeypatch.setenv("MOEPAPER_ROOT", str(tmp_path / "other-clone"))
    assert reproduce.run_notebook("x.ipynb", root / "runs" / "x.ipynb", {}, root=root)
    assert seen == {"root": str(root), "cwd": str(root), "path": str(root / "notebooks" / "x.ipynb")}
    assert os.environ["MOEPAPER_ROOT"] == str(tmp_path / "other-clone")
