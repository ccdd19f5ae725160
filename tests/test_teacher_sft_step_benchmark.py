"""The teacher SFT step benchmark runs and its variants agree on the loss."""

import importlib.util
import re
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "teacher_sft_step.py"


def test_quick_run_prints_equal_losses_and_speedups(capsys):
    spec = importlib.util.spec_from_file_location("teacher_sft_step", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.main(["--quick", "--threads", "1"])
    out = capsys.readouterr().out
    rows = dict(
        (m.group(1), (float(m.group(2)), float(m.group(3))))
        for m in re.finditer(r"^(padded|packed)\s+[\d.]+\s+([\d.]+)x\s+([\d.]+)$", out, re.M)
    )
    assert set(rows) == {"padded", "packed"}, out
    assert rows["padded"][0] == 1.0
    assert abs(rows["padded"][1] - rows["packed"][1]) < 1e-3
