"""benchmarks/vs_trl.py --quick runs both frameworks' OPD step and prints the comparison table."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "vs_trl.py"


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("trl") is None,
    reason="TRL is not installed: it is an optional dependency of benchmarks/vs_trl.py only, "
    "not part of the dev install (pip install trl==1.16 to run this test)",
)
def test_quick_comparison_prints_the_table(tmp_path):
    out = tmp_path / "vs_trl.json"
    cmd = [sys.executable, str(SCRIPT), "--quick", "--out", str(out)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert lines[0].startswith("| setting | agentopd loss | step time agentopd/TRL | learner")
    assert [line.split(" | ")[1] for line in lines if line.startswith("| quick | rkl-")] == [
        "rkl-sampled",
        "rkl-topk",
        "rkl-full",
    ]
    assert sum(line.startswith("| quick | 8,192, 4, 96 + 32 | ") for line in lines) == 4
    (row,) = json.loads(out.read_text())["rows"]
    for side in ("trl", "rkl-sampled", "rkl-topk", "rkl-full"):
        r = row[side]
        assert r["step_s"] > 0 and r["generation_s"] > 0 and r["learner_s"] > 0, side
        assert r["peak_mb"] >= r["baseline_mb"] > 0, side
