"""Calibration data, lm-eval evaluation and the resumable sweep, offline on tiny models."""

import json
import math
import string
import time
from contextlib import nullcontext

import pytest
import torch

from moepaper import collect_statistics
from moepaper.pipeline.calibration import (
    SOURCES,
    CalibrationDataUnavailable,
    calibration_batches,
    calibration_texts,
)
from moepaper.pipeline.evaluation import PAPER_BENCHMARKS, Benchmark, Suite, evaluate, get_suite, paper_task_names
from moepaper.pipeline.results import UNPRUNED, ResultsSettingsError, read_result, result_path, sweep
from moepaper.testbed.tiny import random_batch, tiny_model


def char_tokenizer():
    """A character-level tokenizer of printable ASCII (102 ids, within the tiny models' 128)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [c for c in string.printable if c not in "\x0b\x0c"]
    vocab = {t: i for i, t in enumerate(["<pad>", "<bos>", "<eos>", "<unk>"] + chars)}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(".|\n"), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>")


QUESTIONS = [
    ("the cat sat on the", ["mat", "sky"], 0),
    ("one two three", ["four", "cat"], 0),
    ("red green", ["blue", "seven"], 0),
    ("monday tuesday", ["wednesday", "apple"], 0),
    ("a b c", ["d", "z"], 0),
    ("1 + 1 =", ["2", "9"], 0),
]


@pytest.fixture(scope="module")
def tokenizer():
    return char_tokenizer()


@pytest.fixture(scope="module")
def task_suite(tmp_path_factory):
    """Three small lm-eval tasks (multiple choice, generation, rolling loglikelihood) in a temp folder."""
    folder = tmp_path_factory.mktemp("tasks")
    data = folder / "items.jsonl"
    data.write_text("".join(json.dumps({"q": q, "choices": c, "label": l}) + "\n" for q, c, l in QUESTIONS))
    common = f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
    (folder / "t_mc.yaml").write_text(
        "task: t_mc\n" + common + 'output_type: multiple_choice\ndoc_to_text: "{{q}}"\ndoc_to_choice: "{{choices}}"\n'
        "doc_to_target: label\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n"
    )
    (folder / "t_gen.yaml").write_text(
        "task: t_gen\n" + common + 'output_type: generate_until\ndoc_to_text: "{{q}}"\ndoc_to_target: " {{choices[0]}}"\n'
        "generation_kwargs:\n  until: [\"\\n\"]\n  max_gen_toks: 6\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n"
    )
    (folder / "t_ppl.yaml").write_text(
        "task: t_ppl\n" + common + 'output_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: "{{q}}"\n'
        "metric_list:\n  - metric: bits_per_byte\n    aggregation: bits_per_byte\n    higher_is_better: false\n"
    )
    benchmarks = (
        Benchmark("t_mc", "MC", "t_mc", "acc,none"),
        Benchmark("t_gen", "Gen", "t_gen"),
        Benchmark("t_ppl", "PPL", "t_ppl"),
    )
    return Suite("test", benchmarks, include_path=(str(folder),), include_defaults=False, limit=4)


@pytest.fixture(scope="module")
def tiny():
    return tiny_model("qwen3_moe", max_position_embeddings=1024)


@pytest.fixture(scope="module")
def tiny_stats(tiny):
    return collect_statistics(tiny, [random_batch(batch=4, seq_len=32, seed=i) for i in range(3)], progress=False, calibration="random")


# ---------------------------------------------------------------- evaluation


def test_evaluate_returns_one_row_per_benchmark(tiny, tokenizer, task_suite):
    frame = evaluate(tiny, tokenizer, task_suite)
    assert list(frame["benchmark"]) == ["t_mc", "t_gen", "t_ppl"]
    assert (frame["status"] == "ok").all()
    assert list(frame["n"]) == [4, 4, 4]  # the suite's limit
    mc, gen, ppl = (frame.set_index("benchmark").loc[b] for b in ("t_mc", "t_gen", "t_ppl"))
    assert mc["metric"] == "acc,none" and 0 <= mc["value"] <= 1 and mc["higher_is_better"]
    assert gen["metric"] == "exact_match,none" and gen["higher_is_better"]  # chosen by primary_metric
    assert ppl["metric"] == "bits_per_byte,none" and ppl["value"] > 0 and not ppl["higher_is_better"]


def test_limit_takes_items_spread_through_each_task(task_suite):
    from moepaper.pipeline.evaluation import _spread_items, task_manager

    manager = task_manager(task_suite.include_path, task_suite.include_defaults)
    tasks, samples = _spread_items(manager, ["t_mc", "t_ppl"], 3)
    assert [t.task_name for t in tasks] == ["t_mc", "t_ppl"]
    assert samples == {"t_mc": [0, 2, 4], "t_ppl": [0, 2, 4]}  # 6 items, 3 evenly spaced
    assert _spread_items(manager, ["t_mc"], 50)[1] == {"t_mc": [0, 1, 2, 3, 4, 5]}  # never more than the task has
    assert _spread_items(manager, ["t_mc", "t_ppl"], {"t_mc": 2, "t_ppl": None})[1] == {"t_mc": [0, 3], "t_ppl": list(range(6))}


def test_per_benchmark_limit(tiny, tokenizer, task_suite):
    from moepaper.pipeline.evaluation import benchmark_limit

    assert benchmark_limit("code_ppl", {"ppl": 30, "mc": 80}) == 30
    assert benchmark_limit("code_ppl", {"code_ppl": 5, "ppl": 30}) == 5 and benchmark_limit("t_gen", {"ppl": 1}) is None
    frame = evaluate(tiny, tokenizer, task_suite, limit={"t_mc": 2, "ppl": 3}, benchmarks=["t_mc", "t_ppl"])
    assert list(frame["n"]) == [2, 3]


def test_masked_model_scores_differ_from_unpruned(tiny, tokenizer, task_suite, tiny_stats):
    """Evaluation sees the mask: removing half the experts changes the model's bits per byte."""
    from moepaper.criteria import expert_scores
    from moepaper.pruning import mask_experts, select_experts

    keep = select_experts(expert_scores(tiny_stats, "man"), ratio=0.5, model=tiny)
    full = evaluate(tiny, tokenizer, task_suite, benchmarks=["t_ppl"])["value"].item()
    with mask_experts(tiny, keep):
        masked = evaluate(tiny, tokenizer, task_suite, benchmarks=["t_ppl"])["value"].item()
    again = evaluate(tiny, tokenizer, task_suite, benchmarks=["t_ppl"])["value"].item()
    assert masked != pytest.approx(full, rel=1e-4)
    assert again == pytest.approx(full, rel=1e-9)  # the mask is gone after the context


def test_paper_suite_reports_missing_benchmarks_as_not_run():
    suite = get_suite("paper")
    assert len(suite.benchmarks) == 16
    frame = evaluate(None, None, suite, benchmarks=["humaneval", "mbpp_plus", "livecodebench", "wildbench"])
    assert list(frame["status"]) == ["not run"] * 4
    notes = frame.set_index("benchmark")["note"]
    assert "allow_code_execution" in notes["humaneval"]
    assert "LiveCodeBench" in notes["livecodebench"] and "WildBench" in notes["wildbench"]
    assert suite.num_fewshot == 0 and suite.gen_kwargs == {"max_gen_toks": 2048, "do_sample": False}
    assert suite.limit is None  # the paper suite runs every item


def test_paper_task_names_exist_in_lm_eval_index():
    from lm_eval.tasks import TaskManager

    names = paper_task_names()
    assert len(names) == 14 and {"livecodebench", "wildbench"} == {b.name for b in PAPER_BENCHMARKS if b.task is None}
    index = set(TaskManager().all_tasks)
    missing = [n for n in names if n not in index]
    assert not missing, f"lm-eval {len(index)} tasks lack {missing}"


def test_smoke_suite_on_tiny_model_writes_results(tiny, tokenizer, tiny_stats, tmp_path):
    suite = get_suite("smoke")
    paths = sweep(tiny, tokenizer, tiny_stats, criteria=["man"], ratios=[0.5], suite=suite, out_dir=tmp_path,
                  model_name="tiny", progress=False)
    assert len(paths) == 2 * len(suite.benchmarks)
    records = [read_result(p) for p in paths]
    assert all(r["status"] == "ok" and r["n"] <= suite.limit for r in records)


# ---------------------------------------------------------------- failures (issue 14; issue 11 case 8)


def test_a_failing_benchmark_is_recorded_and_the_others_run(tiny, tokenizer, task_suite):
    """A task lm-eval cannot load and a metric the task lacks fail alone, with the error's first line."""
    broken = Suite("broken", task_suite.benchmarks + (
        Benchmark("missing", "Missing", "no_such_task"),
        Benchmark("bad_metric", "Bad", "t_mc", "no_such_metric,none"),
    ), include_path=task_suite.include_path, include_defaults=False, limit=2)
    frame = evaluate(tiny, tokenizer, broken).set_index("benchmark")
    assert list(frame["status"]) == ["ok", "ok", "ok", "failed", "failed"]
    assert "no_such_task" in frame.loc["missing", "note"]
    assert frame.loc["bad_metric", "note"].startswith("KeyError") and "no_such_metric" in frame.loc["bad_metric", "note"]
    assert "\n" not in frame.loc["bad_metric", "note"]


def test_a_missing_extra_fails_its_benchmark_only(tiny, tokenizer, monkeypatch):
    """MATH-500 without math-verify (`pip install -e ".[paper]"`) is a failed row naming the extra; GSM8K still runs."""
    import sys

    monkeypatch.setitem(sys.modules, "math_verify", None)  # as if lm-eval[math] were not installed
    frame = evaluate(tiny, tokenizer, "paper-rehearsal", benchmarks=["gsm8k", "math500"]).set_index("benchmark")
    assert frame.loc["gsm8k", "status"] == "ok"
    assert frame.loc["math500", "status"] == "failed" and "math_verify" in frame.loc["math500", "note"]


def test_the_sweep_records_failures_goes_on_and_retries_them(tiny, tokenizer, task_suite, tiny_stats, tmp_path):
    broken = Suite("broken", task_suite.benchmarks + (Benchmark("missing", "Missing", "no_such_task"),),
                   include_path=task_suite.include_path, include_defaults=False, limit=2)
    kwargs = dict(criteria=["man"], ratios=[0.5], suite=broken, out_dir=tmp_path, model_name="tiny", progress=False)
    paths = sweep(tiny, tokenizer, tiny_stats, **kwargs)
    records = [read_result(p) for p in paths]
    assert len(records) == 8 and all(r is not None for r in records)
    assert sorted((r["benchmark"], r["status"]) for r in records if r["status"] != "ok") == [("missing", "failed")] * 2
    failed = read_result(result_path(tmp_path, "tiny", "random", "man", 4, "missing"))
    assert "no_such_task" in failed["note"] and failed["kept"] is not None
    from moepaper.pipeline.tables import load_results

    table = load_results(tmp_path)
    assert (table[table["benchmark"] == "missing"]["status"] == "failed").all()
    stamps = {p: p.stat().st_mtime_ns for p in paths}
    sweep(tiny, tokenizer, tiny_stats, **kwargs)  # a rerun retries the failures only
    assert [p.name for p in paths if p.stat().st_mtime_ns != stamps[p]] == ["missing.json"] * 2


def test_a_model_with_nan_logits_is_failed_not_ok(tokenizer, task_suite):
    """Issue 11 case 8: an LM head yielding NaN was recorded as "ok" (lm-eval's argmax turns NaN into a score)."""
    model = tiny_model("qwen3_moe", max_position_embeddings=1024)
    with torch.no_grad():
        model.lm_head.weight[0, 0] = float("nan")
    frame = evaluate(model, tokenizer, task_suite)
    assert (frame["status"] == "failed").all(), frame[["benchmark", "status", "value"]]
    assert all("not finite" in note for note in frame["note"])


def test_a_non_finite_metric_value_is_failed(tiny, tokenizer, task_suite, monkeypatch):
    """Issue 11 case 8: a NaN value from lm-eval is a failed result naming the metric, never "ok"
    (lm-eval's `evaluator.evaluate` serves both the one-call suite path and `simple_evaluate`)."""
    import lm_eval.evaluator

    real = lm_eval.evaluator.evaluate

    def nan_bits(*args, **kwargs):
        output = real(*args, **kwargs)
        for result in output["results"].values():
            if "bits_per_byte,none" in result:
                result["bits_per_byte,none"] = float("nan")
        return output

    monkeypatch.setattr(lm_eval.evaluator, "evaluate", nan_bits)
    for fast in (True, False):
        frame = evaluate(tiny, tokenizer, task_suite, fast=fast).set_index("benchmark")
        assert frame.loc["t_ppl", "status"] == "failed" and "bits_per_byte" in frame.loc["t_ppl", "note"]
        assert frame.loc["t_mc", "status"] == "ok"


@pytest.mark.parametrize("limit", [0, {"ppl": 0, "mc": 0}, {"t_mc": 2, "t_ppl": 0}, -1, 0.0])
def test_a_limit_of_zero_is_refused(tiny, tokenizer, task_suite, tiny_stats, tmp_path, limit):
    """Issue 11 case 8: `--limit ppl=0,mc=0` evaluated every item (lm-eval reads 0 as no limit)."""
    with pytest.raises(ValueError, match="would evaluate nothing"):
        evaluate(tiny, tokenizer, task_suite, limit=limit)
    with pytest.raises(ValueError, match="would evaluate nothing"):
        sweep(tiny, tokenizer, tiny_stats, criteria=["man"], ratios=[0.5], suite=task_suite, out_dir=tmp_path,
              model_name="tiny", progress=False, limit=limit)
    assert not list(tmp_path.rglob("*.json"))  # refused before any work


def test_paper_suites_carry_the_protocol():
    paper, rehearsal = get_suite("paper"), get_suite("paper-rehearsal")
    for suite in (paper, rehearsal):
        assert suite.model_args == {"max_length": 4096} and suite.num_fewshot == 0
        assert suite.gen_kwargs["do_sample"] is False and suite.benchmarks == PAPER_BENCHMARKS
    assert paper.gen_kwargs["max_gen_toks"] == 2048 and not paper.offline_code_eval
    assert rehearsal.gen_kwargs["max_gen_toks"] < 2048 and rehearsal.offline_code_eval
    assert rehearsal.include_defaults is False and len(rehearsal.include_path) == 1


# ---------------------------------------------------------------- the sweep


def test_sweep_writes_provenance_and_resumes(tiny, tokenizer, task_suite, tiny_stats, tmp_path, monkeypatch):
    from moepaper.pipeline import evaluation

    class Stop(Exception):
        pass

    def stop_after_first(entry, paths):
        raise Stop(entry.name)

    kwargs = dict(criteria=["man", "mone"], ratios=[0.5], suite=task_suite, out_dir=tmp_path, model_name="tiny", progress=False,
                  reuse_identical=False)
    with pytest.raises(Stop):
        sweep(tiny, tokenizer, tiny_stats, on_entry=stop_after_first, **kwargs)
    first = result_path(tmp_path, "tiny", "none", UNPRUNED, 0, "t_mc")
    assert first.exists()
    assert not result_path(tmp_path, "tiny", "random", "man", 4, "t_mc").exists()
    record = read_result(first)
    assert record["criterion"] == UNPRUNED and record["ratio"] == 0 and record["kept"] is None
    stamp = first.stat().st_mtime_ns

    calls = []
    real = evaluation.evaluate

    def counting(model, tokenizer, suite, **kw):
        calls.append(kw.get("benchmarks"))
        return real(model, tokenizer, suite, **kw)

    monkeypatch.setattr(evaluation, "evaluate", counting)
    paths = sweep(tiny, tokenizer, tiny_stats, **kwargs)
    assert len(calls) == 2  # man and mone; the unpruned entry was not recomputed
    assert first.stat().st_mtime_ns == stamp
    assert len(paths) == 9 and all(p.exists() for p in paths)
    assert not list(tmp_path.rglob("*.tmp"))

    man = read_result(result_path(tmp_path, "tiny", "random", "man", 4, "t_ppl"))
    assert (man["b"], man["alpha"], man["beta"]) == (1, 0, 1)
    assert [len(k) for k in man["kept"]] == [4, 4]  # half of 8 experts in both MoE layers
    prov = man["provenance"]
    assert {"moepaper", "lm_eval", "transformers", "torch", "seed", "statistics_hash", "date"} <= set(prov)
    assert len(prov["statistics_hash"]) == 64 and man["setting"] == "task-agnostic"

    calls.clear()
    sweep(tiny, tokenizer, tiny_stats, **kwargs)
    assert calls == []  # everything on disk
    with pytest.raises(ResultsSettingsError, match="limit"):  # other evaluation settings: refused, nothing mixed
        sweep(tiny, tokenizer, tiny_stats, **{**kwargs, "limit": 2})
    assert calls == []


def test_weights_fingerprint_follows_the_weights():
    from moepaper.pipeline.results import weights_fingerprint

    a, b = tiny_model("qwen3_moe", seed=3), tiny_model("qwen3_moe", seed=3)
    assert weights_fingerprint(a) == weights_fingerprint(b)
    with torch.no_grad():
        b.model.layers[1].mlp.experts.down_proj[0, 0, 0] += 1.0  # the first value is always sampled
    assert weights_fingerprint(a) != weights_fingerprint(b)


def test_sweep_reuses_results_of_identical_kept_experts(tiny, tokenizer, task_suite, tiny_stats, tmp_path, monkeypatch):
    from moepaper.pipeline import evaluation

    calls = []
    real = evaluation.evaluate
    monkeypatch.setattr(evaluation, "evaluate", lambda *a, **kw: calls.append(kw["benchmarks"]) or real(*a, **kw))
    kwargs = dict(criteria=["man"], ratios=[0.5], suite=task_suite, out_dir=tmp_path, model_name="tiny", progress=False)
    sweep(tiny, tokenizer, tiny_stats, **kwargs)
    assert len(calls) == 2  # unpruned, man
    calls.clear()
    # the same statistics under another calibration name select the same experts: nothing to evaluate
    sweep(tiny, tokenizer, tiny_stats, calibration="again", **kwargs)
    assert calls == []
    copy = read_result(result_path(tmp_path, "tiny", "again", "man", 4, "t_ppl"))
    source = read_result(result_path(tmp_path, "tiny", "random", "man", 4, "t_ppl"))
    assert copy["value"] == source["value"] and copy["kept"] == source["kept"]
    assert copy["provenance"]["same_kept_experts_as"] == "tiny/random/S_1_0_1__removed4/t_ppl.json"


# ---------------------------------------------------------------- calibration


def test_calibration_offline_error_is_fast_and_says_what_to_download(tokenizer, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for source in ("c4", "code", "math"):
        started = time.time()
        with pytest.raises(CalibrationDataUnavailable) as error:
            next(calibration_batches(source, tokenizer, n_sequences=2, seq_len=16))
        assert time.time() - started < 5
        message = str(error.value)
        assert SOURCES[source].path in message and "load_dataset" in message and "embedded:mixed" in message


def test_calibration_unreachable_hub_fails_fast(tokenizer, monkeypatch):
    from moepaper.pipeline import calibration

    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(calibration, "_hub_reachable", lambda timeout=2.0: False)
    with pytest.raises(CalibrationDataUnavailable, match="did not answer"):
        next(calibration_batches("c4", tokenizer, n_sequences=2, seq_len=16))


def test_embedded_calibration_packs_exact_sequences(tokenizer):
    batches = list(calibration_batches("embedded:mixed", tokenizer, n_sequences=10, seq_len=64, seed=1, batch_size=4))
    assert [b["input_ids"].shape for b in batches] == [(4, 64), (4, 64), (2, 64)]
    assert all(bool(b["attention_mask"].all()) for b in batches)
    again = torch.cat([b["input_ids"] for b in calibration_batches("embedded:mixed", tokenizer, n_sequences=10, seq_len=64, seed=1)])
    other = torch.cat([b["input_ids"] for b in calibration_batches("embedded:mixed", tokenizer, n_sequences=10, seq_len=64, seed=2)])
    first = torch.cat([b["input_ids"] for b in batches])
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert (first == tokenizer.eos_token_id).any()  # documents are joined by end-of-sequence


def test_embedded_mixed_interleaves_domains():
    from moepaper.testbed.corpus import DOMAINS, read_split

    texts = calibration_texts("embedded:mixed", seed=0)
    first = [next(texts) for _ in range(3 * 4)]
    for i, domain in enumerate(DOMAINS):
        calibration = set(read_split(domain, "calibration"))
        assert all(t in calibration for t in first[i::3])
    code = list(calibration_texts("embedded:code", seed=0))
    assert sorted(code) == sorted(read_split("code", "calibration"))


def test_calibration_short_source_raises(tokenizer):
    with pytest.raises(ValueError, match="holds only"):
        next(calibration_batches("embedded:math", tokenizer, n_sequences=10**6, seq_len=512))


# ---------------------------------------------------------------- one lm-eval call per suite, per-item outcomes


def test_items_reproduce_each_value_exactly(tiny, tokenizer, task_suite):
    """Per-item outcomes are compact numbers whose aggregate is the row's value, bit for bit."""
    from moepaper.pipeline.evaluation import items_value

    frame = evaluate(tiny, tokenizer, task_suite, limit=3, benchmarks=["t_mc", "t_ppl"]).set_index("benchmark")
    mc, ppl = frame.loc["t_mc"], frame.loc["t_ppl"]
    assert set(mc["items"]) == {"doc_id", "acc"} and mc["items"]["doc_id"] == [0, 2, 4]  # spread items, true ids
    assert set(mc["items"]["acc"]) <= {0, 1}
    assert set(ppl["items"]) == {"doc_id", "loglikelihood", "bytes"} and ppl["items"]["doc_id"] == [0, 2, 4]
    assert ppl["items"]["bytes"] == [len(QUESTIONS[i][0].encode()) for i in (0, 2, 4)]
    assert all(ll < 0 for ll in ppl["items"]["loglikelihood"])
    assert items_value(mc["items"]) == mc["value"] and items_value(ppl["items"]) == ppl["value"]
    ll, nbytes = sum(ppl["items"]["loglikelihood"]), sum(ppl["items"]["bytes"])
    assert -ll / math.log(2) / nbytes == pytest.approx(ppl["value"], rel=1e-15, abs=0)  # the other order: to 1 ulp


def test_one_call_per_suite_equals_one_call_per_benchmark(tiny, tokenizer, task_suite, tiny_stats):
    """The fast path (one lm-eval call over cached tasks) gives the per-benchmark path's values and items,
    masked or not, and reusing the cached tasks changes nothing."""
    from moepaper.criteria import expert_scores
    from moepaper.pruning import mask_experts, select_experts

    keep = select_experts(expert_scores(tiny_stats, "man"), ratio=0.5, model=tiny)
    for context in (nullcontext(), mask_experts(tiny, keep)):
        with context:
            fast = evaluate(tiny, tokenizer, task_suite, limit=5, fast=True)
            again = evaluate(tiny, tokenizer, task_suite, limit=5, fast=True)
            stock = evaluate(tiny, tokenizer, task_suite, limit=5, fast=False)
        assert "one lm-eval call" in fast["note"][0] and "one lm-eval call" not in stock["note"][0]
        for column in ("value", "n", "status", "items"):
            assert list(fast[column]) == list(stock[column]) == list(again[column]), column


def test_fast_path_matches_the_stock_lm_eval_command_line(tiny, tokenizer, task_suite, tiny_stats, tmp_path):
    """The stock `lm_eval` command line on a saved pruned checkpoint gives the same per-item loglikelihoods
    and accuracies as `evaluate` (fast path) on that pruned model in memory (exactly), and on the unpruned
    model under `mask_experts` (to float rounding)."""
    import copy
    import glob
    import os
    import subprocess
    import sys

    from moepaper.criteria import expert_scores
    from moepaper.pruning import mask_experts, prune_experts, save_pruned, select_experts

    keep = select_experts(expert_scores(tiny_stats, "man"), ratio=0.25, model=tiny)
    pruned = prune_experts(copy.deepcopy(tiny), keep)
    save_pruned(pruned, tokenizer, tmp_path / "ckpt", keep)
    samples = {"t_mc": [0, 1, 3, 4], "t_ppl": [0, 2, 4]}  # what limit={"t_mc": 4, "t_ppl": 3} spreads to
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={tmp_path / 'ckpt'}",
         "--tasks", "t_mc,t_ppl", "--include_path", task_suite.include_path[0], "--samples", json.dumps(samples),
         "--batch_size", "8", "--device", "cpu", "--log_samples", "--output_path", str(tmp_path / "out")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1800,  # a busy machine: minutes
    )
    assert done.returncode == 0, done.stderr[-2000:]
    cli = {}
    for task in samples:
        (path,) = glob.glob(str(tmp_path / "out" / "**" / f"samples_{task}_*.jsonl"), recursive=True)
        cli[task] = sorted((json.loads(line) for line in open(path)), key=lambda s: s["doc_id"])
    expected = {
        "t_mc": {"doc_id": [s["doc_id"] for s in cli["t_mc"]], "acc": [int(s["acc"]) for s in cli["t_mc"]]},
        "t_ppl": {"doc_id": [s["doc_id"] for s in cli["t_ppl"]], "loglikelihood": [s["bits_per_byte"][0] for s in cli["t_ppl"]],
                  "bytes": [s["bits_per_byte"][1] for s in cli["t_ppl"]]},
    }
    assert expected["t_mc"]["doc_id"] == samples["t_mc"] and expected["t_ppl"]["doc_id"] == samples["t_ppl"]
    limit = {"t_mc": 4, "t_ppl": 3}
    frame = evaluate(pruned, tokenizer, task_suite, limit=limit, benchmarks=["t_mc", "t_ppl"]).set_index("benchmark")
    assert "one lm-eval call" in frame.loc["t_mc", "note"]  # the fast path
    # the same checkpoint, requests and batches: bitwise the same numbers
    assert frame.loc["t_mc", "items"] == expected["t_mc"] and frame.loc["t_ppl", "items"] == expected["t_ppl"]
    with mask_experts(tiny, keep):
        masked = evaluate(tiny, tokenizer, task_suite, limit=limit, benchmarks=["t_mc", "t_ppl"]).set_index("benchmark")
    assert masked.loc["t_mc", "items"] == expected["t_mc"]
    assert masked.loc["t_ppl", "items"]["loglikelihood"] == pytest.approx(expected["t_ppl"]["loglikelihood"], rel=1e-5)


def test_sweep_records_carry_per_item_outcomes(tiny, tokenizer, task_suite, tiny_stats, tmp_path):
    """Every result record holds its items (numbers only), and they give the record's value exactly after
    the JSON round trip; limit="all" evaluates every item."""
    from moepaper.pipeline.evaluation import items_value

    paths = sweep(tiny, tokenizer, tiny_stats, criteria=["man"], ratios=[0.5], suite=task_suite, out_dir=tmp_path,
                  model_name="tiny", progress=False, limit="all")
    records = {(r["criterion"], r["benchmark"]): r for r in map(read_result, paths)}
    assert len(records) == 6
    for (criterion, benchmark), record in records.items():
        assert record["status"] == "ok" and record["items"]["doc_id"] == list(range(6)), (criterion, benchmark)
        assert items_value(record["items"]) == record["value"]
        assert all(isinstance(v, (int, float)) for key in record["items"] for v in record["items"][key])
    assert set(records["man", "t_mc"]["items"]) == {"doc_id", "acc"}
    assert set(records["man", "t_ppl"]["items"]) == {"doc_id", "loglikelihood", "bytes"}


def test_a_groups_items_are_its_subtasks_pooled_when_they_give_its_value():
    """MMLU is a group: lm-eval logs samples per subtask. The group's record pools them (doc_id
    "<subtask>/<doc_id>") when their mean is the group's value (size-weighted, as MMLU aggregates),
    and has none when the group's value is another aggregate (an unweighted mean of unequal subtasks)."""
    from moepaper.pipeline.evaluation import _items

    def samples(accs):
        return [{"doc_id": k, "filter": "none", "acc": a} for k, a in enumerate(accs)]

    output = {"group_subtasks": {"mmlu": ["mmlu_stem", "mmlu_other"], "mmlu_stem": ["mmlu_physics", "mmlu_math"]},
              "samples": {"mmlu_physics": samples([1, 0, 1]), "mmlu_math": samples([0]), "mmlu_other": samples([1, 1, 0, 0])}}
    pooled = _items(output, "mmlu", "acc,none", 4 / 8)  # 4 right of 8
    assert pooled["doc_id"] == ["mmlu_stem/mmlu_physics/0", "mmlu_stem/mmlu_physics/1", "mmlu_stem/mmlu_physics/2", "mmlu_stem/mmlu_math/0",
                                "mmlu_other/0", "mmlu_other/1", "mmlu_other/2", "mmlu_other/3"]
    assert pooled["acc"] == [1, 0, 1, 0, 1, 1, 0, 0]
    assert _items(output, "mmlu", "acc,none", (2 / 4 + 2 / 4) / 2 + 0.01) is None  # another aggregate: no items
    assert _items(output, "mmlu_other", "acc,none", 0.5) == {"doc_id": [0, 1, 2, 3], "acc": [1, 1, 0, 0]}
    del output["samples"]["mmlu_math"]
    assert _items(output, "mmlu", "acc,none", 0.5) is None  # a subtask without samples
