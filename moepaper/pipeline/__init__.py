"""The paper pipeline: everything between a loaded model and the paper's tables.

- `models`: `load_model(spec)` for the embedded model, tiny models, the paper's checkpoints,
  hub ids and paths.
- `calibration`: `calibration_batches(source, tokenizer, ...)`: C4, code and math calibration
  from the Hub, or the embedded corpus offline.
- `evaluation`: `evaluate(model, tokenizer, suite)` over lm-eval (suites ``paper``, ``local``,
  ``smoke``).
- `results`: `sweep(...)`, the resumable criteria x ratios evaluation, one JSON per result.
- `tables`, `figures`: the paper's tables and figures from result files and statistics.

The pipeline uses the core (`moepaper`) and the testbed; neither imports it.
"""

from .calibration import CalibrationDataUnavailable, calibration_batches, calibration_description, calibration_name
from .evaluation import evaluate, get_suite
from .models import PAPER_MODELS, ModelNotAvailable, load_model
from .results import sweep
from .tables import load_results, rank_table, results_table

__all__ = [
    "CalibrationDataUnavailable",
    "calibration_batches",
    "calibration_description",
    "calibration_name",
    "evaluate",
    "get_suite",
    "PAPER_MODELS",
    "ModelNotAvailable",
    "load_model",
    "sweep",
    "load_results",
    "rank_table",
    "results_table",
]
