"""What every notebook does first, in one place: `setup()` and `figure_saver()`."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from ..project import project_path, project_root
from ..provenance import package_version


def setup(*, seed: int = 0, threads: int | None = None, precision: int | None = None) -> Path:
    """Agg backend with inline PNG figures, the package's figure style, torch threads and seed.

    Returns the project root: notebook parameters hold paths relative to it (`project_path`),
    whether the notebook runs from the checkout's root (papermill, `moepaper.reproduce`) or
    from notebooks/ (Jupyter).
    """
    os.environ.setdefault("MPLBACKEND", "Agg")
    import pandas as pd
    import torch
    from matplotlib_inline.backend_inline import set_matplotlib_formats

    from .figures import set_style

    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # no "Loading weights" bar left in executed notebooks
    set_matplotlib_formats("png")  # a Figure as a cell's value renders as an image
    set_style()
    if precision is not None:
        pd.set_option("display.precision", precision)
    if threads:
        torch.set_num_threads(threads)
    _limit_blas_threads(threads or 1)
    torch.manual_seed(seed)
    root = project_root()
    print(f"moepaper {package_version()} | torch {torch.__version__} | project {root}")
    return root


def _limit_blas_threads(threads: int) -> None:
    """numpy's and scipy's BLAS (bootstraps, correlations) on a fixed number of threads, so their sums do not
    depend on the machine's core count; torch's own threads are `setup`'s `threads`."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # not installed: BLAS keeps its default
        return
    threadpool_limits(threads, user_api="blas")


def figure_saver(figures_dir: str | Path, prefix: str, suffix: str, root: Path | None = None) -> Callable:
    """``save(fig, name)``: return `fig` (the notebook shows it) and, when `figures_dir` is set,
    also write it as ``<figures_dir>/<prefix>_<name>__<suffix>.png`` and ``.pdf``."""
    from .figures import save_figure

    def save(fig, name: str):
        if figures_dir:
            save_figure(fig, f"{prefix}_{name}__{suffix}", project_path(figures_dir, root))
        return fig

    return save
