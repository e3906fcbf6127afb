"""Where a file came from: package versions and content hashes, in one place.

The package's own version comes from its installed metadata, so no module imports
``moepaper/__init__``.
"""

from __future__ import annotations

import hashlib
from importlib import metadata
from pathlib import Path

import torch


def package_version(name: str = "moepaper") -> str | None:
    """The installed version of a distribution (None when it is not installed)."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def versions() -> dict:
    """moepaper, transformers, torch and (when installed) lm-eval versions, for provenance records."""
    import transformers

    found = {"moepaper": package_version(), "transformers": transformers.__version__, "torch": torch.__version__}
    lm_eval = package_version("lm_eval")
    if lm_eval is not None:
        found["lm_eval"] = lm_eval
    return found


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes; of a folder: of every file below it, by relative path."""
    path = Path(path)
    digest = hashlib.sha256()
    files = [path] if not path.is_dir() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        if path.is_dir():
            digest.update(str(file.relative_to(path)).encode() + b"\0")
        with open(file, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over named tensors (name, dtype, shape and bytes, in name order)."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()
