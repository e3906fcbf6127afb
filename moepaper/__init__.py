"""moepaper: one-shot expert pruning of MoE language models.

One calibration pass collects every expert statistic; the unified formulation
S(b, alpha, beta) = N_j^-b * sum_t 1[j routed] g^alpha ||f||^beta scores experts;
experts are pruned structurally or masked; lm-eval evaluates the result.
"""

__version__ = "0.1.0"

from .architecture import MoELayer, UnsupportedModelError, find_moe_layers
from .embedded import load_embedded_model
from .statistics import ExpertStatistics, NonFiniteActivationError, StatisticsMismatchError, collect_statistics
from .criteria import CRITERIA, Criterion, criterion_grid, expert_scores, mone_scores
from .pruning import mask_experts, prune_experts, save_pruned, select_experts
from .calibration import CalibrationDataUnavailable, calibration_batches
from .evaluation import evaluate, get_suite
from .results import sweep
from .reporting import load_results, rank_table, results_table
from .models import PAPER_MODELS, load_model
from .damage import damage_correlation, expert_damage

__all__ = [
    "MoELayer",
    "UnsupportedModelError",
    "find_moe_layers",
    "ExpertStatistics",
    "NonFiniteActivationError",
    "StatisticsMismatchError",
    "collect_statistics",
    "CRITERIA",
    "Criterion",
    "criterion_grid",
    "expert_scores",
    "mone_scores",
    "select_experts",
    "prune_experts",
    "mask_experts",
    "save_pruned",
    "CalibrationDataUnavailable",
    "calibration_batches",
    "evaluate",
    "get_suite",
    "sweep",
    "load_results",
    "rank_table",
    "results_table",
    "PAPER_MODELS",
    "load_model",
    "damage_correlation",
    "expert_damage",
    "load_embedded_model",
    "__version__",
]
