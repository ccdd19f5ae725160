"""The reference experiment's --jobs path runs its pieces as processes and assembles one report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "reference.py"


def test_cold_steps_spec_per_env():
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import reference
    finally:
        sys.path.remove(str(SCRIPT.parent))
    assert reference.cold_steps_for("40", "sql") == 40
    spec = "lookup-chain=80,code-sandbox=150"
    assert reference.cold_steps_for(spec, "code-sandbox") == 150
    with pytest.raises(SystemExit, match="no step count for env 'sql'"):
        reference.cold_steps_for(spec, "sql")


@pytest.mark.slow
def test_quick_reference_run_in_two_processes(tmp_path):
    runs = tmp_path / "runs"
    cmd = [sys.executable, str(SCRIPT), "--quick", "--envs", "lookup-chain", "--jobs", "2"]
    cmd += ["--runs-dir", str(runs), "--cold-steps", "lookup-chain=4"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    # One process per piece: the teacher evaluation and the seed.
    assert sorted(p.name for p in (runs / "units").iterdir()) == [
        "lookup-chain-0.json",
        "lookup-chain-teacher.json",
    ]
    results = json.loads((runs / "results-lookup-chain.json").read_text())["results"]
    assert results["cold_steps"] == 4
    seed = results["seeds"]["0"]
    assert set(seed["arms"]) == {"sft-only", "opd-rkl-sampled", "opd-rkl-topk"}
    assert 0.0 <= seed["cold_start"] <= 1.0
    report = (runs / "report" / "results.md").read_text()
    assert "| lookup-chain | 0 | " in report and "--jobs 2" in report
    assert (runs / "report" / "figures" / "lookup-chain-curves.png").stat().st_size > 1000
