"""The unified formulation: every criterion is a point (b, alpha, beta).

For MoE layer l, expert j, calibration tokens t:

    S_j(b, alpha, beta) = N_j^-b * sum_t 1[j routed on t] * g_{j,t}^alpha * ||f_{j,t}||^beta

with N_j the number of tokens routed to j, g the gate weight and f the expert's
un-gated output. b=0 keeps routing frequency in the score (a sum), b=1 averages over
the routed tokens only. The sums are the moments `ExpertStatistics.moment(alpha, beta)`
collected in one calibration pass, so a criterion never needs another pass.
The derivation (single-expert damage) is in notebooks/00_formulation.ipynb.
"""

from __future__ import annotations

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


def get_criterion(criterion: str | Criterion | tuple[int, int, int]) -> Criterion:
    """A criterion from its name ("man"), its point ((1, 0, 1)) or itself."""
    if isinstance(criterion, Criterion):
        return criterion
    if isinstance(criterion, str):
        if criterion in CRITERIA:
            return CRITERIA[criterion]
        grid = {c.name: c for c in criterion_grid()}
        if criterion in grid:
            return grid[criterion]
        raise ValueError(f"unknown criterion {criterion!r}; named criteria: {', '.join(CRITERIA)}, or a point (b, alpha, beta)")
    b, alpha, beta = criterion
    named = {c.point: c for c in CRITERIA.values()}
    return named.get((b, alpha, beta), Criterion(b, alpha, beta))


def expert_scores(stats: ExpertStatistics, criterion: str | Criterion | tuple[int, int, int]) -> torch.Tensor:
    """Scores S_j(b, alpha, beta), float64 [num MoE layers, num experts]; higher = keep.

    b=0 is the plain sum over routed tokens; b=1 divides by N_j. Experts no calibration
    token reached score 0 under every criterion.
    """
    c = get_criterion(criterion)
    total = stats.moment(c.alpha, c.beta)  # (L, E)
    if c.b == 0:
        return total.clone()
    count = stats.count
    return torch.where(count > 0, total / count.clamp(min=1), torch.zeros_like(total))


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
