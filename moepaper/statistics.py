"""One calibration pass that collects every expert statistic the formulation needs.

Each MoE layer is observed at its experts module's inputs: the hidden states, the top-k
indices and the top-k weights the model actually uses (so top-k renormalisation, routed
scaling, bias-corrected and group-limited selection are already applied). While the
model runs, the experts module's forward is swapped for a recording one that computes
each expert's un-gated output f only for the tokens routed to it, through the same
grouped matmuls as transformers' default `grouped_mm` implementation, accumulates the
moments, and returns the same weighted sum. No expert is run on a token it was not
routed to and nothing is recomputed afterwards.

Accumulated in float64, per MoE layer l and expert j:
    count[l, j]            N_j, tokens routed to j
    moments[l, a, b, j]    sum over routed tokens of g^a * ||f||^b, a, b in {0, 1, 2}
    output_sum[l, j, :]    sum of f (for the routed-output variance of MoNE)
    tokens[l]              non-padding tokens seen by the layer
"""

from __future__ import annotations

import json
import time
import types
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .architecture import ROUTER_SCORE_FUNCTION, MoELayer, find_moe_layers
from .project import atomic_write, check_writable
from .provenance import package_version, tensors_sha256

GATES = ("routing_weight", "router_probability")
_POWERS = (0, 1, 2)


class NonFiniteActivationError(FloatingPointError):
    """An expert produced NaN or Inf on a calibration token."""


class StatisticsMismatchError(ValueError):
    """Statistics do not belong to the model (or to each other)."""


class StatisticsFileError(ValueError):
    """A statistics file whose tensors disagree with its header or its recorded checksum."""


# Config entries that say how a model was loaded or run, not what it is.
_RUNTIME_CONFIG_KEYS = {"dtype", "torch_dtype", "transformers_version", "use_cache", "output_router_logits",
                        "output_attentions", "output_hidden_states", "return_dict", "architectures"}
IDENTITY_KEYS = ("model_class", "config_sha256", "router_sha256", "experts_sha256")
EXPERT_SAMPLES = 16  # values sampled per expert and tensor for the experts fingerprint


def experts_fingerprint(model: nn.Module, samples: int = EXPERT_SAMPLES) -> str | None:
    """sha256 of `samples` values of every expert of every per-expert tensor (evenly spaced through
    the expert's elements, first and last included), rounded to bfloat16 as the router fingerprint:
    cheap at any size (no full pass over the weights), the same for a bf16 and an fp32 load, and
    different for other expert weights. None when an expert tensor is not materialised (meta device)."""
    sampled = {}
    for layer in find_moe_layers(model):
        for t in layer.expert_tensors:
            tensor = t.tensor
            if tensor.device.type == "meta":
                return None
            flat = tensor.detach().movedim(t.dim, 0).reshape(tensor.shape[t.dim], -1)
            index = torch.linspace(0, flat.shape[1] - 1, min(samples, flat.shape[1])).round().long()
            sampled[t.path] = flat[:, index.to(flat.device)].to(torch.bfloat16)
    return tensors_sha256(sampled)


def model_identity(model: nn.Module) -> dict:
    """What identifies a model for its statistics: class, a hash of its config (without entries
    that only say how it was loaded: dtype, paths, caching), a sha256 of its routers' weights
    rounded to bfloat16, so a bf16 and an fp32 load of one checkpoint agree, and
    `experts_fingerprint` (sampled expert weights, rounded the same way). A fingerprint is None
    when a weight is not materialised (meta device)."""
    import hashlib

    aliases = set(getattr(model.config, "attribute_map", {}))  # e.g. Qwen3-MoE's num_experts, written beside its target by save_pruned
    config = {k: v for k, v in model.config.to_dict().items()
              if not k.startswith("_") and k not in _RUNTIME_CONFIG_KEYS and k not in aliases}
    config_sha = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()
    routers = {t.path: t.tensor for layer in find_moe_layers(model) for t in layer.router_tensors}
    materialised = all(t.device.type != "meta" for t in routers.values())
    router_sha = tensors_sha256({k: t.detach().to(torch.bfloat16) for k, t in routers.items()}) if materialised else None
    return {"model_class": type(model).__name__, "config_sha256": config_sha, "router_sha256": router_sha,
            "experts_sha256": experts_fingerprint(model)}


@dataclass
class ExpertStatistics:
    """Expert statistics of one calibration pass (or of several, merged).

    Tensors are indexed [MoE layer position, expert]; `layers` maps positions to
    decoder-layer indices. Layers with fewer experts than the widest are zero-padded
    (`num_experts` holds each layer's real count). `top_k`, `num_groups` and `topk_group`
    are each layer's routing facts, so scores and selections made from these statistics
    need no model.
    """

    layers: list[int]
    num_experts: list[int]
    top_k: list[int]
    moments: torch.Tensor  # (L, 3, 3, E) float64: moments[l, a, b, j] = sum g^a ||f||^b
    output_sum: torch.Tensor  # (L, E, H) float64
    tokens: torch.Tensor  # (L,) float64
    metadata: dict = field(default_factory=dict)
    num_groups: list[int] | None = None  # router groups per layer (group-limited routing); None: 1 each
    topk_group: list[int] | None = None  # groups a token may use per layer; None: 1 each
    _checksum: tuple | None = field(default=None, init=False, repr=False, compare=False)  # (tensor versions, sha256)

    def __post_init__(self):
        self.num_groups = [1] * len(self.layers) if self.num_groups is None else [int(g) for g in self.num_groups]
        self.topk_group = [1] * len(self.layers) if self.topk_group is None else [int(g) for g in self.topk_group]

    def __repr__(self) -> str:
        meta = self.metadata
        experts = sorted(set(self.num_experts))
        return (
            f"ExpertStatistics(model={meta.get('model_name') or meta.get('model_class')!r}, "
            f"layers={len(self.layers)}, experts={experts[0] if len(experts) == 1 else experts}, "
            f"top_k={sorted(set(self.top_k))[0] if len(set(self.top_k)) == 1 else self.top_k}, "
            f"tokens={int(meta.get('token_count', 0))}, gate={meta.get('gate')!r})"
        )

    @property
    def checksum(self) -> str:
        """sha256 of the tensors: what identifies these statistics in scores, selections and results.

        Computed once and kept while the same tensors are unchanged (every `expert_scores` call
        records it, and `output_sum` is [L, E, H] float64: about 100 MB for Qwen3-30B-A3B)."""
        tensors = {"moments": self.moments, "output_sum": self.output_sum, "tokens": self.tokens}
        versions = tuple((id(t), t._version) for t in tensors.values())
        if self._checksum is None or self._checksum[0] != versions:
            self._checksum = (versions, tensors_sha256(tensors))
        return self._checksum[1]

    def identity(self) -> dict:
        """A short record of these statistics for provenance (model, calibration, gate, tokens, checksum)."""
        meta = self.metadata
        return {
            "model_name": meta.get("model_name"),
            "model_class": meta.get("model_class"),
            "calibration": meta.get("calibration"),
            "gate": meta.get("gate"),
            "token_count": meta.get("token_count"),
            "checksum": self.checksum,
        }

    @property
    def count(self) -> torch.Tensor:
        """N_j: tokens routed to each expert, (L, E)."""
        return self.moments[:, 0, 0]

    def moment(self, alpha: int, beta: int) -> torch.Tensor:
        """sum over routed tokens of g^alpha * ||f||^beta, (L, E), for alpha, beta in {0, 1, 2}."""
        if alpha not in _POWERS or beta not in _POWERS:
            raise ValueError(f"moment({alpha}, {beta}): alpha and beta must be 0, 1 or 2")
        return self.moments[:, alpha, beta]

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    # --- checks -------------------------------------------------------------------------
    def check_model(self, model: nn.Module) -> None:
        """Raise StatisticsMismatchError unless these statistics fit `model`'s MoE layers and
        were collected on this model: class, config hash, router and experts fingerprints
        (`model_identity`) must match where the statistics record them (files written before
        moepaper recorded them carry none, and only layers and expert counts are checked; files
        written before the experts fingerprint are checked on the others)."""
        moe = find_moe_layers(model)
        layers = [l.layer_index for l in moe]
        experts = [l.num_experts for l in moe]
        name = type(model).__name__
        if layers != self.layers:
            raise StatisticsMismatchError(
                f"statistics cover MoE layers {self.layers} but {name} has MoE layers {layers} "
                f"(statistics of {self.metadata.get('model_class')} {self.metadata.get('model_name')!r})"
            )
        if experts != self.num_experts:
            raise StatisticsMismatchError(
                f"statistics have {self.num_experts} experts per layer but {name} has {experts} "
                f"(statistics of {self.metadata.get('model_name')!r}; was the model already pruned?)"
            )
        recorded = {k: self.metadata.get(k) for k in IDENTITY_KEYS if self.metadata.get(k) is not None}
        if recorded:
            actual = model_identity(model)
            differ = {k: (v, actual[k]) for k, v in recorded.items() if actual[k] is not None and actual[k] != v}
            if differ:
                what = "; ".join(f"{k}: statistics {a!r}, model {b!r}" for k, (a, b) in differ.items())
                raise StatisticsMismatchError(
                    f"statistics of {self.metadata.get('model_class')} {self.metadata.get('model_name')!r} were collected "
                    f"on another model than this {name} ({what})"
                )

    def check_tensors(self, where: str = "statistics") -> None:
        """Raise StatisticsFileError unless the tensors fit the layers, expert counts and top-k:
        shapes, zero padding beyond each layer's experts, and top_k routed pairs per token."""
        L, E = len(self.layers), max(self.num_experts, default=0)
        for key in ("num_experts", "top_k", "num_groups", "topk_group"):
            if len(getattr(self, key)) != L:
                raise StatisticsFileError(f"{where}: {key} has {len(getattr(self, key))} entries for {L} layers {self.layers}")
        if tuple(self.moments.shape) != (L, 3, 3, E):
            raise StatisticsFileError(f"{where}: moments have shape {tuple(self.moments.shape)}, expected {(L, 3, 3, E)} "
                                      f"for layers {self.layers} with {self.num_experts} experts")
        if self.output_sum.dim() != 3 or tuple(self.output_sum.shape[:2]) != (L, E):
            raise StatisticsFileError(f"{where}: output_sum has shape {tuple(self.output_sum.shape)}, expected ({L}, {E}, hidden)")
        if tuple(self.tokens.shape) != (L,):
            raise StatisticsFileError(f"{where}: tokens has shape {tuple(self.tokens.shape)}, expected ({L},)")
        for l, (n, k) in enumerate(zip(self.num_experts, self.top_k)):
            if bool(self.moments[l, :, :, n:].any()) or bool(self.output_sum[l, n:].any()):
                raise StatisticsFileError(f"{where}: layer {self.layers[l]} has statistics for experts beyond its {n}")
            pairs, expected = float(self.count[l].sum()), float(self.tokens[l]) * k
            if abs(pairs - expected) > 1e-6 * max(1.0, expected):
                raise StatisticsFileError(f"{where}: layer {self.layers[l]} counts {pairs:.0f} routed pairs, but "
                                          f"{float(self.tokens[l]):.0f} tokens x top-{k} make {expected:.0f}")

    def _check_compatible(self, other: ExpertStatistics) -> None:
        for key in ("layers", "num_experts", "top_k", "num_groups", "topk_group"):
            if getattr(self, key) != getattr(other, key):
                raise StatisticsMismatchError(f"cannot merge statistics with different {key}: {getattr(self, key)} vs {getattr(other, key)}")
        for key in ("model_class", "gate", *IDENTITY_KEYS[1:]):
            if key in IDENTITY_KEYS[1:] and (self.metadata.get(key) is None or other.metadata.get(key) is None):
                continue  # a file written before moepaper recorded the model's identity
            if self.metadata.get(key) != other.metadata.get(key):
                raise StatisticsMismatchError(
                    f"cannot merge statistics with different {key}: {self.metadata.get(key)!r} vs {other.metadata.get(key)!r}"
                )
        if self.output_sum.shape != other.output_sum.shape:
            raise StatisticsMismatchError(f"hidden sizes differ: {tuple(self.output_sum.shape)} vs {tuple(other.output_sum.shape)}")

    # --- combining, saving ---------------------------------------------------------------
    def merge(self, other: ExpertStatistics) -> ExpertStatistics:
        """Statistics of the union of two disjoint calibration sets (sums add)."""
        self._check_compatible(other)
        meta = dict(self.metadata)
        meta["token_count"] = int(self.metadata.get("token_count", 0)) + int(other.metadata.get("token_count", 0))
        parts = [p for p in (self.metadata.get("calibration"), other.metadata.get("calibration")) if p]
        meta["calibration"] = " + ".join(dict.fromkeys(parts))
        return ExpertStatistics(
            layers=list(self.layers),
            num_experts=list(self.num_experts),
            top_k=list(self.top_k),
            moments=self.moments + other.moments.to(self.moments.device),
            output_sum=self.output_sum + other.output_sum.to(self.output_sum.device),
            tokens=self.tokens + other.tokens.to(self.tokens.device),
            metadata=meta,
            num_groups=list(self.num_groups),
            topk_group=list(self.topk_group),
        )

    @staticmethod
    def check_output(path: str | Path) -> Path:
        """Raise now (before a calibration pass) if `path`'s folder cannot be written."""
        check_writable(Path(path).parent)
        return Path(path)

    def save(self, path: str | Path) -> Path:
        """Write one safetensors file; the JSON metadata and the tensors' `checksum` live in its
        header. Atomic, through a uniquely named temporary file; mode 0o666 less the umask."""
        meta = dict(self.metadata, layers=self.layers, num_experts=self.num_experts, top_k=self.top_k,
                    num_groups=self.num_groups, topk_group=self.topk_group, checksum=self.checksum)
        tensors = {"moments": self.moments.contiguous(), "output_sum": self.output_sum.contiguous(), "tokens": self.tokens.contiguous()}
        return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata={"moepaper": json.dumps(meta, sort_keys=True)}))

    @classmethod
    def load(cls, path: str | Path) -> ExpertStatistics:
        """Read a file written by `save`; StatisticsFileError when its tensors do not match its
        header (shapes, counts) or its recorded checksum. Files written before moepaper
        recorded a checksum load with the header checks only."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"no statistics file at {path} (collect them with moepaper.collect_statistics or notebooks/01_collect_statistics.ipynb)")
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
        if "moepaper" not in header:
            raise StatisticsMismatchError(f"{path} is a safetensors file but not moepaper statistics (no 'moepaper' metadata)")
        meta = json.loads(header["moepaper"])
        recorded = meta.pop("checksum", None)
        tensors = load_file(str(path))
        missing = {"moments", "output_sum", "tokens"} - set(tensors)
        if missing:
            raise StatisticsFileError(f"{path}: no {sorted(missing)} tensor(s)")
        stats = cls(
            layers=meta.pop("layers"),
            num_experts=meta.pop("num_experts"),
            top_k=meta.pop("top_k"),
            moments=tensors["moments"],
            output_sum=tensors["output_sum"],
            tokens=tensors["tokens"],
            num_groups=meta.pop("num_groups", None),
            topk_group=meta.pop("topk_group", None),
            metadata=meta,
        )
        if recorded is not None and stats.checksum != recorded:
            raise StatisticsFileError(f"{path}: the tensors' sha256 {stats.checksum} differs from the {recorded} recorded "
                                      "when the file was written: the file is corrupt; collect the statistics again")
        stats.check_tensors(str(path))
        return stats


# --- the recording experts forward -------------------------------------------------------


def _linear(x, weight, offsets, bias, transposed):
    """transformers' grouped linear; float64 (unsupported by grouped_mm) takes its per-expert fallback."""
    from transformers.integrations.moe import _grouped_linear

    if weight.dtype != torch.float64:
        return _grouped_linear(x, weight, offsets, bias=bias, is_transposed=transposed)
    out = torch.ops.transformers.grouped_mm_fallback(x, weight if transposed else weight.transpose(-2, -1), offsets)
    return out if bias is None else out + bias


class _Recorder:
    """Running sums of one MoE layer, kept on the layer's device."""

    def __init__(self, layer: MoELayer, position: int, state: dict, gate: str, family: str):
        experts = layer.experts
        device = experts.down_proj.device
        hidden = experts.down_proj.shape[2] if experts.is_transposed else experts.down_proj.shape[1]
        self.layer = layer
        self.position = position
        self.state = state
        self.gate = gate
        self.score_function = ROUTER_SCORE_FUNCTION.get(family, "softmax")
        E = layer.num_experts
        self.moments = torch.zeros(9, E, dtype=torch.float64, device=device)
        self.output_sum = torch.zeros(E, hidden, dtype=torch.float64, device=device)
        self.tokens = torch.zeros((), dtype=torch.float64, device=device)
        self.nonfinite = torch.zeros(E, dtype=torch.float64, device=device)  # count of NaN/Inf outputs
        self.router_probs: torch.Tensor | None = None

    def router_hook(self, module, args, output):
        logits = output[0].reshape(-1, self.layer.num_experts).float()
        self.router_probs = logits.sigmoid() if self.score_function == "sigmoid" else logits.softmax(dim=-1)

    def forward(self, experts: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        # Same math as transformers.integrations.moe.grouped_mm_experts_forward, with f exposed.
        device = hidden_states.device
        num_top_k = top_k_index.size(-1)
        num_tokens, hidden_dim = hidden_states.shape
        sample_weights = top_k_weights.reshape(-1)  # (S,) S = T * k
        expert_ids = top_k_index.reshape(-1)  # (S,)
        expert_ids_g, perm = torch.sort(expert_ids)
        token_g = perm // num_top_k  # (S,) token of each sorted pair
        selected = hidden_states[token_g]  # (S, H)
        sample_weights_g = sample_weights[perm]
        histc_input = expert_ids_g.float() if device.type in ("cpu", "mps") else expert_ids_g.int()
        per_expert = torch.histc(histc_input, bins=experts.num_experts, min=0, max=experts.num_experts - 1)
        offsets = torch.cumsum(per_expert, dim=0, dtype=torch.int32)
        if experts.has_gate:
            weights, biases = experts.gate_up_proj, (experts.gate_up_proj_bias[expert_ids_g] if experts.has_bias else None)
        else:
            weights, biases = experts.up_proj, (experts.up_proj_bias[expert_ids_g] if experts.has_bias else None)
        proj = _linear(selected, weights, offsets, biases, experts.is_transposed)
        proj = experts._apply_gate(proj) if experts.has_gate else experts.act_fn(proj)
        down_bias = experts.down_proj_bias[expert_ids_g] if experts.has_bias else None
        f = _linear(proj, experts.down_proj, offsets, down_bias, experts.is_transposed)
        if experts.has_post_expert_norm:
            f = experts.post_expert_norm(f)  # (S, H): un-gated expert outputs
        self._accumulate(f, expert_ids_g, token_g, sample_weights_g, num_tokens)
        weighted = f * sample_weights_g.unsqueeze(-1)
        inv_perm = torch.empty_like(perm)
        inv_perm[perm] = torch.arange(perm.size(0), device=device)
        out = weighted[inv_perm].view(num_tokens, num_top_k, hidden_dim).sum(dim=1)
        return out.to(hidden_states.dtype)

    @torch.no_grad()
    def _accumulate(self, f, expert_ids, token, routing_weight, num_tokens):
        valid_tokens = self.state.get("valid")
        if valid_tokens is None or valid_tokens.numel() != num_tokens:
            valid_tokens = torch.ones(num_tokens, dtype=torch.bool, device=f.device)
        valid_tokens = valid_tokens.to(f.device)
        w = valid_tokens[token].double()  # (S,) 1 for pairs of non-padding tokens
        norm_dtype = torch.float64 if f.dtype == torch.float64 else torch.float32
        norm = torch.linalg.vector_norm(f, dim=-1, dtype=norm_dtype).double()  # (S,) ||f||
        finite = torch.isfinite(norm)
        self.nonfinite.index_add_(0, expert_ids, (~finite).double() * w)
        norm = torch.where(finite, norm, 0.0)
        if self.gate == "router_probability":
            g = self.router_probs.to(f.device)[token, expert_ids].double()
        else:
            g = routing_weight.double()
        g1, n1 = g * w, norm * w
        g2, n2 = g1 * g, n1 * norm
        # row a*3+b holds g^a ||f||^b; padding pairs contribute 0 (w = 0)
        rows = torch.stack([w, n1, n2, g1, g1 * norm, g1 * norm.square(), g2, g2 * norm, g2 * norm.square()])
        self.moments.index_add_(1, expert_ids, rows)
        # sum f per batch in f's precision (float32 at least), padding pairs sent to a spare
        # row E that is dropped; totals across batches are float64
        sum_dtype = torch.promote_types(f.dtype, torch.float32)
        target = torch.where(w > 0, expert_ids, self.layer.num_experts)
        partial = torch.zeros(self.layer.num_experts + 1, f.shape[1], dtype=sum_dtype, device=f.device)
        partial.index_add_(0, target, f.to(sum_dtype))  # NaN here is reported by raise_if_nonfinite
        self.output_sum += partial[:-1]
        self.tokens += valid_tokens.sum()

    def raise_if_nonfinite(self):
        if bool(self.nonfinite.any()):
            bad = self.nonfinite.nonzero().flatten().tolist()
            self.nonfinite.zero_()
            raise NonFiniteActivationError(
                f"NaN or Inf in the output of expert(s) {bad} of MoE layer {self.layer.layer_index} "
                f"({self.layer.name}); in fp16 this is usually overflow: collect in bfloat16 or float32"
            )


def _install(recorders: list[_Recorder]):
    handles = []
    for rec in recorders:
        experts = rec.layer.experts
        experts.forward = types.MethodType(lambda self, h, i, w, _rec=rec: _rec.forward(self, h, i, w), experts)
        if rec.gate == "router_probability":
            handles.append(rec.layer.router.register_forward_hook(rec.router_hook))
    return handles


def _uninstall(recorders: list[_Recorder], handles):
    for rec in recorders:
        rec.layer.experts.__dict__.pop("forward", None)
    for h in handles:
        h.remove()


def _input_device(model: nn.Module) -> torch.device:
    return model.get_input_embeddings().weight.device


def collect_statistics(
    model: nn.Module,
    batches: Iterable[dict],
    *,
    gate: str = "routing_weight",
    progress: bool = True,
    calibration: str = "",
    model_name: str | None = None,
) -> ExpertStatistics:
    """Run `batches` through `model` once and collect every expert statistic.

    Parameters
    ----------
    model: a transformers MoE causal LM (any family `find_moe_layers` supports), possibly
        spread over devices with accelerate's `device_map`.
    batches: iterable of dicts with `input_ids` and `attention_mask` ([B, T]); padding
        tokens (mask 0) are excluded from every statistic.
    gate: which gate value g enters g^alpha:
        - ``"routing_weight"`` (default): the weight the model multiplies the expert output
          by, as passed to the experts module (after top-k renormalisation and any routed
          scaling factor; DeepSeek-V3 rows sum to its scaling factor).
        - ``"router_probability"``: the router's probability before top-k selection and
          renormalisation: softmax of the router logits (sigmoid for DeepSeek-V3 / GLM-4-MoE),
          REAP's reading.
    progress: show a tqdm bar counting tokens.
    calibration: free-text description of the calibration data, stored in the metadata.
    model_name: HF id or path, stored in the metadata (default: `config._name_or_path`).

    Raises NonFiniteActivationError naming the layer and expert if an expert output is NaN/Inf.
    """
    if gate not in GATES:
        raise ValueError(f"gate must be one of {GATES}, got {gate!r}")
    from .progress import progress as tqdm

    moe = find_moe_layers(model)
    identity = model_identity(model)  # before the pass: nothing may have touched the routers yet
    family = getattr(model.config, "model_type", "")
    state: dict = {}
    recorders = [_Recorder(layer, i, state, gate, family) for i, layer in enumerate(moe)]
    handles = _install(recorders)
    device = _input_device(model)
    bar = tqdm(desc="calibration", unit="tok", disable=not progress)
    token_count, started = 0, time.time()
    was_training = model.training
    model.eval()
    # The decoder stack only: the statistics live at the experts' inputs and outputs, so the LM head
    # (hidden x vocabulary per token, a large share of a small model's forward) is not run.
    backbone = getattr(model, "base_model", None) or model
    try:
        with torch.inference_mode():
            for batch in batches:
                input_ids = batch["input_ids"].to(device)
                attention_mask = batch.get("attention_mask")
                attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(device)
                state["valid"] = attention_mask.reshape(-1).bool()
                backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
                for rec in recorders:
                    rec.raise_if_nonfinite()
                n = int(attention_mask.sum())
                token_count += n
                bar.update(n)
    finally:
        _uninstall(recorders, handles)
        bar.close()
        model.train(was_training)
    widest = max(l.num_experts for l in moe)

    def pad(t: torch.Tensor) -> torch.Tensor:
        t = t.cpu()
        return torch.nn.functional.pad(t, (0, widest - t.shape[-1])) if t.shape[-1] < widest else t

    moments = torch.stack([pad(r.moments).view(3, 3, -1) for r in recorders])
    output_sum = torch.stack([torch.nn.functional.pad(r.output_sum.cpu(), (0, 0, 0, widest - r.output_sum.shape[0])) for r in recorders])
    metadata = {
        **identity,
        "model_name": model_name or getattr(model.config, "_name_or_path", "") or "",
        "model_type": family,
        "calibration": calibration,
        "token_count": token_count,
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "gate": gate,
        "moepaper_version": package_version(),
        "seconds": round(time.time() - started, 3),
    }
    return ExpertStatistics(
        layers=[l.layer_index for l in moe],
        num_experts=[l.num_experts for l in moe],
        top_k=[l.top_k for l in moe],
        moments=moments,
        output_sum=output_sum,
        tokens=torch.stack([r.tokens.cpu() for r in recorders]),
        metadata=metadata,
        num_groups=[l.num_groups for l in moe],
        topk_group=[l.topk_group for l in moe],
    )
