"""Result stores that check what they are given (issue 11): where results go, how they are
keyed, which settings a folder holds, who writes it, and with which permissions.

`evaluate` is replaced by a fake that returns one row per benchmark, so these tests run in
about a second and test the store, not lm-eval."""

import json
import os
import stat
import subprocess
import sys
import threading

import pandas as pd
import pytest

from moepaper import collect_statistics
from moepaper.pipeline import evaluation
from moepaper.pipeline.evaluation import RESULT_COLUMNS, Benchmark, Suite
from moepaper.pipeline.results import (
    LOCK_FILE,
    SETTINGS_FILE,
    ResultsLockedError,
    ResultsSettingsError,
    read_result,
    result_path,
    results_lock,
    sweep,
    write_json_atomic,
)
from moepaper.testbed.tiny import random_batch, tiny_model

SUITE = Suite("fake", (Benchmark("b_mc", "MC", "b_mc", "acc,none"),), include_path=None, include_defaults=False, limit=3)


@pytest.fixture(scope="module")
def tiny():
    return tiny_model("qwen3_moe")  # 8 experts per MoE layer


@pytest.fixture(scope="module")
def stats(tiny):
    return collect_statistics(tiny, [random_batch(batch=2, seq_len=16, seed=i) for i in range(2)], progress=False,
                              calibration="random")


@pytest.fixture
def calls(monkeypatch):
    """Replaces `evaluate`: records each call's benchmarks and returns value 0.5 for each."""
    made = []

    def fake(model, tokenizer, suite, *, benchmarks=None, **kwargs):
        made.append(list(benchmarks))
        rows = [{"benchmark": b, "label": b, "task": b, "metric": "acc,none", "value": 0.5, "stderr": None,
                 "higher_is_better": True, "n": 3, "status": "ok", "note": "", "suite": suite.name, "domain": None}
                for b in benchmarks]
        return pd.DataFrame(rows, columns=RESULT_COLUMNS)

    monkeypatch.setattr(evaluation, "evaluate", fake)
    return made


def run(tiny, stats, out_dir, **kwargs):
    kwargs = {"criteria": ["man"], "ratios": [0.5], "suite": SUITE, "model_name": "tiny", "progress": False, **kwargs}
    return sweep(tiny, None, stats, out_dir=out_dir, **kwargs)


# ---------------------------------------------------------------- case 1: one output root


def test_sweep_and_report_write_only_under_the_roots_they_are_given(tiny, stats, calls, tmp_path, monkeypatch):
    from moepaper.pipeline.figures import write_report
    from moepaper.pipeline.tables import load_results
    from moepaper.project import project_root

    root = project_root()
    watched = [root / "data" / "results", root / "data" / "statistics", root / "figures"]
    before = {p: p.stat().st_mtime_ns for folder in watched if folder.exists() for p in folder.rglob("*")}
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # relative defaults, if any, would land here
    out = tmp_path / "out"
    run(tiny, stats, out / "results", criteria=["man", "frequency"])
    stats.save(out / "statistics" / "tiny.safetensors")
    df = load_results(out / "results")
    write_report(df, {"random": stats}, out / "figures", model="tiny")
    after = {p: p.stat().st_mtime_ns for folder in watched if folder.exists() for p in folder.rglob("*")}
    assert after == before  # nothing of the checkout changed
    assert not any(elsewhere.iterdir())
    assert {p.relative_to(out).parts[0] for p in out.rglob("*") if p.is_file()} == {"results", "statistics", "figures"}


# ---------------------------------------------------------------- case 2: settings and writers


def test_results_folder_refuses_other_evaluation_settings(tiny, stats, calls, tmp_path):
    run(tiny, stats, tmp_path)
    recorded = json.loads((tmp_path / "tiny" / SETTINGS_FILE).read_text())
    assert recorded["limit"] == 3
    files = {p: p.read_bytes() for p in tmp_path.rglob("*.json")}
    calls.clear()
    with pytest.raises(ResultsSettingsError) as error:
        run(tiny, stats, tmp_path, limit=2)
    message = str(error.value)
    assert "'limit': 3" in message and "'limit': 2" in message and "limit: 3 there, 2 here" in message
    assert calls == [] and {p: p.read_bytes() for p in tmp_path.rglob("*.json")} == files
    run(tiny, stats, tmp_path, limit=3)  # the folder's own settings: accepted, nothing to do
    assert calls == []


def test_results_folder_without_settings_record_is_checked_record_by_record(tiny, stats, calls, tmp_path):
    run(tiny, stats, tmp_path)
    (tmp_path / "tiny" / SETTINGS_FILE).unlink()  # a folder written before the record existed
    with pytest.raises(ResultsSettingsError, match=r"b_mc\.json was made with"):
        run(tiny, stats, tmp_path, limit=2)


def test_concurrent_sweep_into_one_folder_is_refused_naming_the_holder(tiny, stats, calls, tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\n"
        "from moepaper.pipeline.results import results_lock\n"
        f"with results_lock({str(tmp_path / 'tiny')!r}):\n"
        "    print('locked', flush=True)\n"
        "    time.sleep(60)\n")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ResultsLockedError, match=f"pid {holder.pid}"):
            run(tiny, stats, tmp_path)
        assert calls == []
    finally:
        holder.kill()
        holder.wait()
    run(tiny, stats, tmp_path)  # the holder died: its lock is gone with it
    assert len(calls) == 2 and not (tmp_path / "tiny" / LOCK_FILE).exists()


def test_stale_lock_file_of_a_dead_process_is_taken_over(tiny, stats, calls, tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / LOCK_FILE).write_text(dead.stdout)  # left by a killed sweep
    run(tiny, stats, tmp_path)
    assert len(calls) == 2


def test_two_threads_sweeping_one_folder_one_is_refused(tmp_path):
    entered, release = threading.Event(), threading.Event()

    def hold():
        with results_lock(tmp_path):
            entered.set()
            release.wait(10)

    thread = threading.Thread(target=hold)
    thread.start()
    entered.wait(10)
    try:
        with pytest.raises(ResultsLockedError, match=f"pid {os.getpid()}"):
            with results_lock(tmp_path):
                pass
    finally:
        release.set()
        thread.join()
    with results_lock(tmp_path):  # free again
        pass


# ---------------------------------------------------------------- case 4: keys


def test_results_keyed_by_point_and_exact_experts_removed(tiny, stats, calls, tmp_path):
    from moepaper.criteria import Criterion

    # both ratios print as 0.3125 but remove 2 and 3 of 8 experts: two results, not one file
    ratios = [0.3125 - 1e-9, 0.3125]
    assert len({f"{r:g}" for r in ratios}) == 1
    paths = run(tiny, stats, tmp_path, criteria=["man"], ratios=ratios, include_unpruned=False)
    assert [p.parent.name for p in paths] == ["S_1_0_1__removed2", "S_1_0_1__removed3"]
    assert len(calls) == 2
    assert [read_result(p)["removed"] for p in paths] == [[2, 2], [3, 3]]
    calls.clear()
    # a different point under an existing name is another result, not a reuse
    other = Criterion(0, 0, 1, name="man")
    paths = run(tiny, stats, tmp_path, criteria=[other], ratios=[0.25], include_unpruned=False, reuse_identical=False)
    assert paths[0].parent.name == "S_0_0_1__removed2" and len(calls) == 1
    # criteria outside the family are keyed by name
    assert result_path(tmp_path, "m", "c", "mone", 4, "b").parent.name == "mone__removed4"
    assert result_path(tmp_path, "m", "c", (1, 0, 1), [4, 4, 3], "b").parent.name == "S_1_0_1__removed4-4-3"
    with pytest.raises(ValueError, match="not a ratio"):
        result_path(tmp_path, "m", "c", "man", 0.5, "b")


def test_done_check_uses_the_statistics_checksum_not_the_file(tiny, stats, calls, tmp_path):
    first = tmp_path / "a.safetensors"
    stats.save(first)
    run(tiny, stats, tmp_path / "results", statistics_path=first)
    calls.clear()
    stats.metadata["note"] = "re-saved with another header"
    second = tmp_path / "b.safetensors"
    stats.save(second)  # other bytes, same tensors
    stats.metadata.pop("note")
    paths = run(tiny, stats, tmp_path / "results", statistics_path=second)
    assert calls == []
    assert read_result(paths[-1])["provenance"]["statistics_hash"] == stats.checksum


# ---------------------------------------------------------------- case 9: writing


def test_unwritable_results_folder_is_refused_before_any_evaluation(tiny, stats, calls, tmp_path):
    if os.geteuid() == 0:
        target = tmp_path / "file"
        target.write_text("a file where the results folder should be")
        out = target / "results"
    else:
        out = tmp_path / "ro"
        out.mkdir()
        out.chmod(0o500)
    with pytest.raises(OSError, match="not writable"):
        run(tiny, stats, out)
    assert calls == []


def test_report_checks_its_folder_before_drawing(tmp_path, monkeypatch):
    from moepaper.pipeline import figures

    drawn = []
    monkeypatch.setattr(figures, "write_tables", lambda *a, **k: drawn.append("tables") or [])
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(OSError, match="not writable"):
        figures.write_report(pd.DataFrame({"model": ["m"], "criterion": ["man"], "calibration": ["c"]}), None,
                             target / "figures", model="m")
    assert drawn == []


def test_files_get_the_process_permissions_and_unique_temporary_names(stats, tmp_path, monkeypatch):
    old = os.umask(0o027)
    try:
        json_path = write_json_atomic(tmp_path / "r.json", {"a": 1})
        stats_path = stats.save(tmp_path / "s.safetensors")
    finally:
        os.umask(old)
    assert stat.S_IMODE(json_path.stat().st_mode) == 0o640
    assert stat.S_IMODE(stats_path.stat().st_mode) == 0o640
    # two saves of one statistics file at once: each through its own temporary file
    import moepaper.statistics as statistics_module

    names, real = [], statistics_module.save_file

    def recording(tensors, filename, metadata=None):
        names.append(filename)
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(statistics_module, "save_file", recording)
    threads = [threading.Thread(target=stats.save, args=(tmp_path / "same.safetensors",)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(names)) == 4 and not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))
    statistics_module.ExpertStatistics.load(tmp_path / "same.safetensors")


# ---------------------------------------------------------------- versions (issue 22)


def test_results_of_another_version_are_re_evaluated_never_reused(tiny, stats, calls, tmp_path, monkeypatch):
    """A record made by another moepaper / lm-eval / transformers / torch (or naming no versions) is
    neither skipped nor copied for identical kept experts: it is evaluated again and replaced. torch's
    build label alone (+cpu, +cu128) is the same release."""
    from moepaper.pipeline import results

    paths = run(tiny, stats, tmp_path, criteria=["man", "msan"])
    assert len(calls) >= 2
    calls.clear()
    run(tiny, stats, tmp_path, criteria=["man", "msan"])
    assert calls == []  # same versions: everything reused
    today = results._versions()
    for key, other in (("moepaper", "0.0.9"), ("lm_eval", "0.4.12"), ("transformers", "5.23.0"), ("torch", "2.12.0")):
        monkeypatch.setattr(results, "_versions", lambda key=key, other=other: {**today, key: other})
        calls.clear()
        run(tiny, stats, tmp_path, criteria=["man", "msan"])
        assert len(calls) >= 2, key  # the unpruned model and a pruned one at least: nothing copied from older records
        assert all(read_result(p)["provenance"][key] == other for p in paths)
    monkeypatch.setattr(results, "_versions", lambda: {**today, "torch": "2.12.0+cu128"})
    calls.clear()
    run(tiny, stats, tmp_path, criteria=["man", "msan"])
    assert calls == []  # 2.12.0+cu128 is the release 2.12.0 of the records
    record = read_result(paths[0])
    del record["provenance"]["lm_eval"]  # a record of unknown make
    write_json_atomic(paths[0], record)
    run(tiny, stats, tmp_path, criteria=["man", "msan"])
    assert calls == [["b_mc"]] and read_result(paths[0])["provenance"]["lm_eval"] == today["lm_eval"]


def test_tables_refuse_results_of_one_model_made_by_different_versions(tiny, stats, calls, tmp_path):
    from moepaper.pipeline.tables import load_results

    paths = run(tiny, stats, tmp_path)
    assert len(load_results(tmp_path)) == len(paths)
    record = read_result(paths[-1])
    record["provenance"]["torch"] = "2.13.0+cu128"  # the same release, another build: one make
    write_json_atomic(paths[-1], record)
    assert len(load_results(tmp_path)) == len(paths)
    record["provenance"]["transformers"] = "5.25.0"
    write_json_atomic(paths[-1], record)
    with pytest.raises(ValueError, match=r"results of model 'tiny' .* different versions: .*'transformers': '5\.25\.0'"):
        load_results(tmp_path)
