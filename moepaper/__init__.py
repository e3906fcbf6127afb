"""moepaper: one-shot expert pruning of MoE language models.

The core, at the top of the package, is what the paper is about:

    find_moe_layers(model)                      the MoE layers of any transformers v5 MoE
    stats = collect_statistics(model, batches)  one calibration pass, every moment
    expert_scores(stats, "man")                 S(b, alpha, beta) = N_j^-b sum_t g^alpha ||f||^beta
    keep = select_experts(scores, ratio=0.25)   the lowest-scoring experts of every layer go
    mask_experts(model, keep) / prune_experts(model, keep) / save_pruned(...)
    replace_with_novices(model, keep, stats)    MoNE's evaluation: pruned experts return their mean output
    expert_damage(model, batches)               the measured damage the formulation estimates

`moepaper.pipeline` runs the paper (calibration data, lm-eval evaluation, the sweep and its
result files, tables, figures, model loading); `moepaper.testbed` holds the embedded
default model (its corpus, training and lm-eval tasks) and tiny models for tests.
"""

from .architecture import MoELayer, UnsupportedModelError, find_moe_layers
from .criteria import (
    AIMER,
    CRITERIA,
    MONE,
    MONE_RANKING,
    NAMED_CRITERIA,
    Criterion,
    ExpertScores,
    StatisticCriterion,
    WeightCriterion,
    criterion_grid,
    expert_scores,
    get_criterion,
    resolve_criteria,
)
from .damage import ExpertDamage, damage_correlation, expert_damage
from .provenance import package_version
from .pruning import KeptExperts, mask_experts, prune_experts, replace_with_novices, save_pruned, select_experts
from .statistics import ExpertStatistics, NonFiniteActivationError, StatisticsMismatchError, collect_statistics

__version__ = package_version() or "0+unknown"

__all__ = [
    "MoELayer",
    "UnsupportedModelError",
    "find_moe_layers",
    "ExpertStatistics",
    "NonFiniteActivationError",
    "StatisticsMismatchError",
    "collect_statistics",
    "CRITERIA",
    "NAMED_CRITERIA",
    "MONE",
    "MONE_RANKING",
    "AIMER",
    "WeightCriterion",
    "Criterion",
    "StatisticCriterion",
    "ExpertScores",
    "criterion_grid",
    "expert_scores",
    "get_criterion",
    "resolve_criteria",
    "KeptExperts",
    "select_experts",
    "prune_experts",
    "mask_experts",
    "replace_with_novices",
    "save_pruned",
    "ExpertDamage",
    "expert_damage",
    "damage_correlation",
    "__version__",
]
