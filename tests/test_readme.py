"""The README's library example runs as written: its code block is extracted and executed on the
committed embedded model, with a smaller item limit (the only line changed), in a scratch folder."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SECTION = "## The paper in six lines"
LIMIT_LINE = re.compile(r"^limit = .*$", re.MULTILINE)


def readme_example() -> str:
    text = (REPO / "README.md").read_text()
    section = text[text.index(SECTION):]
    return re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)


def test_the_example_defines_everything_it_uses_and_takes_a_limit():
    code = readme_example()
    compile(code, "README.md", "exec")
    assert len(LIMIT_LINE.findall(code)) == 1 and "limit=limit" in code  # the one line the test below changes
    for name in ("collect_statistics", "expert_scores", "select_experts", "mask_experts", "prune_experts", "save_pruned",
                 "evaluate", "load_model", "calibration_batches"):
        assert re.search(rf"^from moepaper(\.pipeline)? import .*\b{name}\b", code, re.MULTILINE), name


def test_the_example_runs_as_written(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MOEPAPER_ROOT", str(REPO))  # the committed model and corpus
    monkeypatch.chdir(tmp_path)  # what it saves (runs/pruned) goes here, not into the checkout
    code = LIMIT_LINE.sub("limit = 4", readme_example())
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)
    printed = capsys.readouterr().out
    scores = namespace["scores"]
    assert (scores["status"] == "ok").all() and set(scores["n"]) == {4}, scores
    assert "bits_per_byte" in printed and "acc" in printed
    assert (tmp_path / "runs" / "pruned" / "config.json").exists()
    keep = namespace["keep"]
    assert all(len(k) == 48 for k in keep)  # 64 experts, 25% removed in every layer
