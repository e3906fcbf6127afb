"""A sweep in worker processes (`sweep(..., workers=2)`) writes the records one process writes.

The workers are spawned interpreters that load the model by its spec, so this runs the real
evaluation (the smoke suite on a tiny model), not a fake; about a minute on two cores."""

import json

import pytest

from moepaper import collect_statistics
from moepaper.pipeline import load_model
from moepaper.pipeline.results import _worker_plan, read_result, sweep
from moepaper.pipeline.evaluation import get_suite
from moepaper.architecture import find_moe_layers
from moepaper.testbed.tiny import random_batch

SPEC = "tiny:qwen3_moe"
CRITERIA = ["man", "frequency", "reap"]


@pytest.fixture(scope="module")
def tiny_and_stats(tmp_path_factory):
    model, tokenizer = load_model(SPEC)
    stats = collect_statistics(model, [random_batch(batch=2, seq_len=16, seed=i) for i in range(2)], progress=False,
                               calibration="random")
    path = tmp_path_factory.mktemp("stats") / "random.safetensors"
    stats.save(path)
    return model, tokenizer, stats, path


def _records(root):
    """Every record under `root` without what differs between runs (date, seconds, the note's timing)."""
    out = {}
    for path in sorted(root.rglob("*.json")):
        if path.name == "evaluation_settings.json":
            continue
        record = read_result(path)
        record["provenance"].pop("date")
        record["provenance"].pop("seconds")
        record.pop("note")
        out[str(path.relative_to(root))] = record
    return out


def test_two_workers_write_the_records_of_one_process(tiny_and_stats, tmp_path):
    model, tokenizer, stats, path = tiny_and_stats
    common = dict(criteria=CRITERIA, ratios=[0.25], suite="smoke", model_name="tiny", calibration="random",
                  statistics_path=path, progress=False)
    one = sweep(model, tokenizer, stats, out_dir=tmp_path / "one", **common)
    seen = []
    two = sweep(model, tokenizer, stats, out_dir=tmp_path / "two", workers=2, load={"spec": SPEC},
                on_entry=lambda entry, paths: seen.append(entry.name), **common)
    assert [p.relative_to(tmp_path / "one") for p in one] == [p.relative_to(tmp_path / "two") for p in two]
    a, b = _records(tmp_path / "one"), _records(tmp_path / "two")
    assert a.keys() == b.keys() and len(a) == 4 * len(get_suite("smoke").benchmarks)
    for key in a:  # values and per-item outcomes bit for bit (json text of floats is exact)
        assert json.dumps(a[key], sort_keys=True) == json.dumps(b[key], sort_keys=True), key
    assert all(r["status"] == "ok" for r in b.values())
    assert "unpruned" in seen and set(seen) <= {"unpruned", *CRITERIA}
    # a rerun finds everything done: nothing is planned for the workers
    layers = find_moe_layers(model)
    settings = json.loads((tmp_path / "two" / "tiny" / "evaluation_settings.json").read_text())
    assert _worker_plan(model, stats, layers, criteria=CRITERIA, ratios=[0.25], suite=get_suite("smoke"),
                        model_name="tiny", calibration="random", out_dir=tmp_path / "two", include_unpruned=True,
                        reuse_identical=True, stats_hash=stats.checksum, settings=settings) == []


def test_worker_plan_skips_kept_sets_already_evaluated(tiny_and_stats, tmp_path):
    model, tokenizer, stats, path = tiny_and_stats
    sweep(model, tokenizer, stats, criteria=["man"], ratios=[0.25], suite="smoke", model_name="tiny",
          calibration="random", statistics_path=path, out_dir=tmp_path, progress=False)
    settings = json.loads((tmp_path / "tiny" / "evaluation_settings.json").read_text())
    kw = dict(ratios=[0.25], suite=get_suite("smoke"), model_name="tiny", out_dir=tmp_path, include_unpruned=True,
              reuse_identical=True, stats_hash=stats.checksum, settings=settings)
    layers = find_moe_layers(model)
    # "man" and (1, 0, 1) are one point: its files are done. The same kept experts under another
    # calibration's name are another entry's files, but the final pass reuses them: not planned either.
    assert _worker_plan(model, stats, layers, criteria=["man", (1, 0, 1)], calibration="random", **kw) == []
    assert _worker_plan(model, stats, layers, criteria=["man"], calibration="other", **kw) == []
    planned = _worker_plan(model, stats, layers, criteria=["man", "frequency"], calibration="random", **kw)
    assert planned == [2]  # unpruned (0) and man (1) are on disk; frequency keeps other experts


@pytest.mark.parametrize("kwargs, message", [
    (dict(workers=0), "at least 1"),
    (dict(workers=2), "load="),
    (dict(workers=2, load={"spec": SPEC}, backend="vllm"), "backend"),
    (dict(workers=2, load={"spec": SPEC}, statistics_path=None), "statistics_path"),
])
def test_workers_refuse_what_they_cannot_run(tiny_and_stats, tmp_path, kwargs, message):
    model, tokenizer, stats, path = tiny_and_stats
    options = dict(criteria=["man"], ratios=[0.25], suite="smoke", model_name="tiny", statistics_path=path,
                   out_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match=message):
        sweep(model, tokenizer, stats, **{**options, **kwargs})
    assert not (tmp_path / "tiny").exists() or not any((tmp_path / "tiny").rglob("*.json"))


def test_a_worker_loading_other_weights_is_refused(tiny_and_stats, tmp_path):
    model, tokenizer, stats, path = tiny_and_stats
    with pytest.raises(RuntimeError, match="not the sweep's model"):
        sweep(model, tokenizer, stats, criteria=["man"], ratios=[0.25], suite="smoke", model_name="tiny",
              statistics_path=path, out_dir=tmp_path, progress=False, workers=2, load={"spec": "tiny:olmoe"})
