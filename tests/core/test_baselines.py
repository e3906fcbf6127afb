"""The baselines outside the family: MoNE as published (novices), its ranking, AIMER."""

import numpy as np
import pytest
import torch

from moepaper.architecture import find_moe_layers
from moepaper.criteria import (
    AIMER,
    MONE,
    MONE_RANKING,
    NAMED_CRITERIA,
    NOVICE,
    REROUTE,
    aimer_scores,
    criterion_grid,
    expert_scores,
    get_criterion,
    mone_scores,
    novice_outputs,
    resolve_criteria,
)
from moepaper.pruning import mask_experts, replace_with_novices, select_experts
from moepaper.statistics import StatisticsMismatchError, collect_statistics
from moepaper.testbed.tiny import random_batch, reference_expert_output, tiny_model


# the families named by the issue, gpt-oss's transposed interleaved biased layout, and group-limited routing
NOVICE_FAMILIES = ["qwen3_moe", "olmoe", "mixtral", "deepseek_v2", "deepseek_v3", "qwen2_moe", "gpt_oss"]


def _batches():
    return [random_batch(batch=2, seq_len=12, pad_last=3, seed=0), random_batch(batch=2, seq_len=12, seed=1)]


def _setup(family, dtype=torch.float64):
    model = tiny_model(family, dtype=dtype)
    model.set_experts_implementation("eager")
    stats = collect_statistics(model, _batches(), progress=False)
    return model, stats


def _remove_most_routed(model, stats, ratio=0.5):
    """Keep the least-routed experts, so that removed experts are certainly routed to."""
    return select_experts(-stats.count, ratio=ratio, model=model)


# ---------------------------------------------------------------- names and registry


def test_registry_names_and_replacement():
    assert {"mone", "mone-ranking", "aimer"} <= set(NAMED_CRITERIA)
    assert [c.name for c in resolve_criteria("named")][-3:] == ["mone", "mone-ranking", "aimer"]
    assert {c.name for c in resolve_criteria("grid")} >= {"mone", "mone-ranking", "aimer"}
    assert get_criterion("mone") is MONE and get_criterion("MoNE-Ranking") is MONE_RANKING and get_criterion("aimer") is AIMER
    assert MONE.replacement == NOVICE and MONE_RANKING.replacement == REROUTE and AIMER.replacement == REROUTE
    assert all(c.replacement == REROUTE for c in criterion_grid())
    assert MONE.point is None and AIMER.point is None


def test_mone_and_its_ranking_share_the_published_score():
    model, stats = _setup("qwen3_moe", torch.float32)
    torch.testing.assert_close(expert_scores(stats, "mone"), expert_scores(stats, "mone-ranking"))
    assert torch.equal(mone_scores(stats), expert_scores(stats, MONE).as_subclass(torch.Tensor))


# ---------------------------------------------------------------- MoNE's score and novices


def _routed_outputs(model, batches):
    """Per MoE layer position, expert -> list of (gate, f) over non-padding routed tokens (brute force)."""
    layers = find_moe_layers(model)
    found = [{e: [] for e in range(l.num_experts)} for l in layers]
    for batch in batches:
        captured = {}
        hooks = [l.experts.register_forward_pre_hook(lambda m, a, p=p: captured.__setitem__(p, a)) for p, l in enumerate(layers)]
        with torch.no_grad():
            model(**batch)
        for h in hooks:
            h.remove()
        mask = batch["attention_mask"].reshape(-1).bool()
        for p, layer in enumerate(layers):
            hidden, idx, w = captured[p]
            for t in range(hidden.shape[0]):
                if mask[t]:
                    for s, e in enumerate(idx[t].tolist()):
                        found[p][e].append((w[t, s].double(), reference_expert_output(layer.experts, e, hidden[t]).detach().double()))
    return found, sum(int(b["attention_mask"].sum()) for b in batches)


@pytest.mark.parametrize("family", ["qwen3_moe", "olmoe", "deepseek_v2"])
def test_mone_score_and_novices_match_brute_force(family):
    model, stats = _setup(family)
    found, tokens = _routed_outputs(model, _batches())
    scores, novices = mone_scores(stats), novice_outputs(stats)
    for p, per_expert in enumerate(found):
        for e, pairs in per_expert.items():
            if not pairs:
                assert scores[p, e] == 0 and (novices[p, e] == 0).all()
                continue
            f = torch.stack([x for _, x in pairs])
            torch.testing.assert_close(novices[p, e], f.mean(0))
            if len(pairs) < 2:
                assert scores[p, e] == 0
                continue
            gate = sum(g for g, _ in pairs) / tokens
            spread = (f - f.mean(0)).pow(2).sum(0).div(len(pairs) - 1).sum().sqrt()  # sqrt of unbiased trace
            torch.testing.assert_close(scores[p, e], gate * spread, rtol=1e-6, atol=1e-12)


def _reference_forward(experts, removed, novices):
    """Brute force: every routed (token, slot) pair on its own, a removed expert's output replaced by its mean."""

    def forward(hidden, idx, w):
        out = torch.zeros(hidden.shape, dtype=torch.float64)
        for t in range(hidden.shape[0]):
            for s, e in enumerate(idx[t].tolist()):
                f = novices[e] if removed[e] else reference_expert_output(experts, e, hidden[t]).double()
                out[t] += w[t, s].double() * f
        return out.to(hidden.dtype)

    return forward


@pytest.mark.parametrize("family", NOVICE_FAMILIES)
def test_novice_model_matches_brute_force(family):
    model, stats = _setup(family)
    keep = _remove_most_routed(model, stats)
    batch = random_batch(batch=2, seq_len=10, seed=5)
    layers = find_moe_layers(model)
    with torch.no_grad():
        before = model(**batch).logits
        with replace_with_novices(model, keep, stats):
            got = model(**batch).logits
        after = model(**batch).logits
        for p, (layer, kept) in enumerate(zip(layers, keep)):
            removed = torch.ones(layer.num_experts, dtype=torch.bool)
            removed[kept] = False
            layer.experts.forward = _reference_forward(layer.experts, removed, novice_outputs(stats)[p])
        try:
            want = model(**batch).logits
        finally:
            for layer in layers:
                del layer.experts.forward
        with mask_experts(model, keep):
            rerouted = model(**batch).logits
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    assert torch.equal(after, before), "leaving the context restores the model exactly"
    assert (got - before).abs().max() > 1e-6, "routed experts were removed: the output must change"
    assert (got - rerouted).abs().max() > 1e-6, "novices are not re-routing"
    assert all("forward" not in l.experts.__dict__ for l in layers)


@pytest.mark.parametrize("family", ["qwen3_moe", "qwen2_moe", "gpt_oss"])
def test_an_expert_with_constant_output_is_replaced_without_change(family):
    model = tiny_model(family, dtype=torch.float64)
    model.set_experts_implementation("eager")
    stats = collect_statistics(model, _batches(), progress=False)
    keep = _remove_most_routed(model, stats)
    layers = find_moe_layers(model)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # make every removed expert's output constant: 0, or a random bias (gpt-oss)
        for layer, kept in zip(layers, keep):
            removed = [e for e in range(layer.num_experts) if e not in kept.tolist()]
            layer.experts.down_proj[removed] = 0
            if layer.has_bias:
                layer.experts.down_proj_bias[removed] = torch.randn(len(removed), layer.experts.down_proj_bias.shape[1],
                                                                    generator=generator, dtype=torch.float64)
    batch = random_batch(batch=2, seq_len=10, seed=7)
    # calibrated on the evaluated tokens too, so every removed expert they reach has a novice (else 0)
    stats = collect_statistics(model, [*_batches(), batch], progress=False)
    with torch.no_grad():
        before = model(**batch).logits
        with replace_with_novices(model, keep, stats):
            got = model(**batch).logits
        with mask_experts(model, keep):
            rerouted = model(**batch).logits
    torch.testing.assert_close(got, before, rtol=1e-10, atol=1e-10)
    assert (rerouted - before).abs().max() > 1e-6, "re-routing the same experts does change the model"


def test_keep_all_changes_nothing_and_the_context_restores_on_error():
    model, stats = _setup("deepseek_v2", torch.float32)
    batch = random_batch(batch=2, seq_len=10, seed=3)
    layers = find_moe_layers(model)
    everything = [torch.arange(l.num_experts) for l in layers]
    with torch.no_grad():
        before = model(**batch).logits
        with replace_with_novices(model, everything, stats):
            assert all("forward" not in l.experts.__dict__ for l in layers)
            assert torch.equal(model(**batch).logits, before)
    keep = _remove_most_routed(model, stats)
    with pytest.raises(KeyError):
        with replace_with_novices(model, keep, stats):
            assert all("forward" in l.experts.__dict__ for l in layers)
            with pytest.raises(RuntimeError, match="already hold novices"):
                with replace_with_novices(model, keep, stats):
                    pass
            raise KeyError("body failed")
    assert all("forward" not in l.experts.__dict__ for l in layers)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, before)


def test_novices_check_keep_and_statistics():
    model, stats = _setup("qwen3_moe", torch.float32)
    layers = find_moe_layers(model)
    with pytest.raises(ValueError, match="fewer than top_k"):
        with replace_with_novices(model, [torch.tensor([0])] * len(layers), stats):
            pass
    other = collect_statistics(tiny_model("olmoe"), _batches(), progress=False)
    with pytest.raises(StatisticsMismatchError):
        with replace_with_novices(model, [torch.arange(8)] * len(layers), other):
            pass


# ---------------------------------------------------------------- AIMER


def _aimer_numpy(model) -> list[np.ndarray]:
    """Per MoE layer, AIMER = mean|w| / rms over every projection weight of each expert, from numpy."""
    out = []
    for layer in find_moe_layers(model):
        experts = layer.experts
        names = [n for n in ("gate_up_proj", "gate_proj", "up_proj", "down_proj") if isinstance(getattr(experts, n, None), torch.Tensor)]
        values = []
        for e in range(layer.num_experts):
            w = np.concatenate([getattr(experts, n)[e].detach().double().numpy().ravel() for n in names])
            values.append(np.abs(w).mean() / np.sqrt((w ** 2).mean()))
        out.append(np.array(values))
    return out


@pytest.mark.parametrize("family", ["qwen3_moe", "olmoe", "deepseek_v2", "qwen2_moe", "gpt_oss"])
def test_aimer_matches_numpy(family):
    model = tiny_model(family)
    got = aimer_scores(model)
    for p, want in enumerate(_aimer_numpy(model)):
        np.testing.assert_allclose(1 / got[p, : len(want)].numpy(), want, rtol=1e-6)
        assert (got[p, : len(want)] >= 1 - 1e-12).all()  # rms >= mean |w|


def test_aimer_is_scale_free_and_prunes_the_highest_ratio():
    model = tiny_model("qwen3_moe")
    before = aimer_scores(model)
    layer = find_moe_layers(model)[0]
    with torch.no_grad():
        layer.experts.gate_up_proj[3] *= 7.5
        layer.experts.down_proj[3] *= 7.5
        layer.experts.gate_up_proj[5] *= 0.01
        layer.experts.down_proj[5] *= 0.01
    torch.testing.assert_close(aimer_scores(model), before, rtol=1e-5, atol=0)
    # an expert with one large weight and the rest tiny has a small mean|w|/rms: most important, kept
    with torch.no_grad():
        layer.experts.down_proj[2] *= 1e-3
        layer.experts.down_proj[2, 0, 0] = 1.0
    stats = collect_statistics(model, _batches(), progress=False)  # statistics of these expert weights (issue 22)
    scores = expert_scores(stats, "aimer", model=model)
    assert scores[0].argmax() == 2
    keep = select_experts(scores, ratio=0.5)
    ratios = torch.from_numpy(_aimer_numpy(model)[0])
    removed = sorted(set(range(8)) - set(keep[0].tolist()))
    assert sorted(torch.sort(ratios, descending=True, stable=True).indices[:4].tolist()) == removed


def test_aimer_needs_the_model_and_checks_it():
    model = tiny_model("qwen3_moe")
    stats = collect_statistics(model, _batches(), progress=False)
    with pytest.raises(ValueError, match="pass the model"):
        expert_scores(stats, "aimer")
    with pytest.raises(StatisticsMismatchError):
        expert_scores(stats, "aimer", model=tiny_model("olmoe"))
    scores = expert_scores(stats, "aimer", model=model)
    assert scores.criterion is AIMER and scores.layers == stats.layers and tuple(scores.shape) == (len(stats.layers), 8)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_aimer_refuses_non_finite_weights_naming_layer_and_expert(value):
    """A NaN weight would give its expert an AIMER keep-score of 0 (pruned first, silently): an error instead."""
    model = tiny_model("qwen3_moe")
    stats = collect_statistics(model, _batches(), progress=False)
    layer = find_moe_layers(model)[1]
    with torch.no_grad():
        layer.experts.down_proj[5, 0, 3] = value
    pattern = rf"non-finite weights in {layer.name}\.down_proj \(decoder layer {layer.layer_index}\), expert 5:"
    with pytest.raises(ValueError, match=pattern):
        aimer_scores(model)
    with pytest.raises(ValueError, match=pattern):
        expert_scores(stats, "aimer", model=model)
