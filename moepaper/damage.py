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
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from torch import nn

from .architecture import find_moe_layers
from .criteria import Criterion, criterion_grid, expert_scores, get_criterion, mone_scores
from .pruning import _num_groups, mask_experts
from .statistics import ExpertStatistics

MEASURES = ("output_sq", "output_norm", "loss_change", "direct_sq")
MONE = "mone"


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
    from tqdm.auto import tqdm

    moe = find_moe_layers(model)
    by_index = {l.layer_index: p for p, l in enumerate(moe)}
    chosen = list(by_index) if layers is None else [int(l) for l in layers]
    unknown = [l for l in chosen if l not in by_index]
    if unknown:
        raise ValueError(f"decoder layers {unknown} hold no MoE block; MoE layers are {list(by_index)}")
    positions = [by_index[l] for l in chosen]
    grouped = [moe[p].layer_index for p in positions if _num_groups(moe[p]) > 1]
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


def criterion_name(criterion: str | Criterion) -> str:
    return criterion if isinstance(criterion, str) and criterion == MONE else get_criterion(criterion).name


def scores_for(stats: ExpertStatistics, criterion: str | Criterion) -> torch.Tensor:
    """A criterion's expert scores [MoE layer, expert]; ``"mone"`` gives MoNE's."""
    return mone_scores(stats) if criterion == MONE else expert_scores(stats, criterion)


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

    criteria = list(criteria) if criteria is not None else [*criterion_grid(), MONE]
    measures = list(measures) if measures is not None else damage.measures
    missing = [l for l in damage.layers if l not in stats.layers]
    if missing:
        raise ValueError(f"damage covers decoder layers {missing} that the statistics do not ({stats.layers})")
    rows = []
    for criterion in criteria:
        scores = scores_for(stats, criterion)
        point = (None, None, None) if criterion == MONE else get_criterion(criterion).point
        for measure in measures:
            values = damage.measure(measure)
            for row, layer in enumerate(damage.layers):
                E = damage.num_experts[row]
                s = scores[stats.layers.index(layer), :E].numpy()
                d = values[row, :E].numpy()
                constant = np.ptp(s) == 0 or np.ptp(d) == 0
                rho = float("nan") if constant else float(spearmanr(s, d).statistic)
                rows.append({"criterion": criterion_name(criterion), "b": point[0], "alpha": point[1], "beta": point[2],
                             "measure": measure, "layer": layer, "rho": rho})
    return pd.DataFrame(rows)


def corpus_batches(
    domain: str,
    tokenizer,
    *,
    split: str = "test",
    n_sequences: int,
    seq_len: int,
    seed: int = 0,
    batch_size: int = 8,
) -> list[dict]:
    """Packed windows of one embedded-corpus split (default the held-out test split), as batches.

    Documents are shuffled with `seed`, tokenised, each followed by the end-of-sequence token,
    concatenated and cut into `n_sequences` windows of `seq_len` tokens (no padding), like
    `calibration_batches` does for the calibration split.
    """
    from .corpus import read_split

    documents = read_split(domain, split)
    random.Random(f"{seed}-{domain}-{split}").shuffle(documents)
    eos = tokenizer.eos_token_id
    buffer: list[int] = []
    windows: list[list[int]] = []
    for text in documents:
        buffer.extend(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"] + ([eos] if eos is not None else []))
        while len(buffer) >= seq_len and len(windows) < n_sequences:
            windows.append(buffer[:seq_len])
            del buffer[:seq_len]
        if len(windows) == n_sequences:
            break
    if len(windows) < n_sequences:
        raise ValueError(f"the {split} split of {domain!r} holds only {len(windows)} windows of {seq_len} tokens; lower n_sequences or seq_len")
    ids = torch.tensor(windows)  # (n_sequences, seq_len)
    return [{"input_ids": ids[s : s + batch_size], "attention_mask": torch.ones_like(ids[s : s + batch_size])}
            for s in range(0, n_sequences, batch_size)]
