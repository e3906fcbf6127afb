"""The project root: the moepaper checkout whose data/ a run reads and whose outputs it writes.

A run writes under the checkout it is started from (the current directory or one of its
parents), never into whichever checkout happens to be pip-installed; code run outside any
checkout falls back to the checkout the package was installed from (an editable install).
The papermill runner (`moepaper.reproduce`) decides every output path from here.
"""

from __future__ import annotations

import os
from pathlib import Path

# The folders of a checkout (relative to its root).
DATA = "data"
FIGURES = "figures"
RUNS = "runs"
NOTEBOOKS = "notebooks"


def is_checkout(folder: Path) -> bool:
    """A moepaper checkout: a pyproject.toml naming moepaper beside a notebooks/ folder."""
    pyproject = folder / "pyproject.toml"
    if not (pyproject.is_file() and (folder / NOTEBOOKS).is_dir()):
        return False
    return 'name = "moepaper"' in pyproject.read_text(errors="replace")


def project_root(start: str | Path | None = None) -> Path:
    """``$MOEPAPER_ROOT`` when set, else the checkout holding `start` (default: the current
    directory), else the checkout this package lives in; FileNotFoundError when none is found."""
    if start is None and os.environ.get("MOEPAPER_ROOT"):
        return Path(os.environ["MOEPAPER_ROOT"]).resolve()
    here = Path(start or os.getcwd()).resolve()
    for folder in (here, *here.parents):
        if is_checkout(folder):
            return folder
    installed = Path(__file__).resolve().parent.parent
    if is_checkout(installed):
        return installed
    raise FileNotFoundError(
        f"no moepaper checkout at or above {here} (a folder with pyproject.toml and notebooks/); "
        "run from a clone of the repository or set MOEPAPER_ROOT"
    )


def project_path(path: str | Path, root: str | Path | None = None) -> Path:
    """`path` if absolute, else relative to the project root."""
    path = Path(path)
    return path if path.is_absolute() else (Path(root) if root else project_root()) / path


def relative_to_project(path: str | Path, root: str | Path | None = None) -> str:
    """`path` relative to the project root when it lies inside it (for provenance), else as given."""
    path = Path(path).resolve()
    try:
        return path.relative_to((Path(root) if root else project_root()).resolve()).as_posix()
    except (ValueError, FileNotFoundError):
        return str(path)
