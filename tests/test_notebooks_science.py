"""The teaching and damage-check notebooks: committed without outputs, and they run under papermill with a tiny model."""

import json
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = {
    "00_formulation.ipynb": dict(n_sequences=4, seq_len=32),
    "03_damage_check.ipynb": dict(n_calibration=4, calibration_len=32, n_evaluation=4, evaluation_len=32),
}
TINY = dict(model="tiny:qwen3_moe", threads=1)


def kernel_name() -> str:
    """The `moepaper` kernel `make test` registers; else the running interpreter's own."""
    from jupyter_client.kernelspec import KernelSpecManager

    return "moepaper" if "moepaper" in KernelSpecManager().find_kernel_specs() else "python3"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_without_outputs_and_parameterised(name):
    nb = nbformat.read(ROOT / "notebooks" / name, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{name}: strip outputs before committing"
    assert {"name", "display_name", "language"} <= set(nb.metadata["kernelspec"])
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1 and 'model = "embedded"' in tagged[0].source  # defaults run the embedded model
    for parameter in {**NOTEBOOKS[name], **TINY}:
        assert f"\n{parameter} = " in "\n" + tagged[0].source, f"{name}: no parameter {parameter}"


@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_runs_under_papermill_with_a_tiny_model(name, tmp_path):
    import papermill

    if not (ROOT / "data" / "corpus" / "code" / "test.jsonl").exists():
        pytest.skip("embedded corpus not built (python -m moepaper.corpus)")
    out = tmp_path / name
    papermill.execute_notebook(str(ROOT / "notebooks" / name), str(out), parameters={**TINY, **NOTEBOOKS[name]},
                               kernel_name=kernel_name(), cwd=str(ROOT), progress_bar=False)
    nb = nbformat.read(out, as_version=4)
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 2  # the figures render inline
    text = json.dumps([o.get("data", {}).get("text/markdown", "") for o in outputs])
    assert ("premise" in text) if name.startswith("00") else ("principle expects" in text)
