"""Stored measurements: what a notebook measures at some cost, kept under ``data/`` and reused like results.

A measurement is a named set of tensors (and a few JSON values) computed from a model and some
data, e.g. the damage of removing each expert (`moepaper.damage.expert_damage`). It is written once
to ``<directory>/<model>/<name>.safetensors`` with its provenance in the header:

    inputs      what the numbers depend on: the model's `weights_fingerprint`, the data's checksum
                (`batches_checksum`), the parameters of the measurement, and ``code``, a sha256 of
                the measuring functions' source; the file is reused only when all of them match
    provenance  moepaper and torch versions, torch threads, the command that measured it, the
                seconds it took and the date (not compared: they say how the numbers were made)
    checksum    sha256 of the stored tensors (`tensors_sha256`), checked on every read

`measure(name, compute, ...)` returns the stored measurement when the file's inputs are today's,
and otherwise runs ``compute()`` and stores what it returns (``force=True`` recomputes in any
case). A file that cannot be read, or whose tensors do not match its checksum, is a
`MeasurementFileError` naming it (delete it or pass ``force=True``): it is never silently
replaced, since a damaged committed file is worth knowing about.

`stored_expert_damage(...)` is `expert_damage` through `measure` (notebooks 00 and 03).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import inspect
import json
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..project import atomic_write
from ..provenance import package_version, tensors_sha256
from .keys import slug

log = logging.getLogger(__name__)

HEADER_KEY = "moepaper_measurement"


class MeasurementFileError(ValueError):
    """A stored measurement that cannot be read, or whose tensors are not the ones its header names."""


@dataclass
class Measurement:
    """What `measure` returns: the tensors and values, the file, and whether they were reused."""

    tensors: dict[str, torch.Tensor]
    values: dict
    path: Path | None  # None when not stored
    reused: bool
    inputs: dict = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.tensors[name]


def batches_checksum(batches: Iterable[Mapping[str, torch.Tensor]]) -> str:
    """sha256 over every batch's tensors (name, dtype, shape, bytes), in order: what identifies the data."""
    digest = hashlib.sha256()
    for i, batch in enumerate(batches):
        digest.update(f"{i}:{tensors_sha256({k: v for k, v in batch.items() if isinstance(v, torch.Tensor)})}".encode())
    return digest.hexdigest()


def code_checksum(code: Sequence[Callable | str]) -> str:
    """sha256 of the source of the measuring functions (a string is taken as source itself)."""
    digest = hashlib.sha256()
    for part in code:
        digest.update((part if isinstance(part, str) else inspect.getsource(part)).encode() + b"\0")
    return digest.hexdigest()[:16]


def measurement_path(directory: str | Path, model_name: str, name: str) -> Path:
    return Path(directory) / slug(model_name) / f"{slug(name)}.safetensors"


def read_measurement(path: str | Path) -> Measurement:
    """A stored measurement (reused=True); MeasurementFileError when unreadable or not what its header says."""
    from safetensors import safe_open

    path = Path(path)
    advice = f"delete {path} or measure again with force=True (make reproduce: --force)"
    try:
        with safe_open(str(path), framework="pt") as f:
            header = json.loads((f.metadata() or {})[HEADER_KEY])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except FileNotFoundError:
        raise
    except Exception as error:  # safetensors raises its own errors for a truncated or foreign file
        raise MeasurementFileError(f"{path} is not a readable stored measurement ({type(error).__name__}: {error}); {advice}") from None
    missing = [k for k in ("name", "inputs", "values", "checksum", "provenance") if k not in header]
    if missing:
        raise MeasurementFileError(f"{path}: its header lacks {missing}; {advice}")
    if tensors_sha256(tensors) != header["checksum"]:
        raise MeasurementFileError(f"{path}: its tensors do not match the checksum in its header (changed or damaged); {advice}")
    return Measurement(tensors, header["values"], path, True, header["inputs"], header["provenance"])


def measure(name: str, compute: Callable[[], tuple[dict[str, torch.Tensor], dict]], *, model, model_name: str,
            directory: str | Path, inputs: Mapping, code: Sequence[Callable | str] = (), command: str = "",
            force: bool = False) -> Measurement:
    """The measurement `name` of `model`: stored under `directory` when its inputs are today's, else computed.

    compute: ``compute() -> (tensors, values)``, the named tensors and JSON values to store.
    model: the measured model: its `weights_fingerprint` is one of the inputs.
    inputs: the rest of what the numbers depend on (data checksums, parameters), JSON values.
    code: the functions (or source strings) that measure; their source's checksum is an input.
    command: what measured it, for the provenance (e.g. the notebook).
    force: compute and store again even when the stored inputs match.
    directory: None or "": computed every time, nothing stored (``reused`` False, ``path`` None).
    """
    from .results import weights_fingerprint

    if not directory:
        tensors, values = compute()
        return Measurement(dict(tensors), dict(values), None, False)

    path = measurement_path(directory, model_name, name)
    wanted = json.loads(json.dumps({**dict(inputs), "model": weights_fingerprint(model), "code": code_checksum(code)},
                                   sort_keys=True, default=str))
    if path.exists() and not force:
        stored = read_measurement(path)
        if stored.inputs == wanted:
            return stored
        changed = sorted(k for k in set(stored.inputs) | set(wanted) if stored.inputs.get(k) != wanted.get(k))
        log.warning("measurement %s: inputs changed (%s), measuring again", path, ", ".join(changed))
    started = time.time()
    tensors, values = compute()
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    provenance = {"moepaper": package_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                  "command": command, "seconds": round(time.time() - started, 1),
                  "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    header = {"name": name, "model_name": model_name, "inputs": wanted, "values": values,
              "checksum": tensors_sha256(tensors), "provenance": provenance}
    from safetensors.torch import save_file

    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata={HEADER_KEY: json.dumps(header, sort_keys=True)}))
    return Measurement(tensors, json.loads(json.dumps(values)), path, False, wanted, provenance)


def stored_expert_damage(model, batches: Sequence[dict], *, name: str, model_name: str, directory: str | Path | None,
                         layers: Sequence[int] | None = None, loss: bool = True, command: str = "",
                         force: bool = False, progress: bool = False):
    """`moepaper.damage.expert_damage(model, batches, layers=..., loss=...)`, stored as measurement `name`
    under `directory` and reused while the model, the batches, the parameters and `expert_damage`'s
    source are the same. `directory` None or "": measured every time, nothing stored."""
    from ..damage import ExpertDamage, expert_damage

    batches = list(batches)
    if not directory:
        return expert_damage(model, batches, layers=layers, loss=loss, progress=progress)

    def compute():
        damage = expert_damage(model, batches, layers=layers, loss=loss, progress=progress)
        tensors = {m: damage.measure(m) for m in damage.measures} | {"output_energy": damage.output_energy}
        values = {"layers": damage.layers, "num_experts": damage.num_experts, "base_loss": damage.base_loss,
                  "tokens": damage.tokens, "metadata": damage.metadata}
        return tensors, values

    inputs = {"batches": batches_checksum(batches), "layers": None if layers is None else [int(l) for l in layers], "loss": loss}
    stored = measure(name, compute, model=model, model_name=model_name, directory=directory, inputs=inputs,
                     code=[expert_damage], command=command, force=force)
    values, tensors = stored.values, stored.tensors
    return ExpertDamage(layers=values["layers"], num_experts=values["num_experts"],
                        output_sq=tensors["output_sq"], output_norm=tensors["output_norm"], direct_sq=tensors["direct_sq"],
                        loss_change=tensors.get("loss_change"),
                        output_energy=tensors["output_energy"], base_loss=float(values["base_loss"]),
                        tokens=int(values["tokens"]), metadata=dict(values["metadata"]))
