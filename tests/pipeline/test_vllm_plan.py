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
    assert fake.calls[0]["model_args"] == {"pretrained": str(base), **EXPECTED_ARGS, "tensor_parallel_size": 2}
    assert (base / "config.json").exists(), "the base checkpoint is never deleted"
    assert [c["experts"][0] for c in fake.calls[1:]] == [6, 4, 6, 4]  # pruned copies reloaded from the base


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
