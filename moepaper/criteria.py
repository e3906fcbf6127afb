"""The unified formulation: every criterion is a point (b, alpha, beta).

For MoE layer l, expert j, calibration tokens t:

    S_j(b, alpha, beta) = N_j^-b * sum_t 1[j routed on t] * g_{j,t}^alpha * ||f_{j,t}||^beta

with N_j the number of tokens routed to j, g the gate weight and f the expert's
un-gated output. b=0 keeps routing frequency in the score (a sum), b=1 averages over
the routed tokens only. The sums are the moments `ExpertStatistics.moment(alpha, beta)`
collected in one calibration pass, so a criterion never needs another pass.
The derivation (single-expert damage) is in notebooks/00_formulation.ipynb.

Criteria outside the family are small functions over the same statistics (MoNE,
`StatisticCriterion`) or over the model's weights (AIMER, `WeightCriterion`, which needs no
calibration: ``expert_scores(stats, "aimer", model=model)``), so `expert_scores` serves every
criterion. A criterion also says how its pruned model is evaluated (``replacement``):
``"reroute"`` (every criterion but MoNE: pruned experts leave routing, `pruning.mask_experts`)
or ``"novice"`` (MoNE as published: the router still selects a pruned expert, which returns
its mean calibration output, `pruning.replace_with_novices`). Scores come back as
`ExpertScores`: a tensor that also carries the layers, expert counts, top-k and router
groups of the statistics, so `select_experts(expert_scores(stats, "man"), ratio=0.25)`
needs nothing more.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .statistics import ExpertStatistics

# How a criterion's pruned model is evaluated (the ``replacement`` attribute of every criterion).
REROUTE = "reroute"  # pruned experts leave routing; tokens go to the remaining ones (mask_experts)
NOVICE = "novice"  # the router still selects a pruned expert; it returns its mean output (replace_with_novices)


@dataclass(frozen=True)
class Criterion:
    """A point (b, alpha, beta) of the unified formulation, with a display name."""

    b: int
    alpha: int
    beta: int
    name: str = ""
    replacement = REROUTE  # every point of the family is evaluated with pruned experts re-routed

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
    """A criterion outside the family: a function of the same collected statistics.

    replacement: ``"reroute"`` (pruned experts are taken out of routing) or ``"novice"``
    (each pruned expert is replaced by its mean calibration output and routing is unchanged).
    """

    name: str
    function: Callable[[ExpertStatistics], torch.Tensor]
    replacement: str = REROUTE
    point = None  # no (b, alpha, beta)

    def __post_init__(self):
        if self.replacement not in (REROUTE, NOVICE):
            raise ValueError(f"criterion {self.name!r}: replacement={self.replacement!r}, expected {REROUTE!r} or {NOVICE!r}")

    def scores(self, stats: ExpertStatistics) -> torch.Tensor:
        return self.function(stats)


@dataclass(frozen=True)
class WeightCriterion:
    """A calibration-free criterion: a function of the model's weights alone, [L, E] (higher = keep).

    `expert_scores(stats, criterion, model=model)` calls it; the statistics only supply the
    routing facts (layers, expert counts, top-k) that selection needs, and are checked
    against the model. Evaluated with pruned experts re-routed.
    """

    name: str
    function: Callable[[torch.nn.Module], torch.Tensor]
    point = None  # no (b, alpha, beta)
    replacement = REROUTE

    def scores(self, stats: ExpertStatistics, model: torch.nn.Module | None = None) -> torch.Tensor:
        if model is None:
            raise ValueError(
                f"criterion {self.name!r} scores experts from the model's weights: pass the model, "
                f"expert_scores(stats, {self.name!r}, model=model)"
            )
        stats.check_model(model)  # StatisticsMismatchError naming the difference
        values = self.function(model)
        if not bool(torch.isfinite(values).all()):
            bad = [(stats.layers[int(l)], int(e)) for l, e in (~torch.isfinite(values)).nonzero()]
            raise ValueError(f"criterion {self.name!r} gives non-finite scores to (decoder layer, expert) "
                             f"{bad[:8]}{' ...' if len(bad) > 8 else ''}: are the model's weights finite?")
        width = stats.count.shape[1]
        if values.shape[1] < width:  # pad like the statistics (layers with fewer experts)
            values = torch.nn.functional.pad(values, (0, width - values.shape[1]))
        return values


# The paper's named points, with their origins: docs/paper.md. MoNE lies outside the family: see `mone_scores`.
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


AnyCriterion = Criterion | StatisticCriterion | WeightCriterion


def get_criterion(criterion) -> AnyCriterion:
    """A criterion from its name ("man", "mone", "aimer"), its point ((1, 0, 1)) or itself."""
    if isinstance(criterion, (Criterion, StatisticCriterion, WeightCriterion)):
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

    Attributes: ``criterion`` (a `Criterion`, `StatisticCriterion` or `WeightCriterion`), ``layers`` (decoder-layer
    indices), ``num_experts``, ``top_k``, ``num_groups``, ``topk_group`` (per layer) and
    ``statistics`` (`ExpertStatistics.identity()`). Any operation on them returns a plain tensor.
    """

    criterion: AnyCriterion
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


def expert_scores(stats: ExpertStatistics, criterion, *, model: torch.nn.Module | None = None) -> ExpertScores:
    """Scores of any criterion, float64 [num MoE layers, num experts]; higher = keep.

    criterion: a name ("man", "mone", "aimer"), a point (1, 0, 1), a `Criterion`, a
    `StatisticCriterion` or a `WeightCriterion`.
    model: needed by weight-only criteria (AIMER), which are computed from it (the statistics
    then only give the routing facts and are checked against it); ignored by the others.
    For points of the family: b=0 is the plain sum over routed tokens; b=1 divides by N_j.
    Experts no calibration token reached score 0 under every calibration-based criterion.
    """
    c = get_criterion(criterion)
    values = c.scores(stats, model=model) if isinstance(c, WeightCriterion) else c.scores(stats)
    return ExpertScores.wrap(values, stats, c)


def mone_scores(stats: ExpertStatistics) -> torch.Tensor:
    """MoNE (Zhang et al., arXiv 2507.00390), outside the family: routing score times output spread.

        score_j = (sum_t g_{j,t} / T) * sqrt( (sum_t ||f_{j,t}||^2 - ||sum_t f_{j,t}||^2 / N_j) / (N_j - 1) )

    over the T calibration tokens, sums over the N_j tokens routed to j, g the statistics' gate.
    The second factor is the paper's output variance phi_var: the L2 norm over hidden
    dimensions of the per-dimension standard deviation, i.e. the square root of the trace of
    the *unbiased* (N_j - 1) covariance of expert j's un-gated outputs. We use the unbiased
    variance and the square root because that is what the paper writes and what its code
    (github.com/zxgx/mode-pd, ranking metric "fusion") computes; the root matters for the
    ranking since it multiplies the first factor. The first factor is the authors' code's
    "routing score": the mean over all tokens of the routing weight (0 where j is not
    selected), which the paper calls access frequency. Their fixed weights w, (1 - w) on the
    two factors do not change the ranking and are left out. Experts reached by fewer than two
    tokens have no variance estimate and score 0 (pruned first), as an expert that always
    outputs the same vector does: a "novice" (its mean output) replaces it without error.

    `MONE` evaluates these scores as published (pruned experts replaced by novices,
    `pruning.replace_with_novices`); `MONE_RANKING` evaluates the same ranking with pruned
    experts re-routed (`pruning.mask_experts`).
    """
    count = stats.count
    sum_sq = stats.moment(0, 2)
    mean_term = stats.output_sum.pow(2).sum(-1) / count.clamp(min=1)  # ||sum f||^2 / N
    variance = ((sum_sq - mean_term) / (count - 1).clamp(min=1)).clamp(min=0)
    routing = stats.moment(1, 0) / stats.tokens.unsqueeze(-1).clamp(min=1)
    return torch.where(count > 1, routing * variance.sqrt(), torch.zeros_like(variance))


def novice_outputs(stats: ExpertStatistics) -> torch.Tensor:
    """MoNE's novices: each expert's mean un-gated output over the tokens routed to it, [L, E, H] float64.

    sum_t f_{j,t} / N_j; zero for experts no calibration token reached.
    """
    count = stats.count.unsqueeze(-1)
    return torch.where(count > 0, stats.output_sum / count.clamp(min=1), torch.zeros_like(stats.output_sum))


def aimer_scores(model: torch.nn.Module) -> torch.Tensor:
    """AIMER (Liu et al., arXiv 2603.18492), calibration-free, as keep-scores [L, E] float64.

    Per expert j, over all the elements w of its projection weights (gate and up, or the
    fused gate_up_proj, and down_proj; biases excluded):

        AIMER_j = mean |w| / sqrt(mean w^2)          (in (0, 1]; higher = more removable)

    The paper prunes the experts with the highest AIMER. We return RMS / mean |w| = 1 / AIMER
    as the keep-score: the same order as -AIMER (a strictly decreasing map, so identical
    selections, ties included), and positive like every other criterion's scores, which
    ``select_experts(scope="global")`` needs. The ratio is scale-free (scaling an expert's
    weights leaves it unchanged) and pools every element of the expert, so the weight layout
    (standard, transposed, gpt-oss's interleaved gate/up columns) does not matter. An expert
    whose weights are all zero scores 0. Rows are padded with 0 to the widest layer. Non-finite
    weights (NaN, inf) are a ValueError naming the layer, the tensor and the experts.
    """
    from .architecture import find_moe_layers

    layers = find_moe_layers(model)
    width = max(l.num_experts for l in layers)
    out = torch.zeros(len(layers), width, dtype=torch.float64)
    for position, layer in enumerate(layers):
        E = layer.num_experts
        abs_sum = torch.zeros(E, dtype=torch.float64)
        sq_sum = torch.zeros(E, dtype=torch.float64)
        numel = 0
        for t in layer.expert_tensors:
            if not t.attr.endswith("_proj"):  # biases and anything else per expert
                continue
            w = t.tensor.detach().reshape(E, -1)
            finite = torch.isfinite(w).all(1).cpu()
            if not bool(finite.all()):  # a NaN would score 0 (pruned first), an inf would score NaN
                bad = [int(e) for e in (~finite).nonzero().flatten()]
                raise ValueError(
                    f"aimer: non-finite weights in {layer.name}.{t.attr} (decoder layer {layer.layer_index}), "
                    f"expert{'s' if len(bad) > 1 else ''} {', '.join(map(str, bad[:8]))}{', ...' if len(bad) > 8 else ''}: "
                    "a weight-only criterion cannot score them; check the checkpoint"
                )
            abs_sum += w.abs().sum(1, dtype=torch.float64).cpu()
            sq_sum += w.double().square().sum(1).cpu()
            numel += w.shape[1]
        if numel == 0:
            raise ValueError(f"aimer: found no projection weights (*_proj) in the experts of {layer.name}")
        mean_abs, rms = abs_sum / numel, (sq_sum / numel).sqrt()
        out[position, :E] = torch.where(mean_abs > 0, rms / mean_abs.clamp(min=1e-300), torch.zeros_like(rms))
    return out


MONE = StatisticCriterion("mone", mone_scores, replacement=NOVICE)
MONE_RANKING = StatisticCriterion("mone-ranking", mone_scores)
AIMER = WeightCriterion("aimer", aimer_scores)

# Criteria that read no calibration data (weights only): the same kept experts for every
# calibration draw at a ratio. Declared here, never inferred from which results exist.
CALIBRATION_FREE = frozenset({AIMER.name})

# Baselines outside the family: MoNE as published, its ranking with re-routing, AIMER.
BASELINE_CRITERIA: dict[str, StatisticCriterion | WeightCriterion] = {c.name: c for c in (MONE, MONE_RANKING, AIMER)}

# What the paper compares: its named points and the baselines.
NAMED_CRITERIA: dict[str, AnyCriterion] = {**CRITERIA, **BASELINE_CRITERIA}


def resolve_criteria(criteria) -> list[AnyCriterion]:
    """``None`` / ``"named"``: the named points + the baselines (MoNE, MoNE ranking, AIMER);
    ``"grid"``: all 17 points + the baselines; or a list of names, points and criteria."""
    if criteria is None or criteria == "named":
        return list(NAMED_CRITERIA.values())
    if criteria == "grid":
        return [*criterion_grid(), *BASELINE_CRITERIA.values()]
    if isinstance(criteria, str):
        raise ValueError(f"criteria={criteria!r}: 'named', 'grid' or a list of criteria")
    return [get_criterion(c) for c in criteria]
