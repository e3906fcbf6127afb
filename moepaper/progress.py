"""Progress bars of the long loops (statistics pass, damage measurement, evaluation sweep).

In Jupyter a bar is a widget and in a terminal a text bar (`tqdm.auto`). Under
`moepaper.reproduce` the notebooks run in kernels started with ``MOEPAPER_PROGRESS=terminal``
and without file-descriptor capture: there the bars are drawn on the process's original
stderr, the terminal (or log) that ran ``make reproduce``, so the run shows where it is and
the executed notebooks carry no progress bars, stale widgets or carriage-return residue.
"""

from __future__ import annotations

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
