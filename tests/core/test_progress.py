"""Progress bars: under `moepaper.reproduce` they go to the process's own stderr, never into a notebook."""

import io
import sys

from moepaper.progress import PROGRESS_ENV, progress


def test_terminal_mode_draws_on_the_original_stderr(monkeypatch):
    terminal, notebook = io.StringIO(), io.StringIO()
    monkeypatch.setenv(PROGRESS_ENV, "terminal")
    monkeypatch.setattr(sys, "__stderr__", terminal)
    monkeypatch.setattr(sys, "stderr", notebook)  # what a kernel shows in the notebook
    assert list(progress(range(3), desc="work")) == [0, 1, 2]
    assert "work" in terminal.getvalue() and "3/3" in terminal.getvalue()
    assert notebook.getvalue() == ""


def test_disabled_and_default_modes(monkeypatch):
    stream = io.StringIO()
    monkeypatch.setenv(PROGRESS_ENV, "terminal")
    monkeypatch.setattr(sys, "__stderr__", stream)
    bar = progress(total=2, desc="quiet", disable=True)
    bar.update(2)
    bar.close()
    assert stream.getvalue() == ""
    monkeypatch.delenv(PROGRESS_ENV)
    assert list(progress([1, 2], disable=True)) == [1, 2]


def test_third_party_bars_go_to_the_terminal_without_their_redraws(monkeypatch):
    from tqdm import tqdm

    from moepaper.progress import third_party_bars_off_the_notebook

    terminal, notebook = io.StringIO(), io.StringIO()
    monkeypatch.setenv(PROGRESS_ENV, "terminal")
    monkeypatch.setattr(sys, "__stderr__", terminal)
    monkeypatch.setattr(sys, "stderr", notebook)
    with third_party_bars_off_the_notebook():
        with tqdm(total=2, desc="outer", file=sys.stderr) as outer:
            for _ in range(2):
                for _ in tqdm(range(3), desc="lm-eval requests"):  # a library's nested bar on sys.stderr
                    pass
                outer.update(1)
        print("a warning line", file=sys.stderr)
    print("after", file=sys.stderr)
    assert notebook.getvalue() == "after\n"
    assert terminal.getvalue() == "a warning line\n"


def test_third_party_output_is_untouched_outside_reproduce(monkeypatch):
    from moepaper.progress import third_party_bars_off_the_notebook

    notebook = io.StringIO()
    monkeypatch.delenv(PROGRESS_ENV, raising=False)
    monkeypatch.setattr(sys, "stderr", notebook)
    with third_party_bars_off_the_notebook():
        print("kept", file=sys.stderr)
    assert notebook.getvalue() == "kept\n"
