"""select_experts, prune_experts, mask_experts and save_pruned on tiny models of every family."""

import copy
import functools
import json
import os
import subprocess
import sys


import pytest
import torch

from moepaper import ExpertScores, ExpertStatistics, StatisticsMismatchError, expert_scores, find_moe_layers
from moepaper.architecture import expert_count_keys
from moepaper.provenance import package_version
from moepaper.pruning import PROVENANCE_FILE, KeptExperts, mask_experts, prune_experts, save_pruned, select_experts
from moepaper.testbed.tiny import FAMILIES, random_batch, tiny_model

GROUPED = ("deepseek_v3", "glm4_moe")  # tiny configs with n_group=2, topk_group=1


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from threads; on a busy 2-core machine two threads ran 20-60x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def random_scores(model, seed=0) -> torch.Tensor:
    layers = find_moe_layers(model)
    return torch.rand(len(layers), layers[0].num_experts, generator=torch.Generator().manual_seed(seed))


def statistics_like(model, seed=0, **change) -> ExpertStatistics:
    """Random statistics with the routing facts of `model`'s MoE layers (or of `change`d ones)."""
    layers = find_moe_layers(model)
    facts = dict(layers=[l.layer_index for l in layers], num_experts=[l.num_experts for l in layers],
                 top_k=[l.top_k for l in layers], num_groups=[l.num_groups for l in layers],
                 topk_group=[l.topk_group for l in layers])
    facts.update(change)
    L, E = len(facts["layers"]), max(facts["num_experts"])
    generator = torch.Generator().manual_seed(seed)
    moments = torch.rand(L, 3, 3, E, generator=generator, dtype=torch.float64) + 0.01
    return ExpertStatistics(moments=moments, output_sum=torch.zeros(L, E, 2, dtype=torch.float64),
                            tokens=torch.ones(L, dtype=torch.float64), metadata={"model_name": "fake"}, **facts)


def logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def state(model) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same_state(model, before: dict):
    after = model.state_dict()
    assert after.keys() == before.keys()
    for key, value in after.items():
        assert torch.equal(value, before[key]), key  # bitwise: equal values, -inf and NaN excepted (none here)


def routed_experts(model, batch) -> list[set[int]]:
    """Experts any token of `batch` is routed to, per MoE layer (seen at the experts module's input)."""
    layers = find_moe_layers(model)
    seen = [set() for _ in layers]
    handles = [
        l.experts.register_forward_pre_hook(lambda m, args, i=i: seen[i].update(args[1].flatten().tolist()))
        for i, l in enumerate(layers)
    ]
    try:
        logits(model, batch)
    finally:
        for h in handles:
            h.remove()
    return seen


# --- select_experts -------------------------------------------------------------------------


def test_layer_scope_removes_lowest_and_keeps_lower_index_on_ties():
    scores = torch.tensor([[0.5, 0.1, 0.1, 0.9, 0.1, 0.7, 0.2, 0.3], [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]])
    keep = select_experts(scores, num_prune=2, top_k=2)
    # layer 0: 0.1 ties at experts 1, 2, 4: two of them go, the lowest index (1) stays
    assert [k.tolist() for k in keep] == [[0, 1, 3, 5, 6, 7], [2, 3, 4, 5, 6, 7]]
    assert all(k.dtype == torch.long for k in keep)
    assert [k.tolist() for k in select_experts(torch.ones(2, 8), ratio=0.25, top_k=2)] == [[0, 1, 2, 3, 4, 5]] * 2
    # round half up: 0.5 of 9 experts removes 5
    assert len(select_experts(torch.rand(1, 9), ratio=0.5, top_k=2)[0]) == 4


def test_layer_scope_takes_top_k_from_model_or_from_the_scores(model):
    layers = find_moe_layers(model)
    scores = expert_scores(statistics_like(model), "man")
    by_model = select_experts(scores.as_subclass(torch.Tensor), ratio=0.5, model=model)
    assert [len(k) for k in by_model] == [4] * len(layers)
    assert [k.tolist() for k in select_experts(scores.as_subclass(torch.Tensor), ratio=0.5, layers=layers)] == [k.tolist() for k in by_model]
    # the scores carry layers, counts, top-k and groups: nothing else is needed, and the model agrees
    alone = select_experts(scores, ratio=0.5)
    assert [k.tolist() for k in alone] == [k.tolist() for k in by_model]
    assert [k.tolist() for k in select_experts(scores, ratio=0.5, model=model)] == [k.tolist() for k in by_model]
    assert isinstance(alone, KeptExperts) and alone.layers == [l.layer_index for l in layers]
    assert alone.criterion.name == "man" and alone.ratio == 0.5 and alone.num_removed == [4] * len(layers)
    assert alone.statistics["checksum"] == statistics_like(model).checksum


def test_scores_carry_router_groups():
    model = tiny_model("deepseek_v3")
    stats = statistics_like(model)
    assert stats.num_groups == [2] * len(stats.layers)
    moments = stats.moments.clone()
    moments[:, 1, 1] = torch.tensor([0.0, 0.1, 0.2, 0.3, 5.0, 6.0, 7.0, 8.0], dtype=torch.float64)
    stats.moments = moments
    keep = select_experts(expert_scores(stats, (0, 1, 1)), num_prune=2)
    assert keep[0].tolist() == [1, 2, 3, 5, 6, 7]  # one from each group, without the model


def test_grouped_routers_lose_the_same_number_per_group():
    model = tiny_model("deepseek_v3")
    scores = torch.tensor([[0.0, 0.1, 0.2, 0.3, 5.0, 6.0, 7.0, 8.0]] * len(find_moe_layers(model)))
    keep = select_experts(scores, num_prune=2, model=model)
    assert [k.tolist() for k in keep][0] == [1, 2, 3, 5, 6, 7]  # one from each group, not experts 0 and 1
    assert select_experts(scores, num_prune=2, top_k=2)[0].tolist() == [2, 3, 4, 5, 6, 7]  # ungrouped
    with pytest.raises(ValueError, match="group-limited.*n_group=2.*divisible by 2"):
        select_experts(scores, num_prune=3, model=model)
    with pytest.raises(ValueError, match="at least 2"):
        select_experts(scores, num_prune=6, top_k=1, model=tiny_model("deepseek_v3", top_k=1))
    with pytest.raises(ValueError, match="scope='global' is refused on group-limited"):
        select_experts(scores, ratio=0.25, scope="global", model=model)


def test_global_scope_normalises_per_layer_and_respects_top_k():
    # layer 1 is layer 0 x 100: after dividing by each layer's mean they rank identically
    base = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0])
    keep = select_experts(torch.stack([base, 100 * base]), num_prune=4, scope="global", top_k=2)
    assert [k.tolist() for k in keep] == [[2, 3, 4, 5, 6, 7]] * 2  # ties: later layer first, so 2 + 2
    keep = select_experts(torch.stack([base, 100 * base]), num_prune=3, scope="global", top_k=2)
    assert [k.tolist() for k in keep] == [[1, 2, 3, 4, 5, 6, 7], [2, 3, 4, 5, 6, 7]]
    # a flat layer keeps its experts; a skewed one loses its tail, but never below top_k
    flat = torch.ones(8)
    skewed = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0])
    keep = select_experts(torch.stack([flat, skewed]), num_prune=7, scope="global", top_k=2)
    assert [k.tolist() for k in keep] == [list(range(7)), [6, 7]]
    keep = select_experts(torch.stack([flat, skewed]), ratio=0.25, scope="global", top_k=2)
    assert sum(8 - len(k) for k in keep) == 4 and keep[0].tolist() == list(range(8))
    with pytest.raises(ValueError, match="non-negative"):
        select_experts(torch.stack([flat, -skewed]), num_prune=2, scope="global", top_k=2)
    with pytest.raises(ValueError, match="fewer than top_k"):
        select_experts(torch.stack([flat, skewed]), num_prune=13, scope="global", top_k=2)


def test_list_scores_for_non_uniform_layers():
    keep = select_experts([torch.tensor([3.0, 1.0, 2.0, 0.0]), torch.arange(6.0)], num_prune=2, top_k=2)
    assert [k.tolist() for k in keep] == [[0, 2], [2, 3, 4, 5]]
    # zero-padded 2-D scores are cut to each layer's real count given by the statistics
    padded = torch.tensor([[3.0, 1.0, 2.0, 0.0, 0.0, 0.0], [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]])
    stats = ExpertStatistics([0, 1], [4, 6], [2, 2], torch.zeros(2, 3, 3, 6, dtype=torch.float64),
                             torch.zeros(2, 6, 1, dtype=torch.float64), torch.ones(2, dtype=torch.float64))
    assert [k.tolist() for k in select_experts(ExpertScores.wrap(padded, stats), num_prune=2)] == [[0, 2], [2, 3, 4, 5]]


@pytest.mark.parametrize("ratio", [0, 0.0, 1, 1.0, -0.1, 1.5, float("nan")])
def test_invalid_ratio(ratio):
    with pytest.raises(ValueError, match="0 < ratio < 1"):
        select_experts(torch.rand(2, 8), ratio=ratio, top_k=2)


def test_invalid_selection_arguments(model):
    scores = random_scores(model)
    with pytest.raises(ValueError, match="leaves 1, fewer than top_k=2"):
        select_experts(scores, ratio=0.9, model=model)  # round(7.2) = 7 removed
    with pytest.raises(ValueError, match="leaves 0, fewer than top_k=2"):
        select_experts(scores, num_prune=8, model=model)
    with pytest.raises(ValueError, match="removes no expert"):
        select_experts(scores, ratio=0.01, model=model)
    with pytest.raises(ValueError, match="positive integer"):
        select_experts(scores, num_prune=0, model=model)
    with pytest.raises(ValueError, match="exactly one of ratio"):
        select_experts(scores, model=model)
    with pytest.raises(ValueError, match="exactly one of ratio"):
        select_experts(scores, ratio=0.25, num_prune=2, model=model)
    with pytest.raises(ValueError, match="top_k is unknown"):
        select_experts(scores, ratio=0.25)
    with pytest.raises(ValueError, match="top_k=3 disagrees"):
        select_experts(scores, ratio=0.25, top_k=3, model=model)
    with pytest.raises(ValueError, match="scope='sideways'"):
        select_experts(scores, ratio=0.25, scope="sideways", model=model)
    with pytest.raises(ValueError, match="NaN or Inf"):
        select_experts(torch.full_like(scores, float("nan")), ratio=0.25, model=model)


def test_scores_of_another_model_are_refused(model):
    L = len(find_moe_layers(model))
    with pytest.raises(ValueError, match=rf"scores have {L + 1} layers but the model has {L} MoE layers"):
        select_experts(torch.rand(L + 1, 8), ratio=0.25, model=model)
    with pytest.raises(ValueError, match="scores\\[0\\] has 16 experts but MoE layer 0 has 8 experts"):
        select_experts(torch.rand(L, 16), ratio=0.25, model=model)
    with pytest.raises(ValueError, match="has 6 experts but MoE layer 0 has 8"):
        select_experts(torch.rand(L, 6), ratio=0.25, model=model)


def test_statistics_of_another_model_are_refused(model):
    layers = find_moe_layers(model)
    index = [l.layer_index for l in layers]
    wrong_layers = statistics_like(model, layers=[i + 1 for i in index])
    wrong_experts = statistics_like(model, num_experts=[16] * len(index))
    for wrong in (wrong_layers, wrong_experts):
        scores = expert_scores(wrong, "man")
        with pytest.raises(StatisticsMismatchError, match=r"MoE layers at decoder layers|num_experts \[16"):
            select_experts(scores, ratio=0.25, model=model)
        keep = select_experts(scores, num_prune=2)  # made for the other model
        for call in (lambda: prune_experts(model, keep), lambda: mask_experts(model, keep).__enter__()):
            with pytest.raises(StatisticsMismatchError, match=r"but the model has"):
                call()
    assert all(l.num_experts == 8 for l in find_moe_layers(model))  # nothing was pruned


# --- mask_experts == prune_experts --------------------------------------------------------------


@pytest.mark.parametrize("ratio", [0.25, 0.5])
def test_masked_logits_equal_pruned_logits(model, batch, ratio):
    keep = select_experts(random_scores(model, seed=1), ratio=ratio, model=model)
    before = state(model)
    full = logits(model, batch)
    with mask_experts(model, keep) as masked_model:
        assert masked_model is model
        masked = logits(model, batch)
    assert_same_state(model, before)
    assert torch.equal(logits(model, batch), full)  # unmasked again
    assert not any("forward" in l.router.__dict__ for l in find_moe_layers(model))

    pruned = prune_experts(copy.deepcopy(model), keep)
    expected = logits(pruned, batch)
    torch.testing.assert_close(masked, expected, atol=1e-5, rtol=0)
    assert (masked - full).abs().max() > 1e-3  # the selection did remove routed experts


def rows_with_router_ties(model, batch, keep) -> set[int]:
    """Batch rows where some token's kept router logits tie among its top k + 1 (topk may break ties either way)."""
    layers = find_moe_layers(model)
    rows, seq_len = set(), batch["input_ids"].shape[1]

    def hook(module, args, out, layer=None, kept=None):
        top = out[0].float()[:, kept].sort(dim=-1, descending=True).values[:, : layer.top_k + 1]  # (T, k+1)
        for token in (top[:, 1:] == top[:, :-1]).any(-1).nonzero().flatten().tolist():
            rows.add(token // seq_len)

    handles = [l.router.register_forward_hook(functools.partial(hook, layer=l, kept=k)) for l, k in zip(layers, keep)]
    try:
        with mask_experts(model, keep):
            logits(model, batch)
    finally:
        for h in handles:
            h.remove()
    return rows


def test_masked_logits_equal_pruned_logits_in_bfloat16(family, batch):
    """Equal too, except on tokens whose bf16 router logits tie at the top-k boundary: torch.topk breaks
    such ties differently on 8 and on 4 experts (seen on gpt-oss), so masking and pruning may pick different
    experts there."""
    model = tiny_model(family, dtype=torch.bfloat16)
    keep = select_experts(random_scores(model, seed=1), ratio=0.5, model=model)
    with mask_experts(model, keep):
        masked = logits(model, batch)
    pruned = logits(prune_experts(copy.deepcopy(model), keep), batch)
    clean = [r for r in range(masked.shape[0]) if r not in rows_with_router_ties(tiny_model(family, dtype=torch.bfloat16), batch, keep)]
    assert clean, "every row has a router tie; use another seed"
    torch.testing.assert_close(masked[clean], pruned[clean], atol=1e-2, rtol=0)


def test_deepseek_v2_group_limited_greedy(batch):
    model = tiny_model("deepseek_v2", topk_method="group_limited_greedy", n_group=2, topk_group=1)
    layers = find_moe_layers(model)
    scores = torch.tensor([[0.0, 0.1, 0.2, 0.3, 5.0, 6.0, 7.0, 8.0]] * len(layers))
    keep = select_experts(scores, num_prune=2, model=model)
    assert keep[0].tolist() == [1, 2, 3, 5, 6, 7]
    with mask_experts(model, keep):
        masked = logits(model, batch)
    torch.testing.assert_close(masked, logits(prune_experts(copy.deepcopy(model), keep), batch), atol=1e-5, rtol=0)
    # greedy DeepSeek-V2 ignores n_group: no per-group rule
    greedy = tiny_model("deepseek_v2", n_group=2, topk_group=1)
    assert select_experts(scores, num_prune=2, model=greedy)[0].tolist() == [2, 3, 4, 5, 6, 7]


@pytest.mark.parametrize("family", ["deepseek_v3", "glm4_moe", "ernie4_5_moe"])
def test_removed_experts_selection_bias_cannot_choose_them(family, batch):
    """A huge correction bias on a removed expert would make the router pick it if masking only touched logits."""
    model = tiny_model(family)
    keep = select_experts(random_scores(model, seed=2), ratio=0.25, model=model)
    for layer, kept in zip(find_moe_layers(model), keep):
        removed = sorted(set(range(8)) - set(kept.tolist()))
        bias = next(t for t in layer.router_tensors if t.attr == "e_score_correction_bias")
        with torch.no_grad():
            bias.tensor.index_fill_(bias.dim, torch.tensor(removed), 1e3)
    before = state(model)
    with mask_experts(model, keep):
        masked = logits(model, batch)
    assert_same_state(model, before)  # the 1e3 entries are back exactly
    torch.testing.assert_close(masked, logits(prune_experts(copy.deepcopy(model), keep), batch), atol=1e-5, rtol=0)


def test_mask_restores_model_when_the_body_raises(model, batch):
    keep = select_experts(random_scores(model), ratio=0.5, model=model)
    before, full = state(model), logits(model, batch)
    with pytest.raises(KeyboardInterrupt):
        with mask_experts(model, keep):
            logits(model, batch)
            raise KeyboardInterrupt
    assert_same_state(model, before)
    assert torch.equal(logits(model, batch), full)


def test_nested_masks_intersect_and_unwind(batch):
    model = tiny_model("deepseek_v3")
    layers = find_moe_layers(model)
    outer = [torch.tensor([0, 1, 2, 4, 5, 6])] * len(layers)
    inner = [torch.tensor([0, 1, 4, 5])] * len(layers)
    before = state(model)
    with mask_experts(model, outer):
        with mask_experts(model, inner):
            nested = logits(model, batch)
        outer_only = logits(model, batch)
    assert_same_state(model, before)
    with mask_experts(model, inner):
        torch.testing.assert_close(nested, logits(model, batch), atol=1e-6, rtol=0)
    with mask_experts(model, outer):
        torch.testing.assert_close(outer_only, logits(model, batch), atol=1e-6, rtol=0)


def test_masks_closed_out_of_order_restore_exactly(batch):
    model = tiny_model("deepseek_v3")  # selection biases too
    layers = find_moe_layers(model)
    a = [torch.tensor([0, 1, 2, 4, 5, 6])] * len(layers)
    b = [torch.tensor([0, 1, 5, 7])] * len(layers)
    before, full = state(model), logits(model, batch)
    with mask_experts(model, a):
        expected_a = logits(model, batch)
    expected_b = logits(prune_experts(copy.deepcopy(model), b), batch)
    outer = mask_experts(model, a)
    inner = mask_experts(model, b)
    outer.__enter__()
    inner.__enter__()
    outer.__exit__(None, None, None)  # the outer mask closes first
    torch.testing.assert_close(logits(model, batch), expected_b, atol=1e-5, rtol=0)  # only the open mask is left
    inner.__exit__(None, None, None)
    assert_same_state(model, before)
    assert all("forward" not in l.router.__dict__ for l in layers)
    assert torch.equal(logits(model, batch), full)
    with mask_experts(model, a):  # and masks still work afterwards
        torch.testing.assert_close(logits(model, batch), expected_a, atol=1e-6, rtol=0)


def test_mask_from_a_second_thread_is_refused_and_the_first_restores(batch):
    import threading

    model = tiny_model("deepseek_v3")
    layers = find_moe_layers(model)
    keep = [torch.tensor([0, 1, 4, 5])] * len(layers)
    before, full = state(model), logits(model, batch)
    entered, release, errors = threading.Event(), threading.Event(), []

    def hold():
        with mask_experts(model, keep):
            entered.set()
            release.wait(10)

    thread = threading.Thread(target=hold)
    thread.start()
    entered.wait(10)
    try:
        with pytest.raises(RuntimeError, match="masked by another thread"):
            with mask_experts(model, [torch.tensor([2, 3, 6, 7])] * len(layers)):
                errors.append("entered")
    finally:
        release.set()
        thread.join()
    assert errors == []
    assert_same_state(model, before)
    assert all("forward" not in l.router.__dict__ for l in layers)
    assert torch.equal(logits(model, batch), full)


def _slice_layer(layer, kept):
    """A per-layer slice written here independently of prune_experts (which refuses unequal counts)."""
    with torch.no_grad():
        for t in layer.per_expert_tensors:
            new = t.tensor.index_select(t.dim, kept)
            if t.attr in t.module._parameters:
                setattr(t.module, t.attr, torch.nn.Parameter(new, requires_grad=False))
            else:
                t.module._buffers[t.attr] = new
    for module, attr in layer.count_attributes:
        setattr(module, attr, len(kept))


@pytest.mark.parametrize("family", ["olmoe", "qwen3_moe", "ernie4_5_moe", "gpt_oss", "phimoe"])
def test_mask_handles_non_uniform_counts(family, batch):
    model = tiny_model(family, num_hidden_layers=4)
    scores = random_scores(model, seed=3) * torch.arange(1, len(find_moe_layers(model)) + 1).unsqueeze(1) ** 2
    scores[0, :6] = 0.0  # layer 0 loses most
    keep = select_experts(scores, ratio=0.4, scope="global", model=model)
    assert len({len(k) for k in keep}) > 1
    with pytest.raises(ValueError, match="different counts per layer.*mask_experts"):
        prune_experts(copy.deepcopy(model), keep)
    with mask_experts(model, keep):
        masked = logits(model, batch)
    reference = copy.deepcopy(model)
    for layer, kept in zip(find_moe_layers(reference), keep):
        _slice_layer(layer, kept)
    torch.testing.assert_close(masked, logits(reference, batch), atol=1e-5, rtol=0)


def test_keep_lists_of_another_shape_are_refused(model):
    layers = find_moe_layers(model)
    L = len(layers)
    good = select_experts(random_scores(model), ratio=0.25, model=model)
    cases = [
        (good + good[:1], rf"keep has {L + 1} entries but the model has {L} MoE layers"),
        (good[:-1], rf"keep has {L - 1} entries but the model has {L} MoE layers"),
        ([torch.tensor([0, 1, 2, 3, 4, 8])] + good[1:], r"expert indices \[8\] are out of range: the layer has 8 experts"),
        ([torch.tensor([-1, 1, 2, 3, 4, 5])] + good[1:], r"indices \[-1\] are out of range"),
        ([torch.tensor([0, 1, 1, 3, 4, 5])] + good[1:], "repeat"),
        ([torch.tensor([0.0, 1.0, 2.0])] + good[1:], "integer expert indices"),
        ([torch.tensor([7])] * L, "keeps 1 experts, fewer than top_k=2"),
    ]
    for keep, message in cases:
        for call in (lambda: prune_experts(model, keep), lambda: mask_experts(model, keep).__enter__()):
            with pytest.raises(ValueError, match=message):
                call()
    assert all(l.num_experts == 8 for l in find_moe_layers(model))


@pytest.mark.parametrize("family", GROUPED)
def test_uneven_groups_are_refused(family):
    model = tiny_model(family)
    L = len(find_moe_layers(model))
    with pytest.raises(ValueError, match=r"keeps \[4, 2\] experts per group; group-limited routing \(n_group=2\)"):
        prune_experts(model, [torch.tensor([0, 1, 2, 3, 4, 5])] * L)
    with pytest.raises(ValueError, match="every group must keep at least 2"):
        mask_experts(model, [torch.tensor([0, 4])] * L).__enter__()


def test_pruning_inside_a_mask_is_refused(model):
    keep = select_experts(random_scores(model), ratio=0.25, model=model)
    with mask_experts(model, keep):
        with pytest.raises(RuntimeError, match="inside mask_experts"):
            prune_experts(model, keep)


# --- prune_experts ----------------------------------------------------------------------------


def removed_parameter_count(config, removed_per_layer: int, moe_layers: int) -> tuple[int, int]:
    """Parameters, and state-dict entries (parameters + buffers), one pruning removes: from the config alone."""
    H = config.hidden_size
    inter = getattr(config, "moe_intermediate_size", None) or config.intermediate_size
    per_expert = 3 * H * inter + H  # gate, up, down rows + one router row
    buffers = 0
    if config.model_type == "gpt_oss":
        per_expert += 2 * inter + H + 1  # gate_up bias, down bias, router bias
    if config.model_type == "ernie4_5_moe":
        per_expert += 1  # moe_statics.e_score_correction_bias is a parameter
    if config.model_type in GROUPED:
        buffers = 1  # e_score_correction_bias is a buffer
    n = removed_per_layer * moe_layers
    return n * per_expert, n * (per_expert + buffers)


def test_parameter_count_drops_by_removed_experts_and_router_rows(model):
    layers = find_moe_layers(model)
    params = sum(p.numel() for p in model.parameters())
    entries = sum(v.numel() for v in model.state_dict().values())
    keep = select_experts(random_scores(model), ratio=0.25, model=model)
    prune_experts(model, keep)
    want_params, want_entries = removed_parameter_count(model.config, 2, len(layers))
    assert params - sum(p.numel() for p in model.parameters()) == want_params
    assert entries - sum(v.numel() for v in model.state_dict().values()) == want_entries


def test_prune_keeps_tensor_kinds_and_updates_counts(model, batch):
    layers = find_moe_layers(model)
    kinds = {
        t.path: (t.attr in t.module._parameters, t.tensor.requires_grad, t.tensor.dtype, t.dim)
        for l in layers
        for t in l.per_expert_tensors
    }
    keys = expert_count_keys(model.config)
    keep = select_experts(random_scores(model), ratio=0.25, model=model)
    sliced = {
        t.path: t.tensor.index_select(t.dim, k).clone() for l, k in zip(layers, keep) for t in l.per_expert_tensors
    }
    assert prune_experts(model, keep, layers=layers) is model
    assert [l.num_experts for l in layers] == [6] * len(layers)  # the given MoELayer objects follow
    found = find_moe_layers(model)
    assert [l.num_experts for l in found] == [6] * len(found)
    for l in found:
        assert l.top_k == 2 and all(getattr(m, a) == 6 for m, a in l.count_attributes)
        for t in l.per_expert_tensors:
            is_param, requires_grad, dtype, dim = kinds[t.path]
            assert (t.attr in t.module._parameters, t.tensor.requires_grad, t.tensor.dtype, t.dim) == kinds[t.path]
            assert torch.equal(t.tensor, sliced[t.path]), t.path
    assert all(getattr(model.config, k) == 6 for k in keys)
    assert model.config.num_experts_per_tok == 2
    assert getattr(model, "num_experts", 6) == 6  # the aux-loss count of *ForCausalLM
    assert torch.isfinite(logits(model, batch)).all()


def test_qwen3_config_writes_both_expert_count_keys():
    model = tiny_model("qwen3_moe")
    prune_experts(model, select_experts(random_scores(model), ratio=0.5, model=model))
    written = model.config.to_dict()
    assert written["num_local_experts"] == written["num_experts"] == 4
    assert model.config.num_experts == model.config.num_local_experts == 4


def test_pruning_twice_composes(batch):
    """Statistics of the original model are refused afterwards; fresh keep lists work, counts stay in sync."""
    model = tiny_model("qwen3_moe")
    original = expert_scores(statistics_like(model), "man")
    prune_experts(model, select_experts(original, ratio=0.25, model=model))
    with pytest.raises(StatisticsMismatchError, match="before it was pruned"):
        select_experts(original, ratio=0.25, model=model)
    with pytest.raises(StatisticsMismatchError, match="but the model has"):
        prune_experts(model, select_experts(original, num_prune=4))
    prune_experts(model, [torch.arange(4)] * 2)
    written = model.config.to_dict()
    assert written["num_local_experts"] == written["num_experts"] == model.config.num_experts == 4
    assert torch.isfinite(logits(model, batch)).all()


# --- removing experts no token routes to ----------------------------------------------------------

# Removing experts the batch never routes to leaves the batch's logits unchanged exactly when
# every token keeps its selected experts and their weights:
#   softmax -> top-k -> renormalise over the k (Mixtral; Qwen2/Qwen3/OLMoE with norm_topk_prob):
#       unchanged: the removed experts only enter the softmax denominator, which cancels.
#   top-k on logits -> softmax over the k (gpt-oss, Granite): unchanged.
#   sigmoid, bias-corrected, renormalised (DeepSeek-V3, GLM) with one group: unchanged (scores are
#       per expert). With n_group > 1 a group's score sums its two best experts, routed or not, so
#       removing an unrouted one can move tokens to other groups: not guaranteed.
#   softmax over all experts without renormalisation (OLMoE, Qwen2-MoE with norm_topk_prob=False,
#       DeepSeek-V2 greedy x routed_scaling_factor): changed: every weight loses the removed
#       experts' share of the denominator.
#   ERNIE-4.5 (softmax over all, selection on probability + moe_statics bias, renormalised):
#       scaling the probabilities changes their order against the additive bias, so selection
#       can change: not guaranteed; unchanged when the bias is zero.
#   PhiMoE sparsemixer: experts within 2 x router_jitter_noise of the best share its softmax
#       weight even when not selected: not guaranteed; unchanged with router_jitter_noise=0.
UNROUTED_UNCHANGED = {
    "qwen3_moe": {},
    "mixtral": {},
    "gpt_oss": {},
    "granitemoe": {},
    "olmoe": {"norm_topk_prob": True},
    "qwen2_moe": {"norm_topk_prob": True},
    "deepseek_v3": {"n_group": 1, "topk_group": 1},
    "glm4_moe": {"n_group": 1, "topk_group": 1},
    "ernie4_5_moe": "zero bias",
    "phimoe": {"router_jitter_noise": 0.0},
}
UNROUTED_CHANGED = ("olmoe", "qwen2_moe", "deepseek_v2")


def _without_unrouted(model, batch):
    routed = routed_experts(model, batch)
    removable = min(8 - len(r) for r in routed)
    assert removable >= 1, routed
    keep = [torch.tensor(sorted(r | set(sorted(set(range(8)) - r)[removable:]))) for r in routed]
    return prune_experts(copy.deepcopy(model), keep)


@pytest.mark.parametrize("family", list(UNROUTED_UNCHANGED))
def test_removing_unrouted_experts_leaves_logits_unchanged(family):
    variant = UNROUTED_UNCHANGED[family]
    model = tiny_model(family, **(variant if isinstance(variant, dict) else {}))
    if variant == "zero bias":
        for layer in find_moe_layers(model):
            with torch.no_grad():
                next(t for t in layer.router_tensors if t.attr == "e_score_correction_bias").tensor.zero_()
    batch = random_batch(batch=1, seq_len=3, seed=5)  # 3 tokens route to at most 6 of 8 experts
    torch.testing.assert_close(logits(_without_unrouted(model, batch), batch), logits(model, batch), atol=1e-6, rtol=0)


@pytest.mark.parametrize("family", UNROUTED_CHANGED)
def test_removing_unrouted_experts_changes_unrenormalised_softmax_routers(family):
    model = tiny_model(family)
    batch = random_batch(batch=1, seq_len=3, seed=5)
    assert (logits(_without_unrouted(model, batch), batch) - logits(model, batch)).abs().max() > 1e-4


# --- save_pruned and a fresh process without moepaper ---------------------------------------------

FRESH_PROCESS = r"""
import json, sys
import torch, transformers
from transformers import AutoModelForCausalLM, AutoTokenizer
cases = json.load(open(sys.argv[1]))
batch = torch.load(cases["batch"])
report = {}
for case in cases["models"]:
    model, info = AutoModelForCausalLM.from_pretrained(case["dir"], output_loading_info=True)
    model.eval()
    with torch.no_grad():
        logits = model(**batch).logits
    expected = torch.load(case["expected"])
    entry = {
        "class": type(model).__name__,
        "max_abs_diff": (logits - expected).abs().max().item(),
        "loading_info": {k: sorted(map(str, v)) for k, v in info.items()},
        "counts": {k: getattr(model.config, k, None) for k in ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")},
        "top_k": model.config.num_experts_per_tok,
        "config_json": json.load(open(case["dir"] + "/config.json")),
    }
    if case.get("tokenizer"):
        entry["token_ids"] = AutoTokenizer.from_pretrained(case["dir"])("the cat sat")["input_ids"]
    report[case["family"]] = entry
report["moepaper_imported"] = any(m == "moepaper" or m.startswith("moepaper.") for m in sys.modules)
print(json.dumps(report))
"""


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "the": 1, "cat": 2, "sat": 3}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


def test_saved_pruned_models_load_in_a_fresh_process_without_moepaper(tmp_path, batch):
    cases, keeps = [], {}
    for family in FAMILIES:
        model = tiny_model(family)
        stats = statistics_like(model, seed=4)
        keep = select_experts(expert_scores(stats, "man"), ratio=0.25, model=model)
        prune_experts(model, keep)
        out = tmp_path / family
        tokenizer = tiny_tokenizer() if family == "qwen3_moe" else None
        save_pruned(model, tokenizer, out, keep, extra={"seed": 4})
        torch.save(logits(model, batch), tmp_path / f"{family}.pt")
        cases.append({"family": family, "dir": str(out), "expected": str(tmp_path / f"{family}.pt"), "tokenizer": tokenizer is not None})
        keeps[family] = (keep, [l.layer_index for l in find_moe_layers(model)])
    torch.save(dict(batch), tmp_path / "batch.pt")
    (tmp_path / "cases.json").write_text(json.dumps({"batch": str(tmp_path / "batch.pt"), "models": cases}))

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    done = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS, str(tmp_path / "cases.json")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report.pop("moepaper_imported") is False
    assert set(report) == set(FAMILIES)
    for family, entry in report.items():
        assert entry["class"] == FAMILIES[family][1]
        assert entry["max_abs_diff"] <= 1e-5, (family, entry["max_abs_diff"])
        assert all(not v for v in entry["loading_info"].values()), (family, entry["loading_info"])
        assert {v for v in entry["counts"].values() if v is not None} == {6}, (family, entry["counts"])
        assert entry["top_k"] == 2
    # Qwen3-MoE: the key transformers v5 writes and the key original checkpoints (vLLM) read
    qwen3 = report["qwen3_moe"]["config_json"]
    assert qwen3["num_local_experts"] == qwen3["num_experts"] == 6
    assert report["qwen3_moe"]["token_ids"] == tiny_tokenizer()("the cat sat")["input_ids"]

    # provenance beside each checkpoint
    record = json.loads((tmp_path / "deepseek_v3" / PROVENANCE_FILE).read_text())
    keep, layer_index = keeps["deepseek_v3"]
    assert record["kept"] == [{"layer": i, "experts": k.tolist()} for i, k in zip(layer_index, keep)]
    assert record["criterion"] == {"name": "man", "b": 1, "alpha": 0, "beta": 1}
    assert (record["ratio"], record["scope"], record["num_experts_before"], record["num_experts_after"]) == (0.25, "layer", 8, 6)
    assert record["num_removed"] == [2] * len(layer_index)
    assert record["statistics"]["checksum"] == statistics_like(tiny_model("deepseek_v3"), seed=4).checksum
    assert record["versions"]["moepaper"] == package_version() and record["extra"] == {"seed": 4}


def test_save_pruned_refuses_a_model_that_was_not_pruned(tmp_path):
    model = tiny_model("olmoe")
    keep = select_experts(random_scores(model), ratio=0.25, model=model)
    with pytest.raises(ValueError, match="call prune_experts\\(model, keep\\) before save_pruned"):
        save_pruned(model, None, tmp_path / "out", keep)
    assert not (tmp_path / "out").exists()


def test_criterion_given_by_name_or_point_is_recorded(tmp_path):
    stats = statistics_like(tiny_model("olmoe"))
    for name, criterion, expected in (("a", "msan", {"name": "msan", "b": 1, "alpha": 0, "beta": 2}),
                                      ("b", (0, 2, 1), {"name": "S(0,2,1)", "b": 0, "alpha": 2, "beta": 1}),
                                      ("c", "mone", {"name": "mone", "b": None, "alpha": None, "beta": None})):
        model = tiny_model("olmoe")
        keep = select_experts(expert_scores(stats, criterion), ratio=0.25)
        prune_experts(model, keep)
        save_pruned(model, None, tmp_path / name, keep)
        assert json.loads((tmp_path / name / PROVENANCE_FILE).read_text())["criterion"] == expected
    model = tiny_model("olmoe")  # a plain list of kept experts: saved, with no criterion to record
    prune_experts(model, [torch.arange(6)] * len(stats.layers))
    save_pruned(model, None, tmp_path / "d", [torch.arange(6)] * len(stats.layers))
    record = json.loads((tmp_path / "d" / PROVENANCE_FILE).read_text())
    assert record["criterion"] is None and record["num_experts_after"] == 6


def test_with_collected_statistics_end_to_end(tmp_path, batch):
    """The statistics developer's ExpertStatistics and expert_scores feed select / prune / mask / save."""
    from moepaper import collect_statistics

    model = tiny_model("deepseek_v2")
    stats = collect_statistics(model, [batch], progress=False)
    keep = select_experts(expert_scores(stats, "man"), ratio=0.25)  # the paper reader's line
    with mask_experts(model, keep):
        masked = logits(model, batch)
    prune_experts(model, keep)
    torch.testing.assert_close(logits(model, batch), masked, atol=1e-5, rtol=0)
    save_pruned(model, None, tmp_path / "pruned", keep)
    record = json.loads((tmp_path / "pruned" / PROVENANCE_FILE).read_text())
    assert record["statistics"]["checksum"] == stats.checksum == ExpertStatistics.load(stats.save(tmp_path / "s.safetensors")).checksum
    assert record["criterion"]["name"] == "man" and record["ratio"] == 0.25
