"""expert_damage and damage_correlation on tiny models, checked against independent paths."""

import copy

import pandas as pd
import pytest
import torch

from moepaper import MONE, ExpertStatistics, collect_statistics
from moepaper.criteria import criterion_grid
from moepaper.damage import (
    calibration_setting,
    damage_correlation,
    expert_damage,
    principle_check,
    transfer_factors,
    transfer_table,
)
from moepaper.pruning import mask_experts, prune_experts
from moepaper.testbed.tiny import PAPER_FAMILIES, random_batch, tiny_model


def batches():
    return [random_batch(batch=2, seq_len=12, pad_last=3, seed=s) for s in range(2)]


@pytest.mark.parametrize("family", PAPER_FAMILIES)
def test_direct_damage_on_calibration_tokens_is_the_moment_s022(family):
    """Step 1-2 of the derivation: without re-routing, sum_t ||g f||^2 over the calibration tokens is S(0, 2, 2)."""
    model = tiny_model(family)
    stats = collect_statistics(model, batches(), progress=False)
    damage = expert_damage(model, batches(), loss=False, progress=False)
    rows = [stats.layers.index(l) for l in damage.layers]
    torch.testing.assert_close(damage.direct_sq * damage.tokens, stats.moment(2, 2)[rows], rtol=1e-4, atol=1e-10)
    assert damage.tokens == int(stats.tokens[0])
    assert damage.loss_change is None and "loss_change" not in damage.measures


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v2"])
def test_damage_equals_that_of_the_structurally_pruned_model(family):
    """Masking one expert (re-routing included) = removing it with prune_experts, for loss and block output."""
    model = tiny_model(family, num_hidden_layers=2)  # one MoE layer: prune_experts needs equal counts per layer
    damage = expert_damage(model, batches(), progress=False)
    layer, j = damage.layers[-1], 3
    pruned = copy.deepcopy(model)
    from moepaper import find_moe_layers

    moe = find_moe_layers(model)
    keep = [torch.arange(l.num_experts) for l in moe]
    position = [l.layer_index for l in moe].index(layer)
    keep[position] = torch.tensor([e for e in range(moe[position].num_experts) if e != j])
    prune_experts(pruned, keep)
    loss_sum, count, squared = 0.0, 0, 0.0
    block, pruned_block = moe[position].block, find_moe_layers(pruned)[position].block
    captured = {}
    handle = block.register_forward_pre_hook(lambda m, args: captured.update(x=args[0]))
    with torch.no_grad():
        for b in batches():
            ids, mask = b["input_ids"], b["attention_mask"]
            model(**b)
            y = block(captured["x"])
            y_pruned = pruned_block(captured["x"])
            valid = mask.reshape(-1).bool()
            squared += float((y - y_pruned).reshape(-1, y.shape[-1])[valid].double().square().sum())
            logits = pruned(**b).logits
            losses = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
            ok = (mask[:, 1:] * mask[:, :-1]).bool()
            loss_sum += float(losses[ok].sum())
            count += int(ok.sum())
    handle.remove()
    row = damage.layers.index(layer)
    assert damage.output_sq[row, j].item() == pytest.approx(squared / damage.tokens, rel=1e-4, abs=1e-12)
    assert damage.loss_change[row, j].item() + damage.base_loss == pytest.approx(loss_sum / count, rel=1e-5)


def test_an_expert_no_token_reaches_does_no_damage():
    model = tiny_model("olmoe")
    from moepaper import find_moe_layers

    moe = find_moe_layers(model)
    keep = [torch.arange(l.num_experts) for l in moe]
    keep[0] = torch.tensor([0, 1, 2, 3, 4, 6, 7])
    with mask_experts(model, keep):  # expert 5 of the first MoE layer is never chosen
        damage = expert_damage(model, batches(), layers=[moe[0].layer_index], progress=False)
    assert damage.output_sq[0, 5] == 0 and damage.direct_sq[0, 5] == 0
    assert damage.loss_change[0, 5] == pytest.approx(0.0, abs=1e-6)
    assert (damage.output_sq[0, :5] > 0).any()


def test_layer_choice_and_errors():
    model = tiny_model("qwen3_moe")  # decoder layer 0 is dense
    damage = expert_damage(model, batches()[:1], layers=[2], loss=False, progress=False)
    assert damage.layers == [2] and damage.output_sq.shape == (1, 8)
    with pytest.raises(ValueError, match="hold no MoE block"):
        expert_damage(model, batches(), layers=[0], progress=False)
    with pytest.raises(ValueError, match="group-limited routing"):
        expert_damage(tiny_model("deepseek_v3"), batches(), progress=False)
    assert len(damage.to_frame()) == 8


def test_damage_correlation_covers_the_grid_and_mone():
    model = tiny_model("qwen3_moe")
    stats = collect_statistics(model, batches(), progress=False)
    damage = expert_damage(model, batches(), progress=False)
    frame = damage_correlation(stats, damage)
    grid = [c.name for c in criterion_grid()]
    assert set(frame["criterion"]) == set(grid) | {MONE.name}
    assert len(frame) == (len(grid) + 1) * len(damage.measures) * len(damage.layers)
    assert frame["rho"].dropna().between(-1, 1).all()
    # on its own calibration tokens the direct squared damage IS S(0,2,2): a perfect rank correlation
    exact = frame[(frame.criterion == "gated_squared") & (frame.measure == "direct_sq")]
    assert exact["rho"].tolist() == pytest.approx([1.0] * len(damage.layers))
    olmoe_damage = expert_damage(tiny_model("olmoe"), batches()[:1], loss=False, progress=False)  # layers 0, 1, 2
    with pytest.raises(ValueError, match="statistics do not"):
        damage_correlation(stats, olmoe_damage)


def _stats(seed: int, layers=(1, 2), experts: int = 8) -> ExpertStatistics:
    generator = torch.Generator().manual_seed(seed)
    L = len(layers)
    moments = torch.rand(L, 3, 3, experts, generator=generator, dtype=torch.float64) + 0.1
    moments[:, 0, 0] = torch.randint(1, 50, (L, experts), generator=generator).double()
    return ExpertStatistics(list(layers), [experts] * L, [2] * L, moments,
                            torch.rand(L, experts, 4, generator=generator, dtype=torch.float64),
                            torch.full((L,), 100.0, dtype=torch.float64))


def test_transfer_table_compares_every_factor_between_domains():
    same = _stats(0)
    table, per_layer = transfer_table({"a:code": same, "a:math": same})
    assert set(table.index.get_level_values("pair")) == {"code vs math"}
    assert list(table.index.get_level_values("quantity")) == list(transfer_factors(same))
    # identical statistics: every ranking transfers perfectly, nothing changes, the kept sets agree
    assert table["mean Spearman ρ"].tolist() == pytest.approx([1.0] * len(table))
    assert (table["median relative change"] == 0).all() and (table["kept overlap"] == 1).all()
    assert len(per_layer) == len(table) * 2
    table, _ = transfer_table({"x": same, "y": _stats(1), "z": _stats(2)}, ratio=0.25)
    assert len(set(table.index.get_level_values("pair"))) == 3
    assert (table["kept overlap"] < 1).any() and table["mean Spearman ρ"].between(-1, 1).all()
    with pytest.raises(ValueError, match="different layers"):
        transfer_table({"x": same, "y": _stats(1, layers=(1, 3))})


def test_calibration_setting():
    assert calibration_setting("embedded:code", "code") == "matched"
    assert calibration_setting("embedded:code", "literature") == "mismatched"
    assert calibration_setting("embedded:mixed", "code") == "mixed"


def _correlations(man: float, full: float, setting: str, spread: float = 0.01) -> pd.DataFrame:
    rows = []
    for layer in range(4):
        for name, rho in (("man", man), ("msan", man), ("gated_ean", full), ("gated_squared", full), ("frequency", 0.0)):
            rows.append({"criterion": name, "measure": "loss_change", "layer": layer, "rho": rho + spread * (layer % 2),
                         "setting": setting, "calibration": "c", "evaluation": "e"})
    return pd.DataFrame(rows)


def test_principle_check_verdicts_follow_the_numbers():
    both = pd.concat([_correlations(0.2, 0.8, "matched"), _correlations(0.8, 0.2, "mismatched")])
    check = principle_check(both, "loss_change")
    assert check.loc["matched", "verdict"] == "consistent" and check.loc["matched", "observed"] == "full damage ahead"
    assert check.loc["mismatched", "verdict"] == "consistent"
    assert check.loc["matched", "best"].startswith("gated_ean 0.8")
    contradicted = principle_check(_correlations(0.9, 0.1, "matched"), "loss_change")
    assert contradicted.loc["matched", "verdict"] == "contradicted"
    noisy = principle_check(_correlations(0.50, 0.49, "mixed", spread=0.5), "loss_change")
    assert noisy.loc["mixed", "verdict"] == "not confirmed" and noisy.loc["mixed", "observed"] == "indistinguishable"
    with pytest.raises(ValueError, match="no correlations with damage measure"):
        principle_check(both, "output_sq")
