"""An offline equivalent of Hugging Face evaluate's hub metric ``code_eval``.

Written for this repository so HumanEval(+) / MBPP(+) can be scored where the hub is
unreachable (see `moepaper.pipeline.standin.offline_code_eval`, which installs this file as
a cached ``evaluate-metric--code_eval`` module; ``evaluate`` uses it only after failing to
reach the hub). Same contract as the hub metric that lm-eval's task ``utils.py`` calls:

    compute(predictions=[[candidate, ...], ...], references=[test_program, ...], k=[1, ...])
    -> ({"pass@1": float, ...}, {task_index: [(completion_id, {"passed": bool, "result": str}), ...]})

Each candidate is run as ``candidate + "\\n" + test_program`` in a separate Python process
(isolated mode, an empty temporary working folder, a timeout); it passes when the process
exits with status 0. pass@k is the unbiased estimator 1 - C(n-c, k) / C(n, k) averaged over
problems. As with the hub metric, nothing runs unless ``HF_ALLOW_CODE_EVAL=1``.

This file must import only the standard library, numpy, ``datasets`` and ``evaluate``: evaluate
imports it as a standalone module.
"""

import os
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "Runs candidate programs against test programs and estimates pass@k (offline stand-in of code_eval)."
_CITATION = ""
_KWARGS_DESCRIPTION = """
Args:
    predictions: list of candidates per problem (list of list of str).
    references: one test program per problem (str), e.g. asserts or `check(f)`.
    k: the k of pass@k (default [1, 10, 100]).
    num_workers: processes run at once (default 4).
    timeout: seconds per candidate (default 3.0).
Returns:
    pass_at_k: {"pass@k": value} for each k no larger than the candidates per problem.
    results: per problem, (completion_id, {"passed", "result"}) per candidate.
"""
_REFUSAL = (
    "This metric executes untrusted model-generated code. Set HF_ALLOW_CODE_EVAL=1 to allow it "
    "(os.environ['HF_ALLOW_CODE_EVAL'] = '1'), preferably inside a sandbox."
)


def _run(program: str, timeout: float) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        try:
            done = subprocess.run(
                [sys.executable, "-I", "-c", program], cwd=folder, capture_output=True, timeout=timeout,
                stdin=subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired:
            return {"passed": False, "result": "timed out"}
    if done.returncode == 0:
        return {"passed": True, "result": "passed"}
    last = done.stderr.decode(errors="replace").strip().splitlines()
    return {"passed": False, "result": f"failed: {last[-1] if last else done.returncode}"}


def _estimate(n: int, c: int, k: int) -> float:
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


class CodeEval(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            module_type="metric",
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Sequence(datasets.Value("string")), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references, k=[1, 10, 100], num_workers=4, timeout=3.0):  # noqa: B006 (the hub metric's signature)
        if os.getenv("HF_ALLOW_CODE_EVAL", "0") != "1":
            raise ValueError(_REFUSAL)
        jobs = [(i, j, candidate + "\n" + test) for i, (candidates, test) in enumerate(zip(predictions, references))
                for j, candidate in enumerate(candidates)]
        with ThreadPoolExecutor(max_workers=num_workers) as pool:
            outcomes = list(pool.map(lambda job: _run(job[2], timeout), jobs))
        results = {i: [] for i in range(len(references))}
        for (i, j, _), outcome in zip(jobs, outcomes):
            results[i].append((j, outcome))
        total = np.array([len(results[i]) for i in range(len(references))])
        correct = np.array([sum(r["passed"] for _, r in results[i]) for i in range(len(references))])
        ks = [k] if isinstance(k, int) else k
        pass_at_k = {
            f"pass@{kk}": float(np.mean([_estimate(int(n), int(c), kk) for n, c in zip(total, correct)]))
            for kk in ks if (total >= kk).all()
        }
        return pass_at_k, results
