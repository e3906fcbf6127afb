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
