"""benchmarks/tcod.py: arm definitions, confidence intervals, the report block, a --quick run."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "tcod.py"
sys.path.insert(0, str(SCRIPT.parent))
try:
    import tcod
finally:
    sys.path.remove(str(SCRIPT.parent))


def test_ci95_is_a_t_interval():
    m, h = tcod.ci95([0.2, 0.4, 0.6])
    assert m == pytest.approx(0.4) and h == pytest.approx(4.303 * 0.2 / 3**0.5)
    assert tcod.ci95([0.5]) == (0.5, 0.0)


def test_every_arm_has_its_overrides():
    a = argparse.Namespace(sft_warmup=5, eta=3, guide_p=0.5, steps=40)
    assert tcod.arm_overrides("sft-only", a) == ["gkd_lambda=0", "optim.warmup_steps=5"]
    assert "curriculum_kwargs.eta=3" in tcod.arm_overrides("tcod-b2f", a)
    assert "curriculum_kwargs.decay_steps=20" in tcod.arm_overrides("guided-opd", a)
    assert set(tcod.ARMS) == {
        "sft-only",
        "uniform",
        "tcod-f2b",
        "tcod-b2f",
        "horizon-sorted",
        "guided-opd",
    }


def test_report_block_replaces_the_previous_one(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text(f"# T\n\nintro\n\n{tcod.MARK_START}\nold\n{tcod.MARK_END}\n\n## After\n")
    res = {"env": "lookup-chain", "settings": ["a=1"], "seeds": [0], "budget": 10, "wall_s": 60}
    tcod.write_report(doc, res, "| new |", "python benchmarks/tcod.py")
    text = doc.read_text()
    assert "old" not in text and "| new |" in text and text.endswith("## After\n")
    assert text.count(tcod.MARK_START) == 1


@pytest.mark.slow
def test_quick_run_in_two_processes(tmp_path):
    runs = tmp_path / "runs"
    cmd = [sys.executable, str(SCRIPT), "--quick", "--jobs", "2", "--runs-dir", str(runs)]
    cmd += ["--arms", "sft-only", "guided-opd"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    res = json.loads((runs / "results.json").read_text())
    assert set(res["arms"]) == {"sft-only/0", "guided-opd/0"}
    assert all(r["steps"] == 1 and r["teacher_tokens"] > 0 for r in res["arms"].values())
    assert (
        "| guided-opd |" in done.stdout and "| teacher (tiny-teacher-lookup-chain) |" in done.stdout
    )
    # the per-arm report: the budget three ways and the two plots
    assert "teacher prefill positions" in done.stdout
    assert set(res["curves"]) == {"sft-only", "guided-opd"}
    assert res["curves"]["guided-opd"]["prefill_positions"] > 0
    assert res["curves"]["sft-only"]["prefill_positions"] == 0
    assert {p.name for p in runs.glob("tcod-lookup-chain-*.png")} == {
        "tcod-lookup-chain-kl_per_turn.png", "tcod-lookup-chain-success_by_length.png"
    }  # fmt: skip
