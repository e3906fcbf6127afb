"""The unified formulation: every criterion is a point (b, alpha, beta).

For MoE layer l, expert j, calibration tokens t:

    S_j(b, alpha, beta) = N_j^-b * sum_t 1[j routed on t] * g_{j,t}^alpha * ||f_{j,t}||^beta

with N_j the number of tokens routed to j, g the gate weight and f the expert's
un-gated output. b=0 keeps routing frequency in the score (a sum), b=1 averages over
the routed tokens only. The sums are the moments `ExpertStatistics.moment(alpha, beta)`
collected in one calibration pass, so a criterion never needs another pass.
The derivation (single-expert damage) is in notebooks/00_formulation.ipynb.

Criteria outside the family (MoNE) are small functions over the same statistics, so
`expert_scores(stats, criterion)` serves every criterion. Scores come back as
`ExpertScores`: a tensor that also carries the layers, expert counts, top-k and router
groups of the statistics, so `select_experts(expert_scores(stats, "man"), ratio=0.25)`
needs nothing more.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .statistics import ExpertStatistics


@dataclass(frozen=True)
class Criterion:
    """A point (b, alpha, beta) of the unified formulation, with a display name."""

    b: int
    alpha: int
    beta: int
    name: str = ""

    def __post_init__(self):
        if self.b not in (0, 1) or self.alpha not in (0, 1, 2) or self.beta not in (0, 1, 2):
            raise ValueError(f"criterion ({self.b}, {self.alpha}, {self.beta}): b must be 0 or 1, alpha and beta 0, 1 or 2")
        if (self.b, self.alpha, self.beta) == (1, 0, 0):
            raise ValueError("criterion (1, 0, 0) is the constant 1 for every routed expert and cannot rank experts")
        if not self.name:
            object.__setattr__(self, "name", f"S({self.b},{self.alpha},{self.beta})")

    @property
    def point(self) -> tuple[int, int, int]:
        return (self.b, self.alpha, self.beta)

    @property
    def averaged(self) -> bool:
        """Routed-token averaged (b=1): routing frequency drops out."""
        return self.b == 1

    @property
    def gate_free(self) -> bool:
        return self.alpha == 0

    def scores(self, stats: ExpertStatistics) -> torch.Tensor:
        """N_j^-b * sum_t g^alpha ||f||^beta, (L, E); b=0 is the plain sum, unreached experts score 0."""
        total = stats.moment(self.alpha, self.beta)  # (L, E)
        if self.b == 0:
            return total.clone()
        count = stats.count
        return torch.where(count > 0, total / count.clamp(min=1), torch.zeros_like(total))


@dataclass(frozen=True)
class StatisticCriterion:
    """A criterion outside the family: a function of the same collected statistics."""

    name: str
    function: Callable[[ExpertStatistics], torch.Tensor]
    point = None  # no (b, alpha, beta)

    def scores(self, stats: ExpertStatistics) -> torch.Tensor:
        return self.function(stats)


# The named points of ../shared/PAPER.md. MoNE lies outside the family: see `mone_scores`.
CRITERIA: dict[str, Criterion] = {
    c.name: c
    for c in (
        Criterion(0, 0, 0, "frequency"),
        Criterion(0, 1, 0, "seer"),
        Criterion(0, 0, 1, "ean"),
        Criterion(1, 1, 1, "reap"),
        Criterion(1, 0, 1, "man"),
        Criterion(1, 0, 2, "msan"),
        Criterion(0, 1, 1, "gated_ean"),
        Criterion(0, 2, 2, "gated_squared"),
    )
}


def criterion_grid() -> list[Criterion]:
    """Every (b, alpha, beta) with b in {0,1}, alpha, beta in {0,1,2}, except the constant (1,0,0).

    Named points keep their names (e.g. (1,0,1) is "man"); the rest are called "S(b,a,β)".
    """
    named = {c.point: c for c in CRITERIA.values()}
    return [
        named.get((b, a, be), Criterion(b, a, be))
        for b in (0, 1)
        for a in (0, 1, 2)
        for be in (0, 1, 2)
        if (b, a, be) != (1, 0, 0)
    ]


def get_criterion(criterion) -> Criterion | StatisticCriterion:
    """A criterion from its name ("man", "mone"), its point ((1, 0, 1)) or itself."""
    if isinstance(criterion, (Criterion, StatisticCriterion)):
        return criterion
    if isinstance(criterion, str):
        key = criterion.strip().lower()
        if key in NAMED_CRITERIA:
            return NAMED_CRITERIA[key]
        grid = {c.name: c for c in criterion_grid()}
        if criterion in grid:
            return grid[criterion]
        raise ValueError(
            f"unknown criterion {criterion!r}; named criteria: {', '.join(NAMED_CRITERIA)}, or a point (b, alpha, beta)"
        )
    b, alpha, beta = criterion
    named = {c.point: c for c in CRITERIA.values()}
    return named.get((b, alpha, beta), Criterion(b, alpha, beta))


class ExpertScores(torch.Tensor):
    """Expert scores [num MoE layers, num experts] (float64, higher = keep) that remember where they come from.

    Attributes: ``criterion`` (a `Criterion` or `StatisticCriterion`), ``layers`` (decoder-layer
    indices), ``num_experts``, ``top_k``, ``num_groups``, ``topk_group`` (per layer) and
    ``statistics`` (`ExpertStatistics.identity()`). Any operation on them returns a plain tensor.
    """

    criterion: Criterion | StatisticCriterion
    layers: list[int]
    num_experts: list[int]
    top_k: list[int]
    num_groups: list[int]
    topk_group: list[int]
    statistics: dict

    @classmethod
    def wrap(cls, values: torch.Tensor, stats: ExpertStatistics, criterion=None) -> ExpertScores:
        """`values` [L, E] as scores carrying the routing facts of `stats` (criterion: what computed them)."""
        if tuple(values.shape[:1]) != (len(stats.layers),):
            raise ValueError(f"scores of shape {tuple(values.shape)} do not fit statistics of {len(stats.layers)} MoE layers")
        scores = values.detach().double().as_subclass(cls)
        scores.criterion = criterion if criterion is not None else StatisticCriterion("given", lambda s: values)
        scores.layers = list(stats.layers)
        scores.num_experts = list(stats.num_experts)
        scores.top_k = list(stats.top_k)
        scores.num_groups = list(stats.num_groups)
        scores.topk_group = list(stats.topk_group)
        scores.statistics = stats.identity()
        return scores

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        with torch._C.DisableTorchFunctionSubclass():  # results are plain tensors
            return func(*args, **(kwargs or {}))

    def __repr__(self, **kwargs) -> str:
        with torch._C.DisableTorchFunctionSubclass():
            values = torch.Tensor.__repr__(self.as_subclass(torch.Tensor))
        return f"ExpertScores({self.criterion.name}, layers={self.layers}):\n{values}"


def expert_scores(stats: ExpertStatistics, criterion) -> ExpertScores:
    """Scores of any criterion, float64 [num MoE layers, num experts]; higher = keep.

    criterion: a name ("man", "mone"), a point (1, 0, 1), a `Criterion` or a `StatisticCriterion`.
    For points of the family: b=0 is the plain sum over routed tokens; b=1 divides by N_j.
    Experts no calibration token reached score 0 under every criterion.
    """
    c = get_criterion(criterion)
    return ExpertScores.wrap(c.scores(stats), stats, c)


def mone_scores(stats: ExpertStatistics) -> torch.Tensor:
    """MoNE baseline (outside the family): routing frequency times routed-output variance.

    score_j = (N_j / N) * ( sum ||f||^2 / N_j - || sum f / N_j ||^2 ), the trace of the
    covariance of expert j's outputs over the tokens routed to it, weighted by the share
    of tokens routed to j. An expert that always outputs the same vector (a "novice" that
    a bias could replace) scores 0 whatever its frequency. [our reading of the baseline]
    """
    count = stats.count
    safe = count.clamp(min=1)
    mean_sq = stats.moment(0, 2) / safe
    mean_vec_sq = (stats.output_sum / safe.unsqueeze(-1)).pow(2).sum(-1)
    variance = (mean_sq - mean_vec_sq).clamp(min=0)
    frequency = count / stats.tokens.unsqueeze(-1).clamp(min=1)
    return torch.where(count > 0, frequency * variance, torch.zeros_like(variance))


MONE = StatisticCriterion("mone", mone_scores)

# What the paper compares: its named points and the MoNE baseline.
NAMED_CRITERIA: dict[str, Criterion | StatisticCriterion] = {**CRITERIA, MONE.name: MONE}


def resolve_criteria(criteria) -> list[Criterion | StatisticCriterion]:
    """``None`` / ``"named"``: the named points + MoNE; ``"grid"``: all 17 points + MoNE; or a list
    of names, points and criteria."""
    if criteria is None or criteria == "named":
        return list(NAMED_CRITERIA.values())
    if criteria == "grid":
        return [*criterion_grid(), MONE]
    if isinstance(criteria, str):
        raise ValueError(f"criteria={criteria!r}: 'named', 'grid' or a list of criteria")
    return [get_criterion(c) for c in criteria]
