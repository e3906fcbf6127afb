"""Where one evaluation's time goes, operator by operator: torch's profiler over one packed
evaluation of an embedded model on the local suite.

    .venv/bin/python benchmarks/profile_evaluation.py [--model embedded] [--limit 40] [--threads 1] [--rows 20]

Runs `moepaper.pipeline.evaluation.evaluate(model, tokenizer, "local", limit=...)` once to warm
up (tasks built, allocator warm), then once under `torch.profiler`, and prints
- the wall time of the profiled evaluation and the share of it spent inside the model's forward;
- the self CPU time per operator (top `--rows`);
- the same time grouped by what the model does: the experts (the per-expert matmuls of
  `grouped_mm` and the gathers and scatters around them), the router (softmax, top-k, sort),
  attention (scaled dot-product attention and the q/k/v/o projections), the LM head (the
  vocabulary projection of the scored positions), norms, embedding; the rest of the forward
  (the MoE block's combination of expert outputs, residual adds) is the difference. Each
  operator is assigned by the outermost grouped module it runs in (profiler `record_function`
  scopes pushed by forward pre-/post-hooks).
Ratios, not seconds, are what carry across machines: run it on an idle machine.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import defaultdict

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from moepaper.pipeline.evaluation import evaluate  # noqa: E402
from moepaper.testbed.embedded import load_embedded_model  # noqa: E402

# module class-name fragments -> the group their operators count towards (first match wins)
GROUPS = (("Experts", "experts"), ("Router", "router"), ("TopKRouter", "router"), ("Gate", "router"),
          ("Attention", "attention"), ("lm_head", "LM head"), ("RMSNorm", "norms"), ("Embedding", "embedding"))


def scoped(model):
    """Push a profiler scope named after each leaf-level module group while it runs."""
    handles, grouped = [], []
    for name, module in model.named_modules():
        kind = "LM head" if name == "lm_head" else next((g for key, g in GROUPS if key in type(module).__name__), None)
        if kind is None or any(name.startswith(outer + ".") for outer in grouped):
            continue  # a module inside a grouped one (q/k norms inside attention) counts to the outer group
        grouped.append(name)
        label = f"group::{kind}"

        def pre(m, args, _label=label):
            m._moepaper_scope = torch.profiler.record_function(_label)
            m._moepaper_scope.__enter__()

        def post(m, args, out):
            m._moepaper_scope.__exit__(None, None, None)

        handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    return handles


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--limit", default="40", help="items per task (an int, or 'all')")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rows", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    limit = args.limit if args.limit == "all" else int(args.limit)
    model, tokenizer = load_embedded_model(args.model)
    evaluate(model, tokenizer, "local", limit=limit)  # warm-up: tasks built, allocator warm
    forward_s = [0.0]

    def fpre(m, a, k):
        m._t0 = time.perf_counter()

    def fpost(m, a, k, out):
        forward_s[0] += time.perf_counter() - m._t0

    hooks = scoped(model) + [model.register_forward_pre_hook(fpre, with_kwargs=True),
                             model.register_forward_hook(fpost, with_kwargs=True)]
    from torch.profiler import ProfilerActivity, profile

    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        evaluate(model, tokenizer, "local", limit=limit)
    wall = time.perf_counter() - start
    for h in hooks:
        h.remove()
    events = prof.key_averages()
    print(f"model {args.model}, limit {args.limit}, threads {args.threads}, torch {torch.__version__}")
    print(f"profiled evaluation: {wall:.2f} s wall; inside the model's forward: {forward_s[0]:.2f} s "
          f"({forward_s[0] / wall:.0%}); the rest is lm-eval, tokenisation and packing")
    total = sum(e.self_cpu_time_total for e in events if not e.key.startswith("group::"))
    print(f"\n| operator | self CPU s | share | calls |\n|---|---|---|---|")
    for e in sorted((e for e in events if not e.key.startswith("group::")), key=lambda e: -e.self_cpu_time_total)[:args.rows]:
        print(f"| {e.key} | {e.self_cpu_time_total / 1e6:.3f} | {e.self_cpu_time_total / total:.1%} | {e.count} |")
    # by group: a group's scope spans its operators (CPU total of the scope); modules inside a
    # grouped module have no scope of their own, so nothing counts twice
    groups = defaultdict(float)
    for e in events:
        if e.key.startswith("group::"):
            groups[e.key[len("group::"):]] += e.cpu_time_total
    print(f"\n| part of the forward | CPU s | share of the forward |\n|---|---|---|")
    for g, t in sorted(groups.items(), key=lambda kv: -kv[1]):
        print(f"| {g} | {t / 1e6:.3f} | {t / 1e6 / forward_s[0]:.1%} |")


if __name__ == "__main__":
    main()
