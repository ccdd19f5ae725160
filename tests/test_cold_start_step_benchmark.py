"""The cold-start step benchmark runs, and padded and packed steps train the same losses."""

import importlib.util
import re
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "cold_start_step.py"


def test_quick_run_prints_equal_losses_and_speedups(capsys):
    spec = importlib.util.spec_from_file_location("cold_start_step", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.main(["--quick", "--threads", "1", "--episodes", "24"])
    out = capsys.readouterr().out
    row = r"^(padded|packed)\s+([\d.]+)\s+([\d.]+)x\s+([\d.]+)\s+([\d.e+-]+)$"
    rows = {m.group(1): [float(g) for g in m.groups()[1:]] for m in re.finditer(row, out, re.M)}
    assert set(rows) == {"padded", "packed"}, out
    assert rows["padded"][1] == 1.0 and rows["packed"][0] > 0
    # Both variants trained the same student on the same batches: the same loss at every step.
    assert abs(rows["padded"][2] - rows["packed"][2]) < 1e-4
    assert rows["packed"][3] < 1e-4
