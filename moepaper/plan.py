"""Plan a paper model without its weights: ``python -m moepaper.plan MODEL [MODEL ...]`` (or ``all``).

For each of the paper's models (``olmoe``, ``deepseek_v2_lite``, ``ernie``, ``qwen3``) it builds
the full-size model on the ``meta`` device from the checkpoint's public config and prints the
parameter counts (total, routed experts, active per token), the bf16 weight memory, what
removing 25% / 50% of the routed experts in every MoE layer leaves (parameters, bf16
checkpoint size), and the token counts of the paper's calibration and evaluation protocol.
``--json`` prints the same figures as JSON. Nothing is downloaded; it takes seconds.
"""

from __future__ import annotations

import argparse
import json
import sys

from moepaper.pipeline.paper_models import PAPER_MODELS, UnknownPaperModel, plan


def _billions(n: int) -> str:
    return f"{n / 1e9:,.3f} B ({n:,})"


def format_plan(result: dict) -> str:
    """A readable table of one `plan` result."""
    s, p, proto = result["structure"], result["parameters"], result["protocol"]
    cal, ev = proto["calibration"], proto["evaluation"]
    shared = f"{s['shared_experts']} (fused, width {s['shared_expert_width']})" if s["shared_experts"] else "none"
    dense = ", ".join(map(str, s["dense_layers"])) or "none"
    routing = [f"top-k weights renormalised: {'yes' if s['renormalises_top_k'] else 'no'}"]
    if s["norm_topk_prob"] is not None:
        routing[0] += f" (norm_topk_prob={s['norm_topk_prob']})"
    if s["routed_scaling_factor"] is not None:
        routing.append(f"routed_scaling_factor={s['routed_scaling_factor']}")
    if s["topk_method"] is not None:
        routing.append(f"topk_method={s['topk_method']} n_group={s['n_group']} topk_group={s['topk_group']}")
    if s["moe_statics"]:
        routing.append("moe_statics (bias-corrected selection)")
    rows = [
        (f"{result['key']}: {result['hf_id']}", f"{result['model_class']}, {result['checkpoint_kind']} checkpoint"),
        ("layers", f"{s['num_hidden_layers']} ({s['moe_layers']} MoE; dense: {dense})"),
        ("hidden size / vocab", f"{s['hidden_size']} / {s['vocab_size']}" + (" (tied embeddings)" if s["tie_word_embeddings"] else "")),
        ("routed experts / top-k", f"{'/'.join(map(str, s['routed_experts']))} per MoE layer, top-{'/'.join(map(str, s['top_k']))}, width {s['expert_width']}"),
        ("shared experts", shared),
        ("routing", ", ".join(routing)),
        ("parameters, total", _billions(p["total"])),
        ("  routed experts", f"{_billions(p['routed_experts'])}, {p['routed_experts'] / p['total']:.1%}"),
        ("  per routed expert", ", ".join(f"{n:,}" for n in result["parameters_per_expert"]["routed"])
         + f"; {', '.join(f'{n:,}' for n in result['parameters_per_expert']['removable'])} removed with its router row"
         + (" and moe_statics entry" if s["moe_statics"] else "")),
        ("  active per token", f"{_billions(p['active'])} (embedding counted once)"),
        ("  active, all non-routed", f"{_billions(p['active_all_non_routed'])} (input embedding and LM head both)"),
        ("  active, no embeddings", f"{_billions(p['active_without_embeddings'])} (neither input embedding nor LM head)"),
        ("bf16 weights", f"{result['bf16_weights_gib']:.2f} GiB ({result['bf16_weights_gb']:.2f} GB)"),
    ]
    for prune in result["pruning"]:
        tag = "" if prune["in_paper"] else "  [not in the paper for this model]"
        rows.append(
            (
                f"remove {prune['ratio']:.0%} of routed",
                f"{'/'.join(map(str, prune['experts_removed_per_layer']))} per layer -> "
                f"{'/'.join(map(str, prune['experts_kept_per_layer']))} kept: {_billions(prune['parameters'])} "
                f"({prune['fraction_of_total']:.1%}), bf16 checkpoint {prune['bf16_checkpoint_gib']:.2f} GiB "
                f"({prune['bf16_checkpoint_gb']:.2f} GB){tag}",
            )
        )
    rows += [
        ("calibration", f"{cal['sequences_per_source']} x {cal['tokens_per_sequence']} tokens = {cal['tokens_per_source']:,} per source; "
                        f"{len(cal['sources'])} sources ({', '.join(cal['sources'])}) = {cal['tokens_all_sources']:,}"),
        ("  routed pairs per layer", f"{cal['routed_token_expert_pairs_per_moe_layer_per_source']:,} token-expert pairs per MoE layer per source"),
        ("evaluation", f"context {ev['context_tokens']}, at most {ev['max_new_tokens']} new tokens, {ev['decoding']}"),
    ]
    width = max(len(label) for label, _ in rows[1:])
    head, *body = rows
    lines = [f"{head[0]}  ({head[1]})", "-" * (width + 60)]
    lines += [f"{label:<{width}}  {value}" for label, value in body]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m moepaper.plan",
        description="Sizes of the paper's MoE models (full size on the meta device, no weights) and the protocol's token counts.",
    )
    parser.add_argument("models", nargs="+", metavar="MODEL", help=f"one or more of: {', '.join(PAPER_MODELS)}, or 'all'")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.5], help="fractions of routed experts removed (default 0.25 0.5)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    keys = list(PAPER_MODELS) if "all" in args.models else args.models
    unknown = [k for k in keys if k not in PAPER_MODELS]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(map(repr, unknown))}; known: {', '.join(PAPER_MODELS)} (or 'all')")
    bad = [r for r in args.ratios if not 0 < r < 1]
    if bad:
        parser.error(f"ratios must lie in (0, 1); got {bad}")
    try:
        results = [plan(k, ratios=tuple(args.ratios)) for k in keys]
    except UnknownPaperModel as error:  # pragma: no cover - checked above
        parser.error(str(error))
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print("\n\n".join(format_plan(r) for r in results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
