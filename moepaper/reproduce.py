"""`python -m moepaper.reproduce` (`make reproduce`): run the paper notebooks with papermill.

For each model of a run configuration, each calibration (task-agnostic and
task-specific) and each calibration seed, it executes

    01_collect_statistics  -> statistics file of that calibration draw
    02_prune_and_evaluate  -> one result JSON per (criterion, ratio, benchmark), once per sweep

then, once per configuration, 00_formulation (teaching) and its exercise solutions,
03_damage_check and 04_tables_and_figures (every table and figure). Executed copies go under
`runs/<config>/` (ignored by git); the embedded configuration also renders each executed copy
as HTML under `docs/notebooks/` (committed, so a reader sees the numbers without installing).

The terminal shows which notebook runs, which section of it (its markdown headings) and the
notebooks' own progress bars (`moepaper.progress`), which go to the terminal, never into the
executed notebooks. A step whose executed copy finished with the same parameters is skipped,
and the notebooks themselves skip statistics and results already on disk, so an
interrupted run resumes where it stopped.

A calibration draw is a (source, seed): seed 0 keeps the source's name (``embedded:mixed``,
statistics ``embedded-mixed.safetensors``), seed k > 0 is named ``embedded:mixed@seed<k>``
(`moepaper.pipeline.calibration.calibration_name`; statistics ``embedded-mixed-seed<k>.safetensors``,
results ``<model>/embedded-mixed-seed<k>/``). A model's `Sweep`s say which criteria are
evaluated on which draws, with which item limit, into which results root; one results root
per sweep kind, since a model's results folder holds results of one evaluation setting only.

Configurations (`--config`, several allowed; default `DEFAULT_CONFIGS`, what `make reproduce` runs):
    embedded         the embedded default model (64 experts, top-8, per-layer balance) on CPU:
                     statistics of 3 calibrations x 3 seeds, the named criteria on every item of
                     the local suite (data/results/named/), and the grid on the mixed calibration,
                     seed 0, at 80 / 30 items (data/results/grid/, the heatmap); figures in figures/
    embedded-16e     the same on the first balance ablation (16 experts, top-2, pooled aux loss); its grid
                     covers the three calibrations (committed)
    embedded-pooled  the same-shape balance ablation (the default's recipe, pooled aux loss) and
    embedded-seed1   the default's recipe with training seed 1: the three general-domain draws and
                     one draw each of code and math, named criteria (not in the default run)
    paper            the paper's four models on GPU (needs the Hub and a GPU): outputs in runs/paper/
    tiny             a tiny random Qwen3-MoE, a few items per task (CI): outputs in runs/tiny/

``--config paper --rehearsal`` rehearses the paper route on a CPU, offline: the four paper
architectures at rehearsal size ("rehearsal:<key>", random weights), the three calibration
sources' stand-in rows ("standin:<key>"), the paper suite on stand-in data
("paper-rehearsal": lm-eval's own tasks and the paper's protocol, short generations),
two criteria (MAN, Frequency) at 25% plus the unpruned model: every code path of the
paper route runs for every model. Outputs in runs/paper-rehearsal/.

``--allow-code-execution`` runs HumanEval(+) / MBPP(+), which execute model-written code
(lm-eval's ``HF_ALLOW_CODE_EVAL``); without it they are recorded as "not run". Use it in a
sandbox or on a machine you trust with the code the model writes.

Every path is under the project root: the checkout the command runs in (or
``--root``), never the checkout moepaper happens to be installed from; run outside any checkout
without ``--root`` (or ``$MOEPAPER_ROOT``), it stops with an error saying so. This module is the
only one that decides where outputs go; notebooks receive paths relative to that root and
run with it as their working directory.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import re
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from .pipeline.calibration import calibration_name, disjoint_draws, parse_draw
from .pipeline.paper_models import PAPER_MODELS, REHEARSAL_PREFIX
from .pipeline.results import ALL_DOMAIN, TASK_AGNOSTIC, TASK_SPECIFIC, slug
from .progress import PROGRESS_ENV
from .project import DATA, FIGURES, NOTEBOOKS, RUNS, is_checkout, project_root

KERNEL_NAME = "moepaper"  # the kernel every notebook names; installed inside the virtual environment
HTML_DIR = "docs/notebooks"  # rendered copies of the embedded configuration's executed notebooks
SOLUTIONS = "00_formulation_solutions.ipynb"  # the exercises of 00, solved; runs with 00's parameters
MEASURING = ("00_formulation.ipynb", "03_damage_check.ipynb")  # they store their costly measurements (`pipeline.measurements`)
# Parameters that change how a run gets its numbers, not what it produces (`force`: measure again;
# `workers`: processes of notebook 02's sweep): left out of a run's done marker.
HOW_ONLY = ("force", "workers")
# Notebook 02's worker processes for the embedded models' sweeps (one torch thread each): the
# machines this runs on have two cores or more (benchmarks/sweep_workers.py measures the gain).
EMBEDDED_WORKERS = 2


@dataclass
class Sweep:
    """One sweep of notebook 02 over some of a model's calibration draws.

    name: tags the executed copies (``02__<model>__<draw>__<name>.ipynb``).
    evaluate: parameters of 02 for this sweep (criteria, limit, ...), over the model's `evaluate`.
    results_dir: results root, relative to the project root (None: the configuration's `results_dir`).
    calibrations: the sources swept (None: all of the model's); seeds: the seeds swept (None: all).
    """

    name: str
    evaluate: dict = field(default_factory=dict)
    results_dir: str | None = None
    calibrations: list[str] | None = None
    seeds: tuple[int, ...] | None = None


@dataclass
class ModelRun:
    """One model of a configuration: its spec, its calibrations and seeds, its sweeps and the shared parameters."""

    name: str  # short name: results and statistics paths, table titles
    model: str  # load_model spec: "embedded", "embedded-16e", "tiny:<family>", an HF id or a path
    calibrations: dict[str, str]  # calibration source -> setting
    ratios: list[float]
    collect: dict = field(default_factory=dict)  # extra parameters of 01
    evaluate: dict = field(default_factory=dict)  # extra parameters of 02 (every sweep)
    load: dict = field(default_factory=dict)  # parameters of 01 and 02: dtype, device_map
    seeds: tuple[int, ...] = (0,)  # calibration seeds: one statistics file per (source, seed)
    sweeps: list[Sweep] | None = None  # None: one sweep of `evaluate` over every draw into the configuration's results_dir
    draw_collect: dict = field(default_factory=dict)  # parameters of 01 for disjoint draws (over `collect`)

    def draws(self) -> list[tuple[str, int]]:
        """Every (calibration source, seed), source by source; a disjoint draw
        (``<source>@draw<k>of<n>``, `calibration.disjoint_draws`) has seed 0 only."""
        return [(source, seed) for source in self.calibrations
                for seed in ((0,) if parse_draw(source) is not None else self.seeds)]

    def collect_parameters(self, source: str) -> dict:
        """Parameters of 01 for `source`: `collect`, with `draw_collect` over it for a disjoint draw."""
        return {**self.collect, **self.draw_collect} if parse_draw(source) is not None else dict(self.collect)


@dataclass
class RunConfig:
    name: str
    models: list[ModelRun]
    statistics_dir: str  # relative to the project root
    results_dir: str  # the main results root (notebook 04's tables); a `Sweep` may write elsewhere
    figures_dir: str
    science: dict = field(default_factory=dict)  # parameters of 00 and 03 (None: skip them)
    run_science: bool = True
    grid_results_dir: str | None = None  # results of the grid sweep, for notebook 04's heatmaps (None: none apart)
    compare_models: tuple[str, ...] = ()  # notebook 04 ranks these models' criteria side by side, with intervals
    shift_models: tuple[str, ...] = ()  # notebook 04 compares the task-agnostic ranking with these same-shape models'
    retrained_model: str | None = None  # the one of shift_models that is this model retrained with another seed: the yardstick
    html_dir: str | None = None  # relative to the project root: an HTML copy of every executed notebook


# Fractions of experts removed per paper model (25% on all four, 50% on ERNIE and Qwen3).
PAPER_RATIOS = {"olmoe": [0.25], "deepseek_v2_lite": [0.25], "ernie": [0.25, 0.5], "qwen3": [0.25, 0.5]}


# The embedded runs: calibration seeds, and the grid sweep's item limit (the former committed sweep's).
EMBEDDED_SEEDS = (0, 1, 2)
# Disjoint calibration draws (`calibration.disjoint_draws`): three per source, 28 windows of 512 tokens
# each (14,336 tokens), the most that three draws sharing no document hold of the smallest
# calibration split (math: 30 windows per part). The general-domain (literature) draws are the
# task-agnostic setting, the paper's C4 analogue: none of its text is from an evaluation domain's split.
N_DISJOINT_DRAWS = 3
DISJOINT_COLLECT = dict(n_sequences=28, seq_len=512)
GRID_LIMIT = {"mc": 80, "ppl": 30}
# The named sweep evaluates every item of the local suite (1,579 items: 838 multiple-choice, 741
# held-out documents), with the packed scoring of `moepaper.pipeline.packed` (benchmarks/evaluation.py).
NAMED_LIMIT = "all"
# the ablation first: the default model's notebook 04 compares both models' rankings. The
# same-shape ablation (embedded-pooled) and the retrained default (embedded-seed1) have
# configurations of their own, run by name until their results are committed.
DEFAULT_CONFIGS = ("embedded-16e", "embedded")
SAME_RECIPE_MODELS = ("embedded-pooled", "embedded-seed1")


def _embedded_config(name: str, grid_calibrations: list[str], compare_models: tuple[str, ...] = (),
                     shift_models: tuple[str, ...] = (), retrained_model: str | None = None,
                     general: bool = True, all_domain: bool = True, seeds: tuple[int, ...] = EMBEDDED_SEEDS,
                     science: bool = True) -> RunConfig:
    """Embedded model `name` on CPU: every draw collected, the named criteria on every item of
    every draw (`NAMED_LIMIT`, data/results/named/), the grid at `GRID_LIMIT` items on the seed-0
    draws of `grid_calibrations` (data/results/grid/; none when empty).

    Calibrations: the task-agnostic setting's `N_DISJOINT_DRAWS` disjoint general-domain draws
    (``embedded:literature@draw<k>of3``, when `general`), the all-domain mixed calibration (when
    `all_domain`) and the task-specific code and math calibrations, with `seeds`.
    science: run notebooks 00 and 03 for this model."""
    calibrations = {draw: TASK_AGNOSTIC for draw in disjoint_draws("embedded:literature", N_DISJOINT_DRAWS)} if general else {}
    if all_domain:
        calibrations["embedded:mixed"] = ALL_DOMAIN
    calibrations.update({"embedded:code": TASK_SPECIFIC, "embedded:math": TASK_SPECIFIC})
    sweeps = [Sweep("named", dict(criteria="named", limit=NAMED_LIMIT))]
    if grid_calibrations:
        sweeps.append(Sweep("grid", dict(criteria="grid", limit=dict(GRID_LIMIT)), results_dir=f"{DATA}/results/grid",
                            calibrations=list(grid_calibrations), seeds=(0,)))
    model = ModelRun(name, name, calibrations, [0.25, 0.5], dict(n_sequences=80, seq_len=512),
                     dict(suite="local", batch_size=32, workers=EMBEDDED_WORKERS), dict(threads=1), seeds=seeds, sweeps=sweeps,
                     draw_collect=dict(DISJOINT_COLLECT))
    return RunConfig(
        name=name,
        models=[model],
        statistics_dir=f"{DATA}/statistics",
        results_dir=f"{DATA}/results/named",
        figures_dir=FIGURES,
        science=dict(model=name, figures_dir="figures", measurements_dir=f"{DATA}/measurements",
                     # notebook 03 also checks the task-agnostic setting's first general-domain draw, with its committed statistics
                     general_statistics={draw: f"{DATA}/statistics/{slug(name)}/{slug(draw)}.safetensors"
                                         for draw in disjoint_draws("embedded:literature", N_DISJOINT_DRAWS)[:1]} if general else {}),
        run_science=science,
        grid_results_dir=f"{DATA}/results/grid" if grid_calibrations else None,
        compare_models=compare_models,
        shift_models=shift_models,
        retrained_model=retrained_model,
        html_dir=HTML_DIR if name == "embedded" else None,  # the default model's notebooks, rendered
    )


def _configs() -> dict[str, RunConfig]:
    paper_cal = {"c4": TASK_AGNOSTIC, "code": TASK_SPECIFIC, "math": TASK_SPECIFIC}
    gpu_collect = dict(n_sequences=1024, seq_len=2048, batch_size=8)
    gpu_eval = dict(suite="paper", batch_size=16, criteria="named")
    gpu = dict(dtype="bfloat16", device_map="auto")
    return {
        "embedded": _embedded_config("embedded", ["embedded:mixed"], compare_models=("embedded", "embedded-16e"),
                                     shift_models=SAME_RECIPE_MODELS, retrained_model="embedded-seed1"),
        # the 16-expert first ablation: no general-domain draws (the same-shape ablation replaces it)
        "embedded-16e": _embedded_config("embedded-16e", ["embedded:mixed", "embedded:code", "embedded:math"],
                                         general=False),
        # the same-shape balance ablation and the retrained default: the general-domain draws and one
        # draw each of code and math (the protocol's affordable budget), no grid, no science notebooks
        **{name: _embedded_config(name, [], general=True, all_domain=False, seeds=(0,), science=False)
           for name in SAME_RECIPE_MODELS},
        "paper": RunConfig(
            name="paper",
            models=[
                ModelRun(key, key, paper_cal, PAPER_RATIOS[key], gpu_collect, gpu_eval, gpu) for key in PAPER_MODELS
            ],
            statistics_dir=f"{RUNS}/paper/statistics",
            results_dir=f"{RUNS}/paper/results",
            figures_dir=f"{RUNS}/paper/figures",
            run_science=False,
        ),
        "tiny": RunConfig(
            name="tiny",
            models=[ModelRun("tiny-qwen3", "tiny:qwen3_moe", {"embedded:mixed": TASK_AGNOSTIC, "embedded:code": TASK_SPECIFIC},
                             [0.25], dict(n_sequences=4, seq_len=32, batch_size=4), dict(suite="smoke", criteria=["man", "frequency"]))],
            statistics_dir=f"{RUNS}/tiny/statistics",
            results_dir=f"{RUNS}/tiny/results",
            figures_dir=f"{RUNS}/tiny/figures",
            science=dict(model="tiny:qwen3_moe", measurements_dir=f"{RUNS}/tiny/measurements", general_statistics={}),
        ),
    }


CONFIGS = _configs()

# The rehearsal's reduced grid: two criteria of different kinds (b = 1 and b = 0), one ratio.
REHEARSAL_CRITERIA = ["man", "frequency"]
REHEARSAL_RATIOS = [0.25]


def rehearsal(config: RunConfig) -> RunConfig:
    """`config` (the paper's) on rehearsal-size models and stand-in data, on a CPU, outputs in runs/<name>-rehearsal/.

    Same models (as ``rehearsal:<key>``), same calibration sources (as ``standin:<key>``, the
    same formatting and packing) and settings, the paper suite on stand-in tasks
    (``paper-rehearsal``), `REHEARSAL_CRITERIA` at `REHEARSAL_RATIOS`, small calibration
    (8 x 128 tokens: the stand-in rows hold about 3,000 characters per source).
    """
    from .pipeline.calibration import STANDIN_PREFIX

    name = f"{config.name}-rehearsal"
    models = [
        ModelRun(
            m.name, REHEARSAL_PREFIX + m.model, {STANDIN_PREFIX + source: setting for source, setting in m.calibrations.items()},
            list(REHEARSAL_RATIOS), dict(n_sequences=8, seq_len=128, batch_size=8),
            {**m.evaluate, "suite": "paper-rehearsal", "criteria": list(REHEARSAL_CRITERIA), "batch_size": 16},
            dict(threads=1),
        )
        for m in config.models
    ]
    return RunConfig(name, models, f"{RUNS}/{name}/statistics", f"{RUNS}/{name}/results", f"{RUNS}/{name}/figures",
                     run_science=False)


def ensure_kernel() -> str:
    """The notebooks' kernel, for this very interpreter, inside its environment (``sys.prefix``).

    `make test` installs it the same way (``ipykernel install --sys-prefix``), so nothing is
    written to the user's home and two clones never share a kernel. The environment's kernel
    folder is put first on JUPYTER_PATH, so a stale user-level kernel of the same name (from
    an older install) cannot take its place.
    """
    prefix_dir = Path(sys.prefix) / "share" / "jupyter"
    spec = prefix_dir / "kernels" / KERNEL_NAME / "kernel.json"
    if not spec.exists() or json.loads(spec.read_text())["argv"][0] != sys.executable:
        from ipykernel.kernelspec import install

        install(kernel_name=KERNEL_NAME, display_name="Python (moepaper)", prefix=sys.prefix)
    paths = [p for p in os.environ.get("JUPYTER_PATH", "").split(os.pathsep) if p]
    if str(prefix_dir) not in paths:
        os.environ["JUPYTER_PATH"] = os.pathsep.join([str(prefix_dir)] + paths)
    return KERNEL_NAME


# Parameters naming files or folders a notebook reads (not writes): its done marker depends on their content.
READS = {"04_tables_and_figures.ipynb": ("results_dir", "grid_results_dir", "statistics")}


def _fingerprint(root: Path, notebook: str, parameters: dict) -> str:
    """What a done marker records: the notebook's source, its parameters, the versions that change
    numbers (moepaper, lm-eval, transformers, torch) and the content of what it reads (`READS`), so
    an upgrade or changed results make it run again."""
    from .provenance import file_sha256, versions

    source = (root / NOTEBOOKS / notebook).read_bytes()
    found = versions()
    inputs = {}
    for key in READS.get(notebook, ()):
        value = parameters.get(key)
        for path in (value.values() if isinstance(value, dict) else [value] if value else []):
            inputs[str(path)] = file_sha256(root / path) if (root / path).exists() else None
    made = {"versions": {k: found.get(k) for k in ("moepaper", "lm_eval", "transformers", "torch")}, "reads": inputs}
    blob = json.dumps([parameters, made], sort_keys=True, default=str).encode() + source
    return hashlib.sha256(blob).hexdigest()[:16]


def _headings(nb) -> list[str]:
    """For each cell, the last markdown heading at or before it (what the terminal says is running)."""
    current, out = "", []
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            lines = [line.lstrip("#").strip() for line in cell.source.splitlines() if line.startswith("#")]
            current = lines[-1] if lines else current
        out.append(current)
    return out


@functools.cache
def _local_kernel_manager():
    """The kernel manager of `run_notebook`'s kernels (a class, made once)."""
    from jupyter_client.manager import AsyncKernelManager
    from traitlets import CaselessStrEnum

    class LocalKernelManager(AsyncKernelManager):
        """The kernel talks over IPC sockets in the user's runtime folder, not over TCP on
        localhost: nothing listens on a port, and ipykernel has no reason for its warning that
        "Kernel is running over TCP without encryption" (IPC is unavailable on Windows: TCP there)."""

        transport = CaselessStrEnum(["tcp", "ipc"], default_value="tcp" if os.name == "nt" else "ipc", config=True)

        def _ip_default(self) -> str:
            # jupyter_client names IPC sockets "kernel-ipc-<port>" in the working directory when no
            # connection file is set yet, so two runs in one checkout at once (two configurations,
            # or a test beside a sweep) would bind the same sockets and read each other's messages
            # ("Invalid Signature"). Each kernel gets its own socket prefix in the runtime folder.
            if self.transport == "ipc":
                from jupyter_core.paths import jupyter_runtime_dir

                folder = Path(jupyter_runtime_dir())
                folder.mkdir(parents=True, exist_ok=True)
                return str(folder / f"moepaper-{os.getpid()}-{uuid.uuid4().hex[:12]}-ipc")
            return super()._ip_default()

        async def _async_interrupt_kernel(self) -> None:
            # jupyter_client interrupts the kernel before every shutdown request; an idle kernel
            # then logs "KeyboardInterrupt caught in kernel" as an ERROR. A kernel being shut down
            # after its notebook finished has nothing to interrupt.
            if not self.shutting_down:
                await super()._async_interrupt_kernel()

    return LocalKernelManager


def _engine() -> str:
    """Register (once) and name the papermill engine of `run_notebook`: papermill's own, in a kernel
    on local IPC sockets, printing each section heading as execution reaches it."""
    from papermill.engines import NBClientEngine, NotebookExecutionManager, papermill_engines

    if "moepaper" in papermill_engines._engines:
        return "moepaper"
    kernel_manager = _local_kernel_manager()

    class Manager(NotebookExecutionManager):
        def __init__(self, nb, **kwargs):
            super().__init__(nb, **kwargs)
            self.headings, self.shown = _headings(nb), None

        def cell_start(self, cell, cell_index=None, **kwargs):
            super().cell_start(cell, cell_index=cell_index, **kwargs)
            heading = self.headings[cell_index] if cell_index is not None else None
            if heading and heading != self.shown:
                self.shown = heading
                print(f"    [cell {cell_index + 1}/{len(self.nb.cells)}] {heading}", flush=True)

    class Engine(NBClientEngine):
        @classmethod
        def execute_notebook(cls, nb, kernel_name, output_path=None, progress_bar=False, log_output=False,
                             autosave_cell_every=30, **kwargs):
            nb_man = Manager(nb, output_path=output_path, progress_bar=progress_bar, log_output=log_output,
                             autosave_cell_every=autosave_cell_every)
            nb_man.notebook_start()
            try:
                cls.execute_managed_notebook(nb_man, kernel_name, log_output=log_output,
                                             kernel_manager_class=kernel_manager, **kwargs)
            finally:
                nb_man.cleanup_pbar()
                nb_man.notebook_complete()
            return nb_man.nb

    papermill_engines.register("moepaper", Engine)
    return "moepaper"


def run_notebook(notebook: str, output: Path, parameters: dict, *, root: Path, force: bool = False) -> bool:
    """Execute `notebook` into `output` with papermill, in `root`; skip if done with the same parameters. True if run.

    The kernel runs with ``MOEPAPER_PROGRESS=terminal`` and without file-descriptor capture:
    the notebooks' progress bars go to this process's terminal, not into `output`.
    """
    import papermill

    marker = output.with_suffix(".done")
    # `force` (measure again) changes how a run gets its numbers, not what it produces: a forced run
    # counts as done for the next run without it
    fingerprint = _fingerprint(root, notebook, {k: v for k, v in parameters.items() if k not in HOW_ONLY})
    if not force and marker.exists() and marker.read_text().strip() == fingerprint and output.exists():
        print(f"  = {output.relative_to(root)} (done)", flush=True)
        return False
    output.parent.mkdir(parents=True, exist_ok=True)
    marker.unlink(missing_ok=True)
    started = time.time()
    print(f"  > {notebook} -> {output.relative_to(root)}", flush=True)
    # the kernel reads and writes this checkout, whatever the environment said; its bars go to the terminal
    setting = {"MOEPAPER_ROOT": str(root), PROGRESS_ENV: "terminal"}
    previous = {name: os.environ.get(name) for name in setting}
    os.environ.update(setting)
    try:
        papermill.execute_notebook(
            str(root / NOTEBOOKS / notebook),
            str(output),
            parameters=parameters,
            kernel_name=ensure_kernel(),
            engine_name=_engine(),
            cwd=str(root),
            progress_bar=False,
            extra_arguments=["--IPKernelApp.capture_fd_output=False"],
        )
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    marker.write_text(fingerprint + "\n")
    print(f"    {time.time() - started:.0f} s", flush=True)
    return True


def statistics_path(config: RunConfig, model: ModelRun, source: str, seed: int = 0) -> str:
    """``<statistics_dir>/<model>/<slug of the draw's name>.safetensors``, relative to the project root."""
    return f"{config.statistics_dir}/{slug(model.name)}/{slug(calibration_name(source, seed))}.safetensors"


def sweeps(model: ModelRun) -> list[Sweep]:
    """The model's sweeps; without any, one sweep of its `evaluate` over every draw."""
    return list(model.sweeps) if model.sweeps is not None else [Sweep("", {})]


def wants_html(executed: Path) -> bool:
    """Whether an executed notebook gets an HTML copy: 00, its solutions, 03 and 04, whose outputs
    hold no timings, so a rerun renders the same bytes. 01 and 02 report how long the
    calibration pass and each sweep entry took, and would change on every run."""
    return not executed.name.startswith(("01__", "02__"))


def render_html(executed: Path, target: Path, root: Path | None = None) -> Path:
    """An HTML copy of an executed notebook (nbconvert's lab template, images inline) that is
    the same file whenever the outputs are the same: without papermill's per-cell timestamps,
    with a fixed id for papermill's injected-parameters cell (papermill draws a random one), pandas'
    styled tables numbered in order (pandas names them with random uuids), and
    with the checkout's absolute path `root` written as ``.`` (notebooks print where they run)."""
    import nbformat
    from nbconvert import HTMLExporter

    nb = nbformat.read(executed, as_version=4)
    for cell in nb.cells:
        cell.metadata.pop("papermill", None)
        cell.metadata.pop("execution", None)
        if "injected-parameters" in cell.metadata.get("tags", []):
            cell["id"] = "injected-parameters"
    nb.metadata.pop("papermill", None)
    body, _ = HTMLExporter(template_name="lab").from_notebook_node(nb)
    if root is not None:
        body = body.replace(str(Path(root).resolve()), ".")
    # pandas' Styler names each styled table with a random uuid ("T_1e6c6"): number them instead
    names: dict[str, str] = {}
    body = re.sub(r"\bT_([0-9a-f]{5})(?=[_\" ])", lambda m: names.setdefault(m.group(1), f"T_table{len(names)}"), body)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(body, encoding="utf-8")
    return target


def plan(config: RunConfig, root: Path, *, allow_code_execution: bool = False) -> list[tuple[str, Path, dict]]:
    """The (notebook, executed copy, parameters) steps of a configuration, in order; paths in
    parameters are relative to `root`, executed copies under ``root/runs/<config>``.

    Per model and calibration draw (source, seed): 01 collects its statistics, then 02 runs
    every `Sweep` that covers the draw. Then 00 and 03 (when `run_science`), and 04 per model
    on the main results root, with the seed-0 statistics of each source.
    allow_code_execution: passed to 02 (HumanEval(+) / MBPP(+) run model-written code)."""
    out = root / RUNS / config.name
    steps = []
    statistics_by_model: dict[str, dict[str, str]] = {}
    for m in config.models:
        for s in sweeps(m):
            unknown = set(s.calibrations or ()) - set(m.calibrations)
            unknown_seeds = set(s.seeds or ()) - set(m.seeds)
            if unknown or unknown_seeds:
                raise ValueError(f"{config.name}/{m.name}: sweep {s.name!r} covers calibrations {sorted(unknown)} or "
                                 f"seeds {sorted(unknown_seeds)} the model does not collect")
        for source, seed in m.draws():
            setting = m.calibrations[source]
            name = calibration_name(source, seed)
            stats_path = statistics_path(config, m, source, seed)
            if seed == 0 and (parse_draw(source) is None or parse_draw(source)[1] == 0):  # each calibration's first draw
                statistics_by_model.setdefault(m.name, {})[source] = stats_path
            tag = f"{slug(m.name)}__{slug(name)}"
            steps.append(("01_collect_statistics.ipynb", out / f"01__{tag}.ipynb",
                          dict(model=m.model, model_name=m.name, calibration=source, output=stats_path, **m.load,
                               **m.collect_parameters(source), seed=seed)))
            for s in sweeps(m):
                if (s.calibrations is not None and source not in s.calibrations) or (s.seeds is not None and seed not in s.seeds):
                    continue
                steps.append(("02_prune_and_evaluate.ipynb", out / f"02__{tag}{'__' + s.name if s.name else ''}.ipynb",
                              dict(model=m.model, model_name=m.name, statistics=stats_path, calibration=name, setting=setting,
                                   ratios=m.ratios, results_dir=s.results_dir or config.results_dir, **m.load,
                                   **{**m.evaluate, **s.evaluate},
                                   **({"allow_code_execution": True} if allow_code_execution else {}))))
    if config.run_science:
        formulation = {k: v for k, v in config.science.items() if k != "general_statistics"}  # a parameter of 03 only
        steps.append(("00_formulation.ipynb", out / "00_formulation.ipynb", formulation))
        steps.append((SOLUTIONS, out / SOLUTIONS, dict(formulation)))
        steps.append(("03_damage_check.ipynb", out / "03_damage_check.ipynb", dict(config.science)))
    for m in config.models:
        steps.append(("04_tables_and_figures.ipynb", out / f"04__{slug(m.name)}.ipynb",
                      dict(model_name=m.name, results_dir=config.results_dir,
                           statistics=statistics_by_model[m.name], figures_dir=config.figures_dir,
                           **({"grid_results_dir": config.grid_results_dir} if config.grid_results_dir else {}),
                           **({"compare_models": list(config.compare_models)} if config.compare_models else {}),
                           **({"shift_models": list(config.shift_models)} if config.shift_models else {}),
                           **({"retrained_model": config.retrained_model} if config.retrained_model else {}))))
    return steps


def _names(name: str, notebook: str) -> bool:
    """Whether `name` (of ``--only``) names `notebook`: its file name, without .ipynb, or its number."""
    return name in (notebook, notebook.removesuffix(".ipynb"), notebook.split("_")[0])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", nargs="+", default=list(DEFAULT_CONFIGS), choices=sorted(CONFIGS),
                        help=f"configurations to run, in order (default: {' '.join(DEFAULT_CONFIGS)})")
    parser.add_argument("--rehearsal", action="store_true",
                        help="with --config paper: rehearse on CPU, offline (rehearsal-size models, stand-in data); "
                             "outputs in runs/paper-rehearsal/")
    parser.add_argument("--allow-code-execution", action="store_true",
                        help="run HumanEval(+) / MBPP(+), which execute model-written code (else recorded as 'not run')")
    parser.add_argument("--only", nargs="+", help="run only these notebooks: file names, names without .ipynb "
                                                  "or numbers (04_tables_and_figures.ipynb, 04_tables_and_figures, 04)")
    parser.add_argument("--force", action="store_true",
                        help="re-execute notebooks already done, and measure again what 00 and 03 store under data/measurements "
                             "(results and statistics on disk are still reused)")
    parser.add_argument("--list", action="store_true", help="print the steps and exit")
    parser.add_argument("--root", type=Path, default=None,
                        help="the checkout to read from and write to (default: the one holding the current directory)")
    args = parser.parse_args(argv)
    configs = [CONFIGS[name] for name in dict.fromkeys(args.config)]
    if args.rehearsal:
        if [c.name for c in configs] != ["paper"]:
            parser.error("--rehearsal rehearses the paper route: use it with --config paper")
        configs = [rehearsal(configs[0])]
    root = project_root(args.root)
    if not is_checkout(root):
        parser.error(f"{root} is not a moepaper checkout (a pyproject.toml naming moepaper beside notebooks/): "
                     "run from a clone of the repository or pass --root <clone>")
    plans = [(config, plan(config, root, allow_code_execution=args.allow_code_execution)) for config in configs]
    if args.only:
        notebooks = sorted({notebook for _, steps in plans for notebook, _, _ in steps})
        unknown = [name for name in args.only if not any(_names(name, notebook) for notebook in notebooks)]
        if unknown:
            parser.error(f"--only {' '.join(unknown)}: no notebook of configuration {', '.join(c.name for c in configs)} "
                         f"by that name; valid: {', '.join(notebooks)} (or without .ipynb, or their number)")
    for config, steps in plans:
        if args.only:
            steps = [s for s in steps if any(_names(name, s[0]) for name in args.only)]
        if args.list:
            for notebook, output, parameters in steps:
                print(notebook, output.relative_to(root), json.dumps(parameters))
            continue
        started = time.time()
        print(f"moepaper.reproduce: configuration {config.name!r} in {root}, {len(steps)} notebook runs; "
              f"executed copies in {RUNS}/{config.name}/")
        for i, (notebook, output, parameters) in enumerate(steps, 1):
            print(f"[{i}/{len(steps)}] {notebook}", flush=True)
            if args.force and notebook in MEASURING:  # their stored measurements are taken again too
                parameters = {**parameters, "force": True}
            run_notebook(notebook, output, parameters, root=root, force=args.force)
            if config.html_dir and wants_html(output):
                html = root / config.html_dir / output.with_suffix(".html").name
                if not html.exists() or html.stat().st_mtime < output.stat().st_mtime:
                    print(f"    html -> {render_html(output, html, root).relative_to(root)}", flush=True)
        print(f"done in {time.time() - started:.0f} s: tables and figures in {config.figures_dir}/")
    return 0

if __name__ == "__main__":
    sys.exit(main())
