"""collect_statistics against an independent brute-force computation, and the criteria."""

import pytest
import torch

from moepaper import (
    CRITERIA,
    ExpertStatistics,
    NonFiniteActivationError,
    StatisticsMismatchError,
    collect_statistics,
    criterion_grid,
    expert_scores,
    find_moe_layers,

)
from moepaper.criteria import Criterion, mone_scores
from moepaper.testbed.tiny import random_batch, reference_expert_output, tiny_model


def brute_force(model, batches, gate="routing_weight"):
    """Per-token loop over the selected experts; routing read from the blocks' routers."""
    layers = find_moe_layers(model)
    captured = {i: [] for i in range(len(layers))}
    hooks = []
    for i, layer in enumerate(layers):
        def pre(module, args, _i=i):
            captured[_i].append(tuple(a.detach().clone() for a in args[:3]))
        def router_out(module, args, output, _i=i):
            captured[_i].append(("logits", output[0].detach().clone()))
        hooks.append(layer.experts.register_forward_pre_hook(pre))
        hooks.append(layer.router.register_forward_hook(router_out))
    masks = []
    with torch.no_grad():
        for b in batches:
            model(**b)
            masks.append(b["attention_mask"].reshape(-1).bool())
    for h in hooks:
        h.remove()
    L, E = len(layers), layers[0].num_experts
    H = model.config.hidden_size
    moments = torch.zeros(L, 3, 3, E, dtype=torch.float64)
    out_sum = torch.zeros(L, E, H, dtype=torch.float64)
    tokens = torch.zeros(L, dtype=torch.float64)
    sigmoid = model.config.model_type in ("deepseek_v3", "glm4_moe")
    for i, layer in enumerate(layers):
        entries = captured[i]
        logits = [x[1] for x in entries if x[0] == "logits"]
        calls = [x for x in entries if x[0] != "logits"]
        for (hidden, idx, wts), lg, mask in zip(calls, logits, masks):
            probs = lg.float().sigmoid() if sigmoid else lg.float().softmax(-1)
            for t in range(hidden.shape[0]):
                if not mask[t]:
                    continue
                tokens[i] += 1
                for k in range(idx.shape[1]):
                    e = int(idx[t, k])
                    f = reference_expert_output(layer.experts, e, hidden[t]).detach().double()
                    g = float(wts[t, k]) if gate == "routing_weight" else float(probs[t, e])
                    n = float(f.norm())
                    for a in range(3):
                        for bb in range(3):
                            moments[i, a, bb, e] += g**a * n**bb
                    out_sum[i, e] += f
    return moments, out_sum, tokens


def test_statistics_equal_brute_force(family):
    # float64 weights: the comparison then measures moepaper, not float32 matmul rounding
    model = tiny_model(family, dtype=torch.float64)
    model.set_experts_implementation("eager")  # grouped_mm has no float64 kernel
    batches = [random_batch(batch=2, seq_len=10, seed=1, pad_last=3), random_batch(batch=1, seq_len=7, seed=2)]
    stats = collect_statistics(model, batches, progress=False)
    moments, out_sum, tokens = brute_force(model, batches)
    torch.testing.assert_close(stats.moments, moments, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(stats.output_sum, out_sum, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(stats.tokens, tokens)


@pytest.mark.parametrize("family", ["olmoe", "deepseek_v3", "gpt_oss", "ernie4_5_moe"])
def test_router_probability_gate_equals_brute_force(family):
    model = tiny_model(family, dtype=torch.float64)
    model.set_experts_implementation("eager")  # grouped_mm has no float64 kernel
    batches = [random_batch(batch=2, seq_len=9, seed=3, pad_last=2)]
    stats = collect_statistics(model, batches, gate="router_probability", progress=False)
    moments, _, _ = brute_force(model, batches, gate="router_probability")
    torch.testing.assert_close(stats.moments, moments, rtol=1e-6, atol=1e-9)
    assert stats.metadata["gate"] == "router_probability"


def test_counts_sum_to_tokens_times_top_k(model, batch):
    stats = collect_statistics(model, [batch], progress=False)
    real = int(batch["attention_mask"].sum())
    assert stats.tokens.tolist() == [float(real)] * stats.num_layers
    for l, k in enumerate(stats.top_k):
        assert stats.count[l].sum().item() == real * k


def test_padding_changes_nothing(model):
    plain = random_batch(batch=1, seq_len=8, seed=5)
    padded = {
        "input_ids": torch.cat([plain["input_ids"], torch.randint(0, 128, (1, 5))], dim=1),
        "attention_mask": torch.cat([plain["attention_mask"], torch.zeros(1, 5, dtype=torch.long)], dim=1),
    }
    a = collect_statistics(model, [plain], progress=False)
    b = collect_statistics(model, [padded], progress=False)
    # float32 attention over a longer (masked) sequence rounds differently: 1e-5, not bitwise
    assert torch.equal(a.count, b.count)
    torch.testing.assert_close(a.moments, b.moments, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a.output_sum, b.output_sum, rtol=1e-5, atol=1e-5)
    assert torch.equal(a.tokens, b.tokens)


def test_merge_of_halves_equals_whole_and_save_load_round_trip(tmp_path, model):
    first = [random_batch(batch=2, seq_len=8, seed=10)]
    second = [random_batch(batch=2, seq_len=8, seed=11, pad_last=2)]
    whole = collect_statistics(model, first + second, progress=False, calibration="whole")
    merged = collect_statistics(model, first, progress=False, calibration="a").merge(
        collect_statistics(model, second, progress=False, calibration="b")
    )
    torch.testing.assert_close(merged.moments, whole.moments, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(merged.output_sum, whole.output_sum, rtol=1e-12, atol=1e-12)
    assert torch.equal(merged.tokens, whole.tokens)
    assert merged.metadata["token_count"] == whole.metadata["token_count"]
    assert merged.metadata["calibration"] == "a + b"

    path = whole.save(tmp_path / "stats.safetensors")
    loaded = ExpertStatistics.load(path)
    assert torch.equal(loaded.moments, whole.moments)
    assert torch.equal(loaded.output_sum, whole.output_sum)
    assert torch.equal(loaded.tokens, whole.tokens)
    assert (loaded.layers, loaded.num_experts, loaded.top_k) == (whole.layers, whole.num_experts, whole.top_k)
    assert loaded.metadata == whole.metadata
    for key in ("model_class", "model_name", "calibration", "token_count", "dtype", "gate", "moepaper_version"):
        assert key in loaded.metadata
    loaded.check_model(model)


def test_mismatched_statistics_are_refused(tmp_path):
    a = collect_statistics(tiny_model("olmoe"), [random_batch()], progress=False)
    other = tiny_model("olmoe", num_experts=4)
    with pytest.raises(StatisticsMismatchError, match=r"\[8, 8, 8\] experts per layer but OlmoeForCausalLM has \[4, 4, 4\]"):
        a.check_model(other)
    b = collect_statistics(other, [random_batch()], progress=False)
    with pytest.raises(StatisticsMismatchError, match="different num_experts"):
        a.merge(b)
    with pytest.raises(StatisticsMismatchError, match="MoE layers"):
        a.check_model(tiny_model("qwen3_moe"))
    with pytest.raises(FileNotFoundError, match="no statistics file"):
        ExpertStatistics.load(tmp_path / "missing.safetensors")


def test_collection_leaves_logits_unchanged(model, batch):
    with torch.no_grad():
        before = model(**batch).logits
    collect_statistics(model, [batch], progress=False)
    with torch.no_grad():
        after = model(**batch).logits
    assert torch.equal(before, after)
    # during collection the decoder stack computes the same hidden states (observed), and the LM
    # head, which statistics do not need, is not run at all
    with torch.no_grad():
        hidden = model.base_model(**batch).last_hidden_state
    seen, head_calls = [], []
    handle = model.base_model.register_forward_hook(lambda m, a, o: seen.append(o.last_hidden_state.detach().clone()))
    head = model.get_output_embeddings().register_forward_hook(lambda m, a, o: head_calls.append(1))
    collect_statistics(model, [batch], progress=False)
    handle.remove()
    head.remove()
    assert len(seen) == 1 and not head_calls
    torch.testing.assert_close(seen[0], hidden, rtol=0, atol=1e-6)


def test_nonfinite_expert_output_names_layer_and_expert():
    model = tiny_model("olmoe")
    layer = find_moe_layers(model)[1]
    stats_before = collect_statistics(model, [random_batch()], progress=False)
    busiest = int(stats_before.count[1].argmax())
    with torch.no_grad():
        layer.experts.down_proj[busiest].fill_(float("nan"))
    with pytest.raises(NonFiniteActivationError, match=rf"expert\(s\) \[{busiest}\] of MoE layer 1"):
        collect_statistics(model, [random_batch()], progress=False)
    # the model is restored even after the error
    assert "forward" not in layer.experts.__dict__


def test_invalid_gate_is_refused(model):
    with pytest.raises(ValueError, match="gate must be one of"):
        collect_statistics(model, [], gate="softmax")


# --- criteria -----------------------------------------------------------------------------


def test_named_criteria_are_their_definitions(model, batch):
    stats = collect_statistics(model, [batch], progress=False)
    moments, _, tokens = brute_force(model, [batch])
    n = moments[:, 0, 0]
    mean = lambda m: torch.where(n > 0, m / n.clamp(min=1), torch.zeros_like(m))
    expected = {
        "frequency": n,
        "seer": moments[:, 1, 0],
        "ean": moments[:, 0, 1],
        "reap": mean(moments[:, 1, 1]),
        "man": mean(moments[:, 0, 1]),
        "msan": mean(moments[:, 0, 2]),
        "gated_ean": moments[:, 1, 1],
        "gated_squared": moments[:, 2, 2],
    }
    assert set(CRITERIA) == set(expected)
    for name, want in expected.items():
        torch.testing.assert_close(expert_scores(stats, name), want, rtol=1e-6, atol=1e-9, msg=name)


def test_grid_and_points():
    grid = criterion_grid()
    points = [c.point for c in grid]
    assert len(points) == 17 and len(set(points)) == 17 and (1, 0, 0) not in points
    assert {c.name for c in grid} >= set(CRITERIA)
    assert CRITERIA["man"].point == (1, 0, 1) and CRITERIA["msan"].point == (1, 0, 2)
    with pytest.raises(ValueError, match="constant"):
        Criterion(1, 0, 0)
    with pytest.raises(ValueError, match="b must be 0 or 1"):
        Criterion(2, 0, 0)


def test_never_routed_experts_score_zero():
    model = tiny_model("mixtral")
    stats = collect_statistics(model, [random_batch(batch=1, seq_len=2)], progress=False)
    unrouted = stats.count == 0
    assert unrouted.any()  # 2 tokens x top-2 cannot reach all 8 experts
    for c in criterion_grid():
        assert (expert_scores(stats, c)[unrouted] == 0).all()
    assert (mone_scores(stats)[unrouted] == 0).all()


def test_mone_is_routing_score_times_output_spread(family, batch):
    model = tiny_model(family, dtype=torch.float64)
    model.set_experts_implementation("eager")
    stats = collect_statistics(model, [batch], progress=False)
    layer = find_moe_layers(model)[0]
    outputs = {e: [] for e in range(layer.num_experts)}
    captured = []
    h = layer.experts.register_forward_pre_hook(lambda m, a: captured.append(a))
    with torch.no_grad():
        model(**batch)
    h.remove()
    hidden, idx, weights = captured[0]
    mask = batch["attention_mask"].reshape(-1).bool()
    gates = {e: 0.0 for e in range(layer.num_experts)}
    for t in range(hidden.shape[0]):
        if mask[t]:
            for s, e in enumerate(idx[t].tolist()):
                outputs[e].append(reference_expert_output(layer.experts, e, hidden[t]).detach().double())
                gates[e] += float(weights[t, s])
    scores = mone_scores(stats)[0]
    for e, fs in outputs.items():
        if len(fs) < 2:  # no unbiased variance from fewer than two outputs
            assert scores[e] == 0
            continue
        f = torch.stack(fs)
        spread = (f - f.mean(0)).pow(2).sum(-1).sum().div(len(fs) - 1).sqrt()  # sqrt of the unbiased trace
        want = torch.tensor(gates[e] / mask.sum().item(), dtype=torch.float64) * spread
        torch.testing.assert_close(scores[e], want, rtol=1e-5, atol=1e-9)


# ---------------------------------------------------------------- identity and integrity (issue 11)


def _collect(model):
    return collect_statistics(model, [random_batch(batch=2, seq_len=8, seed=3)], progress=False, calibration="c")


def test_statistics_of_another_model_of_the_same_shape_are_refused_naming_both():
    from moepaper.statistics import model_identity

    model = tiny_model("qwen3_moe")
    stats = _collect(model)
    assert {k: stats.metadata[k] for k in ("model_class", "config_sha256", "router_sha256", "experts_sha256")} == model_identity(model)
    stats.check_model(model)
    stats.check_model(tiny_model("qwen3_moe", dtype=torch.bfloat16))  # the same weights loaded in bf16: the same model
    other_weights = tiny_model("qwen3_moe", seed=1)  # same family, same shape, other routers
    with pytest.raises(StatisticsMismatchError, match="router_sha256: statistics '[0-9a-f]{64}', model '[0-9a-f]{64}'"):
        stats.check_model(other_weights)
    other_config = tiny_model("qwen3_moe", rms_norm_eps=1e-3)  # same routers, another model
    with pytest.raises(StatisticsMismatchError, match="config_sha256"):
        stats.check_model(other_config)
    # another family of the same shape: same layers and counts, another class
    olmoe = tiny_model("olmoe")
    stats.metadata["model_class"] = "OlmoeForCausalLM"
    try:
        with pytest.raises(StatisticsMismatchError, match="model_class: statistics 'OlmoeForCausalLM', model 'Qwen3MoeForCausalLM'"):
            stats.check_model(model)
    finally:
        stats.metadata["model_class"] = type(model).__name__
    del olmoe


def test_statistics_of_a_model_with_other_expert_weights_are_refused_naming_both():
    """Issue 22: same routers and config, expert weights x3: refused for criteria and novices; the same
    weights loaded in bf16 are the same model; a file written before the experts fingerprint is checked
    on the rest of its identity."""
    from moepaper.architecture import find_moe_layers
    from moepaper.criteria import expert_scores
    from moepaper.pruning import replace_with_novices, select_experts
    from moepaper.statistics import model_identity

    model = tiny_model("qwen3_moe")
    stats = _collect(model)
    other = tiny_model("qwen3_moe")
    with torch.no_grad():
        for layer in find_moe_layers(other):
            layer.experts.gate_up_proj.mul_(3)
            layer.experts.down_proj.mul_(3)
    both = r"experts_sha256: statistics '[0-9a-f]{64}', model '[0-9a-f]{64}'"
    with pytest.raises(StatisticsMismatchError, match=both):
        stats.check_model(other)
    assert stats.metadata["experts_sha256"] == model_identity(model)["experts_sha256"]
    same = {k: v for k, v in model_identity(other).items() if k != "experts_sha256"}
    assert same == {k: stats.metadata[k] for k in same}  # the rest of the identity cannot tell them apart
    with pytest.raises(StatisticsMismatchError, match=both):
        expert_scores(stats, "aimer", model=other)
    keep = select_experts(expert_scores(stats, "man"), ratio=0.25, model=other)
    with pytest.raises(StatisticsMismatchError, match=both):
        with replace_with_novices(other, keep, stats):
            pass
    stats.check_model(tiny_model("qwen3_moe", dtype=torch.bfloat16))
    older = ExpertStatistics(stats.layers, stats.num_experts, stats.top_k, stats.moments, stats.output_sum, stats.tokens,
                             {k: v for k, v in stats.metadata.items() if k != "experts_sha256"})
    older.check_model(other)


def test_statistics_file_without_identity_or_checksum_still_loads(tmp_path):
    import json

    from safetensors.torch import save_file

    model = tiny_model("qwen3_moe")
    stats = _collect(model)
    meta = {k: v for k, v in stats.metadata.items() if k not in ("config_sha256", "router_sha256", "experts_sha256")}
    meta.update(layers=stats.layers, num_experts=stats.num_experts, top_k=stats.top_k)
    path = tmp_path / "old.safetensors"  # as moepaper wrote them before issue 11
    save_file({"moments": stats.moments, "output_sum": stats.output_sum, "tokens": stats.tokens}, str(path),
              metadata={"moepaper": json.dumps(meta)})
    old = ExpertStatistics.load(path)
    assert old.checksum == stats.checksum and "config_sha256" not in old.metadata
    old.check_model(tiny_model("qwen3_moe", seed=1))  # no identity recorded: only layers and counts are checked


def test_statistics_file_integrity_is_checked(tmp_path):
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    from moepaper.statistics import StatisticsFileError

    stats = _collect(tiny_model("qwen3_moe"))
    path = stats.save(tmp_path / "s.safetensors")
    with safe_open(str(path), framework="pt") as f:
        header = json.loads(f.metadata()["moepaper"])
    assert header["checksum"] == stats.checksum
    # one flipped bit in the tensor data
    data = bytearray(path.read_bytes())
    data[-9] ^= 0x10
    flipped = tmp_path / "flipped.safetensors"
    flipped.write_bytes(bytes(data))
    with pytest.raises(StatisticsFileError, match="corrupt"):
        ExpertStatistics.load(flipped)
    # a header whose expert counts or top-k disagree with the tensors
    tensors = {"moments": stats.moments, "output_sum": stats.output_sum, "tokens": stats.tokens}
    for change, message in (({"num_experts": [8, 8, 8, 8]}, "entries for"), ({"layers": [0]}, "entries for"),
                            ({"top_k": [1, 1]}, "routed pairs"), ({"num_experts": [6, 8]}, "beyond its 6")):
        bad = tmp_path / "bad.safetensors"
        meta = {**header, **change}
        meta.pop("checksum")
        save_file(tensors, str(bad), metadata={"moepaper": json.dumps(meta)})
        with pytest.raises(StatisticsFileError, match=message):
            ExpertStatistics.load(bad)
