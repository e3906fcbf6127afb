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
    premise_verdict,
    principle_check,
    transfer_factors,
    transfer_table,
    transfer_verdicts,
    zeroed_gates,
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


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v2"])
def test_zeroed_gates_is_the_no_rerouting_model_whose_error_the_moments_measure(family):
    """Steps 1-2 of the derivation: with expert j's gates zeroed in one layer, sum_t ||y_t - y'_t||^2 over
    the calibration tokens is the moment S(0,2,2) of j; the re-routed model (mask_experts) differs."""
    from moepaper import find_moe_layers

    model = tiny_model(family)
    stats = collect_statistics(model, batches(), progress=False)
    moe = find_moe_layers(model)
    position, j = len(moe) - 1, 3  # the last MoE layer: earlier layers, so its input, are unchanged
    keep = [torch.arange(l.num_experts) for l in moe]
    keep[position] = torch.tensor([e for e in range(moe[position].num_experts) if e != j])
    outputs = []
    handle = moe[position].block.register_forward_hook(lambda m, args, out: outputs.append(out[0] if isinstance(out, tuple) else out))
    squared, rerouted = 0.0, 0.0
    try:
        with torch.no_grad():
            for b in batches():
                outputs.clear()
                model(**b)
                with zeroed_gates(model, keep):
                    model(**b)
                with mask_experts(model, keep):
                    model(**b)
                y, zeroed, masked = (o.reshape(-1, o.shape[-1]).double() for o in outputs)
                valid = b["attention_mask"].reshape(-1).bool()
                squared += float((y - zeroed)[valid].square().sum())
                rerouted += float((y - masked)[valid].square().sum())
    finally:
        handle.remove()
    moment = float(stats.moment(2, 2)[stats.layers.index(moe[position].layer_index), j])
    assert moment > 0
    assert squared == pytest.approx(moment, rel=1e-4)
    assert rerouted != pytest.approx(squared, rel=1e-3)  # re-routing is another model
    assert not moe[position].experts._forward_pre_hooks  # the hook is gone


def test_zeroed_gates_keeps_everything_when_nothing_is_removed_and_cleans_up_on_error():
    from moepaper import find_moe_layers

    model = tiny_model("qwen3_moe")
    moe = find_moe_layers(model)
    batch = batches()[0]
    with torch.no_grad():
        before = model(**batch).logits
        with zeroed_gates(model, [torch.arange(l.num_experts) for l in moe]):
            assert torch.equal(model(**batch).logits, before)
        keep = [torch.tensor([0, 1, 2]) for _ in moe]
        with pytest.raises(RuntimeError, match="inside"):
            with zeroed_gates(model, keep):
                assert not torch.allclose(model(**batch).logits, before)
                raise RuntimeError("inside")
        assert torch.equal(model(**batch).logits, before)
    assert all(not l.experts._forward_pre_hooks for l in moe)
    with pytest.raises(ValueError, match="fewer than top_k"):
        with zeroed_gates(model, [torch.tensor([0]) for _ in moe]):
            pass


QUANTITIES = ["routing frequency", "mean gate S(1,1,0)", "MAN S(1,0,1)", "MSAN S(1,0,2)", "S(0,1,1)/N", "S(0,2,2)/N"]


def _transfer(pair: str, rho: dict, change: dict, layer_rho: dict) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A hand-made `transfer_table` of one pair: the given mean rho and median change per quantity (others 0.5),
    spread 0.3 everywhere but MAN's 0.2, kept overlap 0.6; per-layer rho of frequency, gate and MAN."""
    table = pd.DataFrame([{"pair": pair, "quantity": q, "mean Spearman ρ": rho.get(q, 0.5), "min ρ over layers": 0.0,
                           "median relative change": change.get(q, 0.5),
                           "spread across experts (CV)": 0.2 if q == "MAN S(1,0,1)" else 0.3, "kept overlap": 0.6}
                          for q in QUANTITIES]).set_index(["pair", "quantity"])
    per_layer = pd.DataFrame([{"pair": pair, "quantity": q, "layer": l, "rho": r}
                              for q, values in layer_rho.items() for l, r in enumerate(values)])
    return table, per_layer


def test_transfer_verdicts_follow_the_hand_computed_numbers():
    F, G, A = "routing frequency", "mean gate S(1,1,0)", "MAN S(1,0,1)"
    # MAN minus frequency per layer: 0.4, 0.4, 0.1 -> mean 0.30, sd sqrt(0.03), noise sd / sqrt(3) = 0.10
    holds = _transfer("code vs math", {F: 0.5, G: 0.2, A: 0.8}, {F: 0.5, G: 0.3, A: 0.1},
                      {F: [0.5, 0.4, 0.6], G: [0.3, 0.2, 0.1], A: [0.9, 0.8, 0.7]})
    # MAN minus gate (the better rival here) per layer: 0.1, -0.1, 0.0 -> mean 0.00, noise 0.0577
    values_only = _transfer("code vs literature", {F: 0.3, G: 0.6, A: 0.6}, {F: 0.5, G: 0.4, A: 0.2},
                            {F: [0.3, 0.3, 0.3], G: [0.6, 0.7, 0.5], A: [0.7, 0.6, 0.5]})
    # the same ranking as the first pair, but MAN's values move as much as the gate's (0.3 is not below 0.3)
    ranking_only = _transfer("math vs literature", {F: 0.5, G: 0.2, A: 0.9}, {F: 0.5, G: 0.3, A: 0.3},
                             {F: [0.5, 0.4, 0.6], G: [0.3, 0.2, 0.1], A: [0.9, 0.8, 0.7]})
    # values as in the last pair, MAN's ranking the gate's (rival) exactly: difference 0, noise 0
    fails = _transfer("code vs c4", {F: 0.1, G: 0.4, A: 0.4}, {F: 0.5, G: 0.3, A: 0.3},
                      {F: [0.1, 0.1, 0.1], G: [0.5, 0.4, 0.3], A: [0.5, 0.4, 0.3]})
    table = pd.concat([holds[0], values_only[0], ranking_only[0], fails[0]])
    per_layer = pd.concat([holds[1], values_only[1], ranking_only[1], fails[1]], ignore_index=True)
    verdicts = transfer_verdicts(table, per_layer, ratio=0.5, num_experts=17)
    assert list(verdicts.index) == ["code vs math", "code vs literature", "math vs literature", "code vs c4"]
    assert verdicts["outcome"].tolist() == ["holds", "values only", "ranking only", "fails"]
    assert verdicts["rival"].tolist() == [F, G, F, G]
    assert verdicts.loc["code vs math", "difference"] == pytest.approx(0.30)
    assert verdicts.loc["code vs math", "noise"] == pytest.approx(0.10)
    assert verdicts.loc["code vs literature", "difference"] == pytest.approx(0.0, abs=1e-12)
    assert verdicts.loc["code vs literature", "noise"] == pytest.approx(0.1 / 3**0.5)
    text = verdicts.loc["code vs math", "text"]
    assert text.startswith("**code vs math.** Mean within-layer Spearman ρ of the expert ranking between the two domains: "
                           "routing frequency 0.50, mean gate 0.20, MAN 0.80, MSAN 0.50;")
    assert "MAN's ranking transfers better than routing frequency's (ρ difference +0.30 ± 0.10 over layers)" in text
    assert "Values: MAN moves less than frequency and gate (median relative change MAN 0.10" in text
    assert "its experts lie closer together" in text and "Kept sets at 50% removed" in text
    assert "the premise **holds** on this model" in text and "scatters by about ±0.25 even" in text  # 1/sqrt(16)
    assert text.count("\n\n") == 2
    assert "transfers neither better nor worse than mean gate S(1,1,0)'s" in verdicts.loc["code vs literature", "text"]
    assert "**for the values but not for the ranking**" in verdicts.loc["code vs literature", "text"]
    assert "MAN moves not less" in verdicts.loc["math vs literature", "text"]
    assert "**for the ranking but not for the values**" in verdicts.loc["math vs literature", "text"]
    assert "the premise **does not hold** on this model" in verdicts.loc["code vs c4", "text"]
    assert "(ρ difference +0.00 ± 0.00)" in verdicts.loc["code vs c4", "text"]
    worse = _transfer("a vs b", {F: 0.9, G: 0.2, A: 0.5}, {A: 0.1}, {F: [0.9, 0.8, 0.9], G: [0.2] * 3, A: [0.5, 0.5, 0.4]})
    assert "transfers worse than routing frequency's (ρ difference -0.40" in transfer_verdicts(*worse, ratio=0.25, num_experts=8).loc["a vs b", "text"]
    with pytest.raises(ValueError, match="at least 2"):
        transfer_verdicts(table, per_layer, ratio=0.5, num_experts=1)
    with pytest.raises(ValueError, match="lacks"):
        transfer_verdicts(table.drop(index="MSAN S(1,0,2)", level="quantity"), per_layer, ratio=0.5, num_experts=8)


def test_transfer_verdicts_of_the_transfer_table_of_three_domains():
    table, per_layer = transfer_table({"a:code": _stats(0), "a:math": _stats(1), "a:literature": _stats(2)})
    verdicts = transfer_verdicts(table, per_layer, ratio=0.5, num_experts=8)
    assert list(verdicts.index) == ["code vs math", "code vs literature", "math vs literature"]
    assert set(verdicts["outcome"]) <= {"holds", "values only", "ranking only", "fails"}


def test_premise_verdict_names_the_pairs_of_each_outcome():
    assert premise_verdict({"code vs math": "holds", "code vs literature": "holds"}).startswith(
        "On this model the premise of the principle **holds** for every domain pair measured (code vs math, code vs literature)")
    part = premise_verdict({"code vs math": "holds", "code vs literature": "values only", "math vs literature": "fails",
                            "code vs c4": "ranking only"})
    assert part.startswith("On this model the premise holds only in part (fully for: code vs math; for the ranking but not the "
                           "values: code vs c4; for the values but not the ranking: code vs literature; not at all: math vs literature).")
    ranking = premise_verdict({"code vs math": "ranking only", "code vs literature": "holds", "math vs literature": "ranking only"})
    assert ranking.startswith("On this model the premise holds **for the ranking**, the part pruning uses, for every domain pair "
                              "measured: MAN's ranking transfers better than frequency's and gate's (its values also move less for: "
                              "code vs literature; not for: code vs math, math vs literature).")
    assert "does **not** show that MAN or MSAN" in part
    assert "fully for: no pair" in premise_verdict({"x vs y": "values only"})
    assert premise_verdict(pd.Series({"x vs y": "fails", "x vs z": "fails"})).startswith("On this model the premise **does not hold**")
    with pytest.raises(ValueError, match="no domain pairs"):
        premise_verdict({})
    with pytest.raises(ValueError, match="unknown outcomes"):
        premise_verdict({"x vs y": "partly"})
