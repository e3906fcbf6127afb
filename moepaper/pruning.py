"""Remove experts: choose which to keep, slice them out, or mask them out of routing.

    keep = select_experts(scores, ratio=...)  kept expert indices per MoE layer (`KeptExperts`)
    prune_experts(model, keep)                slices the model in place; it saves as a normal checkpoint
    mask_experts(model, keep)                 context manager: the pruned model's logits, no weights copied
    replace_with_novices(model, keep, stats)  context manager: pruned experts return their mean output (MoNE)
    save_pruned(model, tok, path, keep)       save_pretrained + ``moepaper_pruning.json`` (provenance)

`select_experts` takes everything it needs from `ExpertScores` (layers, expert counts, top-k,
router groups, criterion, statistics); the `KeptExperts` it returns carry the same facts and
the ratio, so `prune_experts`, `mask_experts` and `save_pruned` check them against the model
and record them without being told again.

Decisions a reader of the results needs to know:

Expert count in config.json. ``prune_experts`` sets every key of
``architecture.expert_count_keys(config)`` to the new count; ``num_experts_per_tok`` (top-k)
is unchanged. transformers v5 writes Qwen3-MoE's count only as ``num_local_experts``
(``num_experts`` is an ``attribute_map`` alias), while the original Qwen3 checkpoints and
the readers built for them (vLLM) read ``num_experts``. ``prune_experts`` therefore also
puts ``num_experts`` into the config's instance ``__dict__``: ``to_dict()`` serialises
``__dict__``, so any later ``save_pretrained`` writes both keys, while attribute reads keep
going through the alias. Stock ``from_pretrained`` accepts a config.json with both keys
(it maps ``num_experts`` onto ``num_local_experts``; the values are equal), so both readers
work. Stock transformers drops the duplicate when it re-saves a model it loaded; ``save_pruned``
puts it back and checks the written file.

Group-limited routing (DeepSeek-V3, GLM-4-MoE, DeepSeek-V2 with ``group_limited_greedy``):
the router reshapes its experts into ``n_group`` equal, contiguous groups, so every group
must keep the same number of experts (and at least 2: V3 / GLM score a group by its two
best experts; and enough that the ``topk_group`` chosen groups still hold top-k experts).
``select_experts`` given the model removes the same number of lowest-scoring experts in
each group; keep lists that break these rules are refused with the reason.

Non-uniform per-layer counts (``scope="global"``): a transformers config holds one expert
count for all layers, so a checkpoint with per-layer counts would not load with
``AutoModelForCausalLM``. ``prune_experts`` refuses them; they are evaluated in memory with
``mask_experts``, which accepts any per-layer count.

Masking. While a masked router runs, a ``TorchFunctionMode`` sets the logits that
``F.linear`` computes from the router's weight (and bias, gpt-oss) to -inf for removed
experts, so softmax gives them probability 0, sigmoid gives 0, and no top-k picks them.
Per-expert selection biases (DeepSeek-V3 / GLM ``e_score_correction_bias``, ERNIE's
``moe_statics.e_score_correction_bias``) are set to -inf for removed experts while the
context is open, because the router adds them after the logits; their exact values are
restored on exit, also when the body raises. Weights are never copied or changed.
The masked model's logits equal the pruned model's (bitwise on the tiny test models, fp32
and bf16) for every family in ``architecture.SUPPORTED_FAMILIES``, PhiMoE's sparsemixer
included: its threshold mask compares scores relative to the best one, and a -inf score
stays masked whatever the threshold says. One exception, for masking and pruning alike:
where a token's router logits tie exactly at the top-k boundary (seen in bf16), torch.topk
breaks the tie differently on E and on E' experts, so the two may route that token to
different (equally scored) experts.
"""

from __future__ import annotations

import functools
import json
import math
import threading
import weakref
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

from .architecture import MoELayer, UnsupportedModelError, expert_count_keys, find_moe_layers
from .criteria import ExpertScores, novice_outputs
from .provenance import versions
from .statistics import ExpertStatistics, StatisticsMismatchError

PROVENANCE_FILE = "moepaper_pruning.json"

# Keys the family's original checkpoints use for the expert count, where transformers v5
# writes another one (model_type -> keys to write as well).
CHECKPOINT_COUNT_KEYS = {"qwen3_moe": ("num_experts",)}

# Per-expert router tensors that are added to the scores after the logits (selection only).
_SELECTION_BIASES = ("e_score_correction_bias",)

Keep = Sequence[torch.Tensor | Sequence[int]]


class KeptExperts(list):
    """The experts kept in each MoE layer (sorted int64 tensors), with where they came from.

    Attributes: ``layers`` (decoder-layer indices), ``num_experts`` (per layer, before pruning),
    ``criterion`` (name and point, or None), ``ratio``, ``num_prune``, ``scope`` and
    ``statistics`` (`ExpertStatistics.identity()`, or None). `save_pruned` records them.
    """

    def __init__(self, kept, *, layers, num_experts, criterion=None, ratio=None, num_prune=None, scope="layer",
                 statistics=None):
        super().__init__(kept)
        self.layers = [int(i) for i in layers]
        self.num_experts = [int(n) for n in num_experts]
        self.criterion = criterion
        self.ratio = ratio
        self.num_prune = num_prune
        self.scope = scope
        self.statistics = statistics

    @property
    def num_removed(self) -> list[int]:
        """Experts removed per layer."""
        return [n - len(k) for n, k in zip(self.num_experts, self)]

    def provenance(self) -> dict:
        c = self.criterion
        return {
            "criterion": None if c is None else {"name": c.name, **dict(zip(("b", "alpha", "beta"), c.point or (None,) * 3))},
            "ratio": self.ratio,
            "num_prune": self.num_prune,
            "scope": self.scope,
            "num_removed": self.num_removed,
            "statistics": self.statistics,
        }

    def __repr__(self) -> str:
        name = self.criterion.name if self.criterion is not None else "given"
        return f"KeptExperts({name}, ratio={self.ratio}, kept={[len(k) for k in self]} of {self.num_experts})"


@dataclass(frozen=True)
class _Layer:
    """The routing facts of one MoE layer that selection needs, from a model or from statistics."""

    layer_index: int
    num_experts: int
    top_k: int
    num_groups: int = 1
    topk_group: int = 1


def _facts(layers: list[MoELayer]) -> list[_Layer]:
    return [_Layer(l.layer_index, l.num_experts, l.top_k, l.num_groups, l.topk_group) for l in layers]


# --- checks shared by every entry point ------------------------------------------------------


def _layer_names(layers) -> str:
    return f"decoder layers {[l.layer_index for l in layers]}"


def _check_same_layers(model_layers: list[_Layer], given: list[_Layer], what: str) -> None:
    """Raise StatisticsMismatchError unless `given` (from scores or a keep list) describe the model's MoE layers."""
    got = [l.layer_index for l in given]
    want = [l.layer_index for l in model_layers]
    if got != want:
        raise StatisticsMismatchError(
            f"{what} cover {len(got)} MoE layers at decoder layers {got}, but the model has "
            f"{len(want)} MoE layers at decoder layers {want}: statistics of another model?"
        )
    for field in ("num_experts", "top_k", "num_groups"):
        g, w = [getattr(l, field) for l in given], [getattr(l, field) for l in model_layers]
        if g != w:
            hint = "statistics of another model, or of this model before it was pruned?" if field == "num_experts" else "statistics of another model?"
            raise StatisticsMismatchError(f"{what} have {field} {g} per MoE layer, but the model has {w}: {hint}")


def _model_layers(model, layers) -> list[MoELayer] | None:
    if layers is not None:
        return list(layers)
    if model is not None:
        return find_moe_layers(model)
    return None


def _check_groups(layer: _Layer, kept: torch.Tensor, where: str) -> None:
    groups = layer.num_groups
    if groups == 1:
        return
    per_group = layer.num_experts // groups
    counts = torch.bincount(kept // per_group, minlength=groups).tolist()
    why = (
        f"group-limited routing (n_group={groups}) reshapes the router's {layer.num_experts} experts into "
        f"{groups} equal contiguous groups of {per_group}"
    )
    if len(set(counts)) != 1:
        raise ValueError(
            f"{where}: keeps {counts} experts per group; {why}, so every group must keep the same number "
            "(select_experts removes the same number per group)"
        )
    if counts[0] < 2:
        raise ValueError(
            f"{where}: keeps {counts[0]} expert per group; {why}, and DeepSeek-V3 / GLM score a group by "
            "its two best experts, so every group must keep at least 2"
        )
    if counts[0] * layer.topk_group < layer.top_k:
        raise ValueError(
            f"{where}: the {layer.topk_group} selected group(s) would hold {counts[0] * layer.topk_group} experts, "
            f"fewer than top_k={layer.top_k}; {why}"
        )


def _normalise_keep(layers: list[MoELayer], keep: Keep, groups: bool = True) -> list[torch.Tensor]:
    """Kept indices as sorted int64 CPU tensors, after checking them against `layers`."""
    if len(keep) != len(layers):
        raise ValueError(
            f"keep has {len(keep)} entries but the model has {len(layers)} MoE layers ({_layer_names(layers)}): "
            "one list of kept experts per MoE layer"
        )
    if isinstance(keep, KeptExperts):
        made_for = [_Layer(i, n, l.top_k, l.num_groups) for i, n, l in zip(keep.layers, keep.num_experts, layers)]
        _check_same_layers(_facts(layers), made_for, "the kept experts")
    result = []
    for position, (layer, kept) in enumerate(zip(_facts(layers), keep)):
        where = f"keep[{position}] (decoder layer {layer.layer_index}, {layer.num_experts} experts)"
        kept = torch.as_tensor(kept).detach().cpu()
        if kept.dtype.is_floating_point or kept.dtype == torch.bool or kept.dim() != 1:
            raise ValueError(f"{where}: expected a 1-D list of integer expert indices, got {kept.dtype} of shape {tuple(kept.shape)}")
        kept = kept.long()
        out_of_range = kept[(kept < 0) | (kept >= layer.num_experts)]
        if out_of_range.numel():
            raise ValueError(
                f"{where}: expert indices {out_of_range.tolist()} are out of range: the layer has "
                f"{layer.num_experts} experts (0..{layer.num_experts - 1})"
            )
        kept = torch.sort(kept).values
        if kept.numel() != torch.unique(kept).numel():
            raise ValueError(f"{where}: expert indices repeat: {kept.tolist()}")
        if kept.numel() < layer.top_k:
            raise ValueError(
                f"{where}: keeps {kept.numel()} experts, fewer than top_k={layer.top_k}; every token needs "
                f"top_k experts to route to"
            )
        if groups:
            _check_groups(layer, kept, where)
        result.append(kept)
    return result


# --- choosing experts --------------------------------------------------------------------------


def num_removed(ratio: float, num_experts: int) -> int:
    """Experts a ratio removes from a layer: round(ratio * num_experts), halves up (0.25 of 64 -> 16, 0.5 of 9 -> 5)."""
    return int(math.floor(ratio * num_experts + 0.5))


def _as_rows(scores) -> list[torch.Tensor]:
    if isinstance(scores, torch.Tensor):
        if scores.dim() != 2:
            raise ValueError(f"scores must be [num MoE layers, num experts] or a list of 1-D tensors; got shape {tuple(scores.shape)}")
        rows = list(scores.detach().cpu().as_subclass(torch.Tensor))
    else:
        rows = [torch.as_tensor(s).detach().cpu() for s in scores]
        for i, row in enumerate(rows):
            if row.dim() != 1:
                raise ValueError(f"scores[{i}] must be 1-D (one score per expert); got shape {tuple(row.shape)}")
    if not rows:
        raise ValueError("scores hold no MoE layer")
    rows = [r.double() for r in rows]
    for i, row in enumerate(rows):
        if not torch.isfinite(row).all():
            raise ValueError(f"scores[{i}] holds NaN or Inf: {row.tolist()}")
    return rows


def _descending(scores: torch.Tensor) -> torch.Tensor:
    """Expert indices from best to worst; ties keep the lower index first."""
    return torch.sort(scores, descending=True, stable=True).indices


def _score_layers(scores: ExpertScores) -> list[_Layer]:
    return [_Layer(*facts) for facts in zip(scores.layers, scores.num_experts, scores.top_k, scores.num_groups, scores.topk_group)]


def select_experts(
    scores,
    *,
    ratio: float | None = None,
    num_prune: int | None = None,
    scope: str = "layer",
    model: nn.Module | None = None,
    layers: list[MoELayer] | None = None,
    top_k: int | None = None,
) -> KeptExperts:
    """The experts to keep in each MoE layer, as sorted int64 index tensors (a `KeptExperts` list).

    scores: ``expert_scores(stats, criterion)`` (higher = more important): they carry each
        layer's expert count, top-k and router groups, so nothing else is needed. A plain
        float tensor [num MoE layers, num experts] or a list of 1-D tensors works too, with
        `model`, `layers` or `top_k` to say the routing facts.
    ratio: fraction of experts removed, 0 < ratio < 1. ``scope="layer"``: round(ratio * E)
        (halves up) in every layer. ``scope="global"``: round(ratio * total experts) in all.
    num_prune: instead of ratio, experts removed per layer (``"layer"``) or in total (``"global"``).
    scope: ``"layer"`` removes the same number of lowest-scoring experts in every layer (the
        paper's setting); ties keep the lower index. On group-limited routers (n_group > 1)
        the same number is removed in each group. ``"global"`` ranks all experts together
        after dividing each layer's scores by that layer's mean score, so an expert is
        compared by its share of its own layer's typical importance (criteria differ in scale
        across depth; a plain global sort would empty the layers with small norms). It needs
        non-negative scores, never keeps fewer than top_k in a layer, breaks ties by removing
        the higher expert index, then the later layer, first, and is refused on group-limited
        routers. Its per-layer counts differ: evaluate it with `mask_experts`, since
        `prune_experts` only saves uniform counts.
    model / layers: optional; checked against what the scores carry (a mismatch raises
        `StatisticsMismatchError`), or the source of the routing facts for plain tensors.
    top_k: the top-k of plain-tensor scores when no model is given.
    """
    if (ratio is None) == (num_prune is None):
        raise ValueError("give exactly one of ratio= (fraction removed) and num_prune= (experts removed)")
    if ratio is not None and not (isinstance(ratio, (int, float)) and not isinstance(ratio, bool) and 0 < ratio < 1):
        raise ValueError(f"ratio={ratio!r} must satisfy 0 < ratio < 1 (the fraction of experts removed)")
    if num_prune is not None and (isinstance(num_prune, bool) or not isinstance(num_prune, int) or num_prune < 1):
        raise ValueError(f"num_prune={num_prune!r} must be a positive integer (experts removed)")
    rows = _as_rows(scores)
    moe = _model_layers(model, layers)
    facts = _score_layers(scores) if isinstance(scores, ExpertScores) else None
    if moe is not None:
        if facts is not None:
            _check_same_layers(_facts(moe), facts, "the scores' statistics")
        facts = _facts(moe)
    if facts is None:
        if top_k is None:
            raise ValueError(
                "top_k is unknown, so pruning below it cannot be refused: pass scores from expert_scores(stats, ...), "
                "or model=, layers= (find_moe_layers) or top_k="
            )
        facts = [_Layer(i, r.numel(), int(top_k)) for i, r in enumerate(rows)]
    elif top_k is not None and any(l.top_k != top_k for l in facts):
        raise ValueError(f"top_k={top_k} disagrees with the model's top-k {[l.top_k for l in facts]}")
    if len(rows) != len(facts):
        raise ValueError(f"scores have {len(rows)} layers but the model has {len(facts)} MoE layers ({_layer_names(facts)})")
    widest = max(l.num_experts for l in facts)
    for i, (row, layer) in enumerate(zip(rows, facts)):
        padded = row.numel() == widest and bool((row[layer.num_experts:] == 0).all())
        if row.numel() != layer.num_experts and not padded:
            raise ValueError(f"scores[{i}] has {row.numel()} experts but MoE layer {i} has {layer.num_experts} experts")
        rows[i] = row[: layer.num_experts]

    criterion = getattr(scores, "criterion", None)
    provenance = dict(layers=[l.layer_index for l in facts], num_experts=[l.num_experts for l in facts], criterion=criterion,
                      ratio=ratio, num_prune=num_prune, scope=scope, statistics=getattr(scores, "statistics", None))
    if scope == "layer":
        return KeptExperts([_keep_in_layer(i, row, layer, ratio, num_prune) for i, (row, layer) in enumerate(zip(rows, facts))],
                           **provenance)
    if scope != "global":
        raise ValueError(f"scope={scope!r}: expected 'layer' or 'global'")
    return KeptExperts(_keep_global(rows, facts, ratio, num_prune), **provenance)


def _keep_in_layer(i: int, row: torch.Tensor, layer: _Layer, ratio, num_prune) -> torch.Tensor:
    E, k, G = row.numel(), layer.top_k, layer.num_groups
    removed = num_prune if num_prune is not None else num_removed(ratio, E)
    if removed < 1:
        raise ValueError(f"ratio={ratio} of {E} experts removes no expert (round({ratio} x {E}) = 0)")
    if E - removed < k:
        raise ValueError(f"removing {removed} of {E} experts in MoE layer {i} leaves {E - removed}, fewer than top_k={k}")
    if removed % G:
        raise ValueError(
            f"removing {removed} of {E} experts in MoE layer {i}: its router is group-limited "
            f"(n_group={G}) and needs the same number removed from each of its {G} groups; "
            f"choose a count divisible by {G}"
        )
    per_group = E // G
    kept = [_descending(row[g * per_group : (g + 1) * per_group])[: per_group - removed // G] + g * per_group for g in range(G)]
    kept = torch.sort(torch.cat(kept)).values
    _check_groups(layer, kept, f"MoE layer {i} (decoder layer {layer.layer_index})")
    return kept


def _keep_global(rows: list[torch.Tensor], facts: list[_Layer], ratio, num_prune) -> list[torch.Tensor]:
    if any(l.num_groups > 1 for l in facts):
        raise ValueError(
            "scope='global' is refused on group-limited routers (n_group > 1): it gives each group its own "
            "count, and the router needs equal groups; use scope='layer'"
        )
    top_ks = [l.top_k for l in facts]
    total = sum(r.numel() for r in rows)
    removed = num_prune if num_prune is not None else num_removed(ratio, total)
    removable = sum(r.numel() - k for r, k in zip(rows, top_ks))
    if removed < 1:
        raise ValueError(f"ratio={ratio} of {total} experts removes no expert")
    if removed > removable:
        raise ValueError(
            f"removing {removed} of {total} experts globally would leave some layer with fewer than top_k experts "
            f"(at most {removable} can go while every layer keeps its top_k)"
        )
    candidates = []
    for i, row in enumerate(rows):
        if (row < 0).any():
            raise ValueError(f"scope='global' needs non-negative scores (it divides by each layer's mean); scores[{i}] has negatives")
        mean = row.mean()
        normalised = row / mean if mean > 0 else torch.zeros_like(row)
        candidates += [(float(s), -j, -i) for j, s in enumerate(normalised)]
    candidates.sort()
    left = [r.numel() for r in rows]
    gone: list[set[int]] = [set() for _ in rows]
    for _, neg_j, neg_i in candidates:
        if removed == 0:
            break
        i, j = -neg_i, -neg_j
        if left[i] > top_ks[i]:
            gone[i].add(j)
            left[i] -= 1
            removed -= 1
    return [torch.tensor([j for j in range(r.numel()) if j not in g], dtype=torch.long) for r, g in zip(rows, gone)]


# --- structural pruning -----------------------------------------------------------------------


def _masked_routers(layers: list[MoELayer]) -> list[int]:
    return [l.layer_index for l in layers if getattr(l.router.__dict__.get("forward"), "_moepaper_mask", False)]


def _all_layers(model: nn.Module, layers) -> list[MoELayer]:
    found = find_moe_layers(model)
    if layers is None:
        return found
    layers = list(layers)
    if [id(l.block) for l in layers] != [id(l.block) for l in found]:
        raise ValueError(
            f"layers= must be every MoE layer of the model ({_layer_names(found)}), got {_layer_names(layers)}: "
            "the config holds one expert count for all of them"
        )
    return layers


def write_checkpoint_count_keys(config) -> None:
    """Make `config.to_dict()` (and so config.json) carry the keys the family's original checkpoints use.

    Qwen3-MoE: ``num_experts`` is an attribute_map alias of ``num_local_experts``, so setting it
    as an attribute only changes ``num_local_experts``; writing it into the instance ``__dict__``
    makes ``to_dict()`` serialise it too, while attribute reads keep following the alias.
    """
    for key in CHECKPOINT_COUNT_KEYS.get(getattr(config, "model_type", None), ()):
        config.__dict__[key] = getattr(config, key)


def _replace(module: nn.Module, attr: str, new: torch.Tensor) -> None:
    """Put `new` where `module.attr` was, as a Parameter (same requires_grad) or as a buffer."""
    if attr in module._parameters:
        old = module._parameters[attr]
        module._parameters[attr] = nn.Parameter(new, requires_grad=old.requires_grad)
    elif attr in module._buffers:
        module._buffers[attr] = new  # keeps the buffer's persistence
    else:
        raise UnsupportedModelError(f"{type(module).__name__}.{attr} is neither a parameter nor a buffer")


def prune_experts(model: nn.Module, keep: Keep, *, layers: list[MoELayer] | None = None, views: bool = False) -> nn.Module:
    """Remove every expert not in `keep` from `model`, in place; returns `model`.

    keep: one list (or int tensor) of kept expert indices per MoE layer, as from
        `select_experts`. Kept experts take the new indices 0..E'-1 in ascending order.
        Every layer must keep the same number (see the module docstring), at least top_k,
        and on group-limited routers the same number per group.
    layers: ``find_moe_layers(model)``, if already computed (its entries are updated).
    views: keep only experts ``0..E'-1`` (every `keep` entry that prefix) and slice without
        copying: expert tensors become views of the old ones' first rows (the old storage stays
        alive; router groups are not checked: the experts were permuted first). For
        `moepaper.pipeline.checkpoints.pruned_in_place`, which checks the real selection and
        restores the model after.
    A `KeptExperts` made for another model (other layers or expert counts) is refused before
    anything changes.

    Slices every per-expert tensor the architecture layer found (expert weights and biases,
    router rows, router bias, selection-correction biases) along its expert dim, keeping
    parameters as parameters (with their requires_grad) and buffers as buffers; updates the
    modules' expert counts and every expert-count key of the config (top-k unchanged), so
    ``save_pretrained`` writes a checkpoint that stock ``from_pretrained`` loads.
    """
    layers = _all_layers(model, layers)
    masked = _masked_routers(layers)
    if masked:
        raise RuntimeError(f"cannot prune inside mask_experts (decoder layers {masked} are masked); leave the context first")
    keep = _normalise_keep(layers, keep, groups=not views)  # views: the caller checked the real selection
    counts = sorted({k.numel() for k in keep})
    if len(counts) > 1:
        raise ValueError(
            f"keep has different counts per layer {[k.numel() for k in keep]}: a transformers config holds one "
            "expert count for every layer, so such a checkpoint would not load with AutoModelForCausalLM; "
            "evaluate non-uniform selections in memory with mask_experts(model, keep)"
        )
    new_count = counts[0]
    if views and any(not torch.equal(k.cpu(), torch.arange(new_count)) for k in keep):
        raise ValueError("prune_experts(views=True) keeps a prefix of experts: every keep entry must be 0..E'-1")
    old_counts = {l.num_experts for l in layers}
    config = model.config
    config_keys = expert_count_keys(config)

    with torch.no_grad():
        for layer, kept in zip(layers, keep):
            for t in layer.per_expert_tensors:
                old = t.tensor
                sliced = old.narrow(t.dim, 0, new_count) if views else old.index_select(t.dim, kept.to(old.device))
                _replace(t.module, t.attr, sliced.contiguous())  # a view stays a view along dim 0
            for module, attr in layer.count_attributes:
                setattr(module, attr, new_count)
            if isinstance(layer.router, nn.Linear):  # PhiMoE's router
                layer.router.out_features = new_count
            layer.num_experts = new_count

    # the aux-loss count the *ForCausalLM keeps (self.num_experts = config.num_experts)
    blocks = {id(m) for l in layers for m in l.block.modules()}
    for module in model.modules():
        if id(module) not in blocks and getattr(module, "num_experts", None) in old_counts:
            module.num_experts = new_count
    for key in config_keys:
        setattr(config, key, new_count)
    write_checkpoint_count_keys(config)

    after = [l.num_experts for l in find_moe_layers(model)]
    if after != [new_count] * len(layers):
        raise RuntimeError(f"pruning left MoE layers with {after} experts, expected {new_count} each")
    return model


# --- masking ---------------------------------------------------------------------------------


class _MaskRouterLogits(TorchFunctionMode):
    """Sets removed experts' logits to -inf in the `F.linear` that computes the router's logits."""

    def __init__(self, weight_shape: tuple[int, ...], removed: torch.Tensor):
        super().__init__()
        self.weight_shape = weight_shape
        self.removed = removed  # (E,) bool
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is F.linear:
            weight = args[1] if len(args) > 1 else kwargs.get("weight")
            if weight is not None and tuple(weight.shape) == self.weight_shape:
                self.calls += 1
                out = out.masked_fill(self.removed.to(out.device), float("-inf"))  # (T, E)
        return out


def _masked_forward(router: nn.Module, forward, removed: torch.Tensor, where: str):
    weight_shape = tuple(router.weight.shape)

    @functools.wraps(forward)
    def masked(*args, **kwargs):
        mode = _MaskRouterLogits(weight_shape, removed)
        with mode:
            out = forward(*args, **kwargs)
        if mode.calls != 1:
            raise UnsupportedModelError(
                f"mask_experts: the router of {where} ({type(router).__name__}) computed its logits in "
                f"{mode.calls} F.linear calls with its weight, expected 1; this router cannot be masked"
            )
        return out

    masked._moepaper_mask = True
    return masked


class _RouterMasks:
    """The masks open on one router: the state before the first, and each open mask's removed experts.

    The router is always masked with the union of the open masks, recomputed from the saved
    state whenever one opens or closes, so masks may close in any order and the last one to
    close restores the router exactly."""

    def __init__(self, layer: MoELayer):
        router = layer.router
        self.layer = layer
        self.thread = threading.get_ident()
        self.previous = router.__dict__.get("forward")  # an instance-level forward to put back, if any
        self.forward = router.forward
        self.biases = [(t.tensor, t.dim, t.tensor.detach().clone()) for t in layer.router_tensors + layer.block_tensors
                       if t.attr in _SELECTION_BIASES]  # their values before any mask
        self.open: dict[int, torch.Tensor] = {}  # mask id -> removed (E,) bool

    def apply(self) -> None:
        router, where = self.layer.router, f"decoder layer {self.layer.layer_index}"
        removed = torch.zeros(self.layer.num_experts, dtype=torch.bool)
        for r in self.open.values():
            removed |= r
        with torch.no_grad():
            for tensor, dim, original in self.biases:
                tensor.copy_(original)
                if removed.any():
                    tensor.index_fill_(dim, removed.nonzero().flatten().to(tensor.device), float("-inf"))
        if removed.any():
            router.forward = _masked_forward(router, self.forward, removed, where)
        else:
            _restore_forward(router, self.previous)


# router module -> its open masks; guarded by _MASKS_LOCK
_OPEN_MASKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_MASKS_LOCK = threading.Lock()


@contextmanager
def mask_experts(model: nn.Module, keep: Keep, *, layers: list[MoELayer] | None = None):
    """Take the experts not in `keep` out of routing while the context is open.

    The model computes what ``prune_experts(model, keep)`` would make it compute (same logits
    up to float rounding) without copying or slicing any weight, so many selections can be
    evaluated on one loaded model; per-layer counts may differ (``scope="global"``). Inside,
    removed experts' logits are -inf and their selection-correction biases are -inf (the
    only tensors touched, in place); on exit the router forwards and the biases' exact values
    come back, whether or not the body raised. ``router_logits`` returned by the model (for
    aux losses) hold -inf for removed experts while masked.

    Nested masks remove the union of their experts and may close in any order: the model
    is restored exactly when the last one closes. A mask opened on a model that another
    thread holds masked is refused (RuntimeError) before anything changes: both threads
    would evaluate with each other's experts removed.
    """
    layers = _model_layers(model, layers)
    keep = _normalise_keep(layers, keep)
    # refuse unknown per-expert router tensors before anything changes
    for layer in layers:
        for t in layer.router_tensors + layer.block_tensors:
            known = (t.module is layer.router and t.attr in ("weight", "bias")) or t.attr in _SELECTION_BIASES
            if not known:
                raise UnsupportedModelError(f"mask_experts: does not know how {t.path} enters routing")

    token = object()
    opened: list[_RouterMasks] = []
    with _MASKS_LOCK:
        for layer in layers:
            state = _OPEN_MASKS.get(layer.router)
            if state is not None and state.thread != threading.get_ident():
                raise RuntimeError(
                    f"mask_experts: decoder layer {layer.layer_index}'s router is masked by another thread "
                    f"(thread id {state.thread}); masks of one model cannot be open in two threads at once, "
                    "each would evaluate with the other's experts removed: use one model per thread"
                )
        try:
            for layer, kept in zip(layers, keep):
                removed = torch.ones(layer.num_experts, dtype=torch.bool)
                removed[kept] = False
                if not removed.any():
                    continue
                state = _OPEN_MASKS.get(layer.router)
                if state is None:
                    state = _OPEN_MASKS[layer.router] = _RouterMasks(layer)
                state.open[id(token)] = removed
                opened.append(state)
                state.apply()
        except BaseException:
            _close(opened, token)
            raise
    try:
        yield model
    finally:
        with _MASKS_LOCK:
            _close(opened, token)


def _close(opened: list[_RouterMasks], token) -> None:
    """Take one mask off every router it masks; a router whose last mask closes is restored."""
    for state in opened:
        state.open.pop(id(token), None)
        state.apply()
        if not state.open:
            _OPEN_MASKS.pop(state.layer.router, None)


def _restore_forward(router: nn.Module, previous) -> None:
    if previous is None:
        del router.forward
    else:
        router.forward = previous


# --- novices (MoNE) -------------------------------------------------------------------------

_NOVICE = "_moepaper_novice"


def _novice_forward(experts: nn.Module, forward, removed: torch.Tensor, table: torch.Tensor):
    """`forward` with the routed slots of removed experts answered by their novice.

    removed: (E,) bool; table: (E, H) float64 novice outputs, zero rows for kept experts; the novice
    term is computed in the output's dtype, float32 at least.
    """

    @functools.wraps(forward)
    def novice(hidden_states, top_k_index, top_k_weights, *args, **kwargs):
        pruned = removed.to(top_k_index.device)[top_k_index]  # (T, k) slots routed to a removed expert
        out = forward(hidden_states, top_k_index, top_k_weights.masked_fill(pruned, 0), *args, **kwargs)
        dtype = torch.promote_types(out.dtype, torch.float32)
        rows = table.to(device=out.device, dtype=dtype)[top_k_index]  # (T, k, H), zero for kept experts
        term = (top_k_weights.to(dtype).unsqueeze(-1) * rows).sum(-2)  # sum over slots of g * mean, (T, H)
        return (out.to(dtype) + term.view(out.shape)).to(out.dtype)

    setattr(novice, _NOVICE, True)
    return novice


@contextmanager
def replace_with_novices(model: nn.Module, keep: Keep, stats: ExpertStatistics, *,
                         layers: list[MoELayer] | None = None):
    """MoNE's evaluation: replace each expert not in `keep` by a "novice" while the context is open.

    A novice is a constant vector, the expert's mean un-gated output over the calibration
    tokens routed to it (`criteria.novice_outputs(stats)`: ``output_sum / count``; zero for an
    expert no calibration token reached). Routing is unchanged: the router still selects a
    removed expert, and for each routed (token, slot) pair of a removed expert the layer adds
    ``top_k_weight * novice`` instead of the expert's output; kept experts, shared experts
    (never pruned) and the router are untouched (MoNE, arXiv 2507.00390). Compare
    `mask_experts`, which takes removed experts out of routing instead.

    keep: kept experts per MoE layer, checked as by `mask_experts`. stats: statistics of this
    model (`StatisticsMismatchError` otherwise). Implemented at the experts module's call
    ``experts(hidden, top_k_index, top_k_weights)``: its forward is wrapped to run with the
    removed slots' weights set to 0 and to add the novice term, in float32 (float64 for a
    float64 model) and cast back to the model's dtype, so it works for every layout of `architecture.SUPPORTED_FAMILIES`
    (gpt-oss's transposed, interleaved, biased experts included: the weight multiplies the
    whole expert output, bias included). A removed expert is still computed with weight 0, so
    its output must be finite (NaN/Inf times 0 is NaN). Layers keeping every expert are not
    touched, so keeping everything leaves the model exactly as it was. On exit each experts
    module's forward is restored, whether or not the body raised. Contexts do not nest on one
    layer (RuntimeError); they combine with `mask_experts`.
    """
    layers = _model_layers(model, layers)
    keep = _normalise_keep(layers, keep)
    stats.check_model(model)
    novices = novice_outputs(stats)  # (L, E, H) float64
    wrapped = [l.layer_index for l in layers if getattr(l.experts.__dict__.get("forward"), _NOVICE, False)]
    if wrapped:
        raise RuntimeError(f"replace_with_novices: decoder layers {wrapped} already hold novices; leave that context first")
    installed: list[tuple[nn.Module, object]] = []
    try:
        for position, (layer, kept) in enumerate(zip(layers, keep)):
            removed = torch.ones(layer.num_experts, dtype=torch.bool)
            removed[kept] = False
            if not removed.any():
                continue
            table = novices[position, : layer.num_experts].clone()
            table[~removed] = 0
            experts = layer.experts
            device = next(iter(experts.parameters())).device
            previous = experts.__dict__.get("forward")
            experts.forward = _novice_forward(experts, experts.forward, removed.to(device), table.to(device))
            installed.append((experts, previous))
        yield model
    finally:
        for experts, previous in reversed(installed):
            _restore_forward(experts, previous)


# --- saving ----------------------------------------------------------------------------------


def save_pruned(model: nn.Module, tokenizer, path: str | Path, keep: Keep, *, extra: dict | None = None, **save_kwargs) -> Path:
    """``save_pretrained`` a model pruned with ``prune_experts(model, keep)``, plus its provenance.

    Writes the checkpoint (and `tokenizer`, unless None) to `path`, and beside it
    ``moepaper_pruning.json``: what `keep` carries (criterion name and (b, alpha, beta), ratio,
    scope, experts removed per layer, the statistics' identity and checksum; None for a plain
    list), the kept original expert indices per decoder layer, moepaper / transformers / torch
    versions, and `extra`. Checks that `keep` matches the pruned model and that config.json
    carries the family's checkpoint expert-count keys (Qwen3-MoE: ``num_experts`` and
    ``num_local_experts``).
    """
    path = Path(path)
    layers = find_moe_layers(model)
    if len(keep) != len(layers):
        raise ValueError(f"keep has {len(keep)} entries but the model has {len(layers)} MoE layers ({_layer_names(layers)})")
    kept = [torch.as_tensor(k).long().sort().values.tolist() for k in keep]
    for layer, k in zip(layers, kept):
        if len(k) != layer.num_experts:
            raise ValueError(
                f"keep lists {len(k)} experts for decoder layer {layer.layer_index} but the model has "
                f"{layer.num_experts} there: call prune_experts(model, keep) before save_pruned"
            )
    if isinstance(keep, KeptExperts) and keep.layers != [l.layer_index for l in layers]:
        raise StatisticsMismatchError(f"keep was made for decoder layers {keep.layers}, the model has {_layer_names(layers)}")
    write_checkpoint_count_keys(model.config)
    model.save_pretrained(path, **save_kwargs)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)

    written = json.loads((path / "config.json").read_text())
    count = layers[0].num_experts
    wanted = list(expert_count_keys(model.config)[:1]) + list(CHECKPOINT_COUNT_KEYS.get(model.config.model_type, ()))
    wrong = {k: written.get(k) for k in wanted if written.get(k) != count}
    if wrong:
        raise RuntimeError(f"config.json written to {path} has expert counts {wrong}, expected {count}")

    selection = keep.provenance() if isinstance(keep, KeptExperts) else dict.fromkeys(
        ("criterion", "ratio", "num_prune", "scope", "num_removed", "statistics"))
    record = {
        "versions": versions(),
        "model_class": type(model).__name__,
        "model_type": model.config.model_type,
        "base_model": getattr(model.config, "_name_or_path", None) or None,
        **selection,
        "num_experts_before": keep.num_experts[0] if isinstance(keep, KeptExperts) else None,
        "num_experts_after": count,
        "top_k": layers[0].top_k,
        "kept": [{"layer": l.layer_index, "experts": k} for l, k in zip(layers, kept)],
        "extra": extra or {},
    }
    (path / PROVENANCE_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return path
