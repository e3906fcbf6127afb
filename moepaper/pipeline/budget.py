"""What the paper route costs on one H100/H200-class GPU: an estimate, not a measurement.

``python -m moepaper.pipeline.budget`` prints the budget table of docs/gpu.md: per paper model the
download size, bf16 memory, GPUs needed, calibration time, the number of evaluations in the
paper's grid, and estimated hours with the HF and the vLLM backend. Every figure comes from
`paper_models.plan` (exact parameter counts and sizes of the public configs) and the stated
`Assumptions` below; nothing here ran on a GPU, so treat the hours as an order of magnitude.

The grid is the ``paper`` configuration of `moepaper.reproduce`: per model, the named criteria
and MoNE at the paper's ratios for each of the three calibrations, plus the unpruned model
once, each evaluated on the 14 benchmarks lm-eval provides (a test checks the counts against
that configuration). Entries whose kept experts equal one already evaluated are reused by the
sweep; the estimate assumes none are (an upper bound).

The cost model, per model:
- forward FLOPs = 2 x active parameters per token x tokens (`plan`'s ``active``: embedding
  lookup not counted); attention-score FLOPs are left out (about 10% at 2048 tokens) and
  absorbed in the assumed utilisation (MFU, fraction of the GPU's bf16 peak).
- calibration: 3 sources x 1024 x 2048 tokens through the statistics pass, HF backend.
- multiple-choice tasks (and the prompts of generative ones): forward FLOPs of every
  (context, choice) request at `Assumptions.loglikelihood_mfu`, both backends.
- generation, HF backend: lm-eval batches `hf_batch` prompts; each decode step reads the
  non-routed weights plus the routed experts the batch touches (1 - (1 - k/E)^batch of them)
  at `hf_bandwidth_efficiency` of HBM bandwidth, plus `hf_layer_overhead_s` per decoder layer
  (kernel launches, Python); a batch runs until its longest answer ends (`hf_batch_efficiency`).
- generation, vLLM backend: continuous batching at `vllm_decode_mfu` of peak over the active
  parameters; per pruned entry the base model is reloaded and the pruned checkpoint written
  (`disk_bytes_per_s`), and each evaluation starts an engine (`vllm_fixed_s`).
"""

from __future__ import annotations

import math
import sys
from dataclasses import asdict, dataclass, field

from ..criteria import resolve_criteria
from .paper_models import CALIBRATION_SOURCES, PAPER_MODELS, PAPER_RATIOS, plan

GB = 1e9

# Work per lm-eval benchmark of the paper suite [assumed]: items (the full evaluation split, as
# docs/paper_protocol.md lists), requests per item (choices of a multiple-choice item; 1 for a
# generative prompt), tokens per request (context + continuation, or the prompt, at 0 shots with a
# 50k-150k BPE vocabulary), and new tokens generated per item (greedy, at most 2048; the answers of
# instruct models without a chat template, stopped by each task's stop sequences or end of text).
WORKLOAD: dict[str, tuple[int, int, int, int]] = {
    "arc_challenge": (1172, 4, 60, 0),
    "arc_easy": (2376, 4, 50, 0),
    "boolq": (3270, 2, 170, 0),
    "hellaswag": (10042, 4, 100, 0),
    "mmlu": (14042, 4, 110, 0),
    "openbookqa": (500, 4, 30, 0),
    "rte": (277, 2, 90, 0),
    "winogrande": (1267, 2, 30, 0),
    "humaneval": (164, 1, 150, 250),
    "humaneval_plus": (164, 1, 150, 250),
    "mbpp": (500, 1, 120, 400),  # 0-shot: the model never sees "[DONE]", so it runs to its end of text
    "mbpp_plus": (378, 1, 120, 400),
    "gsm8k": (1319, 1, 80, 300),
    "math500": (500, 1, 90, 1000),
}


@dataclass(frozen=True)
class Assumptions:
    """Everything the estimate assumes beyond `plan`'s exact sizes (see the module docstring)."""

    gpu: str = "one H100 SXM (80 GB); an H200 (141 GB) has the same compute and 1.4x the bandwidth"
    peak_bf16_flops: float = 989e12  # H100/H200 SXM dense bf16
    hbm_bytes_per_s: float = 3.35e12  # H100 SXM (H200: 4.8e12)
    gpu_memory_gb: tuple[int, ...] = (80, 141)
    memory_headroom: float = 0.25  # activations, KV cache, CUDA context, on top of the bf16 weights
    calibration_mfu: float = 0.20  # HF forward on 8 x 2048-token batches
    statistics_overhead: float = 1.1  # the statistics pass vs a plain forward (0.98-1.07x measured on CPU)
    loglikelihood_mfu: float = 0.10  # short, padded (HF) or prompt-logprob (vLLM) requests
    hf_batch: int = 16  # the paper configuration's batch_size
    hf_layer_overhead_s: float = 0.5e-3  # per decoder layer and decode step
    hf_bandwidth_efficiency: float = 0.6
    hf_batch_efficiency: float = 0.5  # useful tokens / batch size x steps
    vllm_decode_mfu: float = 0.03
    hf_fixed_s: float = 60.0  # per evaluation: building 14 tasks from the datasets cache, code execution
    vllm_fixed_s: float = 180.0  # per evaluation: the above plus engine start and CUDA graph capture
    disk_bytes_per_s: float = 1e9  # reloading the base model and writing a pruned checkpoint
    workload: dict = field(default_factory=lambda: dict(WORKLOAD))


def grid(key: str) -> dict:
    """The paper grid of one model: criteria (named + MoNE), ratios, calibrations, evaluations."""
    criteria = [c.name for c in resolve_criteria("named")]
    ratios, calibrations = list(PAPER_RATIOS[key]), list(CALIBRATION_SOURCES)
    evaluations = len(criteria) * len(ratios) * len(calibrations) + 1  # + the unpruned model, once
    return {"criteria": criteria, "ratios": ratios, "calibrations": calibrations, "evaluations": evaluations,
            "benchmarks": len(WORKLOAD), "benchmark_runs": evaluations * len(WORKLOAD)}


def estimate(key: str, assumptions: Assumptions = Assumptions()) -> dict:
    """The budget of one paper model: sizes from `plan`, times from `assumptions` (seconds and hours)."""
    a = assumptions
    p = plan(key, ratios=PAPER_RATIOS[key])
    s = p["structure"]
    active, total = p["parameters"]["active"], p["parameters"]["total"]
    weights_gb = p["bf16_weights_gb"]
    g = grid(key)

    cal = p["protocol"]["calibration"]
    calibration_tokens = cal["tokens_per_source"] * len(g["calibrations"])
    calibration_s = a.statistics_overhead * 2 * active * calibration_tokens / (a.calibration_mfu * a.peak_bf16_flops)

    prefill_tokens = sum(items * requests * tokens for items, requests, tokens, _ in a.workload.values())
    new_tokens = sum(items * new for items, _, _, new in a.workload.values())
    prefill_s = 2 * active * prefill_tokens / (a.loglikelihood_mfu * a.peak_bf16_flops)

    # HF decode step: non-routed weights + the routed experts a batch of `hf_batch` touches
    experts, top_k = s["routed_experts"][0], s["top_k"][0]
    touched = 1 - (1 - top_k / experts) ** a.hf_batch
    routed_bytes = 2 * p["parameters"]["routed_experts"]
    step_bytes = 2 * (total - p["parameters"]["routed_experts"]) + touched * routed_bytes
    step_s = s["num_hidden_layers"] * a.hf_layer_overhead_s + step_bytes / (a.hf_bandwidth_efficiency * a.hbm_bytes_per_s)
    hf_tokens_per_s = a.hf_batch * a.hf_batch_efficiency / step_s
    vllm_tokens_per_s = a.vllm_decode_mfu * a.peak_bf16_flops / (2 * active)

    hf_eval_s = prefill_s + new_tokens / hf_tokens_per_s + a.hf_fixed_s
    vllm_eval_s = prefill_s + new_tokens / vllm_tokens_per_s + a.vllm_fixed_s
    # vLLM: each pruned entry reloads the base and writes its checkpoint; the unpruned one loads the base as is
    pruned_entries = {r["ratio"]: (g["evaluations"] - 1) // len(g["ratios"]) for r in p["pruning"]}
    io_s = sum(n * (weights_gb + next(r for r in p["pruning"] if r["ratio"] == ratio)["bf16_checkpoint_gb"]) * GB
               for ratio, n in pruned_entries.items()) / a.disk_bytes_per_s
    hf_total_s = calibration_s + g["evaluations"] * hf_eval_s
    vllm_total_s = calibration_s + g["evaluations"] * vllm_eval_s + io_s
    largest_pruned_gb = max(r["bf16_checkpoint_gb"] for r in p["pruning"])
    return {
        "key": key,
        "hf_id": PAPER_MODELS[key],
        "download_gb": weights_gb,  # the checkpoints are stored in bf16
        "bf16_weights_gib": p["bf16_weights_gib"],
        "gpus": {gb: math.ceil(weights_gb * (1 + a.memory_headroom) / gb) for gb in a.gpu_memory_gb},
        "disk_gb": {"hf": weights_gb, "vllm": weights_gb + largest_pruned_gb},
        "active_parameters": active,
        **g,
        "calibration_tokens": calibration_tokens,
        "prefill_tokens_per_evaluation": prefill_tokens,
        "new_tokens_per_evaluation": new_tokens,
        "tokens_per_s": {"hf": hf_tokens_per_s, "vllm": vllm_tokens_per_s},
        "seconds": {"calibration": calibration_s, "prefill_per_evaluation": prefill_s,
                    "hf_per_evaluation": hf_eval_s, "vllm_per_evaluation": vllm_eval_s, "vllm_checkpoint_io": io_s},
        "hours": {"calibration": calibration_s / 3600, "hf": hf_total_s / 3600, "vllm": vllm_total_s / 3600},
    }


def budget_table(assumptions: Assumptions = Assumptions()) -> str:
    """The budget table of docs/gpu.md (Markdown) and the per-evaluation breakdown below it."""
    rows = [estimate(key, assumptions) for key in PAPER_MODELS]
    gpus = " / ".join(f"{gb} GB" for gb in assumptions.gpu_memory_gb)
    lines = [
        f"| model | download | bf16 weights | GPUs ({gpus}) | disk, HF / vLLM | calibration (3 x 2.1M tokens) "
        "| evaluations (criteria x ratios x calibrations + unpruned) | lm-eval benchmark runs | HF backend | vLLM backend |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['hf_id']} | {r['download_gb']:.1f} GB | {r['bf16_weights_gib']:.1f} GiB "
            f"| {' / '.join(str(n) for n in r['gpus'].values())} | {r['disk_gb']['hf']:.0f} / {r['disk_gb']['vllm']:.0f} GB "
            f"| {r['hours']['calibration'] * 60:.0f} min "
            f"| {len(r['criteria'])} x {len(r['ratios'])} x {len(r['calibrations'])} + 1 = {r['evaluations']} "
            f"| {r['benchmark_runs']} | ~{r['hours']['hf']:.0f} h | ~{r['hours']['vllm']:.0f} h |"
        )
    lines += [
        "",
        "| model | active parameters | multiple-choice + prompt tokens per evaluation | prefill | new tokens per evaluation "
        "| generation HF (tokens/s) | generation vLLM (tokens/s) | one evaluation, HF / vLLM |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        sec = r["seconds"]
        lines.append(
            f"| {r['key']} | {r['active_parameters'] / 1e9:.2f} B | {r['prefill_tokens_per_evaluation'] / 1e6:.1f} M "
            f"| {sec['prefill_per_evaluation'] / 60:.0f} min | {r['new_tokens_per_evaluation'] / 1e6:.2f} M "
            f"| {r['tokens_per_s']['hf']:,.0f} | {r['tokens_per_s']['vllm']:,.0f} "
            f"| {sec['hf_per_evaluation'] / 60:.0f} / {sec['vllm_per_evaluation'] / 60:.0f} min |"
        )
    return "\n".join(lines)


def main() -> int:
    print(budget_table())
    print()
    print("Assumptions (moepaper.pipeline.budget.Assumptions):")
    for name, value in asdict(Assumptions()).items():
        if name != "workload":
            print(f"  {name} = {value}")
    print("  workload (items, requests per item, tokens per request, new tokens per item):")
    for name, value in WORKLOAD.items():
        print(f"    {name}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
