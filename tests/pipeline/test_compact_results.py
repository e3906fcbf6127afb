"""Compact result records (issue 25): referenced items, float32 precision, every value and bootstrap unchanged."""

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from moepaper.pipeline import tables
from moepaper.pipeline.migrations import compact_results
from moepaper.pipeline.results import ITEMS_FROM, ItemsSourceError, SETTINGS_FILE, read_result
from moepaper.pipeline.tables import load_results

REPO = Path(__file__).resolve().parents[2]
FULL = REPO / "tests" / "fixtures" / "full_format_results"  # records as the writer before compaction wrote them
SOURCE = "embedded-16e/embedded-code/S_0_0_0__removed4/code_ppl.json"
REUSED = "embedded-16e/embedded-code/S_0_0_1__removed4/code_ppl.json"  # same kept experts as SOURCE


def full_format(record: dict) -> str:
    """A record as the former writer wrote it: every item copied, at double precision, indent 1."""
    record = {k: v for k, v in record.items() if k not in (ITEMS_FROM, "items_float32")}
    return json.dumps(record, indent=1, sort_keys=True, allow_nan=True) + "\n"


def records(root: Path) -> dict[str, dict]:
    """Every record under `root` as read (items resolved), without the reference itself."""
    return {str(p.relative_to(root)): {k: v for k, v in read_result(p).items() if k != ITEMS_FROM}
            for p in sorted(root.rglob("*.json")) if p.name != SETTINGS_FILE}


def test_compaction_reads_back_bit_for_bit_and_smaller(tmp_path):
    root = tmp_path / "results"
    shutil.copytree(FULL, root)
    before = records(root)
    assert any(x != float(__import__("numpy").float32(x)) for x in before[REUSED]["items"]["loglikelihood"])  # wide values too
    sizes = {p: (root / p).stat().st_size for p in before}
    report = compact_results(root, apply=True)
    assert report["referenced"] == 2 and report["records"] == 4  # code_ppl and code_mc of the reused entry
    after = records(root)
    assert json.dumps(after, sort_keys=True) == json.dumps(before, sort_keys=True)  # every value, every item, bit for bit
    written = json.loads((root / REUSED).read_text())
    assert written["items"] is None and written[ITEMS_FROM]["path"] == SOURCE
    assert all((root / p).stat().st_size * 100 <= sizes[p] * 35 for p in before if p.startswith(REUSED.rsplit("/", 1)[0]))  # references
    assert all((root / p).stat().st_size * 10 <= sizes[p] * 6 for p in before)  # own items: one line per field, float32 short
    assert compact_results(root, apply=True)["unchanged"] == 4  # idempotent

    # a folder that mixes formats (a sweep of the former writer): compacted again, still equal
    (root / REUSED).write_text(full_format(before[REUSED]))
    assert compact_results(root, apply=True)["rewritten"] == 1 and records(root) == after

    frame = load_results(root)
    assert frame.loc[frame.path.str.endswith(REUSED), "value"].item() == before[REUSED]["value"]
    (root / SOURCE).unlink()
    with pytest.raises(ItemsSourceError, match=str(root / SOURCE)) as error:
        load_results(root)
    assert str(root / REUSED) in str(error.value)


def test_committed_results_equal_their_full_format(tmp_path):
    """The committed (compact) records of one model and calibration, written back in the full format:
    the same table and the same bootstrap of average ranks, with a fixed seed."""
    root = REPO / "data" / "results" / "named"
    compact = load_results(root / "embedded-16e")
    compact = compact[compact.calibration.isin(["embedded:code", "none"])].reset_index(drop=True)
    old = tmp_path / "named"
    (old / "embedded-16e").mkdir(parents=True)
    shutil.copy(root / "embedded-16e" / SETTINGS_FILE, old / "embedded-16e" / SETTINGS_FILE)
    for path in compact.path:
        target = old / Path(path).relative_to(root)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(full_format(read_result(path)))
    full = load_results(old / "embedded-16e")
    pd.testing.assert_frame_equal(compact.drop(columns="path"), full.drop(columns="path"))
    options = dict(n=200, seed=0, model="embedded-16e")
    pd.testing.assert_frame_equal(tables.bootstrap_average_ranks(compact, **options), tables.bootstrap_average_ranks(full, **options))
