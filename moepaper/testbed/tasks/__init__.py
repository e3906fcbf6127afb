"""The offline lm-eval task suite of the embedded model (`local/`: YAML, loaders and data).

Six tasks made from the test split of the embedded corpus (`moepaper.testbed.corpus`) by
`moepaper.testbed.tasks.build` and shipped inside the package, so they load with no network from
any current directory:

- ``moepaper_local_<domain>_ppl``: held-out documents, ``loglikelihood_rolling``,
  reported as bits per byte (lower is better).
- ``moepaper_local_<domain>_mc``: four-way multiple choice, accuracy (chance 25%).
  literature and code: the true next line after a few lines of context against three
  lines of similar length from other held-out documents of the same domain. math: the
  correct result of a held-out problem against three near misses (±1, ±2, ±10).

Use ``TaskManager(include_path=str(TASKS_DIR), include_defaults=False)`` and ``LOCAL_TASKS``
(or the group ``moepaper_local``).
"""

from __future__ import annotations

from pathlib import Path

from ..corpus import DOMAINS

TASKS_DIR = Path(__file__).resolve().parent / "local"
LOCAL_GROUP = "moepaper_local"
PPL_TASKS = [f"moepaper_local_{d}_ppl" for d in DOMAINS]
MC_TASKS = [f"moepaper_local_{d}_mc" for d in DOMAINS]
LOCAL_TASKS = PPL_TASKS + MC_TASKS
CHANCE = {task: 0.25 for task in MC_TASKS}  # four choices, one correct


def task_manager():
    """An lm-eval TaskManager that sees only the local suite (no indexing of built-in tasks)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(TASKS_DIR), include_defaults=False)


__all__ = ["CHANCE", "LOCAL_GROUP", "LOCAL_TASKS", "MC_TASKS", "PPL_TASKS", "TASKS_DIR", "task_manager"]
