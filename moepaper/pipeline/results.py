"""Result files and the resumable criteria x ratios sweep.

One JSON file per (model, calibration, criterion, experts removed, benchmark):

    <out_dir>/<model>/<calibration>/<criterion key>__removed<n>/<benchmark>.json

The criterion key is its point ``S_<b>_<alpha>_<beta>`` whatever its name ("man" and
"S(1,0,1)" share ``S_1_0_1``), or the name of a criterion outside the family (``mone``);
``removed<n>`` is the exact number of experts removed in every MoE layer
(``removed4-4-3-4`` when layers differ), not a rounded ratio. Files are written atomically
(a uniquely named temporary file renamed into place) with the process's normal
permissions, so an interrupted run never leaves half a file. The unpruned model is one
entry per model: calibration ``none``, criterion ``unpruned``, ``removed0``. Each file
carries the value, the evaluation settings, the kept experts, how pruned experts were
replaced (``replacement``: "reroute" or "novice"; absent in records older than novices, which
were re-routed) and provenance (moepaper,
lm-eval, transformers and torch versions, seed, the statistics' tensor checksum, date).

A model's results folder records the evaluation settings it was made with
(``<out_dir>/<model>/evaluation_settings.json``); a sweep with other settings is refused
(`ResultsSettingsError`), so tables never rank results of different settings together. A
sweep holds ``<out_dir>/<model>/.sweep.lock`` (an advisory lock naming its pid; the
operating system drops it when the process dies): a second sweep into the same folder is
refused (`ResultsLockedError`) while the first runs.

`sweep(model, tokenizer, stats, criteria=..., ratios=..., suite=...)` evaluates every
criterion at every ratio on one loaded model through `mask_experts` (no weights copied),
plus the unpruned model, and skips every (entry, benchmark) whose file already holds an
"ok" result of the same evaluation settings and statistics: rerunning an interrupted
sweep resumes where it stopped. A record is reused (skipped, or copied for the same kept
experts) only when its provenance names the versions of moepaper, lm-eval, transformers and
torch installed now (`VERSION_KEYS`; torch's local build label, ``+cpu`` or ``+cu128``, aside):
results of another version, or without versions, are re-evaluated, never mixed with today's.

Compact records (`write_result`, `read_result`). Per-item outcomes (``items``: one list per field)
are written on one line each, and a float field whose values are float32 numbers (lm-eval's
per-item log-likelihoods) is written with the precision it carries: each value as the shortest
decimal that gives the same float32 back, the field named in ``items_float32`` with the positions
written at full double precision instead (a sum of several float32 window log-likelihoods is not
a float32). Reading gives every value back bit for bit. A record reused for the same kept experts
copies no items: ``items_from`` holds the source record's path (relative to the results root,
like ``provenance.same_kept_experts_as``) and the sha256 of its items, and reading it resolves
the reference; a missing source, or one whose items changed since, is an `ItemsSourceError`
naming both files. A sweep that re-evaluates a source first writes its old items into the
records that reference it. Records of the full format (every item copied, floats at double
precision) read as before; `moepaper.pipeline.migrations.compact_results` rewrites them.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..criteria import NOVICE, REROUTE, Criterion, StatisticCriterion, expert_scores, resolve_criteria
from ..project import atomic_write, check_writable, relative_to_project
from ..provenance import versions
from ..statistics import ExpertStatistics
import moepaper.pipeline.evaluation as evaluation  # the module (tests replace its evaluate), not the package
from .keys import NO_CALIBRATION, UNPRUNED, criterion_key, entry_folder, removed_tag, slug  # noqa: F401 (also imported from here)

# The paper's two settings, and a third one of the embedded testbed:
# task-agnostic: a general-domain calibration (the paper's C4; the embedded corpus's literature), every benchmark;
# task-specific: a calibration of one benchmark domain (code, math), ranked on that domain's benchmarks;
# all-domain: a calibration covering every evaluation domain in equal shares (embedded:mixed), every
#     benchmark -- not one of the paper's settings: it shows what calibration coverage does to a criterion.
TASK_AGNOSTIC = "task-agnostic"
TASK_SPECIFIC = "task-specific"
ALL_DOMAIN = "all-domain"
SETTINGS = (TASK_AGNOSTIC, TASK_SPECIFIC, ALL_DOMAIN)
SETTINGS_FILE = "evaluation_settings.json"  # per model folder: the evaluation settings of its results
LOCK_FILE = ".sweep.lock"


class ResultsSettingsError(ValueError):
    """A sweep's evaluation settings differ from those a results folder was made with."""


class ResultsLockedError(RuntimeError):
    """Another live process is writing the same results folder."""


class ItemsSourceError(FileNotFoundError):
    """A record's ``items_from`` names a source record that is missing or no longer holds those items."""


ITEMS_FROM = "items_from"  # {"path": source record relative to the results root, "sha256": items_digest of its items}
ITEMS_FLOAT32 = "items_float32"  # {field: [positions at double precision]}: the field's other floats are float32 values

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- names and paths


def result_path(out_dir: str | Path, model: str, calibration: str, criterion, removed: int | Sequence[int],
                benchmark: str) -> Path:
    """Where the result of one (model, calibration, criterion, experts removed per layer, benchmark) lives."""
    return Path(out_dir) / entry_folder(model, calibration, criterion, removed) / f"{slug(benchmark)}.json"


def write_json_atomic(path: str | Path, record: dict) -> Path:
    """Write `record` as JSON to `path` through a uniquely named temporary file in the same
    folder and a rename, with the process's normal permissions (0o666 less the umask)."""

    def write(tmp: Path):
        with open(tmp, "w") as f:
            json.dump(record, f, indent=1, sort_keys=True, allow_nan=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())

    return atomic_write(path, write)


def read_result(path: str | Path, *, resolve: bool = True) -> dict | None:
    """A result record, or None when the file is missing or unreadable (then it is recomputed).

    resolve: give its per-item outcomes back as they were evaluated (float32 values restored,
    ``items_from`` resolved; `resolve_items`); False: the record as written."""
    try:
        record = json.loads(Path(path).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return resolve_items(record, path) if resolve else record


def results_root(path: str | Path) -> Path:
    """The results root of a record at ``<root>/<model>/<calibration>/<entry>/<benchmark>.json``."""
    return Path(path).parents[3]


def items_digest(items: dict | None) -> str | None:
    """sha256 of per-item outcomes (canonical JSON of their values): what a reference to them checks."""
    if items is None:
        return None
    blob = json.dumps(items, sort_keys=True, separators=(",", ":"), allow_nan=True).encode()
    return hashlib.sha256(blob).hexdigest()


def _is_float32(value) -> bool:
    return type(value) is float and math.isfinite(value) and float(np.float32(value)) == value


def encode_items(items: dict) -> tuple[dict, dict]:
    """(items as written, the ``items_float32`` marker): float32 values as their shortest decimal."""
    written, marker = {}, {}
    for name, values in items.items():
        floats = [i for i, v in enumerate(values) if type(v) is float]
        narrow = {i for i in floats if _is_float32(values[i])}
        if not narrow:
            written[name] = values
            continue
        written[name] = [float(str(np.float32(v))) if i in narrow else v for i, v in enumerate(values)]
        marker[name] = [i for i in floats if i not in narrow]
    return written, marker


def decode_items(items: dict, marker: dict | None) -> dict:
    """The values `encode_items` was given, bit for bit."""
    if not marker:
        return items
    decoded = dict(items)
    for name, wide in marker.items():
        wide = set(wide)
        decoded[name] = [float(np.float32(v)) if type(v) is float and i not in wide else v for i, v in enumerate(items[name])]
    return decoded


def resolve_items(record: dict, path: str | Path, cache: dict | None = None, _seen: tuple = ()) -> dict:
    """`record` (read from `path`) with its per-item outcomes as evaluated: float32 values restored
    and an ``items_from`` reference replaced by its source's items, checked against the recorded
    sha256 (`ItemsSourceError` naming both files when the source is missing or changed).
    cache: path -> parsed record, shared by calls that read many records."""
    if not isinstance(record, dict):
        return record
    reference = record.get(ITEMS_FROM)
    if reference:
        source_path = results_root(path) / reference["path"]
        if source_path in _seen:
            raise ItemsSourceError(f"{path}: its items_from references form a cycle through {source_path}")
        source = None if cache is None else cache.get(source_path)
        if source is None:
            try:
                source = json.loads(source_path.read_text())
            except (FileNotFoundError, json.JSONDecodeError) as error:
                raise ItemsSourceError(
                    f"{path} takes its per-item outcomes from {source_path} (items_from), which is "
                    f"{'missing' if isinstance(error, FileNotFoundError) else 'not readable'}: restore it from git, or delete "
                    f"{path} and rerun its sweep") from None
            if cache is not None:
                cache[source_path] = source
        items = resolve_items(source, source_path, cache, _seen + (Path(path),)).get("items")
        if items is None or items_digest(items) != reference.get("sha256"):
            raise ItemsSourceError(
                f"{path} takes its per-item outcomes from {source_path} (items_from), which no longer holds them (sha256 "
                f"{items_digest(items)}, recorded {reference.get('sha256')}): restore it from git, or delete {path} and rerun its sweep")
        return {**{k: v for k, v in record.items() if k != ITEMS_FLOAT32}, "items": items}
    if ITEMS_FLOAT32 in record:
        marker, items = record[ITEMS_FLOAT32], record.get("items")
        record = {k: v for k, v in record.items() if k != ITEMS_FLOAT32}
        record["items"] = None if items is None else decode_items(items, marker)
    return record


def compact_record(record: dict, reference: dict | None = None) -> dict:
    """`record` as `write_result` writes it: its items encoded (`encode_items`), or, given `reference`
    ({"path", "sha256"} of a record with the same items), no items and ``items_from`` instead."""
    record = {k: v for k, v in record.items() if k not in (ITEMS_FROM, ITEMS_FLOAT32)}
    if reference is not None:
        return {**record, "items": None, ITEMS_FROM: dict(reference)}
    if record.get("items"):
        items, marker = encode_items(record["items"])
        record["items"] = items
        if marker:
            record[ITEMS_FLOAT32] = marker
    return record


def _format(value, indent: int = 0) -> str:
    """JSON with one key per line and every list of plain values on one line."""
    pad = " " * (indent + 1)
    if isinstance(value, dict) and value:
        inner = ",\n".join(f"{pad}{json.dumps(str(k))}: {_format(v, indent + 1)}" for k, v in sorted(value.items()))
        return "{\n" + inner + "\n" + " " * indent + "}"
    if isinstance(value, list) and any(isinstance(v, (dict, list)) for v in value):
        return "[\n" + ",\n".join(pad + _format(v, indent + 1) for v in value) + "\n" + " " * indent + "]"
    return json.dumps(value, separators=(",", ":"), allow_nan=True)


def format_result(record: dict, reference: dict | None = None) -> str:
    """The text `write_result` writes for `record` (see `compact_record`)."""
    return _format(compact_record(record, reference)) + "\n"


def write_result(path: str | Path, record: dict, reference: dict | None = None) -> Path:
    """Write a result record compactly (`compact_record`), atomically like `write_json_atomic`."""
    text = format_result(record, reference)

    def write(tmp: Path):
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    return atomic_write(path, write)


# ---------------------------------------------------------------- provenance


def weights_fingerprint(model: torch.nn.Module, samples: int = 64) -> str:
    """A fingerprint of the weights: sha256 over every parameter's and buffer's name, shape,
    dtype and `samples` values strided through it. Cheap for any model size; changes when
    the checkpoint changes, so results of other weights are never reused."""
    digest = hashlib.sha256()
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        flat = tensor.detach().reshape(-1)
        step = max(1, flat.numel() // samples)
        values = flat[::step][:samples].float().cpu().numpy()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(values.tobytes())
    return "weights:" + digest.hexdigest()[:16]


def criterion_record(criterion: Criterion | StatisticCriterion | str) -> dict:
    if isinstance(criterion, str):  # the unpruned model
        return {"criterion": criterion, "b": None, "alpha": None, "beta": None}
    b, alpha, beta = criterion.point or (None, None, None)
    return {"criterion": criterion.name, "b": b, "alpha": alpha, "beta": beta}


# ---------------------------------------------------------------- the sweep


@dataclass(frozen=True)
class Entry:
    """One evaluated model variant of a sweep."""

    criterion: Criterion | StatisticCriterion | str  # a string only for the unpruned model
    ratio: float
    calibration: str

    @property
    def name(self) -> str:
        return self.criterion if isinstance(self.criterion, str) else self.criterion.name

    @property
    def unpruned(self) -> bool:
        return self.name == UNPRUNED


def _settings_fingerprint(suite: evaluation.Suite, limit, seed: int, backend: str, apply_chat_template: bool,
                          model_id: str | None) -> dict:
    return {
        "model_id": model_id,
        "suite": suite.name,
        "limit": evaluation.effective_limit(suite, limit),
        "num_fewshot": suite.num_fewshot,
        "gen_kwargs": suite.gen_kwargs,
        "seed": seed,
        "backend": backend,
        "apply_chat_template": apply_chat_template,
    }


VERSION_KEYS = ("moepaper", "lm_eval", "transformers", "torch")  # the versions that change numbers


def _release(version) -> str | None:
    """A version without its local build label (torch's ``2.13.0+cpu`` -> ``2.13.0``): the same release."""
    return None if version is None else str(version).split("+", 1)[0]


def record_versions(record: dict | None) -> dict:
    """The versions a result record was made with (`VERSION_KEYS`, None where it names none)."""
    provenance = (record or {}).get("provenance") or {}
    return {key: provenance.get(key) for key in VERSION_KEYS}


def same_versions(recorded: dict, current: dict | None = None) -> bool:
    """Whether a record's versions are those installed now (`current`: default `_versions()`): every
    one recorded (a record without versions is of unknown make) and equal, torch's build label aside."""
    current = _versions() if current is None else current
    return all(recorded.get(k) is not None and _release(recorded.get(k)) == _release(current.get(k)) for k in VERSION_KEYS)


def _is_done(record: dict | None, settings: dict, stats_hash: str | None, replacement: str | None = None,
             versions: dict | None = None) -> bool:
    if record is None or record.get("status") != evaluation.OK:
        return False
    if not same_versions(record_versions(record), versions):  # made by another moepaper / lm-eval / ...: redo
        return False
    if replacement == NOVICE and record.get("replacement") != NOVICE:  # e.g. a masked "mone" of before novices
        return False
    if record.get("evaluation") != settings:
        return False
    return stats_hash is None or record.get("provenance", {}).get("statistics_hash") == stats_hash


def _settings_difference(recorded: dict, settings: dict) -> str:
    keys = sorted(set(recorded) | set(settings))
    return ", ".join(f"{k}: {recorded.get(k)!r} there, {settings.get(k)!r} here" for k in keys if recorded.get(k) != settings.get(k))


def check_settings(model_dir: str | Path, settings: dict) -> None:
    """Refuse (ResultsSettingsError naming both) to add results of other evaluation settings to
    `model_dir`; record `settings` there when it has none yet (a folder of older results without
    the record is checked record by record first)."""
    model_dir = Path(model_dir)
    recorded_path = model_dir / SETTINGS_FILE
    recorded = read_result(recorded_path)
    advice = f"write to another results directory, or remove {model_dir} to start over"
    if recorded is not None:
        if recorded != settings:
            raise ResultsSettingsError(
                f"{model_dir} holds results made with evaluation settings {recorded} ({recorded_path}); this sweep's "
                f"settings are {settings}; they differ in {_settings_difference(recorded, settings)}: {advice}"
            )
        return
    for path in sorted(model_dir.rglob("*.json")) if model_dir.exists() else []:
        record = read_result(path)
        other = (record or {}).get("evaluation")
        if other is not None and other != settings:
            raise ResultsSettingsError(
                f"{path} was made with evaluation settings {other}; this sweep's settings are {settings}; they differ "
                f"in {_settings_difference(other, settings)}: {advice}"
            )
    write_json_atomic(recorded_path, settings)


@contextmanager
def results_lock(model_dir: str | Path):
    """Hold ``<model_dir>/.sweep.lock`` while writing results there; ResultsLockedError naming
    the holder's pid if another process (or another sweep of this one) holds it. The lock is
    an advisory `flock`, which the system releases when its holder dies: a lock file left by a
    killed sweep is taken over."""
    import fcntl

    path = Path(check_writable(model_dir)) / LOCK_FILE
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise ResultsLockedError(
                f"{path.parent} is being written by another sweep (pid {holder}, lock {path}); wait for it to finish, "
                "or write to another results directory"
            ) from None
        try:  # the file may have been removed by a holder that just finished: lock the one at the path
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield path
    finally:
        path.unlink(missing_ok=True)
        os.close(fd)  # closing releases the lock


def sweep(
    model,
    tokenizer,
    stats: ExpertStatistics,
    *,
    criteria: str | Sequence | None = None,
    ratios: Sequence[float] = (0.25, 0.5),
    suite: str | evaluation.Suite = "local",
    setting: str = TASK_AGNOSTIC,
    model_name: str | None = None,
    model_id: str | None = None,
    calibration: str | None = None,
    statistics_path: str | Path | None = None,
    out_dir: str | Path,
    limit: int | float | None = None,
    batch_size: int = evaluation.DEFAULT_BATCH_SIZE,
    seed: int = 0,
    include_unpruned: bool = True,
    allow_code_execution: bool = False,
    apply_chat_template: bool = False,
    progress: bool = True,
    reuse_identical: bool = True,
    on_entry: Callable[[Entry, list[Path]], None] | None = None,
    backend: str = "hf",
    checkpoints: dict | None = None,
    workers: int = 1,
    load: dict | None = None,
) -> list[Path]:
    """Evaluate every criterion at every ratio (and the unpruned model); write one file per benchmark.

    model, tokenizer: the loaded model (evaluated in memory under `mask_experts`).
    stats: its expert statistics; results record their tensor checksum (`ExpertStatistics.checksum`,
        the same whichever file holds them) and `statistics_path`, the file they were loaded from.
    criteria: ``"named"`` (default: the paper's named criteria + the baselines "mone", "mone-ranking"
        and "aimer"), ``"grid"`` (every (b, alpha, beta) + the baselines), or a list (names,
        `Criterion`s, points, "mone"). Each is evaluated as its ``replacement`` says: "mone" (MoNE
        as published) under `replace_with_novices` (pruned experts return their mean calibration
        output, routing unchanged), the others under `mask_experts`. AIMER scores the model's
        weights (no calibration): at a ratio it keeps the same experts for every calibration, so
        with reuse_identical the sweeps of the other calibrations copy its results.
    ratios: fractions of experts removed in every MoE layer (`select_experts`, scope "layer").
    suite: evaluation suite (`moepaper.pipeline.evaluation.get_suite`).
    setting: ``"task-agnostic"``, ``"task-specific"`` or ``"all-domain"`` (`SETTINGS`), stored with every result.
    model_name: name of the model in paths and tables (default: `config._name_or_path`'s last part).
    model_id: what identifies the weights, stored with every result (default:
        `weights_fingerprint(model)`); results of another model_id are recomputed, never reused.
    calibration: name of the calibration data (default: ``stats.metadata["calibration"]``).
    out_dir: results root (the embedded run writes ``data/results``; see `moepaper.reproduce`).
    limit, batch_size, seed, allow_code_execution, apply_chat_template: passed to `evaluate`.
    reuse_identical: an entry whose kept experts equal those of an entry already evaluated
        (in this sweep or on disk, same model and evaluation settings) is the same model, so
        its results are copied rather than recomputed; the record names the source in
        ``provenance.same_kept_experts_as``. Novice models are the same only with the same kept
        experts *and* statistics (their means); a re-routed and a novice model never are. Criteria often agree at a ratio, so this saves time.
    on_entry: called after each entry's files are written (``on_entry(entry, paths)``).
    backend: ``"hf"`` (default): in memory under `mask_experts`. ``"vllm"``: each entry from a
        structurally pruned checkpoint saved to disk and deleted after its evaluation
        (`moepaper.pipeline.checkpoints`; the unpruned model from its own checkpoint). Criteria
        evaluated with novices ("mone") are refused there (NotImplementedError): a stock
        checkpoint cannot express a constant expert output.
    checkpoints: options of the ``"vllm"`` backend, `checkpoints.CheckpointEvaluator`'s keywords:
        ``checkpoint_dir`` (default ``<out_dir>/../checkpoints``), ``keep_checkpoints``,
        ``base_checkpoint``, ``tensor_parallel_size``, ``gpu_memory_utilization``, ... ;
        `checkpoints.plan_checkpoints` lists the checkpoints and lm-eval arguments beforehand.
    workers: evaluate the entries in this many processes of one torch thread each (backend "hf", a
        model on the CPU; 1, the default, evaluates in this process). Small models run one thread
        far below a core's worth of work per kernel, so on a machine of n cores n workers finish a
        sweep up to n times sooner (benchmarks/sweep_workers.py). Each worker loads the model with
        ``load_model(**load)`` and the statistics from `statistics_path`, and refuses to start on
        weights or statistics other than this process's (fingerprint, checksum); an entry whose
        kept experts equal another's is evaluated once, and this process then writes the reused
        records as a one-process sweep would. Records are the same bit for bit as one process's.
    load: `moepaper.pipeline.load_model`'s arguments for the workers: ``{"spec": "embedded"}``,
        with ``dtype`` and ``device_map`` when not the defaults. Required when workers > 1.

    An (entry, benchmark) whose file holds an "ok" result with the same evaluation settings,
    statistics checksum and versions (moepaper, lm-eval, transformers, torch) is skipped; one of
    another version is re-evaluated and its file replaced. Evaluation settings other than those the model's
    results folder was made with are refused before any work (`ResultsSettingsError`), as
    is a second sweep writing the same folder at the same time (`ResultsLockedError`).
    Returns the paths of every result file of the sweep (written or already there).
    """
    from ..architecture import find_moe_layers

    if setting not in SETTINGS:
        raise ValueError(f"setting={setting!r}: one of {SETTINGS}")
    suite = evaluation.get_suite(suite)
    model_name = model_name or Path(str(getattr(model.config, "_name_or_path", "") or type(model).__name__)).name
    calibration = calibration or stats.metadata.get("calibration") or "unknown"
    stats_hash = stats.checksum
    model_id = model_id or weights_fingerprint(model)
    settings = _settings_fingerprint(suite, limit, seed, backend, apply_chat_template, model_id)
    layers = find_moe_layers(model)
    from_disk = None
    if backend == "vllm":
        from .checkpoints import CheckpointEvaluator

        options = {"checkpoint_dir": Path(out_dir).parent / "checkpoints", "seed": seed, **(checkpoints or {})}
        from_disk = CheckpointEvaluator(model, tokenizer, model_name=model_name, **options)
    elif backend != "hf":
        raise ValueError(f"backend={backend!r}: 'hf' (in memory) or 'vllm' (pruned checkpoints on disk)")
    stats.check_model(model)
    if workers != 1:
        _check_workers(model, workers, load, backend, statistics_path)
    model_dir = Path(out_dir) / slug(model_name)
    with results_lock(model_dir):  # also checks that the folder can be written, before any work
        check_settings(model_dir, settings)
        if workers > 1:
            _evaluate_in_workers(
                model, stats, layers, workers=workers, load=load, criteria=criteria, ratios=ratios, suite=suite,
                setting=setting, model_name=model_name, calibration=calibration, statistics_path=statistics_path,
                out_dir=out_dir, limit=limit, batch_size=batch_size, seed=seed, include_unpruned=include_unpruned,
                allow_code_execution=allow_code_execution, apply_chat_template=apply_chat_template, progress=progress,
                reuse_identical=reuse_identical, on_entry=on_entry, stats_hash=stats_hash, settings=settings)
        return _sweep(model, tokenizer, stats, layers, criteria=criteria, ratios=ratios, suite=suite, setting=setting,
                      model_name=model_name, calibration=calibration, statistics_path=statistics_path, out_dir=out_dir,
                      limit=limit, batch_size=batch_size, seed=seed, include_unpruned=include_unpruned,
                      allow_code_execution=allow_code_execution, apply_chat_template=apply_chat_template,
                      progress=progress, reuse_identical=reuse_identical, on_entry=on_entry, stats_hash=stats_hash,
                      settings=settings, from_disk=from_disk)


def _sweep(model, tokenizer, stats, layers, *, criteria, ratios, suite, setting, model_name, calibration, statistics_path,
           out_dir, limit, batch_size, seed, include_unpruned, allow_code_execution, apply_chat_template, progress,
           reuse_identical, on_entry, stats_hash, settings, from_disk=None, only: set[int] | None = None) -> list[Path]:
    """The sweep itself (`sweep` checks its inputs and holds the lock); `only`: the positions in
    `_entries`'s list of the entries to run (a worker's share), None for all."""
    from ..progress import progress as tqdm

    from ..pruning import mask_experts, replace_with_novices

    entries = _entries(criteria, ratios, calibration, include_unpruned)
    if only is not None:
        entries = [e for i, e in enumerate(entries) if i in only]
    novice = sorted({e.name for e in entries if getattr(e.criterion, "replacement", REROUTE) == NOVICE})
    if from_disk is not None and novice:
        raise NotImplementedError(
            f"criteria {novice} replace pruned experts by novices (a constant output per expert, routing unchanged), "
            "which a stock pruned checkpoint cannot express: evaluate them with backend='hf', or leave them out of "
            "the vllm sweep (criteria=[c for c in resolve_criteria('named') if c.replacement != 'novice'])"
        )
    current = _versions()
    evaluated = _evaluated_index(Path(out_dir) / slug(model_name), settings, current) if reuse_identical else {}
    all_paths: list[Path] = []
    referrers = _Referrers(Path(out_dir), slug(model_name))
    counts = {"evaluated": 0, "reused": 0, "skipped": 0}
    bar = tqdm(entries, desc=f"sweep {model_name} / {calibration}", unit="entry", disable=not progress)
    for entry in bar:
        bar.set_postfix_str(f"{entry.name} {entry.ratio:g}")
        keep, removed, paths = _entry_files(entry, stats, model, layers, out_dir, model_name, suite)
        all_paths += paths.values()
        entry_hash = None if entry.unpruned else stats_hash
        replacement = None if entry.unpruned else entry.criterion.replacement
        todo = _entry_todo(paths, settings, entry_hash, replacement, current)
        if not todo:
            counts["skipped"] += 1
            continue
        kept_key = _kept_key(keep, replacement, entry_hash)
        rows, sources, references, seconds, run = {}, {}, {}, 0.0, None
        for name in todo:  # the same kept experts make the same model: reuse its results
            source = evaluated.get((kept_key, name))
            if source is not None:
                rows[name] = {k: source.get(k) for k in evaluation.RESULT_COLUMNS}
                sources[name] = source["_path"]
                if source.get("items") is not None:  # its items are referenced, not copied
                    references[name] = source.get(ITEMS_FROM) or {"path": source["_path"], "sha256": items_digest(source["items"])}
        missing = [name for name in todo if name not in rows]
        if missing:
            started = time.time()
            options = dict(limit=limit, batch_size=batch_size, benchmarks=missing, seed=seed,
                           allow_code_execution=allow_code_execution, apply_chat_template=apply_chat_template)
            if from_disk is not None:
                run = from_disk.run(entry.criterion, entry.ratio, entry.calibration, keep)
                frame = from_disk.evaluate(run, keep, suite=suite, **options)
            else:
                if keep is None:
                    pruned = nullcontext()
                elif entry.criterion.replacement == NOVICE:  # MoNE as published: novices, routing unchanged
                    pruned = replace_with_novices(model, keep, stats, layers=layers)
                else:  # pruned experts leave routing
                    pruned = mask_experts(model, keep, layers=layers)
                with pruned:
                    frame = evaluation.evaluate(model, tokenizer, suite, **options)
            seconds = time.time() - started
            rows.update({row["benchmark"]: row for row in frame.to_dict("records")})
            counts["evaluated"] += 1
        else:
            counts["reused"] += 1
        written = []
        for name in todo:
            row = rows[name]
            record = {
                "model": model_name,
                "calibration": entry.calibration,
                "setting": None if entry.unpruned else setting,
                **criterion_record(entry.criterion),
                "replacement": replacement,
                "ratio": entry.ratio,
                "removed": removed,
                **{k: _jsonable(v) for k, v in row.items()},
                "kept": None if keep is None else [k.tolist() for k in keep],
                "evaluation": settings,
                "provenance": {
                    **current,
                    "seed": seed,
                    "statistics_hash": entry_hash,
                    "statistics": None if entry.unpruned else _statistics_summary(stats, statistics_path),
                    "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                    "seconds": 0.0 if name in sources else round(seconds, 2),
                    "same_kept_experts_as": sources.get(name),
                    **(from_disk.provenance(run) if run is not None and name not in sources else {}),
                },
            }
            referrers.detach(paths[name])  # records referencing the items this file held keep them
            path = write_result(paths[name], record, references.get(name))
            referrers.add(path, references.get(name))
            written.append(path)
            if row.get("status") == evaluation.OK:
                reference = {ITEMS_FROM: references[name]} if name in references else {}
                evaluated.setdefault((kept_key, name), {**record, **reference, "_path": _relative(path, out_dir)})
        if on_entry is not None:
            on_entry(entry, written)
    log.info("sweep %s / %s: %d entries evaluated, %d reused identical kept sets, %d already on disk",
             model_name, calibration, counts["evaluated"], counts["reused"], counts["skipped"])
    return all_paths


def _entries(criteria, ratios, calibration: str, include_unpruned: bool) -> list[Entry]:
    """A sweep's entries in order: the unpruned model (when included), then criterion by criterion, ratio by ratio."""
    entries = [Entry(UNPRUNED, 0.0, NO_CALIBRATION)] if include_unpruned else []
    return entries + [Entry(c, float(r), calibration) for c in resolve_criteria(criteria) for r in ratios]


def _entry_files(entry: Entry, stats, model, layers, out_dir, model_name: str, suite) -> tuple:
    """(kept experts or None for the unpruned model, experts removed per layer, {benchmark: result path})."""
    from ..pruning import select_experts

    keep = None
    if not entry.unpruned:
        keep = select_experts(expert_scores(stats, entry.criterion, model=model), ratio=entry.ratio, layers=layers)
    removed = [0] * len(layers) if keep is None else keep.num_removed
    paths = {b.name: result_path(out_dir, model_name, entry.calibration, entry.criterion, removed, b.name) for b in suite.benchmarks}
    return keep, removed, paths


def _entry_todo(paths: dict, settings: dict, entry_hash, replacement, current: dict) -> list[str]:
    """The benchmarks of an entry whose file does not yet hold a reusable "ok" result."""
    return [name for name, p in paths.items() if not _is_done(read_result(p), settings, entry_hash, replacement, current)]


# ---------------------------------------------------------------- worker processes


def _check_workers(model, workers, load, backend: str, statistics_path) -> None:
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise ValueError(f"workers={workers!r}: a whole number of processes, at least 1")
    if workers == 1:
        return
    if backend != "hf":
        raise ValueError(f"workers={workers}: worker processes evaluate in memory (backend 'hf'), not backend={backend!r}")
    devices = {p.device.type for p in model.parameters()}
    if devices != {"cpu"}:
        raise ValueError(f"workers={workers}: worker processes share the CPU's cores; the model is on {sorted(devices)}. "
                         "Use workers=1 on a GPU")
    if not load or not load.get("spec"):
        raise ValueError(f"workers={workers}: pass load={{'spec': <the model's spec>}} so that each worker can load "
                         "the model (moepaper.pipeline.load_model's arguments)")
    if statistics_path is None or not Path(statistics_path).is_file():
        raise ValueError(f"workers={workers}: each worker loads the statistics from statistics_path, which is "
                         f"{'not given' if statistics_path is None else f'not a file: {statistics_path}'}")


def _worker_plan(model, stats, layers, *, criteria, ratios, suite, model_name, calibration, out_dir, include_unpruned,
                 reuse_identical, stats_hash, settings) -> list[int]:
    """Positions (in `_entries`' order) of the entries the workers evaluate: those with a benchmark
    still to do, one per set of kept experts, none whose results the final one-process pass can reuse."""
    current = _versions()
    evaluated = None  # read when first needed: a sweep with everything on disk reads no record twice
    planned, seen = [], set()
    for i, entry in enumerate(_entries(criteria, ratios, calibration, include_unpruned)):
        keep, _, paths = _entry_files(entry, stats, model, layers, out_dir, model_name, suite)
        entry_hash = None if entry.unpruned else stats_hash
        replacement = None if entry.unpruned else entry.criterion.replacement
        todo = _entry_todo(paths, settings, entry_hash, replacement, current)
        if not todo:
            continue
        key = _kept_key(keep, replacement, entry_hash)
        if reuse_identical:
            if evaluated is None:
                evaluated = _evaluated_index(Path(out_dir) / slug(model_name), settings, current)
            if key in seen or all((key, name) in evaluated for name in todo):
                continue
        seen.add(key)
        planned.append(i)
    return planned


def _evaluate_in_workers(model, stats, layers, *, workers, load, on_entry, progress, **job) -> None:
    """Evaluate `_worker_plan`'s entries in `workers` spawned processes (one torch thread each), each
    pulling the next entry when it finishes one; an entry's files are written by its worker as it ends,
    so an interrupted sweep keeps every finished entry."""
    import multiprocessing

    from ..progress import progress as tqdm

    planned = _worker_plan(model, stats, layers, criteria=job["criteria"], ratios=job["ratios"], suite=job["suite"],
                           model_name=job["model_name"], calibration=job["calibration"], out_dir=job["out_dir"],
                           include_unpruned=job["include_unpruned"], reuse_identical=job["reuse_identical"],
                           stats_hash=job["stats_hash"], settings=job["settings"])
    if not planned:
        return
    entries = _entries(job["criteria"], job["ratios"], job["calibration"], job["include_unpruned"])
    job = {**job, "statistics_path": str(job["statistics_path"])}  # `_sweep`'s keyword arguments, for each worker
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no torch thread pool inherited
    n = min(workers, len(planned))
    with context.Pool(n, initializer=_worker_start, initargs=(dict(load), job)) as pool:
        done = pool.imap_unordered(_worker_entry, planned)
        for i, paths in tqdm(done, total=len(planned), desc=f"sweep {job['model_name']} / {job['calibration']} ({n} workers)",
                             unit="entry", disable=not progress):
            if on_entry is not None:
                on_entry(entries[i], paths)
        pool.close()
        pool.join()


_WORKER: dict = {}


def _worker_start(load: dict, job: dict) -> None:
    """A worker's model and statistics, checked against the parent's. An error is kept and raised by
    `_worker_entry`, so that it reaches the sweep (a pool's initializer that raises is only restarted)."""
    try:
        _worker_load(load, job)
    except Exception as error:  # noqa: BLE001 (raised again, with its message, in the sweep's process)
        _WORKER["error"] = error


def _worker_load(load: dict, job: dict) -> None:
    from .models import load_model

    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"
    logging.getLogger("lm-eval").setLevel(logging.WARNING)
    model, tokenizer = load_model(**load)
    found = weights_fingerprint(model)
    if found != job["settings"]["model_id"]:
        raise RuntimeError(f"a sweep worker loaded load_model(**{load}) with weights {found}, not the sweep's "
                           f"model ({job['settings']['model_id']}): pass the spec of the model being swept as load")
    stats = ExpertStatistics.load(job["statistics_path"])
    if stats.checksum != job["stats_hash"]:
        raise RuntimeError(f"a sweep worker read statistics {stats.checksum} from {job['statistics_path']}, "
                           f"not the sweep's ({job['stats_hash']}): the file changed during the sweep")
    from ..architecture import find_moe_layers

    _WORKER.update(job=job, model=model, tokenizer=tokenizer, stats=stats, layers=find_moe_layers(model))


def _worker_entry(i: int) -> tuple[int, list[Path]]:
    if "error" in _WORKER:
        raise _WORKER["error"]
    w = _WORKER
    written: list[Path] = []
    _sweep(w["model"], w["tokenizer"], w["stats"], w["layers"], **{**w["job"], "reuse_identical": False}, progress=False,
           on_entry=lambda entry, paths: written.extend(paths), only={i})
    return i, written


class _Referrers:
    """Which records of a model folder take their items from which (``items_from``), found on first need."""

    def __init__(self, root: Path, model: str):
        self.root, self.model, self.index = root, model, None

    def _load(self) -> dict[str, list[Path]]:
        if self.index is None:
            self.index = {}
            for path in sorted((self.root / self.model).rglob("*.json")) if (self.root / self.model).exists() else []:
                self.add(path, (read_result(path, resolve=False) or {}).get(ITEMS_FROM))
        return self.index

    def add(self, path: Path, reference: dict | None) -> None:
        if reference and self.index is not None:
            self.index.setdefault(reference["path"], []).append(Path(path))

    def detach(self, path: Path) -> None:
        """Before `path` is replaced: every record referencing its items gets a copy of them."""
        old = read_result(path, resolve=False) if Path(path).exists() else None
        if not old or old.get(ITEMS_FROM) or old.get("items") is None:
            return
        items = resolve_items(old, path)["items"]
        for other in self._load().pop(_relative(path, self.root), []):
            record = read_result(other, resolve=False)
            if record and (record.get(ITEMS_FROM) or {}).get("path") == _relative(path, self.root):
                write_result(other, {**record, "items": items})


def _kept_key(keep, replacement: str | None = None, stats_hash: str | None = None) -> tuple:
    """What makes two entries the same model: the kept experts per layer (None, the unpruned model,
    keeps everything) and, where pruned experts become novices, the statistics their means come from
    (a re-routed and a novice model with the same kept experts differ)."""
    if keep is None:
        return ("all",)
    kept = tuple(tuple(int(i) for i in k) for k in keep)
    return (NOVICE, stats_hash, kept) if replacement == NOVICE else kept


def _relative(path: Path, root) -> str:
    try:
        return str(Path(path).relative_to(root))
    except ValueError:
        return str(path)


def _evaluated_index(model_dir: Path, settings: dict, versions: dict | None = None) -> dict:
    """(kept experts, benchmark) -> an "ok" record under `model_dir` with the same evaluation settings
    and versions (`same_versions`)."""
    index = {}
    if not model_dir.exists():
        return index
    for path in sorted(model_dir.rglob("*.json")):
        record = read_result(path)
        if not record or record.get("status") != evaluation.OK or record.get("evaluation") != settings:
            continue
        if not same_versions(record_versions(record), versions):
            continue
        kept = record.get("kept")
        replacement = record.get("replacement") or REROUTE  # records without the field were re-routed
        key = _kept_key(kept, replacement, record.get("provenance", {}).get("statistics_hash"))
        index.setdefault((key, record.get("benchmark")), {**record, "_path": _relative(path, model_dir.parent)})
    return index


def _statistics_summary(stats: ExpertStatistics, path) -> dict:
    meta = stats.metadata
    return {
        "file": None if path is None else relative_to_project(path),
        "calibration": meta.get("calibration"),
        "token_count": meta.get("token_count"),
        "gate": meta.get("gate"),
        "model_name": meta.get("model_name"),
    }


def _jsonable(value):
    if isinstance(value, float) and math.isnan(value):
        return None
    if hasattr(value, "item"):
        return value.item()
    return value


def _versions() -> dict:
    found = versions()
    return {k: found.get(k) for k in ("moepaper", "lm_eval", "transformers", "torch")}
