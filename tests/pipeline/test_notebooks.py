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
EXPECTED = {"00_formulation", "00_formulation_solutions", "01_collect_statistics", "02_prune_and_evaluate", "03_damage_check",
            "04_tables_and_figures"}


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
    for name in ("embedded-pooled", "embedded-seed1"):  # the protocol's budget: general x 3 disjoint draws, code and math x 1
        (model,) = reproduce.CONFIGS[name].models
        assert [c for c, _ in model.draws()] == [f"embedded:literature@draw{k}of3" for k in range(3)] + ["embedded:code", "embedded:math"]
        assert not reproduce.CONFIGS[name].run_science and reproduce.CONFIGS[name].grid_results_dir is None


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
    assert (runs / reproduce.SOLUTIONS).exists(), "the exercise solutions did not run"
    # the kernel talks over IPC and is not interrupted at shutdown; the notebooks' bars go to the terminal
    for noise in ("without encryption", "KeyboardInterrupt caught", "RuntimeWarning"):
        assert noise not in first.stdout + first.stderr, noise
    for executed in runs.glob("*.ipynb"):
        text = executed.read_text()
        assert "widget-view" not in text and "it/s]" not in text, f"{executed.name} carries a progress bar"
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


def test_solutions_run_after_00_with_its_parameters():
    for name, config in reproduce.CONFIGS.items():
        steps = [(nb, params) for nb, _, params in reproduce.plan(config, REPO)]
        names = [nb for nb, _ in steps]
        if "00_formulation.ipynb" in names:
            i = names.index("00_formulation.ipynb")
            assert names[i + 1] == reproduce.SOLUTIONS, name
            assert steps[i + 1][1] == steps[i][1], name


def test_section_headings_are_what_the_terminal_shows():
    import nbformat

    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell("x = 1"),
        nbformat.v4.new_markdown_cell("# Title\n\n## 1 · Load\ntext"),
        nbformat.v4.new_code_cell("y = 2"),
        nbformat.v4.new_markdown_cell("no heading here"),
        nbformat.v4.new_code_cell("z = 3"),
        nbformat.v4.new_markdown_cell("## 2 · Prune"),
        nbformat.v4.new_code_cell("w = 4"),
    ])
    assert reproduce._headings(nb) == ["", "1 · Load", "1 · Load", "1 · Load", "1 · Load", "2 · Prune", "2 · Prune"]


def test_html_copy_is_rendered_without_timestamps_and_reproducibly(tmp_path):
    import nbformat

    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("# Hello $x^2$"), nbformat.v4.new_code_cell("1 + 1")])
    nb.cells[1].outputs = [nbformat.v4.new_output("execute_result", {"text/plain": "2"}, execution_count=1)]
    nb.cells[1].metadata["papermill"] = {"start_time": "2026-11-30T22:00:00.123456", "end_time": "2026-11-30T22:00:01.0"}
    nb.cells[1].metadata["execution"] = {"iopub.execute_input": "2026-11-30T22:00:00.2"}
    nb.metadata["papermill"] = {"start_time": "2026-11-30T21:59:59.0", "duration": 1.5}
    executed = tmp_path / "x.ipynb"
    nbformat.write(nb, executed)
    first = reproduce.render_html(executed, tmp_path / "docs" / "x.html").read_text()
    assert "Hello" in first and "2026-11-30" not in first
    assert reproduce.render_html(executed, tmp_path / "docs" / "x.html").read_text() == first


def test_html_copy_does_not_depend_on_the_checkout_or_papermills_random_cell_id(tmp_path):
    """Two checkouts executing the same notebook render the same page."""
    import nbformat

    pages = []
    for checkout, cell_id, table in (("a", "96c68bc4", "1e6c6"), ("b", "543330ea", "25790")):
        root = tmp_path / checkout
        root.mkdir()
        params = nbformat.v4.new_code_cell("model = 'embedded'", metadata={"tags": ["injected-parameters"]})
        params["id"] = cell_id  # papermill draws a new one on every run
        code = nbformat.v4.new_code_cell("print(root)")
        code["id"] = "print-root"  # the notebook's own cells keep their ids
        code.outputs = [nbformat.v4.new_output("stream", name="stdout", text=f"project {root.resolve()}\n"),
                        nbformat.v4.new_output("display_data", {"text/html": f'<table id="T_{table}"><tr id="T_{table}_row0"></tr></table>'})]  # pandas Styler
        nb = nbformat.v4.new_notebook(cells=[params, code])
        nbformat.write(nb, root / "x.ipynb")
        pages.append(reproduce.render_html(root / "x.ipynb", root / "x.html", root).read_text())
    assert pages[0] == pages[1]
    assert "project ." in pages[0] and str(tmp_path) not in pages[0]


def test_embedded_configuration_renders_html_under_docs():
    assert reproduce.CONFIGS["embedded"].html_dir == "docs/notebooks"
    assert reproduce.CONFIGS["tiny"].html_dir is None and reproduce.CONFIGS["paper"].html_dir is None


def test_kernel_manager_uses_ipc_and_does_not_interrupt_a_kernel_being_shut_down():
    import asyncio
    import os

    from papermill.engines import papermill_engines

    assert reproduce._engine() == "moepaper" and papermill_engines.get_engine("moepaper") is papermill_engines.get_engine(reproduce._engine())
    manager_class = reproduce._local_kernel_manager()
    manager = manager_class()
    assert manager.transport == ("tcp" if os.name == "nt" else "ipc")
    interrupted = []

    async def parent_interrupt(self):
        interrupted.append(True)

    base = manager_class.__mro__[1]
    previous = base._async_interrupt_kernel
    base._async_interrupt_kernel = parent_interrupt
    try:
        manager.shutting_down = True
        asyncio.run(manager._async_interrupt_kernel())
        assert interrupted == []
        manager.shutting_down = False
        asyncio.run(manager._async_interrupt_kernel())
        assert interrupted == [True]
    finally:
        base._async_interrupt_kernel = previous


def test_two_kernels_at_once_never_share_ipc_sockets():
    """jupyter_client's default IPC prefix is "kernel-ipc" in the working directory: two runs in one
    checkout at once (two configurations, a test beside a sweep) bound the same sockets and read
    each other's messages ("Invalid Signature"). Each kernel has its own prefix, outside the checkout."""
    import os

    manager_class = reproduce._local_kernel_manager()
    first, second = manager_class(kernel_name="moepaper"), manager_class(kernel_name="moepaper")
    if os.name == "nt":
        pytest.skip("IPC sockets are not used on Windows")
    assert first.ip != second.ip
    assert all(os.path.isabs(m.ip) and "kernel-ipc" != os.path.basename(m.ip) for m in (first, second))
    assert not str(first.ip).startswith(str(REPO)) and len(first.ip) < 100  # unix socket paths are short


def test_html_copies_only_of_notebooks_without_timings():
    """01 and 02 print how long the pass and each entry took; their pages would change on every run."""
    from pathlib import Path

    assert not reproduce.wants_html(Path("runs/embedded/01__embedded__embedded-mixed.ipynb"))
    assert not reproduce.wants_html(Path("runs/embedded/02__embedded__embedded-mixed__named.ipynb"))
    assert all(reproduce.wants_html(Path(f"runs/embedded/{name}")) for name in
               ("00_formulation.ipynb", "00_formulation_solutions.ipynb", "03_damage_check.ipynb", "04__embedded.ipynb"))
    assert reproduce.CONFIGS["embedded-16e"].html_dir is None  # one set of pages: the default model's


def test_done_markers_follow_the_versions_and_what_04_read(tmp_path, monkeypatch):
    """Issue 22: a step is done only for the same versions (moepaper, lm-eval, transformers, torch); notebook
    04 is done only for the same results and statistics it read; 02 does not depend on the results it writes."""
    import papermill

    from moepaper import provenance

    root = tmp_path / "clone"
    (root / "notebooks").mkdir(parents=True)
    for name in ("04_tables_and_figures.ipynb", "02_prune_and_evaluate.ipynb"):
        (root / "notebooks" / name).write_text("{}")
    record = root / "results" / "m" / "r.json"
    record.parent.mkdir(parents=True)
    record.write_text('{"value": 0.5}')
    (root / "stats.safetensors").write_bytes(b"x")
    runs = []

    def execute(path, output, **kwargs):
        runs.append(Path(path).name)
        Path(output).write_text("{}")

    monkeypatch.setattr(papermill, "execute_notebook", execute)
    monkeypatch.setattr(reproduce, "ensure_kernel", lambda: "moepaper")
    tables = dict(results_dir="results", statistics={"a": "stats.safetensors"}, model_name="m")
    sweep = dict(results_dir="results", statistics="stats.safetensors")

    def done(notebook, parameters):
        return not reproduce.run_notebook(notebook, root / "runs" / notebook, parameters, root=root)

    assert not done("04_tables_and_figures.ipynb", tables) and not done("02_prune_and_evaluate.ipynb", sweep)
    assert done("04_tables_and_figures.ipynb", tables) and done("02_prune_and_evaluate.ipynb", sweep)
    record.write_text('{"value": 0.75}')  # results changed since 04 read them
    assert not done("04_tables_and_figures.ipynb", tables) and done("02_prune_and_evaluate.ipynb", sweep)
    (root / "stats.safetensors").write_bytes(b"y")
    assert not done("04_tables_and_figures.ipynb", tables) and done("04_tables_and_figures.ipynb", tables)
    today = provenance.versions()
    for key in ("moepaper", "lm_eval", "transformers", "torch"):
        monkeypatch.setattr(provenance, "versions", lambda key=key: {**today, key: "0.0.1"})
        assert not done("02_prune_and_evaluate.ipynb", sweep), key
        assert not done("04_tables_and_figures.ipynb", tables), key
        monkeypatch.setattr(provenance, "versions", lambda: today)
        assert not done("02_prune_and_evaluate.ipynb", sweep) and done("02_prune_and_evaluate.ipynb", sweep)
        assert not done("04_tables_and_figures.ipynb", tables)
    assert runs.count("04_tables_and_figures.ipynb") == 3 + 2 * 4


def test_every_parameter_the_plan_passes_is_one_the_notebook_declares():
    import ast

    declared = {}
    for path in sorted((REPO / "notebooks").glob("*.ipynb")):
        nb = json.loads(path.read_text())
        (cell,) = [c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
        tree = ast.parse("".join(cell["source"]))
        declared[path.name] = {t.id for node in tree.body if isinstance(node, ast.Assign) for t in node.targets}
    for name, config in reproduce.CONFIGS.items():
        for notebook, _, params in reproduce.plan(config, REPO):
            unknown = set(params) - declared[notebook]
            assert not unknown, f"{name}: {notebook} gets {sorted(unknown)}, which its parameters cell does not declare"
    assert reproduce.CONFIGS["embedded"].models[0].evaluate["workers"] == reproduce.EMBEDDED_WORKERS
