"""Progress bars of the long loops (statistics pass, damage measurement, evaluation sweep).

In Jupyter a bar is a widget and in a terminal a text bar (`tqdm.auto`). Under
`moepaper.reproduce` the notebooks run in kernels started with ``MOEPAPER_PROGRESS=terminal``
and without file-descriptor capture: there the bars are drawn on the process's original
stderr, the terminal (or log) that ran ``make reproduce``, so the run shows where it is and
the executed notebooks carry no progress bars, stale widgets or carriage-return residue.
"""

from __future__ import annotations

import contextlib
import os
import sys

PROGRESS_ENV = "MOEPAPER_PROGRESS"  # "terminal": draw bars on sys.__stderr__, never in a notebook


def progress(iterable=None, *, disable: bool = False, **kwargs):
    """A tqdm bar over `iterable` (or with ``total=``); kwargs go to tqdm (desc, unit, total)."""
    if os.environ.get(PROGRESS_ENV) == "terminal":
        from tqdm.std import tqdm

        stream = sys.__stderr__
        if stream is None:
            disable = True
        interactive = stream is not None and stream.isatty()
        # a log file gets a line every 30 s, not a redraw every 0.1 s
        return tqdm(iterable, file=stream, disable=disable, mininterval=0.5 if interactive else 30.0,
                    dynamic_ncols=interactive, **kwargs)
    from tqdm.auto import tqdm

    return tqdm(iterable, disable=disable, **kwargs)


class _WithoutBars:
    """A text stream to `stream` that drops progress-bar output (redraws holding a carriage
    return, cursor moves of nested bars, the newlines a bar ends with); warnings and log lines pass."""

    def __init__(self, stream):
        self.stream, self.after_bar = stream, False

    def write(self, text: str) -> int:
        # a redraw holds "\r"; nested bars move the cursor with ESC [A and "\n"s
        if "\r" in text or "\x1b[" in text or (self.after_bar and not text.strip("\n")):
            self.after_bar = True
        else:
            self.after_bar = False
            self.stream.write(text)
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:
        return False


@contextlib.contextmanager
def third_party_bars_off_the_notebook():
    """Under `moepaper.reproduce` (``MOEPAPER_PROGRESS=terminal``): what other libraries write
    to stderr meanwhile (lm-eval's per-benchmark tqdm bars, warnings) goes to the terminal
    instead of the notebook, without the bars (the sweep's own bar counts the work). Elsewhere
    nothing changes."""
    if os.environ.get(PROGRESS_ENV) != "terminal" or sys.__stderr__ is None:
        yield
        return
    with contextlib.redirect_stderr(_WithoutBars(sys.__stderr__)):
        yield
