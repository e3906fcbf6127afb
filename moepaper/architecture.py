"""Find the MoE layers of a transformers (v5) model, whatever its family.

Detection is structural, not a list of class names: an MoE block is a module that holds
an experts module dispatched through transformers' experts-implementation mechanism
(`transformers.integrations.moe.use_experts_implementation`, which gives the module
`has_gate`, `is_transposed`, `is_concatenated` and `_apply_gate`) next to a router
(`gate` or `router`) with one weight row per expert. Dense decoder layers
(DeepSeek's `first_k_dense_replace`, ERNIE's `moe_layer_start_index`, Qwen's
`mlp_only_layers` / `decoder_sparse_step`) hold no such block and are skipped.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

# Families the tests build and check (transformers model_type -> class).
SUPPORTED_FAMILIES = {
    "olmoe": "OlmoeForCausalLM",
    "deepseek_v2": "DeepseekV2ForCausalLM",
    "ernie4_5_moe": "Ernie4_5_MoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "deepseek_v3": "DeepseekV3ForCausalLM",
    "gpt_oss": "GptOssForCausalLM",
    "phimoe": "PhimoeForCausalLM",
    "granitemoe": "GraniteMoeForCausalLM",
    "glm4_moe": "Glm4MoeForCausalLM",
}

# Config keys that hold the routed-expert count, in transformers v5 naming.
EXPERT_COUNT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")

# How each family turns router logits into the probability its top-k is taken from:
# used for gate="router_probability" (statistics) only. Families not listed: softmax.
ROUTER_SCORE_FUNCTION = {"deepseek_v3": "sigmoid", "glm4_moe": "sigmoid"}

_ROUTER_NAMES = ("gate", "router")


class UnsupportedModelError(ValueError):
    """The model is not an MoE, or its MoE layout is not one moepaper handles."""


@dataclass(frozen=True)
class ExpertTensor:
    """One per-expert tensor that pruning slices: `getattr(module, attr)` along `dim`."""

    module: nn.Module
    attr: str
    dim: int
    path: str  # dotted name inside the model, for messages and provenance

    @property
    def tensor(self) -> torch.Tensor:
        return getattr(self.module, self.attr)


@dataclass
class MoELayer:
    """One MoE block of a decoder layer.

    Fields
    ------
    layer_index: index of the decoder layer that holds the block.
    name: dotted module path of the block (e.g. ``model.layers.3.mlp``).
    block: the MoE block module (router + experts [+ shared experts]).
    router: the router module; its ``weight`` is ``[num_experts, hidden]``.
    experts: the fused experts module, called as ``experts(hidden, top_k_index, top_k_weights)``.
    num_experts: routed experts in this layer.
    top_k: experts selected per token.
    layout: ``"standard"`` (``gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``, gate rows then
        up rows), ``"transposed"`` (``[E, H, 2I]`` / ``[E, I, H]``) or ``"transposed_interleaved"``
        (gpt-oss: gate and up in even / odd columns), with ``has_bias`` for per-expert biases.
    has_bias: the experts carry ``gate_up_proj_bias`` / ``down_proj_bias``.
    expert_tensors: every tensor of the experts module with one slice per expert (dim 0).
    router_tensors: the router's per-expert tensors: weight rows, bias, ``e_score_correction_bias``,
        ERNIE's ``moe_statics.e_score_correction_bias`` (``[1, E]``, sliced on dim 1).
    block_tensors: per-expert tensors held by the block itself, outside router and experts.
    shared_experts: shared-expert modules (always active, never pruned).
    count_attributes: ``(module, attribute)`` pairs that store the expert count.
    num_groups: groups the router's top-k is limited by (DeepSeek-V2 ``group_limited_greedy``,
        DeepSeek-V3, GLM-4-MoE); 1 when selection ignores groups (DeepSeek-V2 ``greedy`` too).
    topk_group: groups a token's experts may come from (1 when ungrouped).
    """

    layer_index: int
    name: str
    block: nn.Module
    router: nn.Module
    experts: nn.Module
    num_experts: int
    top_k: int
    layout: str
    has_bias: bool
    expert_tensors: list[ExpertTensor] = field(default_factory=list)
    router_tensors: list[ExpertTensor] = field(default_factory=list)
    block_tensors: list[ExpertTensor] = field(default_factory=list)
    shared_experts: list[nn.Module] = field(default_factory=list)
    count_attributes: list[tuple[nn.Module, str]] = field(default_factory=list)
    num_groups: int = 1
    topk_group: int = 1

    @property
    def per_expert_tensors(self) -> list[ExpertTensor]:
        """Everything pruning must slice, experts first."""
        return self.expert_tensors + self.router_tensors + self.block_tensors

    def __repr__(self) -> str:  # short: the default dataclass repr prints whole modules
        shared = f", shared={len(self.shared_experts)}" if self.shared_experts else ""
        return (
            f"MoELayer(layer={self.layer_index}, name={self.name!r}, experts={self.num_experts}, "
            f"top_k={self.top_k}, layout={self.layout!r}{shared})"
        )


def is_experts_module(module: nn.Module) -> bool:
    """True for a fused experts module dispatched through transformers' experts implementations."""
    return all(hasattr(module, a) for a in ("has_gate", "is_transposed", "is_concatenated", "_apply_gate")) and (
        hasattr(module, "gate_up_proj") or hasattr(module, "up_proj")
    )


def expert_count_keys(config) -> list[str]:
    """The config keys that hold the routed-expert count, canonical key first.

    transformers v5 configs alias keys through ``attribute_map`` (Qwen3-MoE maps
    ``num_experts`` onto ``num_local_experts``); the canonical key is the one
    ``config.to_dict()`` writes.
    """
    written = config.to_dict()
    keys = [k for k in EXPERT_COUNT_KEYS if k in written and written[k] is not None]
    aliases = [k for k, v in getattr(config, "attribute_map", {}).items() if v in keys and k in EXPERT_COUNT_KEYS]
    return keys + [a for a in aliases if a not in keys]


def _decoder_layers(model: nn.Module) -> list[nn.Module] | None:
    for path in ("model.layers", "model.decoder.layers", "transformer.h", "layers"):
        obj = model
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            continue
        if isinstance(obj, nn.ModuleList):
            return list(obj)
    return None


def _supported_message() -> str:
    return "supported families: " + ", ".join(f"{v} ({k})" for k, v in SUPPORTED_FAMILIES.items())


def _layout(experts: nn.Module) -> str:
    if not experts.is_transposed:
        if not experts.is_concatenated:
            raise UnsupportedModelError(
                f"{type(experts).__name__}: interleaved gate/up without transposed weights is not a known layout"
            )
        return "standard"
    return "transposed" if experts.is_concatenated else "transposed_interleaved"


def _per_expert(module: nn.Module, prefix: str, num_experts: int, *, router: bool) -> list[ExpertTensor]:
    """Per-expert parameters and buffers of `module`, recursively (ERNIE keeps a bias in a child)."""
    found = []
    for sub_name, sub in module.named_modules():
        for attr, tensor in list(sub.named_parameters(recurse=False)) + list(sub.named_buffers(recurse=False)):
            path = ".".join(p for p in (prefix, sub_name, attr) if p)
            if tensor.dim() == 1 and tensor.shape[0] == num_experts:
                found.append(ExpertTensor(sub, attr, 0, path))
            elif tensor.dim() == 2 and tensor.shape[0] == 1 and tensor.shape[1] == num_experts:
                found.append(ExpertTensor(sub, attr, 1, path))  # ERNIE moe_statics [1, E]
            elif router and tensor.dim() == 2 and tensor.shape[0] == num_experts:
                found.append(ExpertTensor(sub, attr, 0, path))  # router weight rows
    return found


def _block_layer(
    model: nn.Module, layer_index: int, block_name: str, block: nn.Module, config
) -> MoELayer | None:
    experts_name, experts = next(
        ((n, m) for n, m in block.named_children() if is_experts_module(m)), (None, None)
    )
    if experts is None:
        return None
    router_name = next((n for n in _ROUTER_NAMES if isinstance(getattr(block, n, None), nn.Module)), None)
    if router_name is None:
        raise UnsupportedModelError(
            f"{type(model).__name__}: MoE block {block_name} has an experts module but no router "
            f"named {' or '.join(_ROUTER_NAMES)}; {_supported_message()}"
        )
    router = getattr(block, router_name)
    num_experts = int(experts.num_experts)
    weight = getattr(router, "weight", None)
    if weight is None or weight.dim() != 2 or weight.shape[0] != num_experts:
        raise UnsupportedModelError(
            f"{type(model).__name__}: router {block_name}.{router_name} has no weight of shape "
            f"[{num_experts}, hidden]; {_supported_message()}"
        )
    top_k = getattr(router, "top_k", None) or getattr(block, "top_k", None) or getattr(config, "num_experts_per_tok")
    expert_tensors = [
        ExpertTensor(experts, n, 0, f"{block_name}.{experts_name}.{n}")
        for n, p in list(experts.named_parameters(recurse=False)) + list(experts.named_buffers(recurse=False))
        if p.dim() >= 1 and p.shape[0] == num_experts
    ]
    router_tensors = _per_expert(router, f"{block_name}.{router_name}", num_experts, router=True)
    shared = [m for n, m in block.named_children() if n.startswith("shared_expert") and n != "shared_expert_gate"]
    skip = {experts_name, router_name} | {n for n, _ in block.named_children() if n.startswith("shared_expert")}
    block_tensors = []
    for attr, tensor in list(block.named_parameters(recurse=False)) + list(block.named_buffers(recurse=False)):
        if tensor.dim() == 1 and tensor.shape[0] == num_experts:
            block_tensors.append(ExpertTensor(block, attr, 0, f"{block_name}.{attr}"))
    for child_name, child in block.named_children():
        if child_name not in skip:
            block_tensors += _per_expert(child, f"{block_name}.{child_name}", num_experts, router=False)
    count_attributes = [
        (m, "num_experts") for m in (experts, router, block) if getattr(m, "num_experts", None) == num_experts
    ]
    return MoELayer(
        layer_index=layer_index,
        name=block_name,
        block=block,
        router=router,
        experts=experts,
        num_experts=num_experts,
        top_k=int(top_k),
        layout=_layout(experts),
        has_bias=bool(experts.has_bias),
        expert_tensors=expert_tensors,
        router_tensors=router_tensors,
        block_tensors=block_tensors,
        shared_experts=shared,
        count_attributes=count_attributes,
        num_groups=_routing_groups(router),
        topk_group=int(getattr(router, "topk_group", None) or 1),
    )


def _routing_groups(router: nn.Module) -> int:
    if getattr(router, "topk_method", None) == "greedy":  # DeepSeek-V2 greedy ignores n_group
        return 1
    return max(1, int(getattr(router, "num_group", None) or 1))


_CACHE = "_moepaper_moe_layers"


def find_moe_layers(model: nn.Module) -> list[MoELayer]:
    """Every MoE block of `model`, in decoder-layer order.

    Found once per model: the list is kept on the model and returned again while its
    blocks, experts modules and expert counts are the ones it describes (`prune_experts`
    updates it in place); a model changed in any other way is searched again.

    Raises `UnsupportedModelError` naming the model class and what was not found when
    the model has no decoder layers, no MoE block, or an MoE block of unknown layout.
    """
    cached = model.__dict__.get(_CACHE)
    if cached is not None and _still_valid(model, *cached):
        return list(cached[0])
    found = _search(model)
    model.__dict__[_CACHE] = (found, _signature(_decoder_layers(model) or [], found))
    return list(found)


def _signature(decoder: list[nn.Module], layers: list[MoELayer]) -> tuple:
    if any(l.layer_index >= len(decoder) for l in layers):
        return ()
    return (len(decoder),) + tuple((id(decoder[l.layer_index]), id(l.block), id(l.experts), id(l.router)) for l in layers)


def _still_valid(model: nn.Module, layers: list[MoELayer], signature: tuple) -> bool:
    """The same modules in the same places, each block still inside its decoder layer, counts agreeing."""
    decoder = _decoder_layers(model) or []
    if _signature(decoder, layers) != signature:
        return False
    return all(
        any(child is layer.block for child in decoder[layer.layer_index].children())
        and int(layer.experts.num_experts) == layer.num_experts
        and layer.router.weight.shape[0] == layer.num_experts
        for layer in layers
    )


def _search(model: nn.Module) -> list[MoELayer]:
    name = type(model).__name__
    layers = _decoder_layers(model)
    if layers is None:
        raise UnsupportedModelError(f"{name}: no decoder layers found (looked for model.layers); {_supported_message()}")
    prefix = {id(m): n for n, m in model.named_modules()}
    found = []
    for index, layer in enumerate(layers):
        blocks = [(n, m) for n, m in layer.named_children() if any(is_experts_module(c) for c in m.children())]
        for block_name, block in blocks:
            moe = _block_layer(model, index, f"{prefix[id(layer)]}.{block_name}", block, model.config)
            if moe is not None:
                found.append(moe)
    if not found:
        legacy = any(isinstance(m, nn.ModuleList) and "expert" in n.split(".")[-1] for n, m in model.named_modules())
        what = (
            "experts stored as a ModuleList of per-expert MLPs (a pre-v5 or remote-code layout)"
            if legacy
            else "no fused experts module (transformers' use_experts_implementation) in any decoder layer"
        )
        raise UnsupportedModelError(f"{name} is not a supported MoE model: {what}; {_supported_message()}")
    return found
