"""The exact damage of removing one expert, to test criteria against (notebooks/03_damage_check).

The unified formulation estimates the damage of removing expert j from its calibration
statistics. Here the damage is measured directly, one expert at a time, on evaluation data:

    output_sq[l, j]   mean over tokens of ||y_t - y'_t||^2, y the MoE block output of layer l
                      and y' the same block with j masked (`mask_experts`): tokens that chose
                      j are re-routed to their next-best expert, as in the pruned model.
    output_norm[l, j] mean ||y_t - y'_t|| (the p = 1 damage of the derivation).
    loss_change[l, j] held-out next-token loss of the whole model with j masked in layer l
                      (and nothing else) minus the unpruned loss, nats per token.
    direct_sq[l, j]   mean ||g_jt f_jt||^2 over all tokens: the change of the output when j's
                      weighted output is dropped WITHOUT re-routing, step 1 of the derivation.
                      On the calibration tokens, direct_sq * N equals the moment S(0, 2, 2).

The block input is the unpruned model's hidden state, so output errors isolate one layer.
`damage_correlation` gives the Spearman correlation, within each layer, between every
criterion's scores and each damage measure: a criterion that predicts damage well ranks
experts the way removing them hurts.

`zeroed_gates` is the model of steps 1-4 of the derivation (notebook 00): the removed experts'
gates set to zero, nothing re-routed or renormalised, beside `mask_experts`' pruned model.

The analysis that notebooks 00 and 03 report lives here too, so it is tested:
`transfer_table` (do frequency, gate and activation strength rank experts alike on two
calibration domains?), `transfer_verdicts` and `premise_verdict` (what that table says, in
words), `calibration_setting` (matched / mismatched / mixed) and `principle_check` (does the
selection principle's prediction hold for each setting?).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from torch import nn

from .architecture import find_moe_layers
from .criteria import MONE, Criterion, ExpertScores, criterion_grid, expert_scores, get_criterion
from .pruning import _normalise_keep, mask_experts, select_experts
from .statistics import ExpertStatistics

MEASURES = ("output_sq", "output_norm", "loss_change", "direct_sq")


@dataclass
class ExpertDamage:
    """Measured damage of removing each expert of some MoE layers, tensors [chosen layer, expert]."""

    layers: list[int]  # decoder-layer indices of the chosen MoE layers
    num_experts: list[int]
    output_sq: torch.Tensor  # (L, E) float64
    output_norm: torch.Tensor  # (L, E)
    direct_sq: torch.Tensor  # (L, E)
    loss_change: torch.Tensor | None  # (L, E), None when the loss was not measured
    output_energy: torch.Tensor  # (L,) mean ||y_t||^2 of the unpruned block output
    base_loss: float  # unpruned mean next-token loss (nan when not measured)
    tokens: int  # tokens the output errors average over
    metadata: dict = field(default_factory=dict)

    def measure(self, name: str) -> torch.Tensor:
        if name not in MEASURES:
            raise ValueError(f"unknown damage measure {name!r}; measures: {', '.join(MEASURES)}")
        value = getattr(self, name)
        if value is None:
            raise ValueError(f"{name} was not measured (expert_damage(..., loss=False))")
        return value

    @property
    def measures(self) -> list[str]:
        return [m for m in MEASURES if getattr(self, m) is not None]

    def to_frame(self) -> pd.DataFrame:
        """One row per (layer, expert): every measured quantity, plus the relative output error."""
        rows = []
        for position, layer in enumerate(self.layers):
            for j in range(self.num_experts[position]):
                row = {"layer": layer, "expert": j}
                for m in self.measures:
                    row[m] = float(self.measure(m)[position, j])
                row["relative_output_sq"] = row["output_sq"] / float(self.output_energy[position])
                rows.append(row)
        return pd.DataFrame(rows)


def _block_output(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _token_loss_sum(logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Sum of next-token cross-entropies over positions whose target is a real token."""
    targets = input_ids[:, 1:]  # (B, T-1)
    valid = (attention_mask[:, 1:] * attention_mask[:, :-1]).bool()
    losses = nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets, reduction="none")  # (B, T-1)
    return (losses * valid).sum()


@torch.inference_mode()
def expert_damage(
    model: nn.Module,
    batches: Iterable[dict],
    *,
    layers: Sequence[int] | None = None,
    loss: bool = True,
    progress: bool = True,
) -> ExpertDamage:
    """Measure the damage of removing each expert of `layers` (decoder-layer indices; default all MoE layers).

    batches: dicts with ``input_ids`` and ``attention_mask`` [B, T] (padding excluded).
    loss: also measure the change of the whole model's next-token loss; this costs one
        forward pass per (layer, expert, batch), the output errors one block call each.
    """
    from .progress import progress as tqdm

    moe = find_moe_layers(model)
    by_index = {l.layer_index: p for p, l in enumerate(moe)}
    chosen = list(by_index) if layers is None else [int(l) for l in layers]
    unknown = [l for l in chosen if l not in by_index]
    if unknown:
        raise ValueError(f"decoder layers {unknown} hold no MoE block; MoE layers are {list(by_index)}")
    positions = [by_index[l] for l in chosen]
    grouped = [moe[p].layer_index for p in positions if moe[p].num_groups > 1]
    if grouped:
        raise ValueError(
            f"decoder layers {grouped} use group-limited routing: a model without one single expert has unequal "
            "groups and does not exist (prune_experts / mask_experts refuse it), so single-expert damage is undefined"
        )
    widest = max(moe[p].num_experts for p in positions)
    L = len(positions)
    output_sq = torch.zeros(L, widest, dtype=torch.float64)
    output_norm = torch.zeros(L, widest, dtype=torch.float64)
    direct_sq = torch.zeros(L, widest, dtype=torch.float64)
    loss_sum = torch.zeros(L, widest, dtype=torch.float64)
    energy = torch.zeros(L, dtype=torch.float64)
    base_loss_sum, loss_tokens, tokens = 0.0, 0, 0
    full_keep = [torch.arange(l.num_experts) for l in moe]
    device = model.get_input_embeddings().weight.device
    was_training = model.training
    model.eval()

    # inputs of the chosen blocks and of their experts modules, captured during the unpruned pass only
    captured: dict = {}
    capturing = [False]

    def capture_block(position):
        def hook(module, args, kwargs):
            if capturing[0]:
                captured[("block", position)] = args[0] if args else kwargs["hidden_states"]
        return hook

    def capture_experts(position):
        def hook(module, args):
            if capturing[0]:
                captured[("experts", position)] = tuple(args[:3])  # hidden (T, H), top_k_index, top_k_weights
        return hook

    handles = []
    for p in positions:
        handles.append(moe[p].block.register_forward_pre_hook(capture_block(p), with_kwargs=True))
        handles.append(moe[p].experts.register_forward_pre_hook(capture_experts(p)))
    batches = list(batches)
    total = sum(moe[p].num_experts for p in positions) * len(batches)
    bar = tqdm(total=total, desc="expert damage", unit="expert", disable=not progress)
    try:
        for batch in batches:
            input_ids = batch["input_ids"].to(device)
            attention_mask = batch.get("attention_mask")
            attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(device)
            captured.clear()
            capturing[0] = True
            try:
                logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
            finally:
                capturing[0] = False
            valid = attention_mask.reshape(-1).bool()  # (B*T,)
            n_valid = int(valid.sum())
            tokens += n_valid
            if loss:
                base_loss_sum += float(_token_loss_sum(logits, input_ids, attention_mask))
                loss_tokens += int((attention_mask[:, 1:] * attention_mask[:, :-1]).sum())
            for row, p in enumerate(positions):
                layer = moe[p]
                block_input = captured[("block", p)]  # (B, T, H)
                expert_hidden, top_k_index, top_k_weights = captured[("experts", p)]
                hidden_size = block_input.shape[-1]
                y = _block_output(layer.block(block_input)).reshape(-1, hidden_size).double()  # (B*T, H)
                energy[row] += y[valid].square().sum()
                experts_out = layer.experts(expert_hidden, top_k_index, top_k_weights).double()  # (B*T, H)
                for j in range(layer.num_experts):
                    keep = list(full_keep)
                    keep[p] = torch.cat([torch.arange(j), torch.arange(j + 1, layer.num_experts)])
                    with mask_experts(model, keep, layers=moe):
                        y_masked = _block_output(layer.block(block_input)).reshape(-1, hidden_size).double()
                        if loss:
                            masked_logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
                            loss_sum[row, j] += float(_token_loss_sum(masked_logits, input_ids, attention_mask))
                    delta = (y - y_masked)[valid]  # (n_valid, H)
                    squared = delta.square().sum(-1)
                    output_sq[row, j] += squared.sum()
                    output_norm[row, j] += squared.sqrt().sum()
                    dropped = top_k_weights * (top_k_index != j)  # j's gate set to 0, nothing re-routed
                    direct = experts_out - layer.experts(expert_hidden, top_k_index, dropped).double()
                    direct_sq[row, j] += direct[valid].square().sum()
                    bar.update(1)
    finally:
        for h in handles:
            h.remove()
        bar.close()
        model.train(was_training)
    n = max(tokens, 1)
    base_loss = base_loss_sum / loss_tokens if loss and loss_tokens else float("nan")
    return ExpertDamage(
        layers=chosen,
        num_experts=[moe[p].num_experts for p in positions],
        output_sq=output_sq / n,
        output_norm=output_norm / n,
        direct_sq=direct_sq / n,
        loss_change=(loss_sum / max(loss_tokens, 1) - base_loss) if loss else None,
        output_energy=energy / n,
        base_loss=base_loss,
        tokens=tokens,
        metadata={"model_name": getattr(model.config, "_name_or_path", "") or "", "batches": len(batches)},
    )


@contextmanager
def zeroed_gates(model: nn.Module, keep, *, layers=None):
    """Remove the experts not in `keep` WITHOUT re-routing while the context is open: their gates are 0.

    Every token keeps the top-k experts it chose and the gates the router gave them; only the
    gates of removed experts are set to zero before the experts module sums the chosen experts'
    outputs (no renormalisation, no substitute expert). This is the model of steps 1-4 of the
    derivation (notebook 00), the one whose output error the moments S(0, p, p) measure exactly;
    `mask_experts` gives the model pruning produces (re-routed). keep: one list of kept expert
    indices per MoE layer, as for `mask_experts`. The hooks are removed on exit, whether or not
    the body raised.
    """
    layers = list(layers) if layers is not None else find_moe_layers(model)
    keep = _normalise_keep(layers, keep, groups=False)

    def zero(removed: torch.Tensor):
        def hook(module, args):  # args: hidden (T, H), top_k_index (T, k), top_k_weights (T, k), ...
            index, gates = args[1], args[2]
            return (args[0], index, gates * ~torch.isin(index, removed.to(index.device)), *args[3:])
        return hook

    handles = []
    try:
        for layer, kept in zip(layers, keep):
            removed = torch.ones(layer.num_experts, dtype=torch.bool)
            removed[kept] = False
            if removed.any():
                handles.append(layer.experts.register_forward_pre_hook(zero(torch.nonzero(removed).flatten())))
        yield model
    finally:
        for handle in handles:
            handle.remove()


def damage_correlation(
    stats: ExpertStatistics,
    damage: ExpertDamage,
    criteria: Sequence[str | Criterion] | None = None,
    measures: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Spearman correlation, within each damaged layer, between criteria scores and measured damage.

    criteria: default the whole grid `criterion_grid()` plus MoNE. measures: default all measured.
    Returns one row per (criterion, measure, layer) with columns criterion, b, alpha, beta,
    measure, layer, rho. rho is NaN where a score or damage is constant across the layer's experts.
    """
    from scipy.stats import spearmanr

    criteria = [get_criterion(c) for c in criteria] if criteria is not None else [*criterion_grid(), MONE]
    measures = list(measures) if measures is not None else damage.measures
    missing = [l for l in damage.layers if l not in stats.layers]
    if missing:
        raise ValueError(f"damage covers decoder layers {missing} that the statistics do not ({stats.layers})")
    rows = []
    for criterion in criteria:
        scores = expert_scores(stats, criterion)
        point = criterion.point or (None, None, None)
        for measure in measures:
            values = damage.measure(measure)
            for row, layer in enumerate(damage.layers):
                E = damage.num_experts[row]
                s = scores[stats.layers.index(layer), :E].numpy()
                d = values[row, :E].numpy()
                constant = np.ptp(s) == 0 or np.ptp(d) == 0
                rho = float("nan") if constant else float(spearmanr(s, d).statistic)
                rows.append({"criterion": criterion.name, "b": point[0], "alpha": point[1], "beta": point[2],
                             "measure": measure, "layer": layer, "rho": rho})
    return pd.DataFrame(rows)


# ---------------------------------------------------------------- the selection principle, checked


def calibration_setting(calibration: str, evaluation: str) -> str:
    """``"matched"`` when calibration and evaluation share a domain, ``"mixed"`` for a mixed
    calibration, else ``"mismatched"`` (``"embedded:code"`` vs ``"code"`` is matched; a draw's
    or seed's suffix does not count: ``"embedded:literature@draw0of3"`` vs ``"literature"`` is matched)."""
    domain = calibration.split("@")[0].split(":")[-1]
    return "matched" if domain == evaluation.split(":")[-1] else "mixed" if domain == "mixed" else "mismatched"


def transfer_factors(stats: ExpertStatistics) -> dict[str, torch.Tensor]:
    """Per-expert quantities whose transfer between calibration domains the principle is about, (L, E) each."""
    per_token = stats.tokens.unsqueeze(-1).clamp(min=1)
    return {
        "routing frequency": stats.count / per_token,
        "mean gate S(1,1,0)": expert_scores(stats, (1, 1, 0)),
        "MAN S(1,0,1)": expert_scores(stats, "man"),
        "MSAN S(1,0,2)": expert_scores(stats, "msan"),
        "S(0,1,1)/N": expert_scores(stats, "gated_ean") / per_token,
        "S(0,2,2)/N": expert_scores(stats, "gated_squared") / per_token,
    }


def _jaccard(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> float:
    return float(np.mean([len(set(x.tolist()) & set(y.tolist())) / len(set(x.tolist()) | set(y.tolist())) for x, y in zip(a, b)]))


def transfer_table(domain_stats: Mapping[str, ExpertStatistics], *, ratio: float = 0.5) -> tuple[pd.DataFrame, pd.DataFrame]:
    """How much each factor of the score changes between calibration domains.

    For every pair of domains and every quantity of `transfer_factors`: the mean and minimum
    within-layer Spearman rho of the experts' values between the two domains, the median
    relative change of the values, their spread across experts (coefficient of variation)
    and the Jaccard overlap of the experts each domain keeps at `ratio` removed.
    Returns (table indexed by (pair, quantity), per-layer rho with columns pair, quantity, layer, rho).
    """
    from scipy.stats import spearmanr

    names = list(domain_stats)
    first = domain_stats[names[0]]
    for name in names[1:]:
        if domain_stats[name].layers != first.layers or domain_stats[name].num_experts != first.num_experts:
            raise ValueError(f"statistics {names[0]!r} and {name!r} cover different layers or expert counts")
    E = min(first.num_experts)
    factors = {name: transfer_factors(stats) for name, stats in domain_stats.items()}
    rows, per_layer = [], []
    for i, domain_a in enumerate(names):
        for domain_b in names[i + 1:]:
            fa, fb = factors[domain_a], factors[domain_b]
            pair = f"{domain_a.split(':')[-1]} vs {domain_b.split(':')[-1]}"
            for quantity in fa:
                a, b = fa[quantity][:, :E].numpy(), fb[quantity][:, :E].numpy()  # (L, E)
                rhos = [spearmanr(a[l], b[l]).statistic for l in range(len(a))]
                mean = (a + b) / 2
                relative = np.where(mean > 0, np.abs(a - b) / np.where(mean > 0, mean, 1), 0.0)
                per_layer += [{"pair": pair, "quantity": quantity, "layer": first.layers[l], "rho": r} for l, r in enumerate(rhos)]
                spread = np.mean([np.std(x[l]) / np.mean(x[l]) for x in (a, b) for l in range(len(a)) if np.mean(x[l]) > 0])
                kept = [select_experts(ExpertScores.wrap(f[quantity], s), ratio=ratio)
                        for f, s in ((fa, domain_stats[domain_a]), (fb, domain_stats[domain_b]))]
                rows.append({"pair": pair, "quantity": quantity, "mean Spearman ρ": np.nanmean(rhos),
                             "min ρ over layers": np.nanmin(rhos), "median relative change": np.median(relative),
                             "spread across experts (CV)": spread, "kept overlap": _jaccard(*kept)})
    return pd.DataFrame(rows).set_index(["pair", "quantity"]), pd.DataFrame(per_layer)


TRANSFER_OUTCOMES = ("holds", "values only", "ranking only", "fails")  # transfer_verdicts' outcomes, premise_verdict's input


def transfer_verdicts(transfer: pd.DataFrame, per_layer: pd.DataFrame, *, ratio: float, num_experts: int) -> pd.DataFrame:
    """What `transfer_table` says about the principle's premise, per pair of domains, in words (notebook 00, §7).

    For each pair: the rival is the better transferring of routing frequency and mean gate (higher
    mean Spearman ρ in `transfer`); MAN's ranking transfers better (worse) than the rival's when the
    mean over layers of MAN's ρ minus the rival's exceeds (falls below minus) its standard error over
    layers (the noise; infinite with one layer). MAN's values move less when its median relative
    change is below both frequency's and gate's. The outcome is ``"holds"`` (values move less and
    the ranking transfers better), ``"values only"`` (values move less, ranking not better),
    ``"ranking only"`` (ranking better, values not less) or ``"fails"`` (neither).
    transfer, per_layer: `transfer_table`'s two frames. ratio: the fraction removed its kept overlap used.
    num_experts: experts per layer, for the scatter of one layer's ρ without any relation, 1/sqrt(E - 1).
    Returns one row per pair (index ``pair``): ``outcome``, ``rival``, ``difference``, ``noise`` and
    ``text``, three Markdown paragraphs built from these numbers.
    """
    if num_experts < 2:
        raise ValueError(f"num_experts must be at least 2 (a ranking needs two experts), got {num_experts}")
    if transfer.empty:
        raise ValueError("the transfer table is empty: it needs at least two calibration domains")
    F, G, A, Q = "routing frequency", "mean gate S(1,1,0)", "MAN S(1,0,1)", "MSAN S(1,0,2)"
    rows = {}
    for pair, table in transfer.groupby(level="pair", sort=False):
        t = table.droplevel("pair")
        missing = [q for q in (F, G, A, Q, "S(0,1,1)/N", "S(0,2,2)/N") if q not in t.index]
        if missing:
            raise ValueError(f"{pair}: the transfer table lacks {missing} (made by transfer_table?)")
        rho, change, spread, overlap = t["mean Spearman ρ"], t["median relative change"], t["spread across experts (CV)"], t["kept overlap"]
        layer_rho = per_layer[per_layer["pair"] == pair].pivot(index="layer", columns="quantity", values="rho")
        rival = F if rho[F] >= rho[G] else G
        difference = layer_rho[A] - layer_rho[rival]
        mean = float(difference.mean())
        noise = float(difference.std(ddof=1) / np.sqrt(len(difference))) if len(difference) > 1 else float("inf")
        if mean > noise:
            ranking = f"MAN's ranking transfers better than {rival}'s (ρ difference {mean:+.2f} ± {noise:.2f} over layers)"
        elif mean < -noise:
            ranking = f"MAN's ranking transfers worse than {rival}'s (ρ difference {mean:+.2f} ± {noise:.2f} over layers)"
        else:
            ranking = (f"MAN's ranking transfers neither better nor worse than {rival}'s beyond the layer-to-layer noise "
                       f"(ρ difference {mean:+.2f} ± {noise:.2f})")
        less = bool(change[A] < min(change[F], change[G]))
        closer = bool(spread[A] < min(spread[F], spread[G]))
        better = mean > noise
        outcome = {(True, True): "holds", (True, False): "values only", (False, True): "ranking only", (False, False): "fails"}[less, better]
        verdict = {
            "holds": "the premise **holds** on this model: activation strength moves less between domains and its ranking transfers better",
            "values only": ("the premise holds **for the values but not for the ranking**: activation strength moves less between "
                            f"domains, yet the experts' order by it is no more stable than by {rival}, and pruning uses only the order"),
            "ranking only": ("the premise holds **for the ranking but not for the values**: activation strength's values move no less "
                             f"than frequency's or gate's, yet the experts' order by it transfers better than by {rival}, "
                             "and pruning uses only the order"),
            "fails": ("the premise **does not hold** on this model: activation strength's values move no less than frequency's "
                      f"or gate's, and the experts' order by it transfers no better than by {rival}"),
        }[outcome]
        text = "\n\n".join([
            f"**{pair}.** Mean within-layer Spearman ρ of the expert ranking between the two domains: routing frequency {rho[F]:.2f}, "
            f"mean gate {rho[G]:.2f}, MAN {rho[A]:.2f}, MSAN {rho[Q]:.2f}; the full damage estimates S(0,1,1) {rho['S(0,1,1)/N']:.2f}, "
            f"S(0,2,2) {rho['S(0,2,2)/N']:.2f}.",
            f"Values: MAN moves {'less' if less else 'not less'} than frequency and gate (median relative change MAN {change[A]:.2f}, "
            f"MSAN {change[Q]:.2f}, frequency {change[F]:.2f}, gate {change[G]:.2f}); its experts lie "
            f"{'closer together' if closer else 'no closer together'} than by frequency and gate (spread MAN {spread[A]:.2f}, "
            f"frequency {spread[F]:.2f}, gate {spread[G]:.2f}). Ranking: {ranking}. Kept sets at {ratio:.0%} removed that both "
            f"domains agree on (Jaccard): MAN {overlap[A]:.2f}, MSAN {overlap[Q]:.2f}, frequency {overlap[F]:.2f}, "
            f"gate {overlap[G]:.2f}, S(0,2,2) {overlap['S(0,2,2)/N']:.2f}.",
            f"In short, {verdict}. (With {num_experts} experts, one layer's ρ scatters by about ±{1 / np.sqrt(num_experts - 1):.2f} "
            "even without any relation.)",
        ])
        rows[pair] = {"outcome": outcome, "rival": rival, "difference": mean, "noise": noise, "text": text}
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis("pair")


def premise_verdict(outcomes: Mapping[str, str]) -> str:
    """One sentence on the principle's premise over every pair of domains measured (notebook 00's closing).

    outcomes: pair -> outcome of `transfer_verdicts` (its ``outcome`` column, a Series, will do).
    The premise holds when it holds for every pair; for the ranking (what pruning uses) when MAN's
    ranking transfers better for every pair; in part when it holds in any way for some pair;
    otherwise it does not hold.
    """
    outcomes = dict(outcomes)
    if not outcomes:
        raise ValueError("no domain pairs: the premise needs statistics on at least two calibration domains")
    unknown = sorted({o for o in outcomes.values() if o not in TRANSFER_OUTCOMES})
    if unknown:
        raise ValueError(f"unknown outcomes {unknown}; transfer_verdicts gives {', '.join(TRANSFER_OUTCOMES)}")
    by = {o: [p for p, x in outcomes.items() if x == o] for o in TRANSFER_OUTCOMES}
    if len(by["holds"]) == len(outcomes):
        return (f"On this model the premise of the principle **holds** for every domain pair measured ({', '.join(by['holds'])}): "
                "MAN's values move less and its ranking transfers better than frequency's and gate's, which is what "
                "task-agnostic pruning with MAN or MSAN relies on.")
    named = lambda outcome: ", ".join(by[outcome]) or "no pair"
    if len(by["holds"]) + len(by["ranking only"]) == len(outcomes):
        return (f"On this model the premise holds **for the ranking**, the part pruning uses, for every domain pair measured: "
                f"MAN's ranking transfers better than frequency's and gate's (its values also move less for: {named('holds')}; "
                f"not for: {named('ranking only')}). That is what task-agnostic pruning with MAN or MSAN relies on.")
    if by["holds"] or by["values only"] or by["ranking only"]:
        return (f"On this model the premise holds only in part (fully for: {named('holds')}; for the ranking but not the values: "
                f"{named('ranking only')}; for the values but not the ranking: {named('values only')}; not at all: {named('fails')}). "
                "Since pruning uses only the ranking and it does not transfer better for every pair, this notebook does **not** "
                "show that MAN or MSAN is the safer task-agnostic choice here.")
    return ("On this model the premise **does not hold** for any domain pair measured: activation strength moves between "
            "calibration domains as much as frequency and gate do, so this notebook gives no reason to prefer MAN or MSAN "
            "for task-agnostic pruning here.")


# What the principle predicts per setting, for damage predicted from calibration statistics.
PRINCIPLE_EXPECTS = {
    "matched": "full damage ahead",  # task-specific: frequency and gate kept, S(0,1,1) / S(0,2,2)
    "mismatched": "MAN/MSAN ahead",  # task-agnostic: routed-token averaged, gate-free
    "mixed": "MAN/MSAN ahead",
}
FULL_DAMAGE = ("gated_ean", "gated_squared")
ACTIVATION_STRENGTH = ("man", "msan")


def principle_check(correlations: pd.DataFrame, measure: str) -> pd.DataFrame:
    """Per setting: do MAN/MSAN or the full damage estimates S(0,1,1)/S(0,2,2) predict `measure` better?

    correlations: `damage_correlation` rows with added columns ``setting``, ``calibration`` and
    ``evaluation``. The noise is the standard error of each group's mean rho over
    (calibration, evaluation, layer) units, combined for the difference. Returns one row per
    setting: mean rho of both groups, their difference and noise, the observed comparison, what
    the principle expects (`PRINCIPLE_EXPECTS`) and the verdict (consistent / not confirmed /
    contradicted), plus the three best criteria.
    """
    main = correlations[correlations.measure == measure]
    if main.empty:
        raise ValueError(f"no correlations with damage measure {measure!r}; measured: {sorted(correlations.measure.unique())}")
    rows = []
    for setting in [s for s in PRINCIPLE_EXPECTS if s in set(main.setting)]:
        part = main[main.setting == setting]

        def group(names):
            chosen = part[part.criterion.isin(names)]
            units = chosen.groupby(["calibration", "evaluation", "layer"]).rho.mean()
            return chosen.rho.mean(), (units.sem() if len(units) > 1 else float("inf"))

        full, full_se = group(FULL_DAMAGE)
        strength, strength_se = group(ACTIVATION_STRENGTH)
        difference, noise = strength - full, float(np.hypot(full_se, strength_se))
        if not abs(difference) > noise:
            observed = "indistinguishable"
        else:
            observed = "MAN/MSAN ahead" if difference > 0 else "full damage ahead"
        expected = PRINCIPLE_EXPECTS[setting]
        verdict = "consistent" if observed == expected else "not confirmed" if observed == "indistinguishable" else "contradicted"
        best = part.groupby("criterion").rho.mean().sort_values(ascending=False).head(3)
        rows.append({"setting": setting, "MAN/MSAN ρ": strength, "S(0,1,1)/S(0,2,2) ρ": full, "difference": difference,
                     "noise": noise, "observed": observed, "expected": expected, "verdict": verdict,
                     "best": ", ".join(f"{n} {v:.2f}" for n, v in best.items())})
    return pd.DataFrame(rows).set_index("setting")
