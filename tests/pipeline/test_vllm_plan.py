"""The sweep's vLLM backend without vLLM: which checkpoints it saves, which lm-eval arguments it passes.

A fake `evaluate_checkpoint` stands in for lm-eval + vLLM: it loads each checkpoint with stock
`AutoModelForCausalLM` while it exists, records what it was given and returns rows shaped like
`evaluate`'s.
"""

import json
from pathlib import Path

import pandas as pd
import pytest
from transformers import AutoModelForCausalLM

from moepaper import collect_statistics
from moepaper.architecture import find_moe_layers
from moepaper.pipeline import checkpoints, evaluation
from moepaper.pipeline.keys import entry_folder
from moepaper.pipeline.results import read_result, sweep
from moepaper.pruning import PROVENANCE_FILE
from moepaper.testbed.tiny import random_batch, tiny_model, tiny_tokenizer

CRITERIA = ["man", "frequency"]
RATIOS = [0.25, 0.5]
EXPECTED_ARGS = {"tensor_parallel_size": 1, "gpu_memory_utilization": 0.85, "max_model_len": 4096, "dtype": "bfloat16", "seed": 0}


N_MOE = len(find_moe_layers(tiny_model("qwen3_moe")))  # MoE layers of the tiny model


class FakeEvaluation:
    """Records each call; loads the checkpoint with stock transformers while it is on disk."""

    def __init__(self):
        self.calls = []

    def __call__(self, path, model_args, *, suite, benchmarks, **kwargs):
        loaded = AutoModelForCausalLM.from_pretrained(path)
        config = json.loads((Path(path) / "config.json").read_text())
        self.calls.append({
            "path": str(path), "model_args": model_args, "benchmarks": benchmarks, "kwargs": kwargs,
            "experts": [layer.num_experts for layer in find_moe_layers(loaded)],
            "config_counts": (config.get("num_experts"), config.get("num_local_experts")),
            "tokenizer_saved": (Path(path) / "tokenizer.json").exists() or (Path(path) / "tokenizer_config.json").exists(),
        })
        suite = evaluation.get_suite(suite)
        return pd.DataFrame([evaluation._row(b, suite, value=0.5, stderr=0.01, n=3, status=evaluation.OK, higher_is_better=True)
                             for b in suite.benchmarks if b.name in benchmarks], columns=evaluation.RESULT_COLUMNS)


@pytest.fixture(scope="module")
def tiny():
    model = tiny_model("qwen3_moe")
    stats = collect_statistics(model, [random_batch(batch=4, seq_len=32, seed=i) for i in range(3)], progress=False,
                               calibration="random")
    return model, tiny_tokenizer(), stats


def run_sweep(tiny, tmp_path, fake, reuse_identical=False, **options):
    model, tokenizer, stats = tiny
    return sweep(model, tokenizer, stats, criteria=CRITERIA, ratios=RATIOS, suite="smoke", model_name="tiny",
                 out_dir=tmp_path / "results", progress=False, reuse_identical=reuse_identical, backend="vllm",
                 checkpoints={"checkpoint_dir": tmp_path / "ckpt", "evaluate_checkpoint": fake, **options})


def test_each_entry_is_saved_evaluated_from_disk_and_deleted(tiny, tmp_path):
    fake = FakeEvaluation()
    paths = run_sweep(tiny, tmp_path, fake)
    suite = evaluation.get_suite("smoke")
    assert len(fake.calls) == 1 + len(CRITERIA) * len(RATIOS)

    unpruned, *pruned = fake.calls
    assert unpruned["path"] == str(tmp_path / "ckpt" / "tiny" / "none" / "unpruned__removed0")
    assert unpruned["experts"] == [8] * N_MOE
    expected = {(c, r): [8 - round(r * 8)] * N_MOE for c in CRITERIA for r in RATIOS}  # 2 / 4 of 8 removed per layer
    for call, (criterion, ratio) in zip(pruned, [(c, r) for c in CRITERIA for r in RATIOS]):
        removed = round(ratio * 8)  # the same key as the result files: the point and the experts removed
        assert call["path"] == str(tmp_path / "ckpt" / entry_folder("tiny", "random", criterion, removed))
        assert call["experts"] == expected[criterion, ratio]
    for call in fake.calls:  # the vLLM arguments of the paper's protocol
        assert call["model_args"] == {"pretrained": call["path"], **EXPECTED_ARGS}
        assert call["config_counts"] == (call["experts"][0], call["experts"][0])  # vLLM reads num_experts
        assert call["tokenizer_saved"]
        assert call["benchmarks"] == [b.name for b in suite.benchmarks]
        assert call["kwargs"]["batch_size"] == "auto"  # vLLM batches continuously: hand it every request

    assert not list((tmp_path / "ckpt").rglob("config.json")), "checkpoints are deleted after their evaluation"
    assert len(paths) == len(fake.calls) * len(suite.benchmarks)
    for path in paths:
        record = read_result(path)
        assert record["status"] == "ok" and record["value"] == 0.5
        assert record["evaluation"]["backend"] == "vllm"
        assert record["provenance"]["checkpoint"] == str(path.parent).replace(str(tmp_path / "results"), str(tmp_path / "ckpt"))
        assert record["provenance"]["vllm"] == EXPECTED_ARGS
        assert record["provenance"]["checkpoint_kept"] is False

    again = FakeEvaluation()
    run_sweep(tiny, tmp_path, again)
    assert again.calls == [], "a finished sweep resumes without saving or evaluating anything"


def test_keep_checkpoints(tiny, tmp_path):
    run_sweep(tiny, tmp_path, FakeEvaluation(), keep_checkpoints=True)
    folder = tmp_path / "ckpt" / "tiny" / "random" / "S_1_0_1__removed4"
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert [layer.num_experts for layer in find_moe_layers(model)] == [4] * N_MOE
    provenance = json.loads((folder / PROVENANCE_FILE).read_text())
    assert provenance["criterion"]["name"] == "man" and provenance["ratio"] == 0.5
    assert provenance["extra"]["sweep_entry"] == {"criterion": "man", "ratio": 0.5, "calibration": "random"}
    assert len(list((tmp_path / "ckpt").rglob("config.json"))) == 1 + len(CRITERIA) * len(RATIOS)
    record = read_result(tmp_path / "results" / "tiny" / "random" / "S_1_0_1__removed4" / "code_ppl.json")
    assert record["provenance"]["checkpoint_kept"] is True


def test_unpruned_model_is_evaluated_from_the_base_checkpoint(tiny, tmp_path):
    model, tokenizer, _ = tiny
    base = tmp_path / "base"
    model.save_pretrained(base)
    tokenizer.save_pretrained(base)
    fake = FakeEvaluation()
    run_sweep(tiny, tmp_path, fake, base_checkpoint=str(base), tensor_parallel_size=2)
    assert fake.calls[0]["path"] == str(base) and fake.calls[0]["experts"] == [8] * N_MOE
    assert fake.calls[0]["model_args"] == {"pretrained": str(base), **EXPECTED_ARGS, "tensor_parallel_size": 2,
                                           "tokenizer": str(base)}
    assert (base / "config.json").exists(), "the base checkpoint is never deleted"
    assert [c["experts"][0] for c in fake.calls[1:]] == [6, 4, 6, 4]  # pruned from the in-memory model, restored after each save


def test_a_base_checkpoint_of_other_weights_is_refused(tiny, tmp_path):
    other = tmp_path / "other"
    tiny_model("qwen3_moe", seed=1).save_pretrained(other)
    fake = FakeEvaluation()
    with pytest.raises(ValueError, match="is not the in-memory model"):
        run_sweep(tiny, tmp_path, fake, base_checkpoint=str(other))
    assert fake.calls == [], "checked before the unpruned model is evaluated from the base"


def test_plan_lists_what_the_sweep_executes_and_runs_nothing(tiny, tmp_path):
    model, _, stats = tiny
    plan = checkpoints.plan_checkpoints(model, stats, criteria=CRITERIA, ratios=RATIOS, model_name="tiny",
                                        checkpoint_dir=tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / "results").exists()
    fake = FakeEvaluation()
    run_sweep(tiny, tmp_path, fake)
    assert [(r.checkpoint, r.model_args) for r in plan] == [(c["path"], c["model_args"]) for c in fake.calls]
    assert [list(r.experts_kept) for r in plan] == [c["experts"] for c in fake.calls]
    assert [r.saved for r in plan] == [True] * len(plan)
    assert (plan[0].name, plan[0].calibration, plan[1].name, plan[1].ratio) == ("unpruned", "none", "man", 0.25)


def test_records_have_the_in_memory_sweeps_shape(tiny, tmp_path, monkeypatch):
    """Both backends write the same record (the vLLM one adds where its checkpoint was)."""
    model, tokenizer, stats = tiny
    fake = FakeEvaluation()
    run_sweep(tiny, tmp_path, fake)

    def in_memory(model, tokenizer, suite, *, benchmarks, **kwargs):
        suite = evaluation.get_suite(suite)
        return pd.DataFrame([evaluation._row(b, suite, value=0.5, n=3, status=evaluation.OK) for b in suite.benchmarks
                             if b.name in benchmarks], columns=evaluation.RESULT_COLUMNS)

    monkeypatch.setattr(evaluation, "evaluate", in_memory)
    sweep(model, tokenizer, stats, criteria=CRITERIA, ratios=RATIOS, suite="smoke", model_name="tiny",
          out_dir=tmp_path / "hf", progress=False, reuse_identical=False)
    for vllm_path in (tmp_path / "results").rglob("*/*/*/*.json"):  # result records, not the settings record
        hf = read_result(tmp_path / "hf" / vllm_path.relative_to(tmp_path / "results"))
        vllm = read_result(vllm_path)
        assert set(vllm) == set(hf)
        assert set(vllm["provenance"]) - set(hf["provenance"]) == {"checkpoint", "checkpoint_kept", "vllm"}
        assert vllm["kept"] == hf["kept"]
        assert {k: v for k, v in vllm["evaluation"].items() if k != "backend"} == {
            k: v for k, v in hf["evaluation"].items() if k != "backend"}


def test_identical_kept_experts_are_evaluated_once(tiny, tmp_path):
    fake = FakeEvaluation()
    run_sweep(tiny, tmp_path, fake, reuse_identical=True)
    kept = {}
    for path in (tmp_path / "results").rglob("code_ppl.json"):
        record = read_result(path)
        kept.setdefault(json.dumps(record["kept"]), []).append(record["provenance"].get("same_kept_experts_as"))
    assert len(fake.calls) == len(kept)  # one checkpoint per distinct model
    for sources in kept.values():
        assert sum(source is None for source in sources) == 1


def test_unknown_backend_is_refused(tiny, tmp_path):
    model, tokenizer, stats = tiny
    with pytest.raises(ValueError, match="backend='sglang'"):
        sweep(model, tokenizer, stats, criteria=CRITERIA, suite="smoke", out_dir=tmp_path, backend="sglang")


@pytest.mark.slow
def test_child_process_evaluates_a_saved_checkpoint(tiny, tmp_path):
    """The isolation path end to end, with lm-eval's HF backend standing in for vLLM."""
    model, tokenizer, _ = tiny
    model.save_pretrained(tmp_path / "ckpt")
    tokenizer.save_pretrained(tmp_path / "ckpt")
    args = checkpoints.vllm_model_args(tmp_path / "ckpt")
    frame = checkpoints.evaluate_in_subprocess(tmp_path / "ckpt", args, suite="smoke", backend="hf",
                                               benchmarks=["literature_mc"], limit=2, batch_size=2)
    assert list(frame.columns) == evaluation.RESULT_COLUMNS
    assert frame.loc[0, "benchmark"] == "literature_mc" and frame.loc[0, "status"] == "ok" and frame.loc[0, "n"] == 2
    # a checkpoint that cannot be loaded: the child reports a failed row naming why (the sweep records it and goes on)
    missing = checkpoints.evaluate_in_subprocess(tmp_path / "missing", args, suite="smoke", backend="hf",
                                                 benchmarks=["literature_mc"], limit=2, batch_size=2)
    assert missing.loc[0, "status"] == "failed" and "missing" in missing.loc[0, "note"]


# --- the defects the real engine met (issue 21) ----------------------------------------------------


def test_vllm_backend_gets_one_context_length(monkeypatch):
    """lm-eval's VLLM asserts ``max_length is None or max_model_len is None``: the paper suites' max_length
    and the sweep's max_model_len together failed every benchmark with the real engine."""
    import lm_eval.api.registry

    seen = []

    class Recorder:
        @classmethod
        def create_from_arg_obj(cls, args, extra):
            seen.append(dict(args))
            assert args.get("max_length") is None or args.get("max_model_len") is None, (
                "Either max_length or max_model_len may be provided, but not both")  # lm-eval 0.4.13's check
            raise RuntimeError("recorded")

    monkeypatch.setattr(lm_eval.api.registry, "get_model", lambda name: Recorder)
    args = {k: v for k, v in checkpoints.vllm_model_args("/nowhere").items() if k != "pretrained"}
    frame = evaluation.evaluate("/nowhere", None, "paper-rehearsal", backend="vllm", model_args=args, benchmarks=["arc_easy"])
    assert seen and seen[0]["max_model_len"] == 4096 and "max_length" not in seen[0]
    assert frame.loc[0, "note"] == "RuntimeError: recorded"
    with pytest.raises(ValueError, match="disagree"):
        evaluation.vllm_context_args({"max_length": 4096, "max_model_len": 2048})


def test_vllm_extra_pins_a_release_on_transformers_5():
    """vLLM < 0.26 runs on transformers 4, which reads a pruned Qwen3 config.json (RoPE only under
    rope_parameters) with the default RoPE base 10000 instead of 1e7: the [vllm] extra must pin >= 0.26."""
    import tomllib

    from packaging.requirements import Requirement
    from packaging.version import Version

    project = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())["project"]
    extra = [Requirement(r) for r in project["optional-dependencies"]["vllm"]]
    pins = [r for r in extra if r.name == "vllm" and len(r.specifier) == 1 and next(iter(r.specifier)).operator == "=="]
    assert pins, f"the [vllm] extra does not pin vllm: {[str(r) for r in extra]}"
    assert Version(next(iter(pins[0].specifier)).version) >= Version("0.26")
    assert "torch==2.13.0" in project["dependencies"]  # the torch that pinned release is built on


def test_every_entry_reads_the_same_tokenizer_files(tiny, tmp_path):
    """The unpruned entry read the base checkpoint's tokenizer, pruned ones a re-saved copy: with a base
    checkpoint every entry now names its tokenizer files."""
    model, tokenizer, stats = tiny
    base = tmp_path / "base"
    model.save_pretrained(base)
    tokenizer.save_pretrained(base)
    plan = checkpoints.plan_checkpoints(model, stats, criteria=CRITERIA, ratios=RATIOS, model_name="tiny",
                                        checkpoint_dir=tmp_path / "ckpt", base_checkpoint=base)
    assert plan[0].checkpoint == str(base) and all(r.saved for r in plan[1:])
    assert {r.model_args.get("tokenizer") for r in plan} == {str(base)}


def test_pruned_in_place_saves_the_pruned_model_and_restores_it_exactly(tiny, tmp_path):
    model, tokenizer, stats = tiny
    import copy

    import torch

    from moepaper.pruning import prune_experts, select_experts
    from moepaper.criteria import expert_scores

    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = model.config.to_dict()
    keep = select_experts(expert_scores(stats, "frequency", model=model), ratio=0.25)
    expected = prune_experts(copy.deepcopy(model), keep).state_dict()
    with checkpoints.pruned_in_place(model, keep) as pruned:
        got = pruned.state_dict()
        assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in after)
    assert model.config.to_dict() == config
    assert [l.num_experts for l in find_moe_layers(model)] == [8] * N_MOE
    with pytest.raises(RuntimeError, match="boom"), checkpoints.pruned_in_place(model, keep):
        raise RuntimeError("boom")
    assert all(torch.equal(model.state_dict()[k], before[k]) for k in before)


MEMORY_PROBE = """
import json, sys, torch
from pathlib import Path
from transformers import AutoModelForCausalLM
from moepaper.pipeline.checkpoints import CheckpointEvaluator

def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
base = Path(sys.argv[1])
model = AutoModelForCausalLM.from_pretrained(base).eval()
model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
evaluator = CheckpointEvaluator(model, None, checkpoint_dir=base.parent / "ckpt", base_checkpoint=base,
                                evaluate_checkpoint=lambda *a, **k: None)
keep = [list(range(0, layer.num_experts, 2)) + [1] * 0 for layer in evaluator.layers]
keep = [k + [1, 3, 5, 7][: (3 * layer.num_experts // 4) - len(k)] for k, layer in zip(keep, evaluator.layers)]
run = evaluator.run("frequency", 0.25, "random", keep)
open("/proc/self/clear_refs", "w").write("5")  # reset the peak resident size (VmHWM)
start = rss("VmRSS")
evaluator.evaluate(run, keep)
print(json.dumps({"model": model_bytes, "start": start, "peak": rss("VmHWM")}))
"""


@pytest.mark.slow
def test_checkpoint_route_never_holds_two_models(tmp_path):
    """Saving a pruned checkpoint used to reload a full base copy beside the in-memory model (2 x 57 GiB for
    Qwen3). Peak resident memory of one entry, measured: the model plus less than half of it. A second
    copy would add the whole model; what one entry needs is the permutation's temporary (the largest
    expert tensor, an eighth of the model) and the writer's buffers, measured at 45-98 MiB for this
    289 MiB model (98 on a loaded machine: a quarter of the model was too tight a bound there)."""
    import subprocess
    import sys

    import torch

    from moepaper.pipeline.paper_models import rehearsal_config

    config = rehearsal_config("qwen3")
    # 6 MoE layers of 128 experts (3 x 128 x 512 each): about 290 MiB in bf16, the largest tensor 32 MiB
    config.moe_intermediate_size, config.num_hidden_layers, config.max_window_layers = 512, 6, 6
    torch.manual_seed(0)
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "base")
    done = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(tmp_path / "base")], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    extra = figures["peak"] - figures["start"]
    print(f"model {figures['model'] / 2**20:.0f} MiB, peak above start {extra / 2**20:.0f} MiB")
    assert figures["model"] > 250 * 2**20
    assert extra < figures["model"] / 2, figures


@pytest.mark.slow
def test_child_process_rebuilds_the_rehearsal_suite(tiny, tmp_path):
    """The rehearsal could not run the vLLM path: the child refused to rebuild `paper-rehearsal` by name."""
    model, tokenizer, _ = tiny
    model.save_pretrained(tmp_path / "ckpt")
    tokenizer.save_pretrained(tmp_path / "ckpt")
    args = checkpoints.vllm_model_args(tmp_path / "ckpt")
    frame = checkpoints.evaluate_in_subprocess(tmp_path / "ckpt", args, suite="paper-rehearsal", backend="hf",
                                               benchmarks=["arc_easy"], limit=2, batch_size=2)
    assert frame.loc[0, "benchmark"] == "arc_easy" and frame.loc[0, "status"] == "ok" and frame.loc[0, "n"] == 2


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="Linux only (PR_SET_PDEATHSIG)")
def test_evaluation_children_die_with_their_parent(tmp_path):
    """A vLLM engine lives in the evaluation child: killing the sweep (SIGKILL, no cleanup) must not leave it running."""
    import os
    import signal
    import subprocess
    import sys
    import time

    parent = (
        "import sys; from moepaper.pipeline.checkpoints import run_child; "
        "run_child([sys.executable, '-c', 'import os, time; print(os.getpid(), flush=True); time.sleep(600)'])"
    )
    started = subprocess.Popen([sys.executable, "-c", parent], stdout=subprocess.PIPE, text=True)
    child = int(started.stdout.readline())
    assert Path(f"/proc/{child}").exists()
    started.send_signal(signal.SIGKILL)
    started.wait()
    for _ in range(200):  # the kernel delivers SIGKILL to the child; wait until it is reaped
        try:
            state = Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            break
        if state == "Z":
            break
        time.sleep(0.05)
    else:
        os.kill(child, signal.SIGKILL)
        pytest.fail(f"child {child} outlived its killed parent")
