"""`python -m moepaper.reproduce` (`make reproduce`): run the paper notebooks with papermill.

For each model of a run configuration, and each calibration (task-agnostic and
task-specific), it executes

    01_collect_statistics  -> statistics file
    02_prune_and_evaluate  -> one result JSON per (criterion, ratio, benchmark)

then, once per configuration, 00_formulation (teaching), 03_damage_check and
04_tables_and_figures (every table and figure). Executed copies go under `runs/<config>/`
(ignored by git). A step whose executed copy finished with the same parameters is skipped,
and the notebooks themselves skip statistics and results already on disk, so an
interrupted run resumes where it stopped.

Configurations (`--config`):
    embedded  (default) the embedded model on CPU: outputs in data/ and figures/
    paper     the paper's four models on GPU (needs the Hub and a GPU): outputs in runs/paper/
    tiny      a tiny random Qwen3-MoE, a few items per task (CI): outputs in runs/tiny/
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = REPO_ROOT / "notebooks"
RUNS = REPO_ROOT / "runs"


@dataclass
class ModelRun:
    """One model of a configuration: its spec, its calibrations and the shared parameters."""

    name: str  # short name: results and statistics paths, table titles
    model: str  # load_model spec: "embedded", "tiny:<family>", an HF id or a path
    calibrations: dict[str, str]  # calibration source -> setting
    ratios: list[float]
    collect: dict = field(default_factory=dict)  # extra parameters of 01
    evaluate: dict = field(default_factory=dict)  # extra parameters of 02
    load: dict = field(default_factory=dict)  # parameters of 01 and 02: dtype, device_map


@dataclass
class RunConfig:
    name: str
    models: list[ModelRun]
    statistics_dir: Path
    results_dir: Path
    figures_dir: Path
    science: dict = field(default_factory=dict)  # parameters of 00 and 03 (None: skip them)
    run_science: bool = True


TASK_AGNOSTIC, TASK_SPECIFIC = "task-agnostic", "task-specific"


def _configs() -> dict[str, RunConfig]:
    embedded_cal = {"embedded:mixed": TASK_AGNOSTIC, "embedded:code": TASK_SPECIFIC, "embedded:math": TASK_SPECIFIC}
    paper_cal = {"c4": TASK_AGNOSTIC, "code": TASK_SPECIFIC, "math": TASK_SPECIFIC}
    gpu_collect = dict(n_sequences=1024, seq_len=2048, batch_size=8)
    gpu_eval = dict(suite="paper", batch_size=16, criteria="named")
    gpu = dict(dtype="bfloat16", device_map="auto")
    return {
        "embedded": RunConfig(
            name="embedded",
            models=[ModelRun("embedded", "embedded", embedded_cal, [0.25, 0.5], dict(n_sequences=80, seq_len=512),
                             dict(suite="local", criteria="named", batch_size=32), dict(threads=1))],
            statistics_dir=REPO_ROOT / "data" / "statistics",
            results_dir=REPO_ROOT / "data" / "results",
            figures_dir=REPO_ROOT / "figures",
            science=dict(figures_dir="figures"),
        ),
        "paper": RunConfig(
            name="paper",
            models=[
                ModelRun("olmoe", "allenai/OLMoE-1B-7B-0125-Instruct", paper_cal, [0.25], gpu_collect, gpu_eval, gpu),
                ModelRun("deepseek_v2_lite", "deepseek-ai/DeepSeek-V2-Lite-Chat", paper_cal, [0.25], gpu_collect, gpu_eval, gpu),
                ModelRun("ernie", "baidu/ERNIE-4.5-21B-A3B-PT", paper_cal, [0.25, 0.5], gpu_collect, gpu_eval, gpu),
                ModelRun("qwen3", "Qwen/Qwen3-30B-A3B-Instruct-2507", paper_cal, [0.25, 0.5], gpu_collect, gpu_eval, gpu),
            ],
            statistics_dir=RUNS / "paper" / "statistics",
            results_dir=RUNS / "paper" / "results",
            figures_dir=RUNS / "paper" / "figures",
            run_science=False,
        ),
        "tiny": RunConfig(
            name="tiny",
            models=[ModelRun("tiny-qwen3", "tiny:qwen3_moe", {"embedded:mixed": TASK_AGNOSTIC, "embedded:code": TASK_SPECIFIC},
                             [0.25], dict(n_sequences=4, seq_len=32, batch_size=4), dict(suite="smoke", criteria=["man", "frequency"]))],
            statistics_dir=RUNS / "tiny" / "statistics",
            results_dir=RUNS / "tiny" / "results",
            figures_dir=RUNS / "tiny" / "figures",
            science=dict(model="tiny:qwen3_moe"),
        ),
    }


CONFIGS = _configs()


def _slug(text: str) -> str:
    from .results import slug

    return slug(text)


KERNEL_NAME = "moepaper-reproduce"


def _kernel_name() -> str:
    """A kernelspec for this very interpreter, in a private folder on JUPYTER_PATH.

    A user-level kernel named "moepaper" points at whichever virtual environment last
    registered it (another clone, say); this one always runs the moepaper being used here.
    """
    folder = RUNS / ".jupyter"
    spec_dir = folder / "kernels" / KERNEL_NAME
    spec_dir.mkdir(parents=True, exist_ok=True)
    spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "Python (moepaper reproduce)", "language": "python"}
    (spec_dir / "kernel.json").write_text(json.dumps(spec, indent=1))
    paths = os.environ.get("JUPYTER_PATH", "").split(os.pathsep)
    if str(folder) not in paths:
        os.environ["JUPYTER_PATH"] = os.pathsep.join([str(folder)] + [p for p in paths if p])
    return KERNEL_NAME


def _fingerprint(notebook: str, parameters: dict) -> str:
    source = (NOTEBOOKS / notebook).read_bytes()
    blob = json.dumps(parameters, sort_keys=True, default=str).encode() + source
    return hashlib.sha256(blob).hexdigest()[:16]


def run_notebook(notebook: str, output: Path, parameters: dict, *, force: bool = False) -> bool:
    """Execute `notebook` into `output` with papermill; skip if done with the same parameters. True if run."""
    import papermill

    marker = output.with_suffix(".done")
    fingerprint = _fingerprint(notebook, parameters)
    if not force and marker.exists() and marker.read_text().strip() == fingerprint and output.exists():
        print(f"  = {output.relative_to(REPO_ROOT)} (done)", flush=True)
        return False
    output.parent.mkdir(parents=True, exist_ok=True)
    marker.unlink(missing_ok=True)
    started = time.time()
    print(f"  > {notebook} -> {output.relative_to(REPO_ROOT)}", flush=True)
    papermill.execute_notebook(
        str(NOTEBOOKS / notebook),
        str(output),
        parameters=parameters,
        kernel_name=_kernel_name(),
        cwd=str(NOTEBOOKS),
        progress_bar=False,
    )
    marker.write_text(fingerprint + "\n")
    print(f"    {time.time() - started:.0f} s", flush=True)
    return True


def _rel(path: Path) -> str:
    """Notebook parameters hold paths relative to the repository root."""
    return str(path.relative_to(REPO_ROOT))


def plan(config: RunConfig) -> list[tuple[str, Path, dict]]:
    """The (notebook, executed copy, parameters) steps of a configuration, in order."""
    out = RUNS / config.name
    steps = []
    statistics_by_model: dict[str, dict[str, str]] = {}
    for m in config.models:
        for source, setting in m.calibrations.items():
            stats_path = _rel(config.statistics_dir / _slug(m.name) / f"{_slug(source)}.safetensors")
            statistics_by_model.setdefault(m.name, {})[source] = stats_path
            tag = f"{_slug(m.name)}__{_slug(source)}"
            steps.append(("01_collect_statistics.ipynb", out / f"01__{tag}.ipynb",
                          dict(model=m.model, model_name=m.name, calibration=source, output=stats_path, **m.load, **m.collect)))
            steps.append(("02_prune_and_evaluate.ipynb", out / f"02__{tag}.ipynb",
                          dict(model=m.model, model_name=m.name, statistics=stats_path, setting=setting,
                               ratios=m.ratios, results_dir=_rel(config.results_dir), **m.load, **m.evaluate)))
    if config.run_science:
        steps.append(("00_formulation.ipynb", out / "00_formulation.ipynb", dict(config.science)))
        steps.append(("03_damage_check.ipynb", out / "03_damage_check.ipynb", dict(config.science)))
    for m in config.models:
        steps.append(("04_tables_and_figures.ipynb", out / f"04__{_slug(m.name)}.ipynb",
                      dict(model_name=m.name, results_dir=_rel(config.results_dir),
                           statistics=statistics_by_model[m.name], figures_dir=_rel(config.figures_dir))))
    return steps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="embedded", choices=sorted(CONFIGS))
    parser.add_argument("--only", nargs="*", help="run only these notebooks (e.g. 04_tables_and_figures.ipynb)")
    parser.add_argument("--force", action="store_true", help="re-execute notebooks already done (results on disk are still reused)")
    parser.add_argument("--list", action="store_true", help="print the steps and exit")
    args = parser.parse_args(argv)
    config = CONFIGS[args.config]
    steps = plan(config)
    if args.only:
        steps = [s for s in steps if s[0] in args.only or s[0].split("_")[0] in args.only]
    if args.list:
        for notebook, output, parameters in steps:
            print(notebook, output.relative_to(REPO_ROOT), json.dumps(parameters))
        return 0
    started = time.time()
    print(f"moepaper.reproduce: configuration {config.name!r}, {len(steps)} notebook runs; executed copies in runs/{config.name}/")
    for i, (notebook, output, parameters) in enumerate(steps, 1):
        print(f"[{i}/{len(steps)}] {notebook}", flush=True)
        run_notebook(notebook, output, parameters, force=args.force)
    print(f"done in {time.time() - started:.0f} s: tables and figures in {config.figures_dir.relative_to(REPO_ROOT)}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
