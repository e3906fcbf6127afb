"""The project root: the moepaper checkout whose data/ a run reads and whose outputs it writes.

A run writes under the checkout it is started from (the current directory or one of its
parents), never into whichever checkout happens to be pip-installed; outside any checkout the
project root is the working directory itself (``$MOEPAPER_ROOT`` or an explicit root where
given), never the checkout the package was installed from: its outputs would land in another
clone. The papermill runner (`moepaper.reproduce`) decides every output path from here, and
refuses a root that is not a checkout (it needs the notebooks).
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
    """``$MOEPAPER_ROOT`` when set (and `start` is None), else the checkout holding `start`
    (default: the current directory), else `start` (the current directory) itself; never the
    checkout this package happens to be installed from. `is_checkout` tells whether it is one."""
    if start is None and os.environ.get("MOEPAPER_ROOT"):
        return Path(os.environ["MOEPAPER_ROOT"]).resolve()
    here = Path(start or os.getcwd()).resolve()
    for folder in (here, *here.parents):
        if is_checkout(folder):
            return folder
    return here


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


# --- writing files ---------------------------------------------------------------------


def _umask() -> int:
    """The process's umask, read without changing it where Linux allows (/proc), else set and reset."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def default_file_mode() -> int:
    """The mode `open()` would give a new file: 0o666 less the umask (mkstemp's 0o600 is not that)."""
    return 0o666 & ~_umask()


def check_writable(folder: str | Path) -> Path:
    """Create `folder` if needed and write (then remove) a probe file in it, so an unwritable
    output folder is found before any expensive work; PermissionError/OSError naming it otherwise."""
    import tempfile

    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".moepaper-write-check.", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as error:
        raise type(error)(error.errno, f"output folder {folder} is not writable: {error.strerror}") from error
    return folder


def atomic_write(path: str | Path, write) -> Path:
    """Write `path` through a uniquely named temporary file in the same folder and a rename:
    `write(temporary_path)` writes it. Readers never see half a file, two writers never share a
    temporary name, and the file gets the process's normal permissions (0o666 less the umask)."""
    import tempfile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, default_file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
