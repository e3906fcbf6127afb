"""Stand-in data for rehearsing the paper route offline.

None of the paper's datasets (its 14 lm-eval benchmarks and its three calibration sources)
can be downloaded on the machines this project is developed on. This module serves a few
rows of each, written for this repository in each real dataset's own schema (column names,
types, splits; never copied from the benchmarks), so that the real pipeline runs end to
end: calibration reads records shaped like the hub's, and lm-eval runs its *own* task
definitions (prompts, filters, metrics, generation settings) with only the data source
swapped.

- `standin_task_dir()` writes a folder of lm-eval task YAMLs, one per paper task (and the
  57 MMLU subjects plus the MMLU group files). Each YAML ``include:``\\ s the installed
  lm-eval task YAML by absolute path and overrides only ``dataset_path`` (``json``),
  ``dataset_name`` (null) and ``dataset_kwargs`` (``data_files``: the stand-in JSONL of
  every split the task reads). lm-eval 0.4.13 resolves ``!function utils.x`` against the
  folder of the YAML that holds the tag, so the included task's own ``utils.py``
  (HellaSwag's ``process_docs``, WinoGrande's ``doc_to_*``, MATH's ``process_results``
  with math-verify, HumanEval / MBPP's ``pass@k``) is the one that runs. Task and group
  names are the paper suite's (``arc_easy``, ``mmlu``, ``minerva_math500``, ...).
- `standin_task_manager()`: ``TaskManager(include_path=<that folder>, include_defaults=False)``.
- `calibration_standin(key)`: the stand-in records of calibration source ``"c4"``,
  ``"code"`` or ``"math"`` (`moepaper.pipeline.calibration.SOURCES`), in the hub schema.
- `offline_code_eval()`: HumanEval(+) and MBPP(+) score with Hugging Face ``evaluate``'s
  ``code_eval`` metric, which ``evaluate.load("code_eval")`` fetches from the hub when
  lm-eval imports the tasks' ``utils.py``; offline, with no cached copy, the tasks cannot
  even be loaded. This context manager lets ``evaluate`` find, *only when the hub cannot
  be reached*, an equivalent module written for this repository
  (`moepaper.pipeline.offline_code_eval`: the same ``compute(predictions, references, k)``
  contract, each candidate program run with its tests in a subprocess). Online, the real
  one is used. For real offline runs, cache the real metric once online instead:
  ``python -c "import evaluate; evaluate.load('code_eval')"``.

The data lie in ``standin_data/`` next to this file: ``<lm-eval task>/<split>.jsonl`` and
``calibration/<source>.jsonl`` (package data glob: ``pipeline/standin_data/**/*.jsonl``).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import sys
import tempfile
import uuid
from pathlib import Path

DATA_DIR = Path(__file__).resolve().with_name("standin_data")

# paper task -> (its YAML inside lm_eval/tasks/, the splits the task reads: the evaluation
# split and the split lm-eval builds its few-shot sampler from at init, even at 0 shots)
PAPER_TASK_YAMLS: dict[str, tuple[str, tuple[str, ...]]] = {
    "arc_easy": ("arc/arc_easy.yaml", ("train", "validation", "test")),
    "arc_challenge": ("arc/arc_challenge.yaml", ("train", "validation", "test")),
    "boolq": ("super_glue/boolq/default.yaml", ("train", "validation")),
    "hellaswag": ("hellaswag/hellaswag.yaml", ("train", "validation")),
    "openbookqa": ("openbookqa/openbookqa.yaml", ("train", "validation", "test")),
    "rte": ("glue/rte/default.yaml", ("train", "validation")),
    "winogrande": ("winogrande/default.yaml", ("train", "validation")),
    "gsm8k": ("gsm8k/gsm8k.yaml", ("train", "test")),
    "humaneval": ("humaneval/humaneval.yaml", ("test",)),
    "humaneval_plus": ("humaneval/humaneval_plus.yaml", ("test",)),
    "mbpp": ("mbpp/mbpp.yaml", ("test",)),
    "mbpp_plus": ("mbpp/mbpp_plus.yaml", ("test",)),
    "minerva_math500": ("minerva_math/minerva_math500.yaml", ("test",)),
}
MMLU_DIR = "mmlu/default"
MMLU_GROUP_YAMLS = ("_mmlu.yaml", "_mmlu_stem.yaml", "_mmlu_other.yaml", "_mmlu_social_sciences.yaml", "_mmlu_humanities.yaml")
MMLU_SPLITS = ("dev", "test")  # cais/mmlu: fewshot_split dev, test_split test

# The paper suite's lm-eval task names (mmlu is a group of 57 subject tasks).
PAPER_TASKS = (
    "arc_challenge", "arc_easy", "boolq", "hellaswag", "mmlu", "openbookqa", "rte", "winogrande",
    "humaneval", "humaneval_plus", "mbpp", "mbpp_plus", "gsm8k", "minerva_math500",
)
CODE_TASKS = ("humaneval", "humaneval_plus", "mbpp", "mbpp_plus")

CALIBRATION_KEYS = ("c4", "code", "math")


def lm_eval_tasks_dir() -> Path:
    """The installed lm-eval's ``tasks`` folder (its task YAMLs)."""
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).resolve().parent


def mmlu_subjects() -> list[str]:
    """The 57 MMLU subjects, from the installed lm-eval's per-subject YAMLs."""
    folder = lm_eval_tasks_dir() / MMLU_DIR
    return sorted(p.stem.removeprefix("mmlu_") for p in folder.glob("mmlu_*.yaml"))


def _data_files(task: str, splits: tuple[str, ...]) -> dict[str, str]:
    files = {}
    for split in splits:
        path = DATA_DIR / task / f"{split}.jsonl"
        if not path.is_file():
            raise FileNotFoundError(f"stand-in data of task {task!r}, split {split!r} missing: {path}")
        files[split] = str(path)
    return files


def _override_yaml(include: Path, task: str, splits: tuple[str, ...]) -> str:
    # JSON is valid YAML: every value quoted and escaped, whatever the paths hold.
    lines = [
        "# Generated by moepaper.pipeline.standin: lm-eval's own task, stand-in data.",
        f"include: {json.dumps(str(include))}",
        f"task: {json.dumps(task)}",
        "dataset_path: json",
        "dataset_name: null",
        f"dataset_kwargs: {json.dumps({'data_files': _data_files(task, splits)})}",
    ]
    return "\n".join(lines) + "\n"


def task_yamls() -> dict[str, str]:
    """File name -> YAML text of every stand-in task and group file."""
    tasks_dir = lm_eval_tasks_dir()
    files = {}
    for task, (relative, splits) in PAPER_TASK_YAMLS.items():
        files[f"{task}.yaml"] = _override_yaml(tasks_dir / relative, task, splits)
    mmlu = tasks_dir / MMLU_DIR
    for subject in mmlu_subjects():
        task = f"mmlu_{subject}"
        files[f"mmlu/{task}.yaml"] = _override_yaml(mmlu / f"{task}.yaml", task, MMLU_SPLITS)
    for group in MMLU_GROUP_YAMLS:  # the groups themselves, unchanged
        files[f"mmlu/{group.lstrip('_')}"] = f"include: {json.dumps(str(mmlu / group))}\n"
    return files


MANIFEST = "moepaper-standin.json"  # in a complete stand-in task folder: sha256 of every file it holds


def _manifest(files: dict[str, str]) -> dict[str, str]:
    return {name: hashlib.sha256(text.encode()).hexdigest() for name, text in sorted(files.items())}


def _is_complete(path: Path, files: dict[str, str]) -> bool:
    """`path` holds exactly `files` (and their manifest): every file present, with its text, and no other."""
    try:
        if json.loads((path / MANIFEST).read_text()) != _manifest(files):
            return False
        present = {p.relative_to(path).as_posix() for p in path.rglob("*") if not p.is_dir()}
        return present == set(files) | {MANIFEST} and all((path / n).read_text() == t for n, t in files.items())
    except (OSError, ValueError):
        return False


def _check_replaceable(path: Path) -> None:
    """Refuse (FileExistsError naming it) to put the folder where a file, a link or a folder of other files is."""
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        kind = "a symbolic link" if path.is_symlink() else "a file"
        raise FileExistsError(f"stand-in task folder {path}: {kind} is in the way (the folder is written there); "
                              "remove it or pass another path")
    if path.is_dir():
        others = sorted(p.relative_to(path).as_posix() for p in path.rglob("*")
                        if not p.is_dir() and not (p.suffix == ".yaml" or p.name == MANIFEST))
        if others:
            raise FileExistsError(f"stand-in task folder {path} holds files that are not stand-in task YAMLs "
                                  f"({', '.join(others[:3])}{', ...' if len(others) > 3 else ''}); not replaced: "
                                  "remove them or pass another path")


def standin_task_dir(path: str | Path | None = None) -> Path:
    """Write the stand-in task YAMLs and return their folder.

    path: where to write them; None: a folder under the system temp dir named by a hash of
    the YAMLs (which hold absolute paths of this machine's lm-eval and stand-in data).
    The folder holds only these YAMLs and a manifest of their hashes (``moepaper-standin.json``).
    A folder already holding exactly them is used as it is; otherwise the folder is written
    whole in a uniquely named folder beside it and renamed into place, so a reader (another
    process indexing the tasks) never sees a partial folder, and concurrent calls agree on
    one. An incomplete or outdated folder of stand-in YAMLs is replaced; a file, a symbolic
    link or a folder of other files at `path` is refused (FileExistsError naming it).
    """
    from ..project import _umask

    files = task_yamls()
    if path is None:
        digest = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:12]
        path = Path(tempfile.gettempdir()) / f"moepaper-standin-tasks-{digest}"
    path = Path(path)
    _check_replaceable(path)
    if _is_complete(path, files):
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        for name, text in files.items():
            target = staging / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text)
        (staging / MANIFEST).write_text(json.dumps(_manifest(files), indent=1) + "\n")
        os.chmod(staging, 0o777 & ~_umask())  # mkdtemp's 0o700 is not what mkdir gives
        for _ in range(5):
            try:
                os.rename(staging, path)  # atomic; replaces an empty folder, fails on a non-empty one
                return path
            except OSError as error:
                if error.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise
            if _is_complete(path, files):  # another process put the same folder in place
                return path
            _check_replaceable(path)
            stale = path.with_name(f".{path.name}.stale.{os.getpid()}.{uuid.uuid4().hex[:8]}")
            try:  # an incomplete or outdated folder: move it aside (readers see it whole or not at all), then retry
                os.rename(path, stale)
            except FileNotFoundError:
                pass
            shutil.rmtree(stale, ignore_errors=True)
        raise RuntimeError(f"stand-in task folder {path}: other processes kept replacing it; try again")
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def standin_task_manager(path: str | Path | None = None):
    """lm-eval's TaskManager over the stand-in tasks only (no built-in task indexing)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(standin_task_dir(path)), include_defaults=False)


def standin_docs(task: str, split: str) -> list[dict]:
    """The stand-in rows of one lm-eval task and split, as stored."""
    path = DATA_DIR / task / f"{split}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def calibration_standin(key: str) -> list[dict]:
    """Stand-in records of calibration source `key` ("c4", "code", "math") in the hub schema.

    c4: {"text", "timestamp", "url"} (allenai/c4 en); code: {"instruction", "output"}
    (theblackcat102/evol-codealpaca-v1); math: {"id", "prompt", "messages": [{"role",
    "content"}, ...]} (allenai/tulu-3-sft-personas-math). Format them with
    `moepaper.pipeline.calibration.format_record`, which applies the tokenizer's chat template to
    code and math as for the real sources.
    """
    if key not in CALIBRATION_KEYS:
        raise ValueError(f"no stand-in for calibration source {key!r}; known: {', '.join(CALIBRATION_KEYS)}")
    path = DATA_DIR / "calibration" / f"{key}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ------------------------------------------------------------------ code_eval offline

CODE_EVAL_MODULE = Path(__file__).resolve().with_name("offline_code_eval.py")


@contextlib.contextmanager
def offline_code_eval(modules_cache: str | Path | None = None):
    """Let ``evaluate.load("code_eval")`` fall back to this repository's equivalent offline.

    ``evaluate`` tries the hub first and, when that fails, the newest cached copy of
    ``evaluate-metric--code_eval`` in its modules cache. Within this context the modules
    cache is `modules_cache` (None: a folder under the system temp dir) holding
    `moepaper.pipeline.offline_code_eval` as that cached copy; on leaving, the previous
    cache setting is restored. lm-eval loads the metric when it imports a code task's
    ``utils.py`` (once per process), so enter this before the tasks are loaded.
    Executing model-written code still needs ``HF_ALLOW_CODE_EVAL=1``.
    """
    import evaluate.config

    source = CODE_EVAL_MODULE.read_bytes()
    digest = hashlib.sha256(source).hexdigest()  # evaluate wants a 64-hex-digit folder name
    root = Path(modules_cache) if modules_cache is not None else Path(tempfile.gettempdir()) / "moepaper-evaluate-modules"
    package = root / evaluate.config.MODULE_NAME_FOR_DYNAMIC_MODULES
    folder = package / "metrics" / "evaluate-metric--code_eval" / digest
    folder.mkdir(parents=True, exist_ok=True)
    for init in (root, package, package / "metrics", folder.parent, folder):
        (init / "__init__.py").touch()
    (folder / "code_eval.py").write_bytes(source)
    previous = evaluate.config.HF_MODULES_CACHE
    evaluate.config.HF_MODULES_CACHE = root
    # a dynamic-modules package imported earlier from another cache must also see this one
    loaded = sys.modules.get(evaluate.config.MODULE_NAME_FOR_DYNAMIC_MODULES)
    if loaded is not None and str(package) not in list(loaded.__path__):
        loaded.__path__.append(str(package))
    try:
        yield root
    finally:
        evaluate.config.HF_MODULES_CACHE = previous


def code_execution_allowed() -> bool:
    return os.environ.get("HF_ALLOW_CODE_EVAL") == "1"


__all__ = [
    "DATA_DIR", "PAPER_TASKS", "PAPER_TASK_YAMLS", "CODE_TASKS", "CALIBRATION_KEYS", "standin_task_dir",
    "standin_task_manager", "standin_docs", "calibration_standin", "offline_code_eval", "mmlu_subjects", "task_yamls",
]
