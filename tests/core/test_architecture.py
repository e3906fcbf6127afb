"""find_moe_layers against each tiny model's config."""

import pytest
import torch
from torch import nn

from moepaper import UnsupportedModelError, find_moe_layers
from moepaper.architecture import expert_count_keys
from moepaper.testbed.tiny import tiny_config


def expected_moe_layers(config) -> list[int]:
    """Which decoder layers are MoE, read from the config fields each family documents."""
    n = config.num_hidden_layers
    mt = config.model_type
    if mt in ("deepseek_v2", "deepseek_v3", "glm4_moe"):
        return list(range(config.first_k_dense_replace, n))
    if mt == "ernie4_5_moe":
        return [
            i
            for i in range(n)
            if (i + 1) % config.moe_layer_interval == 0
            and config.moe_layer_start_index <= i <= (config.moe_layer_end_index if config.moe_layer_end_index >= 0 else n)
        ]
    if mt in ("qwen2_moe", "qwen3_moe"):
        return [i for i in range(n) if i not in config.mlp_only_layers and (i + 1) % config.decoder_sparse_step == 0]
    return list(range(n))


def expected_shared(config) -> bool:
    return config.model_type in ("deepseek_v2", "deepseek_v3", "glm4_moe", "ernie4_5_moe", "qwen2_moe")


def test_layers_match_config(model):
    config = model.config
    layers = find_moe_layers(model)
    assert [l.layer_index for l in layers] == expected_moe_layers(config)
    assert len(layers) >= 1
    counts = {getattr(config, k) for k in expert_count_keys(config)}
    assert counts == {8}
    for layer in layers:
        assert layer.num_experts == 8
        assert layer.top_k == config.num_experts_per_tok == 2
        assert bool(layer.shared_experts) == expected_shared(config)
        # the block found is the decoder layer's own MoE module
        decoder = model.model.layers[layer.layer_index]
        assert layer.block in list(decoder.children())
        assert layer.router.weight.shape == (8, config.hidden_size)


def test_dense_layers_are_not_moe(model):
    moe = {l.layer_index for l in find_moe_layers(model)}
    for i, decoder in enumerate(model.model.layers):
        holds_experts = any(hasattr(m, "gate_up_proj") for m in decoder.modules())
        assert holds_experts == (i in moe)


def test_per_expert_tensors_all_have_expert_dim(model):
    for layer in find_moe_layers(model):
        tensors = layer.per_expert_tensors
        assert {t.attr for t in layer.expert_tensors} >= {"gate_up_proj", "down_proj"}
        assert any(t.attr == "weight" and t.module is layer.router for t in layer.router_tensors)
        for t in tensors:
            assert t.tensor.shape[t.dim] == layer.num_experts, t.path
        # no shared-expert tensor is ever in the list
        shared_params = {id(p) for m in layer.shared_experts for p in m.parameters()}
        assert not any(id(t.tensor) in shared_params for t in tensors)


def test_layouts_and_router_buffers(model):
    layer = find_moe_layers(model)[0]
    mt = model.config.model_type
    paths = {t.path.split(".", 4)[-1] for t in layer.router_tensors}
    if mt == "gpt_oss":
        assert layer.layout == "transposed_interleaved" and layer.has_bias
        assert layer.experts.gate_up_proj.shape == (8, model.config.hidden_size, 2 * model.config.intermediate_size)
        assert {t.attr for t in layer.expert_tensors} == {"gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias"}
        assert any(p.endswith("router.bias") for p in paths)
    else:
        assert layer.layout == "standard" and not layer.has_bias
        e = layer.experts
        assert e.gate_up_proj.shape[1] == 2 * e.down_proj.shape[2]
    if mt in ("deepseek_v3", "glm4_moe"):
        assert any(p.endswith("gate.e_score_correction_bias") for p in paths)
        assert layer.num_groups == model.config.n_group == 2
    if mt == "ernie4_5_moe":
        statics = [t for t in layer.router_tensors if "moe_statics" in t.path]
        assert len(statics) == 1 and statics[0].dim == 1


def test_qwen3_expert_count_key_is_the_written_one():
    config = tiny_config("qwen3_moe")
    keys = expert_count_keys(config)
    assert keys[0] == "num_local_experts" and "num_experts" in keys
    assert "num_local_experts" in config.to_dict()


class _Dense(nn.Module):
    def __init__(self):
        super().__init__()
        self.config = None
        self.model = nn.Module()
        self.model.layers = nn.ModuleList([nn.Sequential(nn.Linear(4, 4))])


def test_non_moe_model_is_refused_with_names():
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2
    )
    dense = transformers.LlamaForCausalLM(config)
    with pytest.raises(UnsupportedModelError, match="LlamaForCausalLM.*not a supported MoE.*OlmoeForCausalLM"):
        find_moe_layers(dense)


def test_model_without_decoder_layers_is_refused():
    with pytest.raises(UnsupportedModelError, match="Linear: no decoder layers"):
        find_moe_layers(nn.Linear(2, 2))


def test_legacy_modulelist_experts_named_in_error():
    m = _Dense()
    block = nn.Module()
    block.experts = nn.ModuleList([nn.Linear(4, 4) for _ in range(3)])
    block.gate = nn.Linear(4, 3)
    m.model.layers = nn.ModuleList([nn.Sequential()])
    m.model.layers[0].add_module("mlp", block)
    with pytest.raises(UnsupportedModelError, match="ModuleList of per-expert MLPs"):
        find_moe_layers(m)


def test_forward_is_finite(model, batch):
    with torch.no_grad():
        logits = model(**batch).logits
    assert torch.isfinite(logits).all()
