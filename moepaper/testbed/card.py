"""`python -m moepaper.testbed.card [name ...]`: the model card of an embedded model.

Reads what training exported (``heldout_metrics.json``, ``routing.json``,
``training_config.json``) and, when present, the model's mixed-calibration statistics
(``data/statistics/<name>/embedded-mixed.safetensors``), and writes ``README.md`` beside
the checkpoint: shape, training time and tokens, held-out bits per byte per domain, and
per layer how balanced the routing is and how specialised by domain.

Balance, per MoE layer with E experts and routed-token shares p_j (sum 1):
- least share x E: the least-used expert's share relative to uniform (1 = perfectly even;
  the testbed's requirement is at least 1/4, i.e. every expert gets >= 1/(4E));
- normalised entropy H(p) / log E (1 = even).
Specialisation, per layer, from the test split's routing per domain (``routing.json``):
Jensen-Shannon divergence among the domains' expert distributions (bits; 0 = identical),
the mean over experts of the largest share one domain has of its traffic (1/3 = shared
alike, 1 = one domain only), and the share of each domain's routed tokens that goes to
its own top-E/8 experts.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from ..project import DATA, project_root

MIN_SHARE_TIMES_E = 0.25  # every expert gets at least 1/(4E) of its layer's routed tokens


def routing_balance(counts) -> dict:
    """Per-layer balance of routed-token counts [L, E]: least share x E, normalised entropy."""
    counts = np.asarray(counts, dtype=float)
    share = counts / np.clip(counts.sum(axis=1, keepdims=True), 1e-12, None)  # (L, E)
    num_experts = share.shape[1]
    with np.errstate(divide="ignore", invalid="ignore"):
        entropy = -np.where(share > 0, share * np.log(share), 0.0).sum(axis=1)
    return {
        "least_share_times_E": (share.min(axis=1) * num_experts).round(4).tolist(),
        "normalised_entropy": (entropy / np.log(num_experts)).round(4).tolist(),
        "least_used_expert": share.argmin(axis=1).tolist(),
        "meets_min_share": bool((share.min(axis=1) * num_experts >= MIN_SHARE_TIMES_E).all()),
    }


def top_experts_share(routing: dict) -> dict:
    """Per domain and layer: share of the domain's routed tokens its own top-E/8 experts get."""
    out = {}
    for domain, counts in routing["counts"].items():
        counts = np.asarray(counts, dtype=float)
        top = max(1, counts.shape[1] // 8)
        ordered = -np.sort(-counts, axis=1)
        out[domain] = (ordered[:, :top].sum(axis=1) / counts.sum(axis=1)).round(3).tolist()
    return out


# The calibration whose statistics give a card's balance: the mixed one, else the first general-domain draw.
CARD_CALIBRATIONS = {"embedded-mixed": "mixed calibration", "embedded-literature-draw0of3": "general-domain draw 0"}


def calibration_counts(name: str, root: Path | None = None):
    """(N_j [L, E], path, label) of the model's mixed-calibration statistics, else of its first
    general-domain draw (`CARD_CALIBRATIONS`); (None, the mixed path, label) when neither is collected."""
    folder = (root or project_root()) / DATA / "statistics" / name
    for stem, label in CARD_CALIBRATIONS.items():
        path = folder / f"{stem}.safetensors"
        if path.exists():
            from ..statistics import ExpertStatistics

            return ExpertStatistics.load(path).count.numpy(), path, label
    return None, folder / "embedded-mixed.safetensors", "mixed calibration"


def calibration_sizes(name: str, root: Path | None = None) -> list[str]:
    """One line per committed statistics file of the model: its calibration draw and token count."""
    from ..statistics import ExpertStatistics

    lines = []
    for path in sorted(((root or project_root()) / DATA / "statistics" / name).glob("*.safetensors")):
        meta = ExpertStatistics.load(path).metadata
        lines.append(f"| `{path.stem}` | {meta.get('calibration', '?')} | {int(meta.get('token_count', 0)):,} |")
    return lines


def _fmt(values, digits=2) -> str:
    return " | ".join(f"{v:.{digits}f}" for v in values)


def write_card(name: str, root: Path | None = None) -> Path:
    """Write ``data/models/<name>/README.md`` (`card_text`); returns its path."""
    root = root or project_root()
    path = root / DATA / "models" / name / "README.md"
    path.write_text(card_text(name, root))
    return path


def card_text(name: str, root: Path | None = None) -> str:
    """The model card of embedded model `name`, from the files training exported and the committed statistics."""
    root = root or project_root()
    folder = root / DATA / "models" / name
    missing = [f for f in ("heldout_metrics.json", "routing.json", "training_config.json") if not (folder / f).exists()]
    if missing:
        raise FileNotFoundError(f"{folder}: {', '.join(missing)} missing; train the model first (python -m moepaper.testbed.train)")
    metrics = json.loads((folder / "heldout_metrics.json").read_text())
    routing = json.loads((folder / "routing.json").read_text())
    cfg = json.loads((folder / "training_config.json").read_text())
    balance_loss = cfg.get("balance", "pooled")
    counts, stats_path, label = calibration_counts(name, root)
    test_counts = sum(np.asarray(c, dtype=float) for c in routing["counts"].values())
    num_layers = test_counts.shape[0]
    lines = [
        f"# Model card: `{name}`",
        "",
        f"A Qwen3MoeForCausalLM trained by `python -m moepaper.testbed.train` on the embedded corpus "
        f"(`data/corpus`, train splits, equal shares of literature, code and math). Generated by "
        f"`python -m moepaper.testbed.card {name}` from the files beside it.",
        "",
        "| | |",
        "|---|---|",
        f"| shape | {cfg['num_layers']} layers, hidden {cfg['hidden_size']}, {cfg['num_experts']} routed experts of width "
        f"{cfg['moe_intermediate_size']}, top-{cfg['top_k']}, vocabulary {cfg['vocab_size']} |",
        f"| parameters | {metrics['parameters']:,} ({metrics['checkpoint_mb']} MB in {cfg.get('export_dtype', 'bfloat16')}) |",
        f"| load balancing | {'per-layer Switch loss, averaged over layers' if balance_loss == 'per_layer' else 'transformers built-in aux loss (router counts pooled over all layers)'}, "
        f"coefficient {cfg['router_aux_loss_coef']}; router z-loss {cfg.get('router_z_loss_coef', 0.0)} |",
        f"| training | {metrics['steps']} steps ({metrics['tokens_seen']:,} tokens) in {metrics['training_minutes']} min of "
        f"optimisation on {metrics['device']}; best validation at step {metrics['best_step']}; stopped: {metrics['stop_reason']} |",
        "",
        "## Held-out test split",
        "",
        "| domain | bits per byte | nats per token | documents |",
        "|---|---|---|---|",
    ]
    for domain, m in metrics["test"].items():
        lines.append(f"| {domain} | {m['bits_per_byte']:.3f} | {m['loss_nats_per_token']:.3f} | {m['documents']} |")
    lines += ["", "## Routing balance per MoE layer", ""]
    header = "| | " + " | ".join(f"layer {i}" for i in range(num_layers)) + " |"
    rule = "|---|" + "---|" * num_layers
    rows = []
    if counts is not None:
        b = routing_balance(counts)
        rows += [f"| least share x E, {label} | {_fmt(b['least_share_times_E'], 3)} |",
                 f"| normalised entropy, {label} | {_fmt(b['normalised_entropy'], 3)} |"]
        verdict = ("every expert of every layer gets at least 1/(4E) of its layer's routed calibration tokens"
                   if b["meets_min_share"] else
                   "some expert gets less than 1/(4E) of its layer's routed calibration tokens")
    else:
        verdict = f"calibration statistics not collected yet ({stats_path.relative_to(root)})"
    b = routing_balance(test_counts)
    rows += [f"| least share x E, test split (all domains) | {_fmt(b['least_share_times_E'], 3)} |",
             f"| normalised entropy, test split | {_fmt(b['normalised_entropy'], 3)} |"]
    where = label if label == "mixed calibration" else (
        f"{label} (one domain's text, so experts that serve the other domains get few of its tokens; "
        "the test-split rows, all domains, are the balance comparable across models)")
    lines += [header, rule, *rows, "", f"On the {where} {verdict}.", "",
              "## Specialisation by domain (test split)", "", header, rule,
              f"| Jensen-Shannon between domains (bits) | {_fmt(routing['js_between_domains_bits'], 3)} |",
              f"| mean top-domain share per expert | {_fmt(routing['mean_top_domain_share'], 2)} |"]
    for domain, share in top_experts_share(routing).items():
        lines.append(f"| {domain}: share to its top E/8 experts | {_fmt(share, 2)} |")
    lines += ["", "Least share x E: the least-used expert's share of the layer's routed tokens times E "
              "(1 = even). Normalised entropy: H / log E. Top-domain share: for each expert, the largest "
              "share one domain has of its (domain-size-normalised) traffic; 1/3 = shared alike.", ""]
    sizes = calibration_sizes(name, root)
    if sizes:
        lines += ["## Calibration statistics committed", "",
                  "Each file's calibration draw and token count (`data/statistics/" + name + "/`). The general-domain "
                  "draws `@draw<k>of3` are disjoint (no document in two); seeded draws `@seed<k>` reshuffle one split.", "",
                  "| file | calibration | tokens |", "|---|---|---|", *sizes, ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    names = (argv if argv is not None else sys.argv[1:]) or ["embedded"]
    for name in names:
        print(write_card(name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
