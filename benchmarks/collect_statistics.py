"""Cost of one calibration pass: collect_statistics vs a plain forward vs a dense observer.

    .venv/bin/python benchmarks/collect_statistics.py [--tokens 4096] [--repeats 5] [--embedded]

Three ways over the same tokens, timed interleaved in one process (the machine is noisy,
so we report ratios to the plain forward and to the stack measured in the same run):
- plain:   the model's forward with its default experts implementation (grouped_mm);
- stack:   the decoder stack alone (`model.base_model`, no LM head), what collection has to run;
- collect: moepaper.collect_statistics (all moments, routed-only expert outputs);
- dense:   an observer that runs every expert on every token, as REAP's reference code
           does, accumulating the same norms (pre-hook on each experts module).
Peak memory is measured in a fresh subprocess per (model, mode): the peak RSS of the pass,
counted from after the model is built and one warm-up batch has run (Linux /proc).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics as stats_mod
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from moepaper import collect_statistics, find_moe_layers  # noqa: E402
from moepaper.testbed.tiny import tiny_model  # noqa: E402

# Tiny configs of the paper's four classes, sized like the real expert / top-k ratio.
CONFIGS = {
    "olmoe (64e, top-8)": ("olmoe", 64, 8),
    "deepseek_v2 (64e, top-6, shared)": ("deepseek_v2", 64, 6),
    "ernie4_5_moe (64e, top-6, shared)": ("ernie4_5_moe", 64, 6),
    "qwen3_moe (128e, top-8)": ("qwen3_moe", 128, 8),
}
WIDTH = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, vocab_size=2048)
MOE_WIDTH = dict(moe_intermediate_size=128)


def build(name: str):
    if name == "embedded":
        from moepaper.testbed.embedded import load_embedded_model

        model, _ = load_embedded_model()
        return model
    family, experts, top_k = CONFIGS[name]
    extra = dict(WIDTH)
    if family in ("deepseek_v2", "ernie4_5_moe", "qwen3_moe"):
        extra.update(MOE_WIDTH)
    if family == "qwen3_moe":
        extra.update(head_dim=64, num_attention_heads=4, num_key_value_heads=2)
    if family == "deepseek_v2":
        extra.update(kv_lora_rank=64, qk_rope_head_dim=32, qk_nope_head_dim=32, v_head_dim=64)
    return tiny_model(family, num_experts=experts, top_k=top_k, **extra)


def batches_for(model, tokens: int, seq_len: int = 256, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    rows = max(1, tokens // seq_len)
    ids = torch.randint(0, model.config.vocab_size, (rows, seq_len), generator=g)
    return [{"input_ids": ids[i : i + 4], "attention_mask": torch.ones_like(ids[i : i + 4])} for i in range(0, rows, 4)]


def plain(model, batches):
    with torch.inference_mode():
        for b in batches:
            model(**b, use_cache=False)


def stack(model, batches):
    """The decoder stack alone (`model.base_model`, no LM head): what collection has to run."""
    with torch.inference_mode():
        for b in batches:
            model.base_model(**b, use_cache=False)


def collect(model, batches):
    collect_statistics(model, batches, progress=False)


def dense(model, batches):
    """Every expert on every token (REAP reference style), through the module's own math."""
    layers = find_moe_layers(model)
    sums = [torch.zeros(l.num_experts, dtype=torch.float64) for l in layers]
    hooks = []
    for i, layer in enumerate(layers):
        def pre(module, args, _i=i):
            hidden = args[0]
            T = hidden.shape[0]
            ones = torch.ones(T, 1, dtype=hidden.dtype)
            saved = module.__dict__.pop("forward", None)
            for e in range(module.num_experts):
                idx = torch.full((T, 1), e, dtype=torch.long)
                f = type(module).forward(module, hidden, idx, ones)  # (T, H) un-gated output of e
                sums[_i][e] += f.norm(dim=-1).double().sum()
            if saved is not None:
                module.forward = saved
        hooks.append(layer.experts.register_forward_pre_hook(pre))
    try:
        plain(model, batches)
    finally:
        for h in hooks:
            h.remove()


MODES = {"plain": plain, "stack": stack, "collect": collect, "dense": dense}


def time_modes(model, batches, repeats: int, modes=("plain", "stack", "collect", "dense")) -> dict[str, float]:
    for m in modes:  # warm-up
        MODES[m](model, batches[:1])
    times = {m: [] for m in modes}
    for _ in range(repeats):
        for m in modes:  # interleaved, so drift hits every mode alike
            start = time.perf_counter()
            MODES[m](model, batches)
            times[m].append(time.perf_counter() - start)
    return {m: stats_mod.median(v) for m, v in times.items()}


def _vm(field: str) -> float:
    """A /proc/self/status field in MiB (VmRSS: now, VmHWM: peak since the last reset)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure_peak(name: str, mode: str, tokens: int) -> dict:
    """Run in a fresh process: peak RSS of one pass, after the model is built (CPU)."""
    import gc

    model = build(name)
    batches = batches_for(model, tokens)
    MODES["plain"](model, batches[:1])  # allocator warm-up, same for every mode
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak-RSS counter (VmHWM) to the current RSS
    before = _vm("VmRSS")
    MODES[mode](model, batches)
    return {"peak": _vm("VmHWM"), "before": before}


def peak_memory(name: str, mode: str, tokens: int) -> dict:
    code = (
        "import sys, json, torch; sys.path.insert(0, %r); import benchmarks.collect_statistics as b;"
        "torch.set_num_threads(%d); print(json.dumps(b.measure_peak(%r, %r, %d)))"
    ) % (os.path.join(os.path.dirname(__file__), ".."), torch.get_num_threads(), name, mode, tokens)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--embedded", action="store_true", help="also measure the embedded default model")
    parser.add_argument("--no-dense", action="store_true", help="skip the dense observer (slow)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--json", help="write raw numbers here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    names = list(CONFIGS) + (["embedded"] if args.embedded else [])
    modes = ("plain", "stack", "collect") if args.no_dense else ("plain", "stack", "collect", "dense")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}; tokens per pass {args.tokens}; median of {args.repeats}")
    rows = {}
    print("| model | plain s | stack / plain (time) | collect / stack (time) | collect / plain (time) | dense / plain (time) "
          "| plain peak RSS MiB | collect / plain (peak RSS) | dense / plain (peak RSS) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in names:
        model = build(name)
        batches = batches_for(model, args.tokens)
        t = time_modes(model, batches, args.repeats, modes)
        mem = {m: peak_memory(name, m, args.tokens) for m in modes if m != "stack"}
        rows[name] = {"time": t, "peak_mib": mem}
        peak = {m: v["peak"] for m, v in mem.items()}
        dense_t = f"{t['dense'] / t['plain']:.2f}x" if "dense" in t else "-"
        dense_m = f"{peak['dense'] / peak['plain']:.2f}x" if "dense" in peak else "-"
        print(f"| {name} | {t['plain']:.3f} | {t['stack'] / t['plain']:.3f}x | {t['collect'] / t['stack']:.3f}x | "
              f"{t['collect'] / t['plain']:.3f}x | {dense_t} | "
              f"{peak['plain']:.0f} | {peak['collect'] / peak['plain']:.3f}x | {dense_m} |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
